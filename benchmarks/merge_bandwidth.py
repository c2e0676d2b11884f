"""Achieved memory bandwidth of one ResidentMerge.apply against a plain device copy.

Bytes counted for one apply (the least any merge must move):
    read theta_0 (live dtype) + read k vectors (vector dtype) + write the live weights
    = params x (2 x 4 + k x 2 or 4) bytes for fp32 weights and bf16 or fp32 vectors.
Bytes counted for the copy: read src + write dst of one model-sized fp32 buffer
(`dst.copy_(src)`, both pre-allocated). Copy and apply are timed side by side in every
round, per configuration, so a ratio is never taken across a change of machine load.

Also timed, side by side: `addmv apply`, the kernel ResidentMerge ran before the evaluators
and `merge` shared one float32 arithmetic (`merge_methods.combine`, elementwise, chunk by
chunk): one `addmv` over the whole buffer for fp32 vectors, and for bf16 vectors a
pre-allocated fp32 scratch of k x `--scratch-chunk` elements, converted chunk by chunk, then
`addmv`. Its result differs from `apply`'s in the last bits (another order of the sums);
the table prints by how much. And the bytes `apply` allocates per call (torch profiler).

    python benchmarks/merge_bandwidth.py --size smollm2
"""

from __future__ import annotations

import sys

import _common as bc
import torch

from dem_ray.core import merge as merge_module
from dem_ray.core.merge import ResidentMerge

log = bc.log
ELEMENT = {"float32": 4, "bfloat16": 2}
SHAPES = {
    # SmolLM2-135M's shape (config.json of the converted GGUF); weights are not loaded.
    "smollm2": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=bc.TINY["hidden"],
        intermediate_size=2 * bc.TINY["hidden"],
        num_hidden_layers=bc.TINY["layers"],
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=bc.TINY["vocab_size"],
        tie_word_embeddings=True,
    ),
}


class Flat(torch.nn.Module):
    """A model that is just `params` weights in one tensor (for --params)."""

    def __init__(self, params: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(params), requires_grad=False)


def build_model(size: str, params: int | None, device: torch.device) -> torch.nn.Module:
    """A model of the right shape, weights N(0, 0.02^2), built without any download."""
    if params:
        model = Flat(params)
    else:
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig(**SHAPES[size])
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model = model.to_empty(device="cpu")
        model.tie_weights()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.to(device)


class AddmvApply:
    """The previous ResidentMerge.apply (fp32 weights): one addmv, or for vectors in another
    dtype a pre-allocated scratch of k x chunk converted per chunk, then addmv."""

    def __init__(self, rm: ResidentMerge, chunk: int) -> None:
        self.rm = rm
        self.chunk = min(chunk, rm.live.numel())
        self.weights = torch.empty(rm.k, dtype=rm.live.dtype, device=rm.live.device)
        self.scratch = None
        if rm.vectors.dtype != rm.live.dtype:
            shape = (rm.k, self.chunk)
            self.scratch = torch.empty(shape, dtype=rm.live.dtype, device=rm.live.device)

    def __call__(self, weights) -> None:
        rm = self.rm
        self.weights.copy_(torch.tensor(list(weights), dtype=rm.live.dtype))
        if self.scratch is None:
            torch.addmv(rm.base, rm.vectors.t(), self.weights, out=rm.live)
            return
        n = rm.live.numel()
        for start in range(0, n, self.chunk):
            end = min(start + self.chunk, n)
            scratch = self.scratch[:, : end - start]
            scratch.copy_(rm.vectors[:, start:end])
            torch.addmv(rm.base[start:end], scratch.t(), self.weights, out=rm.live[start:end])


