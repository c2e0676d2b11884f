"""Ctrl-C (SIGINT) and SIGTERM stop `dem-ray run` in every stage.

Each case runs the command as a child process in a session of its own, sends the signal
to its process group once the child is inside the stage, and checks: exit code 130
(SIGINT) or 143 (SIGTERM) within 30 s, no process of the run left (every process the
child starts, Ray's included, inherits a marker variable), and the manifest still holds
what had finished. Then a stopped run is resumed by running the command again.

The child is a small wrapper around `dem_ray.cli.main`; it knows no dem_ray internals.
It puts a logging handler on the "dem_ray" logger that writes a marker file when a
message matches the case's pattern (the `stage KEY: running` line a stage starts with)
and, for the quick stages, then blocks the main thread inside that stage, so the signal
lands there without any timing. The long stages (fine-tunes, search, the baseline's
fine-tunes) are made long, and the signal goes once their progress lines show on stderr.
The wrapper also makes a private Ray small (`ray.init(address="local")` gets few CPUs,
no dashboard and the case's temp dir).

To keep the file quick, one whole tiny run is made once and the cases of the later stages
start from copies of it with the entries of their stage and those after it dropped from
the manifest; the run stopped mid-search is the one the resume test resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

MARKER_ENV = "DEM_RAY_STOP_TEST_MARKER"
STOP_DEADLINE_S = 30.0  # from the signal to the exit, and to the last process gone
REACH_DEADLINE_S = 300.0  # from the start to the stage (Ray and trainer start-up on 2 cores)
RUN_DEADLINE_S = 600.0  # a whole tiny run
NAMES = ("numbers", "letters")  # two datasets: fewer trainers to start on a small machine
LONG_STEPS = 100_000  # a fine-tune that does not end during a test
SEARCH_TRIALS = 24  # a search still running when the signal comes after trial 1
STEP_LINE = r"\] step \d+/\d+"  # a fine-tune worker's progress line (via log_to_driver)
TRIAL_LINE = r"search: trial \d+/\d+"

WRAPPER = r'''
import json, logging, os, re, sys, threading
from pathlib import Path

import ray

_init = ray.init


def _small_local_ray(*args, **kwargs):
    """A private Ray for this test: few CPUs, no dashboard, the case's temp dir."""
    if not args and kwargs.get("address") in (None, "local"):
        kwargs.update(address="local", num_cpus=int(os.environ["STOP_TEST_NUM_CPUS"]),
                      include_dashboard=False, _temp_dir=os.environ["RAY_TMPDIR"])
        kwargs.pop("dashboard_host", None)
    return _init(*args, **kwargs)


ray.init = _small_local_ray


class StageTrigger(logging.Handler):
    """On the first message matching `pattern`: write the marker file (with the
    manifest's finished keys at that moment), then block here if asked."""

    def __init__(self, pattern, marker, run_dir, block):
        super().__init__(logging.DEBUG)
        self.rx, self.marker, self.run_dir, self.block = re.compile(pattern), marker, run_dir, block
        self.fired = False
        self.running = []

    def emit(self, record):
        if self.fired:
            return
        message = record.getMessage()
        started = re.match(r"stage (\S+): running", message)
        if started:
            self.running.append(started.group(1))
        if not self.rx.search(message):
            return
        self.fired = True
        manifest = Path(self.run_dir) / "manifest.json"
        stages = json.loads(manifest.read_text())["stages"] if manifest.exists() else {}
        done = sorted(k for k, v in stages.items() if v.get("status") == "done")
        tmp = Path(self.marker + ".tmp")
        tmp.write_text(json.dumps({"message": message, "done": done,
                                   "running": [k for k in self.running if k not in done]}))
        tmp.replace(self.marker)
        if self.block:  # the signal lands here, inside the stage
            idle = threading.Event()
            while True:
                idle.wait(0.05)


pattern = os.environ.get("STOP_TEST_PATTERN")
if pattern:
    logging.getLogger("dem_ray").addHandler(StageTrigger(
        pattern, os.environ["STOP_TEST_MARKER_FILE"], os.environ["STOP_TEST_RUN_DIR"],
        os.environ.get("STOP_TEST_BLOCK") == "1"))

