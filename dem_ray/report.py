"""The run report: every model on every validation shard, the searches, and what each
side cost (DEM against the data-mixing grid when the run has a baseline)."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from dem_ray import cost as costs
from dem_ray.baseline import mixtures
from dem_ray.config import BaselineConfig
from dem_ray.manifest import write_text_atomic
from dem_ray.perplexity import objective, perplexity
from dem_ray.search import full_objective, read_trials
from dem_ray.vectors import tensor_index

DEM_STAGES = ("finetune", "vectors", "search", "merge")
WITHIN = (0.01, 0.001)


def count_parameters(model_dir: Path) -> int:
    """Distinct parameters as stored (tied weights are saved once)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(set(tensor_index(model_dir).values())):
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118
                total += math.prod(fh.get_slice(name).get_shape())
    return total


def build_report(pipeline, scores: dict[str, dict[str, tuple[float, int]]], cost: dict) -> dict:
    """`scores`: {model label: {dataset: (nll sum, tokens)}} as measured for this report."""
    manifest, names, cfg = pipeline.manifest, pipeline.names, pipeline.cfg
    kind = cfg.search.objective
    best = pipeline.best()
    ppl = {label: {n: perplexity(*nll[n]) for n in names} for label, nll in scores.items()}
    objectives = {label: objective(nll, kind) for label, nll in scores.items()}
    params = count_parameters(pipeline.base_dir)
    prices = (cfg.cost.usd_per_gpu_hour, cfg.cost.usd_per_cpu_hour)

    def price(item: dict) -> dict:
        return costs.priced(item, params, *prices)

    stage_cost: dict[str, dict] = {}
    for stage in ("finetune", "vectors"):
        per = {n: price(manifest.entry(f"{stage}/{n}")["cost"]) for n in names}
        stage_cost[stage] = {**costs.total(per.values(), stage == "finetune"), "per_dataset": per}
    for stage in ("search", "merge"):
        stage_cost[stage] = {**price(manifest.entry(stage)["cost"]),
                             "evaluations": manifest.entry(stage)["cost"].get("evaluations")}  # fmt: skip
    stage_cost["report"] = price(cost)
    dem_cost = costs.total(stage_cost[s] for s in DEM_STAGES)
    report = {
        "run_dir": pipeline.show(pipeline.run_dir),
        "base_model": str(cfg.base_model),
        "parameters": params,
        "datasets": names,
        "best_weights": best["weights"],
        "objective": {
            "name": kind,
            "value": objectives["dem"],
            "search_value": best["objective"]["value"],
        },
        "num_trials": best["num_trials"],
        "algorithm": best["algorithm"],
        "space": best["space"],
        "ppl": ppl,
        "objectives": objectives,
        "validation_tokens": {n: scores["base"][n][1] for n in names},
        "cost": {**stage_cost, "dem": dem_cost},
        "prices": {"usd_per_gpu_hour": prices[0], "usd_per_cpu_hour": prices[1]},
        "artifacts": {
            "merged_model": pipeline.show(pipeline.run_dir / "merged"),
            "trials": pipeline.show(pipeline.run_dir / "search" / "trials.jsonl"),
            "finetuned": {n: pipeline.show(pipeline.finetune_dir(n)) for n in names},
        },
    }
    if cfg.baseline is not None:
        _add_baseline(report, pipeline, price)
    if cfg.search.compare_grid:
        _add_search_comparison(report, pipeline)
    if best.get("update") and best["update"]["updated"]:
        _add_update(report, pipeline, best["update"])
    report["summary"] = summary_sentence(report)
    return report


def _add_baseline(report: dict, pipeline, price) -> None:
    from dem_ray.baseline import steps_per_mixture

    cfg, manifest = pipeline.cfg, pipeline.manifest
    summary = manifest.entry("baseline")
    entries = {mid: manifest.entry(f"baseline/{mid}") for mid in summary["mixtures"]}
    mixtures = []
    for mid, entry in entries.items():
        mixtures.append({
            "id": mid,
            "weights": entry["weights"],
            "ppl": entry["ppl"],
            "objective": entry["objective"],
            "cost": price(entry["cost"]),
        })  # fmt: skip
    best = next(m for m in mixtures if m["id"] == summary["best"])
    # Mixtures train concurrently, then are scored one after another.
    train_wall = max(e["cost"]["train_wall_seconds"] for e in entries.values())
    eval_wall = sum(e["cost"]["eval_wall_seconds"] for e in entries.values())
    baseline_cost = costs.total(m["cost"] for m in mixtures)
    baseline_cost["wall_seconds"] = train_wall + eval_wall
    report["baseline"] = {
        "mixtures": mixtures,
        "best": {
            "id": best["id"],
            "weights": best["weights"],
            "objective": best["objective"],
            "model": pipeline.show(pipeline.run_dir / "baseline" / "best"),
        },  # fmt: skip
        "steps_per_mixture": steps_per_mixture(cfg.baseline, cfg.finetune, len(pipeline.names)),
    }
    for m in mixtures:
        report["ppl"][f"mixture/{m['id']}"] = m["ppl"]
        report["objectives"][f"mixture/{m['id']}"] = m["objective"]
    report["ppl"]["baseline/best"] = best["ppl"]
    report["objectives"]["baseline/best"] = best["objective"]
    report["cost"]["baseline"] = baseline_cost
    report["cost"]["reduction"] = costs.reduction(report["cost"]["dem"], baseline_cost)


