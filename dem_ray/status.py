"""`dem-ray status`: what a run would do now, read from the run dir without starting Ray.

Each stage plans its steps exactly as `dem-ray run` plans them (the same `Step`s and the
same up-to-date check, `pipeline.step_is_done`), against a read-only view of the
manifest. A step that is not up to date is *pending*; stages plan in run order, and the
view shows a later step each pending record as a marker naming it instead of what it
holds. A step whose inputs then carry a marker (a fine-tune's `train` holding
`data/code`'s outputs, say) is one the run redoes after that earlier step: `stale
(train: after data/code)`, or `missing (waiting on ...)` if it never ran. A few inputs
are values read from an earlier record rather than its outputs (the search's best
weights for `merge`): a step reading one of a pending record is stale as well, since the
run will make it again.

Nothing is written: not the run dir, not a bucket run's local mirror (a command running
on this machine works in it), and the lock is only read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dem_ray.config import RunConfig
from dem_ray.core import cost as costs
from dem_ray.pipeline import Pipeline, step_is_done
from dem_ray.report.build import DEM_STAGES
from dem_ray.run.lock import RunLock
from dem_ray.run.manifest import Manifest
from dem_ray.run.trials import full_objective, inputs_marker, made_with, read_trials
from dem_ray.stages import COMMANDS, PREREQUISITES, STAGES, RunContext, Stage, StageError, Step
from dem_ray.stages.baseline import planned_mixtures
from dem_ray.stages.search import global_trials_path, wanted_trials

PENDING = "\x00pending:"  # a marker's prefix: no recorded value starts with it
# Fields of a pending record a later step may read as they are: where it is, and what the
# markers replace. Reading any other field (a value the step uses) makes the step wait.
_AS_IS = frozenset({"status", "path", "outputs", "inputs", "fingerprint", "input_parts",
                    "stats", "cost", "finished_at"})  # fmt: skip
# The manifest keys of a stage whose steps could not be planned (its usual keys).
_PER_DATASET = frozenset({"data", "finetune", "vectors"})
_KEY_OF_STAGE = {"baseline_best": "baseline"}


@dataclass
class StepStatus:
    """One line of the answer: a manifest key and what a run would do with it."""

    key: str
    stage: str
    command: str
    state: str  # done, stale, missing or running
    detail: str = ""
    changed: list[str] = field(default_factory=list)  # named inputs that differ
    after: list[str] = field(default_factory=list)  # pending steps it waits on


@dataclass
class RunStatus:
    run_dir: str
    lock: dict | None
    steps: list[StepStatus]
    trials: dict | None
    cost: dict[str, dict]

    def as_dict(self) -> dict:
        return asdict(self)


# ---- the manifest as a later step sees it ---------------------------------------------------
def marker(key: str) -> str:
    return f"{PENDING}{key}"


class _PendingRecord(dict):
    """A pending step's record, its outputs, inputs and fingerprint replaced by its marker;
    reading another field notes `key` in `opaque`."""

    def __init__(self, key: str, real: dict | None, opaque: set[str]) -> None:
        mark = marker(key)
        super().__init__({"path": key, **(real or {}), "status": "done",
                          "outputs": {mark: mark}, "inputs": mark, "fingerprint": mark})  # fmt: skip
        self._key, self._opaque = key, opaque

    def _note(self, name: object) -> None:
        if name not in _AS_IS:
            self._opaque.add(self._key)

    def __getitem__(self, name):
        self._note(name)
        return super().__getitem__(name)

    def get(self, name, default=None):
        self._note(name)
        return super().get(name, default)

    def __contains__(self, name) -> bool:
        self._note(name)
        return super().__contains__(name)


class PlanningView:
    """The manifest for planning: a pending key reads as recorded and intact, its record
    as a `_PendingRecord`. Everything else is the manifest's own."""

    def __init__(self, manifest: Manifest, pending: set[str]) -> None:
        self._manifest = manifest
        self.pending = pending
        self.opaque: set[str] = set()  # pending keys whose values a step read
        self.waited: set[str] = set()  # pending keys a step read at all

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manifest, name)

    def _is_pending(self, key: str) -> bool:
        if key in self.pending:
            self.waited.add(key)
            return True
        return False

    def entry(self, key: str) -> dict | None:
        if self._is_pending(key):
            return _PendingRecord(key, self._manifest.entry(key), self.opaque)
        return self._manifest.entry(key)

    def is_recorded(self, key: str) -> bool:
        return self._is_pending(key) or self._manifest.is_recorded(key)

    def damaged(self, key: str, verify: bool = False, listing=None) -> list:
        if self._is_pending(key):
            return []
        return self._manifest.damaged(key, verify=verify, listing=listing)

    def outputs_hash(self, key: str) -> str:
        return marker(key) if self._is_pending(key) else self._manifest.outputs_hash(key)


