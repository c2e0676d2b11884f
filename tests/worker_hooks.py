"""`dem_ray.ray.finetune.AFTER_STEP` hooks for tests that kill a fine-tune worker.

Workers cannot import the tests: register this module by value (`hooks_by_value`)
while a hook travels to them."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def hooks_by_value() -> Iterator[None]:
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        yield
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def exit_once(marker: Path, job: str, at_step: int, storage: Path, rank_to_kill: int = 0):
    """A worker hook: exit abruptly after `at_step`, once the Ray Train controller has
    registered the checkpoint reported before it (it writes its checkpoint manager's
    snapshot when it does; dying before that would lose the checkpoint, as it would
    for any real crash that soon after a report)."""

    def after_step(name: str, step: int, rank: int) -> None:
        if name != job or rank != rank_to_kill or step != at_step or marker.exists():
            return
        deadline = time.monotonic() + 120
        while not list(storage.glob(f"finetune-{job}-*/checkpoint_manager_snapshot.json")):
            if time.monotonic() > deadline:
                raise TimeoutError("the controller never registered the checkpoint")
            time.sleep(0.05)
        marker.write_text(f"killed after step {step}\n")
        os._exit(1)

    return after_step
