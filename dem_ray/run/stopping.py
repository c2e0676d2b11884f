"""Stopping a run on Ctrl-C (SIGINT) or SIGTERM, in any stage.

The first signal raises `Stopped` in the main thread, wherever it is (a stage's own
code, `Thread.join`, `ray.get`, Tune's event loop); the command then shuts Ray down,
which ends every trainer, trial and evaluator actor of the run, and exits 130 (SIGINT)
or 143 (SIGTERM). Stages already recorded in the manifest stay recorded, so the next
`dem-ray run` resumes. A second signal exits at once.

Why the defaults do not do this (Ray 2.60, measured):

* Ray Tune installs its own SIGINT handler in `tuner.fit()` (`_setup_signal_catching`):
  the first Ctrl-C only asks Tune to end "gracefully", `fit()` returns, and the handler
  stays installed after the search, so Ctrl-C in every later stage (merge, the
  baseline's fine-tunes, report) is swallowed. `TUNE_DISABLE_SIGINT_HANDLER=1` (read
  by each `tuner.fit()`, so setting it before the first search is enough) turns it off.
* `ray.init()` sets a Python SIGTERM handler (`sys.exit(15)`), and then the core
  worker's C++ failure-signal handler takes SIGTERM over at the OS level: SIGTERM
  aborts the driver (exit -6, "*** SIGTERM received"), no cleanup. Installing our
  handler again after every `ray.init()` takes it back.
* The fine-tunes run `trainer.fit()` in threads; non-daemon threads keep the
  interpreter alive after a KeyboardInterrupt until the fine-tunes finish.
  (`Thread.join()` itself is interruptible on POSIX; the daemon flag is what matters.)
* Ray's own processes (gcs, raylet, dashboard, agents) share the driver's process
  group but block SIGINT; workers run in process groups of their own. Nothing of Ray
  stops on Ctrl-C unless the driver shuts Ray down.

Pure stdlib + ray (imported lazily); no other dem_ray module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number

# Settings that must be in the environment before the first `tuner.fit()`.
ENV = {"TUNE_DISABLE_SIGINT_HANDLER": "1"}


class Stopped(KeyboardInterrupt):
    """The run was asked to stop by a signal. A KeyboardInterrupt (so a BaseException), so
    that no `except Exception` on the way up turns it into an error, and because Ray's
    Cython waits (`ray.get`, `ray.wait`, Tune's loop) turn a signal handler's
    KeyboardInterrupt into their own KeyboardInterrupt and any other exception into a
    SystemError. Code that catches it should use `as_stopped` to recover the signal."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        self.name = signal.Signals(self.signum).name
        self.exit_code = EXIT_CODES.get(self.signum, 128 + self.signum)
        super().__init__(f"stopped by {self.name}")


_stopped: Stopped | None = None
_installed = False


def configure_env(environ: dict | None = None) -> None:
    """Put `ENV` into the environment (overriding: a Tune SIGINT handler breaks stopping)."""
    env = os.environ if environ is None else environ
    env.update(ENV)


def install_stop_handlers() -> bool:
    """SIGINT and SIGTERM raise `Stopped` in the main thread (the second one exits at once).

    The command (`dem_ray.cli.main`) calls this first; the code that may run under it
    calls `reinstall_stop_handlers` after `ray.init()` and before each stage. Only the
    main thread can install handlers; from another thread this does nothing (False).
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    global _installed
    configure_env()
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_signal)
    _installed = True
    return True


def reinstall_stop_handlers() -> bool:
    """`install_stop_handlers` again, if the command installed them (a no-op when dem_ray
    runs as a library, e.g. in a test process: its SIGINT stays KeyboardInterrupt).

    Call right after every `ray.init()` (the core worker takes SIGTERM over while it
    starts) and before each stage (cheap; in case a library set a handler of its own).
    """
    return _installed and install_stop_handlers()


def as_stopped(exc: BaseException) -> Stopped:
    """The stop behind a KeyboardInterrupt: itself, the first signal's (Ray re-raises a
    plain KeyboardInterrupt of its own), or SIGINT's when no handler of ours saw it."""
    if isinstance(exc, Stopped):
        return exc
    return _stopped or Stopped(signal.SIGINT)


def _on_signal(signum: int, frame) -> None:
    global _stopped
    if _stopped is not None:  # a second signal while stopping: do not wait for cleanup
        code = EXIT_CODES.get(signum, 128 + signum)
        _write_stderr(f"stopping: {signal.Signals(signum).name} again; exiting now ({code})\n")
        signal_descendants(signal.SIGKILL)  # Ray's processes, agents and workers included
        os._exit(code)
    _stopped = Stopped(signum)
    log.warning(
        "stopping: %s received; cancelling the fine-tunes, the search and the evaluator "
        "actors and shutting Ray down (send it again to exit at once)",
        _stopped.name,
    )
    raise _stopped


def start_threads(
    targets: Iterable[tuple[Callable[..., None], tuple, str]],
) -> list[threading.Thread]:
    """Start one daemon thread per (target, args, name): a stopped run does not wait for
    a thread still blocked in Ray (`trainer.fit()`), and `ray.shutdown()` ends its work."""
    threads = [threading.Thread(target=t, args=a, name=n, daemon=True) for t, a, n in targets]
    for thread in threads:
        thread.start()
    return threads


