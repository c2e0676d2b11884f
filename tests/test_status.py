"""`dem-ray status`: each step done, stale (naming what changed), missing or running, as the
pipeline itself would decide, read without starting Ray and without writing anything."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import stand_in_run
from test_lock import HOLDER

from dem_ray.cli import main
from dem_ray.config import load_config, parse_config
from dem_ray.models.tiny import synthetic_corpus, write_jsonl
from dem_ray.pipeline import Pipeline
from dem_ray.run.manifest import Manifest
from dem_ray.run.storage import CACHE_ENV
from dem_ray.run.trials import read_trials
from dem_ray.stages import COMMANDS
from dem_ray.status import render, run_status

REPO = Path(__file__).resolve().parents[1]
# A status in a process of its own: Ray must not start (ray.init fails loudly if called).
NO_RAY = """
import contextlib, io, json, sys, time
import ray
def refuse(*args, **kwargs):
    raise SystemExit("status called ray.init")
ray.init = refuse
from dem_ray.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    rc = main(["-q", "status", sys.argv[1], "--json"])
print(json.dumps({"rc": rc, "cpu_seconds": time.process_time(),
                  "ray": ray.is_initialized(), "status": json.loads(out.getvalue())}))
"""


def states(status) -> dict[str, str]:
    return {s.key: s.state for s in status.steps}


def by_key(status) -> dict:
    return {s.key: s for s in status.steps}


def cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["-q", "status", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_same_answer(text: str, answer: dict) -> None:
    """Every step of the JSON answer has its line in the text: key, state, detail."""
    lines = text.splitlines()
    assert len([x for x in lines if x.startswith("  ")]) == len(answer["steps"])
    for step in answer["steps"]:
        [line] = [x for x in lines if x.split()[:1] == [step["key"]]]
        key, state, *detail = line.split(maxsplit=2)
        assert state == step["state"] and (detail or [""])[0] == step["detail"], line


def own_data(tiny_data, root: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """Copies of some of the suite's datasets, which a test may rewrite."""
    root.mkdir()
    return {n: Path(shutil.copy(tiny_data[n], root / tiny_data[n].name)) for n in names}


