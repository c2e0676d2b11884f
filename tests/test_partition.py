"""Evaluators over several GPUs: the layer partition, its device map, and a ResidentMerge
whose buffers are split into parts (one per device), checked on CPU.

On CPU the parts are forced (`buffer_of`) and the "devices" of a map are all `cpu`; a
split merge must equal the one-buffer merge bit for bit, and each part must hold only
its own parameters.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dem_ray.core.merge import MergeError, ResidentMerge, unique_parameters
from dem_ray.core.partition import (
    PartitionError,
    device_of,
    evaluator_device_map,
    meta_model,
    partition_layers,
    piece_of,
    resident_sizes,
)
from dem_ray.models.base import load_model
from dem_ray.models.tiny import make_tiny_model, synthetic_corpus

K = 2
NAMES = ["numbers", "letters"]

# -- partition_layers on hand-made sizes -----------------------------------------------

EVEN = [("e", 10), ("l0", 10), ("l1", 10), ("l2", 10), ("l3", 10), ("n", 1), ("h", 10)]


def test_two_devices_balance_contiguous_blocks() -> None:
    # 30 | 31: the smallest largest block; the earlier device takes the tie's extra layer
    assert partition_layers(EVEN, 2) == {"e": 0, "l0": 0, "l1": 0, "l2": 1, "l3": 1, "n": 1, "h": 1}


def test_three_devices() -> None:
    # 20 | 20 | 21 (a largest block of 20 would need four devices)
    want = {"e": 0, "l0": 0, "l1": 1, "l2": 1, "l3": 2, "n": 2, "h": 2}
    assert partition_layers(EVEN, 3) == want


def test_blocks_balance_bytes_not_piece_counts() -> None:
    sizes = [("e", 50), ("l0", 10), ("l1", 10), ("l2", 10), ("n", 0), ("h", 50)]
    want = {"e": 0, "l0": 1, "l1": 1, "l2": 1, "n": 1, "h": 2}
    assert partition_layers(sizes, 3) == want


def test_tied_head_goes_with_the_embedding() -> None:
    # a tied head holds no bytes of its own: e l0 l1 = 30 | l2 l3 n = 21, head on device 0
    sizes = [*EVEN[:-1], ("h", 0)]
    want = {"e": 0, "l0": 0, "l1": 0, "l2": 1, "l3": 1, "n": 1, "h": 0}
    assert partition_layers(sizes, 2, tied={"h": "e"}) == want
    # any bytes a tied piece has count where its partner is: e + h = 20, l0 -> 30 | 31
    want = {"e": 0, "l0": 0, "l1": 1, "l2": 1, "l3": 1, "n": 1, "h": 0}
    assert partition_layers(EVEN, 2, tied={"h": "e"}) == want


def test_every_device_is_used() -> None:
    # one big piece and three small ones: the small ones still reach the last device
    sizes = [("e", 100), ("l0", 1), ("l1", 1), ("h", 1)]
    assert partition_layers(sizes, 3) == {"e": 0, "l0": 1, "l1": 1, "h": 2}
    assert partition_layers(sizes, 4) == {"e": 0, "l0": 1, "l1": 2, "h": 3}


def test_more_devices_than_pieces() -> None:
    sizes = [("e", 5), ("l0", 5), ("h", 5)]
    assert partition_layers(sizes, 5) == {"e": 0, "l0": 1, "h": 2}


def test_one_device_holds_everything() -> None:
    assert partition_layers(EVEN, 1) == dict.fromkeys(dict(EVEN), 0)
    assert partition_layers([], 3) == {}


def test_largest_block_is_the_smallest_possible() -> None:
    """Against every contiguous split, for small random cases."""
    rng = random.Random(0)
    for _ in range(200):
        n, devices = rng.randint(1, 8), rng.randint(1, 4)
        sizes = [(f"p{i}", rng.choice([0, 1, 3, 10, 40])) for i in range(n)]
        got = partition_layers(sizes, devices)
        order = list(got.values())
        assert order == sorted(order) and order[0] == 0  # contiguous, from device 0
        assert len(set(order)) == min(n, devices)  # every device used while pieces last
        assert set(order) == set(range(min(n, devices)))
        largest = max(sum(s for (name, s) in sizes if got[name] == d) for d in set(order))
        assert largest == brute_force_best([s for _, s in sizes], devices)


def brute_force_best(weights: list[int], devices: int) -> int:
    n = len(weights)
    best = sum(weights)
    for cuts in range(min(devices, n)):
        for where in itertools.combinations(range(1, n), cuts):
            bounds = [0, *where, n]
            best = min(best, max(sum(weights[a:b]) for a, b in itertools.pairwise(bounds)))
    return best


@pytest.mark.parametrize(
    ("sizes", "devices", "tied", "match"),
    [
        (EVEN, 0, None, "num_devices"),
        (EVEN, 1.5, None, "num_devices"),
        ([("a", 1), ("a", 2)], 2, None, "unique"),
        ([("a", -1)], 2, None, "bytes"),
        (EVEN, 2, {"h": "x"}, "both be in sizes"),
        (EVEN, 2, {"h": "e", "e": "h"}, "cycle"),
    ],
)
def test_bad_partition_arguments(sizes, devices, tied, match) -> None:
    with pytest.raises(PartitionError, match=match):
        partition_layers(sizes, devices, tied)


# -- sizes and device maps of real (tiny) models ---------------------------------------


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    texts = synthetic_corpus("numbers", 30, seed=5) + synthetic_corpus("letters", 30, seed=5)
    variants = {"tied": ("llama", True), "untied": ("llama", False), "gpt2": ("gpt2", True)}
    return {
        name: make_tiny_model(root / name, texts, architecture=a, tie_embeddings=t, layers=4)
        for name, (a, t) in variants.items()
    }


def test_piece_of() -> None:
    assert piece_of("model.layers.12.mlp.up_proj.weight") == "model.layers.12"
    assert piece_of("transformer.h.0.attn.c_attn.bias") == "transformer.h.0"
    assert piece_of("model.embed_tokens.weight") is None


@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_resident_sizes_of_a_llama(bases, variant) -> None:
    model = load_model(bases[variant])
    sizes, tied = resident_sizes(model, K, "bfloat16")
    layers = [f"model.layers.{i}" for i in range(4)]
    names = ["model.embed_tokens", *layers, "model.norm", "model.rotary_emb", "lm_head"]
    assert [name for name, _ in sizes] == names
    per_element = 4 + 4 + K * 2  # float32 live and base, k bfloat16 vectors
    params = dict(model.named_parameters())

    def cost(prefix: str) -> int:
        return per_element * sum(p.numel() for n, p in params.items() if n.startswith(prefix))

    got = dict(sizes)
    for layer in layers:
        assert got[layer] == cost(layer + ".")
    assert got["model.embed_tokens"] == cost("model.embed_tokens.")
    assert got["model.norm"] == cost("model.norm.")
    buffers = sum(b.numel() * b.element_size() for b in model.model.rotary_emb.buffers())
    assert got["model.rotary_emb"] == buffers > 0
    if variant == "tied":
        assert tied == {"lm_head": "model.embed_tokens"} and got["lm_head"] == 0
    else:
        assert tied == {} and got["lm_head"] == cost("lm_head.")
    # the same from the meta device, built from the directory's config alone
    assert resident_sizes(meta_model(bases[variant]), K, "bfloat16") == (sizes, tied)


def test_resident_sizes_of_a_gpt2(bases) -> None:
    sizes, tied = resident_sizes(meta_model(bases["gpt2"]), K)
    assert [name for name, _ in sizes] == [
        "transformer.wte",
        "transformer.wpe",
        *(f"transformer.h.{i}" for i in range(4)),
        "transformer.ln_f",
        "lm_head",
    ]
    assert tied == {"lm_head": "transformer.wte"}


@pytest.mark.parametrize("variant", ["tied", "untied", "gpt2"])
def test_device_map_covers_every_tensor(bases, variant) -> None:
    device_map = evaluator_device_map(bases[variant], 2, k=K, vector_dtype="bfloat16")
    assert set(device_map.values()) == {"cuda:0", "cuda:1"}
    model = meta_model(bases[variant])
    for name, _ in [*model.named_parameters(), *model.named_buffers()]:
        device_of(name, device_map)  # every tensor has a device
    embed = next(n for n in device_map if n.endswith(("embed_tokens", "wte")))
    assert device_map[embed] == "cuda:0"
    assert device_map["lm_head"] == ("cuda:0" if variant != "untied" else "cuda:1")
    three = evaluator_device_map(model, 3, k=K, devices=["a", "b", "c"])
    assert list(dict.fromkeys(three.values())) == ["a", "b", "c"]  # contiguous from the first
    with pytest.raises(PartitionError, match="device names"):
        evaluator_device_map(model, 3, devices=["a", "b"])


def test_device_of_reads_a_map_as_accelerate_does() -> None:
    device_map = {"model.layers.1": 0, "model.layers.10": 1, "lm_head": 1}
    assert device_of("model.layers.1.mlp.weight", device_map) == 0
    assert device_of("model.layers.10.mlp.weight", device_map) == 1
    with pytest.raises(KeyError):
        device_of("model.layers.2.mlp.weight", device_map)


@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_model_loaded_with_a_device_map_scores_as_the_whole_one(bases, variant) -> None:
    device_map = evaluator_device_map(bases[variant], 2, k=K, devices=["cpu", "cpu"])
    split, whole = load_model(bases[variant], device_map=device_map), load_model(bases[variant])
    rows = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(split.eval()(input_ids=rows).logits, whole.eval()(input_ids=rows).logits)
    if variant == "tied":
        assert split.lm_head.weight is split.model.embed_tokens.weight


# -- ResidentMerge in parts -----------------------------------------------------------


def random_vectors(base: Path, seed: int) -> list[dict[str, torch.Tensor]]:
    state = load_file(str(base / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    return [
        {n: 0.02 * torch.randn(t.shape, generator=gen) for n, t in state.items()} for _ in NAMES
    ]


def forced_parts(model: torch.nn.Module, parts: int, how: str) -> dict[str, int]:
    """Parameter name -> part: `partition`'s contiguous blocks, or round robin."""
    if how == "partition":
        sizes, tied = resident_sizes(model, K)
        index = partition_layers(sizes, parts, tied)
        return {name: device_of(name, index) for name in unique_parameters(model)}
    return {name: i % parts for i, name in enumerate(unique_parameters(model))}


