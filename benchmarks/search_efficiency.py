"""Evaluations to a good mixture: the dense coefficient grid against Optuna TPE.

Real evaluations on a tiny model: a tiny Llama is pre-trained briefly on the union of
k synthetic corpora, then k specialists are fine-tuned from it in-process (AdamW, a
few steps each, one corpus each), their distribution vectors are computed with
dem_ray.core.vectors.compute_vector, and a dem_ray.ray.evaluator.Evaluator (in-process, no
Ray) scores candidates on the k validation shards. Objective: mean over datasets of
log-perplexity (dem_ray.core.perplexity.objective, "macro"), lower is better.

  grid: every point of the simplex grid (dem_ray.core.spaces.Space.grid); its best = G.
  TPE:  optuna.create_study + TPESampler(seed), ask/tell one trial at a time, the same
        stick-breaking parameters as dem_ray.core.spaces.Space.to_weights; per seed, the
        evaluations until an objective <= G x 1.01 ("within 1%") and <= G x 1.001
        ("within 0.1%"); median over seeds.
  Tune arms: the product's own search (dem_ray.ray.search.run_search: Ray Tune's
        OptunaSearch TPE, one evaluator actor, one trial at a time), without and with ASHA
        (search.scheduler: asha, validation shards scored in slices); per seed, the
        evaluations and the validation tokens spent until a fully scored trial is within
        1% / 0.1% of G, and the best after the whole budget. Early-stopped trials count
        as evaluations and their tokens count as spent.

    python benchmarks/search_efficiency.py --size tiny
"""

from __future__ import annotations

import math
import random
import sys
import tempfile
from pathlib import Path

import _common as bc
import torch
from safetensors.torch import save_file

from dem_ray.core.perplexity import objective
from dem_ray.core.spaces import Space
from dem_ray.core.vectors import compute_vector
from dem_ray.data.readers import split_documents, tokenize_and_pack
from dem_ray.models.base import load_model, load_tokenizer
from dem_ray.models.tiny import make_tiny_model, synthetic_corpus

log = bc.log
STYLES = ("numbers", "letters", "code", "shout", "hex", "csv")
THRESHOLDS = {"1%": 1.01, "0.1%": 1.001}


def corpus(style: str, count: int, seed: int) -> list[str]:
    """dem_ray.models.tiny's three synthetic styles, and three more made the same way."""
    if style in ("numbers", "letters", "code"):
        return synthetic_corpus(style, count, seed)
    rng = random.Random(f"{style}-{seed}")
    if style == "shout":
        return [t.upper() for t in synthetic_corpus("letters", count, seed + 101)]
    if style == "hex":
        return [
            " ".join(f"0x{rng.randint(0, 4095):03x}" for _ in range(rng.randint(10, 30)))
            for _ in range(count)
        ]
    if style == "csv":
        return [
            "\n".join(
                ",".join(str(rng.randint(0, 9)) for _ in range(4))
                for _ in range(rng.randint(3, 10))
            )
            for _ in range(count)
        ]
    raise ValueError(f"unknown style {style!r}")


def train(model, rows: torch.Tensor, steps: int, lr: float, batch: int, seed: int) -> float:
    """A few AdamW steps of next-token loss on random rows; returns the last loss."""
    device = next(model.parameters()).device
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    loss = torch.tensor(math.nan)
    for _ in range(steps):
        idx = torch.randint(rows.shape[0], (batch,), generator=gen)
        x = rows[idx].to(device, dtype=torch.long)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


