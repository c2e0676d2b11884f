"""Low-rank (LoRA) distribution vectors against PEFT itself: the evaluators' merge, the
merged directory (bit for bit the same), the file's size, per-block weights, bad
adapters, a fine-tune scored on its own, and the diagnostics. Tiny models, no Ray."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dem_ray.core import lowrank
from dem_ray.core.diagnostics import vector_diagnostics
from dem_ray.core.lowrank import (
    AdapterState,
    LowRankMerge,
    is_adapter_dir,
    is_lowrank,
    lora_vector,
    lowrank_vectors,
    merge_lowrank_to_dir,
)
from dem_ray.core.merge import LazyTensors, ResidentMerge
from dem_ray.core.merge_methods import MergeError
from dem_ray.core.safetensors_io import TensorReader
from dem_ray.core.vectors import VectorError, compute_vector
from dem_ray.models.base import copy_tokenizer, load_model

pytest.importorskip("peft")

R, ALPHA = 4, 8
WEIGHTS = [0.7, -0.4]


def base_weights(base_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(Path(base_dir).glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def live_weights(model: torch.nn.Module, names) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {n: state[n].detach().clone() for n in names}


def make_adapter(base_dir: Path, root: Path, seed: int, **config) -> dict:
    """A PEFT adapter on `base_dir` with random (nonzero) factors, saved as an adapter dir;
    also its `merge_and_unload()` model, saved as a model dir, and that model's weights."""
    from peft import LoraConfig, get_peft_model

    model = load_model(base_dir)
    settings = {"r": R, "lora_alpha": ALPHA, "target_modules": "all-linear", **config}
    peft_model = get_peft_model(model, LoraConfig(**settings))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:  # PEFT starts B at zero: a real fine-tune has moved it
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    adapter = root / f"adapter{seed}"
    peft_model.save_pretrained(str(adapter))
    copy_tokenizer(base_dir, adapter)
    merged = peft_model.merge_and_unload()
    merged_dir = root / f"merged{seed}"
    merged.save_pretrained(str(merged_dir), safe_serialization=True)
    names = base_weights(base_dir)
    state = merged.state_dict()
    return {"adapter": adapter, "model": merged_dir,
            "theta": {n: state[n].detach().clone() for n in names}}  # fmt: skip


@pytest.fixture(scope="module")
def bases(tiny_base, tmp_path_factory) -> dict[str, Path]:
    out = {"float32": tiny_base}
    bf16 = tmp_path_factory.mktemp("bf16") / "base"
    load_model(tiny_base).to(torch.bfloat16).save_pretrained(str(bf16), safe_serialization=True)
    copy_tokenizer(tiny_base, bf16)
    out["bfloat16"] = bf16
    return out


@pytest.fixture(scope="module")
def case(bases, tmp_path_factory):
    """(base dtype, variant) -> base dir, 2 adapters, their PEFT merges, low-rank vectors."""
    cache = {}
    variants = {
        "all-linear": {},
        "q,v": {"target_modules": ["q_proj", "v_proj"]},
        "rslora": {"use_rslora": True},
    }

    def get(dtype: str = "float32", variant: str = "all-linear", vector_dtype: str = "float32"):
        key = (dtype, variant, vector_dtype)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"lr-{dtype}-{variant.replace(',', '')}")
            base = bases[dtype]
            tuned = [make_adapter(base, root, seed, **variants[variant]) for seed in (1, 2)]
            paths = []
            for i, t in enumerate(tuned):
                paths.append(root / f"v{i}.safetensors")
                lora_vector(base, t["adapter"], paths[-1], dtype=vector_dtype)
            cache[key] = {"base": base, "tuned": tuned, "vectors": paths, "root": root}
        return cache[key]

    return get


def assert_within_bf16(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, name: str):
    """|got - want| within a bfloat16 rounding of each term that made them (`scale`: the
    sum of their magnitudes): PEFT rounds each theta_i (and its delta) to bfloat16."""
    error = (got.double() - want.double()).abs()
    bound = 2**-7 * scale.double() + 1e-6
    assert bool((error <= bound).all()), f"{name}: off by {float((error - bound).max())}"


