"""Tests for dem_ray.core.merge_methods: ties, DARE and per-block coefficients, checked exactly.

The reference below is written from the papers' definitions in float64 and calls none
of the library's arithmetic: TIES-Merging (Yadav et al. 2023) trims each vector to its
top `density` by magnitude, elects a sign per element and averages the agreeing
entries; DARE (Yu et al. 2023) drops entries with probability 1 - density and rescales
the rest. The resident merge and `merge_to_dir` must both equal it, and each other.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dem_ray.core import merge as merge_module
from dem_ray.core.merge import LazyTensors, MergeError, ResidentMerge, merge_to_dir
from dem_ray.core.merge_methods import METHODS, check_method, dare_mask, prepare
from dem_ray.core.vectors import save_tensors
from dem_ray.models.tiny import make_tiny_model, synthetic_corpus

VARIANTS = {
    "llama_tied": ("llama", True, 2),
    "llama_untied": ("llama", False, 2),
    "gpt2": ("gpt2", True, 2),
    "llama4": ("llama", False, 4),  # four layers: groups of two layers each
}
MAIN = ("llama_tied", "llama_untied", "gpt2")
DENSITY = {"linear": 1.0, "ties": 0.3, "dare_linear": 0.7, "dare_ties": 0.5}
NAMES = ["numbers", "letters", "code"]
K = 3


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    texts = synthetic_corpus("numbers", 30, seed=2) + synthetic_corpus("letters", 30, seed=2)
    return {
        name: make_tiny_model(root / name, texts, architecture=a, tie_embeddings=t, layers=n)
        for name, (a, t, n) in VARIANTS.items()
    }


@pytest.fixture(scope="module")
def saved(bases, tmp_path_factory) -> dict[str, tuple[dict, list[dict], list[Path]]]:
    """Per variant: the base state, k random vectors, and those vectors saved to files."""
    root = tmp_path_factory.mktemp("vectors")
    out = {}
    for variant, base in bases.items():
        state = load_file(str(base / "model.safetensors"))
        gen = torch.Generator().manual_seed(len(variant))
        vectors = [
            {n: torch.randn(t.shape, generator=gen) * 0.05 for n, t in sorted(state.items())}
            for _ in range(K)
        ]
        paths = [root / variant / f"{name}.safetensors" for name in NAMES]
        for v, p in zip(vectors, paths, strict=True):
            save_tensors(v, p)
        out[variant] = (state, vectors, paths)
    return out


def load(path: Path):
    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


# -- the reference, from the papers' definitions ----------------------------------------


def ref_trim(v: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the ceil(density * n) largest |v| (ties with the threshold kept)."""
    flat = v.reshape(-1)
    keep = math.ceil(Fraction(str(density)) * flat.numel())
    threshold = flat.abs().sort(descending=True).values[keep - 1]
    return torch.where((flat.abs() >= threshold) & (flat != 0), flat, 0.0).view(v.shape)


def ref_mask(shape, density: float, seed: int, dataset: str, name: str) -> torch.Tensor:
    """The documented DARE seeding rule, re-derived: sha256 of 'seed/dataset/tensor'."""
    digest = hashlib.sha256(f"{seed}/{dataset}/{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") % 2**63)
    return (torch.rand(math.prod(shape), generator=gen, dtype=torch.float32) < density).view(shape)


def ref_prepare(v, method, density, seed, dataset, name) -> torch.Tensor:
    v = v.double()
    if method == "ties":
        return ref_trim(v, density)
    if method.startswith("dare"):
        return v * ref_mask(v.shape, density, seed, dataset, name) / density
    return v


def ref_disjoint(ts: list[torch.Tensor], w: list[float]) -> torch.Tensor:
    """Sign election, then the weighted mean of the agreeing entries, times sum(w)."""
    gamma = torch.sign(sum(wi * t for wi, t in zip(w, ts, strict=True)))
    agree = [((t != 0) & (torch.sign(t) == gamma)).double() for t in ts]
    num = sum(wi * a * t for wi, a, t in zip(w, agree, ts, strict=True))
    den = sum(wi * a for wi, a in zip(w, agree, strict=True))
    return torch.where(den != 0, num * sum(w) / torch.where(den != 0, den, 1.0), 0.0)


def ref_group(name: str, num_layers: int, groups: int) -> int:
    """embed 0, layer l -> 1 + l * G // L, everything else (final norm, untied head) G + 1."""
    layer = re.search(r"\.(?:layers|h)\.(\d+)\.", name)
    if layer:
        return 1 + int(layer.group(1)) * groups // num_layers
    if re.search(r"embed_tokens|wte|wpe", name):
        return 0
    return groups + 1


