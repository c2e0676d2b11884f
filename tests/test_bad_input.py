"""Bad input fails before long work, names the file or key, and leaves artifacts alone."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import record_finetune, stand_in_run
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
    from dem_ray.run.manifest import Manifest, hash_json

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


# ---- wrong types and ranges, one or more per config section, through the command --------------
@pytest.mark.parametrize(
    ("section", "key", "value", "needles"),
    [
        (None, "trust_remote_code", "yes", ("'trust_remote_code' must be bool", "str 'yes'")),
        ("datasets.code", "validation_fraction", 1.5, ("datasets.code.validation_fraction",)),
        ("finetune", "batch_size", "8", ("'finetune.batch_size' must be int", "str '8'")),
        ("finetune", "max_failures", -1, ("'finetune.max_failures' must be >= 0",)),
        ("finetune", "checkpoint_every", 0, ("'finetune.checkpoint_every' must be > 0",)),
        ("search", "num_trials", 0, ("'search.num_trials' must be > 0",)),
        ("search", "algorithm", "bayes", ("'search.algorithm' is 'bayes'", "tpe, cmaes")),
        ("evaluator", "vector_dtype", "float8", ("'evaluator.vector_dtype'", "bfloat16")),
        ("evaluator", "num_actors", 1.5, ("'evaluator.num_actors' must be int", "float 1.5")),
        ("cost", "usd_per_gpu_hour", -3, ("'cost.usd_per_gpu_hour' must be >= 0",)),
        ("baseline", "grid_step", 0.3, ("'baseline.grid_step' must divide 1",)),
    ],
)
def test_wrong_type_or_range_in_each_section(capsys, setup, section, key, value, needles):
    raw, _, _, _ = setup
    target = raw
    for part in (section or "").split("."):
        if part:
            target = target.setdefault(part, {})
    target[key] = value
    expect_error(capsys, setup, raw, "config.yaml", *needles)


def test_two_datasets_with_the_same_name(capsys, setup):
    raw, write, run_dir, _ = setup
    path = write(raw)
    text = path.read_text()
    # JSON is YAML: repeat the "code" entry under the same key, as a copy-paste slip would.
    code_entry = json.dumps({"code": raw["datasets"]["code"]})[1:-1]
    path.write_text(text.replace('"datasets": {', '"datasets": {' + code_entry + ", ", 1))
    before = snapshot(run_dir)
    code, err = run_cli(capsys, "run", path)
    assert code == 2
    assert str(path) in err and "'code' appears twice" in err
    assert_untouched(before, snapshot(run_dir))


def test_zero_usable_training_rows_after_tokenization(capsys, setup, tmp_path):
    raw, _, run_dir, data = setup
    raw["datasets"]["letters"]["validation_path"] = str(data["letters"])
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "a b"}) + "\n")
    raw["datasets"]["letters"]["path"] = str(short)
    raw["datasets"]["letters"]["test_path"] = str(data["letters"])  # no test split of short
    expect_error(capsys, setup, raw, "dataset 'letters'", str(short), "training tokens")
    assert not (run_dir / "finetune").exists()


def test_search_space_with_empty_bounds(capsys, setup, tmp_path):
    raw, _, _, _ = setup
    space = tmp_path / "narrow.yaml"
    space.write_text("type: box\ndefault_bounds: [0.0, 1.0]\nbounds:\n  code: [0.5, 0.5]\n")
    raw["search"]["space"] = str(space)
    expect_error(capsys, setup, raw, str(space), "bounds.code", "is empty")


def test_run_dir_that_is_not_writable(capsys, setup, tmp_path):
    raw, _, _, _ = setup
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    raw["run_dir"] = str(blocker / "run")  # cannot be created, even by root
    expect_error(capsys, setup, raw, str(blocker / "run"), "not writable", "set run_dir")
    assert blocker.read_text() == "not a directory"


def test_gguf_of_an_unsupported_architecture(capsys, setup, tmp_path):
    import gguf
    import numpy as np

    raw, _, run_dir, _ = setup
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), arch="dem-ray-unknown")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    raw["base_model"] = str(path)
    expect_error(capsys, setup, raw, str(path), "cannot be loaded", "dem-ray-unknown")
    assert not (run_dir / "base").exists()


# ---- bad checkpoints and vectors: a run through `vectors` made without training -----------------
@pytest.fixture
def stood_in(setup, tmp_path):
    raw, write, run_dir, data = setup
    pipeline = stand_in_run(raw, tmp_path / "config.yaml")
    return pipeline, setup


def test_merge_weights_outside_the_space(capsys, stood_in):
    pipeline, setup = stood_in
    raw, write, run_dir, _ = setup
    before = snapshot(run_dir)
    code, err = run_cli(capsys, "merge", write(raw), "--weights", "numbers=1.5,letters=-0.5,code=0")
    assert code == 2 and "letters" in err and "-0.5" in err
    assert_untouched(before, snapshot(run_dir))
    assert not (run_dir / "merged" / "config.json").exists()  # the earlier model stands


def test_nan_in_a_vector_is_refused_naming_file_and_tensor(capsys, stood_in):
    pipeline, setup = stood_in
    raw, write, run_dir, _ = setup
    vector = pipeline.layout.vector("code")
    tensors = load_file(vector)
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, vector)
    pipeline.manifest.record("vectors/code", pipeline.manifest.entry("vectors/code")["inputs"],
                             [vector])  # fmt: skip
    before = snapshot(run_dir)
    code, err = run_cli(
        capsys, "merge", write(raw), "--weights", "numbers=0.2,letters=0.3,code=0.5"
    )
    assert code == 2
    assert str(vector) in err and "model.norm.weight" in err and "NaN or Inf" in err
    assert_untouched(before, snapshot(run_dir))


def test_inf_in_a_finetuned_checkpoint_is_refused(capsys, stood_in):
    pipeline, setup = stood_in
    raw, write, run_dir, _ = setup
    ckpt = pipeline.layout.finetune("letters") / "model.safetensors"
    tensors = load_file(ckpt)
    tensors["model.norm.weight"][0] = float("inf")
    save_file(tensors, ckpt, metadata={"format": "pt"})
    _rerecord_finetune(pipeline, "letters")
    before = snapshot(run_dir)
    code, err = run_cli(capsys, "vectors", write(raw))
    assert code == 2
    assert str(pipeline.layout.finetune("letters")) in err and "model.norm.weight" in err
    assert "NaN or Inf" in err and "learning_rate" in err
    assert_untouched(before, snapshot(run_dir))


def test_finetune_with_another_tokenizer_is_refused(capsys, stood_in):
    pipeline, setup = stood_in
    raw, write, run_dir, _ = setup
    tok = pipeline.layout.finetune("code") / "tokenizer.json"
    spec = json.loads(tok.read_text())
    vocab = spec["model"]["vocab"]
    a, b = list(vocab)[10], list(vocab)[11]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, two ids swapped
    tok.write_text(json.dumps(spec))
    _rerecord_finetune(pipeline, "code")
    before = snapshot(run_dir)
    code, err = run_cli(capsys, "vectors", write(raw))
    assert code == 2
    assert str(pipeline.layout.finetune("code")) in err and "another vocabulary" in err
    assert "2 mapped differently" in err
    assert_untouched(before, snapshot(run_dir))


def test_pickle_only_finetune_is_refused(capsys, stood_in):
    pipeline, setup = stood_in
    raw, write, run_dir, _ = setup
    ft = pipeline.layout.finetune("numbers")
    (ft / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, ft / "pytorch_model.bin")
    _rerecord_finetune(pipeline, "numbers")
    before = snapshot(run_dir)
    code, err = run_cli(capsys, "vectors", write(raw))
    assert code == 2
    assert str(ft) in err and "pytorch_model.bin" in err and "safe_serialization=True" in err
    assert_untouched(before, snapshot(run_dir))


def _rerecord_finetune(pipeline, name: str) -> None:
    """Record an edited fine-tune as the stage's output, so only the edit is at fault, and
    invalidate its vector so the vectors stage reads it."""
    record_finetune(pipeline, name)


@pytest.mark.parametrize(
    ("where", "error"),
    [
        ("scoring", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")),
        ("loading", RuntimeError("[enforce fail] DefaultCPUAllocator: out of memory")),
    ],
)
def test_evaluator_out_of_memory_says_what_to_change(stood_in, monkeypatch, where, error):
    from dem_ray.ray import evaluator as ev

    pipeline, (_, _, run_dir, _) = stood_in

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(ev, "token_nll" if where == "scoring" else "ResidentMerge", fail)
    before = snapshot(run_dir)
    with pytest.raises(ev.EvaluatorMemoryError) as info:
        e = ev.Evaluator(
            str(pipeline.ctx.base_dir),
            [str(pipeline.layout.vector(n)) for n in pipeline.names],
            {n: str(pipeline.layout.shard(n, "validation")) for n in pipeline.names},
            device="cpu",
        )
        e.evaluate([0.3, 0.3, 0.4])
    message = str(info.value)
    assert "out of memory" in message and f"while {where}" in message
    assert "evaluator.vector_dtype: bfloat16" in message and "evaluator.num_actors" in message
    assert_untouched(before, snapshot(run_dir))


def test_other_runtime_errors_are_not_mistaken_for_out_of_memory(stood_in, monkeypatch):
    from dem_ray.ray import evaluator as ev

    pipeline, _ = stood_in

    def fail(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(ev, "token_nll", fail)
    e = ev.Evaluator(str(pipeline.ctx.base_dir), [str(pipeline.layout.vector(n)) for n in pipeline.names],
                     {"code": str(pipeline.layout.shard("code", "validation"))}, device="cpu")  # fmt: skip
    with pytest.raises(RuntimeError, match="shape mismatch") as info:
        e.evaluate([0.3, 0.3, 0.4])
    assert not isinstance(info.value, ev.EvaluatorMemoryError)


def test_evaluate_checkpoint_refuses_pickles(stood_in, tmp_path):
    from dem_ray.models.base import ModelError
    from dem_ray.ray.evaluator import Evaluator

    pipeline, _ = stood_in
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(pipeline.ctx.base_dir / "config.json", pickled / "config.json")
    torch.save({"w": torch.zeros(1)}, pickled / "pytorch_model.bin")
    e = Evaluator(str(pipeline.ctx.base_dir), [], {"code": str(pipeline.layout.shard("code", "validation"))},
                  device="cpu")  # fmt: skip
    with pytest.raises(ModelError, match="pytorch_model.bin.*refuses pickles"):
        e.evaluate_checkpoint(str(pickled))


# ---- safety -------------------------------------------------------------------------------------
def test_no_config_value_reaches_a_shell():
    """No subprocess, os.system/popen/exec*, eval or exec in the package: no config
    string can become a command."""
    import ast

    package = Path(__file__).resolve().parents[1] / "dem_ray"
    found = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                modules = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                found += [(path.name, m) for m in modules if m.split(".")[0] == "subprocess"]
            elif isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Name) and f.id in ("eval", "exec"):
                    found.append((path.name, f.id))
                if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                    name = f"{f.value.id}.{f.attr}"
                    if f.value.id == "os" and (f.attr in ("system", "popen") or
                                               f.attr.startswith(("exec", "spawn"))):  # fmt: skip
                        found.append((path.name, name))
    assert found == []


def test_trust_remote_code_is_off_unless_the_config_says_so(setup):
    from dem_ray.config import parse_config

    raw, _, _, _ = setup
    assert parse_config(raw).trust_remote_code is False
    assert parse_config({**raw, "trust_remote_code": True}).trust_remote_code is True
