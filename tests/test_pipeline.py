"""The whole pipeline through real local Ray on a tiny model and tiny data."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dem_ray.config import parse_config
from dem_ray.core.perplexity import objective, perplexity, token_nll
from dem_ray.pipeline import Pipeline

ALL_STAGES = [
    "base", "data/numbers", "data/letters", "data/code",
    "finetune/numbers", "finetune/letters", "finetune/code",
    "vectors/numbers", "vectors/letters", "vectors/code",
    "search", "merge", "report",
]  # fmt: skip


@pytest.fixture(scope="module")
def finished(ray_session, pretrained_base, tiny_data, make_config, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    raw = make_config(run_dir / "run", pretrained_base, tiny_data)
    config_path = run_dir / "config.yaml"
    config_path.write_text(json.dumps(raw))  # JSON is YAML
    pipeline = Pipeline(parse_config(raw, source=str(config_path)))
    pipeline.run()
    return pipeline, raw, config_path


def test_every_stage_ran_once(finished):
    pipeline, _, _ = finished
    assert pipeline.ran == ALL_STAGES
    assert pipeline.skipped == []


def test_finetunes_are_hf_dirs_that_moved(finished, pretrained_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pipeline, _, _ = finished
    base = load_file(pretrained_base / "model.safetensors")
    for name in pipeline.names:
        path = pipeline.layout.finetune(name)
        AutoModelForCausalLM.from_pretrained(path)
        AutoTokenizer.from_pretrained(path)
        tuned = load_file(path / "model.safetensors")
        assert tuned.keys() == base.keys()
        assert any(not torch.equal(tuned[k], base[k]) for k in base)
        cost = pipeline.manifest.entry(f"finetune/{name}")["cost"]
        # 12 steps x batch 8 x seq_len 32 on one worker.
        assert cost["tokens_trained"] == 12 * 8 * 32
        assert cost["device_seconds"] > 0 and cost["wall_seconds"] > 0


def test_vectors_are_differences(finished, pretrained_base):
    pipeline, _, _ = finished
    base = load_file(pretrained_base / "model.safetensors")
    for name in pipeline.names:
        tuned = load_file(pipeline.layout.finetune(name) / "model.safetensors")
        vector = load_file(pipeline.layout.vector(name))
        assert vector.keys() == base.keys()
        for key in base:
            assert torch.equal(vector[key], tuned[key] - base[key]), key


def test_trials_file(finished):
    pipeline, raw, _ = finished
    lines = (pipeline.run_dir / "search" / "trials.jsonl").read_text().splitlines()
    trials = [json.loads(line) for line in lines]
    assert len(trials) == raw["search"]["num_trials"]
    for trial in trials:
        assert set(trial["weights"]) == set(pipeline.names)
        assert min(trial["weights"].values()) >= 0
        assert sum(trial["weights"].values()) == pytest.approx(1.0, abs=1e-9)
        assert set(trial["ppl"]) == set(pipeline.names)
        logs = [torch.log(torch.tensor(trial["ppl"][n], dtype=torch.float64)) for n in trial["ppl"]]
        assert trial["objective"] == pytest.approx(float(sum(logs) / len(logs)), rel=1e-9)
    best = json.loads((pipeline.run_dir / "search" / "best.json").read_text())
    assert best["objective"]["value"] == min(t["objective"] for t in trials)


def test_merged_model_is_base_plus_weighted_vectors(finished, pretrained_base):
    from transformers import AutoModelForCausalLM

    pipeline, _, _ = finished
    weights = pipeline.report()["best_weights"]
    base = load_file(pretrained_base / "model.safetensors")
    merged = load_file(pipeline.run_dir / "merged" / "model.safetensors")
    vectors = {n: load_file(pipeline.layout.vector(n)) for n in pipeline.names}
    for key in base:
        expected = base[key].double() + sum(weights[n] * vectors[n][key].double() for n in vectors)
        torch.testing.assert_close(merged[key].double(), expected, rtol=0, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(pipeline.run_dir / "merged")
    # Tied embeddings: the output head is the merged embedding, stored once.
    assert torch.equal(model.lm_head.weight, merged["model.embed_tokens.weight"])


def test_report_matches_a_recomputation(finished):
    from transformers import AutoModelForCausalLM

    from dem_ray.ray.evaluator import sample_rows

    pipeline, raw, _ = finished
    report = pipeline.report()
    assert set(report) >= {"best_weights", "objective", "num_trials", "ppl", "cost"}
    assert report["num_trials"] == raw["search"]["num_trials"]
    expected_models = {"base", "dem", *(f"finetuned/{n}" for n in pipeline.names)}
    assert set(report["ppl"]) == expected_models
    limit = raw["evaluator"]["max_validation_sequences"]
    models = {"dem": pipeline.run_dir / "merged", "base": pipeline.ctx.base_dir}
    models |= {f"finetuned/{n}": pipeline.layout.finetune(n) for n in pipeline.names}
    for label, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        nll = {}
        for name in pipeline.names:
            rows = load_file(pipeline.layout.shard(name, "validation"))["input_ids"]
            rows = sample_rows(rows, limit, pipeline.cfg.finetune.seed)  # the seeded sample
            nll[name] = token_nll(model, rows, batch_size=5)
            assert report["ppl"][label][name] == pytest.approx(perplexity(*nll[name]), rel=1e-4)
        assert report["objectives"][label] == pytest.approx(objective(nll), rel=1e-5)
    assert report["objective"]["value"] == pytest.approx(report["objectives"]["dem"])
    for stage in ("finetune", "vectors", "search", "merge", "report"):
        assert report["cost"][stage]["wall_seconds"] > 0
    assert report["cost"]["search"]["evaluations"] == raw["search"]["num_trials"]
    markdown = (pipeline.run_dir / "report" / "report.md").read_text()
    assert f"{report['ppl']['dem']['code']:.3f}" in markdown
    assert (pipeline.run_dir / "report" / "search.png").stat().st_size > 1000


def test_the_composite_beats_the_base_every_specialist_and_the_uniform_composite(finished):
    """On a pretrained base (not a random one) the searched composite is the best model on
    the objective: better than the base, than each specialist and than equal weights."""
    import ray

    pipeline, _, _ = finished
    report = pipeline.report()
    dem = report["objectives"]["dem"]
    assert dem < report["objectives"]["base"]
    for name in pipeline.names:
        assert dem < report["objectives"][f"finetuned/{name}"], name
    actor = pipeline.evaluators()[0]
    uniform = ray.get(actor.evaluate.remote([1 / len(pipeline.names)] * len(pipeline.names)))
    assert dem < objective({n: tuple(v) for n, v in uniform["nll"].items()})


def test_second_run_skips_everything_and_cli_prints_summary(finished):
    _, _, config_path = finished
    done = subprocess.run(
        [sys.executable, "-m", "dem_ray.cli", "run", str(config_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "stages run: none" in done.stdout
    assert "finetune/code" in done.stdout.split("stages skipped")[1]
    assert "validation perplexity" in done.stdout and "merged model:" in done.stdout


def test_changing_one_dataset_reruns_only_what_depends_on_it(
    ray_session, tiny_base, tiny_data, make_config, tmp_path
):
    import shutil

    from dem_ray.models.tiny import synthetic_corpus, write_jsonl

    data = {n: tmp_path / p.name for n, p in tiny_data.items()}
    for name, path in tiny_data.items():
        shutil.copy(path, data[name])
    raw = make_config(tmp_path / "run", tiny_base, data, search={"num_trials": 2})
    first = Pipeline(parse_config(raw))
    first.run()
    write_jsonl(data["letters"], synthetic_corpus("letters", 160, seed=99))
    second = Pipeline(parse_config(raw))
    second.run()
    assert second.ran == [
        "data/letters", "finetune/letters", "vectors/letters", "search", "merge", "report",
    ]  # fmt: skip


def test_grid_search_visits_every_grid_point(finished, make_config, tiny_base, tiny_data):
    from dem_ray.core.spaces import load_space
    from dem_ray.ray.search import run_search

    pipeline, raw, _ = finished
    cfg = parse_config(make_config(pipeline.run_dir, tiny_base, tiny_data,
                                   search={"algorithm": "grid", "grid_step": 0.5}))  # fmt: skip
    space = load_space("simplex", pipeline.names)
    out = pipeline.run_dir / "grid-test"
    trials = run_search(cfg.search, space, pipeline.evaluators(), out)
    seen = sorted(tuple(t["weights"][n] for n in pipeline.names) for t in trials)
    assert seen == sorted(tuple(p[n] for n in pipeline.names) for p in space.grid(0.5))
    assert len(seen) == 6
    corner = next(t for t in trials if t["weights"]["code"] == 1.0)
    assert corner["ppl"]["code"] == pytest.approx(pipeline.report()["ppl"]["finetuned/code"]["code"],
                                                  rel=1e-4)  # fmt: skip


@pytest.mark.parametrize("algorithm", ["cmaes", "gp", "random"])
def test_other_samplers_run_and_stay_on_the_simplex(
    finished, make_config, tiny_base, tiny_data, algorithm
):
    from dem_ray.core.spaces import load_space
    from dem_ray.ray.search import run_search

    pipeline, _, _ = finished
    raw = make_config(pipeline.run_dir, tiny_base, tiny_data,
                      search={"algorithm": algorithm, "num_trials": 3, "seed": 1})  # fmt: skip
    cfg = parse_config(raw)
    space = load_space("simplex", pipeline.names)
    out = pipeline.run_dir / f"{algorithm}-test"
    trials = run_search(cfg.search, space, pipeline.evaluators(), out)
    assert len(trials) == 3
    for trial in trials:
        assert sum(trial["weights"].values()) == pytest.approx(1.0, abs=1e-9)
        assert min(trial["weights"].values()) >= 0


def test_asha_stops_hopeless_candidates_and_keeps_the_record_consistent(
    finished, make_config, tiny_base, tiny_data
):
    import ray

    from dem_ray.core.spaces import load_space
    from dem_ray.ray.search import best_trial, run_search

    pipeline, _, _ = finished
    search = {"num_trials": 10, "max_concurrent": 1, "seed": 3, "scheduler": "asha", "slices": 4}
    cfg = parse_config(make_config(pipeline.run_dir, tiny_base, tiny_data, search=search))
    space = load_space("simplex", pipeline.names)
    pool = pipeline.evaluators()
    out = pipeline.run_dir / "asha-test"
    trials = run_search(cfg.search, space, pool, out)

    assert len(trials) == 10
    assert len({t["trial_id"] for t in trials}) == 10
    stopped = [t for t in trials if not t["complete"]]
    complete = [t for t in trials if t["complete"]]
    assert stopped and complete  # seed 3, one at a time: the same trials stop every run
    # Tokens per slice: rows part::4 of each validation shard, seq_len - 1 predicted each.
    rows = {n: ray.get(pool[0].info.remote())["validation_tokens"][n] // 31 for n in pipeline.names}
    per_slice = [sum(len(range(p, r, 4)) * 31 for r in rows.values()) for p in range(4)]
    full = sum(per_slice)
    for t in stopped:
        assert 1 <= t["slices_done"] < 4
        assert t["tokens_evaluated"] == sum(per_slice[: t["slices_done"]])
    for t in complete:
        assert t["slices_done"] == 4 and t["tokens_evaluated"] == full
        whole = ray.get(pool[0].evaluate.remote([t["weights"][n] for n in pipeline.names]))
        nll = {n: tuple(v) for n, v in whole["nll"].items()}
        # Slices batch rows differently from one pass: float32 forward differs in ~1e-8.
        assert t["objective"] == pytest.approx(objective(nll), rel=1e-6)
    assert best_trial(trials) in complete
    assert best_trial(trials)["objective"] == min(t["objective"] for t in complete)
    assert sum(t["tokens_evaluated"] for t in trials) < 10 * full


def test_best_trial_ignores_early_stopped_estimates():
    from dem_ray.ray.search import best_trial

    trials = [
        {"objective": 1.0, "complete": False, "slices_done": 1},
        {"objective": 2.0, "complete": True, "slices_done": 4},
        {"objective": 3.0},  # written before multi-fidelity: a full evaluation
    ]
    assert best_trial(trials)["objective"] == 2.0
    with pytest.raises(RuntimeError, match="all validation slices"):
        best_trial(trials[:1])


def test_adding_a_dataset_fine_tunes_only_it_and_warm_starts_the_search(
    ray_session, tiny_base, tiny_data, make_config, tmp_path
):
    from dem_ray.ray.search import read_trials

    two = {n: tiny_data[n] for n in ("numbers", "letters")}
    search = {"num_trials": 5, "warm_start": 3}
    first = Pipeline(parse_config(make_config(tmp_path / "run", tiny_base, two, search=search)))
    first.run()
    earlier = read_trials(first.run_dir / "search" / "trials.jsonl")
    expected = sorted(earlier, key=lambda t: t["objective"])[:3]

    raw = make_config(tmp_path / "run", tiny_base, tiny_data, search=search)
    second = Pipeline(parse_config(raw))
    second.run()
    assert second.ran == ["data/code", "finetune/code", "vectors/code", "search", "merge", "report"]
    trials = read_trials(second.run_dir / "search" / "trials.jsonl")
    assert len(trials) == 5
    rescored = [{**t["weights"], "code": 0.0} for t in expected]
    seen = [t["weights"] for t in trials]
    for weights in rescored:  # each earlier best composite was evaluated again, as it was
        assert any(all(abs(w[n] - weights[n]) < 1e-9 for n in weights) for w in seen), weights
    report = second.report()
    update = report["update"]
    assert update["updated"] == ["code"] and update["new"] == ["code"]
    assert update["reused"] == ["numbers", "letters"] and update["warm_start_points"] == 3
    per = report["cost"]["finetune"]["per_dataset"]
    assert update["cost"]["tokens_trained"] == per["code"]["tokens_trained"]
    assert update["rerun_everything"]["tokens_trained"] == sum(
        p["tokens_trained"] for p in per.values()
    )
    # No baseline configured: the grid at search.grid_step 0.25 over 3 datasets, 15 mixtures
    # of 3 x 12 steps, each step costing what a fine-tuning step cost.
    grid = update["baseline_grid_estimate"]
    assert (grid["mixtures"], grid["steps_per_mixture"]) == (15, 36)
    assert grid["tokens_trained"] == pytest.approx(15 * 36 * 8 * 32)
    assert 0 < update["fraction_of_rerun"]["device_seconds"] < 1
    markdown = (second.run_dir / "report" / "report.md").read_text()
    assert "## Cost of the last update" in markdown and "fine-tuned only code" in markdown


def test_raising_num_trials_runs_only_the_missing_trials(
    ray_session, tiny_base, tiny_data, make_config, tmp_path
):
    import ray
    from conftest import stand_in_run

    from dem_ray.ray.search import read_trials

    raw = make_config(tmp_path / "run", tiny_base, tiny_data, search={"num_trials": 16})
    first = stand_in_run(raw, tmp_path / "config.yaml")
    first.run_command("search")
    first.close()
    kept = read_trials(first.layout.trials)
    assert len(kept) == 16

    def run_search(**search):
        pipeline = Pipeline(parse_config(make_config(tmp_path / "run", tiny_base, tiny_data,
                                                     search=search)))  # fmt: skip
        pipeline.open()
        try:
            pipeline.run_command("search")
            actors = pipeline.ctx.pool.actors
            calls = ray.get(actors[0].info.remote())["calls"] if actors else 0
        finally:
            pipeline.close()
        return pipeline, calls

    more, calls = run_search(num_trials=24)
    assert more.ran == ["search"] and calls == 8
    trials = read_trials(more.layout.trials)
    assert trials[:16] == kept and len(trials) == 24
    candidates = {tuple(round(t["weights"][n], 12) for n in more.names) for t in trials}
    assert len(candidates) == 24  # no candidate evaluated twice
    assert more.manifest.entry("search")["num_trials"] == 24

    grid, _ = run_search(num_trials=24, compare_grid=True)
    assert grid.ran == ["search_grid"] and grid.skipped[-1] == "search"
    assert read_trials(grid.layout.trials) == trials

    fewer, calls = run_search(num_trials=8)
    assert fewer.ran == [] and calls == 0  # more than asked for is enough


def test_a_second_writer_is_refused(tiny_base, tiny_data, make_config, tmp_path, capsys):
    import textwrap

    from dem_ray.cli import main

    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(make_config(tmp_path / "run", tiny_base, tiny_data)))
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from dem_ray.config import load_config
            from dem_ray.pipeline import Pipeline
            pipeline = Pipeline(load_config({str(config)!r}))
            pipeline.open("search")
            print("open", flush=True)
            sys.stdin.read()
            pipeline.close()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "open"
        code = main(["search", str(config)])
        err = capsys.readouterr().err
        assert code == 1
        assert f"is in use by pid {holder.pid} on host" in err and "(dem-ray search)" in err
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert holder.returncode == 0


def test_released_pool_gives_its_cpus_back_before_returning(finished):
    import ray

    pipeline, _, _ = finished
    pipeline.ctx.pool.release()
    free = ray.available_resources().get("CPU", 0.0)
    pipeline.evaluators()
    assert ray.available_resources().get("CPU", 0.0) == pytest.approx(free - 0.5)
    pipeline.ctx.pool.release()  # the baseline counts free CPUs right after this to launch trainers
    assert ray.available_resources().get("CPU", 0.0) == pytest.approx(free)
