"""TensorBoard event files: a fine-tune's loss, lr and tokens/s per step, a search's
objective and best so far per trial, under `<run_dir>/tensorboard/`.

Events are written synchronously and flushed at every write (tensorboardX's
`EventsWriter`: `SummaryWriter.flush()` does not wait for the events still queued for
its writer thread), so a run killed mid-way keeps every step it wrote.

A fine-tune's rank-0 worker may run on a node that cannot write the run dir (a bucket),
so its event files travel in each checkpoint it reports (`EVENTS/`), are restored from
the checkpoint a restarted worker resumes from, and are copied out of the final one by
the driver (`copy_events`): never into the model directory. When every node mounts the
run dir, the worker also writes them in place, so TensorBoard follows the fine-tune live.

Nothing here imports Ray.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from dem_ray.core.atomic import atomic_dir

EVENTS = "tensorboard"  # the folder in a run dir, and in a fine-tune's checkpoints


# ---- where the event files go ---------------------------------------------------------------
def finetune_events(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / EVENTS / "finetune" / name


def baseline_events(run_dir: Path, mixture_id: str) -> Path:
    return Path(run_dir) / EVENTS / "baseline" / mixture_id


def search_events(run_dir: Path, stage: str) -> Path:
    """`stage`: `search`, `search-global` (a two-stage search's first stage) or `search_grid`."""
    return Path(run_dir) / EVENTS / stage


# ---- writing --------------------------------------------------------------------------------
class ScalarWriter:
    """Scalars into a new event file in `logdir`, each write flushed to disk."""

    def __init__(self, logdir: Path) -> None:
        from tensorboardX.event_file_writer import EventsWriter

        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        # The name starts `events.out.tfevents.<seconds>.<host>` (the reader takes files in
        # name order: a resumed writer's file comes after the restored ones); the suffix
        # keeps two writers started within one second apart.
        suffix = f".{os.getpid()}.{time.time_ns()}"
        self._writer = EventsWriter(str(self.logdir / "events"), suffix)

    def write(self, step: int, values: dict[str, float], flush: bool = True) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        for tag, value in values.items():
            event = Event(wall_time=time.time(), step=int(step), summary=scalar(tag, value))
            self._writer.write_event(event)
        if flush:
            self.flush()

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class StepEvents:
    """A fine-tune worker's per-step scalars, in `live_dir` (a run dir every node mounts)
    or else a temp dir, starting from the events in the checkpoint it resumes from.

    Events of steps after that checkpoint (written by a worker that was lost) are dropped,
    so a restarted fine-tune has every step once. `extra`: a sink (`write`, `close`) that
    gets every step too (MLflow, W&B: `dem_ray.run.external_tracking`).
    """

    def __init__(
        self, live_dir: str | Path | None, checkpoint: Path | None = None, extra=None
    ) -> None:
        self.extra = extra
        self.temp = live_dir is None
        self.dir = Path(tempfile.mkdtemp(prefix="dem_ray_events_") if self.temp else live_dir)
        shutil.rmtree(self.dir, ignore_errors=True)
        saved = Path(checkpoint) / EVENTS if checkpoint is not None else None
        if saved is not None and saved.is_dir():
            shutil.copytree(saved, self.dir)
        self.writer = ScalarWriter(self.dir)

    def write(self, step: int, values: dict[str, float]) -> None:
        self.writer.write(step, values)
        if self.extra is not None:
            self.extra.write(step, values)

    def save_into(self, checkpoint_dir: Path) -> None:
        """Put the events so far into a checkpoint about to be reported (and the extra
        sink's steps into its tracker: a restarted worker never replays those steps)."""
        shutil.copytree(self.dir, Path(checkpoint_dir) / EVENTS)
        if self.extra is not None:
            self.extra.flush()

    def close(self) -> None:
        self.writer.close()
        if self.extra is not None:
            self.extra.close()

    def discard(self) -> None:
        """Remove the temp dir, once the last checkpoint holds the events."""
        if self.temp:
            shutil.rmtree(self.dir, ignore_errors=True)


def copy_events(checkpoint_dir: Path, dest: Path) -> bool:
    """The driver's side: a fine-tune's final checkpoint's events replace `dest` (swapped
    in whole). False when the checkpoint has none (made before event files were kept)."""
    saved = Path(checkpoint_dir) / EVENTS
    if not saved.is_dir():
        return False
    with atomic_dir(Path(dest)) as tmp:
        shutil.copytree(saved, tmp, dirs_exist_ok=True)
    return True


class TrialEvents:
    """A search's `objective` and `best_objective` (the best fully scored trial so far) at
    step = the trial's number.

    Rewritten from the trials kept at each start, so the event files always say what the
    trial log says: a fresh search drops the old ones, a resumed one replays its kept trials.
    `extra`: a sink (`write`, `close`; a new tracker run each start) that gets the same, and
    each trial's weights as `weight/<key>`.
    """

    def __init__(self, logdir: Path, finished: list[dict], extra=None) -> None:
        shutil.rmtree(logdir, ignore_errors=True)
        self.writer = ScalarWriter(logdir)
        self.extra = extra
        best = None
        for trial in finished:
            if _better(trial, best):
                best = trial
            self.add(trial, best, flush=False)  # one flush for them all, not one per trial
        self.writer.flush()

    def add(self, record: dict, best: dict | None, flush: bool = True) -> None:
        values = {"objective": record["objective"]}
        if best is not None:
            values["best_objective"] = best["objective"]
        self.writer.write(record["trial"], values, flush=flush)
        if self.extra is not None:
            weights = {f"weight/{k}": v for k, v in record.get("weights", {}).items()}
            self.extra.write(record["trial"], {**values, **weights})

    def close(self) -> None:
        self.writer.close()
        if self.extra is not None:
            self.extra.close()


def _better(trial: dict, best: dict | None) -> bool:
    """The trial log's rule for the best (`TrialLog`): fully scored, finite, lowest."""
    if not trial.get("complete", True) or not math.isfinite(trial["objective"]):
        return False
    return best is None or trial["objective"] < best["objective"]