def expected_merge(base: dict, thetas: list[dict], weights: list[float]) -> dict:
    return {
        n: b.double()
        + sum(w * (t[n].double() - b.double()) for w, t in zip(weights, thetas, strict=True))
        for n, b in base.items()
    }


# ---- (a) exactness against PEFT ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", ["all-linear", "q,v", "rslora"])
def test_live_merge_is_base_plus_weighted_peft_deltas(case, dtype, variant):
    c = case(dtype, variant)
    base = base_weights(c["base"])
    model = load_model(c["base"])
    merge = LowRankMerge(model, [LazyTensors(p) for p in c["vectors"]])
    merge.apply(WEIGHTS)
    live = live_weights(model, base)
    expected = expected_merge(base, [t["theta"] for t in c["tuned"]], WEIGHTS)
    moved = 0
    for name, tensor in live.items():
        assert tensor.dtype == base[name].dtype, name
        want = expected[name]
        if dtype == "float32":  # PEFT sums B A then scales; both float32, each rounded once
            atol = 1e-6 * max(1.0, float(want.abs().max()))
            torch.testing.assert_close(tensor.double(), want, rtol=1e-5, atol=atol, msg=name)
        else:  # PEFT rounds each theta_i to bfloat16; the merge rounds once
            b = base[name].double().abs()
            scale = want.abs() + sum(abs(w) * (t["theta"][name].double().abs() + b)
                                     for w, t in zip(WEIGHTS, c["tuned"], strict=True))  # fmt: skip
            assert_within_bf16(tensor, want, scale, name)
        moved += not torch.equal(tensor, base[name])
    adapted = 2 * (2 if variant == "q,v" else 7)  # 2 layers x the adapted linears
    assert moved == adapted
    assert set(merge.devices) == {torch.device("cpu")} and merge.k == 2 and merge.model is model


# ---- (b) the merged directory, bit for bit -------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("vector_dtype", ["float32", "bfloat16"])
def test_merged_dir_equals_the_live_weights_bit_for_bit(
    case, dtype, vector_dtype, tmp_path, monkeypatch
):
    from transformers import AutoModelForCausalLM

    # row blocks smaller than the tiny model's 32 and 64 rows, the last one ragged
    monkeypatch.setattr(lowrank, "ROWS", 12)
    c = case(dtype, "all-linear", vector_dtype)
    base = base_weights(c["base"])
    model = load_model(c["base"])
    merge = LowRankMerge(model, [LazyTensors(p) for p in c["vectors"]], vector_dtype)
    merge.apply(WEIGHTS)
    live = live_weights(model, base)
    threads = torch.get_num_threads()
    out = tmp_path / "merged"
    try:
        torch.set_num_threads(1)  # the merge stage need not run with the evaluators' threads
        merge_lowrank_to_dir(c["base"], c["vectors"], WEIGHTS, out, metadata={"datasets": ["a", "b"]},
                             vector_dtype=vector_dtype, max_shard_size="20KB")  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    written = {}
    for shard in shards:
        written.update(load_file(str(shard)))
    assert written.keys() == base.keys()
    for name in base:
        assert torch.equal(written[name], live[name]), name
    record = json.loads((out / "dem_ray_merge.json").read_text())
    assert record["weights"] == WEIGHTS and record["method"] == "linear"
    assert (out / "config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(str(out))
    for name, tensor in live_weights(loaded, base).items():
        assert torch.equal(tensor, live[name]), name


# ---- (c) the vector file holds factors only ---------------------------------------------------
@pytest.mark.parametrize("vector_dtype", ["float32", "bfloat16"])
def test_vector_file_scales_with_rank_not_model(case, vector_dtype):
    c = case("float32", "all-linear", vector_dtype)
    base = base_weights(c["base"])
    size = torch.empty((), dtype=getattr(torch, vector_dtype)).element_size()
    for path in c["vectors"]:
        assert is_lowrank(path)
        with TensorReader(path) as reader:
            header, metadata = reader.header, reader.metadata
        expected_bytes = 0
        params = {key.rsplit("::", 1)[0] for key in header}
        assert len(params) == 2 * 7  # every linear layer of both decoder layers
        for param in params:
            d_out, d_in = base[param].shape
            assert header[f"{param}::A"]["shape"] == [R, d_in]
            assert header[f"{param}::B"]["shape"] == [d_out, R]
            expected_bytes += R * (d_in + d_out) * size
        data = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())
        assert data == expected_bytes
        assert metadata["format"] == "lowrank" and metadata["rank"] == str(R)
        assert json.loads(metadata["base_shapes"]) == {n: list(t.shape) for n, t in base.items()}
        dense = sum(base[p].numel() for p in params) * size
        assert data < dense / 2
    assert lowrank_vectors(c["vectors"]) and not lowrank_vectors([])


