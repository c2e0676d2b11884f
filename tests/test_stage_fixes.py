"""The bugs the stage redesign fixed, each pinned by a test that fails without its fix."""

from __future__ import annotations

import json
import logging
import math
import sys
import time

import pytest
import torch
from conftest import stand_in_run

from dem_ray.config import parse_config
from dem_ray.core.mixtures import mixture_id
from dem_ray.pipeline import Pipeline


# ---- mixture ids ------------------------------------------------------------------------------
def test_mixture_ids_are_exact():
    a = {"code": 0.1234, "chat": 0.8766}
    b = {"code": 0.1231, "chat": 0.8769}
    assert mixture_id(a) != mixture_id(b)  # 3 decimals made them one mixture
    assert mixture_id({"a": 0.5, "b": 0.5}) == "a0.5-b0.5"
    third = 1 / 3
    assert float(mixture_id({"a": third, "b": 1 - third})[1:].split("-")[0]) == third


# ---- cost: fractional GPUs, GPU counts, the pool's start-up ---------------------------------------
def test_an_actor_on_half_a_gpu_counts_half_a_gpu_second_per_second(monkeypatch):
    import ray

    from dem_ray.ray import evaluator

    class Context:
        def get_assigned_resources(self):
            return {"CPU": 1.0, "GPU": 0.5}

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: Context())
    assert evaluator._gpus_held() == 0.5


def test_a_finetune_worker_on_two_gpus_counts_two_gpu_seconds_per_second(monkeypatch):
    from dem_ray.ray import finetune

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    wall0 = time.perf_counter() - 10.0
    spent = finetune._device_seconds(torch.device("cuda"), wall0, 0.0, gpus=2.0)
    assert spent == pytest.approx(20.0, rel=0.01)


def test_the_search_cost_includes_loading_base_and_vectors_into_the_actors(
    ray_session, tiny_base, tiny_data, make_config, tmp_path
):
    from dem_ray.ray.search import read_trials

    raw = make_config(tmp_path / "run", tiny_base, tiny_data, search={"num_trials": 2})
    pipeline = stand_in_run(raw, tmp_path / "config.yaml")
    try:
        pipeline.run_command("search")
    finally:
        pipeline.close()
    cost = pipeline.manifest.entry("search")["cost"]
    trials = read_trials(pipeline.layout.trials)
    assert cost["startup_device_seconds"] > 0
    assert (
        cost["device_seconds"]
        == sum(t["device_seconds"] for t in trials) + cost["startup_device_seconds"]
    )


# ---- trust_remote_code reaches the fine-tune workers -------------------------------------------
def test_trust_remote_code_reaches_the_workers():
    from dem_ray.config import FinetuneConfig
    from dem_ray.ray.finetune import FinetuneJob, loop_config

    job = FinetuneJob("code", "/base", {"code": "/shard"}, "/out")
    assert loop_config(job, FinetuneConfig(), trust_remote_code=True)["trust_remote_code"] is True
    assert loop_config(job, FinetuneConfig(), trust_remote_code=False)["trust_remote_code"] is False


# ---- the report names the weights it scored -------------------------------------------------------
def test_after_merge_weights_the_report_labels_dem_with_those_weights(
    ray_session, tiny_base, tiny_data, make_config, tmp_path, capsys
):
    from dem_ray.cli import main

    raw = make_config(tmp_path / "run", tiny_base, tiny_data, search={"num_trials": 2})
    config = tmp_path / "config.yaml"
    pipeline = stand_in_run(raw, config)
    try:
        pipeline.run_command("search")
    finally:
        pipeline.close()
    assert main(["merge", str(config), "--weights", "numbers=0.2,letters=0.3,code=0.5"]) == 0
    assert main(["report", str(config)]) == 0
    out = capsys.readouterr().out
    report = json.loads((pipeline.layout.report / "report.json").read_text())
    given = {"numbers": 0.2, "letters": 0.3, "code": 0.5}
    assert report["dem_weights"] == given
    best = json.loads(pipeline.layout.best.read_text())["weights"]
    assert report["best_weights"] == best != given
    assert "merged weights: numbers=0.200, letters=0.300, code=0.500" in out
    markdown = (pipeline.layout.report / "report.md").read_text()
    assert "given with `merge --weights`" in markdown


