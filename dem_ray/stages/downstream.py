"""downstream: lm-evaluation-harness tasks on the run's models; and `rerank_top`, which lets
those tasks choose the merged model among the search's best candidates.

Both score inside the resident evaluators: a model on disk is loaded into the live
weights, a candidate is merged into them, and lm-eval runs on the live model. Nothing is
written to disk to be scored. Models and candidates are spread over the actors and run
in parallel as the pool allows.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from pathlib import Path

import ray

from dem_ray.core.atomic import write_text_atomic
from dem_ray.downstream.harness import mean_metric
from dem_ray.ray.search import full_objective, read_trials
from dem_ray.stages.base import RunContext, Stage, StageError, Step
from dem_ray.stages.search import (
    evaluators,
    expanded_global_trials,
    global_trials_path,
    merge_spec,
)

log = logging.getLogger(__name__)

TASKS_HELP = (
    "`downstream.tasks` (a local task's YAML and data files, byte for byte), `num_fewshot`, "
    "`limit`, and lm-eval's version"
)


def task_inputs(ctx: RunContext) -> dict:
    ds = ctx.cfg.downstream
    return {**ctx.tasks.inputs, "num_fewshot": ds.num_fewshot, "limit": ds.limit}


def task_settings(ctx: RunContext) -> dict:
    ds = ctx.cfg.downstream
    return {"num_fewshot": ds.num_fewshot, "limit": ds.limit, "batch_size": ds.batch_size}


def scored_models(ctx: RunContext) -> dict[str, tuple[Path, str]]:
    """{label: (model dir, its stage's outputs hash)} for the models the config scores, in
    the report's order (labels as in the report's `ppl`)."""
    kinds = ctx.cfg.downstream.scored_models(ctx.cfg.baseline is not None)
    layout, models = ctx.layout, {}
    for kind in kinds:
        if kind == "base":
            models["base"] = (ctx.base_dir, ctx.base_fingerprint())
        elif kind == "specialists":
            for n in ctx.names:
                ctx.require(f"finetune/{n}", "finetune")
                models[f"finetuned/{n}"] = (layout.finetune(n), ctx.outputs_hash(f"finetune/{n}"))
        elif kind == "dem":
            ctx.require("merge", "merge")
            models["dem"] = (layout.merged, ctx.outputs_hash("merge"))
        elif kind == "best_mixture":
            ctx.require("baseline", "baseline")
            models["baseline/best"] = (layout.best_mixture, ctx.outputs_hash("baseline"))
    return models


def _spread(actors: list, calls: list) -> list:
    """Submit `calls` ((method name, kwargs)) round-robin over the actors; their refs."""
    return [
        getattr(actors[i % len(actors)], method).remote(**kwargs)
        for i, (method, kwargs) in enumerate(calls)
    ]


def _cost(results: list[dict], wall_seconds: float, device: str) -> dict:
    return {
        "device_seconds": sum(r["device_seconds"] for r in results),
        "tokens_evaluated": sum(r["tokens"] for r in results),
        "wall_seconds": wall_seconds,
        "device": device,
    }


class DownstreamStage(Stage):
    name = "downstream"
    command = "downstream"
    outputs = "a `downstream/<model>` record per model scored (lm-eval's metrics per task)"
    invalidated_by = {
        "model": "the model scored: the base, a fine-tune, the merged model or the best mixture",
        "tasks": TASKS_HELP,
    }

    def steps(self, ctx: RunContext) -> list[Step]:
        if ctx.cfg.downstream is None:
            return []
        inputs = task_inputs(ctx)
        return [
            Step(
                f"downstream/{label}",
                {"model": digest, "tasks": inputs},
                reads=(path,),
                payload={"label": label, "path": path},
            )  # fmt: skip
            for label, (path, digest) in scored_models(ctx).items()
        ]

    def run(self, ctx: RunContext, todo: list[Step]) -> None:
        actors = evaluators(ctx, need_vectors=False)
        startup = ctx.pool.take_startup_cost()["startup_device_seconds"]
        tasks = ctx.tasks
        log.info("downstream: %d model(s) on %s over %d evaluator(s)", len(todo),
                 ", ".join(tasks.names), len(actors))  # fmt: skip
        calls = [("downstream", {"tasks": tasks, "settings": task_settings(ctx),
                                 "model_dir": ctx.ref(s.payload["path"])}) for s in todo]  # fmt: skip
        start = time.perf_counter()
        run_id = uuid.uuid4().hex
        pending = dict(zip(_spread(actors, calls), todo, strict=True))
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            step = pending.pop(ref)
            result = ray.get(ref)
            cost = _cost([result], result["wall_seconds"], ctx.pool.device)  # its own scoring
            cost["device_seconds"] += startup  # loading the pool, charged to the first
            startup = 0.0
            # Models score side by side on several actors: the stage's wall time runs from its
            # start until the last of this run lands (the report takes the max per run).
            cost["stage_run"] = {"id": run_id, "elapsed_seconds": time.perf_counter() - start}
            ctx.record(step, [], cost=cost,
                       extra={"scores": result["scores"], "samples": result["samples"],
                              "higher_is_better": result["higher_is_better"]})  # fmt: skip
            log.info("downstream: %s %s", step.payload["label"], _headline(result["scores"]))


def _headline(scores: dict) -> str:
    parts = []
    for task, metrics in scores.items():
        metric = next((k for k in metrics if not k.endswith("_stderr")), None)
        if metric is not None and metrics[metric] is not None:
            parts.append(f"{task} {metric} {metrics[metric]:.4f}")
    return ", ".join(parts)


def rerank_path(ctx: RunContext) -> Path:
    return ctx.layout.search / "rerank.json"


class RerankStage(Stage):
    name = "rerank"
    command = "search"
    outputs = "`search/rerank.json` (with `downstream.rerank_top`: the candidates' task scores)"
    invalidated_by = {
        "search": "the search's trials",
        "tasks": TASKS_HELP,
        "rerank": "`downstream.rerank_top` and `downstream.rerank_metric`",
        "merge": "the vectors and the merge method the candidates are merged with",
    }

    def steps(self, ctx: RunContext) -> list[Step]:
        ds = ctx.cfg.downstream
        if ds is None or not ds.rerank_top:
            return []
        ctx.require("search", "search")
        inputs = {
            "search": ctx.outputs_hash("search"),
            "tasks": task_inputs(ctx),
            "rerank": {"top": ds.rerank_top, "metric": ds.rerank_metric},
            "merge": {"vectors": ctx.vector_hashes(), "method": merge_spec(ctx)},
        }
        reads = [ctx.layout.trials] + ([global_trials_path(ctx)] if ctx.space.two_stage else [])
        return [Step("rerank", inputs, reads=tuple(reads))]

    def run(self, ctx: RunContext, todo: list[Step]) -> None:
        [step] = todo
        ds = ctx.cfg.downstream
        candidates = top_candidates(ctx, ds.rerank_top)
        actors = evaluators(ctx)
        startup = ctx.pool.take_startup_cost()["startup_device_seconds"]
        keys = ctx.space.keys
        log.info("rerank: the search's %d best candidates on %s (by mean %s)", len(candidates),
                 ", ".join(ctx.tasks.names), ds.rerank_metric)  # fmt: skip
        start = time.perf_counter()
        calls = [("downstream", {"tasks": ctx.tasks, "settings": task_settings(ctx),
                                 "weights": [c["weights"][k] for k in keys]})
                 for c in candidates]  # fmt: skip
        results = ray.get(_spread(actors, calls))
        rows, higher = [], True
        for trial, result in zip(candidates, results, strict=True):
            try:
                score, higher = mean_metric(result["scores"], ctx.tasks, ds.rerank_metric,
                                            result["higher_is_better"])  # fmt: skip
            except KeyError as exc:
                raise StageError(f"downstream.rerank_metric: {exc.args[0]}") from exc
            rows.append({"trial": trial["trial"], "stage": trial.get("stage", "search"),
                         "weights": trial["weights"], "objective": trial["objective"],
                         "score": score, "scores": result["scores"]})  # fmt: skip
        chosen = choose(rows, higher)
        record = {"top": ds.rerank_top, "metric": ds.rerank_metric, "higher_is_better": higher,
                  "candidates": rows,
                  "chosen": chosen, "weights": rows[chosen]["weights"]}  # fmt: skip
        write_text_atomic(rerank_path(ctx), json.dumps(record, indent=2))
        cost = _cost(results, time.perf_counter() - start, ctx.pool.device)
        cost["device_seconds"] += startup
        cost["evaluations"] = len(rows)
        ctx.record(step, [rerank_path(ctx)], cost=cost, extra=record)
        log.info("rerank: candidate %d of %d (trial %s, mean %s %.4f) becomes the merged model",
                 chosen + 1, len(rows), rows[chosen]["trial"], ds.rerank_metric,
                 rows[chosen]["score"])  # fmt: skip


def choose(rows: list[dict], higher_is_better: bool) -> int:
    """The index of the best `score`; a tie goes to the better validation objective (the
    rows come best first). Means of the same scores summed in another order differ in their
    last bits: that is a tie too."""
    sign = 1.0 if higher_is_better else -1.0
    return max(range(len(rows)), key=lambda i: (round(sign * rows[i]["score"], 9), -i))


def top_candidates(ctx: RunContext, count: int) -> list[dict]:
    """The search's `count` best fully scored candidates by validation objective, best first,
    each candidate once (a two-stage search's global stage included)."""
    trials = read_trials(ctx.layout.trials)
    if ctx.space.two_stage:
        trials = expanded_global_trials(ctx) + trials
    ranked = sorted((t for t in trials if math.isfinite(full_objective(t))),
                    key=full_objective)  # fmt: skip
    seen, best = set(), []
    for trial in ranked:
        key = tuple(round(trial["weights"][k], 12) for k in ctx.space.keys)
        if key not in seen:
            seen.add(key)
            best.append(trial)
    if len(best) < count:
        log.warning("rerank: the search has %d fully scored candidates, fewer than "
                    "downstream.rerank_top %d; reranking those", len(best), count)  # fmt: skip
    if not best:
        raise StageError("rerank: the search has no fully scored candidate; run `dem-ray "
                         f"search {ctx.cfg.source} --force`")  # fmt: skip
    return best[:count]