# ---- (d) per-block weights ---------------------------------------------------------------------
def test_block_groups_weight_the_right_layers(case, tmp_path):
    c = case("float32")
    base = base_weights(c["base"])
    thetas = [t["theta"] for t in c["tuned"]]
    # groups=2 over 2 layers: embed, block0 (layer 0), block1 (layer 1), head
    weights = [0.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.0, 0.0]  # vector 0 in layer 1, vector 1 in 0
    model = load_model(c["base"])
    merge = LowRankMerge(model, [LazyTensors(p) for p in c["vectors"]], groups=2)
    merge.apply(weights)
    live = live_weights(model, base)
    for name, tensor in live.items():
        if ".layers.0." in name:
            want = expected_merge({name: base[name]}, [{name: t[name]} for t in thetas], [0, 0.5])
        elif ".layers.1." in name:
            want = expected_merge({name: base[name]}, [{name: t[name]} for t in thetas], [1.0, 0])
        else:
            want = {name: base[name].double()}
        torch.testing.assert_close(tensor.double(), want[name], rtol=1e-5, atol=1e-6, msg=name)
    merge_lowrank_to_dir(c["base"], c["vectors"], weights, tmp_path / "m", groups=2)
    written = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert all(torch.equal(written[n], live[n]) for n in base)
    with pytest.raises(MergeError, match="8 weights|expected 8"):
        merge.apply(WEIGHTS)


# ---- (e) bad input -----------------------------------------------------------------------------
def test_dora_adapter_is_refused(bases, tmp_path):
    made = make_adapter(bases["float32"], tmp_path, 5, use_dora=True)
    with pytest.raises(VectorError, match=r"adapter_config\.json: key 'use_dora'"):
        lora_vector(bases["float32"], made["adapter"], tmp_path / "v.safetensors")
    assert not (tmp_path / "v.safetensors").exists()


