"""The report as Markdown, HTML and plots, from report.json's data alone."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from dem_ray.core import cost as costs
from dem_ray.core.atomic import write_text_atomic
from dem_ray.ray.search import full_objective, read_trials
from dem_ray.report.build import DEM_STAGES, update_lines
from dem_ray.report.diagnostics import (
    cosine_rows,
    diagnostics_markdown,
    norm_rows,
    pair_rows,
    plot_similarity,
    summary_sentence,
)


# ---- rendering ---------------------------------------------------------------------------
def ppl_table(report: dict, split: str = "validation") -> list[list[str]]:
    """Rows of model, per-dataset perplexity and objective on `split` (`validation` or
    `test`), as printed and in the reports."""
    ppl, objectives = (
        (report["ppl"], report["objectives"])
        if split == "validation"
        else (report["test_ppl"], report["test_objectives"])
    )
    names = report["datasets"]
    rows = [["model", *names, f"{report['objective']['name']} log-ppl"]]
    for label, values in ppl.items():
        rows.append([label, *(f"{values[n]:.3f}" for n in names), f"{objectives[label]:.4f}"])
    return rows


def tokens_note(report: dict) -> str:
    """Which tokens a perplexity counts: response tokens for instruction datasets."""
    formats = report.get("formats") or {}
    instruct = [f"{n} ({f})" for n, f in formats.items() if f != "text"]
    if not instruct:
        return ""
    text = [n for n, f in formats.items() if f == "text"]
    note = f"Perplexity is over response tokens only for {', '.join(instruct)}"
    return note + (f"; over every token for {', '.join(text)}." if text else ".")


SPLITS_NOTE = (
    "The search, its warm start and the choice of the best mixture looked at validation "
    "only, so validation flatters what they chose; the verdict above is made on the test "
    "split, which no choice saw."
)


def cost_table(report: dict) -> list[list[str]]:
    rows = [["", "device-seconds", "wall seconds", "tokens trained", "tokens evaluated",
             "FLOPs", "USD"]]  # fmt: skip
    labels = [*DEM_STAGES, "dem", "baseline", "report", "downstream"]
    names = {"dem": "DEM total", "baseline": "baseline total",
             "downstream": "downstream (not in either total)"}  # fmt: skip
    for label in labels:
        c = report["cost"].get(label)
        if c is None:
            continue
        rows.append([
            names.get(label, label),
            f"{c['device_seconds']:.1f}", f"{c['wall_seconds']:.1f}",
            str(int(c["tokens_trained"])), str(int(c["tokens_evaluated"])),
            f"{c['flops']:.3e}", f"{c['usd']:.4f}",
        ])  # fmt: skip
    red = report["cost"].get("reduction")
    if red:
        rows.append(["reduction (1 - DEM/baseline)",
                     *(f"{red[k]:.1%}" if red[k] is not None else "n/a" for k in costs.KEYS)])  # fmt: skip
    return rows


def comparison_lines(report: dict) -> list[str]:
    comp = report.get("search_comparison")
    if not comp:
        return []
    lines = [
        f"The plain coefficient grid (step {comp['grid_step']:g}) made "
        f"{comp['grid_evaluations']} evaluations; its best objective is {comp['grid_best']:.4f}.",
        f"The {report['algorithm']} search made {comp['optuna_evaluations']} evaluations; its "
        f"best is {comp['optuna_best']:.4f}.",
    ]
    for tol, count in comp["optuna_evaluations_to_reach"].items():
        reached = f"after {count} evaluations" if count else "not within its evaluations"
        lines.append(f"Within {tol} of the grid's best: {reached} "
                     f"(grid: {comp['grid_evaluations']}).")  # fmt: skip
    return lines


def throughput_lines(report: dict) -> list[str]:
    """One line per search stage: candidates per second and each evaluator's busy share."""
    names = {"search": "The search", "search_grid": "The coefficient grid"}
    lines = []
    for stage, t in report.get("search_throughput", {}).items():
        shares = ", ".join(f"{u:.0%}" for u in t["evaluator_utilisation"])
        lines.append(
            f"{names.get(stage, stage)} evaluated {t['candidates']} candidates in "
            f"{t['search_wall_seconds']:.1f} s ({t['candidates_per_second']:.2f} per second); "
            f"the evaluator actors were busy merging and scoring {shares} of that time."
        )
    return lines


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows[1:]
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _weights_text(report: dict) -> str:
    """The merged model's weights, and the search's best when the rerank or `merge
    --weights` chose others."""
    text = ", ".join(f"{k} = {v:.4f}" for k, v in report["dem_weights"].items())
    if report["dem_weights"] != report["best_weights"]:
        best = ", ".join(f"{k} = {v:.4f}" for k, v in report["best_weights"].items())
        how = ("chosen by the downstream rerank" if report.get("weights_source") == "rerank"
               else "given with `merge --weights`")  # fmt: skip
        text += f" ({how}; the search's best by validation: {best})"
    return text