# ---- the baseline: resume, exact inputs, a changed objective ---------------------------------------
def _fail_mixture(job: str):
    def after_step(name: str, step: int, rank: int) -> None:
        if name == job:
            raise RuntimeError(f"injected failure in {name}")

    return after_step


def test_a_failed_baseline_keeps_its_scored_mixtures_and_a_new_objective_retrains_nothing(
    ray_session, tiny_base, tiny_data, make_config, tmp_path, monkeypatch, caplog
):
    from ray import cloudpickle

    from dem_ray.ray import finetune
    from dem_ray.stages import StageError
    from dem_ray.stages.baseline import MixturesStage

    two = {n: tiny_data[n] for n in ("numbers", "letters")}
    overrides = {
        "finetune": {"max_steps": 3, "max_failures": 0},
        "search": {"num_trials": 2},
        "baseline": {"grid_step": 0.5, "keep_all": True},
    }
    raw = make_config(tmp_path / "run", tiny_base, two, **overrides)
    failing = "mixture " + mixture_id({"numbers": 0.5, "letters": 0.5})
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(finetune, "AFTER_STEP", _fail_mixture(failing))
    first = Pipeline(parse_config(raw))
    try:
        with pytest.raises(StageError, match="injected failure"):
            first.run(("prepare", "baseline"))
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(finetune, "AFTER_STEP", None)
    ids = [mixture_id(m) for m in ({"numbers": 1.0, "letters": 0.0},
                                    {"numbers": 0.5, "letters": 0.5},
                                    {"numbers": 0.0, "letters": 1.0})]  # fmt: skip
    kept = [i for i in ids if first.manifest.is_recorded(f"baseline/{i}")]
    assert sorted(kept) == sorted([ids[0], ids[2]])  # the two that finished were recorded

    # A run stopped after training a mixture and before scoring it: the model is there
    # (with the inputs it was trained with), its record is not.
    del first.manifest.data["stages"][f"baseline/{ids[0]}"]
    first.manifest.save()
    second = Pipeline(parse_config(raw))
    with caplog.at_level(logging.INFO, logger="dem_ray.stages.baseline"):
        second.run(("baseline",))
    assert second.ran == [f"baseline/{ids[0]}", f"baseline/{ids[1]}", "baseline"]
    assert "1 of 3 mixtures to train (1 trained earlier, to score)" in caplog.text

    by_tokens = {**raw, "search": {**raw["search"], "objective": "token_weighted"}}
    third = Pipeline(parse_config(by_tokens))
    third.run(("baseline",))
    assert third.ran == ["baseline"]  # chosen again from the recorded scores, nothing trained
    entry = third.manifest.entry("baseline")
    for mid in ids:
        nll = third.manifest.entry(f"baseline/{mid}")["nll"]
        pooled = sum(s for s, _ in nll.values()) / sum(n for _, n in nll.values())
        assert entry["objectives"][mid] == pytest.approx(pooled, rel=1e-12)
    assert entry["best"] == min(ids, key=lambda m: entry["objectives"][m])

    # What a mixture's score depends on is part of its inputs (it was left out before).
    fewer = {**raw, "evaluator": {**raw["evaluator"], "max_validation_sequences": 4}}
    autocast = {**raw, "evaluator": {**raw["evaluator"], "autocast": "bfloat16"}}
    digests = []
    for variant in (raw, fewer, autocast):
        p = Pipeline(parse_config(variant))
        p.open()
        try:
            digests.append([s.digest for s in MixturesStage().steps(p.ctx)])
        finally:
            p.close()
    assert digests[0] != digests[1] and digests[0] != digests[2]
    assert all(math.isfinite(v) for v in entry["objectives"].values())
