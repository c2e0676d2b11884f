"""What a search trial costs beyond its forward pass: fixed cost per trial, per-token ratio,
evaluator utilisation.

Each leg is a real `dem_ray.ray.search.run_search` (Optuna's random sampler over the
simplex, k random vectors) through a pool of `--actors` evaluator actors, each holding
`--threads` CPUs and running torch on that many threads. The time of a leg is the
marginal wall time per trial: the span between the finish of trial `w` and of the last
trial, over the trials in it (the search's start-up and its first trials are left out).
Every leg runs at two validation sizes (`--rows`, rows per dataset), so the time a trial
costs an evaluator, actors x marginal time, fits `a + b x tokens`: `a` is the fixed cost
per trial, which holds the candidate's merge (timed apart by the actors, and shown beside
it). The bare forward pass is `token_nll` over the same rows in this process, at
the same thread count, timed side by side with the legs; the per-token ratio is the
search's evaluator time per scored token over the bare forward's.

    python benchmarks/search_overhead.py --size tiny --actors 1,2 --trials 40
    python benchmarks/search_overhead.py --size smollm2 --actors 1 --trials 16 --rows 2,8
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from pathlib import Path

import _common as bc
import ray
import torch

from dem_ray.config import SearchConfig
from dem_ray.core.perplexity import token_nll
from dem_ray.core.spaces import load_space
from dem_ray.models.base import load_model
from dem_ray.ray.evaluator import start_pool
from dem_ray.ray.search import SearchStats, read_trials, run_search

log = bc.log


class WorkerCount:
    """Ray worker processes (children of the raylet) seen while it runs: started, alive."""

    def __init__(self) -> None:
        import psutil

        self.raylets = [p for p in psutil.Process().children(recursive=True)
                        if "raylet" in p.name()]  # fmt: skip
        self.seen: set[int] = set()
        self.alive_max = 0
        self._stop = threading.Event()
        self.before = self._pids()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _pids(self) -> set[int]:
        pids: set[int] = set()
        for raylet in self.raylets:
            with contextlib.suppress(Exception):  # a raylet gone has no workers to count
                pids |= {c.pid for c in raylet.children()}
        return pids

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            pids = self._pids()
            self.seen |= pids
            self.alive_max = max(self.alive_max, len(pids))

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {
            "workers_started": len(self.seen - self.before),
            "workers_alive_max": self.alive_max,
        }


def bare_forward_seconds(base: Path, shards: dict[str, Path], rows: int, args) -> float:
    """One bare forward pass of the base over `rows` rows of every shard (median)."""
    from dem_ray.data.shards import load_shard

    model = load_model(base).eval()
    data = [load_shard(path)[0][:rows].long() for path in shards.values()]
    times = []
    for _ in range(args.warmup + args.repeats):
        start = time.perf_counter()
        for part in data:
            token_nll(model, part, args.batch_size)
        times.append(time.perf_counter() - start)
    return bc.median(times[args.warmup :])


def run_leg(args, pool, space, rows: int, scratch: Path, label: str) -> dict:
    """One search of `--trials` trials; the marginal wall time per trial and what it scored."""
    finished: list[float] = []
    cfg = SearchConfig(algorithm="random", num_trials=args.trials, seed=args.seed,
                       max_concurrent=args.concurrent or 2 * len(pool))  # fmt: skip
    out = scratch / label
    stats = SearchStats()
    workers = WorkerCount()
    run_search(cfg, space, pool, out, inputs=label, fresh=True, stats=stats,
               after_write=lambda: finished.append(time.perf_counter()))  # fmt: skip
    counted = workers.stop()
    trials = read_trials(out / "trials.jsonl")
    if len(trials) != args.trials or len(finished) != args.trials:
        raise SystemExit(f"error: {len(trials)} trials recorded, {args.trials} requested")
    skip = min(args.skip, args.trials - 2)
    per_trial = (finished[-1] - finished[skip]) / (args.trials - 1 - skip)
    tokens = trials[-1]["tokens_evaluated"]
    return {
        "rows": rows,
        "tokens_per_trial": tokens,
        "marginal_seconds_per_trial": per_trial,
        "evaluator_seconds_per_trial": per_trial * len(pool),
        "utilisation": stats.utilisation(),
        "candidates_per_second": stats.candidates_per_second(),
        "driver_ms_per_trial": 1e3 * stats.driver_seconds() / max(stats.candidates, 1),
        "merge_ms_per_trial": 1e3 * stats.merge_seconds / max(stats.candidates, 1),
        **counted,
    }


def measure(args, base: Path, vectors: list[Path], shards: dict, scratch: Path) -> list[dict]:
    space = load_space("simplex", list(shards))
    results = []
    for actors in args.actors:
        for rows in args.rows:
            kwargs = {
                "base_dir": str(base),
                "vector_paths": [str(v) for v in vectors],
                "shard_paths": {n: str(s) for n, s in shards.items()},
                "batch_size": args.batch_size,
                "max_sequences": rows,
                "torch_threads": args.threads,
                "device": args.device,
            }
            pool = start_pool(actors, kwargs, cpus=args.threads, gpus=args.gpus)
            try:
                leg = run_leg(args, pool, space, rows, scratch, f"a{actors}-r{rows}")
            finally:
                for actor in pool:
                    ray.kill(actor)
            # The bare forward right after the leg, at the same thread count.
            leg["bare_seconds"] = bare_forward_seconds(base, shards, rows, args)
            leg["actors"] = actors
            results.append(leg)
            log.info("actors %d, rows %d: %.1f ms per trial, utilisation %s", actors, rows,
                     1e3 * leg["marginal_seconds_per_trial"], leg["utilisation"])  # fmt: skip
    return results


def summarise(legs: list[dict]) -> list[dict]:
    """Per actor count: the fit a + b x tokens over the two sizes, and the ratios."""
    out = []
    for actors in sorted({leg["actors"] for leg in legs}):
        mine = sorted((x for x in legs if x["actors"] == actors), key=lambda x: x["rows"])
        small, large = mine[0], mine[-1]
        span = large["tokens_per_trial"] - small["tokens_per_trial"]
        slope = (large["evaluator_seconds_per_trial"] - small["evaluator_seconds_per_trial"]) / span
        fixed = small["evaluator_seconds_per_trial"] - slope * small["tokens_per_trial"]
        merge_ms = (small["merge_ms_per_trial"] + large["merge_ms_per_trial"]) / 2
        ratio = bc.ratio(large["evaluator_seconds_per_trial"], large["bare_seconds"])
        util = large["utilisation"]
        out.append({
            "actors": actors,
            "fixed_ms_per_trial": 1e3 * fixed,
            "merge_ms_per_trial": merge_ms,
            "fixed_beyond_merge_ms": 1e3 * fixed - merge_ms,
            "per_token_ratio": ratio,
            "per_token_ratio_small": bc.ratio(small["evaluator_seconds_per_trial"],
                                              small["bare_seconds"]),
            "utilisation_min": min(util) if util else float("nan"),
            "candidates_per_second": large["candidates_per_second"],
            "workers_started": max(x["workers_started"] for x in (small, large)),
        })  # fmt: skip
    return out


def main() -> None:
    p = bc.parser(__doc__.splitlines()[0], default_repeats="3 (bare forward passes)")
    p.add_argument("--trials", type=int, default=40, help="trials per search leg")
    p.add_argument("--skip", type=int, default=4, help="first trials left out of the timing")
    p.add_argument("--actors", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2],
                   help="evaluator actor counts, comma-separated")  # fmt: skip
    p.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=[4, 16],
                   help="two validation sizes, rows per dataset")  # fmt: skip
    p.add_argument("--concurrent", type=int, default=None,
                   help="search.max_concurrent (default: 2 x actors)")  # fmt: skip
    p.add_argument("--k", type=int, default=3, help="distribution vectors (datasets)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    device = bc.setup(args, tiny_repeats=3, smollm2_repeats=3)
    args.threads = args.threads or 1
    args.gpus = 1.0 / max(args.actors) if device.type == "cuda" else 0.0
    if len(args.rows) != 2 or args.rows[0] >= args.rows[1]:
        raise SystemExit("error: --rows takes two sizes, the smaller first (e.g. 4,16)")
    if args.trials < 4:
        raise SystemExit("error: --trials must be at least 4")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="search-overhead-") as tmp:
        scratch = Path(tmp)
        with bc.stdout_to_stderr():
            base, vectors, shards = bc.search_inputs(args, scratch, max(args.rows))
            cpus = max(args.actors) * args.threads + 1
            ray.init(address="local", num_cpus=cpus, num_gpus=1 if device.type == "cuda" else 0,
                     include_dashboard=False, log_to_driver=False,
                     _temp_dir=f"/tmp/so-{os.getpid()}")  # fmt: skip
            try:
                legs = measure(args, base, vectors, shards, scratch)
            finally:
                ray.shutdown()
    summary = summarise(legs)
    print(bc.table(
        ["actors", "rows", "tokens/trial", "ms/trial", "evaluator ms/trial", "bare ms",
         "ratio", "utilisation", "cand/s", "driver ms/trial", "workers started"],
        [[x["actors"], x["rows"], x["tokens_per_trial"], 1e3 * x["marginal_seconds_per_trial"],
          1e3 * x["evaluator_seconds_per_trial"], 1e3 * x["bare_seconds"],
          bc.ratio(x["evaluator_seconds_per_trial"], x["bare_seconds"]),
          "/".join(f"{u:.2f}" for u in x["utilisation"]), x["candidates_per_second"],
          x["driver_ms_per_trial"], x["workers_started"]] for x in legs],
    ))  # fmt: skip
    print(bc.table(
        ["actors", "fixed ms/trial (a)", "merge ms/trial", "a - merge", "per-token ratio",
         "min utilisation", "cand/s"],
        [[s["actors"], s["fixed_ms_per_trial"], s["merge_ms_per_trial"],
          s["fixed_beyond_merge_ms"], s["per_token_ratio"], s["utilisation_min"],
          s["candidates_per_second"]] for s in summary],
    ))  # fmt: skip
    print(
        "the merge is the candidate's own work (theta_0 + sum_i w_i v_i into the live "
        "weights); a - merge is what a trial costs beyond its merge and forward pass"
    )
    print("goals: fixed cost <= 50 ms per trial; per-token ratio <= 1.1 (tiny), <= 1.05 "
          "(smollm2); utilisation >= 0.90")  # fmt: skip
    bc.write_json(args.json, {"machine": bc.machine(device), "args": {**vars(args)},
                              "legs": legs, "summary": summary})  # fmt: skip


if __name__ == "__main__":
    main()
