"""The model cards in `merged/` and `baseline/best/`: Hub-valid front matter, the report's
numbers, and a card that never makes the merge or the baseline look stale."""

from __future__ import annotations

import json
import random
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from conftest import stand_in_run
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

import dem_ray
from dem_ray.config import parse_config
from dem_ray.pipeline import Pipeline
from dem_ray.report.card import hub_model_id, made_by, render_card
from dem_ray.stages import baseline as baseline_stage

COMMANDS = ("search", "merge", "baseline", "report")
HUB_ID = "dem-ray/tiny-base"


def table(card: str, heading: str) -> dict[str, list[str]]:
    """{model: cells} of the Markdown table under `## heading`."""
    section = card.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return {r[0]: r[1:] for r in rows[2:]}  # past the header and the |---| line


def check_numbers(card: str, report: dict, models: list[str]) -> None:
    """Every perplexity in the card is report.json's, for exactly these models."""
    names = report["datasets"]
    for heading, ppl, objectives in (
        ("Validation perplexity", report["ppl"], report["objectives"]),
        ("Test perplexity", report["test_ppl"], report["test_objectives"]),
    ):
        rows = table(card, heading)
        assert sorted(rows) == sorted(models)
        for label in models:
            *cells, objective = map(float, rows[label])
            assert cells == pytest.approx([ppl[label][n] for n in names], abs=5e-4)
            assert objective == pytest.approx(objectives[label], abs=5e-5)


