"""merge: theta_0 + sum_i w_i v_i (or the configured merge method) for the search's best
weights (or `--weights`), with the same arithmetic the evaluators scored: the same float32
`combine` over theta_0 as stored and the vectors as the evaluators hold them
(`evaluator.vector_dtype`), so `merged/` is, bit for bit, the model the search scored.
Written tensor by tensor into `merge.max_shard_size` shards (a setting of the output's
layout only: it re-runs nothing). Low-rank vectors (`finetune.method: lora`) go through
`core.lowrank.merge_lowrank_to_dir`, the evaluators' `LowRankMerge` arithmetic."""

from __future__ import annotations

import json
import logging
import sys

from dem_ray.core.lowrank import lowrank_vectors, merge_lowrank_to_dir
from dem_ray.core.merge import merge_to_dir
from dem_ray.models.base import TOKENIZER_FILES
from dem_ray.report.card import made_by
from dem_ray.stages.base import RunContext, Stage, StageError, Step, Timer
from dem_ray.stages.search import merge_spec

log = logging.getLogger(__name__)


class MergeStage(Stage):
    name = "merge"
    command = "merge"
    outputs = "`merged/` (an HF model directory)"
    invalidated_by = {
        "weights": "the weights merged: the search's best (the rerank's choice with "
        "`downstream.rerank_top`), or `dem-ray merge --weights`",
        "method": "`search.merge_method`, `density`, `dare_seed`, the space's block groups "
        "and `evaluator.vector_dtype` (when not float32: the vectors are rounded as the "
        "evaluators held them)",
        "vectors": "the vectors",
        "base": "the prepared base",
    }

    def steps(self, ctx: RunContext) -> list[Step]:
        for name in ctx.names:
            ctx.require(f"vectors/{name}", "vectors")
        weights = ctx.options.get("weights") or best_weights(ctx)
        ctx.space.check(weights)
        inputs = {
            "weights": weights,
            "method": _method_inputs(ctx),
            "vectors": list(ctx.vector_hashes().values()),
            "base": ctx.base_fingerprint(),
        }
        reads = (ctx.base_dir, *(ctx.layout.vector(n) for n in ctx.names))
        return [Step("merge", inputs, reads=reads, payload={"weights": weights})]

    def run(self, ctx: RunContext, todo: list[Step]) -> None:
        [step] = todo
        weights = step.payload["weights"]
        timer = Timer()
        out = ctx.layout.merged
        base = ctx.base_dir
        vectors = [ctx.layout.vector(n) for n in ctx.names]
        merge = merge_lowrank_to_dir if lowrank_vectors(vectors) else merge_to_dir
        merge(
            base,
            vectors,
            [weights[k] for k in ctx.space.keys],
            out,
            side_files=[base / name for name in TOKENIZER_FILES],
            metadata={"datasets": ctx.names, "weight_keys": ctx.space.keys},
            vector_dtype=ctx.cfg.evaluator.vector_dtype,
            max_shard_size=ctx.cfg.merge.shard_bytes,
            **merge_spec(ctx),
        )
        log.info("merged model -> %s", ctx.show(out))
        # What made it, for the model card the report writes into `merged/` (its output,
        # not this step's: `out` is a fresh directory here, without a card).
        given = ctx.options.get("weights")
        args = ["--weights", ",".join(f"{k}={v!r}" for k, v in given.items())] if given else []
        made = made_by(sys.argv, self.command, ctx.cfg.source, args)
        ctx.record(step, [out], cost={"wall_seconds": timer.wall, "device_seconds": timer.cpu},
                   extra={"weights": weights, "made_by": made})  # fmt: skip


def _method_inputs(ctx: RunContext) -> dict:
    """The merge kernel's settings as the step hashes them: `evaluator.vector_dtype` only
    where it is not float32 (a run dir merged before it counted keeps its merge)."""
    spec = merge_spec(ctx)
    dtype = ctx.cfg.evaluator.vector_dtype
    return spec if dtype == "float32" else {**spec, "vector_dtype": dtype}


def best_weights(ctx: RunContext) -> dict[str, float]:
    """The search's best, as its manifest entry records it (best.json for older runs); with
    `downstream.rerank_top`, the candidate the downstream tasks chose."""
    ds = ctx.cfg.downstream
    if ds is not None and ds.rerank_top:
        return ctx.require("rerank", "search")["weights"]
    entry = ctx.require("search", "search")
    if "best_weights" in entry:
        return entry["best_weights"]
    ctx.fetch((ctx.layout.best,))
    try:
        return json.loads(ctx.layout.best.read_text())["weights"]
    except (OSError, ValueError, KeyError) as exc:
        raise StageError(f"{ctx.show(ctx.layout.best)}: unreadable ({exc}); run `dem-ray "
                         f"search {ctx.cfg.source} --force`") from exc  # fmt: skip
