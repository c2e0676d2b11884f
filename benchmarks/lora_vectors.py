"""Evaluator memory and merge time of low-rank (LoRA) vectors against the same vectors dense.

k random LoRA adapters of rank `--rank` on every linear layer of the decoder (PEFT's
`all-linear`: q, k, v, o, gate, up and down projections; not the head), A ~ N(0, 1/d_in)
and B ~ N(0, 1e-3^2) with the scale folded in, as `dem_ray.core.lowrank.lora_vector`
writes them. The model has SmolLM2-135M's shape (merge_bandwidth.py's `build_model`,
weights N(0, 0.02^2), nothing loaded). Two evaluators' merges, each on its own copy of
the model, timed side by side in every round:

  dense     ResidentMerge with the vectors densified (v_i = B_i A_i, zero elsewhere),
            in `--vector-dtype`: what `finetune.method: full` vectors cost
  low-rank  LowRankMerge with the factors in `--vector-dtype`

Resident bytes = what the merge holds besides the model's own weights (ResidentMerge:
theta_0's flat copy, the k stacked vectors and combine's scratch; LowRankMerge: theta_0
of the adapted weights, the factors, the column weights and its GEMM scratch). Per
candidate: `apply` alone, and `apply` + `token_nll` over `--rows` x `--seq-len` random
tokens (candidates/s of each). Also the vector files' bytes (dense: every parameter;
low-rank: k r (d_in + d_out) per adapted weight), the one-time build of each merge, and
the largest difference between the two merges' weights (the same merge, summed in
another order).

    python benchmarks/lora_vectors.py --size smollm2
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Iterator, Mapping

import _common as bc
import torch
from merge_bandwidth import build_model

from dem_ray.core.lowrank import LowRankMerge, factor_names
from dem_ray.core.merge import ResidentMerge
from dem_ray.core.perplexity import token_nll
from dem_ray.core.vectors import DTYPES

log = bc.log


def adapted_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Weight name -> (d_out, d_in) of every linear layer but the head (all-linear)."""
    return {
        f"{name}.weight": tuple(module.weight.shape)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    }