def build_problem(args, root: Path, names: list[str], device: torch.device) -> dict:
    """Base, k fine-tunes, k vectors and k validation shards on disk; returns their paths."""
    docs = {s: corpus(s, args.docs, seed=args.seed) for s in names}
    split = {s: split_documents(d, 0.2, seed=args.seed) for s, d in docs.items()}
    base_dir = root / "base"
    with bc.stdout_to_stderr():
        make_tiny_model(
            base_dir,
            [t for s in names for t in split[s][0]],
            hidden=args.hidden,
            layers=args.layers,
            seed=args.seed,
        )
    tokenizer = load_tokenizer(base_dir)
    train_rows = {s: tokenize_and_pack(split[s][0], tokenizer, args.seq_len) for s in names}
    val_rows = {s: tokenize_and_pack(split[s][1], tokenizer, args.seq_len) for s in names}
    model = load_model(base_dir, str(device))
    union = torch.cat([train_rows[s] for s in names])
    loss = train(model, union, args.pretrain_steps, args.lr, args.train_batch, args.seed)
    log.info("base pre-trained %d steps on the union: loss %.3f", args.pretrain_steps, loss)
    model.save_pretrained(str(base_dir), safe_serialization=True)
    del model
    vector_paths, shard_paths = [], {}
    for i, s in enumerate(names):
        model = load_model(base_dir, str(device))
        loss = train(model, train_rows[s], args.finetune_steps, args.lr, args.train_batch, i + 1)
        ft = root / "finetunes" / s
        model.save_pretrained(str(ft), safe_serialization=True)
        del model
        vector = root / "vectors" / f"{s}.safetensors"
        compute_vector(base_dir, ft, vector)
        vector_paths.append(str(vector))
        rows = val_rows[s][: args.val_rows]
        if rows.shape[0] < args.val_rows:
            raise RuntimeError(f"{s}: only {rows.shape[0]} validation rows of {args.seq_len}")
        shard = root / "shards" / f"{s}.safetensors"
        shard.parent.mkdir(parents=True, exist_ok=True)
        save_file({"input_ids": rows.to(torch.int32).contiguous()}, str(shard))
        shard_paths[s] = str(shard)
        log.info("specialist %s: %d steps, last loss %.3f", s, args.finetune_steps, loss)
    return {"base": str(base_dir), "vectors": vector_paths, "shards": shard_paths}


def run_k(args, k: int, step: float, root: Path, device: torch.device) -> dict:
    import optuna

    from dem_ray.ray.evaluator import Evaluator

    names = list(STYLES[:k])
    problem = build_problem(args, root / f"k{k}", names, device)
    evaluator = Evaluator(
        problem["base"],
        problem["vectors"],
        problem["shards"],
        batch_size=args.batch_size,
        max_sequences=args.val_rows,
        device=device.type,
    )
    tokens_per_eval = sum(evaluator.info()["validation_tokens"].values())
    space = Space("simplex", tuple(names))

    def score(weights: dict[str, float]) -> float:
        result = evaluator.evaluate([weights[n] for n in names])
        return objective({n: tuple(v) for n, v in result["nll"].items()}, "macro")

    points = space.grid(step)
    log.info("k=%d: the grid, %d points at step %g", k, len(points), step)
    grid = [score(w) for w in points]
    grid_seconds = evaluator.device_seconds
    best = min(grid)
    uniform = score({n: 1.0 / k for n in names})
    budget = args.tpe_budget or len(points)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seeds = []
    for seed in range(args.repeats):
        study = optuna.create_study(
            direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed)
        )
        reached = {label: None for label in THRESHOLDS}
        best_seen = math.inf
        for n in range(1, budget + 1):
            trial = study.ask()
            params = {
                p: trial.suggest_float(p, lo, hi)
                for p, (lo, hi) in zip(space.param_names, space.param_bounds(), strict=True)
            }
            value = score(space.to_weights(params))
            study.tell(trial, value)
            best_seen = min(best_seen, value)
            for label, factor in THRESHOLDS.items():
                if reached[label] is None and value <= best * factor:
                    reached[label] = n
            if all(v is not None for v in reached.values()):
                break
        seeds.append({"seed": seed, "evaluations": n, "reached": reached, "best": best_seen})
        log.info("k=%d TPE seed %d: %s (best %.5f; grid %.5f)", k, seed, reached, best_seen, best)
    arms = tune_arms(args, problem, space, best) if args.tune_seeds else {}
    return {
        "k": k,
        "names": names,
        "grid_step": step,
        "grid_points": len(points),
        "grid_best": best,
        "grid_best_weights": points[grid.index(best)],
        "grid_worst": max(grid),
        "uniform": uniform,
        "grid_fraction_within": {
            label: sum(v <= best * f for v in grid) / len(grid) for label, f in THRESHOLDS.items()
        },
        "tokens_per_evaluation": tokens_per_eval,
        "grid_core_seconds": grid_seconds,
        "seconds_per_evaluation": grid_seconds / len(points),
        "tpe_budget": budget,
        "tpe": seeds,
        "tune_arms": arms,
    }


