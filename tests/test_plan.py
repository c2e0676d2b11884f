"""`dem-ray plan` and the preflight of `dem-ray run`: the memory estimate, part by part.

The arithmetic is checked on a hand-built shape with numbers written out from the formulas;
the shape reader against a real tiny model and PEFT; the command on a Llama-2-13B-shaped
config.json (no weights anywhere); the estimate against the measured peak of the tiny model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dem_ray import cli, plan
from dem_ray.config import EvaluatorConfig, FinetuneConfig, LoraSettings, parse_config
from dem_ray.plan import GIB, ModelShape, evaluator_need, finetune_need

REPO = Path(__file__).resolve().parents[1]

# A toy Llama by hand: hidden 8, 2 layers, MLP 16, key/value width 4, vocabulary 32, tied head.
H, MLP, L, KV, V = 8, 16, 2, 4, 32
LAYER_LINEARS = {"self_attn.q_proj": (8, 8), "self_attn.k_proj": (8, 4),
                 "self_attn.v_proj": (8, 4), "self_attn.o_proj": (8, 8),
                 "mlp.gate_proj": (8, 16), "mlp.up_proj": (8, 16), "mlp.down_proj": (16, 8)}  # fmt: skip
LINEAR_PER_LAYER = sum(a * b for a, b in LAYER_LINEARS.values())  # 576
LAYER_PARAMS = LINEAR_PER_LAYER + 2 * H  # two norms: 592
P = V * H + L * LAYER_PARAMS + H  # embedding (= head), layers, final norm: 1448
SHAPE = ModelShape(
    architecture="Toy", params=P, dtype="float32", hidden=H, intermediate=MLP, layers=L,
    kv_dim=KV, vocab=V, linear_weights=L * LINEAR_PER_LAYER + V * H,
    largest_layer=LAYER_PARAMS,
    linears=tuple((f"model.layers.{n}.{name}", a, b)
                  for n in range(L) for name, (a, b) in LAYER_LINEARS.items()),
    pieces=(("model.embed_tokens", V * H, 0), ("model.layers.0", LAYER_PARAMS, 0),
            ("model.layers.1", LAYER_PARAMS, 0), ("model.norm", H, 0),
            ("model.rotary_emb", 0, 16), ("lm_head", 0, 0)),
    tied=(("lm_head", "model.embed_tokens"),),
)  # fmt: skip
LAYER_ACT_FP32 = 32 * H + 16 * MLP + 8 * KV  # bytes per token per layer autograd keeps
OUTER_ACT_FP32 = 12 * H + 4 * V


def parts(need) -> dict[str, int]:
    return {name: size for name, size, _ in need.parts}


# ---- the fine-tune worker ------------------------------------------------------------------


def test_full_fp32_adamw_is_16_bytes_per_parameter_when_the_gradients_peak():
    # 2 tokens: the backward's start (activations) is smaller than its end (gradients)
    ft = FinetuneConfig(batch_size=1, seq_len=2, precision="fp32")
    need = finetune_need(SHAPE, ft, device="cpu")
    start = 2 * (L * LAYER_ACT_FP32 + OUTER_ACT_FP32) + 8 * 2 * V + 4 * V * H
    assert start < 4 * P
    slack = int(0.45 * 2 * L * LAYER_ACT_FP32)  # glibc's heap: a share of the layer activations
    assert parts(need) == {"fp32 master weights": 4 * P, "AdamW moments": 8 * P,
                           "gradients (backward end)": 4 * P, "heap slack": slack,
                           "runtime": GIB}  # fmt: skip
    assert need.working == 16 * P + slack
    assert need.total == 16 * P + slack + GIB
    # On a GPU no heap slack, and foreach AdamW adds a temporary the size of the moments
    assert finetune_need(SHAPE, ft, device="cuda").working == 20 * P


def test_activations_are_per_token_per_layer_plus_the_loss():
    ft = FinetuneConfig(batch_size=2, seq_len=4, precision="fp32")  # 8 tokens
    need = finetune_need(SHAPE, ft, device="cpu")
    tokens = 8
    autograd = tokens * (L * LAYER_ACT_FP32 + OUTER_ACT_FP32)  # 8 x 1312
    loss = 8 * tokens * V  # logits + the log-softmax's and the logits' gradients
    head = 4 * V * H  # the output head's gradient, made first
    assert parts(need)["activations (backward start)"] == autograd + loss + head == 13568
    slack = int(0.45 * tokens * L * LAYER_ACT_FP32)
    assert need.working == 4 * P + 8 * P + 13568 + slack
    # micro-batches run one after another: accumulation does not add activations
    accum = ft.model_copy(update={"grad_accum_steps": 4})
    assert finetune_need(SHAPE, accum, device="cpu").working == need.working


def test_checkpointing_keeps_each_layers_input_and_one_layer():
    ft = FinetuneConfig(batch_size=2, seq_len=4, precision="fp32", gradient_checkpointing=True)
    tokens = 8
    expected = tokens * (L * 4 * H + LAYER_ACT_FP32 + OUTER_ACT_FP32)
    assert plan.activation_bytes(SHAPE, tokens, "fp32", checkpointing=True) == expected
    assert expected < plan.activation_bytes(SHAPE, tokens, "fp32")
    start = parts(finetune_need(SHAPE, ft, device="cpu"))["activations (backward start)"]
    assert start == expected + 8 * tokens * V + 4 * V * H


def test_bf16_mixed_counts_bf16_activations_and_weight_copies():
    ft = FinetuneConfig(batch_size=2, seq_len=4, precision="bf16-mixed")
    tokens = 8
    acts = tokens * (L * (30 * H + 8 * MLP + 4 * KV) + 10 * H + 4 * V)
    start = acts + 10 * tokens * V + 4 * V * H + 2 * SHAPE.linear_weights
    assert parts(finetune_need(SHAPE, ft, device="cpu"))["activations (backward start)"] == start
    # null resolves per device: bf16-mixed on a GPU with bf16, fp32 on a CPU or a T4
    default = FinetuneConfig(gpus_per_worker=1)
    assert plan.resolved_precision(default, "cuda") == "bf16-mixed"
    assert plan.resolved_precision(default, "cuda", "T4") == "fp32"
    assert plan.resolved_precision(FinetuneConfig(), "cpu") == "fp32"


def test_fsdp_divides_weights_gradients_and_moments_by_the_workers():
    ddp = finetune_need(SHAPE, FinetuneConfig(batch_size=1, seq_len=2, precision="fp32"), "cpu")
    ft = FinetuneConfig(batch_size=1, seq_len=2, precision="fp32", strategy="fsdp", num_workers=4)
    need = parts(finetune_need(SHAPE, ft, device="cpu"))
    assert need["fp32 master weights"] == parts(ddp)["fp32 master weights"] // 4 == P
    assert need["AdamW moments"] == parts(ddp)["AdamW moments"] // 4 == 2 * P
    # the root group (embedding + final norm) whole, two layers gathered: weights and grads
    root = P - L * LAYER_PARAMS
    assert need["FSDP gathered weights"] == 8 * (root + 2 * LAYER_PARAMS)
    start = 2 * (L * LAYER_ACT_FP32 + OUTER_ACT_FP32) + 8 * 2 * V + 4 * V * H // 4
    assert need["activations (backward start)"] == start


def test_ddp_over_several_workers_adds_the_gradient_buckets():
    ft = FinetuneConfig(batch_size=1, seq_len=2, precision="fp32", num_workers=2)
    need = parts(finetune_need(SHAPE, ft, device="cpu"))
    assert need["DDP gradient buckets"] == 4 * P
    assert need["fp32 master weights"] == 4 * P  # each DDP worker holds the whole model


def test_lora_trains_and_keeps_adam_state_for_the_adapters_only():
    lora = LoraSettings(rank=2)
    adapters = L * sum(2 * (a + b) for a, b in LAYER_LINEARS.values())  # r x (d_in + d_out)
    assert plan.adapter_params(SHAPE, lora) == adapters == 512
    ft = FinetuneConfig(batch_size=1, seq_len=2, precision="fp32", method="lora", lora=lora)
    need = parts(finetune_need(SHAPE, ft, device="cpu"))
    assert need["frozen base weights"] == 4 * P  # the worker loads fp32 weights
    assert need["adapters"] == 4 * adapters
    assert need["AdamW moments"] == 8 * adapters
    tokens = 2
    start = tokens * (L * LAYER_ACT_FP32 + OUTER_ACT_FP32 + 4 * 2 * len(SHAPE.linears))
    assert need["activations (backward start)"] == start + 8 * tokens * V  # no head gradient
    # bf16-mixed: the adapted layers' frozen weights in bf16, the rest fp32
    bf16 = ft.model_copy(update={"precision": "bf16-mixed"})
    frozen_linear = L * LINEAR_PER_LAYER
    assert parts(finetune_need(SHAPE, bf16, device="cpu"))["frozen base weights"] == (
        (P - frozen_linear) * 4 + frozen_linear * 2
    )
    # a list of module names adapts only those
    qv = LoraSettings(rank=2, target_modules=["q_proj", "v_proj"])
    assert plan.adapter_params(SHAPE, qv) == L * (2 * (8 + 8) + 2 * (8 + 4))


# ---- the evaluator actor -------------------------------------------------------------------


def test_evaluator_holds_live_base_k_vectors_scratch_and_one_forward():
    ev = EvaluatorConfig(batch_size=2, max_validation_sequences=None)
    need = parts(evaluator_need(SHAPE, ev, k=3, seq_len=4, device="cpu"))
    tokens = 8
    assert need == {
        "live weights": 4 * P, "theta_0 copy": 4 * P, "vectors": 3 * 4 * P,
        "merge scratch": 4 * 3 * P,  # k float32 rows of min(2^18, P) elements
        "forward pass": tokens * V * 12 + tokens * (3 * MLP + 7 * H) * 4,
        "runtime": GIB,
    }  # fmt: skip
    # bf16 model and bf16 vectors: 2 B each, and scratch for the upcasts
    toy16 = ModelShape(**{**SHAPE.__dict__, "dtype": "bfloat16"})
    ev16 = ev.model_copy(update={"vector_dtype": "bfloat16"})
    need16 = parts(evaluator_need(toy16, ev16, k=3, seq_len=4, device="cpu"))
    assert need16["vectors"] == 3 * 2 * P and need16["live weights"] == 2 * P
    assert need16["merge scratch"] == 4 * (3 + 3 + 2) * P
    assert need16["forward pass"] == tokens * V * 10 + tokens * (3 * MLP + 7 * H) * 2


def test_evaluator_shards_and_lora_vectors():
    ev = EvaluatorConfig(batch_size=2, max_validation_sequences=16)
    need = parts(evaluator_need(SHAPE, ev, k=3, seq_len=4, device="cpu"))
    assert need["validation + test shards"] == 2 * 3 * 16 * 4 * 9  # int64 ids + bool mask
    lora = LoraSettings(rank=2)
    low = parts(evaluator_need(SHAPE, ev, k=3, seq_len=4, lora=lora, device="cpu"))
    assert low["vectors"] == 3 * 512 * 4  # k x r x (d_in + d_out) per adapted layer
    assert low["low-rank product"] == 4 * 16 * 8  # the largest layer's dense B x A, fp32
    assert low["live weights"] == 4 * P  # the live model and theta_0 stay dense


def test_evaluator_spread_over_gpus_holds_the_fullest_gpus_share():
    ev = EvaluatorConfig(gpus_per_actor=2.0, max_validation_sequences=None)
    one = evaluator_need(SHAPE, ev.model_copy(update={"gpus_per_actor": 1.0}), 3, 4)
    two = evaluator_need(SHAPE, ev, 3, 4)
    assert two.what == "evaluator actor, per GPU (of 2)"
    # bytes per parameter 2 x 4 + 3 x 4: embedding + layer 0 on GPU 0 (the tied head with
    # them), layer 1 + norm on GPU 1; GPU 0 is the fuller
    assert parts(two)["live weights"] == 4 * (V * H + LAYER_PARAMS)
    assert parts(two)["vectors"] == 3 * 4 * (V * H + LAYER_PARAMS)
    assert two.total < one.total


# ---- capacity, advice, the accelerator table --------------------------------------------


def test_accelerator_names_are_rays():
    from ray.util.accelerators import accelerators

    names = {v for k, v in vars(accelerators).items() if k[0].isupper() and isinstance(v, str)}
    assert set(plan.ACCELERATOR_GIB) <= names
    assert plan.accelerator_memory("A100-40G") == 40
    assert plan.accelerator_memory("a10g") == 22
    cap = plan.gpu_capacity("H100", None, 0.5)
    assert cap.bytes == 40 * GIB and "0.5 of it per worker" in cap.where
    assert plan.gpu_capacity("A100", None, 1).note  # Ray's A100 is 40 or 80 GB
    assert plan.gpu_capacity("TPU-V4", None, 1) is None
    assert plan.gpu_capacity(None, 12.5, 1).bytes == int(12.5 * GIB)


# ---- the model's shape from its config -------------------------------------------------


def _llama_dir(path: Path, **fields) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **fields}
    (path / "config.json").write_text(json.dumps(config))
    return path


TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=384, tie_word_embeddings=True)  # fmt: skip


def test_shape_counts_what_the_model_has(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = _llama_dir(tmp_path / "tiny", **TINY, torch_dtype="bfloat16")
    shape = plan.model_shape(model_dir)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir),
                                             dtype=torch.float32)  # fmt: skip
    assert shape.params == sum(p.numel() for p in model.parameters())  # tied: counted once
    assert shape.dtype == "bfloat16"  # config.json's, where no safetensors say otherwise
    assert (shape.hidden, shape.intermediate, shape.layers, shape.kv_dim, shape.vocab) == (
        32, 64, 2, 16, 384)  # fmt: skip
    assert len(shape.linears) == 2 * 7 and all("lm_head" not in n for n, _, _ in shape.linears)
    assert shape.root_params == 384 * 32 + 32  # embedding and the final norm
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert plan.adapter_params(shape, LoraSettings(rank=4)) == trainable


# ---- `dem-ray plan` on a 13B-shaped config -------------------------------------------------

LLAMA_13B = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                 num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                 tie_word_embeddings=False, torch_dtype="float16")  # fmt: skip


def _run_config(tmp_path: Path, base: Path, datasets: int = 2, **sections) -> Path:
    config = {
        "run_dir": str(tmp_path / "run"),
        "base_model": {"dir": str(base)},
        "datasets": {f"d{i}": f"d{i}.jsonl" for i in range(datasets)},
        **sections,
    }
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def _plan_json(capsys, path: Path, *extra: str) -> tuple[int, dict]:
    rc = cli.main(["plan", str(path), "--json", *extra])
    return rc, json.loads(capsys.readouterr().out)


def test_plan_names_what_fits_a_13b_base(tmp_path, capsys):
    base = _llama_dir(tmp_path / "llama13b", **LLAMA_13B)
    fp32_full = {"gpus_per_worker": 1, "precision": "fp32", "accelerator_type": "A100-80G"}
    path = _run_config(tmp_path, base, datasets=8, finetune=fp32_full,
                       evaluator={"gpus_per_actor": 1, "vector_dtype": "bfloat16",
                                  "accelerator_type": "H100"})  # fmt: skip
    rc, answer = _plan_json(capsys, path)
    assert rc == 1
    assert answer["model"]["params"] == 13_015_864_320
    finetune, evaluator = answer["checks"]
    assert finetune["fits"] is False and finetune["capacity_bytes"] == 80 * GIB
    assert finetune["working_bytes"] == 16 * 13_015_864_320 + 4 * 13_015_864_320  # + foreach
    workers = int(finetune["advice"][0].rsplit(">= ", 1)[1])
    assert finetune["advice"][0].startswith("finetune.strategy: fsdp") and workers <= 8
    assert "finetune.method: lora" in finetune["advice"]
    # k = 8 bf16 vectors of 13 B parameters beside an fp16 live model and theta_0: 4 GPUs
    assert evaluator["fits"] is False
    assert "evaluator.gpus_per_actor: 4 (or more)" in evaluator["advice"]

    # what the advice says does fit
    for finetune_keys, evaluator_keys in [
        ({**fp32_full, "strategy": "fsdp", "num_workers": 8}, {"gpus_per_actor": 4}),
        ({**fp32_full, "method": "lora"}, {"gpus_per_actor": 4}),
    ]:
        path = _run_config(tmp_path, base, datasets=8, finetune=finetune_keys,
                           evaluator={**evaluator_keys, "vector_dtype": "bfloat16",
                                      "accelerator_type": "H100"})  # fmt: skip
        rc, answer = _plan_json(capsys, path)
        assert rc == 0, answer
        assert [c["fits"] for c in answer["checks"]] == [True, True]
    assert cli.main(["plan", str(path)]) == 0  # the text answer, for people
    text = capsys.readouterr().out
    assert "13.0 B parameters" in text and "evaluator actor, per GPU (of 4)" in text
    assert "-> fits: accelerator_type H100 (80 GiB)" in text


def test_plan_without_a_named_gpu_still_estimates(tmp_path, capsys):
    base = _llama_dir(tmp_path / "llama13b", **LLAMA_13B)
    path = _run_config(tmp_path, base, finetune={"gpus_per_worker": 1},
                       evaluator={"gpus_per_actor": 4})  # fmt: skip
    rc, answer = _plan_json(capsys, path)
    assert rc == 0 and [c["fits"] for c in answer["checks"]] == [None, None]
    assert answer["checks"][0]["settings"].startswith("GPU, bf16-mixed")
    rc, answer = _plan_json(capsys, path, "--gpu-memory", "24")
    assert rc == 1 and answer["checks"][0]["capacity_bytes"] == 24 * GIB


# ---- the preflight of `dem-ray run` ---------------------------------------------------------


def _config(tmp_path: Path, base: Path, **sections):
    raw = json.loads(_run_config(tmp_path, base, **sections).read_text())
    return parse_config(raw, source=str(tmp_path / "run.yaml"))


def test_preflight_refuses_what_the_named_gpu_cannot_hold(tmp_path):
    base = _llama_dir(tmp_path / "llama13b", **LLAMA_13B)
    cfg = _config(tmp_path, base, finetune={"gpus_per_worker": 1, "accelerator_type": "A10G"})
    with pytest.raises(plan.PlanError) as info:
        plan.preflight(cfg)
    message = str(info.value)
    assert "finetune needs ~" in message and "per worker" in message
    assert "accelerator_type A10G (22 GiB)" in message
    assert "finetune.strategy: fsdp with finetune.num_workers >=" in message
    assert plan.SKIP_ENV in message
    # the same config fits once it says fsdp over enough workers and checkpointing (or is skipped)
    os.environ[plan.SKIP_ENV] = "1"
    try:
        plan.preflight(cfg)
    finally:
        del os.environ[plan.SKIP_ENV]


def test_preflight_passes_the_tiny_configs_the_suite_runs(tmp_path, tiny_base, monkeypatch):
    import time

    cfg = _config(tmp_path, tiny_base, finetune={"max_steps": 2})
    plan.preflight(cfg)  # warm: the first meta model imports the architecture's module
    start = time.perf_counter()
    plan.preflight(cfg)
    assert time.perf_counter() - start < 1.0
    # on CPU, against a local machine whose RAM is far too small: refused, naming the RAM
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(plan, "local_ram", lambda: 4 * 1024**2)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(plan.PlanError, match="this machine's RAM"):
        plan.preflight(cfg)


def test_run_refuses_before_any_work(tmp_path, tiny_base, capsys):
    """`dem-ray run` fails in the preflight, exit 2, with the key to change."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("d0", "d1"):
        (data / f"{name}.jsonl").write_text('{"text": "hello world"}\n' * 4)
    raw = json.loads(_run_config(tmp_path, tiny_base).read_text())
    raw["datasets"] = {n: str(data / f"{n}.jsonl") for n in ("d0", "d1")}
    raw["finetune"] = {"gpus_per_worker": 1, "accelerator_type": "T4", "batch_size": 4096,
                       "seq_len": 4096}  # fmt: skip
    path = tmp_path / "big.yaml"
    path.write_text(json.dumps(raw))
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "finetune needs ~" in err and "accelerator_type T4 (15 GiB)" in err
    assert "finetune.gradient_checkpointing: true" in err or "finetune.batch_size:" in err
    assert not (tmp_path / "run" / "manifest.json").exists()


# ---- the generated sizing table, and the measured accuracy ------------------------------------


def test_the_cluster_guides_sizing_table_is_what_plan_computes():
    from dem_ray.docs import region

    text = (REPO / "cluster" / "README.md").read_text()
    table = region(text, plan.TABLE_REGION)
    assert table is not None, "cluster/README.md has no <!-- sizing-table:start --> region"
    assert table == plan.sizing_table_markdown(), (
        "run `python -m dem_ray.plan --write cluster/README.md`"
    )


def test_the_estimate_is_within_25_percent_of_the_measured_peak_at_tiny_size(tmp_path):
    """A real fine-tune step (AdamW, accumulate_gradients) and a real evaluator
    (ResidentMerge + token_nll), each in a fresh child (benchmarks/plan_accuracy.py)."""
    out = tmp_path / "accuracy.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "plan_accuracy.py"), "--size", "tiny",
         "--threads", "1", "--variants", "train-fp32,eval-fp32", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for name, figure in json.loads(out.read_text())["variants"].items():
        assert 0.75 <= figure["ratio"] <= 1.25, (name, figure)
