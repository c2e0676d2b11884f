"""The evaluator without Ray: slices of the validation shards, merge caching, autocast."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from dem_ray.core.vectors import load_tensors
from dem_ray.ray.evaluator import Evaluator


@pytest.fixture(scope="module")
def evaluator(tiny_base, tmp_path_factory) -> Evaluator:
    root = tmp_path_factory.mktemp("evaluator")
    base = load_tensors(tiny_base / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    vectors = []
    for i in range(2):
        vec = {k: 0.02 * torch.randn(t.shape, generator=generator) for k, t in base.items()}
        vectors.append(str(root / f"v{i}.safetensors"))
        save_file(vec, vectors[-1])
    shards = {}
    for name, count in (("a", 7), ("b", 5)):
        rows = torch.randint(0, 300, (count, 16), generator=generator, dtype=torch.int32)
        shards[name] = str(root / f"{name}.safetensors")
        save_file({"input_ids": rows}, shards[name])
    return Evaluator(str(tiny_base), vectors, shards, batch_size=3, device="cpu")


def test_slices_add_up_to_the_whole(evaluator):
    whole = evaluator.evaluate([0.3, 0.7])
    parts = [evaluator.evaluate([0.3, 0.7], part, 3) for part in range(3)]
    assert sum(p["tokens"] for p in parts) == whole["tokens"] == (7 + 5) * 15
    for name in ("a", "b"):
        assert sum(p["nll"][name][1] for p in parts) == whole["nll"][name][1]
        total = sum(p["nll"][name][0] for p in parts)
        assert total == pytest.approx(whole["nll"][name][0], rel=1e-6)
    # Slice 2 of 3 holds rows 2 and 5 of 'a' and row 2 of 'b'.
    assert parts[2]["nll"]["a"][1] == 2 * 15 and parts[2]["nll"]["b"][1] == 15


def test_merge_runs_only_when_the_weights_change(evaluator):
    evaluator.evaluate([0.1, 0.2])
    before = evaluator.merges
    for part in range(4):
        evaluator.evaluate([0.1, 0.2], part, 4)
    assert evaluator.merges == before
    first = evaluator.evaluate([0.5, 0.5], 1, 4)
    evaluator.evaluate([0.1, 0.2], 0, 4)  # another trial's slice in between
    again = evaluator.evaluate([0.5, 0.5], 1, 4)
    assert evaluator.merges == before + 3
    assert again["nll"] == first["nll"]


def test_scoring_a_checkpoint_forgets_the_live_weights(evaluator, tiny_base):
    weighted = evaluator.evaluate([0.4, 0.1])
    evaluator.evaluate_checkpoint(str(tiny_base))
    assert evaluator.evaluate([0.4, 0.1])["nll"] == weighted["nll"]


def test_slice_out_of_range(evaluator):
    with pytest.raises(ValueError, match="slice 3 of 3"):
        evaluator.evaluate([0.5, 0.5], 3, 3)


def test_bfloat16_autocast_is_close_to_float32(evaluator):
    plain = evaluator.evaluate([0.2, 0.3])
    evaluator.autocast = torch.bfloat16
    try:
        cast = evaluator.evaluate([0.2, 0.3])
    finally:
        evaluator.autocast = None
    for name in ("a", "b"):
        assert cast["nll"][name][1] == plain["nll"][name][1]
        assert cast["nll"][name][0] == pytest.approx(plain["nll"][name][0], rel=3e-2)
        assert cast["nll"][name][0] != plain["nll"][name][0]