def reference(state, vectors, weights, method, density, groups=None, seed=0, names=NAMES):
    rows = 1 if groups is None else groups + 2
    num_layers = 1 + max(int(m) for m in re.findall(r"\.(?:layers|h)\.(\d+)\.", " ".join(state)))
    out = {}
    for name, base in state.items():
        g = 0 if groups is None else ref_group(name, num_layers, groups)
        w = [weights[i * rows + g] for i in range(len(vectors))]
        ts = [
            ref_prepare(v[name], method, density, seed, d, name)
            for v, d in zip(vectors, names, strict=True)
        ]
        if method in ("ties", "dare_ties"):
            delta = ref_disjoint(ts, w)
        else:
            delta = sum(wi * t for wi, t in zip(w, ts, strict=True))
        out[name] = base.double() + delta
    return out


def params(model) -> dict[str, torch.Tensor]:
    """The model's unique parameters under the names the checkpoint saves them by."""
    return {n: p.detach() for n, p in model.named_parameters()}


def assert_close(got: dict, want: dict, rtol=1e-5, atol=1e-6) -> None:
    assert set(got) == set(want)
    for name, tensor in got.items():
        assert torch.allclose(tensor.double(), want[name], rtol=rtol, atol=atol), (
            name,
            (tensor.double() - want[name]).abs().max().item(),
        )


def random_weights(groups, seed, low=0.1) -> list[float]:
    rows = 1 if groups is None else groups + 2
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(K * rows, generator=gen, dtype=torch.float64) * (1 - low) + low).tolist()


# -- every method, every architecture, with and without groups ---------------------------


@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("variant", MAIN)
@pytest.mark.parametrize("method", list(METHODS))
def test_method_equals_reference(bases, saved, tmp_path, method, variant, groups) -> None:
    state, vectors, paths = saved[variant]
    density = DENSITY[method]
    weights = random_weights(groups, seed=len(method) + (groups or 0))
    want = reference(state, vectors, weights, method, density, groups)
    assert not torch.allclose(want[next(iter(want))], state[next(iter(want))].double())
    settings = {"method": method, "density": density, "groups": groups, "names": NAMES}

    model = load(bases[variant])
    ResidentMerge(model, vectors, **settings).apply(weights)
    resident = params(model)
    assert_close(resident, want)

    out = tmp_path / "merged"
    merge_to_dir(bases[variant], paths, weights, out, metadata={"trial": 1}, **settings)
    written = load_file(str(out / "model.safetensors"))
    assert_close(written, want)
    for name, tensor in written.items():
        assert torch.allclose(resident[name], tensor, rtol=0, atol=1e-7), name
    record = json.loads((out / "dem_ray_merge.json").read_text())
    assert record["weights"] == weights and record["trial"] == 1
    if method != "linear" or groups is not None:
        assert record["method"] == method and record["density"] == density
        assert record["dare_seed"] == 0 and record["groups"] == groups


def test_prepared_vectors_replace_the_raw_ones(bases, saved) -> None:
    state, vectors, _ = saved["llama_untied"]
    merge = ResidentMerge(load(bases["llama_untied"]), vectors, method="ties", density=0.3)
    assert merge.vectors.shape == (K, merge.live.numel())
    offset, n, shape = merge.slices["model.layers.1.mlp.up_proj.weight"]
    got = merge.vectors[2, offset : offset + n].view(shape)
    want = ref_trim(vectors[2]["model.layers.1.mlp.up_proj.weight"].double(), 0.3)
    assert torch.equal(got.double(), want)
    assert (got != 0).sum().item() == math.ceil(Fraction("0.3") * n)


def test_lazy_vectors_from_files_with_dare(bases, saved) -> None:
    """Names seed the masks: LazyTensors and in-memory dicts give the same merge."""
    state, vectors, paths = saved["gpt2"]
    weights = [0.2, 0.5, 0.3]
    a, b = load(bases["gpt2"]), load(bases["gpt2"])
    settings = {"method": "dare_ties", "density": 0.5, "names": NAMES, "dare_seed": 3}
    ResidentMerge(a, [LazyTensors(p) for p in paths], **settings).apply(weights)
    ResidentMerge(b, vectors, **settings).apply(weights)
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(x, y), name
    assert_close(params(a), reference(state, vectors, weights, "dare_ties", 0.5, seed=3))