def allocated_bytes(fn, device: torch.device) -> tuple[int, int]:
    """(bytes, count) of tensor allocations during one call of fn, from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
        bc.sync(device)
    total, count = 0, 0
    for event in prof.events():
        if event.name == "[memory]":
            continue
        grown = event.cpu_memory_usage if device.type == "cpu" else event.device_memory_usage
        if grown > 0 and not event.cpu_children:
            total += grown
            count += 1
    return total, count


def main() -> int:
    p = bc.parser(__doc__.splitlines()[0], default_repeats="20 on tiny, 10 on smollm2")
    p.add_argument(
        "--params",
        type=int,
        default=None,
        help="use a flat buffer of this many parameters instead of a real-shaped model",
    )
    p.add_argument("--ks", default="2,4,8", help="numbers of vectors, comma-separated")
    p.add_argument("--dtypes", default="float32,bfloat16", help="vector dtypes, comma-separated")
    p.add_argument(
        "--scratch-chunk",
        type=int,
        default=1 << 22,
        help="elements per chunk of the addmv apply's scratch (bf16 vectors)",
    )
    args = p.parse_args()
    device = bc.setup(args, tiny_repeats=20, smollm2_repeats=10)
    ks = [int(x) for x in args.ks.split(",")]
    dtypes = [x.strip() for x in args.dtypes.split(",")]
    for dtype in dtypes:
        if dtype not in ELEMENT:
            sys.exit(f"error: --dtypes: {dtype!r} is not one of {', '.join(ELEMENT)}")

    model = build_model(args.size, args.params, device)
    shapes = bc.unique_shapes(model)
    params = bc.param_count(model)
    live_bytes = 4
    shape_name = f"flat buffer of {params:,}" if args.params else f"{args.size}-shaped Llama"
    log.info("%s: %d parameters on %s", shape_name, params, device)
    copy = bc.copy_seconds(params, torch.float32, device)
    copy_bytes = 2 * params * live_bytes

    results = []
    rng = __import__("random").Random(args.seed)
    for dtype in dtypes:
        for k in ks:
            log.info("vectors %s, k=%d: building", dtype, k)
            vectors = [bc.RandomVectors(shapes, seed=i + 1) for i in range(k)]
            rm = ResidentMerge(model, vectors, dtype)
            weights = bc.random_simplex(k, rng)
            fns = {"copy": copy, "apply": lambda rm=rm, w=weights: rm.apply(w)}
            scratch = AddmvApply(rm, args.scratch_chunk)
            fns["addmv apply"] = lambda s=scratch, w=weights: s(w)
            times = bc.interleaved(fns, args.repeats, max(args.warmup, 1), device)
            nbytes = params * (2 * live_bytes + k * ELEMENT[dtype])
            alloc, nalloc = allocated_bytes(lambda rm=rm, w=weights: rm.apply(w), device)
            row = {
                "vector_dtype": dtype,
                "k": k,
                "bytes": nbytes,
                "copy_seconds": bc.median(times["copy"]),
                "apply_seconds": bc.median(times["apply"]),
                "apply_allocated_bytes": alloc,
                "apply_allocations": nalloc,
                "all_copy_seconds": times["copy"],
                "all_apply_seconds": times["apply"],
            }
            row["copy_gb_per_s"] = bc.gbps(copy_bytes, row["copy_seconds"])
            row["apply_gb_per_s"] = bc.gbps(nbytes, row["apply_seconds"])
            rm.apply(weights)
            expected = rm.live.clone()
            scratch(weights)
            row["addmv_max_abs_diff"] = float((rm.live - expected).abs().max())
            row["addmv_seconds"] = bc.median(times["addmv apply"])
            row["addmv_gb_per_s"] = bc.gbps(nbytes, row["addmv_seconds"])
            row["all_addmv_seconds"] = times["addmv apply"]
            row["apply_over_addmv"] = row["apply_seconds"] / row["addmv_seconds"]
            del expected
            results.append(row)
            del rm, scratch, fns
            log.info(
                "vectors %s, k=%d: apply %.1f GB/s, copy %.1f GB/s",
                dtype,
                k,
                row["apply_gb_per_s"],
                row["copy_gb_per_s"],
            )

    print(f"\nmerge_bandwidth: {shape_name}, {params:,} parameters, device={device}")
    print(
        f"median of {args.repeats} side-by-side rounds; torch threads {torch.get_num_threads()}\n"
        "apply bytes = read theta_0 (4 B/param) + read k vectors (4 or 2 B/param each) + "
        "write live (4 B/param)\n"
        f"copy bytes = read + write of one model-sized fp32 buffer ({bc.gib(copy_bytes):.3f} GiB)\n"
    )
    rows = []
    for r in results:
        rows.append(
            [
                r["vector_dtype"],
                r["k"],
                bc.gib(r["bytes"]),
                r["apply_seconds"] * 1e3,
                r["apply_gb_per_s"],
                r["copy_gb_per_s"],
                bc.ratio(r["apply_gb_per_s"], r["copy_gb_per_s"]),
                f"{bc.human_bytes(r['apply_allocated_bytes'])} in {r['apply_allocations']}",
                r["addmv_seconds"] * 1e3,
                r["addmv_gb_per_s"],
                bc.ratio(r["addmv_gb_per_s"], r["copy_gb_per_s"]),
                r["apply_over_addmv"],
            ]
        )
    print(
        bc.table(
            [
                "vectors",
                "k",
                "GiB/apply",
                "apply ms",
                "apply GB/s",
                "copy GB/s",
                "apply/copy",
                "allocated per apply",
                "addmv ms",
                "addmv GB/s",
                "addmv/copy",
                "apply/addmv",
            ],
            rows,
        )
    )
    print(
        "apply = ResidentMerge.apply: merge_methods.combine, float32 elementwise in chunks of "
        f"{merge_module.MIX_CHUNK:,} (the arithmetic merge_to_dir writes with); addmv = the "
        "previous kernel: one addmv (fp32 vectors), or a pre-allocated fp32 scratch of k x "
        f"{args.scratch_chunk:,} elements then addmv (bf16)"
    )
    diffs = [r["addmv_max_abs_diff"] for r in results]
    print(f"addmv apply vs ResidentMerge.apply: max |difference| {max(diffs):.3g}")
    bc.write_json(
        args.json,
        {
            "benchmark": "merge_bandwidth",
            "args": vars(args),
            "machine": bc.machine(device),
            "params": params,
            "copy_bytes": copy_bytes,
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
