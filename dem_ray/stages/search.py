"""search: Optuna over the evaluator pool (ask and tell); and the plain coefficient grid beside it.

The search's inputs leave out `search.num_trials` and `search.compare_grid`: raising
the first extends a finished search (only the missing trials run), the second adds the
grid as its own step. Changing the space, the objective, the sampler, the vectors or
what a score depends on starts the search afresh.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from dem_ray.config import result_settings
from dem_ray.core.atomic import write_text_atomic
from dem_ray.core.mixtures import grid_step_for_comparison
from dem_ray.core.spaces import global_trials
from dem_ray.ray.pool import PoolSpec
from dem_ray.ray.search import (
    SearchStats,
    best_trial,
    inputs_marker,
    made_with,
    read_trials,
    run_search,
    warm_start_points,
)
from dem_ray.run.external_tracking import RunSpec, stage_run
from dem_ray.run.study import study_name
from dem_ray.run.tracking import search_events
from dem_ray.stages.base import RunContext, Stage, Step

log = logging.getLogger(__name__)

EVALUATION_HELP = (
    "the validation shards, `evaluator.max_validation_sequences`, `evaluator.autocast`, "
    "`evaluator.vector_dtype`, `finetune.seed` (the rows sampled) and the vectors"
)


def evaluators(ctx: RunContext, need_vectors: bool = True) -> list:
    """The evaluator actors, started (or reused) for this run's vectors and shards."""
    layout = ctx.layout
    vectors = []
    if need_vectors:
        for name in ctx.names:
            ctx.require(f"vectors/{name}", "vectors")
        vectors = [ctx.ref(layout.vector(n)) for n in ctx.names]
    ctx.ensure_ray()
    spec = PoolSpec(
        base_dir=ctx.ref(ctx.base_dir),
        vector_paths=vectors,
        shard_paths={n: ctx.ref(layout.shard(n, "validation")) for n in ctx.names},
        test_paths={n: ctx.ref(layout.shard(n, "test")) for n in ctx.names},  # report only
        sample_seed=ctx.cfg.finetune.seed,
        trust_remote_code=ctx.cfg.trust_remote_code,
        vector_hashes=list(ctx.vector_hashes().values()) if need_vectors else [],
        merge_spec=merge_spec(ctx) if need_vectors else {},
    )
    return ctx.pool.get(spec)


def merge_spec(ctx: RunContext) -> dict:
    """The merge kernel's method keywords: the same in the evaluators and in `merge`."""
    cfg = ctx.cfg.search
    return {
        "method": cfg.merge_method,
        "density": cfg.density,
        "dare_seed": cfg.dare_seed,
        "groups": ctx.space.merge_groups,
        "names": list(ctx.names),
    }


def scoring_inputs(ctx: RunContext) -> dict:
    """What a candidate's score depends on besides its weights."""
    return {
        "vectors": ctx.vector_hashes(),
        "vector_dtype": ctx.cfg.evaluator.vector_dtype,
        **ctx.evaluation_inputs(),
    }


