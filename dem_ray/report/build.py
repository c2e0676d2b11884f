"""The run report: every model on every validation and test shard, the searches, and what
each side cost (DEM against the data-mixing grid when the run has a baseline).

The search, the warm start and the choice of the best mixture all look at validation, so
validation favours what they picked; the verdict DEM against the best mixture is made on
test, which no choice saw. Both are in the tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

from dem_ray.config import BaselineConfig
from dem_ray.core import cost as costs
from dem_ray.core.diagnostics import mean_offdiagonal
from dem_ray.core.mixtures import grid_step_for_comparison, mixtures
from dem_ray.core.perplexity import objective, perplexity
from dem_ray.core.vectors import tensor_index
from dem_ray.ray.search import full_objective, read_trials

# The rerank (with `downstream.rerank_top`) is part of choosing DEM's weights: DEM's cost.
DEM_STAGES = ("finetune", "vectors", "search", "rerank", "merge")
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


def build_report(
    ctx,
    scores: dict[str, dict[str, tuple[float, int]]],
    cost: dict,
    test_scores: dict[str, dict[str, tuple[float, int]]],
    diagnostics: dict | None = None,
) -> dict:
    """`scores`, `test_scores`: {model label: {dataset: (nll sum, tokens)}} on validation
    and on test as measured for this report; `ctx`: the run's `RunContext` (manifest,
    layout, config); `diagnostics`: `core.diagnostics.vector_diagnostics` of the vectors."""
    manifest, names, cfg = ctx.manifest, ctx.names, ctx.cfg
    kind = cfg.search.objective
    best = json.loads(ctx.layout.best.read_text())
    merged = manifest.entry("merge")["weights"]  # what `dem` is: maybe `merge --weights`
    merged_weights = {k: merged[k] for k in ctx.space.keys}  # in the kernel's order
    ppl = {label: {n: perplexity(*nll[n]) for n in names} for label, nll in scores.items()}
    objectives = {label: objective(nll, kind) for label, nll in scores.items()}
    test_ppl = {
        label: {n: perplexity(*nll[n]) for n in names} for label, nll in test_scores.items()
    }
    test_objectives = {label: objective(nll, kind) for label, nll in test_scores.items()}
    params = count_parameters(ctx.base_dir)
    prices = (cfg.cost.usd_per_gpu_hour, cfg.cost.usd_per_cpu_hour)

    def price(item: dict) -> dict:
        return costs.priced(item, params, *prices)

    stage_cost: dict[str, dict] = {}
    for stage in ("finetune", "vectors"):
        per = {n: price(manifest.entry(f"{stage}/{n}")["cost"]) for n in names}
        stage_cost[stage] = {**costs.total(per.values(), stage == "finetune"), "per_dataset": per}
    for stage in ("search", "rerank", "merge"):
        if manifest.entry(stage) is None or (stage == "rerank" and not _reranked(cfg)):
            continue
        stage_cost[stage] = {**price(manifest.entry(stage)["cost"]),
                             "evaluations": manifest.entry(stage)["cost"].get("evaluations")}  # fmt: skip
    stage_cost["report"] = price(cost)
    throughput = {
        stage: search_throughput(manifest.entry(stage)["cost"])
        for stage in ("search", "search_grid")
        if manifest.entry(stage) is not None
    }
    throughput = {k: v for k, v in throughput.items() if v is not None}  # fmt: skip
    dem_cost = costs.total(stage_cost[s] for s in DEM_STAGES if s in stage_cost)
    report = {
        "run_dir": ctx.show(ctx.layout.root),
        "base_model": str(cfg.base_model),
        "parameters": params,
        "datasets": names,
        "formats": {n: cfg.datasets[n].format for n in names},
        "best_weights": best["weights"],  # the search's best
        "dem_weights": merged_weights,  # what the `dem` row scored: merge --weights wins
        "weights_source": _weights_source(ctx, merged_weights, best["weights"]),
        "objective": {
            "name": kind,
            "value": objectives["dem"],
            "test_value": test_objectives["dem"],
            "search_value": best["objective"]["value"],
        },
        "num_trials": best["num_trials"],
        "algorithm": best["algorithm"],
        "space": best["space"],
        "merge_method": {
            "method": cfg.search.merge_method,
            "density": cfg.search.density,
            "dare_seed": cfg.search.dare_seed,
        },  # fmt: skip
        "weights_sum": weights_sum(ctx.space, merged_weights),
        "ppl": ppl,
        "objectives": objectives,
        "validation_tokens": {n: scores["base"][n][1] for n in names},
        "test_ppl": test_ppl,
        "test_objectives": test_objectives,
        "test_tokens": {n: test_scores["base"][n][1] for n in names},
        "cost": {**stage_cost, "dem": dem_cost},
        "search_throughput": throughput,
        "prices": {"usd_per_gpu_hour": prices[0], "usd_per_cpu_hour": prices[1]},
        "artifacts": {
            "merged_model": ctx.show(ctx.layout.merged),
            "trials": ctx.show(ctx.layout.trials),
            "finetuned": {n: ctx.show(ctx.layout.finetune(n)) for n in names},
        },
    }
    if diagnostics is not None:
        pairs = len(names) > 1
        report["diagnostics"] = {
            **diagnostics,
            "mean_cosine": mean_offdiagonal(diagnostics["cosine"]) if pairs else None,
        }
    if cfg.baseline is not None:
        _add_baseline(report, ctx, price)
    if cfg.search.compare_grid:
        _add_search_comparison(report, ctx)
    if cfg.downstream is not None:
        _add_downstream(report, ctx, price)
    if best.get("update") and best["update"]["updated"]:
        _add_update(report, ctx, best["update"])
    report["summary"] = summary_sentence(report)
    return report


THROUGHPUT_KEYS = ("candidates", "search_wall_seconds", "candidates_per_second",
                   "evaluator_utilisation", "evaluator_busy_seconds", "evaluator_calls",
                   "driver_seconds", "merge_seconds")  # fmt: skip


def search_throughput(cost: dict) -> dict | None:
    """How busy the evaluators were during a search stage's own evaluations (None for a
    stage recorded before this was measured, or one that evaluated nothing)."""
    if "evaluator_utilisation" not in cost:
        return None
    return {k: cost[k] for k in THROUGHPUT_KEYS}


def _reranked(cfg) -> bool:
    return cfg.downstream is not None and cfg.downstream.rerank_top > 0


def _weights_source(ctx, merged: dict, best: dict) -> str:
    """Who chose the merged weights: `search`, `rerank` (downstream tasks) or `given`."""
    if _reranked(ctx.cfg) and merged == ctx.manifest.entry("rerank")["weights"]:
        return "rerank"
    return "search" if merged == best else "given"


def _add_downstream(report: dict, ctx, price) -> None:
    """lm-eval's scores per model, how they were made, and the rerank when there was one."""
    from dem_ray.stages.downstream import scored_models

    ds, manifest = ctx.cfg.downstream, ctx.manifest
    entries = {label: manifest.entry(f"downstream/{label}") for label in scored_models(ctx)}
    better: dict[str, dict] = {}
    samples: dict[str, int] = {}
    for entry in entries.values():
        for task, metrics in entry["higher_is_better"].items():
            better.setdefault(task, {}).update(metrics)
        samples.update(entry["samples"])
    rerank = None
    if _reranked(ctx.cfg):
        r = manifest.entry("rerank")
        rerank = {
            k: r.get(k) for k in ("top", "metric", "higher_is_better", "candidates", "chosen")
        }
    report["downstream"] = {label: e["scores"] for label, e in entries.items()}
    report["downstream_info"] = {
        "tasks": list(ctx.tasks.names),
        "num_fewshot": ds.num_fewshot,
        "limit": ds.limit,
        "lm_eval_version": ctx.tasks.lm_eval_version,
        "higher_is_better": better,
        "samples": samples,
        "rerank": rerank,
    }
    # Scoring the finished models is neither side's cost: its own line. Models scored in one
    # run of the stage ran side by side: its wall time is that run's, not their sum.
    report["cost"]["downstream"] = costs.total(price(e["cost"]) for e in entries.values())
    runs: dict[str, float] = {}
    for e in entries.values():
        run = e["cost"]["stage_run"]
        runs[run["id"]] = max(runs.get(run["id"], 0.0), run["elapsed_seconds"])
    report["cost"]["downstream"]["wall_seconds"] = sum(runs.values())


