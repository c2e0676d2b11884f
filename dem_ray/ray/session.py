"""Joining or starting Ray: the one place a driver connects."""

from __future__ import annotations

import os

import ray

from dem_ray.run import console as run_console
from dem_ray.run.stopping import reinstall_stop_handlers


def ensure_ray(address: str | None = None) -> None:
    """Join the cluster named by `address`/RAY_ADDRESS, or start a private local one.

    With a console open (a `dem-ray` command), the workers' output goes to it
    (`dem_ray.ray.logs`): progress to the terminal, the rest to `<run_dir>/logs/`.
    """
    console = run_console.active()
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # The dashboard serves the State API that Ray Train's placement-group cleaner
            # polls. "local" always starts a private instance, never one left by `ray start`.
            ray.init(address="local", dashboard_host="127.0.0.1", log_to_driver=True)
            if console is not None:
                from dem_ray.ray.logs import keep_session_logs

                keep_session_logs(console)
        reinstall_stop_handlers()  # the core worker takes SIGTERM over while it starts
    if console is not None:
        from dem_ray.ray.logs import route_worker_output

        route_worker_output(console)