class SearchStage(Stage):
    name = "search"
    command = "search"
    outputs = (
        "`search/trials.jsonl`, `search/best.json` (and `search/global_trials.jsonl`: the "
        "global stage of a two-stage per-block search)"
    )
    invalidated_by = {
        "search": "every `search.*` key except `max_concurrent`, `num_trials` (raising it "
        "runs only the missing trials) and `compare_grid`",
        "space": "the search space file's text",
        "scoring": EVALUATION_HELP,
    }

    def steps(self, ctx: RunContext) -> list[Step]:
        for name in ctx.names:
            ctx.require(f"vectors/{name}", "vectors")
        cfg = ctx.cfg.search
        inputs = {
            "search": result_settings(cfg),
            "space": Path(ctx.space.source).read_text(),
            "scoring": scoring_inputs(ctx),
        }
        wanted = wanted_trials(ctx)
        layout = ctx.layout
        reads = [layout.trials, inputs_marker(layout.trials), layout.study]
        if ctx.space.two_stage:
            reads += [global_trials_path(ctx), inputs_marker(global_trials_path(ctx))]
        return [
            Step(
                "search",
                inputs,
                reads=tuple(reads),
                enough=lambda entry: entry.get("num_trials", 0) >= wanted,
            )
        ]

    def run(self, ctx: RunContext, todo: list[Step]) -> None:
        [step] = todo
        start = time.perf_counter()
        layout = ctx.layout
        earlier = ctx.manifest.entry("search")
        changed = earlier is not None and earlier.get("inputs") != step.digest
        actors = evaluators(ctx)
        points, update = _warm_start(ctx, earlier if changed else None, step.digest)
        if update is None and earlier is not None and not changed:
            update = earlier.get("update")  # an extended search keeps what its start was
        cfg, fresh = ctx.cfg.search, bool(ctx.options.get("force"))
        first: list[dict] = []
        stats = SearchStats()
        if ctx.space.two_stage:
            first, cfg = _global_stage(ctx, actors, step.digest, fresh, stats)
            if points:
                log.info("search: two-stage; the per-block stage starts from the global "
                         "stage, not from the %d earlier candidates", len(points))  # fmt: skip
                points, update = [], {**update, "warm_start_points": 0}
        # A two-stage search's per-block stage learns every global trial (each is a
        # per-block point with all groups the same, the global best among them) and
        # never evaluates one again.
        events = search_events(layout.root, "search")
        trials = run_search(cfg, ctx.space, actors, layout.search, inputs=step.digest,
                            fresh=fresh, warm_start=points, known=first, stats=stats,
                            study=study(ctx, "search", step.digest), events=events,
                            tracking=search_tracking(ctx, "search", cfg),
                            **_upload_each_trial(ctx, layout.trials, events))  # fmt: skip
        best = best_trial([*first, *trials])
        trials = [*first, *trials]  # the cost and the count cover both stages
        best_record = {
            "weights": best["weights"],
            "objective": {"name": ctx.cfg.search.objective, "value": best["objective"]},
            "ppl": best["ppl"],
            "trial": best["trial"],  # its index in the trial log of its stage:
            "stage": best.get("stage", "search"),  # `global` (global_trials.jsonl) or `search`
            "num_trials": len(trials),
            "algorithm": ctx.cfg.search.algorithm,
            "space": ctx.space.kind,
            "update": update,
        }
        write_text_atomic(layout.best, json.dumps(best_record, indent=2))
        weights = ", ".join(f"{k}={v:.4f}" for k, v in best["weights"].items())
        log.info("search done: best objective %.4f at %s -> %s", best["objective"], weights,
                 ctx.show(layout.search))  # fmt: skip
        outputs = [layout.trials, layout.best]
        if ctx.space.two_stage:
            outputs.append(global_trials_path(ctx))
        ctx.record(step, outputs,
                   cost=search_cost(ctx, trials, start, stats),
                   extra={"vectors": ctx.vector_hashes(), "num_trials": len(trials),
                          "update": update, "best_weights": best["weights"]})  # fmt: skip


def wanted_trials(ctx: RunContext) -> int:
    """The trials a finished search has: every grid point for `grid`, else `num_trials`."""
    cfg = ctx.cfg.search
    return len(ctx.space.grid(cfg.grid_step)) if cfg.algorithm == "grid" else cfg.num_trials


def global_trials_path(ctx: RunContext) -> Path:
    return ctx.layout.search / "global_trials.jsonl"


def _global_stage(
    ctx: RunContext, actors: list, inputs: str, fresh: bool, stats: SearchStats
) -> tuple[list, object]:
    """A two-stage search's first stage: one weight per dataset (every block group the
    same), in its own trial log. Returns its trials and the per-block stage's config."""
    cfg = ctx.cfg.search
    n = global_trials(ctx.space, cfg.num_trials)
    path = global_trials_path(ctx)
    log.info("search: two-stage; %d global trials, then %d per block", n, cfg.num_trials - n)
    events = search_events(ctx.layout.root, "search-global")
    trials = run_search(cfg.model_copy(update={"num_trials": n}), ctx.space.inner(), actors,
                        ctx.layout.search, trials_name=path.name, inputs=f"{inputs}/global",
                        fresh=fresh, evaluate_in=ctx.space, stats=stats,
                        study=study(ctx, "search-global", inputs), events=events,
                        tracking=search_tracking(ctx, "search-global", cfg),
                        **_upload_each_trial(ctx, path, events))  # fmt: skip
    return _expanded(ctx, trials), cfg.model_copy(update={"num_trials": cfg.num_trials - n})


def _expanded(ctx: RunContext, trials: list[dict]) -> list[dict]:
    """The global stage's candidates, as this space's weights, for the report and the merge."""
    expanded = []
    for t in trials:
        weights = ctx.space.expand(t["weights"])
        expanded.append({**t, "weights": weights, "params": ctx.space.to_params(weights),
                         "stage": "global"})  # fmt: skip
    return expanded


def expanded_global_trials(ctx: RunContext) -> list[dict]:
    """A two-stage search's global trials as read back from their log, expanded."""
    return _expanded(ctx, read_trials(global_trials_path(ctx)))