def weights_sum(space, weights: dict[str, float]) -> dict[str, float]:
    """The merged weights' sum: how far from the base the composite steps (1 on the
    simplex; up to k in a box), per block group for per-block weights."""
    per = space.per_dataset(weights)
    labels = space.group_labels or ["all"]
    return {g: sum(ws[j] for ws in per.values()) for j, g in enumerate(labels)}


def _add_baseline(report: dict, ctx, price) -> None:
    from dem_ray.core.mixtures import steps_per_mixture

    cfg, manifest = ctx.cfg, ctx.manifest
    summary = manifest.entry("baseline")
    entries = {mid: manifest.entry(f"baseline/{mid}") for mid in summary["mixtures"]}
    mixtures = []
    for mid, entry in entries.items():
        if "test_nll" not in entry:  # scored before the test split existed
            from dem_ray.stages.base import StageError

            raise StageError(
                f"mixture {mid} was scored without a test split; run `dem-ray baseline "
                f"{cfg.source} --force` (or `dem-ray run {cfg.source}`) to score it again"
            )
        test_nll = {n: tuple(v) for n, v in entry["test_nll"].items()}
        mixtures.append({
            "id": mid,
            "weights": entry["weights"],
            "ppl": entry["ppl"],
            "objective": summary["objectives"][mid],
            "test_ppl": entry["test_ppl"],
            "test_objective": objective(test_nll, cfg.search.objective),
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
            "objective": best["objective"],  # validation: what it was chosen on
            "test_objective": best["test_objective"],
            "model": ctx.show(ctx.layout.best_mixture),
        },  # fmt: skip
        "steps_per_mixture": steps_per_mixture(cfg.baseline, cfg.finetune, len(ctx.names)),
    }
    for m in mixtures:
        report["ppl"][f"mixture/{m['id']}"] = m["ppl"]
        report["objectives"][f"mixture/{m['id']}"] = m["objective"]
        report["test_ppl"][f"mixture/{m['id']}"] = m["test_ppl"]
        report["test_objectives"][f"mixture/{m['id']}"] = m["test_objective"]
    report["ppl"]["baseline/best"] = best["ppl"]
    report["objectives"]["baseline/best"] = best["objective"]
    report["test_ppl"]["baseline/best"] = best["test_ppl"]
    report["test_objectives"]["baseline/best"] = best["test_objective"]
    report["cost"]["baseline"] = baseline_cost
    report["cost"]["reduction"] = costs.reduction(report["cost"]["dem"], baseline_cost)


