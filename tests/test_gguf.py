"""The GGUF base-model path on a tiny Llama that the test writes as a GGUF file itself.

No download: `make_tiny_gguf` writes an F32 GGUF in llama.cpp's layout from a tiny HF
model, so every check compares the conversion against the model it came from.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dem_ray.config import BaseModelSpec, parse_config
from dem_ray.models import base as models
from dem_ray.models.base import ModelError, base_kind, gguf_to_hf_dir
from dem_ray.models.tiny import make_tiny_gguf, synthetic_corpus, write_llama_gguf
from dem_ray.pipeline import Pipeline

SAMPLES = [
    "total = x + 3\nvalue = count + 7",
    "alpha beta gamma 12 34 <|endoftext|> omega",
    "  two leading spaces, ünïcödé and tabs\tend",
]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [t for s in ("numbers", "letters", "code") for t in synthetic_corpus(s, 80, seed=5)]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, texts) -> tuple[Path, Path]:
    """(GGUF file, the HF directory it was written from)."""
    return make_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", texts)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_gguf) -> Path:
    out = tmp_path_factory.mktemp("converted") / "base"
    gguf_to_hf_dir(tiny_gguf[0], out)
    return out


def no_conversion(monkeypatch) -> None:
    """Make any attempt to load a GGUF fail the test, so reuse is proven, not assumed."""

    def fail(path):
        raise AssertionError(f"{path} was converted again")

    monkeypatch.setattr(models, "_load_gguf", fail)


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


# -- the file the test writes ----------------------------------------------------------


def test_written_file_has_llama_metadata_and_gguf_tensor_names(tiny_gguf) -> None:
    import gguf

    reader = gguf.GGUFReader(tiny_gguf[0])
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["llama.embedding_length"].contents() == 64
    assert fields["llama.block_count"].contents() == 2
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "blk.1.attn_q.weight"} <= names
    assert "output.weight" not in names  # tied embeddings, as in SmolLM2
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}
    # q is stored in llama.cpp's interleaved row order, not the HF one.
    source_q = tensors_of(tiny_gguf[1])["model.layers.0.self_attn.q_proj.weight"]
    stored_q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    assert not torch.equal(torch.from_numpy(stored_q.data.copy()), source_q)


# -- gguf_to_hf_dir ------------------------------------------------------------------------


def test_converted_tensors_equal_the_source(tiny_gguf, converted) -> None:
    source, ours = tensors_of(tiny_gguf[1]), tensors_of(converted)
    assert ours.keys() == source.keys()
    for name, tensor in source.items():
        assert ours[name].dtype == torch.float32, name
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_converted_tokenizer_encodes_like_the_source(tiny_gguf, converted) -> None:
    from transformers import AutoTokenizer

    source = AutoTokenizer.from_pretrained(tiny_gguf[1])
    ours = AutoTokenizer.from_pretrained(converted)
    assert len(ours) == len(source)
    assert (ours.eos_token_id, ours.pad_token_id) == (source.eos_token_id, source.pad_token_id)
    for text in SAMPLES:
        ids = source(text)["input_ids"]
        assert ours(text)["input_ids"] == ids, text
        assert ours.decode(ids) == text
    # The special token stays one token, as in the source.
    assert ours("<|endoftext|>")["input_ids"] == [source.eos_token_id]


def test_converted_logits_equal_the_source(tiny_gguf, converted) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gguf[1])
    rows = [tokenizer(t)["input_ids"][:12] for t in SAMPLES]
    batch = torch.tensor([r + [tokenizer.pad_token_id] * (12 - len(r)) for r in rows])
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(tiny_gguf[1]).eval()(batch).logits
        got = AutoModelForCausalLM.from_pretrained(converted).eval()(batch).logits
    assert got.shape == (len(SAMPLES), 12, len(tokenizer))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_second_call_reuses_the_directory(tiny_gguf, converted, monkeypatch) -> None:
    before = (converted / "model.safetensors").stat().st_mtime_ns
    no_conversion(monkeypatch)
    gguf_to_hf_dir(tiny_gguf[0], converted)
    # A touched file (same bytes, new mtime), as after reinstalling a package, is reused too.
    stat = tiny_gguf[0].stat()
    os.utime(tiny_gguf[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    gguf_to_hf_dir(tiny_gguf[0], converted)
    assert (converted / "model.safetensors").stat().st_mtime_ns == before


def test_other_weights_of_the_same_size_are_converted_again(tmp_path, texts, tiny_gguf) -> None:
    out, gguf_path = tmp_path / "base", tmp_path / "model.gguf"
    shutil.copyfile(tiny_gguf[0], gguf_path)
    gguf_to_hf_dir(gguf_path, out)
    other, other_source = make_tiny_gguf(tmp_path / "other.gguf", texts, seed=1)
    assert other.stat().st_size == gguf_path.stat().st_size  # a size marker cannot tell them apart
    shutil.copyfile(other, gguf_path)
    gguf_to_hf_dir(gguf_path, out)
    assert torch.equal(
        tensors_of(out)["model.embed_tokens.weight"],
        tensors_of(other_source)["model.embed_tokens.weight"],
    )


def test_an_incomplete_directory_is_converted_again(tmp_path, tiny_gguf) -> None:
    out = tmp_path / "base"
    gguf_to_hf_dir(tiny_gguf[0], out)
    (out / "model.safetensors").unlink()
    gguf_to_hf_dir(tiny_gguf[0], out)
    assert tensors_of(out).keys() == tensors_of(tiny_gguf[1]).keys()


def test_unknown_architecture_names_the_file(tmp_path, tiny_gguf) -> None:
    path = write_llama_gguf(tiny_gguf[1], tmp_path / "weird.bin", "mamba-like-unknown")
    with pytest.raises(ModelError) as info:
        gguf_to_hf_dir(path, tmp_path / "base")
    assert str(path) in str(info.value)
    assert "mamba-like-unknown" in str(info.value)
    assert not (tmp_path / "base").exists()


@pytest.mark.parametrize("keep", [200, 0.5], ids=["cut-in-header", "cut-in-tensors"])
def test_truncated_file_names_the_file(tmp_path, tiny_gguf, keep) -> None:
    data = tiny_gguf[0].read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(ModelError, match="not cut short") as info:
        gguf_to_hf_dir(path, tmp_path / "base")
    assert str(path) in str(info.value)


# -- base_model forms --------------------------------------------------------------------


def test_declared_kinds_are_taken_as_said(tmp_path, tiny_gguf) -> None:
    no_suffix = tmp_path / "smol-q4"
    shutil.copyfile(tiny_gguf[0], no_suffix)
    assert base_kind(BaseModelSpec(str(no_suffix), "gguf")) == "gguf"
    assert base_kind(BaseModelSpec(str(tiny_gguf[1]), "dir")) == "dir"
    assert base_kind(BaseModelSpec("./looks/like/a/path", "hub")) == "hub"
    assert base_kind(BaseModelSpec("package://dem_ray/models/tiny.py", "gguf")) == "gguf"


def test_plain_strings_keep_their_old_meaning(tmp_path, tiny_gguf) -> None:
    assert base_kind(str(tiny_gguf[0])) == "gguf"
    assert base_kind(str(tmp_path / "not-yet.gguf")) == "gguf"
    assert base_kind(str(tiny_gguf[1])) == "dir"
    assert base_kind("HuggingFaceTB/SmolLM2-135M") == "hub"
    with pytest.raises(ModelError, match="no such file or directory"):
        base_kind(str(tmp_path / "missing"))


@pytest.mark.parametrize(("kind", "what"), [("gguf", "no such file"), ("dir", "no such directory")])
def test_declared_path_that_is_missing(tmp_path, tiny_gguf, kind, what) -> None:
    wrong = tiny_gguf[1] if kind == "gguf" else tiny_gguf[0]  # a dir for gguf, a file for dir
    for location in (str(tmp_path / "missing"), str(wrong)):
        with pytest.raises(ModelError) as info:
            base_kind(BaseModelSpec(location, kind))
        assert f"base_model.{kind} '{location}': {what}" in str(info.value)


# -- the prepare stage -------------------------------------------------------------------


def prepare(raw: dict, force: bool = False) -> Pipeline:
    pipeline = Pipeline(parse_config(raw, source="test.yaml"))
    pipeline.open()
    pipeline.run_command("prepare", force=force)
    return pipeline


@pytest.mark.parametrize("form", ["mapping-without-suffix", "gguf-string"])
def test_prepare_converts_once_into_the_run_dir(
    tmp_path, tiny_gguf, tiny_data, make_config, monkeypatch, form
) -> None:
    if form == "gguf-string":
        base_model = str(tiny_gguf[0])
    else:
        no_suffix = tmp_path / "smol-weights"
        shutil.copyfile(tiny_gguf[0], no_suffix)
        base_model = {"gguf": str(no_suffix)}
    raw = make_config(tmp_path / "run", tiny_gguf[1], tiny_data, base_model=base_model)
    first = prepare(raw)
    base = tmp_path / "run" / "base"
    assert first.ctx.base_dir == base.resolve()
    assert first.ran == ["base", *(f"data/{n}" for n in first.names)]
    for name, tensor in tensors_of(tiny_gguf[1]).items():
        torch.testing.assert_close(tensors_of(base)[name], tensor, rtol=0, atol=1e-6)
    assert load_file(first.layout.shard("code", "train"))["input_ids"].numel() > 0

    no_conversion(monkeypatch)
    again = prepare(raw)
    assert again.ran == [] and "base" in again.skipped
    forced = prepare(raw, force=True)  # reruns the stage; the marker still spares a conversion
    assert "base" in forced.ran
    assert forced.ctx.base_dir == base.resolve()


def test_preflight_refuses_a_missing_declared_gguf(tmp_path, tiny_gguf, tiny_data, make_config):
    missing = tmp_path / "nowhere.q4"
    raw = make_config(tmp_path / "run", tiny_gguf[1], tiny_data, base_model={"gguf": str(missing)})
    with pytest.raises(ModelError, match=re.escape(f"base_model.gguf '{missing}': no such file")):
        Pipeline(parse_config(raw, source="test.yaml")).open()
