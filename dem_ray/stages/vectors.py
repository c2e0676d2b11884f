"""vectors: v_i = theta_i - theta_0, streamed tensor by tensor; for a LoRA fine-tune (a PEFT
adapter directory) its low-rank factors instead (`core.lowrank.lora_vector`)."""

from __future__ import annotations

import logging

from dem_ray.core.lowrank import is_adapter_dir, lora_vector
from dem_ray.core.vectors import check_compatible, compute_vector
from dem_ray.models.base import check_model_dir, check_same_tokenizer
from dem_ray.stages.base import RunContext, Stage, Step, Timer

log = logging.getLogger(__name__)


class VectorsStage(Stage):
    name = "vectors"
    command = "vectors"
    outputs = "`vectors/<name>.safetensors`"
    invalidated_by = {
        "base": "the prepared base",
        "finetuned": "the dataset's fine-tune (its files' sha256)",
    }

    def steps(self, ctx: RunContext) -> list[Step]:
        steps = []
        for name in ctx.names:
            ctx.require(f"finetune/{name}", "finetune")
            inputs = {
                "base": ctx.base_fingerprint(),
                "finetuned": ctx.outputs_hash(f"finetune/{name}"),
            }
            steps.append(Step(f"vectors/{name}", inputs,
                              reads=(ctx.base_dir, ctx.layout.finetune(name)),
                              payload={"name": name}))  # fmt: skip
        return steps

    def run(self, ctx: RunContext, todo: list[Step]) -> None:
        base = ctx.base_dir
        for step in todo:
            name = step.payload["name"]
            timer = Timer()
            tuned, out = ctx.layout.finetune(name), ctx.layout.vector(name)
            role = f"fine-tune '{name}'"
            shown = (ctx.show(base), ctx.show(tuned))
            if is_adapter_dir(tuned):  # finetune.method: lora; its factors, never dense
                check_same_tokenizer(base, tuned, role=role)
                lora_vector(base, tuned, out, names=shown)
            else:
                check_model_dir(tuned, role=role)
                check_same_tokenizer(base, tuned, role=role)
                check_compatible(base, tuned)
                compute_vector(base, tuned, out, names=shown)
            log.info("vector %s -> %s", name, ctx.show(out))
            ctx.record(step, [out], cost={"wall_seconds": timer.wall,
                                          "device_seconds": timer.cpu})  # fmt: skip