def random_factors(
    shapes: Mapping[str, tuple[int, int]], rank: int, seed: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """One low-rank vector file's tensors: `<param>::A` (r x d_in), `<param>::B` (d_out x r)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for param, (d_out, d_in) in shapes.items():
        a_name, b_name = factor_names(param)
        out[a_name] = (torch.randn(rank, d_in, generator=gen) / d_in**0.5).to(dtype)
        out[b_name] = (torch.randn(d_out, rank, generator=gen) * 1e-3).to(dtype)
    return out


class Densified(Mapping):
    """A dense vector made from low-rank factors tensor by tensor when asked (B A in float32;
    zero where no factor is), so k model-sized vectors never exist outside ResidentMerge."""

    def __init__(self, factors: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size]):
        self.factors = factors
        self.shapes = dict(shapes)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise KeyError(name)
        a_name, b_name = factor_names(name)
        if a_name not in self.factors:
            return torch.zeros(self.shapes[name])
        return self.factors[b_name].float() @ self.factors[a_name].float()

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def resident_bytes(rm: ResidentMerge) -> int:
    """ResidentMerge's buffers besides the live weights: theta_0, the vectors, scratch."""
    total = 0
    for part in rm.parts:
        total += part.base.nbytes + part.vectors.nbytes
        if part.scratch is not None:
            total += sum(b.nbytes for b in part.scratch._buffers.values())
            total += part.scratch._weights.nbytes
    return total


def main() -> int:
    p = bc.parser(__doc__.splitlines()[0], default_repeats="10 on tiny, 5 on smollm2")
    p.add_argument("--k", type=int, default=4, help="number of vectors (adapters)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r of every adapter")
    p.add_argument("--vector-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="how both evaluators hold the vectors (evaluator.vector_dtype)")  # fmt: skip
    p.add_argument("--rows", type=int, default=2, help="rows scored per candidate (0: none)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row")
    args = p.parse_args()
    device = bc.setup(args, tiny_repeats=10, smollm2_repeats=5)
    if args.k < 1 or args.rank < 1:
        sys.exit("error: --k and --rank must be at least 1")
    vdtype = DTYPES[args.vector_dtype]
    element = torch.empty((), dtype=vdtype).element_size()

    models = {way: build_model(args.size, None, device).eval() for way in ("dense", "low-rank")}
    shapes = bc.unique_shapes(models["dense"])
    params = bc.param_count(models["dense"])
    weight_bytes = sum(p.nbytes for p in models["dense"].parameters())
    adapted = adapted_shapes(models["dense"])
    adapted_params = sum(o * i for o, i in adapted.values())
    log.info("%s-shaped Llama: %d parameters, %d linear weights adapted (%d parameters), "
             "rank %d, k=%d, on %s", args.size, params, len(adapted), adapted_params,
             args.rank, args.k, device)  # fmt: skip
    factors = [random_factors(adapted, args.rank, args.seed + 1 + i, vdtype) for i in range(args.k)]

    start = time.perf_counter()
    rm = ResidentMerge(models["dense"], [Densified(f, shapes) for f in factors], args.vector_dtype)
    bc.sync(device)
    build = {"dense": time.perf_counter() - start}
    start = time.perf_counter()
    lr = LowRankMerge(models["low-rank"], factors, args.vector_dtype)
    bc.sync(device)
    build["low-rank"] = time.perf_counter() - start
    held = {"dense": resident_bytes(rm), "low-rank": lr.resident_bytes()}
    files = {"dense": params * element,
             "low-rank": sum(t.nbytes for t in factors[0].values())}  # fmt: skip

    weights = bc.random_simplex(args.k, random.Random(args.seed))
    merges = {"dense": rm, "low-rank": lr}
    fns = {f"{way} apply": (lambda m=m: m.apply(weights)) for way, m in merges.items()}
    rows = None
    if args.rows:
        gen = torch.Generator().manual_seed(args.seed)
        vocab = models["dense"].config.vocab_size
        rows = torch.randint(0, vocab, (args.rows, args.seq_len), generator=gen).to(device)
        for way, m in merges.items():

            def candidate(m=m, model=models[way]) -> float:
                m.apply(weights)
                with torch.no_grad():
                    return token_nll(model, rows, args.rows)[0]

            fns[f"{way} apply + forward"] = candidate
    times = bc.interleaved(fns, args.repeats, args.warmup, device)

    rm.apply(weights)
    lr.apply(weights)
    dense_state = models["dense"].state_dict()
    diff, scale = 0.0, 0.0
    for name, tensor in models["low-rank"].state_dict().items():
        diff = max(diff, float((tensor.float() - dense_state[name].float()).abs().max()))
        scale = max(scale, float(dense_state[name].float().abs().max()))

    print(f"\nlora_vectors: {args.size}-shaped Llama, {params:,} parameters, device={device}")
    print(
        f"k = {args.k} adapters of rank {args.rank} on all {len(adapted)} decoder linear weights "
        f"({adapted_params:,} parameters, {adapted_params / params:.0%} of the model); vectors "
        f"held as {args.vector_dtype}; median of {args.repeats} side-by-side rounds after "
        f"{args.warmup} warm-up; torch threads {torch.get_num_threads()}\n"
        f"model weights: {bc.human_bytes(weight_bytes)} (the same for both, not counted below)\n"
    )
    results = {}
    table = []
    for way in ("dense", "low-rank"):
        apply_s = bc.median(times[f"{way} apply"])
        row = {
            "resident_bytes": held[way],
            "vector_file_bytes": files[way],
            "build_seconds": build[way],
            "apply_seconds": apply_s,
            "candidates_per_second_merge": 1 / apply_s if apply_s > 0 else float("nan"),
            "all_apply_seconds": times[f"{way} apply"],
        }
        forward_s = float("nan")
        if rows is not None:
            forward_s = bc.median(times[f"{way} apply + forward"])
            row["apply_forward_seconds"] = forward_s
            row["candidates_per_second"] = 1 / forward_s if forward_s > 0 else float("nan")
            row["all_apply_forward_seconds"] = times[f"{way} apply + forward"]
        results[way] = row
        table.append([way, held[way] / 2**20, files[way] / 2**20, build[way], apply_s * 1e3,
                      row["candidates_per_second_merge"], forward_s * 1e3,
                      row.get("candidates_per_second", float("nan"))])  # fmt: skip
    d, low = results["dense"], results["low-rank"]
    table.append(["dense / low-rank", bc.ratio(d["resident_bytes"], low["resident_bytes"]),
                  bc.ratio(d["vector_file_bytes"], low["vector_file_bytes"]),
                  bc.ratio(d["build_seconds"], low["build_seconds"]),
                  bc.ratio(d["apply_seconds"], low["apply_seconds"]),
                  bc.ratio(low["candidates_per_second_merge"], d["candidates_per_second_merge"]),
                  bc.ratio(d.get("apply_forward_seconds", float("nan")),
                           low.get("apply_forward_seconds", float("nan"))),
                  bc.ratio(low.get("candidates_per_second", float("nan")),
                           d.get("candidates_per_second", float("nan")))])  # fmt: skip
    print(
        bc.table(
            ["merge", "resident MiB", "vector file MiB (one)", "build s", "apply ms",
             "candidates/s (apply)", "apply + forward ms", "candidates/s"],
            table,
        )
    )  # fmt: skip
    print(
        "resident = the merge's buffers besides the model's weights; the last row holds "
        "ratios (dense / low-rank; for candidates/s low-rank / dense)\n"
        f"forward = token_nll over {args.rows} x {args.seq_len} random tokens; "
        f"max |low-rank - dense| over the weights: {diff:.3g} (largest weight {scale:.3g})"
    )
    bc.write_json(
        args.json,
        {
            "benchmark": "lora_vectors",
            "args": vars(args),
            "machine": bc.machine(device),
            "params": params,
            "adapted_params": adapted_params,
            "weight_bytes": weight_bytes,
            "max_abs_diff": diff,
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
