"""Tests for dem_ray.core.vectors and dem_ray.core.merge: the core arithmetic, checked exactly.

v_i = theta_i - theta_0, and every merged model must equal theta_0 + sum_i w_i v_i for
every parameter (tied embeddings included), whether merged in place or written to disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from dem_ray.core.merge import (
    LazyTensors,
    MergeError,
    ResidentMerge,
    merge_to_dir,
    unique_parameters,
)
from dem_ray.core.vectors import (
    VectorError,
    check_compatible,
    compute_vector,
    load_tensors,
    save_tensors,
    tensor_index,
)
from dem_ray.models.tiny import make_tiny_model, synthetic_corpus

VARIANTS = {
    "llama_tied": ("llama", True),
    "llama_untied": ("llama", False),
    "gpt2": ("gpt2", True),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    texts = synthetic_corpus("numbers", 30, seed=2) + synthetic_corpus("letters", 30, seed=2)
    return {
        name: make_tiny_model(root / name, texts, architecture=arch, tie_embeddings=tie)
        for name, (arch, tie) in VARIANTS.items()
    }


def load(path: Path):
    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def base_state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def random_vectors(state: dict[str, torch.Tensor], k: int, seed: int, scale: float = 0.05):
    gen = torch.Generator().manual_seed(seed)
    return [
        {name: torch.randn(t.shape, generator=gen) * scale for name, t in sorted(state.items())}
        for _ in range(k)
    ]


def reference(state, vectors, weights) -> dict[str, torch.Tensor]:
    """theta_0 + sum_i w_i v_i in float64, per saved tensor name."""
    return {
        name: base.double()
        + sum(w * v[name].double() for w, v in zip(weights, vectors, strict=True))
        for name, base in state.items()
    }


def expected_param(ref: dict[str, torch.Tensor], name: str, tied_to: dict[str, str]):
    return ref[tied_to.get(name, name)]


def tied_names(model) -> dict[str, str]:
    """Alias -> the name the checkpoint saves it under (for tied embeddings)."""
    out = {}
    for _first, aliases in unique_parameters(model).items():
        for alias in aliases[1:]:
            out[alias] = aliases[0]
    return out


def assert_model_matches(model, ref, atol=1e-6, rtol=0.0) -> None:
    tied = tied_names(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    assert set(ref) | set(tied) == set(params)
    for name, param in params.items():
        want = expected_param(ref, name, tied)
        assert param.shape == want.shape, name
        assert torch.allclose(param.detach().double(), want, atol=atol, rtol=rtol), (
            name,
            (param.detach().double() - want).abs().max().item(),
        )


# -- compute_vector -------------------------------------------------------------------


def make_finetuned(base: Path, out: Path, seed: int) -> dict[str, torch.Tensor]:
    """A copy of `base` with known per-tensor deltas, saved by save_pretrained."""
    model = load(base)
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            delta = torch.randn(param.shape, generator=gen) * 0.01
            param.add_(delta)
            deltas[name] = delta
    model.save_pretrained(str(out))
    return deltas


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compute_vector_round_trip(bases, tmp_path: Path, variant) -> None:
    base = bases[variant]
    ft = tmp_path / "ft"
    deltas = make_finetuned(base, ft, seed=11)
    out = tmp_path / "vec" / "v.safetensors"
    compute_vector(base, ft, out)
    vector = load_tensors(out)
    b, f = base_state(base), load_file(str(ft / "model.safetensors"))
    assert set(vector) == set(b) == set(f)
    for name in b:
        assert vector[name].dtype == torch.float32
        assert torch.equal(vector[name], f[name] - b[name]), name
        # and it is the delta that was added (up to float32 rounding of base + delta)
        assert torch.allclose(vector[name], deltas[name], atol=1e-6), name
    with safe_open(str(out), framework="pt") as fh:
        meta = fh.metadata()
    assert meta == {"base": str(base), "finetuned": str(ft), "dtype": "float32"}
    assert [p.name for p in out.parent.iterdir()] == ["v.safetensors"]


def test_compute_vector_bfloat16(bases, tmp_path: Path) -> None:
    base = bases["llama_untied"]
    ft = tmp_path / "ft"
    make_finetuned(base, ft, seed=3)
    out = tmp_path / "v.safetensors"
    compute_vector(base, ft, out, dtype="bfloat16")
    vector = load_tensors(out)
    b, f = base_state(base), load_file(str(ft / "model.safetensors"))
    for name in b:
        assert vector[name].dtype == torch.bfloat16
        assert torch.equal(vector[name], (f[name] - b[name]).to(torch.bfloat16)), name


def test_compute_vector_sharded_base(bases, tmp_path: Path) -> None:
    """Tensors spread over several files are matched by name, not by file."""
    state = base_state(bases["gpt2"])
    names = sorted(state)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({n: state[n] for n in names[:5]}, str(sharded / "a.safetensors"))
    save_file({n: state[n] for n in names[5:]}, str(sharded / "b.safetensors"))
    ft = tmp_path / "ft"
    ft.mkdir()
    bumped = {n: t + 0.5 for n, t in state.items()}
    save_file(bumped, str(ft / "model.safetensors"))
    index = tensor_index(sharded)
    assert index[names[0]].name == "a.safetensors" and index[names[-1]].name == "b.safetensors"
    out = tmp_path / "v.safetensors"
    compute_vector(sharded, ft, out)
    vector = load_tensors(out)
    for name in names:
        assert torch.equal(vector[name], bumped[name] - state[name]), name


def two_dirs(tmp_path: Path, base: dict, other: dict) -> tuple[Path, Path]:
    b, o = tmp_path / "base", tmp_path / "other"
    b.mkdir()
    o.mkdir()
    save_file(base, str(b / "model.safetensors"))
    save_file(other, str(o / "model.safetensors"))
    return b, o


BASE = {"layer.a": torch.zeros(2, 3), "layer.b": torch.ones(4), "layer.c": torch.ones(1)}


def test_check_compatible_accepts_same_layout(tmp_path: Path) -> None:
    b, o = two_dirs(tmp_path, BASE, {k: v + 1 for k, v in BASE.items()})
    index = check_compatible(b, o)
    assert index == {k: o / "model.safetensors" for k in BASE}


def test_check_compatible_shape_differs(tmp_path: Path) -> None:
    b, o = two_dirs(tmp_path, BASE, {**BASE, "layer.b": torch.ones(5)})
    with pytest.raises(VectorError) as info:
        check_compatible(b, o)
    message = str(info.value)
    assert "'layer.b'" in message and "[5]" in message and "[4]" in message
    assert str(o) in message


def test_check_compatible_dtype_differs(tmp_path: Path) -> None:
    b, o = two_dirs(tmp_path, BASE, {**BASE, "layer.a": torch.zeros(2, 3, dtype=torch.float16)})
    with pytest.raises(VectorError, match="'layer.a'"):
        check_compatible(b, o)


def test_check_compatible_missing_tensor(tmp_path: Path) -> None:
    other = {k: v for k, v in BASE.items() if k != "layer.c"}
    b, o = two_dirs(tmp_path, BASE, other)
    with pytest.raises(VectorError) as info:
        check_compatible(b, o)
    assert "missing ['layer.c']" in str(info.value)


def test_check_compatible_extra_tensor(tmp_path: Path) -> None:
    b, o = two_dirs(tmp_path, BASE, {**BASE, "head.extra": torch.ones(3)})
    with pytest.raises(VectorError) as info:
        check_compatible(b, o)
    assert "unexpected ['head.extra']" in str(info.value)


def test_no_safetensors_files(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(VectorError, match="no \\*.safetensors"):
        tensor_index(tmp_path / "empty")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_compute_vector_refuses_non_finite(tmp_path: Path, bad) -> None:
    other = {k: v.clone() for k, v in BASE.items()}
    other["layer.b"][2] = bad
    b, o = two_dirs(tmp_path, BASE, other)
    out = tmp_path / "v.safetensors"
    with pytest.raises(VectorError) as info:
        compute_vector(b, o, out)
    assert "'layer.b'" in str(info.value) and "NaN or Inf" in str(info.value)
    assert not out.exists()


# -- save_tensors / load_tensors ------------------------------------------------------


def test_save_tensors_atomic_and_metadata(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "x.safetensors"
    t = torch.arange(6.0).reshape(2, 3).t()  # non-contiguous
    save_tensors({"t": t}, path, {"name": "x", "numbers": [1, 2]})
    assert [p.name for p in path.parent.iterdir()] == ["x.safetensors"]
    assert torch.equal(load_tensors(path)["t"], t)
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata() == {"name": "x", "numbers": "[1, 2]"}


def test_save_tensors_failure_leaves_old_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "x.safetensors"
    save_tensors({"t": torch.ones(3)}, path)
    old = path.read_bytes()

    from dem_ray.core.safetensors_io import TensorWriter

    def boom(self, name, tensor):
        self._fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(TensorWriter, "write", boom)
    with pytest.raises(OSError, match="disk full"):
        save_tensors({"t": torch.zeros(3)}, path)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_save_tensors_failure_without_old_file(tmp_path: Path, monkeypatch) -> None:
    from dem_ray.core.safetensors_io import TensorWriter

    def boom(self, name, tensor):
        raise KeyboardInterrupt

    monkeypatch.setattr(TensorWriter, "write", boom)
    with pytest.raises(KeyboardInterrupt):
        save_tensors({"t": torch.zeros(3)}, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_load_tensors_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.safetensors"
    with pytest.raises(VectorError, match="absent.safetensors: cannot be read as safetensors"):
        load_tensors(path)
    with pytest.raises(VectorError, match="absent.safetensors: cannot be read as safetensors"):
        LazyTensors(path)


def damaged_file(tmp_path: Path, how: str) -> Path:
    path = tmp_path / "bad.safetensors"
    if how == "garbage":
        path.write_bytes(b"\x00" * 3)
    else:
        save_tensors({"t": torch.ones(100)}, path)
        path.write_bytes(path.read_bytes()[:-50])
    return path


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_load_tensors_damaged_file(tmp_path: Path, how) -> None:
    path = damaged_file(tmp_path, how)
    with pytest.raises(VectorError, match="bad.safetensors: cannot be read as safetensors"):
        load_tensors(path)


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_lazy_tensors_damaged_file(tmp_path: Path, how) -> None:
    path = damaged_file(tmp_path, how)
    with pytest.raises(VectorError, match="bad.safetensors: cannot be read as safetensors"):
        LazyTensors(path)


def test_lazy_tensors_mapping(tmp_path: Path) -> None:
    path = tmp_path / "v.safetensors"
    save_tensors({"a": torch.ones(2), "b": torch.zeros(3)}, path)
    lazy = LazyTensors(path)
    assert len(lazy) == 2 and set(lazy) == {"a", "b"}
    assert torch.equal(lazy["b"], torch.zeros(3))
    assert "a" in lazy and "c" not in lazy
    with pytest.raises(KeyError):
        lazy["c"]


# -- ResidentMerge --------------------------------------------------------------------


def test_unique_parameters_tied_and_untied(bases) -> None:
    tied = unique_parameters(load(bases["llama_tied"]))
    assert tied["model.embed_tokens.weight"] == ["model.embed_tokens.weight", "lm_head.weight"]
    untied = unique_parameters(load(bases["llama_untied"]))
    assert untied["model.embed_tokens.weight"] == ["model.embed_tokens.weight"]
    assert untied["lm_head.weight"] == ["lm_head.weight"]
    gpt2 = unique_parameters(load(bases["gpt2"]))
    assert gpt2["transformer.wte.weight"] == ["transformer.wte.weight", "lm_head.weight"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resident_apply_equals_reference(bases, variant) -> None:
    state = base_state(bases[variant])
    model = load(bases[variant])
    vectors = random_vectors(state, 3, seed=5)
    merge = ResidentMerge(model, vectors)
    gen = torch.Generator().manual_seed(9)
    for _ in range(3):
        weights = (torch.rand(3, generator=gen, dtype=torch.float64) * 2 - 0.5).tolist()
        merge.apply(weights)
        assert_model_matches(model, reference(state, vectors, weights))
    if VARIANTS[variant][1]:
        assert model.lm_head.weight is model.get_input_embeddings().weight
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    else:
        assert not torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)


def test_resident_tied_counts_embedding_once(bases) -> None:
    state = base_state(bases["llama_tied"])
    model = load(bases["llama_tied"])
    merge = ResidentMerge(model, random_vectors(state, 2, seed=1))
    assert merge.live.numel() == sum(t.numel() for t in state.values())
    assert merge.vectors.shape == (2, merge.live.numel())
    assert merge.slices["lm_head.weight"] == merge.slices["model.embed_tokens.weight"]


def test_resident_tied_vector_under_lm_head_name(bases) -> None:
    """A vector that stores the tied tensor under its alias is used for it too."""
    state = base_state(bases["llama_tied"])
    model = load(bases["llama_tied"])
    vectors = random_vectors(state, 1, seed=4)
    renamed = dict(vectors[0])
    renamed["lm_head.weight"] = renamed.pop("model.embed_tokens.weight")
    ResidentMerge(model, [renamed]).apply([0.5])
    assert_model_matches(model, reference(state, vectors, [0.5]))


@pytest.mark.parametrize("variant", ["llama_tied", "gpt2"])
def test_resident_zero_weights_restore_base_exactly(bases, variant) -> None:
    state = base_state(bases[variant])
    model = load(bases[variant])
    merge = ResidentMerge(model, random_vectors(state, 3, seed=6))
    merge.apply([0.7, -0.2, 1.3])
    merge.apply([0.0, 0.0, 0.0])
    tied = tied_names(model)
    for name, param in model.named_parameters(remove_duplicate=False):
        assert torch.equal(param.detach(), state[tied.get(name, name)]), name


def test_resident_apply_does_not_accumulate(bases) -> None:
    state = base_state(bases["llama_untied"])
    model = load(bases["llama_untied"])
    vectors = random_vectors(state, 3, seed=7)
    merge = ResidentMerge(model, vectors)
    w1, w2 = [0.9, 0.1, -0.4], [0.2, 0.3, 0.5]
    merge.apply(w2)
    direct = {n: p.detach().clone() for n, p in model.named_parameters()}
    merge.apply(w1)
    assert not torch.equal(model.lm_head.weight, direct["lm_head.weight"])
    merge.apply(w2)
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), direct[name]), name
    assert_model_matches(model, reference(state, vectors, w2))


@pytest.mark.parametrize("variant", ["llama_tied", "gpt2"])
def test_resident_forward_equals_fresh_model(bases, variant) -> None:
    state = base_state(bases[variant])
    model = load(bases[variant])
    vectors = random_vectors(state, 3, seed=8, scale=0.02)
    weights = [0.5, 0.25, -0.3]
    ResidentMerge(model, vectors).apply(weights)
    ref = reference(state, vectors, weights)
    fresh = load(bases[variant])
    tied = tied_names(fresh)
    with torch.no_grad():
        for name, param in fresh.named_parameters():
            param.copy_(ref[tied.get(name, name)].float())
    ids = torch.randint(
        0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, fresh(input_ids=ids).logits
        base_logits = load(bases[variant])(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, base_logits, atol=1e-3)  # the merge changed the model


def test_resident_bfloat16_vectors_within_tolerance(bases) -> None:
    state = base_state(bases["llama_tied"])
    model = load(bases["llama_tied"])
    vectors = random_vectors(state, 3, seed=10)
    weights = [0.3, 0.6, 0.1]
    merge = ResidentMerge(model, vectors, vector_dtype="bfloat16")
    assert merge.vectors.dtype == torch.bfloat16
    assert merge.live.dtype == torch.float32
    merge.apply(weights)
    # bf16 keeps 8 bits of mantissa: |error| <= sum_i |w_i| |v_i| 2^-8 (+ float32 rounding).
    max_v = max(v.abs().max().item() for vec in vectors for v in vec.values())
    atol = sum(abs(w) for w in weights) * max_v * 2**-8 + 1e-6
    assert_model_matches(model, reference(state, vectors, weights), atol=atol)
    merge.apply([0.0, 0.0, 0.0])
    assert torch.equal(model.model.embed_tokens.weight.detach(), state["model.embed_tokens.weight"])


def test_resident_bfloat16_does_not_round_weights(bases) -> None:
    state = base_state(bases["llama_untied"])
    model = load(bases["llama_untied"])
    # Vectors exactly representable in bf16: storing them in bf16 loses nothing.
    vectors = [
        {n: t.to(torch.bfloat16).float() for n, t in v.items()}
        for v in random_vectors(state, 2, seed=12)
    ]
    weights = [0.3, 0.7]
    ResidentMerge(model, vectors, vector_dtype="bfloat16").apply(weights)
    assert_model_matches(model, reference(state, vectors, weights), atol=1e-6)


def test_resident_wrong_number_of_weights(bases) -> None:
    state = base_state(bases["gpt2"])
    merge = ResidentMerge(load(bases["gpt2"]), random_vectors(state, 2, seed=1))
    with pytest.raises(MergeError, match="3 weights given for 2 vectors"):
        merge.apply([0.1, 0.2, 0.3])
    with pytest.raises(MergeError, match="1 weights given for 2 vectors"):
        merge.apply([0.1])


def test_resident_without_vectors_scores_checkpoints(bases) -> None:
    """The baseline's evaluator holds no vectors: it only swaps whole checkpoints in."""
    model = load(bases["gpt2"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    merge = ResidentMerge(model, [])
    assert merge.k == 0
    other = {k: v + 1.0 for k, v in base_state(bases["gpt2"]).items()}
    merge.load_state(other)
    for name, tensor in other.items():
        assert torch.equal(model.state_dict()[name], tensor)
    merge.apply([])  # back to the base
    for name, param in model.named_parameters():
        assert torch.equal(param, state[name])
    with pytest.raises(MergeError, match="1 weights given for 0 vectors"):
        merge.apply([1.0])


def test_resident_vector_shape_mismatch(bases) -> None:
    state = base_state(bases["llama_untied"])
    vectors = random_vectors(state, 2, seed=1)
    vectors[1]["lm_head.weight"] = torch.zeros(3, 3)
    with pytest.raises(VectorError, match="vector 1: tensor 'lm_head.weight' has shape"):
        ResidentMerge(load(bases["llama_untied"]), vectors)


def test_resident_vector_missing_tensor(bases) -> None:
    state = base_state(bases["llama_untied"])
    vectors = random_vectors(state, 2, seed=1)
    del vectors[0]["model.norm.weight"]
    with pytest.raises(
        VectorError, match="vector 0 has no tensor for parameter 'model.norm.weight'"
    ):
        ResidentMerge(load(bases["llama_untied"]), vectors)


def test_resident_lazy_vectors_from_files(bases, tmp_path: Path) -> None:
    state = base_state(bases["gpt2"])
    vectors = random_vectors(state, 2, seed=13)
    paths = []
    for i, v in enumerate(vectors):
        paths.append(tmp_path / f"v{i}.safetensors")
        save_tensors(v, paths[-1])
    model = load(bases["gpt2"])
    ResidentMerge(model, [LazyTensors(p) for p in paths]).apply([0.4, 0.6])
    assert_model_matches(model, reference(state, vectors, [0.4, 0.6]))


@pytest.mark.parametrize("variant", ["llama_tied", "llama_untied"])
def test_load_state_exact(bases, variant) -> None:
    state = base_state(bases[variant])
    model = load(bases[variant])
    merge = ResidentMerge(model, random_vectors(state, 2, seed=14))
    merge.apply([0.5, 0.5])
    other = random_vectors(state, 1, seed=15, scale=1.0)[0]
    merge.load_state(other)
    tied = tied_names(model)
    for name, param in model.named_parameters(remove_duplicate=False):
        assert torch.equal(param.detach(), other[tied.get(name, name)]), name
    merge.apply([0.0, 0.0])  # the base is still there underneath
    for name, param in model.named_parameters(remove_duplicate=False):
        assert torch.equal(param.detach(), state[tied.get(name, name)]), name


def test_load_state_errors(bases) -> None:
    state = base_state(bases["llama_untied"])
    merge = ResidentMerge(load(bases["llama_untied"]), random_vectors(state, 1, seed=1))
    with pytest.raises(MergeError, match="'nope.weight' is not a parameter"):
        merge.load_state({**state, "nope.weight": torch.zeros(1)})
    with pytest.raises(MergeError, match="'model.norm.weight' has shape"):
        merge.load_state({**state, "model.norm.weight": torch.zeros(3)})
    partial = {n: t for n, t in state.items() if n != "lm_head.weight"}
    with pytest.raises(MergeError, match="does not cover every parameter"):
        merge.load_state(partial)


# -- merge_to_dir ---------------------------------------------------------------------


def saved_vectors(state, tmp_path: Path, k: int, seed: int) -> tuple[list, list[Path]]:
    vectors = random_vectors(state, k, seed=seed)
    paths = [tmp_path / "vectors" / f"v{i}.safetensors" for i in range(k)]
    for v, p in zip(vectors, paths, strict=True):
        save_tensors(v, p)
    return vectors, paths


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merge_to_dir(bases, tmp_path: Path, variant) -> None:
    base = bases[variant]
    state = base_state(base)
    vectors, paths = saved_vectors(state, tmp_path, 3, seed=16)
    weights = [0.25, 0.5, -0.125]
    out = tmp_path / "merged" / "model"
    from dem_ray.models.base import TOKENIZER_FILES

    side = [base / name for name in TOKENIZER_FILES]
    merge_to_dir(base, paths, weights, out, side_files=side, metadata={"trial": 7})
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "dem_ray_merge.json"} <= names
    assert "tokenizer_config.json" in names
    assert [p.name for p in out.parent.iterdir()] == ["model"]  # no temp dirs left
    assert json.loads((out / "dem_ray_merge.json").read_text()) == {
        "weights": weights,
        "method": "linear",
        "density": 1.0,
        "dare_seed": 0,
        "groups": None,
        "trial": 7,
    }
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (base / "config.json").read_text()
    )
    ref = reference(state, vectors, weights)
    written = load_file(str(out / "model.safetensors"))
    assert set(written) == set(state)
    for name, tensor in written.items():
        assert tensor.dtype == torch.float32
        assert torch.allclose(tensor.double(), ref[name], atol=1e-6, rtol=0), name
    loaded = load(out)
    assert_model_matches(loaded, ref)
    if VARIANTS[variant][1]:
        assert torch.equal(loaded.lm_head.weight, loaded.get_input_embeddings().weight)
        embed = "transformer.wte.weight" if variant == "gpt2" else "model.embed_tokens.weight"
        assert torch.allclose(loaded.lm_head.weight.double(), ref[embed], atol=1e-6, rtol=0)


