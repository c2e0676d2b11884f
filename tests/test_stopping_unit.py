"""A stop signal that lands inside Ray's own wait comes out as a stop, not a SystemError."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import wait_for

from dem_ray.run import stopping


def test_a_signal_inside_ray_get_surfaces_as_a_stop(ray_session, tmp_path):
    import ray

    started = tmp_path / "started"

    @ray.remote(num_cpus=0.01)
    def busy(marker: str) -> None:
        Path(marker).write_text("running")
        time.sleep(60)

    saved = {s: signal.getsignal(s) for s in stopping.STOP_SIGNALS}
    stopping.install_stop_handlers()
    ref = busy.remote(str(started))

    def interrupt() -> None:
        wait_for(started.exists, 120, "the task to start")
        time.sleep(0.2)  # the main thread is blocked in ray.get by now
        os.kill(os.getpid(), signal.SIGINT)

    sender = threading.Thread(target=interrupt, daemon=True)
    sender.start()
    try:
        with pytest.raises(KeyboardInterrupt) as info:  # not a SystemError
            ray.get(ref)
        stop = stopping.as_stopped(info.value)
        assert isinstance(stop, stopping.Stopped) and stop.exit_code == 130
    finally:
        stopping.uninstall_stop_handlers(saved)
        stopping._stopped = None  # this process goes on; a command would exit here
        ray.cancel(ref, force=True)
        sender.join(timeout=10)