def tune_arms(args, problem: dict, space, grid_best: float) -> dict:
    """TPE through the product's search, without and with ASHA, on the same problem."""
    import ray

    from dem_ray.config import SearchConfig
    from dem_ray.ray.evaluator import start_pool
    from dem_ray.ray.search import run_search

    kwargs = {
        "base_dir": problem["base"],
        "vector_paths": problem["vectors"],
        "shard_paths": problem["shards"],
        "batch_size": args.batch_size,
        "max_sequences": args.val_rows,
        "device": None,
    }
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    arms: dict[str, list[dict]] = {"none": [], "asha": []}
    try:
        pool = start_pool(1, kwargs, cpus=0.5, gpus=1.0 if args.device == "cuda" else 0.0)
        with tempfile.TemporaryDirectory(prefix="dem-bench-tune-") as tmp:
            for seed in range(args.tune_seeds):
                for scheduler in arms:
                    cfg = SearchConfig(
                        algorithm="tpe",
                        num_trials=args.tune_budget,
                        max_concurrent=1,
                        seed=seed,
                        scheduler=scheduler,
                        slices=args.slices,
                        reduction_factor=args.reduction_factor,
                    )
                    out = Path(tmp) / f"{scheduler}-{seed}"
                    with bc.stdout_to_stderr():
                        trials = run_search(cfg, space, pool, out)
                    arms[scheduler].append(arm_figures(trials, grid_best, seed))
                    log.info("Tune TPE seed %d, scheduler %s: %s", seed, scheduler,
                             arms[scheduler][-1])  # fmt: skip
    finally:
        ray.shutdown()
    return arms


def arm_figures(trials: list[dict], grid_best: float, seed: int) -> dict:
    """Evaluations and tokens until a fully scored trial is within each threshold."""
    reached: dict[str, int | None] = {label: None for label in THRESHOLDS}
    tokens_at: dict[str, int | None] = {label: None for label in THRESHOLDS}
    spent = 0
    for n, trial in enumerate(trials, start=1):
        spent += trial["tokens_evaluated"]
        if not trial["complete"]:
            continue
        for label, factor in THRESHOLDS.items():
            if reached[label] is None and trial["objective"] <= grid_best * factor:
                reached[label], tokens_at[label] = n, spent
    complete = [t["objective"] for t in trials if t["complete"]]
    return {
        "seed": seed,
        "reached": reached,
        "tokens_to_reach": tokens_at,
        "tokens_total": spent,
        "stopped_early": len(trials) - len(complete),
        "best": min(complete) if complete else math.inf,
    }


def to_reach(result: dict, label: str) -> float:
    """Median over seeds of evaluations to reach; a seed that never did counts as inf."""
    values = [s["reached"][label] or math.inf for s in result["tpe"]]
    return bc.median(values)


def print_tune_arms(args, results: list[dict]) -> None:
    if not args.tune_seeds:
        print("\nTune arms not run (--tune-seeds 0)")
        return
    print(
        f"\nthe product's search (OptunaSearch TPE, one trial at a time, budget "
        f"{args.tune_budget} trials) without and with ASHA ({args.slices} validation slices, "
        f"reduction factor {args.reduction_factor}); medians over {args.tune_seeds} seeds; "
        "tokens = validation tokens scored until the first fully scored trial within\n"
    )
    rows = []
    for r in results:
        arms = r["tune_arms"]
        for label in THRESHOLDS:
            need = {
                a: bc.median([s["reached"][label] or math.inf for s in v]) for a, v in arms.items()
            }
            tokens = {
                a: bc.median([s["tokens_to_reach"][label] or math.inf for s in v])
                for a, v in arms.items()
            }
            rows.append(
                [
                    r["k"],
                    label,
                    need["none"],
                    need["asha"],
                    tokens["none"],
                    tokens["asha"],
                    bc.ratio(tokens["asha"], tokens["none"]),
                ]
            )
    print(
        bc.table(
            [
                "k",
                "within",
                "evals (no ASHA)",
                "evals (ASHA)",
                "tokens (no ASHA)",
                "tokens (ASHA)",
                "ASHA/no-ASHA tokens",
            ],
            rows,
        )
    )
    for r in results:
        for arm, seeds in r["tune_arms"].items():
            total = bc.median([s["tokens_total"] for s in seeds])
            best = bc.median([s["best"] for s in seeds])
            stopped = bc.median([s["stopped_early"] for s in seeds])
            print(
                f"k={r['k']} {arm:>4}: whole budget {total:.0f} tokens, {stopped:.0f} trials "
                f"stopped early, best {best:.5f} (grid best {r['grid_best']:.5f})"
            )