def test_merge_to_dir_matches_resident(bases, tmp_path: Path) -> None:
    base = bases["llama_tied"]
    state = base_state(base)
    vectors, paths = saved_vectors(state, tmp_path, 2, seed=17)
    weights = [0.6, 0.4]
    merge_to_dir(base, paths, weights, tmp_path / "out")
    model = load(base)
    ResidentMerge(model, [LazyTensors(p) for p in paths]).apply(weights)
    written = load(tmp_path / "out")
    for (name, a), (_, b) in zip(model.named_parameters(), written.named_parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name


def test_merge_to_dir_replaces_existing(bases, tmp_path: Path) -> None:
    base = bases["gpt2"]
    state = base_state(base)
    vectors, paths = saved_vectors(state, tmp_path, 2, seed=18)
    out = tmp_path / "out"
    merge_to_dir(base, paths, [1.0, 0.0], out)
    merge_to_dir(base, paths, [0.0, 1.0], out)
    written = load_file(str(out / "model.safetensors"))
    ref = reference(state, vectors, [0.0, 1.0])
    for name, tensor in written.items():
        assert torch.allclose(tensor.double(), ref[name], atol=1e-6, rtol=0), name
    record = json.loads((out / "dem_ray_merge.json").read_text())
    assert record["weights"] == [0.0, 1.0] and record["method"] == "linear"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "vectors"]


