"""The search's trials in Optuna storage: every trial of the log, and only those, in a study
that `optuna.load_study` (and so optuna-dashboard) opens."""

from __future__ import annotations

import math

import optuna
import pytest
from conftest import stand_in_run

from dem_ray.ray.search import read_trials, run_search
from dem_ray.run.study import study_name


def assert_study_is_the_log(study: optuna.Study, trials: list[dict]) -> None:
    assert len(study.trials) == len(trials)
    for frozen, trial in zip(study.trials, trials, strict=True):
        assert frozen.user_attrs["trial"] == trial["trial"]
        assert frozen.user_attrs["weights"] == trial["weights"]
        assert frozen.user_attrs["ppl"] == trial["ppl"]
        assert {n: frozen.user_attrs[f"ppl/{n}"] for n in trial["ppl"]} == trial["ppl"]
        if not trial["complete"]:
            assert frozen.state.name == "PRUNED"
            assert frozen.user_attrs["objective_estimate"] == trial["objective"]
        elif math.isfinite(trial["objective"]):
            assert frozen.state.name == "COMPLETE" and frozen.value == trial["objective"]
        if trial["params"]:
            assert frozen.params == trial["params"]


@pytest.fixture
def stand_in(ray_session, tiny_base, tiny_data, make_config, tmp_path):
    def build(**search):
        raw = make_config(tmp_path / "run", tiny_base, tiny_data, search=search)
        return stand_in_run(raw, tmp_path / "config.yaml")

    return build


def test_every_trial_of_a_search_is_in_its_study(stand_in):
    pipeline = stand_in(num_trials=8, scheduler="asha", slices=2, seed=3, max_concurrent=1)
    try:
        pipeline.run_command("search")
    finally:
        pipeline.close()
    trials = read_trials(pipeline.layout.trials)
    assert any(not t["complete"] for t in trials), "ASHA stopped nothing: PRUNED is untested"
    name = study_name("search", pipeline.manifest.entry("search")["inputs"])
    url = f"sqlite:///{pipeline.layout.study}"
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == [name]
    study = optuna.load_study(study_name=name, storage=url)
    assert_study_is_the_log(study, trials)
    assert study.best_value == min(t["objective"] for t in trials if t["complete"])


def test_an_extended_search_rebuilds_its_study_without_a_trial_twice(stand_in):
    pipeline = stand_in(num_trials=4)
    url = f"sqlite:///{pipeline.layout.study}"
    where = (url, "search-extended")
    out = pipeline.layout.search
    cfg = pipeline.cfg.search
    try:
        actors = pipeline.evaluators()
        run_search(cfg, pipeline.ctx.space, actors, out, inputs="x", fresh=False, study=where)
        more = cfg.model_copy(update={"num_trials": 7})
        run_search(more, pipeline.ctx.space, actors, out, inputs="x", fresh=False, study=where)
    finally:
        pipeline.close()
    trials = read_trials(out / "trials.jsonl")
    assert len(trials) == 7
    assert_study_is_the_log(optuna.load_study(study_name="search-extended", storage=url), trials)


def test_storage_off_writes_no_study(stand_in):
    pipeline = stand_in(num_trials=2, storage="off")
    try:
        pipeline.run_command("search")
    finally:
        pipeline.close()
    assert len(read_trials(pipeline.layout.trials)) == 2
    assert not pipeline.layout.study.exists()
