"""Bad input fails before long work, names the file or key, and leaves artifacts alone."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dem_ray.cli import main


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def setup(tmp_path, tiny_base, tiny_data, make_config):
    """A config file and a run dir that already holds an earlier artifact."""
    run_dir = tmp_path / "run"
    (run_dir / "merged").mkdir(parents=True)
    (run_dir / "merged" / "model.safetensors").write_bytes(b"an earlier good model")
    data = {}
    for name, path in tiny_data.items():
        data[name] = tmp_path / path.name
        shutil.copy(path, data[name])
    raw = make_config(run_dir, tiny_base, data)

    def write(config: dict) -> Path:
        path = tmp_path / "config.yaml"
        path.write_text(json.dumps(config))
        return path

    return raw, write, run_dir, data


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(list(map(str, args)))
    return code, capsys.readouterr().err


def expect_error(capsys, setup, config: dict, *needles: str, command: str = "run") -> None:
    _, write, run_dir, _ = setup
    before = snapshot(run_dir)
    code, err = run_cli(capsys, command, write(config))
    assert code != 0
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert_untouched(before, snapshot(run_dir))


def assert_untouched(before: dict[str, str], after: dict[str, str]) -> None:
    """Every file that was there is still there, byte for byte (the manifest may grow)."""
    kept = {k: v for k, v in before.items() if k != "manifest.json"}
    assert {k: after.get(k) for k in kept} == kept


def test_missing_dataset_file(capsys, setup):
    raw, _, _, data = setup
    data["code"].unlink()
    expect_error(capsys, setup, raw, "dataset 'code'", str(data["code"]), "not found")


def test_empty_dataset_file(capsys, setup):
    raw, _, _, data = setup
    data["letters"].write_text("")
    expect_error(capsys, setup, raw, "dataset 'letters'", str(data["letters"]), "empty")


def test_absent_text_field(capsys, setup):
    raw, _, _, _ = setup
    raw["datasets"]["numbers"]["text_field"] = "body"
    expect_error(capsys, setup, raw, "dataset 'numbers'", "no field 'body'", "set text_field")


def test_validation_split_too_small_for_one_sequence(capsys, setup):
    raw, _, run_dir, data = setup
    raw["datasets"]["code"]["validation_path"] = str(data["code"].with_name("tiny-val.jsonl"))
    Path(raw["datasets"]["code"]["validation_path"]).write_text(json.dumps({"text": "x = 1"}))
    expect_error(capsys, setup, raw, "dataset 'code'", "tiny-val.jsonl", "validation")
    assert not (run_dir / "finetune").exists()  # failed before any fine-tune started


def test_unknown_config_key(capsys, setup):
    raw, _, _, _ = setup
    raw["finetune"]["learning_rat"] = 0.1
    expect_error(capsys, setup, raw, "config.yaml", "finetune.learning_rat", "learning_rate")


def test_unknown_search_space(capsys, setup):
    raw, _, _, _ = setup
    raw["search"]["space"] = "simplx"
    expect_error(capsys, setup, raw, "simplx", "known spaces", "simplex")


def test_space_naming_a_dataset_not_in_the_config(capsys, setup, tmp_path):
    raw, _, _, _ = setup
    space = tmp_path / "my_space.yaml"
    space.write_text("type: box\nbounds:\n  poetry: [0.0, 2.0]\n")
    raw["search"]["space"] = str(space)
    expect_error(capsys, setup, raw, str(space), "bounds.poetry", "in the config")


def test_pickle_checkpoint_refused(capsys, setup, tmp_path, tiny_base):
    raw, _, _, _ = setup
    pickled = tmp_path / "pickled-base"
    pickled.mkdir()
    shutil.copy(tiny_base / "config.json", pickled / "config.json")
    torch.save({"w": torch.zeros(1)}, pickled / "pytorch_model.bin")
    raw["base_model"] = str(pickled)
    expect_error(capsys, setup, raw, str(pickled), "pytorch_model.bin", "refused", "safetensors")


def test_finetune_with_different_tensors_is_refused_naming_the_tensor(capsys, setup, tiny_base):
    """The vectors stage on a fine-tune whose tensor shape differs from the base."""
    from dem_ray.manifest import Manifest, hash_json

    raw, write, run_dir, _ = setup
    manifest = Manifest(run_dir)
    manifest.record("base", "x", [], extra={"path": str(tiny_base), "fingerprint": "f"})
    for name in raw["datasets"]:
        ft = run_dir / "finetune" / name
        shutil.copytree(tiny_base, ft)
        if name == "letters":
            tensors = load_file(ft / "model.safetensors")
            tensors["model.norm.weight"] = torch.ones(7)
            save_file(tensors, ft / "model.safetensors")
        manifest.record(f"finetune/{name}", hash_json(name), [ft])
    before = snapshot(run_dir)
    code, err = run_cli(capsys, "vectors", write(raw))
    assert code != 0
    assert "model.norm.weight" in err and str(run_dir / "finetune" / "letters") in err
    assert not (run_dir / "vectors" / "letters.safetensors").exists()
    assert_untouched(before, snapshot(run_dir))