def weights_lines(report: dict) -> list[str]:
    """The merged weights' sum (per block group for per-block weights) and the method."""
    m = report["merge_method"]
    sums = ", ".join(f"{g} {v:.3f}" for g, v in report["weights_sum"].items())
    how = m["method"] + (f" (density {m['density']:g})" if m["method"] != "linear" else "")
    return [f"Merge method: {how}. Sum of the merged weights: {sums} (1 on the simplex; a "
            "larger sum steps further from the base than any one fine-tune)."]  # fmt: skip


# ---- downstream tasks (lm-evaluation-harness) ---------------------------------------------
def _fmt(value, digits: int = 3) -> str:
    """A score as printed; the producer turns lm-eval's "N/A" into None."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def _downstream_columns(report: dict) -> dict[str, list[str]]:
    """Each task's metrics (stderrs left out) in first-seen order, so every model lines up."""
    scores = report["downstream"]
    tasks = (report.get("downstream_info") or {}).get("tasks") or list(
        dict.fromkeys(t for per in scores.values() for t in per)
    )
    return {
        task: list(dict.fromkeys(
            m for per in scores.values() for m in per.get(task, {}) if not m.endswith("_stderr")
        ))
        for task in tasks
    }  # fmt: skip


def _cell(metrics: dict, metric: str) -> str:
    """`value ± stderr`, the value alone when lm-eval gave no stderr."""
    value = metrics.get(metric)
    if value is None or f"{metric}_stderr" not in metrics:
        return _fmt(value)
    return f"{_fmt(value)} ± {_fmt(metrics[f'{metric}_stderr'])}"


def downstream_table(report: dict) -> list[list[str]]:
    """Rows of model and lm-eval score per task metric (↓: lower is better), and with more
    than one task the mean of each task's first metric."""
    if not report.get("downstream"):
        return []
    columns = _downstream_columns(report)
    better = (report.get("downstream_info") or {}).get("higher_is_better") or {}
    header = ["model"] + [
        f"{task} {m}" + (" ↓" if better.get(task, {}).get(m) is False else "")
        for task, metrics in columns.items() for m in metrics
    ]  # fmt: skip
    many = len(columns) > 1
    rows = [header + ["mean"] * many]
    for model, per in report["downstream"].items():
        cells = [_cell(per.get(t, {}), m) for t, metrics in columns.items() for m in metrics]
        firsts = [per.get(t, {}).get(ms[0]) if ms else None for t, ms in columns.items()]
        mean = None if None in firsts else sum(firsts) / len(firsts)
        rows.append([model, *cells] + [_fmt(mean)] * many)
    return rows


def downstream_line(report: dict) -> str:
    """How the tasks were scored, so the numbers can be reproduced."""
    info = report.get("downstream_info") or {}
    limit = info.get("limit")
    line = (
        f"lm-evaluation-harness {info.get('lm_eval_version', '?')}, "
        f"{info.get('num_fewshot', 0)}-shot, {limit or 'all'} examples per task"
    )
    samples = info.get("samples") or {}
    if any(n != limit for n in samples.values()):  # fewer in the task, or no limit
        line += " (scored: " + ", ".join(f"{t} {n}" for t, n in samples.items()) + ")"
    return line + "."


