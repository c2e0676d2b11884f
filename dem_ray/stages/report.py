"""report: every model on every validation shard, the searches, and what each side cost."""

from __future__ import annotations

import logging
import time

import ray

from dem_ray.report.build import build_report
from dem_ray.report.render import write_report
from dem_ray.stages.base import RunContext, Stage, Step
from dem_ray.stages.search import evaluators, scoring_inputs

log = logging.getLogger(__name__)


class ReportStage(Stage):
    name = "report"
    command = "report"
    outputs = "`report/report.{json,md,html}` and plots"
    invalidated_by = {
        "merge": "the merged model",
        "search": "the search's trials",
        "finetune": "the fine-tunes",
        "cost": "`cost.*` (the prices)",
        "comparison": "the baseline's records and the grid's trials, when the run has them",
        "scoring": "the validation shards, the vectors, `evaluator.max_validation_sequences`, "
        "`evaluator.autocast`, `evaluator.vector_dtype`",
    }

    def steps(self, ctx: RunContext) -> list[Step]:
        ctx.require("merge", "merge")
        comparison = {}
        if ctx.cfg.baseline is not None:
            entry = ctx.require("baseline", "baseline")
            comparison["baseline"] = [entry["inputs"], entry["outputs"]]
        if ctx.cfg.search.compare_grid:
            ctx.require("search_grid", "search")
            comparison["grid"] = ctx.outputs_hash("search_grid")
        inputs = {
            "merge": ctx.outputs_hash("merge"),
            "search": ctx.outputs_hash("search"),
            "finetune": [ctx.outputs_hash(f"finetune/{n}") for n in ctx.names],
            "cost": ctx.cfg.cost.model_dump(),
            "comparison": comparison,
            "scoring": scoring_inputs(ctx),
        }
        layout = ctx.layout
        reads = (layout.search, ctx.base_dir, layout.merged)
        return [Step("report", inputs, reads=reads)]

    def run(self, ctx: RunContext, todo: list[Step]) -> None:
        [step] = todo
        start = time.perf_counter()
        actor = evaluators(ctx)[0]
        layout = ctx.layout
        models = {
            "base": None,
            **{f"finetuned/{n}": layout.finetune(n) for n in ctx.names},
            "dem": layout.merged,
        }
        scores, device_seconds, tokens = {}, 0.0, 0
        for label, path in models.items():
            if path is None:
                result = ray.get(actor.evaluate.remote([0.0] * len(ctx.names)))
            else:
                result = ray.get(actor.evaluate_checkpoint.remote(ctx.ref(path)))
            scores[label] = {n: tuple(v) for n, v in result["nll"].items()}
            device_seconds += result["device_seconds"]
            tokens += result["tokens"]
            log.info("report: scored %s", label)
        startup = ctx.pool.take_startup_cost()["startup_device_seconds"]
        cost = {
            "device_seconds": device_seconds + startup,
            "startup_device_seconds": startup,
            "tokens_evaluated": tokens,
            "wall_seconds": time.perf_counter() - start,
            "device": ctx.pool.device,
        }
        report = build_report(ctx, scores, cost)
        paths = write_report(report, layout.search, layout.report)
        ctx.record(step, paths, cost=cost)
        log.info("report -> %s", ctx.show(layout.report))
