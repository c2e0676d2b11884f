"""Faults injected for real: a killed evaluator, a killed driver, a killed fine-tune worker,
a kill mid-write, a damaged artifact. Each test fails when its protection is removed."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import ray
import torch
from conftest import kill_processes_under, lines_in, stand_in_run, wait_for
from safetensors.torch import load_file
from worker_hooks import exit_once, hooks_by_value

from dem_ray.cli import main
from dem_ray.config import parse_config
from dem_ray.pipeline import Pipeline
from dem_ray.ray.search import read_trials, remaining_grid_points, resume_trials, run_search
from dem_ray.run.manifest import Manifest, sha256_file


@pytest.fixture
def stand_in(tmp_path, tiny_base, tiny_data, make_config):
    def build(**overrides):
        raw = make_config(tmp_path / "run", tiny_base, tiny_data, **overrides)
        config_path = tmp_path / "config.yaml"
        return stand_in_run(raw, config_path), raw, config_path

    return build


# ---- 1. an evaluator actor dies mid-search ------------------------------------------------------
def test_evaluator_killed_mid_search_is_restarted_and_the_trial_retried(ray_session, stand_in):
    pipeline, raw, _ = stand_in(search={"num_trials": 10, "max_concurrent": 2})
    pool = pipeline.evaluators()
    first_pid = ray.get(pool[0].info.remote())["pid"]
    out = pipeline.run_dir / "search"
    outcome: dict = {}

    def search() -> None:
        try:
            outcome["trials"] = run_search(pipeline.cfg.search, pipeline.ctx.space, pool, out)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            outcome["error"] = exc

    thread = threading.Thread(target=search)
    thread.start()
    wait_for(lambda: lines_in(out / "trials.jsonl") >= 2, 120, "two finished trials")
    ray.kill(pool[0], no_restart=False)  # dies now; Ray restarts it (max_restarts)
    thread.join(timeout=300)
    try:
        assert "error" not in outcome, outcome.get("error")
        trials = outcome["trials"]
        assert len(trials) == 10
        assert [t["trial"] for t in trials] == list(range(10))
        assert len({t["trial_id"] for t in trials}) == 10  # no trial counted twice
        assert all(torch.isfinite(torch.tensor(t["objective"])) for t in trials)
        info = ray.get(pool[0].info.remote())
        assert info["pid"] != first_pid  # a new process: the actor was really restarted
        assert info["calls"] >= 1  # and the restarted actor served the rest
    finally:
        pipeline.ctx.pool.release()


# ---- 2. the driver dies mid-search --------------------------------------------------------------
def test_driver_killed_mid_search_resumes_without_rerunning(ray_session, stand_in, caplog):
    total = 16
    pipeline, raw, config_path = stand_in(search={"num_trials": total, "max_concurrent": 2})
    pipeline.close()  # the child `dem-ray search` takes the run dir's lock
    trials_path = pipeline.run_dir / "search" / "trials.jsonl"
    temp_dir = Path(f"/tmp/drk-{os.getpid()}")
    # `dem-ray search`, on a private Ray of its own (ensure_ray keeps an initialised one).
    script = textwrap.dedent(f"""
        import sys, ray
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 _temp_dir={str(temp_dir)!r}, log_to_driver=False)
        from dem_ray.cli import main
        sys.exit(main(["search", {str(config_path)!r}]))
    """)
    log_path = pipeline.run_dir / "killed-driver.log"
    with log_path.open("w") as log_file:
        driver = subprocess.Popen(
            [sys.executable, "-c", script], stdout=log_file, stderr=log_file,
            start_new_session=True,  # its own process group, killed as a whole below
        )  # fmt: skip
    try:
        wait_for(lambda: lines_in(trials_path) >= 4 or driver.poll() is not None, 240, "4 trials")
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        kill_processes_under(temp_dir)
    assert driver.returncode == -signal.SIGKILL, log_path.read_text()[-3000:]
    kept = read_trials(trials_path)
    assert 4 <= len(kept) < total, "the driver finished before the kill; nothing was tested"
    assert Manifest(pipeline.run_dir).entry("search") is None  # not marked done

    resumed = Pipeline(parse_config(raw, source=str(config_path)))
    resumed.open()
    with caplog.at_level(logging.INFO, logger="dem_ray.ray.search"):
        resumed.run_command("search")
    try:
        calls = ray.get(resumed.ctx.pool.actors[0].info.remote())["calls"]
    finally:
        resumed.ctx.pool.release()
    trials = read_trials(trials_path)
    assert len(trials) == total
    assert trials[: len(kept)] == kept  # the finished trials are kept as they were
    assert [t["trial"] for t in trials] == list(range(total))
    assert calls == total - len(kept)  # and not evaluated again
    assert f"search: resuming, {len(kept)} of {total} trials already finished" in caplog.text
    assert resumed.manifest.entry("search")["status"] == "done"
    assert json.loads((pipeline.run_dir / "search" / "best.json").read_text())["num_trials"] == 16


def test_resume_drops_a_cut_short_line_and_trials_of_other_inputs(tmp_path, caplog):
    path = tmp_path / "trials.jsonl"
    assert resume_trials(path, "inputs-a", fresh=False) == []
    records = [{"trial": i, "objective": 1.0 + i, "weights": {"a": 1.0}} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"trial": 3, "obj')
    with caplog.at_level(logging.WARNING):
        assert resume_trials(path, "inputs-a", fresh=False) == records
    assert "cut short" in caplog.text
    assert read_trials(path) == records  # the torn line is gone, appends start clean
    assert resume_trials(path, "inputs-b", fresh=False) == []  # changed inputs: afresh
    assert not path.exists()
    path.write_text(json.dumps(records[0]) + "\n")
    assert resume_trials(path, "inputs-b", fresh=True) == []  # --force: afresh


def test_a_damaged_line_in_the_middle_is_an_error_not_a_silent_loss(tmp_path):
    path = tmp_path / "trials.jsonl"
    path.write_text('{"trial": 0, "objective": 1.0}\nnot json\n{"trial": 2, "objective": 1.0}\n')
    with pytest.raises(RuntimeError, match=r"trials.jsonl: line 2 .* delete the file"):
        read_trials(path)


def test_resumed_grid_skips_the_points_already_evaluated():
    points = [{"a": 1.0, "b": 0.0}, {"a": 0.5, "b": 0.5}, {"a": 0.0, "b": 1.0}]
    finished = [{"weights": {"b": 0.5, "a": 0.5000000000001}}]
    assert remaining_grid_points(points, finished) == [points[0], points[2]]


# ---- 3. a fine-tune worker dies -----------------------------------------------------------------
def test_finetune_worker_killed_resumes_from_its_checkpoint(
    ray_session, stand_in, tmp_path, monkeypatch
):
    from dem_ray.ray import finetune
    from dem_ray.ray.finetune import FinetuneJob, run_finetunes

    pipeline, _, _ = stand_in()
    hp = pipeline.cfg.finetune.model_copy(
        update={"max_steps": 6, "checkpoint_every": 2, "batch_size": 4}
    )
    shard = {"code": str(pipeline.layout.shard("code", "train"))}
    base = str(pipeline.ctx.base_dir)
    jobs = [
        FinetuneJob("plain", base, shard, str(tmp_path / "plain")),
        FinetuneJob("faulty", base, shard, str(tmp_path / "faulty")),
    ]
    marker = tmp_path / "fault-fired"
    # The worker of "faulty" exits abruptly after step 3, once (the marker stops it firing
    # again after Ray Train restarts the worker from the checkpoint of step 2).
    storage = tmp_path / "ray_train"
    monkeypatch.setattr(finetune, "AFTER_STEP", exit_once(marker, "faulty", 3, storage))
    with hooks_by_value():
        results, errors = run_finetunes(jobs, hp, storage)
    assert errors == {}
    assert marker.exists()  # the fault really fired
    plain, faulty = results["plain"], results["faulty"]
    assert faulty["resumed_from_step"] == 2 and plain["resumed_from_step"] == 0
    assert faulty["tokens"] == plain["tokens"] == 6 * 4 * 32
    assert faulty["tokens_by_dataset"] == plain["tokens_by_dataset"]
    a = load_file(tmp_path / "plain" / "model.safetensors")
    b = load_file(tmp_path / "faulty" / "model.safetensors")
    for name in a:  # the resumed run is the uninterrupted one, batch for batch
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)


def test_sampler_replay_counts_the_rows_the_lost_steps_drew(tmp_path):
    from safetensors.torch import save_file

    from dem_ray.data.shards import ShardReader
    from dem_ray.ray.finetune import rows_before, sample_batch, step_generator

    shards = []
    for i, rows in enumerate((5, 7)):
        path = tmp_path / f"s{i}.safetensors"
        save_file({"input_ids": torch.full((rows, 4), i, dtype=torch.int32)}, str(path))
        shards.append(ShardReader(path))
    probs = torch.tensor([0.3, 0.7], dtype=torch.float64)
    batches = [sample_batch(shards, probs, 8, step_generator(1, 0, s)) for s in (1, 2, 3)]
    counted = sum(counts for _, _, counts in batches)
    assert torch.equal(rows_before(probs, 8, 1, 0, 3), counted)
    for ids, mask, counts in batches:  # each row comes from the shard the sampler drew
        assert mask is None and int((ids[:, 0] == 1).sum()) == int(counts[1])


# ---- 4. killed while writing --------------------------------------------------------------------
WRITERS = {
    "vector": (
        "os.fsync",
        "from dem_ray.core.vectors import save_tensors\n"
        "save_tensors({'w': torch.full((64, 64), 2.0)}, target)",
    ),
    "manifest": (
        "os.fsync",
        "from dem_ray.run.manifest import write_text_atomic\n"
        "write_text_atomic(target, 'a newer manifest ' * 1000)",
    ),
    "merged model": (
        "shutil.copy2",
        "from dem_ray.core.merge import merge_to_dir\n"
        "merge_to_dir(base, [vector], [2.0], target, side_files=[base / 'tokenizer.json'])",
    ),
}
CHILD = """
import os, shutil, sys, time, torch
from pathlib import Path
import dem_ray.models.base, dem_ray.core.vectors, dem_ray.core.merge
target, base, vector, ready = (Path(a) for a in sys.argv[1:5])
def stall(*args, **kwargs):
    # Part of the new version is on disk (or all of it, not yet renamed): stop here.
    if len(args) >= 2 and isinstance(args[1], str):
        Path(args[1]).write_bytes(b"partial")
    ready.write_text("stalled")
    time.sleep(600)
{patch}
{write}
"""


@pytest.mark.parametrize("what", sorted(WRITERS))
def test_killed_mid_write_leaves_the_previous_version(what, tmp_path, tiny_base):
    from dem_ray.core.merge import merge_to_dir
    from dem_ray.core.vectors import save_tensors

    target_attr, write = WRITERS[what]
    vector = tmp_path / "v.safetensors"
    base_tensors = load_file(tiny_base / "model.safetensors")
    save_tensors({k: torch.ones_like(v) for k, v in base_tensors.items()}, vector)
    if what == "merged model":
        target = tmp_path / "merged"
        merge_to_dir(tiny_base, [vector], [1.0], target, side_files=[tiny_base / "tokenizer.json"])
    elif what == "vector":
        target = tmp_path / "code.safetensors"
        save_tensors({"w": torch.ones(64, 64)}, target)
    else:
        target = tmp_path / "manifest.json"
        target.write_text('{"version": 1, "stages": {}}')
    before = _tree(target)
    module, _, attr = target_attr.rpartition(".")
    patch = f"import {module}; {module}.{attr} = stall"
    ready = tmp_path / "ready"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(patch=patch, write=write),
         str(target), str(tiny_base), str(vector), str(ready)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: ready.exists() or child.poll() is not None, 120, "the write to start")
        assert child.poll() is None, child.stderr.read()
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert _tree(target) == before  # the previous version, byte for byte
    leftovers = [p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.")]
    assert leftovers  # the new version was being written, under a hidden temp name


def _tree(path: Path) -> dict[str, str]:
    if path.is_file():
        return {path.name: sha256_file(path)}
    return {str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*"))}


def test_a_kill_between_the_two_renames_is_recovered(tmp_path, monkeypatch):
    """Where the atomic exchange is unavailable, the old dir survives as .NAME.old."""
    from dem_ray.core import atomic as models

    final = tmp_path / "merged"
    final.mkdir()
    (final / "model.safetensors").write_text("old")
    new = tmp_path / ".merged.new"
    new.mkdir()
    (new / "model.safetensors").write_text("new")
    monkeypatch.setattr(models, "_exchange", lambda a, b: False)
    real_replace = os.replace

    def die_after_first(src, dst):
        real_replace(src, dst)
        if Path(dst).name == ".merged.old":
            raise KeyboardInterrupt("killed between the renames")

    monkeypatch.setattr(models.os, "replace", die_after_first)
    with pytest.raises(KeyboardInterrupt):
        models.replace_dir(new, final)
    assert not final.exists()
    monkeypatch.setattr(models.os, "replace", real_replace)
    models.recover_dir(final)
    assert (final / "model.safetensors").read_text() == "old"


def test_replace_dir_swaps_atomically_on_linux(tmp_path):
    from dem_ray.core.atomic import _exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    assert _exchange(a, b)
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


# ---- 5. a damaged artifact ----------------------------------------------------------------------
def test_flipped_byte_in_a_vector_is_named_with_the_stage_to_rerun(stand_in, capsys):
    pipeline, _, config_path = stand_in()
    vector = pipeline.layout.vector("letters")
    data = bytearray(vector.read_bytes())
    data[len(data) // 2] ^= 0xFF
    vector.write_bytes(bytes(data))
    code = main(["search", str(config_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert str(vector) in err and "damaged" in err
    assert f"dem-ray vectors {config_path} --force" in err
    assert not (pipeline.run_dir / "search" / "trials.jsonl").exists()


def test_truncated_merged_model_is_named_with_the_stage_to_rerun(stand_in, capsys):
    pipeline, _, config_path = stand_in()
    pipeline.run_command("merge", weights={"numbers": 0.2, "letters": 0.3, "code": 0.5})
    merged = pipeline.run_dir / "merged" / "model.safetensors"
    merged.write_bytes(merged.read_bytes()[: merged.stat().st_size // 2])
    code = main(["report", str(config_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert str(merged) in err and f"dem-ray merge {config_path} --force" in err


def test_truncated_vector_outside_the_manifest_is_named_by_safetensors(stand_in):
    from dem_ray.core.merge import LazyTensors
    from dem_ray.core.vectors import VectorError

    pipeline, _, _ = stand_in()
    vector = pipeline.layout.vector("code")
    vector.write_bytes(vector.read_bytes()[:100])
    with pytest.raises(VectorError, match=str(vector)):
        LazyTensors(vector)


def test_train_state_round_trips_through_safetensors_and_json(tmp_path):
    """A fine-tune's resumable state holds no pickle, and restores AdamW and its schedule."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dem_ray.ray.finetune import TRAIN_STATE, _load_state, _save_state

    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config)

    def fresh():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))

    optimizer, scheduler = fresh()
    for _ in range(3):
        x = torch.randint(0, 50, (2, 8))
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    _save_state(model, None, optimizer.state_dict(), scheduler, 3, 1.5, tmp_path)
    files = sorted(p.name for p in (tmp_path / TRAIN_STATE).iterdir())
    assert files == ["optimizer.safetensors"]
    state = _load_state(tmp_path)
    assert (state["step"], state["device_seconds"]) == (3, 1.5)
    restored, restored_schedule = fresh()
    restored.load_state_dict(state["optimizer"])
    restored_schedule.load_state_dict(state["scheduler"])
    before, after = optimizer.state_dict(), restored.state_dict()
    assert before["state"].keys() == after["state"].keys()
    for index, fields in before["state"].items():
        for key, value in fields.items():
            assert torch.equal(value, after["state"][index][key]), (index, key)
    assert restored_schedule.get_last_lr() == scheduler.get_last_lr()
    assert restored_schedule.last_epoch == 3