class GridStage(Stage):
    """The plain coefficient grid over the same space, to compare the search against."""

    name = "search_grid"
    command = "search"
    outputs = "`search/grid_trials.jsonl` (with `search.compare_grid: true`)"
    invalidated_by = {
        "grid": "`search.objective`, `seed`, the grid's step (`baseline.grid_step`, else "
        "`search.grid_step`)",
        "space": "the search space file's text",
        "scoring": EVALUATION_HELP,
    }

    def grid_config(self, ctx: RunContext):
        return ctx.cfg.search.model_copy(
            update={
                "algorithm": "grid",
                "grid_step": grid_step_for_comparison(ctx.cfg),
                "scheduler": "none",  # the reference scores every grid point on all tokens
            }
        )

    def steps(self, ctx: RunContext) -> list[Step]:
        if not ctx.cfg.search.compare_grid:
            return []
        cfg = self.grid_config(ctx)
        inputs = {
            "grid": result_settings(cfg),
            "space": Path(ctx.space.source).read_text(),
            "scoring": scoring_inputs(ctx),
        }
        grid = ctx.layout.grid_trials
        return [Step("search_grid", inputs, reads=(grid, inputs_marker(grid)))]

    def run(self, ctx: RunContext, todo: list[Step]) -> None:
        [step] = todo
        start = time.perf_counter()
        layout = ctx.layout
        stats = SearchStats()
        events = search_events(layout.root, "search_grid")
        trials = run_search(self.grid_config(ctx), ctx.space, evaluators(ctx), layout.search,
                            trials_name=layout.grid_trials.name, inputs=step.digest,
                            fresh=bool(ctx.options.get("force")), stats=stats,
                            study=study(ctx, "search_grid", step.digest), events=events,
                            tracking=search_tracking(ctx, "search_grid", self.grid_config(ctx)),
                            **_upload_each_trial(ctx, layout.grid_trials, events))  # fmt: skip
        ctx.record(step, [layout.grid_trials], cost=search_cost(ctx, trials, start, stats))


def search_cost(
    ctx: RunContext, trials: list[dict], start: float, stats: SearchStats | None = None
) -> dict:
    """The trials' device-seconds, plus loading base and vectors into the actors; with
    `stats`, how busy the evaluators were over the trials this run evaluated."""
    startup = ctx.pool.take_startup_cost()
    return {
        **(stats.as_dict() if stats is not None and stats.calls else {}),
        "device_seconds": sum(t["device_seconds"] for t in trials)
        + startup["startup_device_seconds"],
        "startup_device_seconds": startup["startup_device_seconds"],
        "tokens_evaluated": sum(t["tokens_evaluated"] for t in trials),
        "wall_seconds": time.perf_counter() - start,
        "evaluations": len(trials),
        "device": ctx.pool.device,
    }


def study(ctx: RunContext, stage: str, inputs: str) -> tuple[str, str] | None:
    """Where the search's trials are exported as an Optuna study: (storage URL, study name)."""
    url = ctx.cfg.search.storage
    if url == "off":
        return None
    return url or f"sqlite:///{ctx.layout.study}", study_name(stage, inputs)


def search_tracking(ctx: RunContext, stage: str, cfg) -> RunSpec | None:
    """The MLflow / W&B run of a search stage (`search`, `search-global`, `search_grid`):
    its search settings and space as params."""
    params = {**result_settings(cfg), "space_kind": ctx.space.kind}
    return stage_run(ctx, stage, params, stage=stage)


def _upload_each_trial(ctx: RunContext, trials_path: Path, events: Path) -> dict:
    """A bucket run gets each finished trial uploaded, so a search resumed on another
    machine keeps it (and the study file, when it is the run dir's; and the stage's
    TensorBoard events)."""
    if not ctx.storage.remote:
        return {}
    paths = [trials_path, inputs_marker(trials_path), events]
    if ctx.cfg.search.storage is None:
        paths.append(ctx.layout.study)
    return {"after_write": lambda: ctx.storage.push(paths)}


def _warm_start(
    ctx: RunContext, earlier: dict | None, inputs: str
) -> tuple[list[dict], dict | None]:
    """After datasets were added or changed: the earlier search's best candidates first.

    Also says which datasets' vectors are new since that search, for the report's
    cost of the update. ([], None) on a first search, an extended one or a forced re-run.
    """
    if earlier is None:
        return [], None
    before = earlier.get("vectors", {})
    updated = [n for n, h in ctx.vector_hashes().items() if before.get(n) != h]
    points: list[dict] = []
    new: list[str] = []
    trials_path = ctx.layout.trials
    resuming = made_with(trials_path, inputs)
    if ctx.cfg.search.algorithm != "grid" and not resuming:
        earlier_trials = read_trials(trials_path)
        points, new = warm_start_points(earlier_trials, ctx.space, ctx.cfg.search.warm_start)
        if earlier_trials and not points and ctx.cfg.search.warm_start:
            log.info("search: earlier trials not reusable here (a dataset removed?); cold start")
        if points:
            log.info("search: warm start from %d of %d earlier trials (new datasets: %s)",
                     len(points), len(earlier_trials), ", ".join(new) or "none")  # fmt: skip
    return points, {"updated": updated, "new": new, "warm_start_points": len(points)}
