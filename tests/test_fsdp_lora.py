"""The fine-tune worker's `finetune.strategy: fsdp` and `finetune.method: lora`, through
Ray Train: FSDP2 over 2 gloo workers trains the model DDP trains (same losses, same
output), and both resume from their checkpoints; LoRA writes a PEFT adapter directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import stand_in_run
from safetensors import safe_open
from safetensors.torch import load_file
from test_tracking import scalars
from worker_hooks import exit_once, hooks_by_value

from dem_ray.config import FinetuneConfig
from dem_ray.ray.finetune import (
    FinetuneJob,
    accumulate_gradients,
    labels_of,
    lr_factor,
    micro_generator,
    run_finetunes,
    sample_batch,
)

STEPS = 4


def _fit(pipeline, tmp_path: Path, name: str, monkeypatch, fault_rank: int | None = None,
         **update) -> tuple[dict, Path]:  # fmt: skip
    """One fine-tune of the code shard with `update`d settings, its worker of rank
    `fault_rank` killed after step 3 (once) when given; (metrics, output dir)."""
    from dem_ray.ray import finetune

    hp = _settings(pipeline, checkpoint_every=2, max_failures=1, **update)
    shard = {"code": str(pipeline.layout.shard("code", "train"))}
    out, events = tmp_path / name, tmp_path / f"{name}-events"
    job = FinetuneJob(name, str(pipeline.ctx.base_dir), shard, str(out), events_dir=str(events))
    storage = tmp_path / f"ray-{name}"
    marker = tmp_path / f"{name}-fault-fired"
    if fault_rank is not None:
        hook = exit_once(marker, name, 3, storage, rank_to_kill=fault_rank)
        monkeypatch.setattr(finetune, "AFTER_STEP", hook)
    with hooks_by_value():
        results, errors = run_finetunes([job], hp, storage)
    monkeypatch.setattr(finetune, "AFTER_STEP", None)
    assert errors == {}
    assert marker.exists() == (fault_rank is not None)  # the fault really fired
    shutil.rmtree(storage, ignore_errors=True)
    return results[name], out


def _settings(pipeline, **update) -> FinetuneConfig:
    """The run's `finetune` section with `update` (validated, as the worker reads it)."""
    raw = {**pipeline.cfg.finetune.model_dump(), "max_steps": STEPS, "batch_size": 4}
    return FinetuneConfig(**{**raw, **update})


def _layout(model_dir: Path) -> dict[str, tuple[str, list[int]]]:
    """Every tensor of a model dir: (dtype, shape)."""
    found = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118
                found[name] = (fh.get_slice(name).get_dtype(), fh.get_slice(name).get_shape())
    return found


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _prepared(root: Path, tiny_base, tiny_data, make_config):
    """A prepared run (base and shards; its fine-tunes stand-ins) to fine-tune from."""
    raw = make_config(root / "run", tiny_base, tiny_data)
    return stand_in_run(raw, root / "config.yaml")


@pytest.fixture(scope="module")
def fsdp_and_ddp(ray_session, tiny_base, tiny_data, make_config, tmp_path_factory):
    """The same 2-worker fine-tune under DDP, and under FSDP with rank 1 killed after
    step 3 (so it resumes from the FSDP checkpoint of step 2)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    pipeline = _prepared(tmp, tiny_base, tiny_data, make_config)
    with pytest.MonkeyPatch.context() as mp:
        ddp = _fit(pipeline, tmp, "ddp", mp, num_workers=2)
        fsdp = _fit(pipeline, tmp, "fsdp", mp, fault_rank=1, num_workers=2, strategy="fsdp")
    return pipeline, tmp, ddp, fsdp


def test_fsdp_losses_match_ddp_within_1e_4(fsdp_and_ddp):
    _, tmp, (ddp, _), (fsdp, _) = fsdp_and_ddp
    assert ddp["workers"] == fsdp["workers"] == 2
    assert fsdp["resumed_from_step"] == 2 and ddp["resumed_from_step"] == 0
    assert fsdp["tokens"] == ddp["tokens"] == STEPS * 4 * 32 * 2
    a, b = scalars(tmp / "ddp-events")["loss"], scalars(tmp / "fsdp-events")["loss"]
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, STEPS + 1))
    for (step, x), (_, y) in zip(a, b, strict=True):
        assert abs(x - y) < 1e-4, (step, x, y)
    assert fsdp["final_loss"] == pytest.approx(ddp["final_loss"], abs=1e-4)


def test_fsdp_writes_the_ddp_output_format_and_weights(fsdp_and_ddp):
    _, _, (_, ddp_dir), (_, fsdp_dir) = fsdp_and_ddp
    names = {p.name for p in ddp_dir.iterdir()}
    assert names == {p.name for p in fsdp_dir.iterdir()}
    assert "model.safetensors" in names and "config.json" in names
    assert _layout(fsdp_dir) == _layout(ddp_dir)  # names, dtypes, shapes: tied head once
    ddp_w, fsdp_w = _weights(ddp_dir), _weights(fsdp_dir)
    for name, tensor in ddp_w.items():
        torch.testing.assert_close(fsdp_w[name], tensor, rtol=0, atol=1e-4, msg=name)


def _replay_lora(base_dir: Path, shard: Path, hp) -> dict[str, torch.Tensor]:
    """What `train_loop` does for `method: lora` on one worker, in this process: the
    adapters' state after `hp.max_steps` steps."""
    from peft import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from dem_ray.data.shards import ShardReader
    from dem_ray.models.lora import add_adapters

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(hp.seed)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        model = add_adapters(model, hp.lora)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=hp.learning_rate,
                                      weight_decay=hp.weight_decay)  # fmt: skip
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, hp.warmup_steps, hp.max_steps)
        )
        shards, probs = [ShardReader(shard)], torch.tensor([1.0], dtype=torch.float64)
        for step in range(1, hp.max_steps + 1):
            batch, mask, _ = sample_batch(shards, probs, hp.batch_size,
                                          micro_generator(hp.seed, 0, step, 0))  # fmt: skip
            accumulate_gradients(model, [labels_of(batch.to(dtype=torch.long), mask)],
                                 torch.device("cpu"))  # fmt: skip
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    finally:
        torch.set_num_threads(threads)


def test_lora_writes_a_peft_adapter_that_resumes_batch_for_batch(
    ray_session, tiny_base, tiny_data, make_config, tmp_path, monkeypatch
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pipeline = _prepared(tmp_path, tiny_base, tiny_data, make_config)
    lora = {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    metrics, out = _fit(pipeline, tmp_path, "lora", monkeypatch, fault_rank=0,
                        method="lora", lora=lora)  # fmt: skip
    assert metrics["resumed_from_step"] == 2
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert "model.safetensors" not in files  # the adapters alone, not the model
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    base = pipeline.ctx.base_dir
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(out))
    assert len([n for n, _ in loaded.named_parameters() if "lora_B" in n]) == 3 * 2  # 2 layers
    saved = load_file(out / "adapter_model.safetensors")
    assert all(t.abs().max() > 0 for n, t in saved.items() if "lora_B" in n)  # B trained from 0
    hp = _settings(pipeline, method="lora", lora=lora)
    expected = _replay_lora(base, pipeline.layout.shard("code", "train"), hp)
    assert set(saved) == set(expected)
    for name, tensor in saved.items():  # the resumed run is the uninterrupted replay
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)