def _add_update(report: dict, pipeline, update: dict) -> None:
    """The cost of the last update (new or changed datasets only) against doing it all again.

    Re-running everything = every fine-tune and vector again plus this search and merge.
    The data-mixing grid with today's datasets is estimated from the measured cost of a
    fine-tuning step: its mixtures x steps per mixture x device-seconds per step.
    """
    from dem_ray.baseline import steps_per_mixture

    cfg, names, c = pipeline.cfg, pipeline.names, report["cost"]
    updated = update["updated"]

    def stages(which: list[str]) -> list[dict]:
        return [c[s]["per_dataset"][n] for s in ("finetune", "vectors") for n in which]

    tail = [c["search"], c["merge"]]
    this_update = costs.total([*stages(updated), *tail])
    everything = costs.total([*stages(names), *tail])
    per_step = {
        k: sum(c["finetune"]["per_dataset"][n][k] for n in names)
        / (cfg.finetune.max_steps * len(names))
        for k in costs.KEYS
    }
    baseline_cfg = cfg.baseline or BaselineConfig(grid_step=pipeline.grid_step_for_comparison())
    count = len(mixtures(baseline_cfg, names))
    steps = steps_per_mixture(baseline_cfg, cfg.finetune, len(names))
    grid = {k: v * count * steps for k, v in per_step.items()}
    report["update"] = {
        "updated": updated,
        "new": update["new"],
        "reused": [n for n in names if n not in updated],
        "warm_start_points": update["warm_start_points"],
        "cost": this_update,
        "rerun_everything": everything,
        "baseline_grid_estimate": {**grid, "mixtures": count, "steps_per_mixture": steps},
        "fraction_of_rerun": _fraction(this_update, everything),
        "fraction_of_baseline_grid": _fraction(this_update, grid),
    }


def _fraction(part: dict, whole: dict) -> dict:
    return {k: part[k] / whole[k] if whole[k] else None for k in costs.KEYS}


def update_lines(report: dict) -> list[str]:
    u = report.get("update")
    if not u:
        return []
    g = u["baseline_grid_estimate"]
    frac = u["fraction_of_rerun"]["device_seconds"]
    frac_grid = u["fraction_of_baseline_grid"]["device_seconds"]
    return [
        f"This update fine-tuned only {', '.join(u['updated'])} (new: {', '.join(u['new']) or 'none'}) "
        f"and reused the vectors of {', '.join(u['reused']) or 'no dataset'}; the search began by "
        f"re-scoring {u['warm_start_points']} of the earlier search's best candidates.",
        f"It cost {u['cost']['device_seconds']:.1f} device-seconds (${u['cost']['usd']:.4f}): "
        f"{frac:.0%} of re-running every fine-tune, vector, the search and the merge "
        f"({u['rerun_everything']['device_seconds']:.1f} device-seconds)"
        + (
            f", and {frac_grid:.1%} of an estimated data-mixing grid over today's "
            f"{len(report['datasets'])} datasets ({g['mixtures']} mixtures x "
            f"{g['steps_per_mixture']} steps, {g['device_seconds']:.1f} device-seconds at the "
            "fine-tunes' measured cost per step)."
            if frac_grid is not None
            else "."
        ),
    ]


def _add_search_comparison(report: dict, pipeline) -> None:
    search_dir = pipeline.run_dir / "search"
    optuna = [full_objective(t) for t in read_trials(search_dir / "trials.jsonl")]
    grid = [full_objective(t) for t in read_trials(search_dir / "grid_trials.jsonl")]
    grid_best = min(grid)
    report["search_comparison"] = {
        "grid_step": pipeline.grid_step_for_comparison(),
        "grid_evaluations": len(grid),
        "grid_best": grid_best,
        "optuna_evaluations": len(optuna),
        "optuna_stopped_early": sum(not math.isfinite(v) for v in optuna),
        "optuna_best": min(optuna),
        "optuna_evaluations_to_reach": {
            f"{w:.1%}": costs.evaluations_to_reach(optuna, grid_best * (1 + w)) for w in WITHIN
        },
        "definition": "evaluations (in completion order, early-stopped trials included) "
        "until a fully scored objective is <= grid_best x (1 + tolerance); the objective "
        "is mean log-perplexity",
    }