def test_bfloat16_vectors_and_small_chunks(bases, saved, monkeypatch) -> None:
    """The mixed-dtype path, in many chunks: ties of the bf16-stored trimmed vectors."""
    state, vectors, _ = saved["llama_tied"]
    monkeypatch.setattr(merge_module, "MIX_CHUNK", 1000)
    weights = random_weights(2, seed=4)
    model = load(bases["llama_tied"])
    merge = ResidentMerge(model, vectors, "bfloat16", method="ties", density=0.3, groups=2)
    assert merge._scratch.chunk == 1000
    merge.apply(weights)
    rounded = [
        {n: ref_trim(t.double(), 0.3).to(torch.bfloat16) for n, t in v.items()} for v in vectors
    ]
    want = {}
    for name, base in state.items():
        g = ref_group(name, 2, 2)
        w = [weights[i * 4 + g] for i in range(K)]
        want[name] = base.double() + ref_disjoint([v[name].double() for v in rounded], w)
    assert_close(params(model), want)


# -- properties of the methods ------------------------------------------------------------


def test_ties_all_agreeing_equals_linear_of_trimmed(bases, saved) -> None:
    """Vectors a_i * u (a_i > 0, powers of two): same signs, same trimmed support."""
    state, _, _ = saved["llama_untied"]
    gen = torch.Generator().manual_seed(21)
    u = {n: torch.randn(t.shape, generator=gen) * 0.05 for n, t in state.items()}
    vectors = [{n: t * a for n, t in u.items()} for a in (0.5, 1.0, 2.0)]
    trimmed = [{n: ref_trim(t.double(), 0.3).float() for n, t in v.items()} for v in vectors]
    weights = [0.4, 0.3, 0.5]  # not summing to 1: the disjoint mean is scaled by sum(w)
    ties, linear = load(bases["llama_untied"]), load(bases["llama_untied"])
    ResidentMerge(ties, vectors, method="ties", density=0.3).apply(weights)
    ResidentMerge(linear, trimmed).apply(weights)
    for (name, x), (_, y) in zip(ties.named_parameters(), linear.named_parameters(), strict=True):
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-7), name
    assert not torch.equal(ties.lm_head.weight, load(bases["llama_untied"]).lm_head.weight)


def test_ties_density_one_single_vector_equals_linear(bases, saved) -> None:
    state, vectors, _ = saved["gpt2"]
    ties, linear = load(bases["gpt2"]), load(bases["gpt2"])
    ResidentMerge(ties, vectors[:1], method="ties", density=1.0).apply([0.7])
    ResidentMerge(linear, vectors[:1]).apply([0.7])
    for (name, x), (_, y) in zip(ties.named_parameters(), linear.named_parameters(), strict=True):
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-7), name


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_density_one_prepare_is_the_identity(method) -> None:
    t = torch.randn(50, 7, generator=torch.Generator().manual_seed(1))
    assert torch.equal(prepare(t, method, 1.0, 0, "numbers", "w"), t)
    assert not torch.equal(prepare(t, method, 0.5, 0, "numbers", "w"), t)


def test_ties_trim_keeps_ties_at_the_threshold_and_no_zeros() -> None:
    t = torch.tensor([0.5, -0.5, 0.1, 0.0, 0.5, -0.2, 0.0, 0.0, 0.0, 0.0])
    # keep ceil(0.2 * 10) = 2, threshold 0.5: all three entries of magnitude 0.5 stay
    assert prepare(t, "ties", 0.2, 0, "d", "w").tolist() == [0.5, -0.5, 0, 0, 0.5, 0, 0, 0, 0, 0]
    # keep 7 of 10 (not 8: 0.7 * 10 is 7.000000000000001 in floats); zeros never kept
    assert (prepare(t, "ties", 0.7, 0, "d", "w") != 0).sum() == 5
    few = torch.tensor([3.0, -1.0, 2.0, 0.5, -4.0, 0.25, 1.5, -0.75, 0.1, 0.2])
    assert (prepare(few, "ties", 0.7, 0, "d", "w") != 0).sum() == 7