import dem_ray.cli

sys.exit(dem_ray.cli.main(sys.argv[1:]))
'''


# ---- the child ---------------------------------------------------------------------------
def _marked_pids(token: str) -> list[int]:
    """Processes whose environment carries this case's marker (the child and all it started,
    Ray's processes and workers included: they inherit the driver's environment)."""
    needle = f"{MARKER_ENV}={token}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:  # gone, or not ours to read
            continue
    return pids


class Child:
    """`dem-ray run CONFIG` through the wrapper, in its own session, stderr read by a thread."""

    def __init__(self, tmp: Path, config: Path, run_dir: Path, pattern: str | None = None,
                 block: bool = False) -> None:  # fmt: skip
        self.token = uuid.uuid4().hex[:12]
        self.tmp = tmp
        self.marker = tmp / f"marker-{self.token}.json"
        self.ray_tmp = Path(f"/tmp/dst-{self.token[:8]}")  # short: Ray's socket paths
        wrapper = tmp / "stop_wrapper.py"
        wrapper.write_text(WRAPPER)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update({
            MARKER_ENV: self.token,
            "RAY_TMPDIR": str(self.ray_tmp),
            "RAY_AUTH_MODE": "disabled",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "STOP_TEST_NUM_CPUS": "2",
            "STOP_TEST_RUN_DIR": str(run_dir),
            "STOP_TEST_MARKER_FILE": str(self.marker),
        })  # fmt: skip
        if pattern:
            env.update({"STOP_TEST_PATTERN": pattern, "STOP_TEST_BLOCK": "1" if block else "0"})
        self.lines: list[str] = []
        self.new_line = threading.Condition()
        self.stdout_path = tmp / f"stdout-{self.token}.txt"
        with self.stdout_path.open("w") as stdout:
            self.proc = subprocess.Popen(
                [sys.executable, str(wrapper), "run", str(config)],
                env=env, stdout=stdout, stderr=subprocess.PIPE, text=True, errors="replace",
                start_new_session=True,  # its own process group, as a shell's foreground job
            )  # fmt: skip
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self.new_line:
                self.lines.append(line)
                self.new_line.notify_all()
        with self.new_line:
            self.new_line.notify_all()

    def stderr(self, last: int = 60) -> str:
        with self.new_line:
            return "".join(self.lines[-last:])

    def output(self, last: int = 60) -> str:
        """After the exit: the end of stderr (all of it is kept in a file named here)."""
        self.reader.join(timeout=10)  # to EOF: what the child printed last matters most
        path = self.tmp / f"stderr-{self.token}.txt"
        with self.new_line:
            path.write_text("".join(self.lines))
        return f"{self.stderr(last)}\n(all of stderr: {path})"

    def wait_marker(self) -> dict:
        """The marker's content, once the child reached the stage (fails if it exits first)."""
        deadline = time.monotonic() + REACH_DEADLINE_S
        with self.new_line:  # woken by each stderr line (the stage logs as it starts)
            while not self.marker.exists():
                if self.proc.poll() is not None:
                    pytest.fail(f"the run ended ({self.proc.returncode}) before the stage:\n"
                                f"{self.stderr()}")  # fmt: skip
                if time.monotonic() > deadline:
                    pytest.fail(f"stage not reached in {REACH_DEADLINE_S} s:\n{self.stderr()}")
                self.new_line.wait(0.5)
        return json.loads(self.marker.read_text())

    def wait_line(self, pattern: str, after: int) -> None:
        """Until a stderr line after the first `after` ones matches `pattern`."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + REACH_DEADLINE_S
        seen = after
        with self.new_line:
            while True:
                if any(rx.search(line) for line in self.lines[seen:]):
                    return
                seen = len(self.lines)
                if self.proc.poll() is not None and not self.reader.is_alive():
                    pytest.fail(f"the run ended before a line matching {pattern!r}:\n"
                                f"{self.stderr()}")  # fmt: skip
                if time.monotonic() > deadline:
                    pytest.fail(f"no line matching {pattern!r} in {REACH_DEADLINE_S} s:\n"
                                f"{self.stderr()}")  # fmt: skip
                self.new_line.wait(0.5)

    def stop(self, signum: int) -> tuple[int, float, list[int]]:
        """Signal the process group; (exit code, seconds to exit, pids still there after)."""
        os.killpg(self.proc.pid, signum)
        sent = time.monotonic()
        try:
            code = self.proc.wait(timeout=STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            code = None
        seconds = time.monotonic() - sent
        left = _marked_pids(self.token)
        while left and time.monotonic() < sent + STOP_DEADLINE_S:
            time.sleep(0.2)  # processes that are already on their way out
            left = _marked_pids(self.token)
        return code, seconds, left

    def wait(self, timeout: float = RUN_DEADLINE_S) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run did not finish in {timeout} s:\n{self.stderr()}")

    def cleanup(self) -> None:
        """Whatever is left of this child, by its marker: never `ray stop`."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid in _marked_pids(self.token):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.reader.join(timeout=10)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


@contextlib.contextmanager
def child(tmp: Path, config: Path, run_dir: Path, **kwargs):
    c = Child(tmp, config, run_dir, **kwargs)
    try:
        yield c
    finally:
        c.cleanup()


# ---- run dirs ----------------------------------------------------------------------------
def _manifest(run_dir: Path) -> dict:
    path = run_dir / "manifest.json"
    return json.loads(path.read_text())["stages"] if path.exists() else {}


def _done(run_dir: Path) -> dict[str, dict]:
    return {k: v for k, v in _manifest(run_dir).items() if v.get("status") == "done"}


def _identity(entry: dict | None) -> tuple | None:
    """What says a record was not written again: when, from what, and what it wrote."""
    if entry is None:
        return None
    return entry.get("finished_at"), entry.get("inputs"), entry.get("outputs")


def _write_config(path: Path, raw: dict) -> Path:
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


def _copy_run(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> None:
    """A copy of a finished run dir (mtimes kept, so its outputs count as unchanged),
    without the manifest entries of the stages in `drop` (KEY, KEY/..., KEY_...)."""
    shutil.copytree(src, dst, symlinks=True)
    path = dst / "manifest.json"
    data = json.loads(path.read_text())
    data["stages"] = {
        k: v for k, v in data["stages"].items()
        if not any(k == d or k.startswith((f"{d}/", f"{d}_")) for d in drop)
    }  # fmt: skip
    path.write_text(json.dumps(data, indent=2))


@pytest.fixture(scope="module")
def stop_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stop")


@pytest.fixture(scope="module")
def raw_config(tiny_base, tiny_data, make_config):
    data = {n: tiny_data[n] for n in NAMES}

    def build(run_dir: Path, **overrides) -> dict:
        return make_config(run_dir, tiny_base, data, **overrides)

    return build


@pytest.fixture(scope="module")
def finished_run(stop_root, raw_config) -> Path:
    """One whole tiny run (no baseline); the later stages' cases start from copies of it."""
    run_dir = stop_root / "finished"
    config = _write_config(stop_root / "finished.yaml", raw_config(run_dir))
    with child(stop_root, config, run_dir) as c:
        code = c.wait()
        assert code == 0, c.output()
    assert {"search", "merge", "report"} <= set(_done(run_dir)), _manifest(run_dir).keys()
    return run_dir


# ---- the cases ---------------------------------------------------------------------------
# stage: (overrides, stages dropped from a copy of the finished run (None: a fresh run dir),
#         the log message the stage starts with, block there?, stderr line to wait for after)
CASES = {
    "prepare": ({}, None, r"stage data/letters: running", True, None),
    "finetune": ({"finetune": {"max_steps": LONG_STEPS}}, None,
                 r"stage finetune\S*: running", False, STEP_LINE),
    "vectors": ({}, ("vectors", "search", "merge", "baseline", "report"),
                r"stage vectors\S*: running", True, None),
    "search": ({"search": {"num_trials": SEARCH_TRIALS}}, ("search", "merge", "baseline", "report"),
               r"stage search: running", False, TRIAL_LINE),
    "merge": ({}, ("merge", "baseline", "report"), r"stage merge: running", True, None),
    "baseline": ({"baseline": {"grid_step": 0.5, "steps": LONG_STEPS}}, ("baseline",),
                 r"stage baseline\S*: running", False, STEP_LINE),
    "report": ({}, ("report",), r"stage report: running", True, None),
}  # fmt: skip


class Stop:
    """What one stopped run showed: the exit, its time, what was left, the manifest."""

    def __init__(self, stage, signum, run_dir, config, reached, before, code, seconds, left,
                 output):  # fmt: skip
        self.stage, self.signum, self.run_dir, self.config = stage, signum, run_dir, config
        self.reached, self.before, self.output = reached, before, output
        self.code, self.seconds, self.left = code, seconds, left
        self.after = _done(run_dir)  # the manifest right after the stop (valid JSON)


def _stop_in_stage(request, stop_root, raw_config, stage, signum, name) -> Stop:
    """Start a run, wait until it is inside `stage`, send `signum` to its process group."""
    overrides, drop, pattern, block, busy = CASES[stage]
    run_dir = stop_root / name
    if drop is not None:
        _copy_run(request.getfixturevalue("finished_run"), run_dir, drop)
    config = _write_config(stop_root / f"{name}.yaml", raw_config(run_dir, **overrides))
    with child(stop_root, config, run_dir, pattern=pattern, block=block) as c:
        reached = c.wait_marker()
        if busy:
            c.wait_line(busy, after=0)
        before = _done(run_dir)
        code, seconds, left = c.stop(signum)
        output = c.output()
    return Stop(stage, signum, run_dir, config, reached, before, code, seconds, left, output)


def _check(stop: Stop) -> None:
    expected = 128 + stop.signum
    assert stop.code == expected, (
        f"exit {stop.code} (want {expected}) {stop.seconds:.1f} s after the signal:\n{stop.output}"
    )
    assert stop.seconds <= STOP_DEADLINE_S
    assert not stop.left, f"processes of the run left {STOP_DEADLINE_S} s after: {stop.left}"
    after = stop.after  # nothing that had finished is lost
    assert set(stop.reached["done"]) <= set(stop.before) <= set(after), (stop.reached, after)
    for key in stop.before:
        assert _identity(after[key]) == _identity(stop.before[key]), f"{key} changed by the stop"
    if CASES[stop.stage][1] is not None:
        assert stop.before, "nothing had finished before a later stage: the case tested nothing"
    assert not set(stop.reached["running"]) & set(after), "a stopped stage was recorded as done"


@pytest.fixture(scope="module")
def stopped_search(request, stop_root, raw_config) -> Stop:
    """SIGINT mid-search: checked by the stage cases, then resumed."""
    return _stop_in_stage(request, stop_root, raw_config, "search", signal.SIGINT, "int-search")


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(CASES))
def test_sigint_stops_the_run_in_every_stage(request, stop_root, raw_config, stage):
    if stage == "search":
        _check(request.getfixturevalue("stopped_search"))
    else:
        _check(_stop_in_stage(request, stop_root, raw_config, stage, signal.SIGINT, f"int-{stage}"))


@pytest.mark.slow
def test_sigterm_stops_the_fine_tunes(request, stop_root, raw_config):
    _check(_stop_in_stage(request, stop_root, raw_config, "finetune", signal.SIGTERM, "term-ft"))


@pytest.mark.slow
def test_a_run_stopped_in_the_search_resumes(stop_root, stopped_search):
    """Stopped mid-search, `dem-ray run` again finishes; what had finished is not redone."""
    _check(stopped_search)
    run_dir, before = stopped_search.run_dir, stopped_search.before
    assert "search" not in _done(run_dir)
    with child(stop_root, stopped_search.config, run_dir) as c:
        code = c.wait()
        assert code == 0, c.output()
    after = _done(run_dir)
    for key, entry in before.items():
        assert _identity(after.get(key)) == _identity(entry), f"{key} was run again after the stop"
    assert {"search", "merge", "report"} <= set(after)