def test_merge_to_dir_errors(bases, tmp_path: Path) -> None:
    base = bases["gpt2"]
    state = base_state(base)
    _, paths = saved_vectors(state, tmp_path, 2, seed=19)
    out = tmp_path / "out"
    with pytest.raises(MergeError, match="1 weights given for 2 vectors"):
        merge_to_dir(base, paths, [1.0], out)
    with pytest.raises(MergeError, match="not a finite number"):
        merge_to_dir(base, paths, [1.0, float("nan")], out)
    partial = dict(load_file(str(paths[1])))
    del partial["transformer.ln_f.bias"]
    save_file(partial, str(paths[1]))
    with pytest.raises(MergeError, match="no tensor 'transformer.ln_f.bias'"):
        merge_to_dir(base, paths, [0.5, 0.5], out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vectors"]


def test_merge_to_dir_end_to_end_from_finetunes(bases, tmp_path: Path) -> None:
    """compute_vector then merge_to_dir with weight 1 on one vector gives that fine-tune."""
    base = bases["llama_tied"]
    ft = tmp_path / "ft"
    make_finetuned(base, ft, seed=20)
    vec = tmp_path / "v.safetensors"
    compute_vector(base, ft, vec)
    merge_to_dir(base, [vec], [1.0], tmp_path / "out")
    got, want = (
        load_file(str(tmp_path / "out" / "model.safetensors")),
        load_file(str(ft / "model.safetensors")),
    )
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6, rtol=0), name