@pytest.mark.parametrize(
    ("key", "value"),
    [("bias", "all"), ("modules_to_save", ["lm_head"]), ("rank_pattern", {"q_proj": 8}),
     ("alpha_pattern", {"v_proj": 4})],
)  # fmt: skip
def test_adapters_beyond_plain_lora_are_refused(case, tmp_path, key, value):
    adapter = tmp_path / "adapter"
    shutil.copytree(case("float32")["tuned"][0]["adapter"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config[key] = value
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(VectorError, match=rf"adapter_config\.json: key '{key}'"):
        lora_vector(case("float32")["base"], adapter, tmp_path / "v.safetensors")


def _damaged(case, tmp_path, change) -> Path:
    adapter = tmp_path / "adapter"
    shutil.copytree(case("float32")["tuned"][0]["adapter"], adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    change(tensors)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    return adapter


KEY = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"


def test_adapter_for_another_base_is_refused(case, tmp_path):
    def wider(t):
        t[KEY] = torch.zeros(R, 48)

    adapter = _damaged(case, tmp_path, wider)
    base = case("float32")["base"]
    with pytest.raises(VectorError, match=rf"'{KEY}'.*{base}.*another base"):
        lora_vector(base, adapter, tmp_path / "v.safetensors")

    def foreign(t):
        t["base_model.model.model.layers.5.mlp.up_proj.lora_A.weight"] = torch.zeros(R, 32)
        t["base_model.model.model.layers.5.mlp.up_proj.lora_B.weight"] = torch.zeros(64, R)

    adapter = tmp_path / "b"
    shutil.copytree(_damaged(case, tmp_path / "x", foreign), adapter)
    with pytest.raises(VectorError, match=r"layers\.5\.mlp\.up_proj\.weight.*does not have"):
        lora_vector(base, adapter, tmp_path / "v.safetensors")


def test_nan_factor_is_refused_naming_the_tensor(case, tmp_path):
    def nan(t):
        t[KEY][0, 0] = float("nan")

    adapter = _damaged(case, tmp_path, nan)
    with pytest.raises(VectorError, match=rf"adapter_model\.safetensors: tensor '{KEY}' has NaN"):
        lora_vector(case("float32")["base"], adapter, tmp_path / "v.safetensors")
    # and in a vector file, for the evaluators and for merge
    c = case("float32")
    vector = load_file(str(c["vectors"][1]))
    name = "model.layers.0.mlp.up_proj.weight::B"
    vector[name][3, 1] = float("inf")
    bad = tmp_path / "bad.safetensors"
    with TensorReader(c["vectors"][1]) as reader:
        save_file(vector, str(bad), metadata=reader.metadata)
    with pytest.raises(VectorError, match=rf"bad\.safetensors: tensor '{name}' has NaN or Inf"):
        LowRankMerge(load_model(c["base"]), [LazyTensors(c["vectors"][0]), LazyTensors(bad)])
    with pytest.raises(MergeError, match=rf"bad\.safetensors: tensor '{name}' has NaN or Inf"):
        merge_lowrank_to_dir(c["base"], [c["vectors"][0], bad], WEIGHTS, tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_ties_and_dare_need_dense_vectors(case, tmp_path, method):
    c = case("float32")
    vectors = [LazyTensors(p) for p in c["vectors"]]
    with pytest.raises(MergeError, match="search.merge_method: linear.*finetune.method: full"):
        LowRankMerge(load_model(c["base"]), vectors, method=method, density=0.5)
    with pytest.raises(MergeError, match="needs dense distribution vectors"):
        merge_lowrank_to_dir(c["base"], c["vectors"], WEIGHTS, tmp_path / "m", method=method)
    LowRankMerge(load_model(c["base"]), vectors, density=0.5)  # linear ignores density


def test_dense_and_lowrank_vectors_do_not_mix(case, tmp_path):
    c = case("float32")
    dense = tmp_path / "dense.safetensors"
    compute_vector(c["base"], c["tuned"][0]["model"], dense)
    with pytest.raises(VectorError, match="low-rank.*dense.*finetune.method"):
        lowrank_vectors([c["vectors"][0], dense])
    with pytest.raises(VectorError, match="low-rank.*dense"):
        vector_diagnostics([c["vectors"][0], dense], ["a", "b"])
    with pytest.raises(VectorError, match="not a low-rank factor"):
        LowRankMerge(load_model(c["base"]), [LazyTensors(c["vectors"][0]), LazyTensors(dense)])
    with pytest.raises(MergeError, match=r"dense\.safetensors: tensor .* not a low-rank factor"):
        merge_lowrank_to_dir(c["base"], [c["vectors"][0], dense], WEIGHTS, tmp_path / "m")


# ---- (f) a fine-tune scored on its own ----------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_adapter_state_is_peft_merge_and_unload(case, dtype):
    c = case(dtype)
    tuned = c["tuned"][0]
    assert is_adapter_dir(tuned["adapter"]) and not is_adapter_dir(c["base"])
    state = AdapterState(c["base"], tuned["adapter"])
    assert sorted(state) == sorted(tuned["theta"]) and len(state) == len(tuned["theta"])
    base = base_weights(c["base"])
    for name, tensor in state.items():
        want = tuned["theta"][name]
        assert tensor.dtype == want.dtype
        if dtype == "float32":
            torch.testing.assert_close(tensor, want, rtol=1e-5, atol=1e-6, msg=name)
        else:
            scale = want.double().abs() + base[name].double().abs()
            assert_within_bf16(tensor, want, scale, name)
    # into a live low-rank merge, and back: every parameter returns to the merge
    model = load_model(c["base"])
    merge = LowRankMerge(model, [LazyTensors(p) for p in c["vectors"]])
    merge.apply(WEIGHTS)
    before = live_weights(model, state)
    shifted = {n: t + 1 for n, t in base_weights(c["base"]).items()}
    merge.load_state(shifted)
    assert torch.equal(
        live_weights(model, state)["model.norm.weight"], shifted["model.norm.weight"]
    )
    merge.apply(WEIGHTS)
    assert all(torch.equal(t, before[n]) for n, t in live_weights(model, state).items())
    with pytest.raises(MergeError, match="does not cover"):
        merge.load_state({"model.norm.weight": shifted["model.norm.weight"]})


def test_evaluator_scores_lowrank_candidates_and_adapters(case, tmp_path):
    from dem_ray.core.perplexity import token_nll
    from dem_ray.ray.evaluator import Evaluator

    c = case("float32")
    gen = torch.Generator().manual_seed(0)
    shards = {}
    for name in ("a", "b"):
        shards[name] = str(tmp_path / f"{name}.safetensors")
        save_file({"input_ids": torch.randint(0, 300, (4, 16), generator=gen,
                                              dtype=torch.int32)}, shards[name])  # fmt: skip
    spec = {"method": "linear", "density": 0.5, "dare_seed": 0, "groups": None,
            "names": ["a", "b"]}  # fmt: skip
    ev = Evaluator(str(c["base"]), [str(p) for p in c["vectors"]], shards, batch_size=2,
                   device="cpu", merge_spec=spec)  # fmt: skip
    assert isinstance(ev.merge, LowRankMerge)
    first = ev.evaluate(WEIGHTS)["nll"]
    merge_lowrank_to_dir(c["base"], c["vectors"], WEIGHTS, tmp_path / "merged")
    assert ev.evaluate_checkpoint(str(tmp_path / "merged"))["nll"] == first
    alone = ev.evaluate_checkpoint(str(c["tuned"][0]["adapter"]))["nll"]
    peft = load_model(c["tuned"][0]["model"]).eval()
    for name in ("a", "b"):
        rows = load_file(shards[name])["input_ids"]
        assert alone[name][0] == pytest.approx(token_nll(peft, rows, batch_size=2)[0], rel=1e-5)
    assert ev.evaluate(WEIGHTS)["nll"] == first  # the checkpoint is gone again
    dense = Evaluator(str(c["base"]), [], shards, device="cpu")
    assert isinstance(dense.merge, ResidentMerge)


# ---- (g) diagnostics from the factors --------------------------------------------------------
@pytest.mark.parametrize("variant", ["all-linear", "q,v"])
def test_lowrank_diagnostics_equal_dense_diagnostics(case, tmp_path, variant):
    c = case("float32", variant)
    dense = []
    for i, t in enumerate(c["tuned"]):
        dense.append(tmp_path / f"d{i}.safetensors")
        compute_vector(c["base"], t["model"], dense[-1])
    # a third vector: the first adapter again, so a cosine is exactly 1
    paths_low, paths_dense = [*c["vectors"], c["vectors"][0]], [*dense, dense[0]]
    names = ["x", "y", "z"]
    for groups in (1, 2):
        low = vector_diagnostics(paths_low, names, groups=groups)
        ref = vector_diagnostics(paths_dense, names, groups=groups)
        assert low["groups"] == ref["groups"]
        assert low["parameters_by_group"] == ref["parameters_by_group"]
        for n in names:
            assert low["norm"][n] == pytest.approx(ref["norm"][n], rel=1e-5)
        for i in range(3):
            for j in range(3):
                assert low["cosine"][i][j] == pytest.approx(ref["cosine"][i][j], abs=1e-5)
        for group in low["groups"]:
            for n in names:
                want = ref["norm_by_group"][group][n]
                assert low["norm_by_group"][group][n] == pytest.approx(want, rel=1e-5, abs=1e-7)
            for i in range(3):
                for j in range(3):
                    got = low["cosine_by_group"][group][i][j]
                    assert got == pytest.approx(ref["cosine_by_group"][group][i][j], abs=1e-5)
        assert math.isclose(low["cosine"][0][2], 1.0, abs_tol=1e-12)
