"""Peak memory of the merge stage (dem_ray.core.merge.merge_to_dir) against the model size.

Each variant runs in a fresh child process (started by `vector_memory.py`'s launcher, so
its `ru_maxrss` is its own): `merge_to_dir(base, k vectors, weights, out,
max_shard_size=...)` once, as the merge stage calls it. A baseline child imports the same
modules and does nothing; its peak is subtracted. Also the child's high-water mark during
the merge above its RSS when the merge began (VmHWM reset through /proc/self/clear_refs).
Goal: <= 0.5x the model size, whatever the model size (the composite is streamed tensor
by tensor, part by part, into its shards; never whole in memory).

The vectors are fakes: N(0, 1e-3^2) per tensor of the base, fp32, saved once and cached.
`--base-dtypes bfloat16` also merges into a bf16 copy of the base (the vectors stay fp32).
`--methods ties` adds a variant of a method that needs each tensor whole (trim).

    python benchmarks/merge_memory.py --size smollm2
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common as bc
import torch
from vector_memory import (
    Launcher,
    RssSampler,
    argparse_hidden,
    maxrss,
    proc_status,
    reset_peak,
)

log = bc.log


def child(args) -> int:
    """Run in a fresh process: one merge_to_dir, then print its peak RSS figures."""
    from dem_ray.core.merge import merge_to_dir

    import_peak = maxrss()
    start_rss = proc_status("VmRSS")
    reset = reset_peak()
    sampler = RssSampler()
    start = time.perf_counter()
    if args.base:  # the baseline child imports the same modules and stops here
        vectors = [Path(p) for p in args.vectors.split(",")]
        weights = [1.0 / len(vectors)] * len(vectors)
        merge_to_dir(Path(args.base), vectors, weights, Path(args.out), method=args.method,
                     density=args.density, max_shard_size=args.max_shard_size)  # fmt: skip
    seconds = time.perf_counter() - start
    work_peak = maxrss()
    split = sampler.stop()
    print(
        json.dumps(
            {
                "peak_rss": max(import_peak, work_peak),
                "seconds": seconds,
                "work_peak_over_start": work_peak - start_rss if reset and start_rss else None,
                "sampled_peak_anon": split["RssAnon"],
                "sampled_peak_file": split["RssFile"],
                "shards": sorted(p.name for p in Path(args.out).glob("*.safetensors"))
                if args.base
                else [],
            }
        )
    )
    return 0


def weight_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def build_vectors(base: Path, out: Path, k: int, seed: int) -> None:
    """k fake fp32 vectors with the base's tensor names and shapes, written streamed."""
    from dem_ray.core.safetensors_io import TensorReader, TensorWriter
    from dem_ray.core.vectors import tensor_index

    index = tensor_index(base)
    readers = {path: TensorReader(path) for path in set(index.values())}
    names = sorted(index)
    specs = [(n, torch.float32, readers[index[n]].spec(n)[1]) for n in names]
    for i in range(k):
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        with TensorWriter(out / f"v{i}.safetensors", specs) as writer:
            for name, _, shape in specs:
                writer.write(name, torch.randn(shape, generator=gen) * 1e-3)
    for reader in readers.values():
        reader.close()


