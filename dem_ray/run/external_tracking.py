"""MLflow and W&B: the scalars of the TensorBoard event files (`dem_ray.run.tracking`)
mirrored into an experiment tracker, when the config has a `tracking` section (optional
extras: `pip install 'dem-ray[mlflow]'`, `'dem-ray[wandb]'`).

A fine-tune is logged by its rank-0 Ray Train worker, through Ray Train's own
integrations (`ray.air.integrations.mlflow.setup_mlflow`, `ray.air.integrations.wandb.
setup_wandb`): loss, lr and tokens/s at every step, as it trains. The driver opens the run
before the trainer starts (`open_run`: MLflow's run created with its tags and params; W&B's
id chosen), so every worker start of one fine-tune writes into that one run: Ray Train
restarts a lost worker group from its latest checkpoint, and the restarted worker skips the
steps the run already holds (it replays those very batches), so each step is there once.
The worker queues its MLflow metrics (a step never waits on the server) and flushes them at
each checkpoint: the steps before a checkpoint, which a restart never replays, are never lost.
The driver closes the MLflow run as FINISHED or FAILED when the trainer returns
(`finish_run`). Baseline mixtures are fine-tunes too, and go the same way.

A search is logged by the driver, with the trackers' client APIs. Tune's
`MLflowLoggerCallback` and `WandbLoggerCallback` cannot apply: they are Tune logger
callbacks, which Tune's controller calls with the results of the trials of a `tuner.fit()`,
and dem-ray's search is an ask-and-tell loop on the driver (`dem_ray.ray.search`) that
starts no Tune trial, so nothing would call them (they would also make a run per trial,
where a search is one run with a point per trial). Each start of a search stage opens a new
run and first replays the trials kept from earlier starts, as its TensorBoard files are
rewritten: the latest run of a stage holds what its trial log holds.

No stage hashes the `tracking` section, so tracking never makes a stage stale. A tracker
that cannot be reached when a run opens on the driver fails the stage before it trains or
searches; one that fails later is warned about once and dropped, never the training or the
search. Nothing here imports Ray at module level.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from dem_ray.config import TrackingConfig

log = logging.getLogger(__name__)

TAG_PREFIX = "dem_ray."  # MLflow tag keys: `dem_ray.run_dir`, `dem_ray.stage`, ...


@dataclass(frozen=True)
class RunSpec:
    """One tracker run as plain data (it travels to the fine-tune workers).

    `mlflow`: {tracking_uri, experiment} (+ experiment_id and run_id once `open_run` made
    it); `wandb`: {project, entity, mode, dir} (+ id once opened).
    """

    name: str
    tags: dict[str, str]
    params: dict[str, Any]
    mlflow: dict[str, Any] | None = None
    wandb: dict[str, Any] | None = None


def run_spec(
    tracking: TrackingConfig | None,
    run_dir: str,
    name: str,
    params: dict[str, Any],
    files_dir: Path | None = None,
    **tags: str,
) -> RunSpec | None:
    """The run `name` (`finetune/<dataset>`, `baseline/<mixture id>`, `search`, ...) of the
    configured trackers, or None when there is none. `run_dir`: the config's, as a tag;
    `files_dir`: where W&B keeps its local files (`<files_dir>/wandb/`) unless `WANDB_DIR`
    says, for a run dir on a mounted path (None for a bucket: W&B's own default)."""
    if tracking is None or (tracking.mlflow is None and tracking.wandb is None):
        return None
    from dem_ray import __version__

    all_tags = {"run_dir": str(run_dir), **{k: str(v) for k, v in tags.items()},
                "version": __version__}  # fmt: skip
    mlflow = wandb = None
    if tracking.mlflow is not None:
        mlflow = {
            "tracking_uri": resolve_tracking_uri(tracking.mlflow.tracking_uri),
            "experiment": tracking.mlflow.experiment,
        }
    if tracking.wandb is not None:
        where = os.environ.get("WANDB_DIR") or (str(files_dir) if files_dir else None)
        wandb = {
            "project": tracking.wandb.project,
            "entity": tracking.wandb.entity,
            "mode": tracking.wandb.mode,
            "dir": where,
        }
    return RunSpec(name, all_tags, dict(params), mlflow, wandb)


def stage_run(ctx, name: str, params: dict[str, Any], **tags: str) -> RunSpec | None:
    """`run_spec` for a stage of the run `ctx` (a `RunContext`)."""
    files = None if ctx.storage.remote else ctx.layout.root
    return run_spec(ctx.cfg.tracking, ctx.cfg.run_dir, name, params, files, **tags)


# ---- the driver's side of a fine-tune ---------------------------------------------------------
def open_run(spec: RunSpec | None) -> RunSpec | None:
    """Make the run every worker start of one fine-tune writes into: MLflow's is created
    here (tags, params; raises when the tracking server cannot be reached, before any
    training), W&B's gets its id (the rank-0 worker creates it)."""
    if spec is None:
        return None
    mlflow = wandb = None
    if spec.mlflow is not None:
        client, experiment_id = _mlflow_client(spec.mlflow)
        run_id = _create_mlflow_run(client, experiment_id, spec)
        mlflow = {**spec.mlflow, "experiment_id": experiment_id, "run_id": run_id}
    if spec.wandb is not None:
        wandb = {**spec.wandb, "id": _new_id()}
    return replace(spec, mlflow=mlflow, wandb=wandb)


def finish_run(spec: RunSpec | None, failed: bool) -> None:
    """Close a fine-tune's MLflow run as FINISHED or FAILED (a worker that died cannot)."""
    if spec is None or spec.mlflow is None or "run_id" not in spec.mlflow:
        return
    try:
        client, _ = _mlflow_client(spec.mlflow, create=False)
        client.set_terminated(spec.mlflow["run_id"], "FAILED" if failed else "FINISHED")
    except Exception as exc:  # noqa: BLE001 - the fine-tune's result stands without it
        log.warning("tracking: could not close MLflow run %s: %s", spec.mlflow["run_id"], exc)


def worker_run(spec: RunSpec | None) -> ExternalRun | None:
    """The rank-0 worker's sink for a fine-tune's steps (an `open_run` spec), or None."""
    return None if spec is None else ExternalRun(spec, in_worker=True)


def search_run(spec: RunSpec | None, inputs: str, resumed: int) -> ExternalRun | None:
    """The driver's sink for a search stage: a new run each start (`resumed` trials kept
    from earlier starts are replayed into it)."""
    if spec is None:
        return None
    tags = {**spec.tags, "inputs": inputs, "resumed_trials": str(resumed)}
    return ExternalRun(replace(spec, tags=tags))


# ---- the sinks ------------------------------------------------------------------------------
class ExternalRun:
    """One run in each configured tracker; `write(step, values)` and `close()` as
    `ScalarWriter`'s, so `StepEvents` and `TrialEvents` take it as an extra sink.

    `in_worker`: in a Ray Train worker, through Ray's `setup_mlflow` / `setup_wandb`, into
    the run `open_run` made (a restarted worker skips the steps the run already has);
    else a new run, through the trackers' client APIs.
    """

    def __init__(self, spec: RunSpec, in_worker: bool = False) -> None:
        self.spec = spec
        self._trackers: list[_Tracker] = []
        for kind, make in (("mlflow", _MlflowRun), ("wandb", _WandbRun)):
            if getattr(spec, kind) is None:
                continue
            try:
                self._trackers.append(make(spec, in_worker))
            except Exception as exc:
                if not in_worker:
                    raise  # the driver: a tracker that cannot be reached fails the stage now
                log.warning("tracking: %s run %r not opened in the worker: %s", kind,
                            spec.name, exc)  # fmt: skip

    def write(self, step: int, values: dict[str, float], flush: bool = True) -> None:
        metrics = {metric_key(k): float(v) for k, v in values.items()}
        for tracker in list(self._trackers):
            if tracker.done is not None and step <= tracker.done:
                continue  # a restarted worker's replayed step: the run has it already
            try:
                tracker.log(int(step), metrics)
            except Exception as exc:  # noqa: BLE001 - never stop the training or the search
                log.warning("tracking: %s stopped logging run %r at step %d: %s", tracker.kind,
                            self.spec.name, step, exc)  # fmt: skip
                self._trackers.remove(tracker)

    def flush(self) -> None:
        """Every step written so far is in the trackers (a worker about to checkpoint: the
        steps before a checkpoint are never replayed, so they must not be lost)."""
        for tracker in self._trackers:
            try:
                tracker.flush()
            except Exception as exc:  # noqa: BLE001
                log.warning("tracking: flushing %s run %r: %s", tracker.kind, self.spec.name, exc)

    def close(self) -> None:
        for tracker in self._trackers:
            try:
                tracker.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("tracking: closing %s run %r: %s", tracker.kind, self.spec.name, exc)
        self._trackers = []


class _Tracker:
    kind = ""
    done: int | None = None  # the last step the run already held when it was opened here

    def log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        raise NotImplementedError


class _MlflowRun(_Tracker):
    kind = "mlflow"

    def __init__(self, spec: RunSpec, in_worker: bool) -> None:
        settings = spec.mlflow
        if not in_worker:
            self.client, experiment_id = _mlflow_client(settings)
            self.run_id = _create_mlflow_run(self.client, experiment_id, spec)
            self.fluent = None
            return
        from ray.air.integrations.mlflow import setup_mlflow

        _allow_file_store(settings["tracking_uri"])
        self.run_id = settings["run_id"]
        # MLflow's `start_run` (which setup_mlflow calls) resumes the run MLFLOW_RUN_ID names.
        os.environ["MLFLOW_RUN_ID"] = self.run_id
        try:
            self.fluent = setup_mlflow(
                tracking_uri=settings["tracking_uri"],
                experiment_id=settings["experiment_id"],
                run_name=spec.name,
                rank_zero_only=True,
            )
        finally:
            os.environ.pop("MLFLOW_RUN_ID", None)
        from mlflow import MlflowClient

        self.client = MlflowClient(settings["tracking_uri"])
        self.done = _last_mlflow_step(self.client, self.run_id)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.fluent is not None:  # the worker: queued (flushed at each checkpoint), so a
            self.fluent.log_metrics(metrics, step=step, synchronous=False)  # step never waits
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def flush(self) -> None:
        if self.fluent is not None:
            self.fluent.flush_async_logging()

    def close(self) -> None:
        if self.fluent is not None:
            self.fluent.end_run()  # waits for the queued metrics
        else:
            self.client.set_terminated(self.run_id, "FINISHED")


class _WandbRun(_Tracker):
    kind = "wandb"

    def __init__(self, spec: RunSpec, in_worker: bool) -> None:
        settings = spec.wandb
        if settings["dir"]:
            Path(settings["dir"]).mkdir(parents=True, exist_ok=True)
        kwargs = {
            "project": settings["project"],
            "entity": settings["entity"],
            "mode": settings["mode"],
            "dir": settings["dir"],
            "name": spec.name,
            "tags": [spec.tags[k][:64] for k in ("stage", "dataset", "mixture") if k in spec.tags],
            "settings": {"console": "off"},  # the worker's and driver's logs stay theirs
        }
        config = {"params": spec.params, "dem_ray": spec.tags}
        if in_worker:
            from ray.air.integrations.wandb import setup_wandb

            # Ray asks for an API key unless WANDB_MODE (not `mode=`) says offline/disabled.
            os.environ["WANDB_MODE"] = settings["mode"]
            # The id `open_run` chose: a restarted worker resumes the run (online).
            self.run = setup_wandb(config=config, rank_zero_only=True, id=settings["id"],
                                   resume="allow", **kwargs)  # fmt: skip
            # W&B keeps rows of increasing steps only: those below its step are the run's.
            self.done = self.run.step - 1 if self.run.step else None
        else:
            import wandb

            self.run = wandb.init(config=config, id=_new_id(), reinit="create_new", **kwargs)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


# ---- helpers --------------------------------------------------------------------------------
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- ]")


