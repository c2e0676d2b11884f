"""Evaluator on CUDA and bf16 vectors: run where a GPU exists, skipped elsewhere."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from dem_ray.core.vectors import load_tensors
from dem_ray.ray.evaluator import Evaluator

pytestmark = pytest.mark.gpu


@pytest.fixture
def vectors_and_shards(tiny_base, tmp_path):
    base = load_tensors(tiny_base / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    paths = []
    for i in range(3):
        vec = {k: 0.01 * torch.randn(t.shape, generator=generator) for k, t in base.items()}
        paths.append(tmp_path / f"v{i}.safetensors")
        save_file(vec, paths[-1])
    rows = torch.randint(0, 300, (6, 32), generator=generator, dtype=torch.int32)
    shard = tmp_path / "val.safetensors"
    save_file({"input_ids": rows}, shard)
    return [str(p) for p in paths], {"a": str(shard), "b": str(shard)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_evaluator_matches_cpu(tiny_base, vectors_and_shards, dtype):
    vectors, shards = vectors_and_shards
    weights = [0.2, 0.5, 0.3]
    results = {}
    for device in ("cpu", "cuda"):
        ev = Evaluator(str(tiny_base), vectors, shards, batch_size=4, vector_dtype=dtype,
                       device=device)  # fmt: skip
        assert ev.device == device
        results[device] = ev.evaluate(weights)["nll"]
    assert results["cuda"]["a"][1] == results["cpu"]["a"][1]
    tol = 1e-4 if dtype == "float32" else 2e-2
    assert results["cuda"]["a"][0] == pytest.approx(results["cpu"]["a"][0], rel=tol)
