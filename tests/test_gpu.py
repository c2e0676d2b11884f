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


def _split_test_vectors(base_dir, k: int = 2) -> list[dict[str, torch.Tensor]]:
    base = load_tensors(base_dir / "model.safetensors")
    gen = torch.Generator().manual_seed(5)
    return [
        {n: 0.02 * torch.randn(t.shape, generator=gen) for n, t in base.items()} for _ in range(k)
    ]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("tied", [True, False])
def test_model_split_over_two_gpus_merges_on_each(tmp_path, tied):
    """Blocks of layers on two GPUs, each merging its own: the same weights and logits as
    the whole model merged on one GPU, and each GPU's buffers hold only its layers."""
    from dem_ray.core.merge import ResidentMerge, unique_parameters
    from dem_ray.core.partition import device_of, evaluator_device_map
    from dem_ray.models.base import load_model
    from dem_ray.models.tiny import make_tiny_model, synthetic_corpus

    texts = synthetic_corpus("numbers", 40, seed=3) + synthetic_corpus("letters", 40, seed=3)
    base = make_tiny_model(tmp_path / "base", texts, layers=4, tie_embeddings=tied)
    vectors = _split_test_vectors(base)
    weights = [0.3, 0.6]
    device_map = evaluator_device_map(base, 2, k=2, vector_dtype="bfloat16")
    assert set(device_map.values()) == {"cuda:0", "cuda:1"}
    split = load_model(base, device_map=device_map).eval()
    merge = ResidentMerge(split, vectors, "bfloat16")
    assert merge.devices == [torch.device("cuda:0"), torch.device("cuda:1")]
    params = dict(split.named_parameters())
    for name, param in params.items():
        assert str(param.device) == device_of(name, device_map), name
    for i, part in enumerate(merge.parts):
        mine = [n for n in unique_parameters(split) if merge.part_of[n] == i]
        assert {device_of(n, device_map) for n in mine} == {str(part.device)}
        total = sum(params[n].numel() for n in mine)
        assert part.live.numel() == total and part.vectors.shape == (2, total)
        assert part.base.device == part.vectors.device == part.device
    merge.apply(weights)

    whole = load_model(base, "cuda:0").eval()
    ResidentMerge(whole, vectors, "bfloat16").apply(weights)
    for (name, got), (_, want) in zip(split.named_parameters(), whole.named_parameters(),
                                      strict=True):  # fmt: skip
        assert torch.equal(got.cpu(), want.cpu()), name
    rows = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = split(input_ids=rows.to("cuda:0")).logits.float().cpu()
        want = whole(input_ids=rows.to("cuda:0")).logits.float().cpu()
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_merge_in_forced_parts_on_one_gpu_is_bit_identical(tiny_base):
    """Two parts on one GPU (what each GPU of a split does): the same bits as one buffer."""
    from dem_ray.core.merge import ResidentMerge, unique_parameters
    from dem_ray.models.base import load_model

    vectors = _split_test_vectors(tiny_base)
    weights = [0.4, 0.5]
    for method, density in (("linear", 1.0), ("ties", 0.3), ("dare_linear", 0.7)):
        whole = load_model(tiny_base, "cuda")
        ResidentMerge(whole, vectors, "bfloat16", method=method, density=density).apply(weights)
        split = load_model(tiny_base, "cuda")
        parts = {n: i % 2 for i, n in enumerate(unique_parameters(split))}
        merge = ResidentMerge(split, vectors, "bfloat16", method=method, density=density,
                              buffer_of=parts)  # fmt: skip
        assert len(merge.parts) == 2
        merge.apply(weights)
        for (name, got), (_, want) in zip(split.named_parameters(), whole.named_parameters(),
                                          strict=True):  # fmt: skip
            assert torch.equal(got, want), (method, name)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_evaluator_spread_over_two_gpus_scores_as_one(tiny_base, vectors_and_shards):
    """`evaluator.gpus_per_actor: 2`: the actor's model in two blocks of layers, merged on
    each GPU, scores a candidate as the model on one GPU does."""
    vectors, shards = vectors_and_shards
    weights = [0.2, 0.5, 0.3]
    one = Evaluator(str(tiny_base), vectors, shards, batch_size=4, device="cuda")
    two = Evaluator(str(tiny_base), vectors, shards, batch_size=4, device="cuda", spread_gpus=2)
    assert len(two.merge.devices) == 2 and len(one.merge.devices) == 1
    a, b = one.evaluate(weights)["nll"], two.evaluate(weights)["nll"]
    for name in shards:
        assert b[name][1] == a[name][1]
        assert b[name][0] == pytest.approx(a[name][0], rel=1e-5)