def summary_sentence(report: dict) -> str:
    name = report["objective"]["name"]
    dem = report["objectives"]["dem"]
    base = report["objectives"]["base"]
    text = (
        f"DEM reached {name} log-perplexity {dem:.4f} (perplexity {math.exp(dem):.2f}; "
        f"base {base:.4f}, perplexity {math.exp(base):.2f})"
    )
    if "baseline" in report:
        c, b = report["cost"], report["baseline"]["best"]
        share = c["dem"]["device_seconds"] / c["baseline"]["device_seconds"]
        text += (
            f" at {share:.0%} of the data-mixing baseline's cost "
            f"({c['dem']['device_seconds']:.0f} vs {c['baseline']['device_seconds']:.0f} "
            f"device-seconds, ${c['dem']['usd']:.4f} vs ${c['baseline']['usd']:.4f}); "
            f"the best of {len(report['baseline']['mixtures'])} mixtures reached "
            f"{b['objective']:.4f}, so DEM is "
            f"{'better' if dem < b['objective'] else 'worse'} by "
            f"{abs(b['objective'] - dem):.4f}"
        )
    return text + "."


# ---- rendering ---------------------------------------------------------------------------
def ppl_table(report: dict) -> list[list[str]]:
    """Rows of model, per-dataset perplexity and objective, as printed and in the reports."""
    names = report["datasets"]
    rows = [["model", *names, f"{report['objective']['name']} log-ppl"]]
    for label, values in report["ppl"].items():
        rows.append(
            [label, *(f"{values[n]:.3f}" for n in names), f"{report['objectives'][label]:.4f}"]
        )
    return rows


def cost_table(report: dict) -> list[list[str]]:
    rows = [["", "device-seconds", "wall seconds", "tokens trained", "tokens evaluated",
             "FLOPs", "USD"]]  # fmt: skip
    labels = [*DEM_STAGES, "dem", "baseline", "report"]
    for label in labels:
        c = report["cost"].get(label)
        if c is None:
            continue
        rows.append([
            {"dem": "DEM total", "baseline": "baseline total"}.get(label, label),
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
    return ", ".join(f"{k} = {v:.4f}" for k, v in report["best_weights"].items())


def render_markdown(report: dict, plots: dict[str, str]) -> str:
    parts = [
        "# dem-ray report",
        "",
        report["summary"],
        "",
        f"Base model: `{report['base_model']}` ({report['parameters']:,} parameters); "
        f"datasets: {', '.join(report['datasets'])}.",
        "",
        f"Best weights ({report['algorithm']} over the {report['space']} space, "
        f"{report['num_trials']} trials): {_weights_text(report)}.",
        "",
        "## Validation perplexity",
        "",
        markdown_table(ppl_table(report)),
        "",
        "## Cost",
        "",
        markdown_table(cost_table(report)),
        "",
        f"Device-seconds are GPU-seconds on GPUs and CPU core-seconds on CPUs, priced at "
        f"${report['prices']['usd_per_gpu_hour']}/GPU-hour and "
        f"${report['prices']['usd_per_cpu_hour']}/CPU-hour. DEM's cost is its fine-tunes, "
        "vectors, search and merge; the report's own scoring is listed apart.",
        "",
    ]
    lines = comparison_lines(report)
    if lines:
        parts += ["## Search against the coefficient grid", "", *lines, ""]
    lines = update_lines(report)
    if lines:
        parts += ["## Cost of the last update", "", *lines, ""]
    for title, name in plots.items():
        parts += [f"## {title}", "", f"![{title}]({name})", ""]
    return "\n".join(parts)


def render_html(report: dict, plots: dict[str, Path]) -> str:
    images = "".join(
        f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
        f"src='data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}'>"
        for title, path in plots.items()
    )
    comparison = "".join(f"<p>{html.escape(x)}</p>" for x in comparison_lines(report))
    update = "".join(f"<p>{html.escape(x)}</p>" for x in update_lines(report))
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
({report["parameters"]:,} parameters). Best weights ({html.escape(report["algorithm"])},
{report["num_trials"]} trials): {html.escape(_weights_text(report))}.</p>
<h2>Validation perplexity</h2>{html_table(ppl_table(report))}
<h2>Cost</h2>{html_table(cost_table(report))}
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


def write_report(report: dict, search_dir: Path, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path] = {"Search": out_dir / "search.png"}
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
    for stale in ("search_compare.png", "cost.png"):  # an earlier report's, not this one's
        if out_dir / stale not in plots.values():
            (out_dir / stale).unlink(missing_ok=True)
    json_path, md_path, html_path = (out_dir / f"report.{x}" for x in ("json", "md", "html"))
    write_text_atomic(json_path, json.dumps(report, indent=2))
    write_text_atomic(md_path, render_markdown(report, {t: p.name for t, p in plots.items()}))
    write_text_atomic(html_path, render_html(report, plots))
    return [json_path, md_path, html_path, *plots.values()]