def rerank_table(report: dict) -> list[list[str]]:
    """The search's best candidates with their task score; the merged one is marked."""
    rerank = (report.get("downstream_info") or {}).get("rerank")
    if not rerank:
        return []
    rows = [["trial", "weights", "validation objective", f"mean {rerank['metric']}", ""]]
    for i, c in enumerate(rerank["candidates"]):
        weights = ", ".join(f"{k}={v:.3f}" for k, v in c["weights"].items())
        rows.append([str(c["trial"]), weights, _fmt(c["objective"], 4), _fmt(c["score"]),
                     "merged" if i == rerank["chosen"] else ""])  # fmt: skip
    return rows


def rerank_lines(report: dict) -> list[str]:
    """Why the merged weights may not be the search's best: tasks chose among its best few."""
    rerank = (report.get("downstream_info") or {}).get("rerank")
    if not rerank:
        return []
    tasks = ", ".join(_downstream_columns(report)) if report.get("downstream") else "the tasks"
    line = (
        f"The merged model was chosen among the search's {len(rerank['candidates'])} best "
        f"candidates by validation objective, as the one with the best mean {rerank['metric']} "
        f"over the tasks ({tasks})"
    )
    if rerank["chosen"] != 0:
        line += (
            f"; the search's best alone would have been trial {rerank['candidates'][0]['trial']}"
        )
    return [line + "."]


def render_markdown(report: dict, plots: dict[str, str]) -> str:
    parts = [
        "# dem-ray report",
        "",
        report["summary"],
        "",
        f"Base model: `{report['base_model']}` ({report['parameters']:,} parameters); "
        f"datasets: {', '.join(report['datasets'])}.",
        "",
        f"Merged weights ({report['algorithm']} over the {report['space']} space, "
        f"{report['num_trials']} trials): {_weights_text(report)}.",
        "",
        "## Validation perplexity",
        "",
        markdown_table(ppl_table(report)),
        "",
        "## Test perplexity",
        "",
        markdown_table(ppl_table(report, "test")),
        "",
        " ".join(filter(None, [tokens_note(report), SPLITS_NOTE])),
        "",
        *_downstream_markdown(report),
        "## Cost",
        "",
        markdown_table(cost_table(report)),
        "",
        f"Device-seconds are GPU-seconds on GPUs and CPU core-seconds on CPUs, priced at "
        f"${report['prices']['usd_per_gpu_hour']}/GPU-hour and "
        f"${report['prices']['usd_per_cpu_hour']}/CPU-hour. {_dem_cost_note(report)}",
        "",
        *(line for x in throughput_lines(report) for line in (x, "")),
    ]
    if "diagnostics" in report:
        parts += ["## Distribution vectors", "", *weights_lines(report), "",
                  *diagnostics_markdown(report["diagnostics"]), ""]  # fmt: skip
    lines = comparison_lines(report)
    if lines:
        parts += ["## Search against the coefficient grid", "", *lines, ""]
    lines = update_lines(report)
    if lines:
        parts += ["## Cost of the last update", "", *lines, ""]
    for title, name in plots.items():
        parts += [f"## {title}", "", f"![{title}]({name})", ""]
    return "\n".join(parts)


def _dem_cost_note(report: dict) -> str:
    rerank = ", the rerank on the downstream tasks" if "rerank" in report["cost"] else ""
    downstream = (", as is the downstream scoring of the finished models"
                  if "downstream" in report["cost"] else "")  # fmt: skip
    return (f"DEM's cost is its fine-tunes, vectors, search{rerank} and merge; the report's own "
            f"scoring is listed apart{downstream}.")  # fmt: skip


def _downstream_markdown(report: dict) -> list[str]:
    """The downstream section's lines, none when the run scored no tasks."""
    if not report.get("downstream"):
        return []
    parts = ["## Downstream tasks", "", downstream_line(report), "",
             markdown_table(downstream_table(report)), ""]  # fmt: skip
    if rerank_lines(report):
        parts += [*rerank_lines(report), "", markdown_table(rerank_table(report)), ""]
    return parts


