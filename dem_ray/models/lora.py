"""`finetune.method: lora`: PEFT low-rank adapters on a causal LM, trained in place of it.

The fine-tune saves only the adapters (a PEFT adapter directory that
`PeftModel.from_pretrained` loads); the vectors stage turns them into low-rank
distribution vectors (`dem_ray.core.lowrank`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dem_ray.config import LoraSettings


def add_adapters(model: torch.nn.Module, settings: LoraSettings, resume_from: Path | None = None):
    """The model wrapped with trainable adapters: new ones (`settings`), or those of an
    adapter directory a run saved (`resume_from`). Only the adapters require grad."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if resume_from is not None:
        return PeftModel.from_pretrained(model, str(resume_from), is_trainable=True)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # PEFT: none of the target modules exist in the model
        raise ValueError(
            f"finetune.lora.target_modules {settings.target_modules!r}: {exc}; name modules "
            f"of {type(model).__name__} (e.g. q_proj, v_proj) or use all-linear"
        ) from exc


def freeze_base_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store the frozen weights of the adapted layers in `dtype` (bf16-mixed: the dtype
    autocast computes those matmuls in anyway, so the forward is the same at half their
    memory). The rest (embeddings, norms, head) stays fp32."""
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if hasattr(module, "lora_A") and isinstance(base, torch.nn.Linear):
            base.to(dtype)
