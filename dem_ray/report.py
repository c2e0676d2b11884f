"""The run report: every model on every validation shard, the search, and what it cost."""

from __future__ import annotations

import json
import math
from pathlib import Path

from dem_ray.manifest import write_text_atomic
from dem_ray.perplexity import objective, perplexity

COST_KEYS = ("device_seconds", "wall_seconds", "tokens_trained", "tokens_evaluated")


def build_report(pipeline, scores: dict[str, dict[str, tuple[float, int]]], cost: dict) -> dict:
    """`scores`: {model label: {dataset: (nll sum, tokens)}} as measured for this report."""
    manifest, names = pipeline.manifest, pipeline.names
    kind = pipeline.cfg.search.objective
    best = pipeline.best()
    ppl = {label: {n: perplexity(*nll[n]) for n in names} for label, nll in scores.items()}
    objectives = {label: objective(nll, kind) for label, nll in scores.items()}
    stage_cost: dict[str, dict] = {}
    for stage in ("finetune", "vectors"):
        per = {n: manifest.entry(f"{stage}/{n}")["cost"] for n in names}
        # Fine-tunes run concurrently: the stage's wall time is the longest one's.
        concurrent = stage == "finetune"
        stage_cost[stage] = {**_sum_costs(per.values(), concurrent), "per_dataset": per}
    for stage in ("search", "merge"):
        stage_cost[stage] = dict(manifest.entry(stage)["cost"])
    stage_cost["report"] = dict(cost)
    stage_cost["total"] = _sum_costs(
        [stage_cost[s] for s in ("finetune", "vectors", "search", "merge", "report")]
    )
    return {
        "run_dir": str(pipeline.run_dir),
        "base_model": pipeline.cfg.base_model,
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
        "cost": stage_cost,
        "artifacts": {
            "merged_model": str(pipeline.run_dir / "merged"),
            "trials": str(pipeline.run_dir / "search" / "trials.jsonl"),
            "finetuned": {n: str(pipeline.finetune_dir(n)) for n in names},
        },
    }


def _sum_costs(costs, concurrent: bool = False) -> dict:
    """Add up costs; for concurrent runs wall time is the maximum, not the sum."""
    total: dict[str, float] = {}
    for cost in costs:
        for key in COST_KEYS:
            if key in cost:
                if key == "wall_seconds" and concurrent:
                    total[key] = max(total.get(key, 0), cost[key])
                else:
                    total[key] = total.get(key, 0) + cost[key]
    return total


def ppl_table(report: dict) -> list[list[str]]:
    """Rows of model, per-dataset perplexity and objective, as printed and in report.md."""
    names = report["datasets"]
    rows = [["model", *names, f"{report['objective']['name']} log-ppl"]]
    for label, values in report["ppl"].items():
        rows.append(
            [label, *(f"{values[n]:.3f}" for n in names), f"{report['objectives'][label]:.4f}"]
        )
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def render_markdown(report: dict, plot_name: str | None) -> str:
    weights = ", ".join(f"{k} = {v:.4f}" for k, v in report["best_weights"].items())
    base, dem = report["objectives"]["base"], report["objectives"]["dem"]
    cost_rows = [["stage", "device-seconds", "wall seconds", "tokens trained", "tokens evaluated"]]
    for stage in ("finetune", "vectors", "search", "merge", "report", "total"):
        c = report["cost"][stage]
        cost_rows.append(
            [
                stage,
                f"{c.get('device_seconds', 0):.1f}",
                f"{c.get('wall_seconds', 0):.1f}",
                str(int(c.get("tokens_trained", 0))),
                str(int(c.get("tokens_evaluated", 0))),
            ]
        )
    parts = [
        "# dem-ray report",
        "",
        f"Base model: `{report['base_model']}`; datasets: {', '.join(report['datasets'])}.",
        "",
        f"Best weights ({report['algorithm']} over the {report['space']} space, "
        f"{report['num_trials']} trials): {weights}.",
        "",
        f"Objective ({report['objective']['name']} mean log-perplexity, lower is better): "
        f"base {base:.4f}, DEM {dem:.4f} (perplexity x{math.exp(dem - base):.3f}).",
        "",
        "## Validation perplexity",
        "",
        markdown_table(ppl_table(report)),
        "",
        "## Cost",
        "",
        markdown_table(cost_rows),
        "",
    ]
    if plot_name:
        parts += ["## Search", "", f"![objective per trial and best so far]({plot_name})", ""]
    return "\n".join(parts)


def plot_search(trials: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [t["objective"] for t in trials]
    best = [min(values[: i + 1]) for i in range(len(values))]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.scatter(range(1, len(values) + 1), values, s=14, label="trial objective")
    ax.plot(range(1, len(best) + 1), best, color="tab:red", label="best so far")
    ax.set_xlabel("trial (in order finished)")
    ax.set_ylabel("objective (mean log-perplexity)")
    ax.set_title("Coefficient search")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def write_report(report: dict, trials_path: Path, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    trials = [json.loads(x) for x in trials_path.read_text().splitlines() if x.strip()]
    plot = out_dir / "search.png"
    plot_search(trials, plot)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    write_text_atomic(json_path, json.dumps(report, indent=2))
    write_text_atomic(md_path, render_markdown(report, plot.name))
    return [json_path, md_path, plot]
