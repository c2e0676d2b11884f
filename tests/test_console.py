"""The console: dem-ray's lines and progress on the terminal, everything else in the logs."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import textwrap

import pytest

from dem_ray.run import console as console_mod
from dem_ray.run.console import MARKER, Console, describe, emit, parse_event


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _step(name: str, step: int, of: int = 4, loss: float | None = 1.5) -> dict:
    return {"kind": "step", "name": name, "step": step, "of": of, "loss": loss,
            "tokens_per_s": 100.0}  # fmt: skip


@pytest.fixture
def opened(tmp_path):
    """`make(**kw)` opens a console on a StringIO terminal; all are closed after the test."""
    made = []

    def make(terminal=None, **kw) -> Console:
        c = Console(tmp_path / "logs", terminal=terminal or io.StringIO(), **kw).open("test")
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def _read(c: Console, name: str) -> str:
    return (c.log_dir / name).read_text()


def test_events_cross_processes_as_marked_json_lines():
    event = _step("code", 3)
    line = f"(RayTrainWorker pid=12) {MARKER}{json.dumps(event)}"
    assert parse_event(line) == event
    assert parse_event("(RayTrainWorker pid=12) step 3 loss 1.5") is None
    assert parse_event(MARKER + "{not json") is None
    assert parse_event(MARKER + json.dumps({"no": "kind"})) is None
    assert describe(event) == "[finetune code] step 3/4 loss 1.5000 tokens/s 100"
    assert describe(_step("code", 0, loss=None)) == "[finetune code] training: 4 steps"
    assert describe(_step("code", 2, loss=None)) == "[finetune code] training: 4 steps, from step 2"


def test_without_a_console_an_event_is_a_plain_log_line(caplog):
    assert console_mod.active() is None
    with caplog.at_level(logging.INFO):
        emit("trial", stage="search", done=1, total=2, best=3.0, line="search: trial 1/2",
             logger="dem_ray.ray.search")  # fmt: skip
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("dem_ray.ray.search", "search: trial 1/2")
    ]


def test_plain_lines_when_not_a_terminal(opened):
    term = io.StringIO()
    c = opened(term)
    assert not c.bars
    emit("step", **{k: v for k, v in _step("code", 2).items() if k != "kind"})
    c.on_event(_step("code", 2))  # Ray handed the same line over twice: shown once
    c.worker_lines("TrainController pid=7", ["Requesting resources: {'CPU': 1}"])
    logging.getLogger("dem_ray.pipeline").info("stage search: running")
    logging.getLogger("a_library").info("a library's info line")
    logging.getLogger("a_library").error("a library's error")
    shown = term.getvalue()
    assert shown.count("[finetune code] step 2/4 loss 1.5000") == 1, shown
    assert "stage search: running" in shown
    assert "a library's error" in shown
    for hidden in ("Requesting resources", "a library's info line", MARKER):
        assert hidden not in shown, shown
    c.close()
    assert "(TrainController pid=7) Requesting resources" in _read(c, "workers.log")
    kept = _read(c, "dem-ray.log")
    assert "a library's info line" in kept and "stage search: running" in kept


def test_verbose_shows_the_workers_and_ray(opened):
    term = io.StringIO()
    c = opened(term, verbose=True)
    c.worker_lines("TrainController pid=7", ["Requesting resources"])
    logging.getLogger("a_library").info("a library's info line")
    shown = term.getvalue()
    assert "(TrainController pid=7) Requesting resources" in shown
    assert "a library's info line" in shown


def test_quiet_shows_warnings_only(opened):
    term = io.StringIO()
    opened(term, quiet=True)
    logging.getLogger("dem_ray.pipeline").info("stage search: running")
    logging.getLogger("dem_ray.pipeline").warning("a real warning")
    assert term.getvalue().count("\n") == 1 and "a real warning" in term.getvalue()


def test_bars_on_a_terminal(opened):
    term = FakeTTY()
    c = opened(term)
    assert c.bars
    for step in (0, 2, 4):
        c.on_event(_step("code", step, loss=None if step == 0 else 2.0 - step / 10))
    c.on_event({"kind": "trial", "stage": "search", "done": 1, "total": 3, "best": 5.25,
                "line": "search: trial 1/3 objective 5.2500"})  # fmt: skip
    c.on_event({"kind": "download", "name": "vectors", "done": 50 << 20, "total": 100 << 20})
    logging.getLogger("dem_ray.pipeline").info("stage merge: running")  # above the bars
    shown = term.getvalue()
    assert "finetune code: 100%" in shown and "4/4" in shown and "loss 1.6000" in shown
    assert "search:  33%" in shown and "best 5.2500" in shown
    assert "download vectors:  50%" in shown
    assert "stage merge: running" in shown
    # On a terminal the bars replace the plain lines; the log file keeps every one.
    assert "[finetune code] step 4/4" not in shown
    c.close()
    kept = _read(c, "dem-ray.log")
    assert "[finetune code] step 2/4 loss 1.8000" in kept
    assert "[finetune code] step 4/4 loss 1.6000" in kept
    assert "search: trial 1/3 objective 5.2500" in kept


def test_a_message_event_is_always_a_line(opened):
    term = FakeTTY()
    opened(term)
    emit("message", text="[finetune code] resuming from the checkpoint of step 20")
    assert "resuming from the checkpoint of step 20" in term.getvalue()


def test_close_restores_logging(tmp_path):
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    c = Console(tmp_path / "logs", terminal=io.StringIO()).open()
    assert console_mod.active() is c
    c.close()
    assert console_mod.active() is None
    assert root.handlers == handlers and root.level == level


SCRIPT = textwrap.dedent(
    """
    import logging, os, sys
    from pathlib import Path
    from dem_ray.run.console import Console

    c = Console(Path(sys.argv[1]), terminal=sys.__stderr__).open("test")
    os.write(2, b"a C-level line, as Ray's core worker writes them\\n")
    print("a Python-level stray line", file=sys.stderr)
    logging.getLogger("ray").warning("a Ray logger line")
    logging.getLogger("dem_ray.pipeline").info("stage search: running")
    c.close(restore_fd=False)
    print("dem-ray: error: after the close", file=sys.stderr)
    os.write(2, b"a C-level line at exit\\n")
    """
)


def test_the_driver_process_stderr_goes_to_driver_log(tmp_path):
    """A real process: fd 2 itself is redirected, the terminal keeps dem-ray's lines."""
    logs = tmp_path / "logs"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(logs)], capture_output=True,
                          text=True, timeout=120, check=True)  # fmt: skip
    assert "stage search: running" in done.stderr
    assert "dem-ray: error: after the close" in done.stderr
    for hidden in ("C-level", "stray", "Ray logger"):
        assert hidden not in done.stderr, done.stderr
    driver = (logs / "driver.log").read_text()
    for line in ("a C-level line, as Ray's core worker", "a Python-level stray line",
                 "a C-level line at exit"):  # fmt: skip
        assert line in driver, driver
    assert "a Ray logger line" in (logs / "dem-ray.log").read_text() + driver


