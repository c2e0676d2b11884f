"""Tests for dem_ray.run.manifest: a stage is done only with the same inputs and intact outputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from dem_ray.run.manifest import Manifest, files_under, hash_json, sha256_file, write_text_atomic


@pytest.fixture
def run(tmp_path: Path) -> Path:
    (tmp_path / "vectors").mkdir()
    (tmp_path / "vectors" / "a.safetensors").write_bytes(b"alpha" * 100)
    (tmp_path / "vectors" / "b.safetensors").write_bytes(b"beta" * 100)
    (tmp_path / "vectors" / ".tmp.partial").write_bytes(b"ignored")
    (tmp_path / "report.json").write_text('{"x": 1}')
    return tmp_path


def record(run: Path, inputs: str = "in-1") -> Manifest:
    manifest = Manifest(run)
    manifest.record(
        "vectors", inputs, [run / "vectors", run / "report.json"], cost={"s": 1.5}, extra={"k": 2}
    )
    return manifest


def test_record_then_done(run: Path) -> None:
    manifest = record(run)
    assert manifest.is_done("vectors", "in-1")
    assert Manifest(run).is_done("vectors", "in-1")  # read back from disk
    entry = Manifest(run).entry("vectors")
    assert entry["status"] == "done"
    assert entry["inputs"] == "in-1"
    assert entry["cost"] == {"s": 1.5}
    assert entry["k"] == 2
    assert entry["outputs"] == {
        "report.json": hashlib.sha256(b'{"x": 1}').hexdigest(),
        "vectors/a.safetensors": hashlib.sha256(b"alpha" * 100).hexdigest(),
        "vectors/b.safetensors": hashlib.sha256(b"beta" * 100).hexdigest(),
    }


def test_unknown_stage_not_done(run: Path) -> None:
    manifest = record(run)
    assert not manifest.is_done("finetune", "in-1")
    assert manifest.entry("finetune") is None


def test_changed_inputs_not_done(run: Path) -> None:
    record(run)
    assert not Manifest(run).is_done("vectors", "in-2")


def test_deleted_output_not_done(run: Path) -> None:
    record(run)
    (run / "vectors" / "b.safetensors").unlink()
    assert not Manifest(run).is_done("vectors", "in-1")


def test_output_replaced_by_directory_not_done(run: Path) -> None:
    record(run)
    (run / "report.json").unlink()
    (run / "report.json").mkdir()
    assert not Manifest(run).is_done("vectors", "in-1")


def test_flipped_byte_not_done(run: Path) -> None:
    record(run)
    path = run / "vectors" / "a.safetensors"
    data = bytearray(path.read_bytes())
    data[250] ^= 0x01
    path.write_bytes(bytes(data))
    assert path.stat().st_size == 500
    assert not Manifest(run).is_done("vectors", "in-1")
    data[250] ^= 0x01
    path.write_bytes(bytes(data))
    assert Manifest(run).is_done("vectors", "in-1")  # same content again: done again


def test_unrecorded_files_are_not_checked(run: Path) -> None:
    record(run)
    (run / "vectors" / ".tmp.partial").write_bytes(b"changed")
    assert Manifest(run).is_done("vectors", "in-1")


def test_rerecord_overwrites_entry(run: Path) -> None:
    record(run, "in-1")
    record(run, "in-2")
    manifest = Manifest(run)
    assert manifest.is_done("vectors", "in-2")
    assert not manifest.is_done("vectors", "in-1")


def test_outputs_hash(run: Path) -> None:
    manifest = record(run)
    digest = manifest.outputs_hash("vectors")
    assert digest == hash_json(manifest.entry("vectors")["outputs"])
    (run / "report.json").write_text('{"x": 2}')
    record(run)
    assert Manifest(run).outputs_hash("vectors") != digest
    with pytest.raises(RuntimeError, match="stage 'finetune' has not run"):
        manifest.outputs_hash("finetune")


def test_manifest_file_is_valid_json(run: Path) -> None:
    record(run)
    data = json.loads((run / "manifest.json").read_text())
    assert data["version"] == 2
    assert set(data["stages"]) == {"vectors"}
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []


def test_corrupted_manifest_raises(run: Path) -> None:
    record(run)
    path = run / "manifest.json"
    path.write_text(path.read_text()[:-10])
    with pytest.raises(RuntimeError) as info:
        Manifest(run)
    assert str(path) in str(info.value)
    assert "not valid JSON" in str(info.value)


def test_write_text_atomic(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "f.txt"
    write_text_atomic(path, "one")
    write_text_atomic(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["f.txt"]


def test_write_text_atomic_failure_keeps_old(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    write_text_atomic(path, "old")
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(path, "\udcff")  # a lone surrogate cannot be encoded
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_hash_json_is_key_order_independent() -> None:
    assert hash_json({"a": 1, "b": [1, 2]}) == hash_json({"b": [1, 2], "a": 1})
    assert hash_json({"a": 1}) != hash_json({"a": 2})
    assert hash_json([1, 2]) != hash_json([2, 1])
    assert hash_json({"p": Path("x")}) == hash_json({"p": "x"})


def test_sha256_file_and_files_under(run: Path) -> None:
    path = run / "vectors" / "a.safetensors"
    assert sha256_file(path) == hashlib.sha256(b"alpha" * 100).hexdigest()
    assert files_under(run / "vectors") == [
        run / "vectors" / "a.safetensors",
        run / "vectors" / "b.safetensors",
    ]
    assert files_under(path) == [path]


def test_unchanged_outputs_are_trusted_without_reading_them(run: Path) -> None:
    record(run)
    manifest = Manifest(run)
    assert manifest.is_done("vectors", "in-1")
    assert manifest.bytes_hashed == 0  # size and mtime as recorded: nothing read
    verified = Manifest(run)
    assert verified.is_done("vectors", "in-1", verify=True)
    assert (
        verified.bytes_hashed
        == sum(p.stat().st_size for p in files_under(run / "vectors"))
        + (run / "report.json").stat().st_size
    )


def test_a_touched_output_is_hashed_once_then_trusted_again(run: Path) -> None:
    import os

    record(run)
    path = run / "vectors" / "a.safetensors"
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    manifest = Manifest(run)
    assert manifest.is_done("vectors", "in-1")  # same bytes: still done
    assert manifest.bytes_hashed == stat.st_size  # ... found by reading it once
    manifest.save_if_changed()
    again = Manifest(run)
    assert again.is_done("vectors", "in-1") and again.bytes_hashed == 0


def test_a_manifest_of_an_earlier_version_is_hashed_once_then_trusted(run: Path) -> None:
    record(run)
    data = json.loads((run / "manifest.json").read_text())
    for entry in data["stages"].values():
        entry.pop("stats")  # what the previous release wrote
    (run / "manifest.json").write_text(json.dumps(data))
    manifest = Manifest(run)
    assert manifest.is_done("vectors", "in-1") and manifest.bytes_hashed > 0
    manifest.save_if_changed()
    assert Manifest(run).is_done("vectors", "in-1")
    later = Manifest(run)
    later.is_done("vectors", "in-1")
    assert later.bytes_hashed == 0
