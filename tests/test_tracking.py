"""TensorBoard event files: written by real fine-tunes and searches, read back with
TensorBoard's own reader, and compared with what the run recorded."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import stand_in_run

from dem_ray.config import parse_config
from dem_ray.models.base import check_model_dir
from dem_ray.pipeline import Pipeline
from dem_ray.ray.search import read_trials
from dem_ray.run.tracking import (
    EVENTS,
    StepEvents,
    TrialEvents,
    copy_events,
    finetune_events,
    search_events,
)


def scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} as TensorBoard reads the dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def approx(values):
    return pytest.approx(values, rel=1e-6)  # events hold float32


# ---- no Ray ---------------------------------------------------------------------------------
def test_a_restarted_worker_keeps_the_checkpoints_steps_once(tmp_path):
    """The lost worker's steps after its checkpoint are dropped, live dir or temp dir."""
    for live in (None, tmp_path / "live"):
        lost = StepEvents(live)
        for step in (1, 2):
            lost.write(step, {"loss": 10.0 - step})
        ckpt = tmp_path / f"ckpt-{live is None}"
        lost.save_into(ckpt)
        lost.write(3, {"loss": 99.0})  # written, then the worker dies before a checkpoint
        resumed = StepEvents(live, ckpt)
        for step in (3, 4):
            resumed.write(step, {"loss": 10.0 - step})
        resumed.close()
        final = tmp_path / f"final-{live is None}"
        resumed.save_into(final)
        copy_events(final, tmp_path / f"out-{live is None}")
        expected = [(s, 10.0 - s) for s in (1, 2, 3, 4)]
        assert scalars(tmp_path / f"out-{live is None}")["loss"] == expected
        if live is not None:
            assert scalars(live)["loss"] == expected
        resumed.discard()
        assert live is None or live.is_dir()  # a live dir is the run's, never removed


def test_search_events_are_rewritten_from_the_kept_trials(tmp_path):
    trials = [
        {"trial": 0, "objective": 3.0},
        {"trial": 1, "objective": 1.0, "complete": False},  # an early stop: no best
        {"trial": 2, "objective": 2.0},
    ]
    TrialEvents(tmp_path, trials[:2]).close()
    events = TrialEvents(tmp_path, trials[:1])  # resumed with one kept trial: 1 is gone
    events.add({"trial": 1, "objective": 0.5}, {"objective": 0.5})
    events.close()
    got = scalars(tmp_path)
    assert got["objective"] == [(0, 3.0), (1, 0.5)]
    assert got["best_objective"] == [(0, 3.0), (1, 0.5)]
    TrialEvents(tmp_path, trials).close()
    got = scalars(tmp_path)
    assert got["objective"] == [(0, 3.0), (1, 1.0), (2, 2.0)]
    assert got["best_objective"] == [(0, 3.0), (1, 3.0), (2, 2.0)]


# ---- a real fine-tune -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tuned(ray_session, tiny_base, tiny_data, make_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    # Two datasets (the fewest a run mixes), a checkpoint mid-way (its events travel in
    # it), a warm-up (the lr moves).
    data = {n: tiny_data[n] for n in ("code", "numbers")}
    raw = make_config(root / "run", tiny_base, data,
                      finetune={"checkpoint_every": 5, "warmup_steps": 4})  # fmt: skip
    config_path = root / "config.yaml"
    config_path.write_text(json.dumps(raw))
    pipeline = Pipeline(parse_config(raw, source=str(config_path)))
    pipeline.run(("finetune",))
    return pipeline, raw, config_path


def test_finetune_events_are_every_step_of_the_recorded_fine_tune(tuned):
    pipeline, _, _ = tuned
    hp = pipeline.cfg.finetune
    steps = list(range(1, hp.max_steps + 1))
    # The warm-up schedule: lr x min(1, step / (warmup + 1)), the lr each step used.
    lrs = [hp.learning_rate * min(1.0, s / (hp.warmup_steps + 1)) for s in steps]
    for name in pipeline.names:
        entry = pipeline.manifest.entry(f"finetune/{name}")
        got = scalars(finetune_events(pipeline.run_dir, name))
        assert set(got) == {"loss", "lr", "tokens_per_s"}
        for tag in got:
            assert [s for s, _ in got[tag]] == steps, (name, tag)
        assert entry["steps"] == hp.max_steps
        assert got["loss"][-1][1] == approx(entry["final_loss"])
        assert got["loss"][-1][1] < got["loss"][0][1]  # it trained
        assert [v for _, v in got["lr"]] == approx(lrs)
        assert all(v > 0 for _, v in got["tokens_per_s"])