def test_ray_worker_output_is_routed_and_put_back(ray_session, tmp_path):
    """Ray's dispatcher of worker output and its raylet-message printer are swapped for
    the console's while it is open, and restored when it closes."""
    from ray._private import worker as ray_worker

    from dem_ray.ray.logs import OUR_HANDLER, RAY_HANDLER, route_worker_output

    before_handlers = [name for name, _ in ray_worker.global_worker_stdstream_dispatcher.handlers]
    before_print = ray_worker.print_to_stdstream
    term = io.StringIO()
    c = Console(tmp_path / "logs", terminal=term).open()
    try:
        assert route_worker_output(c)
        assert route_worker_output(c)  # a second stage: routed once
        names = [name for name, _ in ray_worker.global_worker_stdstream_dispatcher.handlers]
        assert names.count(OUR_HANDLER) == 1 and RAY_HANDLER not in names
        ray_worker.global_worker_stdstream_dispatcher.emit({
            "lines": [MARKER + json.dumps(_step("code", 2)), "Requesting resources"],
            "pid": 41, "actor_name": "TrainController", "is_err": True, "ip": "1.2.3.4",
            "localhost": "1.2.3.4",
        })  # fmt: skip
        ray_worker.print_to_stdstream(
            {"lines": ["8 PYTHON worker processes have been started on node x"], "pid": "raylet",
             "is_err": False}, ignore_prefix=False)  # fmt: skip
        ray_worker.print_to_stdstream(
            {"lines": ["Task was killed due to the node running low on memory"],
             "pid": "raylet", "is_err": False}, ignore_prefix=False)  # fmt: skip
    finally:
        c.close()
    shown = term.getvalue()
    assert "[finetune code] step 2/4" in shown
    assert "ray: Task was killed due to the node running low on memory" in shown
    assert "Requesting resources" not in shown and "PYTHON worker processes" not in shown
    workers = _read(c, "workers.log")
    assert "(TrainController pid=41) Requesting resources" in workers
    assert "(raylet) 8 PYTHON worker processes" in workers
    assert [n for n, _ in ray_worker.global_worker_stdstream_dispatcher.handlers] == before_handlers
    assert ray_worker.print_to_stdstream is before_print


def test_each_command_gets_a_fresh_log_folder(tmp_path):
    """Two commands in one second: the second never appends to the first one's files."""
    first = console_mod.new_log_dir(tmp_path / "logs", "prepare")
    c = Console(first, terminal=io.StringIO()).open("first")
    logging.getLogger("dem_ray.pipeline").info("the first command")
    c.close()
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    second = console_mod.new_log_dir(tmp_path / "logs", "prepare")
    assert second != first and second.parent == first.parent
    c = Console(second, terminal=io.StringIO()).open("second")
    logging.getLogger("dem_ray.pipeline").info("the second command")
    c.close()
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert "the second command" in (second / "dem-ray.log").read_text()