# ---- the pipeline writes the cards; no stage goes stale because of them ---------------------
def stand_in_finetunes(jobs, hp, storage_dir, ray_storage=None, trust_remote_code=False,
                       on_done=None, node_start_timeout_s=900.0):  # fmt: skip
    """The baseline's training without Ray Train: each mixture is the base plus seeded noise."""
    results = {}
    for i, job in enumerate(jobs):
        out = Path(job.out_dir)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(job.base_dir, out)
        gen = torch.Generator().manual_seed(100 + i)
        base = load_file(out / "model.safetensors")
        moved = {k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        save_file(moved, out / "model.safetensors", metadata={"format": "pt"})
        tokens = {n: 64 for n in job.mixture}
        results[job.name] = {"tokens": sum(tokens.values()), "tokens_by_dataset": tokens,
                             "device_seconds": 1.0, "wall_seconds": 1.0, "device": "cpu"}  # fmt: skip
        on_done(job.name, results[job.name])
    return results, {}


def test_the_cards_carry_the_reports_numbers_and_leave_every_stage_up_to_date(
    ray_session, tiny_base, tiny_data, make_config, tmp_path, monkeypatch
):
    monkeypatch.setattr(baseline_stage, "run_finetunes", stand_in_finetunes)
    # A base from the HF cache: its Hub id is known, so the cards name it.
    cached = tmp_path / "hub" / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_base, cached)
    data = {n: tiny_data[n] for n in ("numbers", "letters")}
    mixtures = [{"numbers": 1.0, "letters": 1.0}, {"letters": 1.0}]
    raw = make_config(tmp_path / "run", cached, data, search={"num_trials": 2},
                      baseline={"mixtures": mixtures})  # fmt: skip
    config = tmp_path / "config.yaml"
    pipeline = stand_in_run(raw, config)
    try:
        for command in COMMANDS:
            pipeline.run_command(command)
    finally:
        pipeline.close()
    layout, manifest = pipeline.layout, pipeline.manifest
    report = json.loads((layout.report / "report.json").read_text())
    specialists = [f"finetuned/{n}" for n in pipeline.names]
    models = ["base", *specialists, "dem", "baseline/best"]

    merged = ModelCard.load(layout.merged / "README.md")
    meta = merged.data.to_dict()
    assert meta["base_model"] == HUB_ID and meta["base_model_relation"] == "merge"
    assert meta["tags"] == ["merge", "dem", "dem-ray"]
    assert meta["library_name"] == "transformers"
    assert "datasets" not in meta  # local files: no Hub ids to give
    check_numbers(merged.text, report, models)
    assert not any(label.startswith("mixture/") for label in table(merged.text, "Test perplexity"))
    weights = ", ".join(f"{k} = {v:.4f}" for k, v in report["dem_weights"].items())
    assert weights in merged.text and report["space"] in merged.text
    assert report["merge_method"]["method"] in merged.text
    version = f"with dem-ray {dem_ray.__version__}"
    assert f"Made by `{shlex.join(['dem-ray', 'merge', str(config)])}` {version}" in merged.text

    best = ModelCard.load(layout.best_mixture / "README.md")
    meta = best.data.to_dict()
    assert meta["base_model"] == HUB_ID and meta["base_model_relation"] == "finetune"
    assert "dem-ray" in meta["tags"] and "merge" not in meta["tags"]
    check_numbers(best.text, report, models)
    assert f"`{report['baseline']['best']['id']}`" in best.text
    assert f"`{shlex.join(['dem-ray', 'baseline', str(config)])}` {version}" in best.text

    # The cards are the report's outputs; the models' steps record their model files only.
    assert {"merged/README.md", "baseline/best/README.md"} <= set(
        manifest.entry("report")["outputs"]
    )
    assert "merged/README.md" not in manifest.entry("merge")["outputs"]
    assert "baseline/best/README.md" not in manifest.entry("baseline")["outputs"]

    again = Pipeline(parse_config(raw, source=str(config)))
    try:
        again.open()
        for command in COMMANDS:
            again.run_command(command)
        assert again.ran == []
        assert {"merge", "baseline", "report"} <= set(again.skipped)
        # The best mixture chosen again, its card in place: still its model files alone, so
        # the report (which reads the baseline's record) has nothing to redo.
        again.run_stage(baseline_stage.BestMixtureStage(), force=True)
        again.run_command("report")
        assert again.ran == ["baseline"]
        assert "baseline/best/README.md" not in again.manifest.entry("baseline")["outputs"]
        # A merge run again is a fresh `merged/` without a card: the report writes it again.
        again.run_command("merge", force=True)
        assert not (layout.merged / "README.md").exists()
        again.run_command("report")
        assert again.ran[1:] == ["merge", "report"]
        rewritten = ModelCard.load(layout.merged / "README.md")
        assert rewritten.data.to_dict()["base_model_relation"] == "merge"
        check_numbers(rewritten.text, json.loads((layout.report / "report.json").read_text()),
                      models)  # fmt: skip
        done = len(again.ran)
        for command in COMMANDS:
            again.run_command(command)
        assert again.ran[done:] == []
    finally:
        again.close()


# ---- rendering alone: from a report dict -------------------------------------------------------
def _report(seed: int = 0) -> dict:
    """The keys a card reads, with seeded numbers, for a run with a baseline and downstream
    scores (and a grid mixture the card leaves out)."""
    rng = random.Random(seed)
    names = ["code", "chat"]
    labels = ["base", "finetuned/code", "finetuned/chat", "dem", "mixture/m1", "baseline/best"]

    def ppl() -> dict:
        return {label: {n: rng.uniform(2, 9) for n in names} for label in labels}

    def objectives() -> dict:
        return {label: rng.uniform(0.5, 2) for label in labels}

    def scores() -> dict:
        return {"cloze": {"acc": rng.random(), "acc_stderr": rng.random() / 10}}

    return {
        "run_dir": "/runs/demo",
        "base_model": "/models/tiny",
        "parameters": 1234,
        "datasets": names,
        "formats": dict.fromkeys(names, "text"),
        "algorithm": "tpe",
        "space": "simplex",
        "num_trials": 8,
        "dem_weights": {"code": rng.random(), "chat": rng.random()},
        "weights_source": "search",
        "weights_sum": {"all": rng.uniform(0.5, 1.5)},
        "merge_method": {"method": "ties", "density": 0.5, "dare_seed": 0},
        "objective": {"name": "mean"},
        "ppl": ppl(),
        "objectives": objectives(),
        "test_ppl": ppl(),
        "test_objectives": objectives(),
        "baseline": {
            "mixtures": [{"id": "m1"}, {"id": "m2"}],
            "best": {
                "id": "m2",
                "weights": {"code": 0.5, "chat": 0.5},
                "objective": rng.random(),
                "test_objective": rng.random(),
            },
            "steps_per_mixture": 24,
        },  # fmt: skip
        "downstream": {label: scores() for label in ("base", "dem", "baseline/best")},
        "downstream_info": {
            "tasks": ["cloze"],
            "num_fewshot": 0,
            "limit": 10,
            "lm_eval_version": "0.4",
            "samples": {"cloze": 10},
        },  # fmt: skip
    }