def stand_in_finetune(seed: int):
    """FinetuneStage.run without Ray: each fine-tune is the base plus seeded noise."""
    import torch
    from safetensors.torch import load_file, save_file

    def run(self, ctx, todo) -> None:
        base = load_file(ctx.base_dir / "model.safetensors")
        for step in todo:
            out = ctx.layout.finetune(step.payload["name"])
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(ctx.base_dir, out)
            gen = torch.Generator().manual_seed(seed)
            moved = {k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
            save_file(moved, out / "model.safetensors", metadata={"format": "pt"})
            ctx.record(step, [out])

    return run


# ---- a finished run, then a changed dataset ------------------------------------------------------
def test_status_says_done_after_a_run_and_stale_exactly_where_a_changed_dataset_reruns(
    ray_session, tiny_base, tiny_data, make_config, tmp_path, capsys, monkeypatch
):
    data = own_data(tiny_data, tmp_path / "data", ("numbers", "code"))
    raw = make_config(tmp_path / "run", tiny_base, data, search={"num_trials": 2})
    config_path = tmp_path / "config.yaml"
    pipeline = stand_in_run(raw, config_path)
    try:
        for command in ("search", "merge", "report"):
            pipeline.run_command(command)
    finally:
        pipeline.close()

    status = run_status(load_config(config_path))
    assert set(states(status).values()) == {"done"}, render(status)
    names = list(data)
    assert list(states(status)) == [
        "base", *(f"{stage}/{n}" for stage in ("data", "finetune", "vectors") for n in names),
        "search", "merge", "report",
    ]  # fmt: skip
    trials = read_trials(pipeline.layout.trials)
    assert status.trials["done"] == status.trials["total"] == 2
    assert status.trials["best"] == min(t["objective"] for t in trials)
    assert status.trials["kept"] is True
    recorded = Manifest(pipeline.run_dir).data["stages"]
    dem = sum(e["cost"].get("device_seconds", 0.0) for k, e in recorded.items()
              if k.split("/")[0] in ("finetune", "vectors", "search", "merge"))  # fmt: skip
    assert dem > 0 and status.cost["dem"]["device_seconds"] == pytest.approx(dem)
    assert status.cost["baseline"]["device_seconds"] == 0.0
    assert status.lock is None

    # The JSON is the text's answer, line for line.
    rc, text, _ = cli(capsys, str(config_path))
    rc_json, raw_json, _ = cli(capsys, str(config_path), "--json")
    assert rc == rc_json == 0
    answer = json.loads(raw_json)
    assert_same_answer(text, answer)
    assert {step["state"] for step in answer["steps"]} == {"done"}
    assert f"trials: 2 of 2 done, best macro objective {status.trials['best']:.4f}" in text

    # In a process of its own, status starts no Ray and takes seconds (of CPU, imports
    # included: the wall time is the shared machine's).
    child = subprocess.run([sys.executable, "-c", NO_RAY, str(config_path)], cwd=REPO,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.splitlines()[-1])
    assert report["rc"] == 0 and report["ray"] is False
    assert report["cpu_seconds"] < 15, report["cpu_seconds"]
    assert report["status"]["steps"] == answer["steps"]

    # One dataset's file changes: what is stale is what the run then re-runs.
    write_jsonl(data["code"], synthetic_corpus("code", 160, seed=2))
    stale = run_status(load_config(config_path))
    expected_stale = [s.key for s in stale.steps if s.state == "stale"]
    assert {s.state for s in stale.steps} == {"done", "stale"}, render(stale)
    steps = by_key(stale)
    assert steps["data/code"].changed == ["files"]
    assert steps["data/code"].detail == "files changed"
    assert "train" in steps["finetune/code"].changed
    assert steps["finetune/code"].detail == "after data/code (train)"
    assert steps["vectors/code"].after == ["finetune/code"]
    assert steps["report"].detail.startswith("after merge (")
    assert "a run starts afresh" in render(stale)
    assert "finetune/numbers" not in expected_stale
    assert_same_answer(render(stale), json.loads(json.dumps(stale.as_dict())))

    from dem_ray.stages.finetune import FinetuneStage

    monkeypatch.setattr(FinetuneStage, "run", stand_in_finetune(seed=99))
    again = Pipeline(parse_config(json.loads(config_path.read_text()), source=str(config_path)))
    again.run(tuple(COMMANDS))
    assert again.ran == expected_stale
    assert set(states(run_status(load_config(config_path))).values()) == {"done"}

    # More trials asked for: the search is extended (its trials kept), the rest follows it.
    raw["search"]["num_trials"] = 4
    config_path.write_text(json.dumps(raw))
    more = run_status(load_config(config_path))
    assert [s.key for s in more.steps if s.state != "done"] == ["search", "merge", "report"]
    assert by_key(more)["search"].detail == "2 of 4 trials"
    assert by_key(more)["merge"].detail == "after search"
    assert more.trials["done"] == 2 and more.trials["total"] == 4 and more.trials["kept"]


# ---- a prepared run: what waits, old manifests, the lock's holder ----------------------------------
def test_status_of_a_prepared_run_names_what_each_step_waits_on_and_who_holds_the_lock(
    tiny_base, tiny_data, make_config, tmp_path
):
    raw = make_config(tmp_path / "run", tiny_base, tiny_data)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(json.dumps(raw))
    config = load_config(config_path)
    Pipeline(config).run(("prepare",))

    status = by_key(run_status(config))
    assert {k: s.state for k, s in status.items() if s.state == "done"} == {
        "base": "done", **{f"data/{n}": "done" for n in tiny_data}}  # fmt: skip
    assert status["finetune/code"].state == "missing" and status["finetune/code"].detail == ""
    assert status["vectors/code"].detail == "waiting on finetune/code"
    assert status["search"].detail == "waiting on vectors/code, vectors/letters, vectors/numbers"
    assert status["merge"].detail == "waiting on search"
    assert status["report"].detail == "waiting on merge"

    # A record from a dem-ray that kept one input digest only: still done while it holds...
    manifest_path = tmp_path / "run" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["stages"]["data/numbers"]["input_parts"]
    manifest_path.write_text(json.dumps(manifest))
    assert run_status(config).steps[1].state == "done"
    kept = Pipeline(config)
    kept.run(("prepare",))
    assert kept.ran == []
    # ...and stale, without knowing which input, once it does not.
    manifest["stages"]["data/numbers"]["inputs"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    old = by_key(run_status(config))
    assert (old["data/numbers"].state, old["data/numbers"].detail) == ("stale", "inputs changed")
    assert old["finetune/numbers"].detail == "waiting on data/numbers"
    redo = Pipeline(config)
    redo.run(("prepare",))
    assert redo.ran == ["data/numbers"]

    # Another process holds the run dir for `finetune`: its steps are running, by it.
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "run")], cwd=REPO,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "locked"
        held = run_status(config)
    finally:
        child.communicate("")
    assert held.lock["pid"] == child.pid and held.lock["command"] == "finetune"
    lines = by_key(held)
    for name in tiny_data:
        assert lines[f"finetune/{name}"].state == "running"
        assert f"pid {child.pid} on host " in lines[f"finetune/{name}"].detail
        assert "(dem-ray finetune)" in lines[f"finetune/{name}"].detail
    assert lines["vectors/code"].state == "missing" and lines["base"].state == "done"
    assert f"lock: held by pid {child.pid}" in render(held)
    assert run_status(config).lock is None  # released


