"""Sharded, streamed output: `merge.max_shard_size`, HF-style shards and their index, and
sharded checkpoints read by every stage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dem_ray.config import ConfigError, parse_config
from dem_ray.core.merge import MergeError, merge_to_dir
from dem_ray.core.safetensors_io import INDEX_NAME, TensorReader, TensorWriter, plan_shards
from dem_ray.core.sizes import parse_size
from dem_ray.core.vectors import save_tensors
from dem_ray.models.base import TOKENIZER_FILES

K = 3


def tensors_of(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def check_index(model_dir: Path, max_bytes: int) -> dict:
    """A valid HF index: every file it names exists and holds exactly its tensors."""
    index = json.loads((model_dir / INDEX_NAME).read_text())
    assert set(index) == {"metadata", "weight_map"}
    files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == files
    count = len(files)
    assert files == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    total = 0
    for name in files:
        with TensorReader(model_dir / name) as reader:
            held = set(reader.names())
            assert held == {t for t, f in index["weight_map"].items() if f == name}
            sizes = [math.prod(reader.spec(t)[1]) * reader.spec(t)[0].itemsize for t in held]
        total += sum(sizes)
        assert sum(sizes) <= max_bytes or len(sizes) == 1, name  # a big tensor: alone
    assert index["metadata"]["total_size"] == total
    return index


@pytest.fixture(scope="module")
def vector_files(tiny_base, tmp_path_factory) -> list[Path]:
    state = load_file(str(tiny_base / "model.safetensors"))
    gen = torch.Generator().manual_seed(3)
    root = tmp_path_factory.mktemp("shard-vectors")
    paths = []
    for i in range(K):
        path = root / f"v{i}.safetensors"
        save_tensors({n: torch.randn(t.shape, generator=gen) * 0.05 for n, t in state.items()},
                     path)  # fmt: skip
        paths.append(path)
    return paths


def test_merge_to_dir_writes_shards_and_an_index_transformers_loads(
    tiny_base, vector_files, tmp_path
) -> None:
    from transformers import AutoModelForCausalLM

    weights = [0.5, 0.25, -0.125]
    side = [tiny_base / name for name in TOKENIZER_FILES]
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    merge_to_dir(tiny_base, vector_files, weights, whole, side_files=side)
    assert sorted(p.name for p in whole.glob("*.safetensors")) == ["model.safetensors"]
    assert not (whole / INDEX_NAME).exists()  # one file: no index, as HF saves it
    merge_to_dir(tiny_base, vector_files, weights, sharded, side_files=side,
                 max_shard_size="30KB")  # fmt: skip
    assert not (sharded / "model.safetensors").exists()
    index = check_index(sharded, 30_000)
    assert len(set(index["weight_map"].values())) >= 3
    want = tensors_of(whole)
    got = tensors_of(sharded)
    assert set(got) == set(want) == set(index["weight_map"])
    for name in want:
        assert torch.equal(got[name], want[name]), name
    with TensorReader(sorted(sharded.glob("*.safetensors"))[0]) as reader:
        assert reader.metadata["format"] == "pt"  # each shard carries the metadata
    a = AutoModelForCausalLM.from_pretrained(str(sharded)).eval()
    b = AutoModelForCausalLM.from_pretrained(str(whole)).eval()
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    assert torch.equal(a.lm_head.weight, got["model.embed_tokens.weight"])  # tied, stored once
    ids = torch.randint(0, a.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_a_rewrite_with_fewer_shards_leaves_no_stale_file(tiny_base, vector_files, tmp_path):
    out = tmp_path / "m"
    merge_to_dir(tiny_base, vector_files, [0.2, 0.3, 0.5], out, max_shard_size="30KB")
    merge_to_dir(tiny_base, vector_files, [0.2, 0.3, 0.5], out)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / INDEX_NAME).exists()


def test_merge_streams_one_part_at_a_time(tiny_base, vector_files, tmp_path, monkeypatch):
    """Streamed: no tensor of the composite is ever whole; each part is appended as made."""
    from dem_ray.core import merge as merge_module

    monkeypatch.setattr(merge_module, "STREAM_CHUNK", 1000)
    parts: list[int] = []
    append = TensorWriter.append

    def spy(self, name, part):
        parts.append(part.numel())
        return append(self, name, part)

    monkeypatch.setattr(TensorWriter, "append", spy)
    out = tmp_path / "m"
    merge_to_dir(tiny_base, vector_files, [0.2, 0.3, 0.5], out, max_shard_size="30KB")
    assert max(parts) <= 1000
    assert sum(parts) == sum(t.numel() for t in tensors_of(out).values())


def test_plan_shards_as_hugging_face_names_them() -> None:
    f32 = torch.float32
    specs = [("a", f32, (10,)), ("b", f32, (10,)), ("big", f32, (100,)), ("c", f32, (5,))]
    plan = plan_shards(specs, 80)
    assert {f: [n for n, _, _ in s] for f, s in plan.items()} == {
        "model-00001-of-00003.safetensors": ["a", "b"],
        "model-00002-of-00003.safetensors": ["big"],  # larger than the limit: alone
        "model-00003-of-00003.safetensors": ["c"],
    }
    assert list(plan_shards(specs, 10**9)) == ["model.safetensors"]


def test_sizes() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("100MB") == 10**8
    assert parse_size("500KB") == 500_000
    assert parse_size("1.5GiB") == 3 * 2**29
    assert parse_size(" 2 mb ") == 2 * 10**6
    for bad in ("", "5", "GB", "-1MB", "5 parsecs", "0KB", "1e3MB"):
        with pytest.raises(ValueError, match="not a size|less than one byte"):
            parse_size(bad)


def test_writer_appends_parts_in_order(tmp_path) -> None:
    path = tmp_path / "x.safetensors"
    specs = [("a", torch.float32, (2, 3)), ("b", torch.bfloat16, (4,))]
    a = torch.arange(6, dtype=torch.float32).view(2, 3)
    b = torch.arange(4).to(torch.bfloat16)
    with TensorWriter(path, specs) as writer:
        writer.append("a", a.reshape(-1)[:4])
        with pytest.raises(ValueError, match="4 of 6 elements written"):
            writer.append("b", b)
        writer.append("a", a.reshape(-1)[4:])
        writer.write("b", b)
    got = load_file(str(path))
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b)
    with TensorReader(path) as reader:
        assert torch.equal(reader.read_range("a", 2, 5), a.reshape(-1)[2:5])
        buffer = torch.empty(8, dtype=torch.bfloat16)
        assert torch.equal(reader.read_range("b", 1, 3, out=buffer), b[1:3])
        with pytest.raises(ValueError):
            reader.read_range("a", 4, 7)


def test_bad_max_shard_size_is_a_config_error_naming_the_key(tmp_path) -> None:
    raw = {"run_dir": str(tmp_path), "base_model": str(tmp_path),
           "datasets": {"a": "a.jsonl", "b": "b.jsonl"}}  # fmt: skip
    for bad in ("5 parsecs", "GB", "0MB", 5_000_000, True, None, ["5GB"]):
        with pytest.raises(ConfigError, match=r"'merge\.max_shard_size' must be a size such as"):
            parse_config({**raw, "merge": {"max_shard_size": bad}})
    with pytest.raises(ConfigError, match="did you mean 'max_shard_size'"):
        parse_config({**raw, "merge": {"max_shard": "5GB"}})
    assert parse_config(raw).merge.shard_bytes == 5 * 10**9
    assert parse_config({**raw, "merge": {"max_shard_size": "100MB"}}).merge.shard_bytes == 10**8
    with pytest.raises(MergeError, match="max_shard_size"):
        merge_to_dir(tmp_path, [], [], tmp_path / "out", max_shard_size="huge")


def test_max_shard_size_re_runs_nothing(tmp_path) -> None:
    """A resource key: in no stage's hashed settings, so the default changes no input hash."""
    from dem_ray.config import MergeConfig, field_role, result_settings

    assert field_role(MergeConfig.model_fields["max_shard_size"]) == "resource"
    assert result_settings(MergeConfig(max_shard_size="1KB")) == {}


