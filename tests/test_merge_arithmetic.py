"""One arithmetic for the evaluators and `merge`: the live weights the search scores are, bit
for bit, the tensors `merge_to_dir` writes for the same weights.

Checked with `torch.equal` on every tensor, for fp32 and bf16 bases, fp32 and bf16 vector
files, vectors held in fp32 or bf16 by the evaluator, every merge method, per-block groups,
small chunks and sharded output; and through the pipeline on a bf16 base, where the
perplexity the search recorded for its best weights is recomputed on `merged/`.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dem_ray.core import merge as merge_module
from dem_ray.core.merge import LazyTensors, ResidentMerge, merge_to_dir
from dem_ray.core.merge_methods import METHODS, combine
from dem_ray.core.vectors import save_tensors
from dem_ray.models.base import TOKENIZER_FILES, load_model, stored_dtype
from dem_ray.models.tiny import make_tiny_model, synthetic_corpus

DENSITY = {"linear": 1.0, "ties": 0.3, "dare_linear": 0.7, "dare_ties": 0.5}
NAMES = ["numbers", "letters", "code"]
K = len(NAMES)


def save_as(src: Path, out: Path, dtype: torch.dtype) -> Path:
    """A copy of the HF directory `src` with its weights in `dtype` (config says so too)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).to(dtype)
    model.save_pretrained(str(out))
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
    return out