def _add_update(report: dict, ctx, update: dict) -> None:
    """The cost of the last update (new or changed datasets only) against doing it all again.

    Re-running everything = every fine-tune and vector again plus this search and merge.
    The data-mixing grid with today's datasets is estimated from the measured cost of a
    fine-tuning step: its mixtures x steps per mixture x device-seconds per step.
    """
    from dem_ray.core.mixtures import steps_per_mixture

    cfg, names, c = ctx.cfg, ctx.names, report["cost"]
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
    baseline_cfg = cfg.baseline or BaselineConfig(grid_step=grid_step_for_comparison(ctx.cfg))
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


def _add_search_comparison(report: dict, ctx) -> None:
    search_dir = ctx.layout.search
    optuna = [full_objective(t) for t in read_trials(search_dir / "trials.jsonl")]
    grid = [full_objective(t) for t in read_trials(search_dir / "grid_trials.jsonl")]
    grid_best = min(grid)
    report["search_comparison"] = {
        "grid_step": grid_step_for_comparison(ctx.cfg),
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
    """The verdict, on the test split: validation chose the weights and the best mixture."""
    name = report["objective"]["name"]
    dem = report["test_objectives"]["dem"]
    base = report["test_objectives"]["base"]
    text = (
        f"On the test split, DEM reached {name} log-perplexity {dem:.4f} (perplexity "
        f"{math.exp(dem):.2f}; base {base:.4f}, perplexity {math.exp(base):.2f})"
    )
    if "baseline" in report:
        c, b = report["cost"], report["baseline"]["best"]
        share = c["dem"]["device_seconds"] / c["baseline"]["device_seconds"]
        text += (
            f" at {share:.0%} of the data-mixing baseline's cost "
            f"({c['dem']['device_seconds']:.0f} vs {c['baseline']['device_seconds']:.0f} "
            f"device-seconds, ${c['dem']['usd']:.4f} vs ${c['baseline']['usd']:.4f}); "
            f"the best of {len(report['baseline']['mixtures'])} mixtures (chosen on "
            f"validation) reached {b['test_objective']:.4f} on the test split, so DEM is "
            f"{'better' if dem < b['test_objective'] else 'worse'} by "
            f"{abs(b['test_objective'] - dem):.4f} on the test split"
        )
    return text + "."
