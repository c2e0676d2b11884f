"""Fine-tunes at the paper's size: fp32 master weights from a bf16 base, bf16 autocast,
gradient accumulation and checkpointing, the LR schedule, and the hashes of runs made
before these keys existed."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dem_ray.config import FinetuneConfig, load_config, parse_config, result_settings
from dem_ray.core.hashing import hash_json
from dem_ray.ray.finetune import (
    accumulate_gradients,
    labels_of,
    lr_factor,
    micro_generator,
    resolve_precision,
    rows_before,
    sample_batch,
    step_generator,
)

CPU = torch.device("cpu")


# ---- the LR schedule ------------------------------------------------------------------------
def test_lr_factor_exact_values():
    # warm-up 2, 10 steps: the peak at step 2 (steps done), the end value at step 10
    assert [lr_factor(s, 2, 10) for s in (0, 1, 2, 9, 10)] == [1 / 3, 2 / 3, 1.0, 1.0, 1.0]
    assert [lr_factor(s, 2, 10, "linear") for s in (0, 1, 2, 4, 6, 8, 10, 12)] == [
        1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0,
    ]  # fmt: skip
    assert [lr_factor(s, 2, 10, "linear", 0.1) for s in (2, 6, 10)] == [1.0, 0.55, 0.1]
    assert [lr_factor(s, 2, 10, "cosine") for s in (1, 2, 6, 10, 11)] == [
        2 / 3, 1.0, 0.5, 0.0, 0.0,
    ]  # fmt: skip
    assert lr_factor(4, 2, 10, "cosine") == 0.5 * (1 + math.cos(math.pi / 4))
    assert lr_factor(6, 2, 10, "cosine", 0.2) == 0.2 + 0.8 * 0.5  # 0.6000000000000001
    assert lr_factor(0, 0, 4, "linear") == 1.0 and lr_factor(3, 0, 4, "linear") == 0.25
    assert lr_factor(5, 3, 3, "cosine", 0.5) == 0.5  # no room to decay: the end value
    with pytest.raises(ValueError, match="exponential"):
        lr_factor(5, 0, 10, "exponential")


def test_constant_schedule_is_the_old_warmup_lambda():
    """The schedule every earlier run used, to the bit."""
    for warmup in (0, 1, 2, 5):
        for s in range(20):
            assert lr_factor(s, warmup, 12) == min(1.0, (s + 1) / (warmup + 1))


def test_precision_resolves_from_the_device():
    assert resolve_precision(None, CPU) == "fp32"
    assert resolve_precision("bf16-mixed", CPU) == "bf16-mixed"
    assert resolve_precision("fp32", torch.device("cuda")) == "fp32"


# ---- hashes of earlier runs -----------------------------------------------------------------
# hash_json(result_settings(...)) as computed by the code at commit e388300 (before these
# keys existed), in a `git worktree add /tmp/wt HEAD` with PYTHONPATH=/tmp/wt. The finetune
# and baseline stages hash exactly this as their "finetune" input.
PINNED = {
    "default": "e069e27ded7dee7b99dd14fbbce796bf206b7648170480eb74f10f79255bd31e",
    "examples/demo.yaml": "2b0b178299ffe3f22e3b7bd4cf57c8322f87e6f85122f71f03f92ff8affbb36b",
    "examples/smollm2.yaml": "c5c4d5c3035b29129b08c6ef9d166318bd22848545be473c74dcc4bd0f64f3e4",
}


def test_new_keys_at_their_defaults_leave_the_finetune_hash_unchanged():
    assert hash_json(result_settings(FinetuneConfig())) == PINNED["default"]
    for path in ("examples/demo.yaml", "examples/smollm2.yaml"):
        cfg = load_config(path).finetune
        assert hash_json(result_settings(cfg)) == PINNED[path], path
        explicit = cfg.model_copy(update={"lr_schedule": "constant", "grad_accum_steps": 1,
                                          "min_lr_ratio": 0.0, "precision": None,
                                          "gradient_checkpointing": True})  # fmt: skip
        assert hash_json(result_settings(explicit)) == PINNED[path], path


@pytest.mark.parametrize(
    "change",
    [{"grad_accum_steps": 2}, {"lr_schedule": "cosine"}, {"min_lr_ratio": 0.1},
     {"precision": "fp32"}, {"precision": "bf16-mixed"}],
)  # fmt: skip
def test_a_new_key_set_otherwise_changes_the_hash(change):
    """An explicit precision is hashed as given: fp32 on CPU is what null does there, but
    not on a GPU, and the hash cannot know where the run will train."""
    changed = FinetuneConfig(**change)
    assert hash_json(result_settings(changed)) != PINNED["default"]
    assert result_settings(changed).items() >= change.items()


# ---- micro-batches --------------------------------------------------------------------------
def _shards(tmp_path, sizes=(5, 7)):
    from safetensors.torch import save_file

    from dem_ray.data.shards import ShardReader

    shards = []
    for i, rows in enumerate(sizes):
        path = tmp_path / f"s{i}.safetensors"
        ids = torch.arange(rows * 4, dtype=torch.int32).view(rows, 4) + 1000 * i
        save_file({"input_ids": ids}, str(path))
        shards.append(ShardReader(path))
    return shards


def test_micro_batches_are_replayable_and_the_first_is_the_step_batch(tmp_path):
    shards = _shards(tmp_path)
    probs = torch.tensor([0.3, 0.7], dtype=torch.float64)
    for step in (1, 2, 3):  # one micro-batch a step: the batches runs always drew
        a = sample_batch(shards, probs, 8, micro_generator(4, 1, step, 0))
        b = sample_batch(shards, probs, 8, step_generator(4, 1, step))
        assert torch.equal(a[0], b[0])
    drawn = {}
    for step in (1, 2, 3):
        for micro in range(3):
            ids, _, counts = sample_batch(shards, probs, 8, micro_generator(4, 1, step, micro))
            again, _, _ = sample_batch(shards, probs, 8, micro_generator(4, 1, step, micro))
            assert torch.equal(ids, again)  # a restarted worker draws the same rows
            drawn[step, micro] = (ids, counts)
    distinct = {tuple(ids.flatten().tolist()) for ids, _ in drawn.values()}
    assert len(distinct) == len(drawn)  # every (step, micro) its own draw
    # The replay after a restart counts every micro-batch of the steps done.
    counted = sum(counts for (step, _), (_, counts) in drawn.items() if step <= 2)
    assert torch.equal(rows_before(probs, 8, 4, 1, 2, grad_accum=3), counted)
    assert torch.equal(rows_before(probs, 8, 4, 1, 2), drawn[1, 0][1] + drawn[2, 0][1])


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config)
    model.train()
    return model


def _rows(n=4, width=16, seed=1):
    ids = torch.randint(0, 64, (n, width), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[0, 9:] = -100  # rows with different numbers of loss targets
    labels[3, 4:] = -100
    return ids, labels


def _adamw_step(model, micro_batches, precision="fp32"):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = accumulate_gradients(model, micro_batches, CPU, precision)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def test_two_micro_batches_of_b_step_like_one_batch_of_2b():
    ids, labels = _rows()
    one, two = _tiny_llama(), _tiny_llama()
    whole = accumulate_gradients(one, [(ids, labels)], CPU)
    split = accumulate_gradients(two, [(ids[:2], labels[:2]), (ids[2:], labels[2:])], CPU)
    # weighted by loss targets (15 + 8 + 15 + 3 per half), not 1/2 each: the same loss
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-6)
    for (name, a), b in zip(one.named_parameters(), two.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-6, msg=name)
    one, two = _tiny_llama(), _tiny_llama()
    _adamw_step(one, [(ids, labels)])
    _adamw_step(two, [(ids[:2], labels[:2]), (ids[2:], labels[2:])])
    for (name, a), b in zip(one.named_parameters(), two.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=name)


def test_a_micro_batch_without_targets_adds_nothing():
    ids, labels = _rows()
    empty = labels[:2].clone().fill_(-100)
    one, two = _tiny_llama(), _tiny_llama()
    whole = accumulate_gradients(one, [(ids[2:], labels[2:])], CPU)
    split = accumulate_gradients(two, [(ids[:2], empty), (ids[2:], labels[2:])], CPU)
    torch.testing.assert_close(split, whole, rtol=0, atol=0)
    for a, b in zip(one.parameters(), two.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0)


def test_bf16_mixed_runs_on_cpu_with_fp32_master_weights_and_a_close_loss():
    ids, labels = _rows()
    fp32, mixed = _tiny_llama(), _tiny_llama()
    loss32 = accumulate_gradients(fp32, [(ids, labels)], CPU, "fp32")
    loss16 = accumulate_gradients(mixed, [(ids, labels)], CPU, "bf16-mixed")
    assert loss16 != loss32  # autocast really ran (bf16 matmuls)
    assert abs(float(loss16) - float(loss32)) < 1e-2 * float(loss32)
    g32 = torch.cat([p.grad.flatten() for p in fp32.parameters()])
    g16 = torch.cat([p.grad.flatten() for p in mixed.parameters()])
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
               for p in mixed.parameters())  # fmt: skip
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99


def test_gradient_checkpointing_gives_the_same_losses():
    plain, checkpointed = _tiny_llama(), _tiny_llama()
    checkpointed.activation_checkpointing_enable({"use_reentrant": False})
    checkpointed.config.use_cache = False
    assert checkpointed.is_activation_checkpointing and not plain.is_activation_checkpointing
    losses, calls = {}, {}
    for label, model in (("plain", plain), ("checkpointed", checkpointed)):
        calls[label] = 0

        def count(*_, label=label):
            calls[label] += 1

        model.model.layers[0].mlp.register_forward_pre_hook(count)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[label] = []
        for _ in range(4):
            ids, labels = _rows()
            losses[label].append(float(accumulate_gradients(model, [(ids, labels)], CPU)))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    assert calls == {"plain": 4, "checkpointed": 8}  # the backward recomputed each layer
    assert losses["plain"][0] > losses["plain"][-1]  # it trained
    assert losses["checkpointed"] == pytest.approx(losses["plain"], rel=0, abs=1e-5)


# ---- through the stage: a bf16 base --------------------------------------------------------
LR, STEPS = 1.0e-4, 4


def replay(base_dir, shard, hp: FinetuneConfig, dtype: torch.dtype, precision: str = "fp32"):
    """What `train_loop` does on one worker, in this process: the same batches, schedule
    and optimizer, with weights (and AdamW state) in `dtype`. Returns the state dict."""
    from transformers import AutoModelForCausalLM

    from dem_ray.data.shards import ShardReader

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (finetune.torch_threads)
    try:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
        if hp.gradient_checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
            model.config.use_cache = False
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=hp.learning_rate,
                                      weight_decay=hp.weight_decay)  # fmt: skip
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
            s, hp.warmup_steps, hp.max_steps, hp.lr_schedule, hp.min_lr_ratio))  # fmt: skip
        shards, probs = [ShardReader(shard)], torch.tensor([1.0], dtype=torch.float64)
        for step in range(1, hp.max_steps + 1):
            micro = []
            for m in range(hp.grad_accum_steps):
                gen = micro_generator(hp.seed, 0, step, m)
                batch, mask, _ = sample_batch(shards, probs, hp.batch_size, gen)
                micro.append(labels_of(batch.to(dtype=torch.long), mask))
            accumulate_gradients(model, micro, CPU, precision)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        torch.set_num_threads(threads)


def dtypes_of(path):
    with safe_open(str(path), framework="pt") as fh:
        return {fh.get_slice(name).get_dtype() for name in fh.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def bf16_run(ray_session, tiny_base, tiny_data, make_config, tmp_path_factory):
    """The tiny base stored in bf16 (as the Hub ships models), fine-tuned 4 steps at lr 1e-4
    through the real prepare, finetune and vectors stages."""
    from transformers import AutoModelForCausalLM

    from dem_ray.models.base import copy_tokenizer
    from dem_ray.pipeline import Pipeline

    root = tmp_path_factory.mktemp("bf16")
    base = root / "base-bf16"
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(base, safe_serialization=True)
    copy_tokenizer(tiny_base, base)
    two = {name: tiny_data[name] for name in ("code", "letters")}  # the fewest a run mixes
    raw = make_config(root / "run", base, two,
                      finetune={"max_steps": STEPS, "learning_rate": LR})  # fmt: skip
    config_path = root / "config.yaml"
    config_path.write_text(json.dumps(raw))
    pipeline = Pipeline(parse_config(raw, source=str(config_path)))
    pipeline.open()
    for command in ("prepare", "finetune", "vectors"):
        pipeline.run_command(command)
    return pipeline, base


def test_a_bf16_base_is_fine_tuned_and_saved_in_fp32(bf16_run):
    pipeline, base = bf16_run
    tuned = pipeline.layout.finetune("code") / "model.safetensors"
    assert dtypes_of(base / "model.safetensors") == {"BF16"}
    assert dtypes_of(tuned) == {"F32"}  # the fp32 master weights
    assert dtypes_of(pipeline.layout.vector("code")) == {"F32"}
    entry = pipeline.manifest.entry("finetune/code")
    assert entry["precision"] == "fp32"  # null on CPU resolves to fp32, and is recorded
    assert entry["cost"]["tokens_trained"] == STEPS * 8 * 32


def test_the_vector_keeps_updates_pure_bf16_adamw_rounds_away(bf16_run):
    """v = master - base in fp32: nearly every weight moved. Pure-bf16 AdamW (what a bf16
    base got before) on the same base and the very same batches loses a large share of
    the updates: each one under half a weight's bf16 spacing (lr 1e-4: weights above
    ~0.03, and every norm weight near 1) rounds away."""
    pipeline, base = bf16_run
    hp = pipeline.cfg.finetune
    shard = pipeline.layout.shard("code", "train")
    vector = load_file(pipeline.layout.vector("code"))
    total = sum(v.numel() for v in vector.values())
    moved = sum(int((v != 0).sum()) for v in vector.values()) / total
    theta0 = load_file(base / "model.safetensors")
    pure = replay(base, shard, hp, torch.bfloat16)
    moved_bf16 = sum(int((pure[k] != theta0[k]).sum()) for k in vector) / total
    assert moved > 0.99
    assert moved_bf16 < 0.9 and moved - moved_bf16 > 0.1, (moved, moved_bf16)
    # The stage's fine-tune is the in-process fp32 replay of the same steps (same batches).
    fp32 = replay(base, shard, hp, torch.float32)
    tuned = load_file(pipeline.layout.finetune("code") / "model.safetensors")
    for name in vector:
        torch.testing.assert_close(tuned[name], fp32[name], rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(vector[name], fp32[name] - theta0[name].float(),
                                   rtol=0, atol=1e-6, msg=name)  # fmt: skip


def test_the_worker_gets_precision_accumulation_checkpointing_and_decay(bf16_run, tmp_path):
    """The new keys reach the worker: its result is the in-process replay of the same
    micro-batches, schedule and autocast, and its tokens count every micro-batch."""
    from dem_ray.ray.finetune import FinetuneJob, run_finetunes

    pipeline, base = bf16_run
    hp = pipeline.cfg.finetune.model_copy(update={
        "max_steps": 3, "batch_size": 4, "grad_accum_steps": 2, "precision": "bf16-mixed",
        "gradient_checkpointing": True, "lr_schedule": "cosine", "min_lr_ratio": 0.1,
        "warmup_steps": 1, "learning_rate": 1e-3,
    })  # fmt: skip
    shard = pipeline.layout.shard("code", "train")
    job = FinetuneJob("mixed", str(base), {"code": str(shard)}, str(tmp_path / "mixed"))
    results, errors = run_finetunes([job], hp, tmp_path / "ray_train")
    assert errors == {}
    metrics = results["mixed"]
    assert metrics["precision"] == "bf16-mixed"
    assert metrics["tokens"] == 3 * 4 * 2 * 32
    tuned = load_file(tmp_path / "mixed" / "model.safetensors")
    assert {t.dtype for t in tuned.values()} == {torch.float32}
    expected = replay(base, shard, hp, torch.float32, "bf16-mixed")
    for name, tensor in tuned.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-5, msg=name)
    shutil.rmtree(tmp_path / "ray_train", ignore_errors=True)