@pytest.fixture(scope="module")
def bases(tiny_base, tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama (tied) and a 4-layer untied one, each as fp32 and as bf16."""
    root = tmp_path_factory.mktemp("arith")
    texts = synthetic_corpus("numbers", 30, seed=2) + synthetic_corpus("letters", 30, seed=2)
    untied = make_tiny_model(root / "untied", texts, layers=4, tie_embeddings=False)
    out = {}
    for name, src in (("tied", tiny_base), ("untied", untied)):
        out[f"{name}-float32"] = save_as(src, root / f"{name}-float32", torch.float32)
        out[f"{name}-bfloat16"] = save_as(src, root / f"{name}-bfloat16", torch.bfloat16)
    return out


@pytest.fixture(scope="module")
def vectors(bases, tmp_path_factory) -> dict[tuple[str, str], list[Path]]:
    """Per (model, file dtype): K random vector files, the same values in both dtypes."""
    root = tmp_path_factory.mktemp("arith-vectors")
    out = {}
    for model in ("tied", "untied"):
        state = load_file(str(bases[f"{model}-float32"] / "model.safetensors"))
        gen = torch.Generator().manual_seed(len(model))
        raw = [
            {n: torch.randn(t.shape, generator=gen) * 0.05 for n, t in sorted(state.items())}
            for _ in range(K)
        ]
        for dtype in ("float32", "bfloat16"):
            paths = [root / f"{model}-{name}.{dtype}.safetensors" for name in NAMES]
            for v, p in zip(raw, paths, strict=True):
                save_tensors({n: t.to(getattr(torch, dtype)) for n, t in v.items()}, p)
            out[model, dtype] = paths
    return out


def written_tensors(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def weights_for(groups: int | None, seed: int) -> list[float]:
    rows = 1 if groups is None else groups + 2
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(K * rows, generator=gen, dtype=torch.float64) * 0.8 + 0.05).tolist()


def assert_live_is_written(model: torch.nn.Module, out: Path) -> int:
    """Every written tensor is the live parameter of that name, dtype and bits (so -0.0 is
    not 0.0); the number of tensors compared."""
    live = model.state_dict()
    written = written_tensors(out)
    assert written, f"no weights in {out}"
    for name, tensor in written.items():
        assert tensor.dtype == live[name].dtype, name
        assert torch.equal(bits(tensor), bits(live[name])), name
    return len(written)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


CASES = list(
    itertools.product(
        ["float32", "bfloat16"],  # the base's dtype
        ["float32", "bfloat16"],  # the vector files'
        list(METHODS),
        [None, 2],  # groups
    )
)


@pytest.mark.parametrize(("base_dtype", "file_dtype", "method", "groups"), CASES)
def test_resident_equals_merge_to_dir_bit_for_bit(
    bases, vectors, tmp_path, base_dtype, file_dtype, method, groups
) -> None:
    model_name = "untied" if groups else "tied"
    base = bases[f"{model_name}-{base_dtype}"]
    paths = vectors[model_name, file_dtype]
    spec = {"method": method, "density": DENSITY[method], "groups": groups, "names": NAMES}
    weights = weights_for(groups, seed=len(method))
    model = load_model(base)
    assert next(model.parameters()).dtype == getattr(torch, base_dtype)  # stored, not upcast
    merge = ResidentMerge(model, [LazyTensors(p) for p in paths], **spec)
    merge.apply(weights)
    out = tmp_path / "merged"
    merge_to_dir(base, paths, weights, out, **spec)
    stored = load_file(str(base / "model.safetensors"))
    assert assert_live_is_written(model, out) == len(stored)
    written = written_tensors(out)
    assert all(t.dtype == getattr(torch, base_dtype) for t in written.values())
    assert not torch.equal(written["model.norm.weight"], stored["model.norm.weight"])  # moved


@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["linear", "dare_ties"])
def test_vectors_held_in_bfloat16_round_alike(bases, vectors, tmp_path, base_dtype, method):
    """`evaluator.vector_dtype: bfloat16` over fp32 vector files: merge_to_dir rounds the
    vectors as the evaluator holds them, so the two still agree to the bit."""
    base = bases[f"untied-{base_dtype}"]
    paths = vectors["untied", "float32"]
    spec = {"method": method, "density": DENSITY[method], "groups": 2, "names": NAMES}
    weights = weights_for(2, seed=5)
    model = load_model(base)
    ResidentMerge(model, [LazyTensors(p) for p in paths], "bfloat16", **spec).apply(weights)
    merge_to_dir(base, paths, weights, tmp_path / "m", vector_dtype="bfloat16", **spec)
    live = model.state_dict()
    for name, tensor in written_tensors(tmp_path / "m").items():
        assert torch.equal(bits(tensor), bits(live[name])), name
    record = json.loads((tmp_path / "m" / "dem_ray_merge.json").read_text())
    assert record["vector_dtype"] == "bfloat16"
    # ...and differ from the merge of the unrounded vectors (the rounding is real)
    merge_to_dir(base, paths, weights, tmp_path / "f32", **spec)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(
            written_tensors(tmp_path / "m").values(),
            written_tensors(tmp_path / "f32").values(),
            strict=True,
        )
    )


@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["linear", "ties"])
def test_chunking_and_shards_change_no_bit(
    bases, vectors, tmp_path, monkeypatch, base_dtype, method
) -> None:
    """Tiny chunks on both sides, odd stream parts and several shard files: the same bits
    as the default chunking (each element depends on its own inputs only)."""
    base = bases[f"untied-{base_dtype}"]
    paths = vectors["untied", "bfloat16"]
    spec = {"method": method, "density": DENSITY[method], "groups": 2, "names": NAMES}
    weights = weights_for(2, seed=9)
    default = load_model(base)
    ResidentMerge(default, [LazyTensors(p) for p in paths], **spec).apply(weights)
    monkeypatch.setattr(merge_module, "MIX_CHUNK", 1000)
    monkeypatch.setattr(merge_module, "STREAM_CHUNK", 777)
    small = load_model(base)
    merge = ResidentMerge(small, [LazyTensors(p) for p in paths], **spec)
    assert merge._scratch.chunk == 1000
    merge.apply(weights)
    out = tmp_path / "sharded"
    merge_to_dir(base, paths, weights, out, max_shard_size="40KB", **spec)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2
    want = default.state_dict()
    for name, param in small.state_dict().items():
        assert torch.equal(bits(param), bits(want[name])), name
    for name, tensor in written_tensors(out).items():
        assert torch.equal(bits(tensor), bits(want[name])), name


def test_combine_is_float32_then_cast() -> None:
    """bf16 inputs are upcast, the sum taken in float32 in order, the result rounded once."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(5000, generator=gen).to(torch.bfloat16)
    stacked = (torch.randn(3, 5000, generator=gen) * 0.01).to(torch.bfloat16)
    weights = [0.3, 0.2, 0.5]
    out = torch.empty(5000, dtype=torch.bfloat16)
    combine(base, stacked, weights, "linear", out)
    w = [torch.tensor(x, dtype=torch.float32) for x in weights]
    v = stacked.float()
    acc = v[0] * w[0]
    acc = acc + v[1] * w[1]
    acc = acc + v[2] * w[2]
    want = (base.float() + acc).to(torch.bfloat16)
    assert torch.equal(bits(out), bits(want))
    # not what bf16 arithmetic gives
    in_bf16 = base + stacked[0] * 0.3 + stacked[1] * 0.2 + stacked[2] * 0.5
    assert not torch.equal(out, in_bf16)


def test_resident_keeps_the_base_in_its_own_dtype(bases, vectors) -> None:
    """Memory: theta_0 stays bf16 for a bf16 model (upcast per chunk), scratch is chunk-sized."""
    model = load_model(bases["tied-bfloat16"])
    merge = ResidentMerge(model, [LazyTensors(p) for p in vectors["tied", "bfloat16"]],
                          "bfloat16")  # fmt: skip
    assert merge.base.dtype == merge.live.dtype == torch.bfloat16
    assert merge.vectors.dtype == torch.bfloat16
    scratch = sum(b.numel() * b.element_size() for b in merge._scratch._buffers.values())
    assert scratch <= 6 * 4 * merge_module.MIX_CHUNK
    assert stored_dtype(bases["tied-bfloat16"]) == torch.bfloat16


def test_pipeline_on_a_bf16_base_scores_the_model_it_writes(
    ray_session, tiny_base, tiny_data, make_config, tmp_path
) -> None:
    """A whole run on a bf16 copy of the tiny base: the search's recorded perplexity for its
    best weights is the perplexity of `merged/`, recomputed from the directory."""
    from dem_ray.config import parse_config
    from dem_ray.core.perplexity import perplexity, token_nll
    from dem_ray.data.shards import load_shard
    from dem_ray.pipeline import Pipeline
    from dem_ray.ray.evaluator import sample_rows
    from dem_ray.stages.search import merge_spec

    base = save_as(tiny_base, tmp_path / "bf16-base", torch.bfloat16)
    raw = make_config(tmp_path / "run", base, tiny_data, finetune={"max_steps": 4},
                      search={"num_trials": 3, "max_concurrent": 1})  # fmt: skip
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(raw))
    pipeline = Pipeline(parse_config(raw, source=str(config_path)))
    pipeline.run()
    ctx = pipeline.ctx
    merged = pipeline.run_dir / "merged"
    best = json.loads(ctx.layout.best.read_text())
    weights = [best["weights"][k] for k in ctx.space.keys]

    # The weights: an evaluator's live model after apply(best) is merged/, bit for bit.
    live = load_model(ctx.base_dir)
    assert next(live.parameters()).dtype == torch.bfloat16
    ResidentMerge(live, [LazyTensors(ctx.layout.vector(n)) for n in ctx.names],
                  ctx.cfg.evaluator.vector_dtype, **merge_spec(ctx)).apply(weights)  # fmt: skip
    assert assert_live_is_written(live, merged) > 0

    # The scores: the search's perplexity for these weights, recomputed on merged/.
    model = load_model(merged).eval()
    assert next(model.parameters()).dtype == torch.bfloat16
    ev = ctx.cfg.evaluator
    for name in ctx.names:
        rows, _ = load_shard(ctx.layout.shard(name, "validation"))
        rows = sample_rows(rows, ev.max_validation_sequences, ctx.cfg.finetune.seed)
        nll = token_nll(model, rows.long(), ev.batch_size)
        assert perplexity(*nll) == pytest.approx(best["ppl"][name], rel=1e-4), name
    report = pipeline.report()
    for name in ctx.names:  # the report scored the loaded merged/ on the same rows
        assert report["ppl"]["dem"][name] == pytest.approx(best["ppl"][name], rel=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["linear", "ties"])
def test_cuda_resident_merge_equals_the_cpu_merge_to_dir(bases, vectors, tmp_path, method):
    """combine is elementwise IEEE float32 (no fused multiply-add, no reduction whose order
    depends on the device), so an evaluator on a GPU holds the very bits `merge` writes."""
    base = bases["untied-bfloat16"]
    paths = vectors["untied", "bfloat16"]
    spec = {"method": method, "density": DENSITY[method], "groups": 2, "names": NAMES}
    weights = weights_for(2, seed=11)
    model = load_model(base, device="cuda")
    ResidentMerge(model, [LazyTensors(p) for p in paths], **spec).apply(weights)
    merge_to_dir(base, paths, weights, tmp_path / "m", **spec)
    live = {n: t.cpu() for n, t in model.state_dict().items()}
    for name, tensor in written_tensors(tmp_path / "m").items():
        assert torch.equal(bits(tensor), bits(live[name])), name
