"""Downstream tasks with lm-evaluation-harness: the report's scores are lm-eval's own on the
saved models, the rerank merges the candidate with the best task score, and a task that
cannot run is an error before any work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import stand_in_run
from safetensors.torch import load_file

from dem_ray.config import ConfigError, parse_config
from dem_ray.core.merge import merge_to_dir
from dem_ray.models.tiny import synthetic_corpus
from dem_ray.pipeline import Pipeline

lm_eval = pytest.importorskip("lm_eval")

LIMIT = 10
BATCH = 4


def write_tasks(root: Path) -> dict[str, Path]:
    """Two local tasks on data the fine-tunes never saw: a multiple-choice cloze (a passage's
    true continuation against others' from other styles) and rolling perplexity."""
    root.mkdir(parents=True, exist_ok=True)
    styles = ("numbers", "letters", "code")
    docs = {s: synthetic_corpus(s, 12, seed=99) for s in styles}
    items = []
    for i, style in enumerate(styles):
        for j, text in enumerate(docs[style][:5]):
            others = [docs[o][j][30:70].strip() for o in styles if o != style]
            choices = [text[30:70].strip(), *others]
            label = (i + j) % len(choices)
            choices.insert(label, choices.pop(0))
            items.append({"context": text[:30].strip(), "choices": choices, "label": label})
    (root / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in items))
    texts = [{"text": t} for s in styles for t in docs[s][5:9]]
    (root / "rolling.jsonl").write_text("\n".join(json.dumps(r) for r in texts))
    common = {"dataset_path": "json", "test_split": "test"}
    mc = {
        "task": "tiny_cloze", **common,
        "dataset_kwargs": {"data_files": {"test": str(root / "mc.jsonl")}},
        "output_type": "multiple_choice", "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    }  # fmt: skip
    rolling = {
        "task": "tiny_rolling", **common,
        "dataset_kwargs": {"data_files": {"test": str(root / "rolling.jsonl")}},
        "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
        "metric_list": [
            {"metric": "word_perplexity", "aggregation": "weighted_perplexity",
             "higher_is_better": False},
            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
        ],
    }  # fmt: skip
    paths = {"mc": root / "mc.yaml", "rolling": root / "rolling.yaml"}
    paths["mc"].write_text(yaml.safe_dump(mc, sort_keys=False))
    paths["rolling"].write_text(yaml.safe_dump(rolling, sort_keys=False))
    return paths


def reference_scores(model_dir: Path, task_files: list[Path]) -> dict:
    """lm-eval's own numbers: `simple_evaluate` on the saved model directory."""
    from dem_ray.downstream.harness import parse_results
    from dem_ray.downstream.tasks import task_manager

    names = [yaml.safe_load(p.read_text())["task"] for p in task_files]
    # lm-eval's TaskManager over the task files' directories (built once per include path:
    # indexing lm-eval's own tasks takes seconds)
    manager = task_manager(tuple(sorted({str(p.parent) for p in task_files})))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the evaluator actor runs (evaluator.torch_threads)
    try:
        results = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=names,
            num_fewshot=0, limit=LIMIT, batch_size=BATCH, device="cpu", task_manager=manager,
            log_samples=False,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return parse_results(results)[0]


def downstream_config(tmp_path, base, data, tasks: list[Path], **downstream) -> dict:
    from conftest import tiny_config

    raw = tiny_config(tmp_path / "run", base, data, search={"num_trials": 6, "max_concurrent": 1})
    raw["downstream"] = {"tasks": [str(p) for p in tasks], "limit": LIMIT,
                         "batch_size": BATCH, **downstream}  # fmt: skip
    return raw


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> dict[str, Path]:
    return write_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def scored_run(ray_session, pretrained_base, tiny_data, task_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("downstream")
    raw = downstream_config(root, pretrained_base, tiny_data,
                            [task_files["mc"], task_files["rolling"]])  # fmt: skip
    pipeline = stand_in_run(raw, root / "config.json")
    for command in ("search", "merge", "downstream", "report"):
        pipeline.run_command(command)
    pipeline.close()
    return pipeline, raw, root


def test_report_scores_are_lm_evals_own(scored_run, task_files):
    pipeline, _, _ = scored_run
    report = pipeline.report()
    names = pipeline.names
    assert list(report["downstream"]) == ["base", *(f"finetuned/{n}" for n in names), "dem"]
    files = [task_files["mc"], task_files["rolling"]]
    for label, model_dir in (
        ("dem", pipeline.layout.merged),
        ("base", pipeline.ctx.base_dir),
        (f"finetuned/{names[1]}", pipeline.layout.finetune(names[1])),
    ):
        assert report["downstream"][label] == reference_scores(model_dir, files), label
    dem = report["downstream"]["dem"]
    assert set(dem) == {"tiny_cloze", "tiny_rolling"}
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(dem["tiny_cloze"])
    assert "word_perplexity" in dem["tiny_rolling"] and "bits_per_byte" in dem["tiny_rolling"]
    info = report["downstream_info"]
    assert info["tasks"] == ["tiny_cloze", "tiny_rolling"]
    assert info["samples"] == {"tiny_cloze": LIMIT, "tiny_rolling": LIMIT}
    assert info["higher_is_better"]["tiny_rolling"]["word_perplexity"] is False
    assert info["rerank"] is None
    # Its cost is its own line, in neither side's total.
    cost = report["cost"]
    assert cost["downstream"]["device_seconds"] > 0 and cost["downstream"]["tokens_evaluated"] > 0
    entries = [pipeline.manifest.entry(f"downstream/{label}") for label in report["downstream"]]
    assert len({e["cost"]["stage_run"]["id"] for e in entries}) == 1  # one run of the stage
    # its wall time is that run's (the last model landed), not the sum of the models' own
    elapsed = max(e["cost"]["stage_run"]["elapsed_seconds"] for e in entries)
    assert cost["downstream"]["wall_seconds"] == pytest.approx(elapsed)
    assert all(e["cost"]["wall_seconds"] <= elapsed for e in entries)
    dem_stages = sum(cost[s]["device_seconds"] for s in ("finetune", "vectors", "search", "merge"))
    assert cost["dem"]["device_seconds"] == pytest.approx(dem_stages)
    md = (pipeline.layout.report / "report.md").read_text()
    assert "## Downstream tasks" in md and "tiny_cloze acc" in md
    assert (pipeline.layout.report / "downstream.png").stat().st_size > 1000


def test_downstream_is_skipped_when_up_to_date_and_stale_when_a_task_file_changes(
    scored_run, task_files
):
    pipeline, raw, root = scored_run
    again = Pipeline(parse_config(raw, source=str(root / "config.json")))
    again.run(("downstream",))
    assert again.ran == [] and len(again.skipped) == 5
    data = task_files["rolling"].parent / "rolling.jsonl"
    saved = data.read_text()
    try:
        data.write_text("\n".join(saved.splitlines()[1:]))  # one document fewer
        changed = Pipeline(parse_config(raw, source=str(root / "config.json")))
        changed.open()
        try:
            from dem_ray.stages.downstream import DownstreamStage

            steps = DownstreamStage().steps(changed.ctx)
            assert steps and all(not changed._is_done(s) for s in steps)
        finally:
            changed.close()
    finally:
        data.write_text(saved)


def test_rerank_merges_the_candidate_with_the_best_task_score(
    ray_session, pretrained_base, tiny_data, task_files, tmp_path
):
    raw = downstream_config(tmp_path, pretrained_base, tiny_data, [task_files["rolling"]],
                            rerank_top=3, rerank_metric="word_perplexity", models=["dem"])  # fmt: skip
    pipeline = stand_in_run(raw, tmp_path / "config.json", noise=0.05)
    for command in ("search", "merge", "downstream", "report"):
        pipeline.run_command(command)
    pipeline.close()
    rerank = json.loads((pipeline.layout.search / "rerank.json").read_text())
    trials = [json.loads(line) for line in pipeline.layout.trials.read_text().splitlines()]
    by_objective = sorted(trials, key=lambda t: t["objective"])[:3]
    assert [c["trial"] for c in rerank["candidates"]] == [t["trial"] for t in by_objective]
    keys = pipeline.ctx.space.keys
    layout = pipeline.layout
    vectors = [layout.vector(n) for n in pipeline.names]
    perplexities = []
    for i, candidate in enumerate(rerank["candidates"]):
        out = tmp_path / f"candidate{i}"
        merge_to_dir(pipeline.ctx.base_dir, vectors, [candidate["weights"][k] for k in keys], out,
                     side_files=[p for p in pipeline.ctx.base_dir.iterdir()
                                 if p.suffix != ".safetensors"])  # fmt: skip
        expected = reference_scores(out, [task_files["rolling"]])
        assert candidate["scores"] == expected  # live-merged scores equal lm-eval's on disk
        perplexities.append(expected["tiny_rolling"]["word_perplexity"])
    assert len(set(perplexities)) == 3  # the choice is not a tie
    best = min(range(3), key=lambda i: perplexities[i])  # lower is better for this metric
    assert rerank["chosen"] == best
    chosen = rerank["candidates"][best]["weights"]
    assert pipeline.manifest.entry("merge")["weights"] == chosen
    merged = load_file(layout.merged / "model.safetensors")
    again = load_file(tmp_path / f"candidate{best}" / "model.safetensors")
    assert merged.keys() == again.keys()
    assert all(torch.equal(merged[k], again[k]) for k in merged)
    report = pipeline.report()
    assert report["weights_source"] == "rerank" and report["dem_weights"] == chosen
    assert report["downstream_info"]["rerank"]["chosen"] == best
    assert "rerank" in report["cost"] and report["cost"]["rerank"]["evaluations"] == 3
    assert math.isclose(
        report["cost"]["dem"]["device_seconds"],
        sum(report["cost"][s]["device_seconds"]
            for s in ("finetune", "vectors", "search", "rerank", "merge")),
    )  # fmt: skip


# ---- errors before any work ---------------------------------------------------------------


def _opens(raw: dict, tmp_path: Path) -> None:
    pipeline = Pipeline(parse_config(raw, source=str(tmp_path / "config.yaml")))
    try:
        pipeline.open()
    finally:
        pipeline.close()


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        (["no_such_task_anywhere"], "'no_such_task_anywhere' is not an lm-eval task"),
        (["missing.yaml"], "downstream task file missing.yaml not found"),
        (["arc_easy"], "cannot be reached from here"),
    ],
)
def test_a_task_that_cannot_run_fails_before_any_work(
    tiny_base, tiny_data, tmp_path, tasks, message
):
    raw = downstream_config(tmp_path, tiny_base, tiny_data, [])
    raw["downstream"]["tasks"] = tasks
    with pytest.raises(ConfigError, match=message):
        _opens(raw, tmp_path)
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_a_local_task_with_a_broken_dataset_path_fails_before_any_work(
    tiny_base, tiny_data, task_files, tmp_path
):
    broken = yaml.safe_load(task_files["mc"].read_text())
    broken["task"] = "tiny_broken"
    broken["dataset_kwargs"]["data_files"]["test"] = str(tmp_path / "gone.jsonl")
    path = tmp_path / "tasks" / "broken.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(broken))
    raw = downstream_config(tmp_path, tiny_base, tiny_data, [path])
    with pytest.raises(ConfigError, match=r"tiny_broken.*gone\.jsonl not found"):
        _opens(raw, tmp_path)
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_rerank_asks_for_more_candidates_than_trials(tiny_base, tiny_data, task_files, tmp_path):
    raw = downstream_config(tmp_path, tiny_base, tiny_data, [task_files["mc"]], rerank_top=7)
    with pytest.raises(
        ConfigError, match=r"rerank_top' \(7\) is larger than 'search.num_trials' \(6\)"
    ):
        parse_config(raw)


def test_rerank_metric_the_tasks_do_not_report(tiny_base, tiny_data, task_files, tmp_path):
    raw = downstream_config(tmp_path, tiny_base, tiny_data, [task_files["mc"]], rerank_top=2,
                            rerank_metric="exact_match")  # fmt: skip
    with pytest.raises(
        ConfigError, match="'exact_match', but task 'tiny_cloze' reports acc, acc_norm"
    ):
        _opens(raw, tmp_path)


def test_rerank_choice_breaks_ties_by_the_validation_objective():
    from dem_ray.stages.downstream import choose

    scores = lambda *xs: [{"score": x} for x in xs]  # noqa: E731 - rows come best first
    assert choose(scores(0.5, 0.7, 0.6), higher_is_better=True) == 1
    assert choose(scores(0.5, 0.7, 0.6), higher_is_better=False) == 0
    assert choose(scores(0.7, 0.7), higher_is_better=True) == 0
    noisy = (1.0 + 0.525 + 0.4) / 3  # the same mean as 0.6416..., summed another way
    assert noisy != (1.0 + 0.5 + 0.425) / 3
    assert choose(scores((1.0 + 0.5 + 0.425) / 3, noisy), higher_is_better=True) == 0
