"""baseline: the data-mixing grid DEM is compared against.

One model per mixing ratio, trained on batches drawn from the datasets in that ratio and
scored by the same evaluator. Each mixture is recorded as `baseline/<mixture id>` as soon
as it is scored, so a stopped baseline keeps what it finished. The choice of the best
mixture is its own step: it is re-made from the recorded scores when only the objective
changed, without training anything again.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time

import ray

from dem_ray.config import result_settings
from dem_ray.core.atomic import replace_dir, write_text_atomic
from dem_ray.core.mixtures import mixture_id, mixtures, steps_per_mixture
from dem_ray.core.perplexity import objective, perplexity
from dem_ray.ray.finetune import FinetuneJob, run_finetunes
from dem_ray.report.card import made_by, model_files
from dem_ray.run.external_tracking import stage_run
from dem_ray.run.tracking import baseline_events
from dem_ray.stages.base import RunContext, Stage, StageError, Step
from dem_ray.stages.search import evaluators

log = logging.getLogger(__name__)


def planned_mixtures(ctx: RunContext) -> dict[str, dict[str, float]]:
    return {mixture_id(m): m for m in mixtures(ctx.cfg.baseline, ctx.names)}


class MixturesStage(Stage):
    name = "baseline"
    command = "baseline"
    outputs = "a `baseline/<mixture id>` record per mixture (validation and test nll per dataset)"
    invalidated_by = {
        "mixture": "the mixture's ratios (`baseline.grid_step` or `baseline.mixtures`)",
        "steps": "`baseline.steps` (default: `finetune.max_steps` x datasets)",
        "finetune": "every `finetune.*` key that changes the result",
        "base": "the prepared base",
        "train": "the datasets' train shards",
        "scoring": "the validation and test shards, `evaluator.max_validation_sequences`, "
        "`evaluator.autocast`, `finetune.seed` (the rows sampled)",
    }

    def steps(self, ctx: RunContext) -> list[Step]:
        if ctx.cfg.baseline is None:
            return []
        steps = steps_per_mixture(ctx.cfg.baseline, ctx.cfg.finetune, len(ctx.names))
        common = {
            "steps": steps,
            "finetune": result_settings(ctx.cfg.finetune),
            "base": ctx.base_fingerprint(),
            "train": [ctx.manifest.entry(f"data/{n}")["outputs"] for n in ctx.names],
            "scoring": ctx.evaluation_inputs(),
        }
        return [
            Step(
                f"baseline/{mid}",
                {"mixture": mix, **common},
                payload={"id": mid, "mixture": mix, "steps": steps},
            )  # fmt: skip
            for mid, mix in planned_mixtures(ctx).items()
        ]

    def run(self, ctx: RunContext, todo: list[Step]) -> None:
        hp = ctx.cfg.finetune
        layout = ctx.layout
        by_job = {f"mixture {s.payload['id']}": s for s in todo}
        # A mixture trained by a run stopped before scoring it is scored, not trained again.
        trained = {job: m for job, s in by_job.items()
                   if (m := _trained_earlier(ctx, s)) is not None}  # fmt: skip
        to_train = [s for job, s in by_job.items() if job not in trained]
        steps = todo[0].payload["steps"]
        total = len(planned_mixtures(ctx))
        rows = hp.batch_size * hp.grad_accum_steps * hp.num_workers  # per step
        log.info("baseline: %d of %d mixtures to train (%d trained earlier, to score), %d steps "
                 "each (%d tokens)", len(to_train), total, len(trained), steps,
                 steps * rows * hp.seq_len)  # fmt: skip
        errors: dict = {}
        if to_train:
            ctx.ensure_ray()
            ctx.pool.release()  # its CPUs/GPUs go to the trainers; it is started again after
            shards = {n: ctx.ref(layout.shard(n, "train")) for n in ctx.names}
            jobs = [
                FinetuneJob(f"mixture {s.payload['id']}", ctx.ref(ctx.base_dir), shards,
                            str(layout.mixture(s.payload["id"])), mixture=s.payload["mixture"],
                            max_steps=steps,
                            events_dir=str(baseline_events(layout.root, s.payload["id"])),
                            events_live=not ctx.storage.remote, tracking=_tracking(ctx, s),
                            max_shard_size=ctx.cfg.merge.shard_bytes)
                for s in to_train
            ]  # fmt: skip

            def landed(job: str, metrics: dict) -> None:
                ctx.storage.push([baseline_events(layout.root, by_job[job].payload["id"])])
                _mark_trained(ctx, by_job[job], metrics)
                trained[job] = metrics

            # Scored after all are trained: the evaluator takes resources the trainers need.
            wait = ctx.cfg.cluster.node_start_timeout_s
            _, errors = run_finetunes(jobs, hp, layout.ray_train,
                                      ctx.storage.ray_storage("ray_train"),
                                      trust_remote_code=ctx.cfg.trust_remote_code,
                                      on_done=landed,
                                      node_start_timeout_s=wait)  # fmt: skip
        if trained:
            actor = evaluators(ctx, need_vectors=False)[0]
            for job, metrics in trained.items():
                _score_mixture(ctx, actor, by_job[job], metrics)
        if errors:
            name, exc = next(iter(errors.items()))
            raise StageError(f"baseline {name} failed: {exc}") from exc


def _tracking(ctx: RunContext, step: Step):
    """A mixture's MLflow / W&B run: the fine-tune's result settings, its steps and ratios."""
    mid = step.payload["id"]
    params = {**step.inputs["finetune"], "steps": step.payload["steps"],
              "mixture": step.payload["mixture"]}  # fmt: skip
    return stage_run(ctx, f"baseline/{mid}", params, stage="baseline", mixture=mid,
                     inputs=step.digest)  # fmt: skip


TRAINED_MARKER = "dem_ray_trained.json"


def _mark_trained(ctx: RunContext, step: Step, metrics: dict) -> None:
    """A trained mixture's model dir says with which inputs it was trained, and its cost."""
    marker = ctx.layout.mixture(step.payload["id"]) / TRAINED_MARKER
    write_text_atomic(marker, json.dumps({"inputs": step.digest, "metrics": metrics}))