def _downstream_html(report: dict) -> str:
    """The downstream section as HTML, empty when the run scored no tasks."""
    if not report.get("downstream"):
        return ""
    text = f"<h2>Downstream tasks</h2><p>{html.escape(downstream_line(report))}</p>"
    text += html_table(downstream_table(report))
    if rerank_lines(report):
        text += "".join(f"<p>{html.escape(x)}</p>" for x in rerank_lines(report))
        text += html_table(rerank_table(report))
    return text


def render_html(report: dict, plots: dict[str, Path]) -> str:
    images = "".join(
        f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
        f"src='data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}'>"
        for title, path in plots.items()
    )
    comparison = "".join(f"<p>{html.escape(x)}</p>" for x in comparison_lines(report))
    update = "".join(f"<p>{html.escape(x)}</p>" for x in update_lines(report))
    vectors = ""
    if "diagnostics" in report:
        diag = report["diagnostics"]
        vectors = (
            "<h2>Distribution vectors</h2>"
            + "".join(f"<p>{html.escape(x)}</p>" for x in weights_lines(report))
            + "<h3>Norms</h3>" + html_table(norm_rows(diag))
            + "<h3>Pairwise cosine similarity</h3>" + html_table(cosine_rows(diag))
            + "<h3>Cosine similarity per block group</h3>" + html_table(pair_rows(diag))
            + f"<p>{html.escape(summary_sentence(diag))}</p>"
        )  # fmt: skip
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dem-ray report</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
th, td {{ border: 1px solid #ccc; padding: .3rem .6rem; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
img {{ max-width: 100%; }}
.summary {{ font-size: 1.1rem; background: #f4f6fa; padding: .8rem 1rem; }}
</style></head><body>
<h1>dem-ray report</h1>
<p class="summary" id="summary">{html.escape(report["summary"])}</p>
<p>Base model: <code>{html.escape(report["base_model"])}</code>
({report["parameters"]:,} parameters). Merged weights ({html.escape(report["algorithm"])},
{report["num_trials"]} trials): {html.escape(_weights_text(report))}.</p>
<h2>Validation perplexity</h2>{html_table(ppl_table(report))}
<h2>Test perplexity</h2>{html_table(ppl_table(report, "test"))}
<p>{html.escape(" ".join(filter(None, [tokens_note(report), SPLITS_NOTE])))}</p>{_downstream_html(report)}
<h2>Cost</h2>{html_table(cost_table(report))}
{"".join(f"<p>{html.escape(x)}</p>" for x in throughput_lines(report))}
{vectors}
{"<h2>Search against the coefficient grid</h2>" + comparison if comparison else ""}
{"<h2>Cost of the last update</h2>" + update if update else ""}
{images}
</body></html>
"""


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path: Path) -> None:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def plot_search(trials: list[dict], path: Path) -> None:
    plt = _figure()
    values = [full_objective(t) for t in trials]
    best = [min(values[: i + 1]) for i in range(len(values))]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    done = [(i, v) for i, v in enumerate(values, start=1) if math.isfinite(v)]
    ax.scatter([i for i, _ in done], [v for _, v in done], s=14, label="trial objective")
    stopped = [
        (i, t["objective"]) for i, t in enumerate(trials, start=1) if not t.get("complete", True)
    ]
    if stopped:
        ax.scatter([i for i, _ in stopped], [v for _, v in stopped], s=14, marker="x",
                   color="tab:gray", label="stopped early (estimate)")  # fmt: skip
    ax.plot(range(1, len(best) + 1), best, color="tab:red", label="best so far")
    ax.set_xlabel("trial (in order finished)")
    ax.set_ylabel("objective (mean log-perplexity)")
    ax.set_title("Coefficient search")
    ax.legend()
    _save(fig, plt, path)


def plot_search_comparison(runs: dict[str, list[dict]], path: Path) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for label, trials in runs.items():
        values = [full_objective(t) for t in trials]
        best = [min(values[: i + 1]) for i in range(len(values))]
        ax.step(range(1, len(best) + 1), best, where="post", label=label)
    ax.set_xlabel("evaluations")
    ax.set_ylabel("best objective so far")
    ax.set_title("Search against the coefficient grid")
    ax.legend()
    _save(fig, plt, path)


def plot_cost(report: dict, path: Path) -> None:
    plt = _figure()
    c = report["cost"]
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.2), dpi=110)
    for ax, key, label in ((axes[0], "device_seconds", "device-seconds"), (axes[1], "usd", "USD")):
        ax.bar(["DEM", "baseline"], [c["dem"][key], c["baseline"][key]],
               color=["tab:blue", "tab:gray"])  # fmt: skip
        ax.set_title(label)
    fig.suptitle("Cost: DEM against the data-mixing grid")
    _save(fig, plt, path)


def plot_downstream(report: dict, path: Path) -> None:
    """Bars per task of each model's first metric, with its stderr: the table at a glance."""
    plt = _figure()
    columns = {t: ms[0] for t, ms in _downstream_columns(report).items() if ms}
    models = list(report["downstream"])
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(columns) * len(models) ** 0.5), 3.5), dpi=110)
    for i, model in enumerate(models):
        per = {t: report["downstream"][model].get(t, {}) for t in columns}
        values = [math.nan if per[t].get(m) is None else per[t][m] for t, m in columns.items()]
        errors = [per[t].get(f"{m}_stderr") or 0 for t, m in columns.items()]
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(columns))]
        ax.bar(xs, values, width, yerr=errors, capsize=3, label=model)
    ax.set_xticks(range(len(columns)), [f"{t}\n{m}" for t, m in columns.items()])
    ax.set_ylabel("score")
    ax.set_title("Downstream tasks (lm-evaluation-harness)")
    ax.legend(fontsize="small")
    _save(fig, plt, path)