def markers_in(value: Any) -> set[str]:
    """The pending keys whose markers a step's input value carries."""
    if isinstance(value, str):
        return {value[len(PENDING) :]} if value.startswith(PENDING) else set()
    if isinstance(value, dict):
        return set().union(*(markers_in(k) | markers_in(v) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return set().union(*(markers_in(v) for v in value))
    return set()


class StatusContext(RunContext):
    """A RunContext that never fetches: status reads, it does not fill a mirror."""

    def fetch(self, paths) -> None:
        return None


# ---- the answer ---------------------------------------------------------------------------------
def run_status(config: RunConfig) -> RunStatus:
    """Every step of the run with its state, the lock's holder, the trials and the cost."""
    pipeline = Pipeline(config)
    space, tasks = pipeline.check()  # a config `dem-ray run` would refuse fails here too
    storage = pipeline.storage
    manifest = _read_manifest(pipeline)
    ctx = StatusContext(config, storage, manifest, space, pipeline.config_dir)
    ctx.tasks = tasks
    holder = RunLock(storage).holder()
    waits: dict[str, list[str]] = {}  # pending key: the pending keys it waits on
    lines: list[StepStatus] = []
    search_step = None
    with _quiet("dem_ray.run.manifest"):
        for stage in STAGES:
            planned, stage_lines = _plan_stage(ctx, stage, waits)
            lines += stage_lines
            waits.update({s.key: s.after for s in stage_lines if s.state != "done"})
            search_step = next((s for s in planned if s.key == "search"), search_step)
    if holder:
        _mark_running(lines, holder)
    return RunStatus(
        run_dir=storage.display,
        lock=holder,
        steps=lines,
        trials=_trials(ctx, search_step),
        cost=cost_so_far(manifest, config),
    )


def _plan_stage(ctx: StatusContext, stage: Stage, waits: dict[str, list[str]]):
    """The stage's steps as the run plans them now, and a line for each."""
    real = ctx.manifest
    view = PlanningView(real, set(waits))
    ctx.manifest = view
    try:
        steps = stage.steps(ctx)
    except (StageError, LookupError, TypeError, ValueError, RuntimeError, OSError) as exc:
        return [], [_unplanned(real, stage, key, view, waits, exc) for key in _keys(stage, ctx)]
    finally:
        ctx.manifest = real
    return steps, [_step_status(ctx, stage, step, view.opaque, waits) for step in steps]


def nearest(keys: set[str], waits: dict[str, list[str]]) -> list[str]:
    """Of the pending steps `keys`, those none of the others waits on, directly or not:
    what to name (the report waits on `merge`, not on everything before it too)."""

    def below(key: str, seen: set[str]) -> set[str]:
        for dep in waits.get(key, ()):
            if dep not in seen:
                seen.add(dep)
                below(dep, seen)
        return seen

    under: set[str] = set()
    for key in keys:
        below(key, under)
    return sorted(set(keys) - under)


def _names(keys: list[str], shown: int = 3) -> str:
    """Keys for a line of text (the JSON has them all)."""
    if len(keys) <= shown + 1:
        return ", ".join(keys)
    return f"{', '.join(keys[:shown])} and {len(keys) - shown} more"


def _step_status(ctx: StatusContext, stage: Stage, step: Step, opaque: set[str],
                 waits: dict[str, list[str]]) -> StepStatus:  # fmt: skip
    manifest = ctx.manifest
    by_part = {name: markers_in(value) for name, value in step.inputs.items()}
    after = set().union(*by_part.values()) | opaque
    line = StepStatus(step.key, stage.name, stage.command, "done", after=sorted(after))
    if not manifest.is_recorded(step.key):
        line.state = "missing"
        line.detail = f"waiting on {_names(nearest(after, waits))}" if after else ""
        return line
    if not after and step_is_done(ctx, step):
        return line
    line.state = "stale"
    entry = manifest.entry(step.key)
    if entry.get("inputs") != step.digest and not entry.get("input_parts"):
        # Recorded by a dem-ray that kept one digest only: which input is not known.
        line.detail = f"after {_names(nearest(after, waits))}" if after else "inputs changed"
        return line
    changed = manifest.changed_inputs(step.key, step.parts)
    line.changed = changed
    own = [name for name in changed if not by_part.get(name)]
    carried = [name for name in changed if by_part.get(name)]
    reasons = [f"{', '.join(own)} changed"] if own else []
    if after:
        parts = f" ({', '.join(carried)})" if carried else ""
        reasons.append(f"after {_names(nearest(after, waits))}{parts}")
    if not reasons:
        damaged = manifest.damaged(step.key, listing=ctx.listing())
        if damaged:
            path, why = damaged[0]
            reasons.append(f"{ctx.show(path)} {why}")
        else:
            have = entry.get("num_trials")
            reasons.append(f"{have} of {wanted_trials(ctx)} trials" if stage.name == "search"
                           else "more asked for than recorded")  # fmt: skip
    line.detail = "; ".join(reasons)
    return line


def _unplanned(manifest: Manifest, stage: Stage, key: str, view: PlanningView,
               waits: dict[str, list[str]], exc: Exception) -> StepStatus:  # fmt: skip
    """A step whose stage could not plan: it waits on a pending step, or says why not."""
    after = view.waited
    state = "stale" if manifest.is_recorded(key) else "missing"
    detail = f"waiting on {_names(nearest(after, waits))}" if after else f"cannot check: {exc}"
    return StepStatus(key, stage.name, stage.command, state, detail, after=sorted(after))


def _keys(stage: Stage, ctx: RunContext) -> list[str]:
    if stage.name in _PER_DATASET:
        return [f"{stage.name}/{n}" for n in ctx.names]
    if stage.name == "baseline":
        return [f"baseline/{mid}" for mid in planned_mixtures(ctx)]
    return [_KEY_OF_STAGE.get(stage.name, stage.name)]


def _mark_running(lines: list[StepStatus], holder: dict) -> None:
    """The steps the holder's command is at: the first of its stages with work left."""
    command = holder.get("command")
    commands = set(COMMANDS) if command == "run" else {command, *PREREQUISITES.get(command, ())}
    todo = [s for s in lines if s.command in commands and s.state != "done"]
    if not todo:
        return
    for line in todo:
        if line.stage == todo[0].stage:
            line.state, line.detail = "running", describe_holder(holder)


def describe_holder(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since "
            f"{holder.get('since', '?')} (dem-ray {holder.get('command', '?')})")  # fmt: skip


def _read_manifest(pipeline: Pipeline) -> Manifest:
    """The manifest as recorded: a bucket run's is read from the bucket, not its mirror."""
    storage = pipeline.storage
    try:
        manifest = Manifest(pipeline.run_dir, storage)
        if storage.remote:
            text = _read_remote(storage, "manifest.json")
            manifest.data = json.loads(text) if text else {"version": 2, "stages": {}}
    except (RuntimeError, ValueError) as exc:
        raise StageError(f"run_dir {storage.display}: the manifest is unreadable ({exc})") from exc
    return manifest


def _read_remote(storage, rel: str) -> str | None:
    try:
        with storage.fs.open_input_stream(f"{storage.root}/{rel}") as fh:
            return fh.read().decode()
    except FileNotFoundError:
        return None


def _trials(ctx: StatusContext, step: Step | None) -> dict:
    """Trials finished of those asked for, the best so far, and whether a run keeps them."""
    layout = ctx.layout
    logs = [layout.trials]
    if ctx.space.two_stage:
        logs.append(global_trials_path(ctx))
    trials: list[dict] = []
    try:
        for path in logs:
            trials += _read_trial_log(ctx, path)
    except RuntimeError as exc:
        return {"done": None, "total": wanted_trials(ctx), "best": None, "error": str(exc)}
    scores = [full_objective(t) for t in trials]
    best = min((s for s in scores if math.isfinite(s)), default=None)
    kept = step is not None and bool(trials) and _made_with(ctx, layout.trials, step.digest)
    return {"done": len(trials), "total": wanted_trials(ctx), "best": best,
            "objective": ctx.cfg.search.objective, "kept": kept}  # fmt: skip


def _read_trial_log(ctx: StatusContext, path: Path) -> list[dict]:
    """A trial log's finished trials; a bucket run's read from the bucket (via a temp copy,
    so that `read_trials` decides what a cut-short line is)."""
    if not ctx.storage.remote:
        return read_trials(path)
    text = _read_remote(ctx.storage, path.relative_to(ctx.layout.root).as_posix())
    if text is None:
        return []
    with tempfile.TemporaryDirectory(prefix="dem-ray-status.") as tmp:
        copy = Path(tmp) / path.name
        copy.write_text(text)
        return read_trials(copy)


def _made_with(ctx: StatusContext, path: Path, digest: str) -> bool:
    if not ctx.storage.remote:
        return made_with(path, digest)
    marker_rel = inputs_marker(path).relative_to(ctx.layout.root).as_posix()
    return (_read_remote(ctx.storage, marker_rel) or "").strip() == digest


def cost_so_far(manifest: Manifest, config: RunConfig) -> dict[str, dict]:
    """What the recorded steps cost, per side: DEM's stages (as the report counts them),
    the data-mixing baseline's mixtures, and the rest (prepare, the grid, downstream,
    the report)."""
    prices = (config.cost.usd_per_gpu_hour, config.cost.usd_per_cpu_hour)
    sides = {side: {"device_seconds": 0.0, "usd": 0.0, "steps": 0}
             for side in ("dem", "baseline", "other")}  # fmt: skip
    for key, entry in manifest.data.get("stages", {}).items():
        if entry.get("status") != "done" or not entry.get("cost"):
            continue
        stage = key.split("/")[0]
        side = "dem" if stage in DEM_STAGES else "baseline" if stage == "baseline" else "other"
        item = costs.priced(entry["cost"], 0, *prices)
        sides[side]["device_seconds"] += item["device_seconds"]
        sides[side]["usd"] += item["usd"]
        sides[side]["steps"] += 1
    return sides


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """The manifest's "running the stage again" lines are the run's, not status's."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# ---- as text --------------------------------------------------------------------------------
def render(status: RunStatus) -> str:
    """The answer as lines: the lock, one line per step, the trials, the cost."""
    lock = f"held by {describe_holder(status.lock)}" if status.lock else "free"
    out = [f"run_dir: {status.run_dir}", f"lock: {lock}"]
    width = max((len(s.key) for s in status.steps), default=0)
    for s in status.steps:
        out.append(f"  {s.key:<{width}}  {s.state:<7}  {s.detail}".rstrip())
    if status.trials is not None:
        out.append(trials_line(status.trials))
    parts = []
    for side, label in (("dem", "DEM"), ("baseline", "baseline"), ("other", "other")):
        c = status.cost[side]
        parts.append(f"{label} {c['device_seconds']:.1f} device-s (${c['usd']:.4f})")
    out.append(f"cost so far: {'; '.join(parts)}")
    return "\n".join(out)


def trials_line(t: dict) -> str:
    if t.get("error"):
        return f"trials: unreadable ({t['error']})"
    if t["best"] is None:
        best = "none scored yet"
    else:
        best = f"best {t['objective']} objective {t['best']:.4f}"
    earlier = t["done"] and not t["kept"]
    note = " (of an earlier search: a run starts afresh)" if earlier else ""
    return f"trials: {t['done']} of {t['total']} done, {best}{note}"
