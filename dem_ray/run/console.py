"""What a `dem-ray` command shows on the terminal, and the logs it keeps in `<run_dir>/logs/`.

By default the terminal gets dem-ray's own log lines, warnings and errors, and progress:
bars when stderr is a terminal (fine-tune steps with the loss, search trials with the best
so far, bucket downloads in bytes), plain lines otherwise (job logs, files). Everything
else — Ray's own loggers and its C++ core worker on the driver, every worker's output,
other libraries' warnings and bars — goes to the log files only:

- `dem-ray.log`: every log record of the driver, dem-ray's and the libraries' (INFO up);
- `workers.log`: every line a Ray worker printed, tagged with the actor or task and pid;
- `driver.log`: what else the driver process wrote to its stderr (Ray's C++ lines).

`-v` shows all of it on the terminal as well. Progress crosses processes as events: a
worker prints a marked JSON line (`emit`), the driver's router hands it to the console
(`Console.on_event`); the driver's own code calls `emit` too, which goes straight there.

Nothing here imports Ray: the Ray side of the routing is `dem_ray.ray.logs`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

MARKER = "::dem-ray-event::"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"
# No rate: a worker's events reach the driver in batches, so tqdm's would be noise.
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"

log = logging.getLogger(__name__)
_ACTIVE: Console | None = None
_ACTIVE_LOCK = threading.Lock()


# ---- events ---------------------------------------------------------------------------------
def emit(kind: str, **fields: Any) -> None:
    """Progress or a message for the user, from the driver or from a Ray worker.

    kinds: `step` (name, step, of, loss, tokens_per_s), `trial` (stage, done, total,
    best, line), `download` (name, done, total), `message` (level, text).
    """
    event = {"kind": kind, **fields}
    console = _ACTIVE
    if console is not None:
        console.on_event(event)
    elif _in_ray_worker():
        print(MARKER + json.dumps(event), file=sys.stderr, flush=True)
    else:  # a driver with no console (a library call, a test): the plain line
        level = logging.getLevelName(str(event.get("level", "INFO")).upper())
        logging.getLogger(event.get("logger", __name__)).log(level, describe(event))


def parse_event(line: str) -> dict | None:
    """The event a worker's output line carries, or None for any other line."""
    at = line.find(MARKER)
    if at < 0:
        return None
    try:
        event = json.loads(line[at + len(MARKER) :])
    except ValueError:
        return None
    return event if isinstance(event, dict) and "kind" in event else None


def describe(event: dict) -> str:
    """The plain line of an event, as job logs and files show it."""
    kind = event["kind"]
    if kind == "step" and event.get("loss") is None:
        return (f"[finetune {event['name']}] training: {event['of']} steps"
                + (f", from step {event['step']}" if event["step"] else ""))  # fmt: skip
    if kind == "step":
        return (f"[finetune {event['name']}] step {event['step']}/{event['of']} loss "
                f"{event['loss']:.4f} tokens/s {event['tokens_per_s']:.0f}")  # fmt: skip
    if kind == "download":
        return (f"storage: {event['name']}: {_mb(event['done'])} of {_mb(event['total'])} "
                "downloaded")  # fmt: skip
    if kind in ("trial", "message"):
        return str(event.get("line") or event.get("text"))
    return json.dumps(event)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _in_ray_worker() -> bool:
    ray = sys.modules.get("ray")
    if ray is None:
        return False
    try:
        return ray._private.worker.global_worker.mode == ray.WORKER_MODE
    except AttributeError:
        return False