def metric_key(key: str) -> str:
    """A name MLflow takes: a per-block weight `code@block1` is `code.block1` (not
    `code/block1`: a file store keeps each metric in a file, and `code` may be one)."""
    return _BAD_KEY_CHARS.sub(".", key)


def resolve_tracking_uri(configured: str | None) -> str:
    """The MLflow tracking URI, made absolute on the driver (workers run elsewhere, in
    other working directories): a plain path is a file store, `sqlite:///` relative paths
    are from here; None: `MLFLOW_TRACKING_URI`, else MLflow's default, as MLflow resolves
    it here."""
    if configured is None:
        import mlflow

        return mlflow.get_tracking_uri()
    parsed = urlparse(configured)
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and configured[1:2] == ":"):
        return Path(configured).expanduser().resolve().as_uri()
    if parsed.scheme == "sqlite" and configured.startswith("sqlite:///"):
        path = configured.removeprefix("sqlite:///")
        if path and not path.startswith("/") and path != ":memory:":
            return "sqlite:///" + str(Path(path).resolve())
    return configured


def _allow_file_store(uri: str) -> None:
    """MLflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE is set; a config that
    names one has chosen it."""
    if urlparse(uri).scheme == "file":
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def _mlflow_client(settings: dict[str, Any], create: bool = True):
    """(client, experiment id) for `settings`; the experiment is created when missing."""
    from mlflow import MlflowClient

    _allow_file_store(settings["tracking_uri"])
    client = MlflowClient(settings["tracking_uri"])
    if "experiment_id" in settings or not create:
        return client, settings.get("experiment_id")
    name = settings["experiment"]
    # The fine-tunes open their runs from one thread each: without the lock two of them can
    # both find no experiment and both create one (a file store then holds two of the same
    # name, and a fine-tune's run lands in the one a reader does not pick).
    with _EXPERIMENT_LOCK:
        return _experiment(client, name)


_EXPERIMENT_LOCK = threading.Lock()


def _experiment(client, name: str):
    from mlflow.exceptions import MlflowException

    for attempt in (1, 2):
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                raise ValueError(f"tracking.mlflow.experiment {name!r} is deleted in MLflow; "
                                 "restore it (`mlflow experiments restore`) or name another")  # fmt: skip
            return client, experiment.experiment_id
        try:
            return client, client.create_experiment(name)
        except MlflowException:  # made at the same moment by another process
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _create_mlflow_run(client, experiment_id: str, spec: RunSpec) -> str:
    from mlflow.entities import Param

    tags = {TAG_PREFIX + k: v for k, v in spec.tags.items()}
    run = client.create_run(experiment_id, run_name=spec.name, tags=tags)
    params = [Param(metric_key(k)[:250], str(v)[:6000]) for k, v in _flat(spec.params).items()]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    return run.info.run_id


def _last_mlflow_step(client, run_id: str) -> int | None:
    """The last step of any metric the run holds (None: none yet)."""
    keys = client.get_run(run_id).data.metrics
    steps = [m.step for key in keys for m in client.get_metric_history(run_id, key)]
    return max(steps) if steps else None


def _flat(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _new_id() -> str:
    return uuid.uuid4().hex[:16]
