"""report: every model on every validation and test shard, the searches, and what each side
cost. The verdict (DEM against the best mixture) is made on test, which nothing chose on."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import ray

from dem_ray.core.atomic import write_text_atomic
from dem_ray.core.diagnostics import vector_diagnostics
from dem_ray.models.base import base_kind, base_path
from dem_ray.report.build import build_report
from dem_ray.report.card import CARD_NAME, hub_model_id, render_card
from dem_ray.report.render import write_report
from dem_ray.stages.base import RunContext, Stage, Step
from dem_ray.stages.search import evaluators, scoring_inputs

log = logging.getLogger(__name__)

# Layer groups of the report's per-block diagnostics outside a per-block space.
DIAGNOSTIC_GROUPS = 4


class ReportStage(Stage):
    name = "report"
    command = "report"
    outputs = (
        "`report/report.{json,md,html}` and plots; the model cards `merged/README.md` and "
        "`baseline/best/README.md`"
    )
    invalidated_by = {
        "merge": "the merged model",
        "search": "the search's trials",
        "finetune": "the fine-tunes",
        "cost": "`cost.*` (the prices)",
        "comparison": "the baseline's records and the grid's trials, when the run has them",
        "downstream": "the downstream scores and the rerank, when the run has them",
        "scoring": "the validation and test shards, the vectors, "
        "`evaluator.max_validation_sequences`, `evaluator.autocast`, `evaluator.vector_dtype`, "
        "`finetune.seed` (the rows sampled)",
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
        downstream = {key: ctx.require(key, command)["inputs"]
                      for key, command in downstream_keys(ctx)}  # fmt: skip
        inputs = {
            "merge": ctx.outputs_hash("merge"),
            "search": ctx.outputs_hash("search"),
            "finetune": [ctx.outputs_hash(f"finetune/{n}") for n in ctx.names],
            "cost": ctx.cfg.cost.model_dump(),
            "comparison": comparison,
            "downstream": downstream,
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
        scores: dict[str, dict] = {"validation": {}, "test": {}}
        device_seconds, tokens = 0.0, 0
        for label, path in models.items():
            for split, by_label in scores.items():
                if path is None:
                    call = actor.evaluate.remote([0.0] * len(ctx.space.keys), split=split)
                else:
                    call = actor.evaluate_checkpoint.remote(ctx.ref(path), split=split)
                result = ray.get(call)
                by_label[label] = {n: tuple(v) for n, v in result["nll"].items()}
                device_seconds += result["device_seconds"]
                tokens += result["tokens"]
            log.info("report: scored %s on validation and test", label)
        startup = ctx.pool.take_startup_cost()["startup_device_seconds"]
        cost = {
            "device_seconds": device_seconds + startup,
            "startup_device_seconds": startup,
            "tokens_evaluated": tokens,
            "wall_seconds": time.perf_counter() - start,
            "device": ctx.pool.device,
        }
        diagnostics = vector_diagnostics([layout.vector(n) for n in ctx.names], ctx.names,
                                         groups=ctx.space.groups or DIAGNOSTIC_GROUPS)  # fmt: skip
        report = build_report(ctx, scores["validation"], cost, test_scores=scores["test"],
                              diagnostics=diagnostics)  # fmt: skip
        paths = write_report(report, layout.search, layout.report)
        ctx.record(step, [*paths, *write_cards(ctx, report)], cost=cost)
        log.info("report -> %s", ctx.show(layout.report))


def write_cards(ctx: RunContext, report: dict) -> list[Path]:
    """A model card in `merged/` (and `baseline/best/`), from the report's numbers.

    The cards are this step's outputs, not the merge's or the baseline's: those record
    only their model files, so writing a card leaves them up to date, and a merge that
    runs again (a fresh `merged/`, no card) makes this step run again too."""
    spec, kind = ctx.cfg.base_model, base_kind(ctx.cfg.base_model)
    base_id = hub_model_id(spec.location if kind == "hub" else str(base_path(spec)), kind)
    hub_datasets = [ctx.cfg.datasets[n].hub for n in ctx.names if ctx.cfg.datasets[n].hub]
    models = {"dem": (ctx.layout.merged, "merge")}
    if "baseline" in report:
        models["baseline/best"] = (ctx.layout.best_mixture, "baseline")
    written = []
    for label, (model_dir, key) in models.items():
        made = ctx.manifest.entry(key).get("made_by")
        path = model_dir / CARD_NAME
        write_text_atomic(path, render_card(report, label, made, base_id, hub_datasets))
        written.append(path)
    return written


def downstream_keys(ctx: RunContext) -> list[tuple[str, str]]:
    """(manifest key, command that makes it) of the downstream records the report shows."""
    ds = ctx.cfg.downstream
    if ds is None:
        return []
    from dem_ray.stages.downstream import scored_models

    keys = [(f"downstream/{label}", "downstream") for label in scored_models(ctx)]
    return keys + ([("rerank", "search")] if ds.rerank_top else [])
