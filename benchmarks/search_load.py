"""A long search under load: many trials, several in flight, one evaluator actor.

The search is `dem_ray.ray.search.run_search` with Optuna's random sampler over the simplex,
on a tiny model with k random distribution vectors and a few validation rows of the
running Python's stdlib source, through a pool of one evaluator actor. It runs in two
legs on the same pool: the first `--first` trials, then a resumed search (the kept
trials are not re-run) up to `--trials`. After each leg the evaluator actor's resident
memory (RSS of its process) is read, so a leak per candidate shows as growth between
the two figures; trials per second covers the whole path (the sampler, the actor call, the
in-place merge, the forward passes, the trial record).

    python benchmarks/search_load.py --size tiny --trials 300 --first 30 --concurrent 4
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import _common as bc
import ray

from dem_ray.config import SearchConfig
from dem_ray.core.spaces import load_space
from dem_ray.ray.evaluator import start_pool
from dem_ray.ray.search import read_trials, run_search

log = bc.log


def main() -> None:
    p = bc.parser(__doc__.splitlines()[0], default_repeats="1 (one search)")
    p.add_argument("--trials", type=int, default=300, help="trials in the whole search")
    p.add_argument("--first", type=int, default=30, help="trials before the first RSS reading")
    p.add_argument("--concurrent", type=int, default=4, help="trials in flight at once")
    p.add_argument("--k", type=int, default=3, help="distribution vectors (datasets)")
    p.add_argument("--rows", type=int, default=4, help="validation rows per dataset")
    p.add_argument("--seq-len", type=int, default=64)
    args = p.parse_args()
    device = bc.setup(args, tiny_repeats=1, smollm2_repeats=1)
    if not 0 < args.first < args.trials:
        raise SystemExit("error: --first must be between 0 and --trials")
    with tempfile.TemporaryDirectory(prefix="search-load-") as tmp:
        scratch = Path(tmp)
        with bc.stdout_to_stderr():
            base, vectors, shards = bc.search_inputs(args, scratch, args.rows)
            ray.init(address="local", num_cpus=max(2, args.concurrent + 1),
                     include_dashboard=False, log_to_driver=False,
                     _temp_dir=f"/tmp/sl-{os.getpid()}")  # fmt: skip
            try:
                figures = run_load(args, device, base, vectors, shards, scratch)
            finally:
                ray.shutdown()
    print(bc.table(
        ["trials", "wall s", "trials/s", "evaluator RSS MiB"],
        [[args.first, figures["first_seconds"], figures["first_trials_per_second"],
          figures["rss_first_bytes"] / 2**20],
         [args.trials, figures["total_seconds"], figures["trials_per_second"],
          figures["rss_all_bytes"] / 2**20]],
    ))  # fmt: skip
    print(f"evaluator RSS after {args.trials} / after {args.first} trials: "
          f"{figures['rss_ratio']:.3f} (flat memory: within 1.10)")  # fmt: skip
    print(f"evaluator calls: {figures['calls']} for {args.trials} trials")
    bc.write_json(args.json, {"machine": bc.machine(device), "args": vars(args), **figures})


def run_load(args, device, base: Path, vectors: list[Path], shards: dict, scratch: Path) -> dict:
    kwargs = {
        "base_dir": str(base),
        "vector_paths": [str(v) for v in vectors],
        "shard_paths": {n: str(s) for n, s in shards.items()},
        "batch_size": args.rows,
        "torch_threads": args.threads or 1,
        "device": device.type,
    }
    pool = start_pool(1, kwargs, cpus=0.5)
    space = load_space("simplex", list(shards))
    out = scratch / "search"
    legs = {}
    for label, count in (("first", args.first), ("all", args.trials)):
        cfg = SearchConfig(algorithm="random", num_trials=count,
                           max_concurrent=args.concurrent, seed=args.seed)  # fmt: skip
        start = time.perf_counter()
        run_search(cfg, space, pool, out, inputs="load", fresh=label == "first")
        info = ray.get(pool[0].info.remote())
        legs[label] = {"seconds": time.perf_counter() - start, "rss": info["rss_bytes"]}
        log.info("after %d trials: evaluator RSS %.1f MiB", count, info["rss_bytes"] / 2**20)
    trials = read_trials(out / "trials.jsonl")
    if len(trials) != args.trials:
        raise SystemExit(f"error: {len(trials)} trials recorded, {args.trials} requested")
    total = legs["first"]["seconds"] + legs["all"]["seconds"]
    return {
        "first_seconds": legs["first"]["seconds"],
        "first_trials_per_second": args.first / legs["first"]["seconds"],
        "total_seconds": total,
        "trials_per_second": args.trials / total,
        "rss_first_bytes": legs["first"]["rss"],
        "rss_all_bytes": legs["all"]["rss"],
        "rss_ratio": bc.ratio(legs["all"]["rss"], legs["first"]["rss"]),
        "calls": info["calls"],
    }


if __name__ == "__main__":
    main()