def wait_threads(
    threads: Sequence[threading.Thread],
    on_done: Callable[[threading.Thread], None] | None = None,
    poll_s: float = 0.25,
) -> None:
    """Wait for `threads`, in the main thread, in a way a signal interrupts at once.

    `on_done(thread)` runs here (in the caller's thread) as each thread finishes, in
    the order they finish: record a finished fine-tune in the manifest right away, so
    a stop while others still run keeps it. Threads must be daemon threads
    (`start_threads`), or a stop would wait for them at interpreter exit.
    """
    for thread in threads:
        if not thread.daemon:
            raise ValueError(f"thread {thread.name} is not a daemon thread; use start_threads")
    pending = list(threads)
    while pending:
        for thread in [t for t in pending if not t.is_alive()]:
            pending.remove(thread)
            if on_done is not None:
                on_done(thread)
        if pending:
            pending[0].join(timeout=poll_s)


def shutdown_ray(timeout_s: float = 20.0, actors: Iterable = ()) -> bool:
    """Kill `actors` and shut Ray down, within `timeout_s`; True if it finished in time.

    For the private local instance (`ray.init(address="local")`) shutdown stops gcs and
    raylet, which ends every worker: trainers, Tune trials, evaluator actors. On a
    cluster the driver disconnects and Ray ends the job's (non-detached) actors and
    tasks. Runs in a daemon thread, so a hung shutdown cannot hold the exit; the
    processes Ray started fate-share with the driver (PR_SET_PDEATHSIG) and die with it.
    """
    try:
        import ray
    except ImportError:
        return True
    if not ray.is_initialized():
        return True

    def work() -> None:
        for actor in actors:
            with contextlib.suppress(Exception):  # already dead, or Ray already gone
                ray.kill(actor, no_restart=True)
        try:
            ray.shutdown()
        except Exception as exc:  # noqa: BLE001 - the exit goes on regardless
            log.warning("stopping: ray.shutdown failed: %s", exc)

    start = time.monotonic()
    thread = threading.Thread(target=work, name="stop-ray", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        log.warning("stopping: Ray did not shut down within %.0f s; exiting anyway", timeout_s)
        return False
    log.info("stopping: Ray shut down in %.1f s", time.monotonic() - start)
    return True


def exit_stopped(stop: Stopped, message: str = "", timeout_s: float = 20.0) -> None:
    """End a stopped command: end Ray's work, print `message`, exit 130 or 143.

    SIGINT: `shutdown_ray` (Ray's processes ignore SIGINT, so they are all still up);
    if it does not finish in `timeout_s`, the driver's descendants get SIGKILL.
    SIGTERM: no `ray.shutdown()`. A SIGTERM to the process group (systemd, a job
    scheduler, `kill -- -PGID`) reaches gcs and raylet as well, and once the raylet is
    gone the driver's core worker quick-exits with status 1 on its next call to it
    (`ray.shutdown()` makes one: "Exiting because the Raylet IPC connection failed"), so
    the driver passes SIGTERM on to every process it started (as a group signal would
    have: Ray's head processes, their agents and workers) and exits at once. On a
    cluster (no local Ray processes) the GCS sees the driver gone and ends its job.
    """
    if stop.signum == signal.SIGTERM:
        signal_descendants(signal.SIGTERM)
    elif not shutdown_ray(timeout_s):
        signal_descendants(signal.SIGKILL)
    if message:
        _write_stderr(message.rstrip("\n") + "\n")
    exit_now(stop.exit_code)


def descendants(pid: int | None = None) -> list[int]:
    """Every live process below `pid` (default: this one), from /proc; [] where there is
    no /proc. Ray's workers are children of the raylet, which is a child of the driver."""
    root = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])  # after "(comm) state"
        children.setdefault(ppid, []).append(int(name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def signal_descendants(signum: int) -> list[int]:
    """Send `signum` to every process this one started (and theirs); the pids signalled."""
    sent = []
    for pid in descendants():
        with contextlib.suppress(OSError):
            os.kill(pid, signum)
            sent.append(pid)
    return sent


def exit_now(code: int) -> None:
    """Flush and leave without interpreter teardown: daemon threads still inside Ray's
    C++ client (an abandoned `trainer.fit()`) can hang or crash a normal exit, and Ray's
    atexit hook has nothing left to do after `shutdown_ray`."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):  # closed, or None
            stream.flush()
    os._exit(code)


def _write_stderr(text: str) -> None:
    with contextlib.suppress(OSError):
        os.write(2, text.encode())


def uninstall_stop_handlers(saved: dict) -> None:
    """Put back the handlers `saved` ({signum: handler}) and stop reinstalling ours: for a
    command that ran inside another program (a test process calling `dem_ray.cli.main`)."""
    global _installed
    _installed = False
    if threading.current_thread() is threading.main_thread():
        for signum, handler in saved.items():
            signal.signal(signum, handler)
