"""The report's downstream section (lm-evaluation-harness scores), rendered from a hand-made
report dict: no Ray, no models."""

from __future__ import annotations

import copy
import json

import pytest

from dem_ray.report.render import (
    cost_table,
    downstream_table,
    plot_downstream,
    render_html,
    render_markdown,
    rerank_lines,
    rerank_table,
    write_report,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _cost(seconds: float) -> dict:
    return {"device_seconds": seconds, "wall_seconds": seconds, "tokens_trained": 0,
            "tokens_evaluated": 1000, "flops": 1e12, "usd": 0.01}  # fmt: skip


def _plain_report() -> dict:
    """The keys render_markdown and render_html read, for a run without downstream tasks."""
    ppl = {m: {"code": 3.0, "chat": 4.0} for m in ("base", "finetuned/code", "dem")}
    objectives = dict.fromkeys(ppl, 1.2)
    return {
        "summary": "DEM beats the base.",
        "base_model": "tiny",
        "parameters": 1234,
        "datasets": ["code", "chat"],
        "formats": {"code": "text", "chat": "chat"},
        "algorithm": "tpe",
        "space": "simplex",
        "num_trials": 2,
        "dem_weights": {"code": 0.6, "chat": 0.4},
        "best_weights": {"code": 0.6, "chat": 0.4},
        "objective": {"name": "mean", "value": 1.2},
        "ppl": ppl,
        "objectives": objectives,
        "test_ppl": copy.deepcopy(ppl),
        "test_objectives": dict(objectives),
        "cost": {
            s: _cost(1.0) for s in ("finetune", "vectors", "search", "merge", "dem", "report")
        },  # fmt: skip
        "prices": {"usd_per_gpu_hour": 2.0, "usd_per_cpu_hour": 0.1},
    }


def _report() -> dict:
    report = _plain_report()
    report["downstream"] = {
        "base": {"cloze_chat": {"acc": 0.41, "acc_stderr": 0.05, "acc_norm": 0.44,
                                "acc_norm_stderr": 0.05},
                 "arc_easy": {"acc": 0.6, "acc_stderr": 0.02, "brier": 0.3}},
        "finetuned/chat": {"cloze_chat": {"acc": 0.5, "acc_stderr": None, "acc_norm": None,
                                          "acc_norm_stderr": None},
                           "arc_easy": {"acc": 0.62, "acc_stderr": 0.02, "brier": 0.25}},
        "dem": {"cloze_chat": {"acc": 0.55, "acc_stderr": 0.04, "acc_norm": 0.5,
                               "acc_norm_stderr": 0.05},
                "arc_easy": {"acc": None, "acc_stderr": None, "brier": 0.2}},
    }  # fmt: skip
    report["downstream_info"] = {
        "tasks": ["cloze_chat", "arc_easy"],
        "num_fewshot": 0,
        "limit": 40,
        "lm_eval_version": "0.4.13",
        "higher_is_better": {
            "cloze_chat": {"acc": True, "acc_norm": True},
            "arc_easy": {"acc": True, "brier": False},
        },  # fmt: skip
        "samples": {"cloze_chat": 40, "arc_easy": 40},
        "rerank": {
            "top": 2,
            "metric": "acc",
            "candidates": [
                {
                    "trial": "t_0003",
                    "weights": {"code": 0.6, "chat": 0.4},
                    "objective": 2.31,
                    "score": 0.5,
                    "scores": {},
                },
                {
                    "trial": "t_0001",
                    "weights": {"code": 0.25, "chat": 0.75},
                    "objective": 2.3456,
                    "score": 0.55,
                    "scores": {},
                },
            ],  # fmt: skip
            "chosen": 1,
        },
    }
    report["cost"]["downstream"] = _cost(7.0)
    return report


def _one_task(report: dict) -> dict:
    for per in report["downstream"].values():
        del per["arc_easy"]
    report["downstream_info"]["tasks"] = ["cloze_chat"]
    return report


def test_downstream_table_header_and_cells():
    assert downstream_table(_report()) == [
        ["model", "cloze_chat acc", "cloze_chat acc_norm", "arc_easy acc", "arc_easy brier ↓",
         "mean"],
        ["base", "0.410 ± 0.050", "0.440 ± 0.050", "0.600 ± 0.020", "0.300", "0.505"],
        ["finetuned/chat", "0.500 ± n/a", "n/a", "0.620 ± 0.020", "0.250", "0.560"],
        ["dem", "0.550 ± 0.040", "0.500 ± 0.050", "n/a", "0.200", "n/a"],
    ]  # fmt: skip


def test_one_task_has_no_mean_column():
    rows = downstream_table(_one_task(_report()))
    assert rows[0] == ["model", "cloze_chat acc", "cloze_chat acc_norm"]
    assert rows[1] == ["base", "0.410 ± 0.050", "0.440 ± 0.050"]


def test_no_downstream_no_table_no_rerank():
    assert downstream_table(_plain_report()) == []
    assert rerank_lines(_plain_report()) == []
    report = _report()
    report["downstream_info"]["rerank"] = None
    assert rerank_lines(report) == [] and rerank_table(report) == []


def test_rerank_table_marks_the_merged_candidate():
    report = _report()
    assert rerank_table(report) == [
        ["trial", "weights", "validation objective", "mean acc", ""],
        ["t_0003", "code=0.600, chat=0.400", "2.3100", "0.500", ""],
        ["t_0001", "code=0.250, chat=0.750", "2.3456", "0.550", "merged"],
    ]
    (line,) = rerank_lines(report)
    assert "2 best candidates" in line and "mean acc" in line and "t_0003" in line


def test_markdown_has_the_section_after_the_perplexity_tables():
    report = _report()
    md = render_markdown(report, {"Downstream scores": "downstream.png"})
    assert md.index("## Test perplexity") < md.index("## Downstream tasks") < md.index("## Cost")
    assert "lm-evaluation-harness 0.4.13, 0-shot, 40 examples per task." in md
    assert "| base | 0.410 ± 0.050 | 0.440 ± 0.050 | 0.600 ± 0.020 | 0.300 | 0.505 |" in md
    assert "| t_0001 | code=0.250, chat=0.750 | 2.3456 | 0.550 | merged |" in md
    assert "| downstream (not in either total) | 7.0 |" in md
    assert "![Downstream scores](downstream.png)" in md
    page = render_html(report, {})
    assert page.index("<h2>Test perplexity") < page.index("<h2>Downstream") < page.index("<h2>Cost")


def test_all_examples_and_the_counts_scored():
    report = _report()
    report["downstream_info"].update(limit=None, samples={"cloze_chat": 12, "arc_easy": 40})
    md = render_markdown(report, {})
    assert "0-shot, all examples per task (scored: cloze_chat 12, arc_easy 40)." in md


def test_cost_row_is_outside_the_totals():
    report = _report()
    rows = cost_table(report)
    assert [r[0] for r in rows[1:]] == ["finetune", "vectors", "search", "merge", "DEM total",
                                        "report", "downstream (not in either total)"]  # fmt: skip
    assert report["cost"]["dem"]["device_seconds"] == 1.0  # rendering adds nothing


def test_write_report_writes_the_plot_and_html_embeds_it(tmp_path):
    search = tmp_path / "search"
    search.mkdir()
    (search / "trials.jsonl").write_text(
        "".join(json.dumps({"trial": i, "objective": 1.5 - i / 10}) + "\n" for i in range(3))
    )
    out = tmp_path / "report"
    written = write_report(_report(), search, out)
    png = out / "downstream.png"
    assert png in written and png.read_bytes().startswith(PNG) and png.stat().st_size > 1000
    page = (out / "report.html").read_text()
    assert "<h2>Downstream tasks</h2><p>lm-evaluation-harness 0.4.13" in page
    assert "<td>0.410 ± 0.050</td>" in page and "<td>merged</td>" in page
    assert "<img alt='Downstream scores' src='data:image/png;base64," in page
    per_dataset = out / "per_dataset.png"  # every report: test perplexity per dataset
    assert per_dataset in written and per_dataset.read_bytes().startswith(PNG)
    assert "<img alt='Per dataset' src='data:image/png;base64," in page
    assert "![Per dataset](per_dataset.png)" in (out / "report.md").read_text()

    # The same directory, a report without downstream scores: as before, and the plot goes.
    plain = _plain_report()
    written = write_report(plain, search, out)
    assert not png.exists() and png not in written
    for text in ((out / "report.md").read_text(), (out / "report.html").read_text()):
        assert "ownstream" not in text
    assert [r[0] for r in cost_table(plain)][-1] == "report"


@pytest.mark.parametrize(
    "shape",
    ["one model", "one task", "none values", "no stderr"],
)
def test_plot_downstream_survives_small_and_missing_data(tmp_path, shape):
    report = _report()
    if shape == "one model":
        report["downstream"] = {"dem": report["downstream"]["dem"]}
    elif shape == "one task":
        _one_task(report)
    elif shape == "none values":
        for per in report["downstream"].values():
            per["cloze_chat"].update(acc=None, acc_stderr=None)
    else:
        for per in report["downstream"].values():
            for scores in per.values():
                for key in [k for k in scores if k.endswith("_stderr")]:
                    del scores[key]
    path = tmp_path / "downstream.png"
    plot_downstream(report, path)
    assert path.read_bytes().startswith(PNG)