def test_the_model_dir_stays_clean_and_a_second_run_skips_the_fine_tune(tuned):
    pipeline, raw, config_path = tuned
    for name in pipeline.names:
        model_dir = pipeline.layout.finetune(name)
        check_model_dir(model_dir, "fine-tune")
        assert not (model_dir / EVENTS).exists()
        assert not [p for p in model_dir.rglob("*") if "tfevents" in p.name]
        outputs = pipeline.manifest.entry(f"finetune/{name}")["outputs"]
        assert outputs and all(rel.startswith(f"finetune/{name}/") for rel in outputs)
    again = Pipeline(parse_config(raw, source=str(config_path)))
    again.run(("finetune",))
    assert again.ran == []
    assert {f"finetune/{n}" for n in pipeline.names} <= set(again.skipped)


def test_events_come_back_in_the_checkpoint_when_workers_cannot_write_the_run_dir(
    ray_session, tuned, tmp_path, monkeypatch
):
    """The bucket route (no live dir), through a worker killed after its checkpoint."""
    from ray import cloudpickle
    from worker_hooks import exit_once as _exit_once

    from dem_ray.ray import finetune
    from dem_ray.ray.finetune import FinetuneJob, run_finetunes

    pipeline, _, _ = tuned
    hp = pipeline.cfg.finetune.model_copy(update={"max_steps": 6, "checkpoint_every": 2})
    shard = {"code": str(pipeline.layout.shard("code", "train"))}
    events = tmp_path / "events"
    job = FinetuneJob("faulty", str(pipeline.ctx.base_dir), shard, str(tmp_path / "model"),
                      events_dir=str(events))  # fmt: skip
    marker, storage = tmp_path / "fault-fired", tmp_path / "ray_train"
    cloudpickle.register_pickle_by_value(sys.modules["worker_hooks"])
    monkeypatch.setattr(finetune, "AFTER_STEP", _exit_once(marker, "faulty", 3, storage))
    try:
        results, errors = run_finetunes([job], hp, storage)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules["worker_hooks"])
    assert errors == {} and marker.exists()
    assert results["faulty"]["resumed_from_step"] == 2
    got = scalars(events)
    assert [s for s, _ in got["loss"]] == [1, 2, 3, 4, 5, 6]  # step 3 once, not twice
    assert got["loss"][-1][1] == approx(results["faulty"]["final_loss"])
    assert not (tmp_path / "model" / EVENTS).exists()


# ---- a real search --------------------------------------------------------------------------
def test_search_events_equal_the_trial_logs(ray_session, tiny_base, tiny_data, make_config,
                                            tmp_path):  # fmt: skip
    raw = make_config(tmp_path / "run", tiny_base, tiny_data,
                      search={"compare_grid": True, "grid_step": 0.5})  # fmt: skip
    pipeline = stand_in_run(raw, tmp_path / "config.yaml")
    try:
        pipeline.run_command("search")
    finally:
        pipeline.close()
    for stage, log in (("search", pipeline.layout.trials),
                       ("search_grid", pipeline.layout.grid_trials)):  # fmt: skip
        trials = read_trials(log)
        wanted = (
            raw["search"]["num_trials"] if stage == "search" else len(pipeline.ctx.space.grid(0.5))
        )
        assert len(trials) == wanted
        got = scalars(search_events(pipeline.run_dir, stage))
        assert got["objective"] == [(t["trial"], approx(t["objective"])) for t in trials]
        best = [min(t["objective"] for t in trials[: i + 1]) for i in range(len(trials))]
        assert [v for _, v in got["best_objective"]] == approx(best)
        assert [s for s, _ in got["best_objective"]] == [t["trial"] for t in trials]