def build_bf16(base: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    from dem_ray.core.merge import MODEL_SIDE_FILES

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(str(out))
    for name in MODEL_SIDE_FILES:
        if (base / name).exists() and not (out / name).exists():
            shutil.copy2(base / name, out / name)


def run_child(launcher: Launcher, args, base: Path | None, vectors, method: str, out: Path):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--out", str(out),
           "--method", method, "--density", str(args.density),
           "--max-shard-size", args.max_shard_size]  # fmt: skip
    if base is not None:
        cmd += ["--base", str(base), "--vectors", ",".join(str(v) for v in vectors)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    rc, stdout, stderr = launcher.run(cmd)
    if rc != 0:
        sys.stderr.write(stderr)
        raise RuntimeError(f"child ({method}, {base}) exited {rc}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(stdout.strip().splitlines()[-1])


def main() -> int:
    p = bc.parser(__doc__.splitlines()[0], default_repeats="3 on tiny, 1 on smollm2")
    p.add_argument("--k", type=int, default=3, help="vectors merged")
    p.add_argument("--max-shard-size", default="100MB", help="merge.max_shard_size")
    p.add_argument("--methods", default="linear", help="merge methods, comma-separated")
    p.add_argument("--density", type=float, default=0.5, help="density of ties / DARE")
    p.add_argument("--base-dtypes", default="float32,bfloat16", help="the base's dtypes")
    p.add_argument("--child", action="store_true", help=argparse_hidden())
    p.add_argument("--base", default=None, help=argparse_hidden())
    p.add_argument("--vectors", default="", help=argparse_hidden())
    p.add_argument("--out", default=None, help=argparse_hidden())
    p.add_argument("--method", default="linear", help=argparse_hidden())
    args = p.parse_args()
    if args.child:
        if args.threads:
            torch.set_num_threads(args.threads)
        return child(args)
    device = bc.setup(args, tiny_repeats=3, smollm2_repeats=1)
    if device.type == "cuda":
        log.info("merge_to_dir runs on the CPU; --device cuda changes nothing here")
    launcher = Launcher()  # before anything big is loaded here (see vector_memory.py)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    dtypes = [d.strip() for d in args.base_dtypes.split(",") if d.strip()]

    cache = Path(args.cache_dir)
    if args.size == "smollm2":
        fp32 = bc.smollm2_dir(cache)
    else:
        fp32 = bc.cached_build(cache / "tiny-base", lambda d: bc.tiny_dir(d / "m")) / "m"
    bases = {"float32": fp32}
    if "bfloat16" in dtypes:
        bases["bfloat16"] = bc.cached_build(
            cache / f"{args.size}-bf16", lambda d: build_bf16(fp32, d)
        )
    vector_dir = bc.cached_build(
        cache / f"{args.size}-merge-vectors-k{args.k}",
        lambda d: build_vectors(fp32, d, args.k, args.seed),
    )
    vectors = [vector_dir / f"v{i}.safetensors" for i in range(args.k)]

    variants = [(dtype, method) for dtype in dtypes for method in methods]
    peaks: dict[object, list[int]] = {"baseline": [], **{v: [] for v in variants}}
    over_start: dict[object, list[int]] = {v: [] for v in variants}
    seconds: dict[object, list[float]] = {v: [] for v in variants}
    anon: dict[object, list[int]] = {v: [] for v in peaks}
    shards: dict[object, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="dem-bench-mm-") as tmp:
        try:
            for round_ in range(args.repeats):
                got = run_child(launcher, args, None, [], "linear", Path(tmp) / "baseline")
                peaks["baseline"].append(got["peak_rss"])
                anon["baseline"].append(got["sampled_peak_anon"])
                for variant in variants:  # side by side in every round
                    dtype, method = variant
                    log.info("round %d: %s base, %s", round_ + 1, dtype, method)
                    got = run_child(launcher, args, bases[dtype], vectors, method,
                                    Path(tmp) / "out")  # fmt: skip
                    peaks[variant].append(got["peak_rss"])
                    seconds[variant].append(got["seconds"])
                    anon[variant].append(got["sampled_peak_anon"])
                    if got["work_peak_over_start"] is not None:
                        over_start[variant].append(got["work_peak_over_start"])
                    shards[variant] = got["shards"]
        finally:
            launcher.close()

    baseline = bc.median(peaks["baseline"])
    print(f"\nmerge_memory: size={args.size}, k={args.k} fp32 vectors, "
          f"max_shard_size {args.max_shard_size}")  # fmt: skip
    print(
        f"baseline child (imports only) peak RSS {baseline / 2**20:.1f} MiB; median of "
        f"{args.repeats} fresh child processes per variant; torch threads "
        f"{args.threads or 'default'}\n"
    )
    rows, figures = [], {}
    for variant in variants:
        dtype, method = variant
        model_bytes = weight_bytes(bases[dtype])
        peak = bc.median(peaks[variant])
        work = bc.median(over_start[variant])
        anon_above = bc.median(anon[variant]) - bc.median(anon["baseline"])
        rows.append([dtype, method, model_bytes / 2**20, peak / 2**20, (peak - baseline) / 2**20,
                     (peak - baseline) / model_bytes, work / model_bytes, anon_above / model_bytes,
                     peak / model_bytes, len(shards[variant]),
                     bc.median(seconds[variant])])  # fmt: skip
        figures[f"{dtype}/{method}"] = {
            "model_bytes": model_bytes,
            "peak_rss": peak,
            "above_baseline": peak - baseline,
            "per_model_size": (peak - baseline) / model_bytes,
            "work_peak_over_start": work,
            "work_per_model_size": work / model_bytes,
            "sampled_peak_anon_above_baseline": anon_above,
            "peak_rss_with_imports_per_model_size": peak / model_bytes,
            "shards": shards[variant],
            "seconds": bc.median(seconds[variant]),
            "all_peak_rss": peaks[variant],
        }
    print(
        bc.table(
            ["base", "method", "model MiB", "peak RSS MiB", "above baseline MiB",
             "peak RSS / model size", "work peak - start RSS / model size", "anon / model",
             "with imports / model", "shards", "merge s"],
            rows,
        )
    )  # fmt: skip
    print(
        "peak RSS / model size = (child's ru_maxrss - baseline child's) / the base's safetensors "
        "bytes (goal <= 0.5); work peak - start RSS = the child's high-water mark during "
        "merge_to_dir minus its RSS when that began; anon = peak RssAnon above the baseline "
        "child's (sampled every 5 ms); with imports = the child's whole peak (torch included)"
    )
    bc.write_json(
        args.json,
        {
            "benchmark": "merge_memory",
            "args": vars(args),
            "machine": bc.machine(device),
            "baseline_peak_rss": baseline,
            "variants": figures,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