# ---- nothing there yet; a bad config ---------------------------------------------------------
def test_status_of_a_run_dir_that_does_not_exist_says_missing_and_creates_nothing(
    tiny_base, tiny_data, make_config, tmp_path, capsys
):
    run_dir = tmp_path / "never" / "run"
    config_path = tmp_path / "config.yaml"
    config_path.write_text(json.dumps(make_config(run_dir, tiny_base, tiny_data)))
    rc, text, _ = cli(capsys, str(config_path), "--json")
    assert rc == 0
    answer = json.loads(text)
    assert answer["steps"] and {s["state"] for s in answer["steps"]} == {"missing"}
    assert answer["trials"]["done"] == 0 and answer["lock"] is None
    assert not (tmp_path / "never").exists()


def test_a_bad_config_exits_2_naming_the_problem(tiny_base, tiny_data, make_config, tmp_path,
                                                 capsys):  # fmt: skip
    raw = make_config(tmp_path / "run", tiny_base, tiny_data, search={"num_trails": 3})
    config_path = tmp_path / "config.yaml"
    config_path.write_text(json.dumps(raw))
    rc, out, err = cli(capsys, str(config_path))
    assert rc == 2 and out == ""
    assert err.startswith("dem-ray: error:") and "num_trails" in err
    rc, _, err = cli(capsys, str(tmp_path / "absent.yaml"))
    assert rc == 2 and "config file not found" in err


# ---- a bucket run dir -------------------------------------------------------------------------
def test_status_of_a_bucket_run_reads_the_bucket_and_leaves_the_mirror_alone(
    s3_server, tiny_base, tiny_data, make_config, tmp_path, monkeypatch
):
    uri = s3_server("dem-ray-status")("runs/tiny")
    data = {n: tiny_data[n] for n in ("numbers", "letters")}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(json.dumps(make_config(uri, tiny_base, data)))
    config = load_config(config_path)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "first"))
    Pipeline(config).run(("prepare",))

    fresh = tmp_path / "fresh"  # another machine: an empty cache
    monkeypatch.setenv(CACHE_ENV, str(fresh))
    start = time.process_time()  # CPU: the wall time is the shared machine's
    status = run_status(config)
    assert time.process_time() - start < 10
    assert status.run_dir == "s3://dem-ray-status/runs/tiny"
    lines = states(status)
    assert [k for k, v in lines.items() if v == "done"] == ["base", "data/numbers", "data/letters"]
    assert lines["finetune/numbers"] == "missing"
    assert not fresh.exists() or not any(p.is_file() for p in fresh.rglob("*"))