def new_log_dir(root: Path, command: str) -> Path:
    """A fresh `root/DATE-TIME-COMMAND/` (`-2`, `-3`, ... when one of that second exists):
    a command never appends to another's logs, so nothing already on disk changes."""
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{command}"
    for n in range(1, 1000):
        path = Path(root) / (stem if n == 1 else f"{stem}-{n}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
        except OSError:  # an unwritable run dir: `Console.open` says so, the run's check too
            return path
    raise RuntimeError(f"{root}: 999 log folders named {stem}*; remove some")


# ---- the console ------------------------------------------------------------------------------
class _TerminalFilter(logging.Filter):
    """dem-ray's records at `level` and up; every other logger's at ERROR and up."""

    def __init__(self, level: int, everything: bool) -> None:
        super().__init__()
        self.level, self.everything = level, everything

    def filter(self, record: logging.LogRecord) -> bool:
        if self.everything:
            return record.levelno >= self.level
        if record.name == "dem_ray" or record.name.startswith("dem_ray."):
            return record.levelno >= self.level
        return record.levelno >= logging.ERROR


class _TerminalHandler(logging.Handler):
    """Writes above the progress bars, so a log line never breaks one."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.write_line(self.format(record))
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)


class Console:
    """The terminal and log files of one command; `open` it, then `close` it.

    `terminal`: where the user reads (default: stderr). `log_dir`: None keeps no files.
    `verbose`: also show what goes to the files. `quiet`: warnings and errors only.
    `bars`: progress bars (default: when the terminal is a TTY and not quiet).
    """

    def __init__(
        self,
        log_dir: Path | None,
        *,
        verbose: bool = False,
        quiet: bool = False,
        terminal: TextIO | None = None,
        bars: bool | None = None,
    ) -> None:
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.verbose, self.quiet = verbose, quiet
        self.terminal = terminal or sys.stderr
        if bars is None:
            bars = not quiet and _is_tty(self.terminal)
        self.bars = bars
        self._lock = threading.RLock()
        self._handlers: list[logging.Handler] = []
        self._files: dict[str, TextIO] = {}
        self._bars: dict[tuple, Any] = {}
        self._seen_steps: set[tuple[str, int]] = set()
        self._undo: list[Any] = []
        self._saved_stderr: TextIO | None = None
        self._saved_fd: int | None = None
        self._root_level: int | None = None

    # ---- lifecycle ------------------------------------------------------------------------
    def open(self, header: str = "") -> Console:
        global _ACTIVE
        root = logging.getLogger()
        self._root_level = root.level
        root.setLevel(logging.INFO if not self.verbose else logging.DEBUG)
        term = _TerminalHandler(self)
        term.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
        term.addFilter(_TerminalFilter(logging.WARNING if self.quiet else logging.INFO,
                                       everything=self.verbose))  # fmt: skip
        self._add_handler(term)
        if self.log_dir is not None:
            try:
                self._open_files(header)
            except OSError as exc:  # an unwritable run dir: the run's own check says so
                for f in self._files.values():
                    f.close()
                self._files.clear()
                log.warning("no logs kept: cannot write %s (%s)", self.log_dir, exc)
                self.log_dir = None
        if self.log_dir is not None:
            file_handler = logging.StreamHandler(self._files["dem-ray.log"])
            file_handler.setFormatter(logging.Formatter(LOG_FORMAT, "%Y-%m-%d %H:%M:%S"))
            file_handler.setLevel(logging.INFO)
            self._add_handler(file_handler)
            if not self.verbose:
                self._redirect_stderr(self._files["driver.log"])
        logging.captureWarnings(True)
        with _ACTIVE_LOCK:
            _ACTIVE = self
        return self

    def close(self, restore_fd: bool = True) -> None:
        """Undo everything `open` did. `restore_fd=False` leaves the process's fd 2 on
        `driver.log`, for the lines Ray's C++ side writes while the process exits."""
        global _ACTIVE
        with _ACTIVE_LOCK:
            if _ACTIVE is self:
                _ACTIVE = None
        for undo in reversed(self._undo):
            with contextlib.suppress(Exception):
                undo()
        self._undo.clear()
        with self._lock:
            for bar in self._bars.values():
                bar.close()
            self._bars.clear()
        root = logging.getLogger()
        for handler in self._handlers:
            root.removeHandler(handler)
        self._handlers.clear()
        if self._root_level is not None:
            root.setLevel(self._root_level)
        logging.captureWarnings(False)
        if self._saved_stderr is not None:
            # Left on driver.log, fd 2 is no way to the terminal: Python's stderr (the
            # command's errors, a traceback) becomes the console's copy of it.
            kept = self._saved_fd is not None and not restore_fd
            sys.stderr = self.terminal if kept else self._saved_stderr
            self._saved_stderr = None
        if self._saved_fd is not None:
            if restore_fd:
                os.dup2(self._saved_fd, 2)
                self.terminal.close()  # the copy made in `_redirect_stderr`
                self.terminal = sys.stderr
            os.close(self._saved_fd)
            self._saved_fd = None
        for f in self._files.values():
            f.close()  # fd 2, when left on driver.log, is a duplicate and stays open
        self._files.clear()

    def __enter__(self) -> Console:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def on_close(self, undo: Any) -> None:
        """Run `undo()` when the console closes (the Ray router's removal)."""
        self._undo.append(undo)

    @property
    def stdout_sink(self) -> TextIO:
        """Where stray prints to stdout go while stages run: the terminal with `-v`, else
        `driver.log` (stdout carries only the command's answer)."""
        if self.verbose or "driver.log" not in self._files:
            return self.terminal
        return self._files["driver.log"]

    # ---- writing --------------------------------------------------------------------------
    def write_line(self, text: str) -> None:
        with self._lock:
            if self._bars:
                from tqdm import tqdm

                tqdm.write(text, file=self.terminal)
            else:
                self.terminal.write(text + "\n")
                self.terminal.flush()

    def worker_lines(self, source: str, lines: list[str], is_err: bool = False) -> None:
        """A Ray worker's output lines (not events): `workers.log`; the terminal too with -v."""
        prefix = f"({source}) " if source else ""
        with self._lock:
            f = self._files.get("workers.log")
            for line in lines:
                if f is not None:
                    f.write(prefix + line + "\n")
                if self.verbose:
                    self.write_line(prefix + line)

    def on_event(self, event: dict) -> None:
        """An event from `emit`, this process's or a worker's."""
        kind = event.get("kind")
        if kind == "step":
            key = (str(event["name"]), int(event["step"]))
            with self._lock:  # Ray may hand one line over twice (a restarted worker's too)
                if key in self._seen_steps:
                    return
                self._seen_steps.add(key)
        line = describe(event)
        logger = logging.getLogger(event.get("logger") or "dem_ray.progress")
        level = logging.getLevelName(str(event.get("level", "INFO")).upper())
        if kind == "message" or not self.bars or not isinstance(level, int) or level > 20:
            logger.log(level if isinstance(level, int) else logging.INFO, line)
            return
        self._to_file(logger.name, line)
        with self._lock:
            self._update_bar(event)

    # ---- bars -----------------------------------------------------------------------------
    def _update_bar(self, event: dict) -> None:
        from tqdm import tqdm

        kind = event["kind"]
        if kind == "step":
            key, total, done = ("step", event["name"]), int(event["of"]), int(event["step"])
            loss = event.get("loss")
            desc = f"finetune {event['name']}"
            postfix = "" if loss is None else f"loss {loss:.4f}"
            unit, scale = "step", False
        elif kind == "trial":
            key, total, done = (
                ("trial", event.get("stage")),
                int(event["total"]),
                int(event["done"]),
            )
            best = event.get("best")
            desc = str(event.get("stage") or "search")
            postfix = f"best {best:.4f}" if isinstance(best, int | float) else "best none yet"
            unit, scale = "trial", False
        elif kind == "download":
            key, total, done = ("download", event["name"]), int(event["total"]), int(event["done"])
            desc, postfix, unit, scale = f"download {event['name']}", "", "B", True
        else:
            return
        bar = self._bars.get(key)
        if bar is None:
            columns, rows = _screen()
            bar = self._bars[key] = tqdm(
                total=total, desc=desc, unit=unit, unit_scale=scale, file=self.terminal,
                position=len(self._bars), leave=True, ncols=columns, nrows=rows,
                bar_format=BAR_FORMAT,
            )  # fmt: skip
        bar.total = max(total, done)
        bar.n = done
        bar.set_postfix_str(postfix, refresh=False)
        bar.refresh()
        if done >= total:
            bar.close()
            del self._bars[key]

    # ---- internals ----------------------------------------------------------------------
    def _open_files(self, header: str) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        for name in ("dem-ray.log", "workers.log", "driver.log"):
            f = (self.log_dir / name).open("a", encoding="utf-8", buffering=1)
            f.write(f"==== {stamp} {header} (pid {os.getpid()}) ====\n")
            self._files[name] = f

    def _add_handler(self, handler: logging.Handler) -> None:
        logging.getLogger().addHandler(handler)
        self._handlers.append(handler)

    def _to_file(self, logger: str, line: str) -> None:
        f = self._files.get("dem-ray.log")
        if f is not None:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            with self._lock:
                f.write(f"{stamp} INFO {logger}: {line}\n")

    def _redirect_stderr(self, sink: TextIO) -> None:
        """Python's stderr and, for a real process, fd 2 itself into `sink`: Ray's loggers
        write to whatever `sys.stderr` is, its C++ side to fd 2. The terminal keeps its
        own copy of the original stream. Under a test's captured stderr, Python's only."""
        self._saved_stderr = sys.stderr
        if self.terminal is sys.__stderr__ and _real_fd(sys.__stderr__) == 2:
            self._saved_fd = os.dup(2)
            self.terminal = os.fdopen(os.dup(self._saved_fd), "w", buffering=1)
            sys.stderr.flush()
            os.dup2(sink.fileno(), 2)
        sys.stderr = sink


def _screen() -> tuple[int, int]:
    """The terminal's columns and rows; 100 x 20 where it reports none (a pty of size 0,
    on which tqdm would hide every bar)."""
    import shutil

    size = shutil.get_terminal_size((100, 20))
    return (size.columns if size.columns > 0 else 100), (size.lines if size.lines > 0 else 20)


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _real_fd(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return None


def active() -> Console | None:
    """The console of the command running in this process, if any."""
    return _ACTIVE
