"""Joining or starting Ray: the one place a driver connects."""

from __future__ import annotations

import os

import ray

from dem_ray.run.stopping import reinstall_stop_handlers


def ensure_ray(address: str | None = None) -> None:
    """Join the cluster named by `address`/RAY_ADDRESS, or start a private local one."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # The dashboard serves the State API that Ray Train's placement-group cleaner polls.
        # "local" always starts a private instance, never one left by `ray start` on this host.
        ray.init(address="local", dashboard_host="127.0.0.1", log_to_driver=True)
    reinstall_stop_handlers()  # the core worker takes SIGTERM over while it starts