def test_a_card_without_a_hub_base_has_no_lineage_but_its_hub_datasets(tmp_path):
    from huggingface_hub.repocard import metadata_load

    report = _report()
    path = tmp_path / "README.md"
    path.write_text(render_card(report, "dem", None, None, ["org/code-corpus"]))
    meta = metadata_load(path)
    # A local path is no Hub id: the Hub refuses such a `base_model`, so there is none.
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert meta["datasets"] == ["org/code-corpus"]
    assert meta["tags"] == ["merge", "dem", "dem-ray"] and meta["library_name"] == "transformers"
    card = path.read_text()
    check_numbers(card, report, ["base", "finetuned/code", "finetuned/chat", "dem",
                                 "baseline/best"])  # fmt: skip
    rows = table(card, "Downstream tasks")
    for label, per in report["downstream"].items():
        assert rows[label] == [f"{per['cloze']['acc']:.3f} ± {per['cloze']['acc_stderr']:.3f}"]
    assert "Merge method: ties (density 0.5)" in card
    assert "did not record its command" in card  # a merge an earlier dem-ray recorded


def test_the_baseline_card_describes_the_best_mixture():
    report = _report(1)
    card = render_card(report, "baseline/best", made_by(["pytest"], "baseline", "c.yaml"), HUB_ID)
    best = report["baseline"]["best"]
    assert f"`{best['id']}` (code = 0.5000, chat = 0.5000)" in card
    assert f"{best['objective']:.4f} on validation, {best['test_objective']:.4f} on test" in card
    assert "best of the 2 mixtures" in card
    assert "Made by `dem-ray baseline c.yaml`" in card
    del report["baseline"]
    with pytest.raises(ValueError, match="no baseline"):
        render_card(report, "baseline/best", None, HUB_ID)
    with pytest.raises(ValueError, match="no model card for 'base'"):
        render_card(report, "base", None, HUB_ID)


def test_made_by_is_the_command_line_that_ran_or_its_equivalent():
    cli = made_by(["/venv/bin/dem-ray", "run", "my run.yaml", "-q"], "merge", "my run.yaml")
    assert cli == {
        "command": "dem-ray run 'my run.yaml' -q",
        "dem_ray_version": dem_ray.__version__,
    }
    api = made_by(["/venv/bin/pytest", "-q"], "merge", "c.yaml", ["--weights", "a=0.5,b=0.5"])
    assert api["command"] == "dem-ray merge c.yaml --weights a=0.5,b=0.5"
    assert made_by(["python"], "merge", "<dict>")["command"] is None  # no config file to name


def test_the_base_models_hub_id_only_where_it_is_known(tmp_path):
    snapshot = tmp_path / "models--org--tiny-llm" / "snapshots" / "abc123"
    assert hub_model_id("org/tiny-llm", "hub") == "org/tiny-llm"
    assert hub_model_id(str(snapshot), "dir") == "org/tiny-llm"
    assert hub_model_id(str(tmp_path / "my-model"), "dir") is None
    assert hub_model_id(str(snapshot / "model.gguf"), "gguf") is None
    assert hub_model_id(str(tmp_path / "models--a--b--c" / "snapshots" / "x"), "dir") is None