def _trained_earlier(ctx: RunContext, step: Step) -> dict | None:
    """The training metrics of this mixture's model when it is there, trained with these
    inputs (the model dir is swapped in whole, so it is never half-written)."""
    if ctx.options.get("force"):
        return None
    marker = ctx.layout.mixture(step.payload["id"]) / TRAINED_MARKER
    try:
        saved = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return saved["metrics"] if saved.get("inputs") == step.digest else None


def _score_mixture(ctx: RunContext, actor, step: Step, trained: dict) -> None:
    mid, mix = step.payload["id"], step.payload["mixture"]
    model_dir = ctx.layout.mixture(mid)
    start = time.perf_counter()
    ctx.storage.push([model_dir])  # evaluators on other nodes read it there
    # Validation chooses the best mixture; test is only reported (the verdict on DEM).
    result = ray.get(actor.evaluate_checkpoint.remote(ctx.ref(model_dir)))
    test = ray.get(actor.evaluate_checkpoint.remote(ctx.ref(model_dir), split="test"))
    eval_wall = time.perf_counter() - start
    nll = {n: [float(v[0]), int(v[1])] for n, v in result["nll"].items()}
    test_nll = {n: [float(v[0]), int(v[1])] for n, v in test["nll"].items()}
    write_text_atomic(model_dir / "dem_ray_mixture.json",
                      json.dumps({"id": mid, "weights": mix, "nll": nll, "test_nll": test_nll},
                                 indent=2))  # fmt: skip
    score = objective({n: tuple(v) for n, v in nll.items()}, ctx.cfg.search.objective)
    log.info("baseline: mixture %s objective %.4f", mid, score)
    startup = ctx.pool.take_startup_cost()["startup_device_seconds"]
    eval_seconds = result["device_seconds"] + test["device_seconds"] + startup
    ctx.record(
        step,
        [],
        cost={
            "device_seconds": trained["device_seconds"] + eval_seconds,
            "train_device_seconds": trained["device_seconds"],
            "eval_device_seconds": eval_seconds,
            "tokens_trained": trained["tokens"],
            "tokens_evaluated": result["tokens"] + test["tokens"],
            "wall_seconds": trained["wall_seconds"] + eval_wall,
            "train_wall_seconds": trained["wall_seconds"],
            "eval_wall_seconds": eval_wall,
            "device": trained["device"],
            "eval_device": ctx.pool.device,
        },
        extra={
            "weights": mix,
            "nll": nll,
            "ppl": {n: perplexity(*v) for n, v in nll.items()},
            "test_nll": test_nll,
            "test_ppl": {n: perplexity(*v) for n, v in test_nll.items()},
            "tokens_by_dataset": trained["tokens_by_dataset"],
        },  # fmt: skip
    )


class BestMixtureStage(Stage):
    name = "baseline_best"
    command = "baseline"
    outputs = "`baseline/best/` (the best mixture's model)"
    invalidated_by = {
        "mixtures": "any mixture's record",
        "objective": "`search.objective` (the best is chosen again from the recorded scores)",
        "keep_all": "`baseline.keep_all`",
    }

    def steps(self, ctx: RunContext) -> list[Step]:
        if ctx.cfg.baseline is None:
            return []
        ids = list(planned_mixtures(ctx))
        for mid in ids:
            ctx.require(f"baseline/{mid}", "baseline")
        inputs = {
            "mixtures": {mid: ctx.manifest.entry(f"baseline/{mid}")["inputs"] for mid in ids},
            "objective": ctx.cfg.search.objective,
            "keep_all": ctx.cfg.baseline.keep_all,
        }
        reads = (ctx.layout.best_mixture, *(ctx.layout.mixture(m) for m in ids))
        return [Step("baseline", inputs, reads=reads, payload={"ids": ids})]

    def run(self, ctx: RunContext, todo: list[Step]) -> None:
        [step] = todo
        ids = step.payload["ids"]
        layout = ctx.layout
        kind = ctx.cfg.search.objective
        entries = {mid: ctx.manifest.entry(f"baseline/{mid}") for mid in ids}
        scores = {
            mid: objective({n: tuple(v) for n, v in e["nll"].items()}, kind)
            for mid, e in entries.items()
        }
        best_id = min(ids, key=lambda mid: scores[mid])
        marker = layout.best_mixture / "dem_ray_mixture.json"
        current = json.loads(marker.read_text())["id"] if marker.exists() else None
        if current != best_id:
            if not layout.mixture(best_id).exists():
                raise StageError(
                    f"the best mixture {best_id} has no saved model; run "
                    f"`dem-ray baseline {ctx.cfg.source} --force` to train it again"
                )
            replace_dir(layout.mixture(best_id), layout.best_mixture)
        if not ctx.cfg.baseline.keep_all:
            shutil.rmtree(layout.mixtures, ignore_errors=True)
            ctx.storage.delete(layout.mixtures)
        # The model's files only: the model card in it is the report's output, rewritten
        # after this record (recorded here, it would make this step look damaged).
        ctx.record(step, model_files(layout.best_mixture),
                   extra={"best": best_id, "weights": entries[best_id]["weights"],
                          "mixtures": ids, "objectives": scores,
                          "made_by": made_by(sys.argv, self.command, ctx.cfg.source)})  # fmt: skip
        log.info("baseline: best mixture %s -> %s", best_id, ctx.show(layout.best_mixture))