SETTINGS = {
    "linear": {"method": "linear"},
    "ties": {"method": "ties", "density": 0.3},
    "dare": {"method": "dare_linear", "density": 0.7, "dare_seed": 2},
    "ties_groups": {"method": "ties", "density": 0.5, "groups": 2},
    "linear_groups": {"method": "linear", "groups": 2},
}


def weights_for(settings: dict) -> list[float]:
    rows = 1 if settings.get("groups") is None else settings["groups"] + 2
    rng = random.Random(len(settings))
    return [round(rng.uniform(0.1, 0.9), 3) for _ in range(K * rows)]


@pytest.mark.parametrize("how", ["partition", "round_robin"])
@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("variant", ["tied", "untied"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_merge_in_parts_equals_one_buffer(bases, setting, variant, parts, how) -> None:
    base, settings = bases[variant], {**SETTINGS[setting], "names": NAMES}
    vectors = random_vectors(base, seed=parts)
    weights = weights_for(settings)
    whole = load_model(base)
    ResidentMerge(whole, vectors, "bfloat16", **settings).apply(weights)
    model = load_model(base)
    split = forced_parts(model, parts, how)
    merge = ResidentMerge(model, vectors, "bfloat16", buffer_of=split, **settings)
    assert len(merge.parts) == parts
    merge.apply(weights)
    for (name, got), (_, want) in zip(
        model.named_parameters(), whole.named_parameters(), strict=True
    ):
        assert torch.equal(got, want), name
    assert_parts_hold_only_their_parameters(merge, model, split)


def assert_parts_hold_only_their_parameters(merge, model, split) -> None:
    params = dict(model.named_parameters())
    uniques = unique_parameters(model)
    for i, part in enumerate(merge.parts):
        mine = [name for name in uniques if split[name] == i]
        total = sum(params[name].numel() for name in mine)
        assert part.key == i and part.live.numel() == total
        assert part.base.shape == (total,) and part.vectors.shape == (merge.k, total)
        assert part.segments[-1][1] == total  # the segments cover exactly this part
        start, end = part.live.data_ptr(), part.live.data_ptr() + total * part.live.element_size()
        for name in mine:
            assert merge.part_of[name] == i
            assert start <= params[name].data_ptr() < end or params[name].numel() == 0, name


def test_parts_keep_slices_load_state_and_zero_vectors(bases) -> None:
    base = bases["tied"]
    state = load_file(str(base / "model.safetensors"))
    model = load_model(base)
    merge = ResidentMerge(model, [], buffer_of=forced_parts(model, 2, "partition"))
    other = {n: t + 1 for n, t in state.items()}
    merge.load_state(other)
    for name, tensor in other.items():
        offset, n, shape = merge.slices[name]
        got = merge.parts[merge.part_of[name]].live[offset : offset + n].view(shape)
        assert torch.equal(got, tensor), name
        assert torch.equal(model.get_parameter(name), tensor), name
    merge.apply([])  # no vectors: back to theta_0 on every part
    for name, tensor in state.items():
        assert torch.equal(model.get_parameter(name), tensor), name
    with pytest.raises(MergeError, match="cover every parameter"):
        merge.load_state({"model.norm.weight": state["model.norm.weight"]})
    with pytest.raises(MergeError, match="2 parts"):
        _ = merge.live
    assert merge.devices == [torch.device("cpu")]


def test_a_single_part_keeps_the_flat_buffers(bases) -> None:
    model = load_model(bases["untied"])
    merge = ResidentMerge(model, random_vectors(bases["untied"], 0), names=NAMES)
    assert len(merge.parts) == 1 and merge.live is merge.parts[0].live
    assert merge.vectors.shape == (K, merge.live.numel()) and merge._scratch is not None


def test_a_part_must_sit_on_one_device(bases) -> None:
    model = load_model(bases["untied"])
    model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight, device="meta"))
    with pytest.raises(MergeError, match="2 devices"):
        ResidentMerge(model, [], buffer_of=lambda name: "all")
    with pytest.raises(MergeError, match="no part for parameter"):
        ResidentMerge(load_model(bases["untied"]), [], buffer_of={})