def plot_per_dataset(report: dict, path: Path) -> None:
    """Test perplexity per dataset, one bar per model (base, each specialist, DEM, the best
    mixture): where the merged model stands against each specialist on its own data."""
    plt = _figure()
    ppl = report["test_ppl"]
    specialists = sorted(m for m in ppl if m.startswith("finetuned/"))
    models = [m for m in ("base", *specialists, "dem", "baseline/best") if m in ppl]
    names = report["datasets"]
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names) * len(models) ** 0.5), 3.5), dpi=110)
    for i, model in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [ppl[model][n] for n in names], width, label=model)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("test perplexity (lower is better)")
    ax.set_title("Per dataset")
    ax.legend(fontsize="small")
    _save(fig, plt, path)


def write_report(report: dict, search_dir: Path, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path] = {"Per dataset": out_dir / "per_dataset.png",
                              "Search": out_dir / "search.png"}  # fmt: skip
    plot_per_dataset(report, plots["Per dataset"])
    plot_search(read_trials(search_dir / "trials.jsonl"), plots["Search"])
    if "search_comparison" in report:
        plots["Search against the grid"] = out_dir / "search_compare.png"
        plot_search_comparison(
            {report["algorithm"]: read_trials(search_dir / "trials.jsonl"),
             "coefficient grid": read_trials(search_dir / "grid_trials.jsonl")},
            plots["Search against the grid"],
        )  # fmt: skip
    if "baseline" in report:
        plots["Cost"] = out_dir / "cost.png"
        plot_cost(report, plots["Cost"])
    if report.get("diagnostics") and len(report["datasets"]) > 1:
        plots["Vector similarity"] = out_dir / "similarity.png"
        plot_similarity(report["diagnostics"], plots["Vector similarity"])
    if report.get("downstream"):
        plots["Downstream scores"] = out_dir / "downstream.png"
        plot_downstream(report, plots["Downstream scores"])
    for stale in (
        "search_compare.png",
        "cost.png",
        "similarity.png",
        "downstream.png",
    ):  # an earlier report's, not this one's
        if out_dir / stale not in plots.values():
            (out_dir / stale).unlink(missing_ok=True)
    json_path, md_path, html_path = (out_dir / f"report.{x}" for x in ("json", "md", "html"))
    write_text_atomic(json_path, json.dumps(report, indent=2))
    write_text_atomic(md_path, render_markdown(report, {t: p.name for t, p in plots.items()}))
    write_text_atomic(html_path, render_html(report, plots))
    return [json_path, md_path, html_path, *plots.values()]