def test_dare_masks_are_reproducible_and_seeded_by_name() -> None:
    shape = torch.Size([64, 33])
    first = dare_mask(shape, 0.5, 0, "numbers", "model.layers.0.mlp.up_proj.weight")
    assert torch.equal(
        first, dare_mask(shape, 0.5, 0, "numbers", "model.layers.0.mlp.up_proj.weight")
    )
    assert torch.equal(
        first, ref_mask(shape, 0.5, 0, "numbers", "model.layers.0.mlp.up_proj.weight")
    )
    for other in [
        dare_mask(shape, 0.5, 1, "numbers", "model.layers.0.mlp.up_proj.weight"),
        dare_mask(shape, 0.5, 0, "letters", "model.layers.0.mlp.up_proj.weight"),
        dare_mask(shape, 0.5, 0, "numbers", "model.layers.1.mlp.up_proj.weight"),
    ]:
        assert not torch.equal(first, other)
        assert 0.3 < (first == other).float().mean() < 0.7  # independent draws
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(
        first, dare_mask(shape, 0.5, 0, "numbers", "model.layers.0.mlp.up_proj.weight")
    )


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_kept_fraction_near_density(density) -> None:
    n = 200_000
    t = torch.randn(n, generator=torch.Generator().manual_seed(2)) + 10.0  # never zero
    out = prepare(t, "dare_linear", density, 7, "code", "x")
    kept = out != 0
    sd = math.sqrt(n * density * (1 - density))
    assert abs(kept.sum().item() - n * density) < 6 * sd  # binomial: fails ~1e-9 by chance
    assert torch.allclose(out[kept].double(), t[kept].double() / density, rtol=1e-6)


def test_resident_dare_seed_and_names_change_the_merge(bases, saved) -> None:
    _, vectors, _ = saved["llama_tied"]

    def merged(**kw):
        model = load(bases["llama_tied"])
        ResidentMerge(model, vectors, method="dare_linear", density=0.5, **kw).apply([1, 1, 1])
        return model.model.layers[0].mlp.up_proj.weight.detach().clone()

    same = merged(names=NAMES, dare_seed=0)
    assert torch.equal(same, merged(names=NAMES, dare_seed=0))
    assert not torch.equal(same, merged(names=NAMES, dare_seed=1))
    assert not torch.equal(same, merged(names=["numbers", "letters", "other"], dare_seed=0))
    assert not torch.equal(same, merged(dare_seed=0))  # default names vector0, vector1, ...


# -- per-block coefficients ---------------------------------------------------------------


@pytest.mark.parametrize("vector_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", list(METHODS))
def test_equal_group_weights_equal_the_global_merge(bases, saved, tmp_path, method, vector_dtype):
    state, vectors, paths = saved["llama4"]
    w = [0.25, 0.5, 0.125]
    per_block = [x for x in w for _ in range(2 + 2)]
    settings = {"method": method, "density": DENSITY[method], "names": NAMES}
    a, b = load(bases["llama4"]), load(bases["llama4"])
    ResidentMerge(a, vectors, vector_dtype, **settings).apply(w)
    ResidentMerge(b, vectors, vector_dtype, groups=2, **settings).apply(per_block)
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(x, y), name
    if vector_dtype == "float32":
        merge_to_dir(bases["llama4"], paths, w, tmp_path / "a", **settings)
        merge_to_dir(bases["llama4"], paths, per_block, tmp_path / "b", groups=2, **settings)
        x, y = (load_file(str(tmp_path / d / "model.safetensors")) for d in "ab")
        for name in x:
            assert torch.equal(x[name], y[name]), name


GROUP_OF = {  # llama4, groups=2: layers 0-1 are block0, layers 2-3 block1
    "model.embed_tokens.weight": 0,
    "model.layers.0.self_attn.q_proj.weight": 1,
    "model.layers.1.mlp.down_proj.weight": 1,
    "model.layers.2.input_layernorm.weight": 2,
    "model.layers.3.mlp.up_proj.weight": 2,
    "model.norm.weight": 3,
    "lm_head.weight": 3,
}


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_one_group_weight_changes_only_that_group(bases, saved, method) -> None:
    state, vectors, _ = saved["llama4"]
    model = load(bases["llama4"])
    merge = ResidentMerge(model, vectors, method=method, density=DENSITY[method], groups=2)
    weights = random_weights(2, seed=8)
    merge.apply(weights)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for group in range(4):
        bumped = list(weights)
        bumped[1 * 4 + group] += 0.5  # the second dataset's weight for this group
        merge.apply(bumped)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        expected = {n for n in before if ref_group(n, 4, 2) == group}
        assert changed == expected, group
        assert {n for n, g in GROUP_OF.items() if g == group} <= changed
        assert_close(params(model), reference(state, vectors, bumped, method, DENSITY[method], 2))
    merge.apply(weights)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_block_segments_follow_the_groups(bases, saved) -> None:
    _, vectors, _ = saved["llama4"]
    merge = ResidentMerge(load(bases["llama4"]), vectors, groups=2)
    groups = [g for _, _, g in merge.segments]
    assert all(a != b for a, b in zip(groups, groups[1:], strict=False))  # maximal runs
    assert merge.segments[0][0] == 0 and merge.segments[-1][1] == merge.live.numel()
    assert all(a[1] == b[0] for a, b in zip(merge.segments, merge.segments[1:], strict=False))
    assert merge._wmat.shape == (4, K)