@pytest.fixture(scope="module")
def sharded_run(ray_session, tiny_base, tiny_data, make_config, tmp_path_factory):
    """A whole run whose base is saved in several shard files, and whose fine-tunes and
    merged model are sharded too."""
    from transformers import AutoModelForCausalLM

    from dem_ray.models.base import copy_tokenizer
    from dem_ray.pipeline import Pipeline

    root = tmp_path_factory.mktemp("sharded-run")
    base = root / "base"
    AutoModelForCausalLM.from_pretrained(str(tiny_base)).save_pretrained(
        str(base), max_shard_size="50KB"
    )
    copy_tokenizer(tiny_base, base)
    raw = make_config(root / "run", base, tiny_data, finetune={"max_steps": 4},
                      search={"num_trials": 3, "max_concurrent": 1},
                      merge={"max_shard_size": "60KB"})  # fmt: skip
    config_path = root / "config.json"
    config_path.write_text(json.dumps(raw))
    pipeline = Pipeline(parse_config(raw, source=str(config_path)))
    pipeline.run()
    return pipeline, base


def test_a_sharded_base_goes_through_every_stage(sharded_run) -> None:
    pipeline, base = sharded_run
    assert len(list(base.glob("model-*.safetensors"))) >= 2 and (base / INDEX_NAME).exists()
    assert pipeline.skipped == []
    assert {"base", "search", "merge", "report"} <= set(pipeline.ran)
    assert pipeline.ctx.base_dir == base  # read in place, shards and all
    for name in pipeline.names:
        assert pipeline.manifest.is_recorded(f"finetune/{name}")
        assert pipeline.manifest.is_recorded(f"vectors/{name}")
    report = pipeline.report()
    assert set(report["ppl"]["dem"]) == set(pipeline.names)


def test_fine_tunes_are_sharded_and_vectors_are_their_differences(sharded_run) -> None:
    pipeline, base = sharded_run
    theta0 = tensors_of(base)
    for name in pipeline.names:
        tuned_dir = pipeline.layout.finetune(name)
        check_index(tuned_dir, 60_000)  # fp32 fine-tunes, saved in merge.max_shard_size files
        tuned = tensors_of(tuned_dir)
        vector = load_file(str(pipeline.layout.vector(name)))
        assert set(vector) == set(tuned) == set(theta0)
        for key in theta0:
            assert torch.equal(vector[key], tuned[key].float() - theta0[key].float()), key


def test_the_sharded_merged_dir_is_base_plus_weighted_vectors(sharded_run) -> None:
    from transformers import AutoModelForCausalLM

    pipeline, base = sharded_run
    merged_dir = pipeline.run_dir / "merged"
    check_index(merged_dir, 60_000)
    weights = pipeline.report()["best_weights"]
    theta0 = tensors_of(base)
    merged = tensors_of(merged_dir)
    vectors = {n: load_file(str(pipeline.layout.vector(n))) for n in pipeline.names}
    assert set(merged) == set(theta0)
    for key in theta0:
        expected = theta0[key].double() + sum(weights[n] * vectors[n][key].double()
                                              for n in vectors)  # fmt: skip
        torch.testing.assert_close(merged[key].double(), expected, rtol=0, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    assert torch.equal(model.lm_head.weight, merged["model.embed_tokens.weight"])
    card = merged_dir / "README.md"
    assert card.exists()  # the report wrote its model card beside the shards