def main() -> int:
    p = bc.parser(
        __doc__.splitlines()[0],
        default_repeats="5",
        repeats_help="TPE seeds (0, 1, ...), medians over them",
    )
    p.set_defaults(size="tiny")
    p.add_argument("--ks", default="4,6", help="numbers of specialists, comma-separated (<= 6)")
    p.add_argument(
        "--grid-steps",
        default="4:0.1,6:0.2",
        help="grid step per k (k:step, comma-separated); 0.1 where not given",
    )
    p.add_argument("--tpe-budget", type=int, default=None, help="default: the grid's count")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--docs", type=int, default=240, help="documents per corpus")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--val-rows", type=int, default=8, help="validation rows per dataset")
    p.add_argument("--batch-size", type=int, default=8, help="evaluation batch size")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--pretrain-steps", type=int, default=60)
    p.add_argument("--finetune-steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--tune-seeds", type=int, default=3, help="seeds of the Tune arms; 0: skip")
    p.add_argument("--tune-budget", type=int, default=40, help="trials per Tune arm and seed")
    p.add_argument("--slices", type=int, default=4, help="validation slices with ASHA")
    p.add_argument("--reduction-factor", type=int, default=3, help="ASHA's reduction factor")
    args = p.parse_args()
    if args.size != "tiny":
        sys.exit("error: search_efficiency runs real evaluations on a tiny model only: --size tiny")
    device = bc.setup(args, tiny_repeats=5)
    ks = [int(x) for x in args.ks.split(",")]
    if any(not 2 <= k <= len(STYLES) for k in ks):
        sys.exit(f"error: --ks: each k must be between 2 and {len(STYLES)}")
    steps = {}
    for item in args.grid_steps.split(","):
        if item.strip():
            k, _, step = item.partition(":")
            steps[int(k)] = float(step)

    results = []
    with tempfile.TemporaryDirectory(prefix="dem-bench-se-") as tmp:
        for k in ks:
            results.append(run_k(args, k, steps.get(k, 0.1), Path(tmp), device))

    print(
        f"\nsearch_efficiency: tiny Llama (hidden {args.hidden}, {args.layers} layers), device={device}"
    )
    print(
        "objective = mean over datasets of validation log-perplexity (lower is better); "
        "'within X%' = objective <= grid_best x (1 + X/100); TPE: median over "
        f"{args.repeats} seeds of the evaluations until first within (inf: not within "
        "its budget)\n"
    )
    rows = []
    for r in results:
        for label in THRESHOLDS:
            need = to_reach(r, label)
            reached = sum(s["reached"][label] is not None for s in r["tpe"])
            rows.append(
                [
                    r["k"],
                    r["grid_step"],
                    r["grid_points"],
                    r["grid_best"],
                    label,
                    r["grid_fraction_within"][label],
                    need,
                    f"{reached}/{len(r['tpe'])}",
                    bc.ratio(r["grid_points"], need),
                    r["tokens_per_evaluation"],
                    r["grid_points"] * r["tokens_per_evaluation"],
                    need * r["tokens_per_evaluation"],
                ]
            )
    print(
        bc.table(
            [
                "k",
                "step",
                "grid evals",
                "grid best",
                "within",
                "grid frac within",
                "TPE evals (median)",
                "seeds reached",
                "grid/TPE evals",
                "tokens/eval",
                "grid tokens",
                "TPE tokens (median)",
            ],
            rows,
        )
    )
    for r in results:
        weights = ", ".join(f"{n}={w:g}" for n, w in r["grid_best_weights"].items())
        per_seed = "; ".join(
            f"seed {s['seed']}: "
            + ", ".join(f"{lab} {v if v else '-'}" for lab, v in s["reached"].items())
            for s in r["tpe"]
        )
        print(
            f"k={r['k']}: grid best {r['grid_best']:.5f} at ({weights}); uniform weights "
            f"{r['uniform']:.5f}; grid worst {r['grid_worst']:.5f}; "
            f"{r['seconds_per_evaluation'] * 1e3:.1f} core-ms per evaluation\n"
            f"      TPE per seed (evaluations to reach): {per_seed}"
        )
    print_tune_arms(args, results)
    bc.write_json(
        args.json,
        {
            "benchmark": "search_efficiency",
            "args": vars(args),
            "machine": bc.machine(device),
            "thresholds": THRESHOLDS,
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