@pytest.mark.parametrize("method", list(METHODS))
def test_apply_does_not_accumulate(bases, saved, method) -> None:
    _, vectors, _ = saved["gpt2"]
    model = load(bases["gpt2"])
    merge = ResidentMerge(model, vectors, method=method, density=DENSITY[method], groups=2)
    w1, w2 = random_weights(2, seed=1), random_weights(2, seed=2)
    merge.apply(w1)
    first = {n: p.detach().clone() for n, p in model.named_parameters()}
    merge.apply(w2)
    assert not torch.equal(
        model.transformer.h[0].mlp.c_fc.weight, first["transformer.h.0.mlp.c_fc.weight"]
    )
    merge.apply(w1)
    for name, param in model.named_parameters():
        assert torch.equal(param, first[name]), name


# -- errors ---------------------------------------------------------------------------------


def test_wrong_weight_counts(bases, saved, tmp_path) -> None:
    _, vectors, paths = saved["gpt2"]
    merge = ResidentMerge(load(bases["gpt2"]), vectors, groups=2)
    with pytest.raises(MergeError) as info:
        merge.apply([0.1] * K)
    message = str(info.value)
    assert "3 weights given, expected 12" in message and "3 vectors x 4 block groups" in message
    assert "embed, block0, block1, head" in message and "dataset-major" in message
    with pytest.raises(MergeError, match="12 weights given for 3 vectors"):
        ResidentMerge(load(bases["gpt2"]), vectors).apply([0.1] * 12)
    with pytest.raises(MergeError, match="3 weights given, expected 12"):
        merge_to_dir(bases["gpt2"], paths, [0.1] * K, tmp_path / "out", groups=2)
    with pytest.raises(MergeError, match="4 weights given for 3 vectors"):
        merge_to_dir(bases["gpt2"], paths, [0.1] * 4, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_negative_weights_refused_by_ties(bases, saved, tmp_path, method) -> None:
    _, vectors, paths = saved["gpt2"]
    merge = ResidentMerge(load(bases["gpt2"]), vectors, method=method, density=0.5)
    with pytest.raises(MergeError, match="non-negative weights.*simplex.*low >= 0"):
        merge.apply([0.5, -0.1, 0.6])
    with pytest.raises(MergeError, match="weight -0.1 is negative"):
        merge_to_dir(bases["gpt2"], paths, [0.5, -0.1, 0.6], tmp_path / "o", method=method)
    ResidentMerge(load(bases["gpt2"]), vectors, method="dare_linear", density=0.5).apply(
        [0.5, -0.1, 0.6]
    )  # the linear methods take any sign


def test_bad_settings(bases, saved, tmp_path) -> None:
    _, vectors, paths = saved["gpt2"]
    model = load(bases["gpt2"])
    with pytest.raises(MergeError) as info:
        ResidentMerge(model, vectors, method="slerp")
    assert "unknown merge method 'slerp'" in str(info.value)
    assert "linear, ties, dare_linear, dare_ties" in str(info.value)
    with pytest.raises(MergeError, match="unknown merge method 'Ties'"):
        merge_to_dir(bases["gpt2"], paths, [1, 1, 1], tmp_path / "o", method="Ties")
    for density in (0, 0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(MergeError, match=r"density .* is not in \(0, 1\]"):
            ResidentMerge(model, vectors, method="ties", density=density)
        with pytest.raises(MergeError, match=r"density .* is not in \(0, 1\]"):
            merge_to_dir(bases["gpt2"], paths, [1, 1, 1], tmp_path / "o", density=density)
    with pytest.raises(MergeError, match="groups must be None or a whole number >= 1"):
        ResidentMerge(model, vectors, groups=0)
    with pytest.raises(MergeError, match="names must be 3 dataset names"):
        ResidentMerge(model, vectors, names=["a", "b"])
    with pytest.raises(MergeError, match="not a finite number"):
        ResidentMerge(model, vectors).apply([1.0, float("inf"), 0.0])
    assert check_method("dare_ties", 1).name == "dare_ties"
    assert not (tmp_path / "o").exists()
