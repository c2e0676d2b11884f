"""Ray's side of the console: the workers' output, routed to dem-ray's console.

With `log_to_driver`, Ray's driver prints every line a worker writes (and the raylet's
messages, e.g. "N PYTHON worker processes have been started") to the terminal. Ray 2.60
has no public hook for that stream, so this swaps the handler Ray registers on its
dispatcher (`ray_print_logs`) and the function the raylet messages go through for one
that hands the lines to the console: events become progress, the rest `workers.log`.
Both are put back when the console closes. Were a Ray upgrade to move them, the router
says so in a warning and Ray prints as before.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from dem_ray.run.console import Console, parse_event

log = logging.getLogger(__name__)
RAY_HANDLER = "ray_print_logs"
# Raylet messages that are no news to a dem-ray user: `workers.log` keeps them.
RAYLET_NOISE = ("PYTHON worker processes have been started",)
OUR_HANDLER = "dem_ray_console"


def route_worker_output(console: Console) -> bool:
    """Send the workers' output to `console` until it closes; False when Ray's internals
    are not where this expects them (then Ray prints as it always does)."""
    try:
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        original_print = ray_worker.print_to_stdstream
        handlers = dispatcher.handlers
    except (ImportError, AttributeError) as exc:
        log.warning("cannot route Ray's worker output to the console (%s); it is printed "
                    "as Ray prints it", exc)  # fmt: skip
        return False
    if any(name == OUR_HANDLER for name, _ in handlers):
        return True  # routed already (a second stage of the same command)
    ray_own = [pair for pair in handlers if pair[0] == RAY_HANDLER]

    def handle(data: dict, ignore_prefix: bool = False) -> None:
        lines = [line for line in data.get("lines", []) if line is not None]
        rest = []
        for line in lines:
            event = parse_event(line)
            if event is not None:
                console.on_event(event)
            else:
                rest.append(line)
        if not rest:
            return
        console.worker_lines(_source(data), rest, bool(data.get("is_err")))
        if data.get("pid") == "raylet":  # the raylet's messages: a real warning, mostly
            for line in rest:
                if not any(noise in line for noise in RAYLET_NOISE):
                    log.warning("ray: %s", line.strip())

    dispatcher.remove_handler(RAY_HANDLER)
    dispatcher.add_handler(OUR_HANDLER, handle)
    ray_worker.print_to_stdstream = handle

    def undo() -> None:
        dispatcher.remove_handler(OUR_HANDLER)
        for pair in ray_own:
            dispatcher.add_handler(*pair)
        ray_worker.print_to_stdstream = original_print

    console.on_close(undo)
    return True


def _source(data: dict) -> str:
    """Ray's own prefix: `TrainController pid=123, ip=10.0.0.1`, or `raylet`."""
    pid = data.get("pid")
    if pid in ("raylet", "autoscaler"):
        return str(pid)
    name = data.get("actor_name") or data.get("task_name") or ""
    where = f"pid={pid}"
    if data.get("ip") and data.get("ip") != data.get("localhost"):
        where += f", ip={data['ip']}"
    return f"{name} {where}".strip()


def keep_session_logs(console: Console) -> None:
    """When the console closes, copy the private local Ray session's own logs (raylet, GCS,
    every worker's files) into `<log_dir>/ray/<session>/`. A joined cluster keeps its
    logs on its nodes (`ray logs`), so nothing is copied then."""
    if console.log_dir is None:
        return
    try:
        import ray

        node = ray._private.worker.global_worker.node
        session = Path(node.get_session_dir_path())
        logs = Path(node.get_logs_dir_path())
    except (AttributeError, ImportError) as exc:
        log.debug("no local Ray session logs to keep: %s", exc)
        return

    def copy() -> None:
        dest = console.log_dir / "ray" / session.name
        try:
            shutil.copytree(logs, dest, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.sock", "*.lock"))  # fmt: skip
        except (OSError, shutil.Error) as exc:  # a log still being written: keep the rest
            log.debug("copying Ray's session logs: %s", exc)

    console.on_close(copy)
