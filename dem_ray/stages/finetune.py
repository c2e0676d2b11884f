"""finetune: one Ray Train run per dataset, all launched together."""

from __future__ import annotations

from dem_ray.config import result_settings
from dem_ray.ray.finetune import FinetuneJob, run_finetunes
from dem_ray.run.external_tracking import stage_run
from dem_ray.run.tracking import finetune_events
from dem_ray.stages.base import RunContext, Stage, StageError, Step


class FinetuneStage(Stage):
    name = "finetune"
    command = "finetune"
    outputs = (
        "`finetune/<name>/` (an HF model directory per dataset; with `finetune.method: lora`, "
        "a PEFT adapter directory)"
    )
    invalidated_by = {
        "finetune": "every `finetune.*` key that changes the result (not the resource, "
        "logging and retry keys)",
        "base": "the prepared base",
        "train": "the dataset's train shard",
    }

    def steps(self, ctx: RunContext) -> list[Step]:
        return [
            Step(f"finetune/{name}", finetune_inputs(ctx, name), payload={"name": name})
            for name in ctx.names
        ]

    def run(self, ctx: RunContext, todo: list[Step]) -> None:
        ctx.ensure_ray()
        layout = ctx.layout
        steps = {step.payload["name"]: step for step in todo}
        jobs = [
            FinetuneJob(name, ctx.ref(ctx.base_dir), {name: ctx.ref(layout.shard(name, "train"))},
                        str(layout.finetune(name)),
                        events_dir=str(finetune_events(layout.root, name)),
                        events_live=not ctx.storage.remote,
                        tracking=_tracking(ctx, steps[name]),
                        max_shard_size=ctx.cfg.merge.shard_bytes)
            for name in steps
        ]  # fmt: skip

        def record(name: str, m: dict) -> None:
            """As each fine-tune lands: a run stopped while others train keeps it."""
            # Its event files are no output (they never make the fine-tune stale); a bucket
            # run gets them uploaded.
            ctx.storage.push([finetune_events(layout.root, name)])
            ctx.record(
                steps[name],
                [layout.finetune(name)],
                cost={
                    "device_seconds": m["device_seconds"],
                    "tokens_trained": m["tokens"],
                    "wall_seconds": m["wall_seconds"],
                    "device": m["device"],
                },
                extra={
                    "final_loss": m["final_loss"],
                    "steps": m["steps"],
                    "precision": m.get("precision"),  # `finetune.precision` as resolved
                    "node_id": m.get("node_id"),
                    "resumed_from_step": m.get("resumed_from_step"),
                },  # fmt: skip
            )

        wait = ctx.cfg.cluster.node_start_timeout_s
        _, errors = run_finetunes(jobs, ctx.cfg.finetune, layout.ray_train,
                                  ctx.storage.ray_storage("ray_train"),
                                  trust_remote_code=ctx.cfg.trust_remote_code,
                                  on_done=record,
                                  node_start_timeout_s=wait)  # fmt: skip
        if errors:
            name, exc = next(iter(errors.items()))
            raise StageError(f"fine-tune '{name}' failed: {exc}") from exc


def _tracking(ctx: RunContext, step: Step):
    """The fine-tune's MLflow / W&B run: its result settings as params."""
    name = step.payload["name"]
    return stage_run(ctx, f"finetune/{name}", step.inputs["finetune"], stage="finetune",
                     dataset=name, inputs=step.digest)  # fmt: skip


def finetune_inputs(ctx: RunContext, name: str) -> dict:
    return {
        "finetune": result_settings(ctx.cfg.finetune),
        "base": ctx.base_fingerprint(),
        "train": ctx.manifest.entry(f"data/{name}")["outputs"],
    }
