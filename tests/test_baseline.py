"""The data-mixing grid baseline and the DEM-vs-baseline cost report, end to end."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from dem_ray.config import BaselineConfig, FinetuneConfig, parse_config
from dem_ray.core.mixtures import mixture_id, mixtures, steps_per_mixture
from dem_ray.pipeline import Pipeline
from dem_ray.ray.finetune import sample_batch


def test_mixture_grid_and_fair_budget():
    grid = mixtures(BaselineConfig(grid_step=0.5), ["a", "b"])
    assert grid == [{"a": 1.0, "b": 0.0}, {"a": 0.5, "b": 0.5}, {"a": 0.0, "b": 1.0}]
    assert len(mixtures(BaselineConfig(grid_step=1 / 3), ["a", "b", "c"])) == 10
    assert mixture_id({"a": 0.5, "b": 0.5}) == "a0.5-b0.5"
    hp = FinetuneConfig(max_steps=7)
    assert steps_per_mixture(BaselineConfig(grid_step=0.5), hp, 3) == 21
    assert steps_per_mixture(BaselineConfig(grid_step=0.5, steps=4), hp, 3) == 4


def test_sample_batch_follows_the_ratio(tmp_path):
    from safetensors.torch import save_file

    from dem_ray.data.shards import ShardReader

    shards = []
    for value, count in ((0, 5), (1, 7)):
        path = tmp_path / f"{value}.safetensors"
        save_file({"input_ids": torch.full((count, 4), value, dtype=torch.int32)}, str(path))
        shards.append(ShardReader(path))
    generator = torch.Generator().manual_seed(0)
    rows, mask, counts = sample_batch(shards, torch.tensor([0.25, 0.75]), 4000, generator)
    assert rows.shape == (4000, 4) and mask is None
    assert counts.tolist() == [int((rows[:, 0] == 0).sum()), int((rows[:, 0] == 1).sum())]
    assert counts[1] / 4000 == pytest.approx(0.75, abs=0.03)
    only_first, _, counts = sample_batch(shards, torch.tensor([1.0, 0.0]), 50, generator)
    assert counts.tolist() == [50, 0] and int(only_first.sum()) == 0


def test_baseline_config_errors():
    raw = {"run_dir": "r", "base_model": "b", "datasets": {"a": "x", "b": "y"}}
    with pytest.raises(ValueError, match="exactly one of grid_step or mixtures"):
        parse_config({**raw, "baseline": {}})
    with pytest.raises(ValueError, match="must divide 1"):
        parse_config({**raw, "baseline": {"grid_step": 0.3}})
    with pytest.raises(ValueError, match=r"baseline.mixtures\[0\].c': no dataset 'c'"):
        parse_config({**raw, "baseline": {"mixtures": [{"a": 0.5, "c": 0.5}]}})
    config = parse_config({**raw, "baseline": {"mixtures": [{"a": 1, "b": 3}]}})
    assert config.baseline.mixture_dicts() == [{"a": 0.25, "b": 0.75}]


@pytest.fixture(scope="module")
def compared(ray_session, tiny_base, tiny_data, make_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline")
    data = {n: tiny_data[n] for n in ("numbers", "letters")}
    raw = make_config(root / "run", tiny_base, data,
                      search={"num_trials": 5, "compare_grid": True},
                      baseline={"grid_step": 0.5})  # fmt: skip
    pipeline = Pipeline(parse_config(raw))
    pipeline.run()
    return pipeline, raw


def test_baseline_trains_every_mixture_on_the_fair_budget(compared):
    pipeline, raw = compared
    report = pipeline.report()
    mixes = report["baseline"]["mixtures"]
    assert [m["weights"] for m in mixes] == [
        {"numbers": 1.0, "letters": 0.0}, {"numbers": 0.5, "letters": 0.5},
        {"numbers": 0.0, "letters": 1.0},
    ]  # fmt: skip
    hp = raw["finetune"]
    tokens = 2 * hp["max_steps"] * hp["batch_size"] * hp["seq_len"]  # all DEM fine-tunes
    for m in mixes:
        assert m["cost"]["tokens_trained"] == tokens
        entry = pipeline.manifest.entry(f"baseline/{m['id']}")
        by_dataset = entry["tokens_by_dataset"]
        assert sum(by_dataset.values()) == tokens
        for name, ratio in m["weights"].items():
            if ratio == 0.0:
                assert by_dataset[name] == 0
    dem_tokens = report["cost"]["finetune"]["tokens_trained"]
    assert dem_tokens == tokens


def test_best_mixture_is_kept_as_a_model(compared):
    from transformers import AutoModelForCausalLM

    pipeline, _ = compared
    report = pipeline.report()
    best = min(report["baseline"]["mixtures"], key=lambda m: m["objective"])
    assert report["baseline"]["best"]["id"] == best["id"]
    best_dir = pipeline.run_dir / "baseline" / "best"
    AutoModelForCausalLM.from_pretrained(best_dir)
    assert json.loads((best_dir / "dem_ray_mixture.json").read_text())["id"] == best["id"]
    assert not (pipeline.run_dir / "baseline" / "mixtures").exists()  # only the best is kept
    # The same evaluator and shards: the best mixture's perplexity recomputes.
    from dem_ray.core.perplexity import perplexity, token_nll
    from dem_ray.ray.evaluator import sample_rows

    model = AutoModelForCausalLM.from_pretrained(best_dir).eval()
    limit = 16
    for name in pipeline.names:
        rows = load_file(pipeline.layout.shard(name, "validation"))["input_ids"]
        rows = sample_rows(rows, limit, pipeline.cfg.finetune.seed)  # the seeded sample
        expected = perplexity(*token_nll(model, rows, batch_size=4))
        assert report["ppl"]["baseline/best"][name] == pytest.approx(expected, rel=1e-4)


def test_cost_comparison_fields_and_arithmetic(compared):
    pipeline, _ = compared
    report = pipeline.report()
    cost = report["cost"]
    keys = {"device_seconds", "wall_seconds", "tokens_trained", "tokens_evaluated", "flops", "usd"}
    for side in ("dem", "baseline"):
        assert keys <= set(cost[side])
        assert cost[side]["device_seconds"] > 0
    params = report["parameters"]
    for side in ("dem", "baseline"):
        c = cost[side]
        expected = 6 * params * c["tokens_trained"] + 2 * params * c["tokens_evaluated"]
        assert c["flops"] == pytest.approx(expected)
        assert c["usd"] == pytest.approx(c["device_seconds"] / 3600 * 0.05)
    for key in keys:
        assert cost["reduction"][key] == pytest.approx(1 - cost["dem"][key] / cost["baseline"][key])
    parts = ("finetune", "vectors", "search", "merge")
    assert cost["dem"]["device_seconds"] == pytest.approx(
        sum(cost[p]["device_seconds"] for p in parts)
    )
    assert cost["baseline"]["device_seconds"] == pytest.approx(
        sum(m["cost"]["device_seconds"] for m in report["baseline"]["mixtures"])
    )


def test_search_comparison_against_the_grid(compared):
    pipeline, _ = compared
    comp = pipeline.report()["search_comparison"]
    grid = [json.loads(x) for x in
            (pipeline.run_dir / "search" / "grid_trials.jsonl").read_text().splitlines()]  # fmt: skip
    assert comp["grid_evaluations"] == len(grid) == 3  # step 0.5 over 2 datasets
    assert comp["grid_best"] == min(t["objective"] for t in grid)
    optuna = [json.loads(x) for x in
              (pipeline.run_dir / "search" / "trials.jsonl").read_text().splitlines()]  # fmt: skip
    reach = comp["optuna_evaluations_to_reach"]["1.0%"]
    target = comp["grid_best"] * 1.01
    if reach is None:
        assert all(t["objective"] > target for t in optuna)
    else:
        assert optuna[reach - 1]["objective"] <= target
        assert all(t["objective"] > target for t in optuna[: reach - 1])


def _numbers(text: str) -> set[str]:
    return set(re.findall(r"\d+\.\d+", text))


def test_markdown_and_html_show_the_numbers_of_the_json(compared):
    pipeline, _ = compared
    report = pipeline.report()
    out = pipeline.run_dir / "report"
    markdown = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    expected = {
        f"{report['ppl'][label][n]:.3f}" for label in report["ppl"] for n in report["datasets"]
    }
    expected |= {f"{report['cost'][s]['device_seconds']:.1f}" for s in ("dem", "baseline")}
    expected |= {f"{report['cost'][s]['usd']:.4f}" for s in ("dem", "baseline")}
    expected.add(f"{report['cost']['reduction']['device_seconds']:.1%}".rstrip("%"))
    for text in (markdown, page):
        assert expected <= _numbers(text), expected - _numbers(text)
        assert report["summary"] in text.replace("&#x27;", "'").replace("&quot;", '"')
    # per dataset, search, search vs grid, cost, vector similarity: each a whole PNG
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(images) == 5
    for data in images:
        image = PIL.Image.open(io.BytesIO(base64.b64decode(data)))
        image.load()  # decodes every pixel: a cut-short or broken image raises here
        assert image.width > 300 and image.height > 200
        assert len(image.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 2  # not blank


def test_a_report_without_a_baseline_drops_the_earlier_plots(compared, tmp_path):
    """After a dataset is added (no baseline section), report/ must not keep the old plots."""
    from dem_ray.report.render import write_report

    pipeline, _ = compared
    out = tmp_path / "report"
    shutil.copytree(pipeline.run_dir / "report", out)
    assert (out / "cost.png").exists() and (out / "search_compare.png").exists()
    report = {k: v for k, v in pipeline.report().items()
              if k not in ("baseline", "search_comparison")}  # fmt: skip
    written = write_report(report, pipeline.run_dir / "search", out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)
    assert not (out / "cost.png").exists() and not (out / "search_compare.png").exists()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_html_renders_in_headless_chromium(compared, tmp_path):
    pipeline, _ = compared
    page = pipeline.run_dir / "report" / "report.html"
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert shot.stat().st_size > 20_000  # a real page with tables and plots, not blank
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", f"--user-data-dir={tmp_path / 'profile2'}",
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert 'id="summary"' in dom.stdout and "DEM reached" in dom.stdout


def test_downstream_scores_the_best_mixture_as_lm_eval_does(compared, tmp_path):
    """Added to a finished run, the downstream section scores the best mixture (by default
    with the others) and only the downstream and report stages run."""
    pytest.importorskip("lm_eval")
    from test_downstream import BATCH, LIMIT, reference_scores, write_tasks

    pipeline, raw = compared
    tasks = write_tasks(tmp_path / "tasks")
    raw = {**raw, "downstream": {"tasks": [str(tasks["mc"])], "limit": LIMIT, "batch_size": BATCH}}
    scored = Pipeline(parse_config(raw))
    scored.run()
    assert set(scored.ran) == {
        "downstream/base", "downstream/finetuned/numbers", "downstream/finetuned/letters",
        "downstream/dem", "downstream/baseline/best", "report",
    }  # fmt: skip
    report = scored.report()
    assert list(report["downstream"])[-1] == "baseline/best"
    expected = reference_scores(scored.layout.best_mixture, [tasks["mc"]])
    assert report["downstream"]["baseline/best"] == expected
    assert "downstream" in report["cost"] and report["cost"]["reduction"] is not None
