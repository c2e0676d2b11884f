"""Tensor-by-tensor safetensors reading and writing, checked against the safetensors library."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from dem_ray.core.safetensors_io import SafetensorsFormatError, TensorReader, TensorWriter

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32, torch.uint8]


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(DTYPES):
        t = torch.randn((3, i + 1), generator=g) * 50
        out[f"t{i}"] = t.to(dtype)
    out["empty"] = torch.zeros((0, 4))
    out["scalar"] = torch.tensor(2.5)
    return out


def test_writer_output_loads_with_safetensors(tmp_path):
    tensors = sample()
    path = tmp_path / "x.safetensors"
    specs = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with TensorWriter(path, specs, {"who": "test"}) as writer:
        for name, t in tensors.items():
            writer.write(name, t)
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    with TensorReader(path) as reader:
        assert reader.metadata == {"who": "test"}


def test_reader_matches_safetensors_files(tmp_path):
    tensors = sample()
    path = tmp_path / "y.safetensors"
    save_file(tensors, str(path))
    with TensorReader(path) as reader:
        assert sorted(reader.names()) == sorted(tensors)
        for name, t in tensors.items():
            got = reader.read(name)
            assert got.dtype == t.dtype and torch.equal(got, t), name


def test_truncated_file_is_named(tmp_path):
    path = tmp_path / "z.safetensors"
    save_file({"a": torch.ones(100), "b": torch.ones(100)}, str(path))
    path.write_bytes(path.read_bytes()[:-50])
    with TensorReader(path) as reader, pytest.raises(SafetensorsFormatError, match="truncated"):
        reader.read(max(reader.names(), key=lambda n: reader.header[n]["data_offsets"][0]))
    path.write_bytes(b"\x05\x00")
    with pytest.raises(SafetensorsFormatError, match="z.safetensors: too short"):
        TensorReader(path)


def test_bad_header_is_named(tmp_path):
    path = tmp_path / "h.safetensors"
    path.write_bytes((12).to_bytes(8, "little") + b"{not json!!}")
    with pytest.raises(SafetensorsFormatError, match="h.safetensors: header is not valid JSON"):
        TensorReader(path)


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "v.safetensors"
    save_file({"a": torch.ones(3)}, str(path))
    old = path.read_bytes()
    specs = [("a", torch.float32, (3,)), ("b", torch.float32, (2,))]
    with pytest.raises(ValueError, match="expected tensor 'b'"), TensorWriter(path, specs) as w:
        w.write("a", torch.zeros(3))
        w.write("b", torch.zeros(5))
    missing = pytest.raises(ValueError, match="'b' was declared but not written")
    with missing, TensorWriter(path, specs) as w:
        w.write("a", torch.zeros(3))
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.safetensors"]
