"""Candidates per second: the resident evaluator against merging on disk.

One base, k distribution vectors (N(0, scale^2) per weight), the same validation
tokens (rows x seq_len tokens of the running Python's stdlib source, tokenized by the
model's own tokenizer). Per candidate, measured side by side in every round:

  (0) forward   token_nll on the already-merged live model (the floor)
  (a) resident  ResidentMerge.apply(w) + token_nll            (fp32 and bf16 vectors)
  (b) disk      theta_0 + sum_i w_i v_i into a state dict in memory, safetensors
                save_file + config.json into a temp dir, from_pretrained, token_nll
                (the DEM authors' release: merge to a checkpoint, then evaluate it)
  (b') stream   dem_ray.core.merge.merge_to_dir (reads vectors from disk) + load + eval
  (c) mergekit  mergekit task_arithmetic via run_merge to a temp dir + load + eval

Overhead of a method = median over rounds of (its time - forward time in that round).
Also: the merge alone (apply) against a plain copy of a model-sized buffer, and the
memory-bandwidth floor of one merge.

Then the merge methods (`--methods`, dem_ray.core.merge_methods), side by side in the
same rounds at the same k, fp32 vectors: per method the one-time preparation (building
its ResidentMerge), apply alone, and apply + token_nll, each against linear.

    python benchmarks/candidate_throughput.py --size smollm2 --repeats 3
"""

from __future__ import annotations

import gc
import math
import random
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import _common as bc
import torch
from safetensors.torch import save_file

from dem_ray.core.merge import MODEL_SIDE_FILES, ResidentMerge, merge_to_dir
from dem_ray.core.merge_methods import METHODS
from dem_ray.core.perplexity import token_nll
from dem_ray.core.vectors import save_tensors, tensor_index
from dem_ray.models.base import load_model, load_tokenizer

log = bc.log
ELEMENT = {"float32": 4, "bfloat16": 2}


def merge_bytes(params: int, k: int, vector_dtype: str, live_bytes: int = 4) -> int:
    """Bytes one merge must touch: read theta_0, read k vectors, write the live weights."""
    return params * (2 * live_bytes + k * ELEMENT[vector_dtype])


class DiskWays:
    """The on-disk candidates (b), (b') and (c), from CPU copies of the same base and vectors."""

    def __init__(self, base_dir: Path, rm: ResidentMerge, tmp: Path, device, want_mergekit: bool):
        self.base_dir = base_dir
        self.tmp = tmp
        self.device = device
        self.names = sorted(tensor_index(base_dir))
        self.base_sd: dict[str, torch.Tensor] = {}
        self.vec_sds: list[dict[str, torch.Tensor]] = [{} for _ in range(rm.k)]
        for name in self.names:
            offset, n, shape = rm.slices[name]
            self.base_sd[name] = rm.base[offset : offset + n].view(shape).cpu()
            for i in range(rm.k):
                self.vec_sds[i][name] = rm.vectors[i, offset : offset + n].view(shape).float().cpu()
        self.vector_paths = []
        for i, vec in enumerate(self.vec_sds):
            path = tmp / "vectors" / f"v{i}.safetensors"
            save_tensors(vec, path)
            self.vector_paths.append(path)
        self.mergekit_reason = "not requested (--no-mergekit)"
        self.mergekit = None
        if want_mergekit:
            self.mergekit, self.mergekit_reason = self._import_mergekit()
        self.ft_dirs: list[Path] = []
        if self.mergekit is not None:
            # mergekit's task_arithmetic takes fine-tuned models: theta_i = theta_0 + v_i.
            for i, vec in enumerate(self.vec_sds):
                ft = tmp / "finetunes" / f"ft{i}"
                ft.mkdir(parents=True)
                save_file(
                    {n: (self.base_sd[n] + vec[n]).contiguous() for n in self.names},
                    str(ft / "model.safetensors"),
                    metadata={"format": "pt"},
                )
                self._side_files(ft)
                self.ft_dirs.append(ft)
        self.count = 0

    @staticmethod
    def _import_mergekit():
        try:
            from mergekit.config import MergeConfiguration
            from mergekit.merge import run_merge
            from mergekit.options import MergeOptions
        except Exception as exc:  # noqa: BLE001 - any import failure means "unavailable"
            return None, f"import failed: {type(exc).__name__}: {exc}".splitlines()[0]
        return (MergeConfiguration, run_merge, MergeOptions), "ok"

    def _side_files(self, out: Path) -> None:
        for name in MODEL_SIDE_FILES:
            if (self.base_dir / name).exists():
                shutil.copy2(self.base_dir / name, out / name)

    def _out(self, tag: str) -> Path:
        self.count += 1
        return self.tmp / "candidates" / f"{tag}-{self.count}"

    def _evaluate(self, model_dir: Path, rows, batch_size: int) -> float:
        model = load_model(model_dir, str(self.device)).eval()
        nll, _ = token_nll(model, rows, batch_size)
        del model
        return nll

    def state_dict_way(self, weights, rows, batch_size) -> tuple[float, Path]:
        """(b): merge in memory, save_file + config, from_pretrained, evaluate."""
        out = self._out("b")
        out.mkdir(parents=True)
        merged = {}
        for name in self.names:
            tensor = self.base_sd[name].clone()
            for w, vec in zip(weights, self.vec_sds, strict=True):
                tensor.add_(vec[name], alpha=w)
            merged[name] = tensor
        save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})
        del merged
        self._side_files(out)
        return self._evaluate(out, rows, batch_size), out

    def stream_way(self, weights, rows, batch_size) -> tuple[float, Path]:
        """(b'): dem_ray.core.merge.merge_to_dir from vector files on disk, then load + evaluate."""
        out = self._out("bs")
        merge_to_dir(self.base_dir, self.vector_paths, weights, out)
        return self._evaluate(out, rows, batch_size), out

    def mergekit_way(self, weights, rows, batch_size) -> tuple[float, Path]:
        """(c): mergekit task_arithmetic (normalize off) to a temp dir, then load + evaluate."""
        merge_configuration, run_merge, merge_options = self.mergekit
        out = self._out("mk")
        config = merge_configuration.model_validate(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(self.base_dir),
                "models": [
                    {"model": str(ft), "parameters": {"weight": float(w)}}
                    for ft, w in zip(self.ft_dirs, weights, strict=True)
                ],
                "parameters": {"normalize": False},
                "dtype": "float32",
                "out_dtype": "float32",
            }
        )
        options = merge_options(
            device=self.device.type,
            copy_tokenizer=False,
            write_model_card=False,
            quiet=True,
        )
        run_merge(config, out_path=str(out), options=options)
        return self._evaluate(out, rows, batch_size), out


def method_rounds(args, base, device, rows, vectors, linear, rng) -> dict:
    """Each merge method's resident merge, timed side by side with linear in every round.

    `linear`: the (model, ResidentMerge, build seconds) already built for (a). Every other
    method holds its own model, theta_0 and k prepared vectors (memory: one more
    fp32 resident set each).
    """
    built = {}
    for method in args.methods:
        if method == "linear":
            built[method] = linear
            continue
        model = load_model(base, str(device)).eval()
        seconds, rm = bc.timed(
            lambda m=model, method=method: ResidentMerge(
                m, vectors, "float32", method=method, density=args.density
            ),
            device,
        )
        built[method] = (model, rm, seconds)
        log.info("built the %s resident merge in %.2f s", method, seconds)
    apply_s = {m: [] for m in built}
    full_s = {m: [] for m in built}
    nll = {m: [] for m in built}
    names = list(built)
    for round_ in range(args.warmup + args.repeats):
        w = bc.random_simplex(args.k, rng)
        shift = round_ % len(names)
        for method in names[shift:] + names[:shift]:
            model, rm, _ = built[method]
            a, _ = bc.timed(lambda rm=rm, w=w: rm.apply(w), device)

            def candidate(rm=rm, model=model, w=w):
                rm.apply(w)
                return token_nll(model, rows, args.batch_size)[0]

            f, value = bc.timed(candidate, device)
            if round_ >= args.warmup:
                apply_s[method].append(a)
                full_s[method].append(f)
                nll[method].append(value)
        log.info("methods round %d/%d done", round_ + 1, args.warmup + args.repeats)
    return {
        m: {
            "build_seconds": built[m][2],
            "apply_seconds": bc.median(apply_s[m]),
            "apply_forward_seconds": bc.median(full_s[m]),
            "all_apply_seconds": apply_s[m],
            "all_apply_forward_seconds": full_s[m],
            "nll_sum": nll[m],
        }
        for m in built
    }


def print_methods(args, figures: dict) -> None:
    ref = figures.get("linear")
    print(
        f"\nmerge methods: resident, float32 vectors, k={args.k}, density {args.density} "
        f"(ties/dare); median of {args.repeats} rounds, side by side; ratios against linear"
        + ("" if ref else " (n/a: linear not in --methods)")
    )
    out = []
    for method, r in figures.items():
        out.append(
            [
                method,
                r["build_seconds"],
                r["apply_seconds"] * 1e3,
                bc.ratio(r["apply_seconds"], ref["apply_seconds"]) if ref else math.nan,
                r["apply_forward_seconds"],
                bc.ratio(r["apply_forward_seconds"], ref["apply_forward_seconds"])
                if ref
                else math.nan,
            ]
        )
    headers = ["method", "build s", "apply ms", "apply / linear", "apply+fwd s", "+fwd / linear"]
    print(bc.table(headers, out))
    print("build = ResidentMerge(...) once: reading the k vectors and preparing them")


def parse_methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip() and m.strip() != "none"]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        sys.exit(f"error: --methods: unknown {unknown}; known: {','.join(METHODS)}")
    return names


def main() -> int:
    p = bc.parser(__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=4, help="number of distribution vectors")
    p.add_argument("--rows", type=int, default=4, help="validation rows")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per validation row")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--scale", type=float, default=1e-3, help="std of the random vectors")
    p.add_argument(
        "--vector-dtype",
        choices=("float32", "bfloat16", "both"),
        default="both",
        help="dtype of the resident vectors for (a)",
    )
    p.add_argument(
        "--merge-repeats",
        type=int,
        default=None,
        help="repetitions of the merge-alone timing (default max(10, 2 x repeats))",
    )
    p.add_argument("--no-disk", action="store_true", help="skip (b) and (b')")
    p.add_argument("--no-mergekit", action="store_true", help="skip (c)")
    p.add_argument(
        "--methods",
        type=parse_methods,
        default=",".join(METHODS),
        help="merge methods timed side by side at the end ('none' skips that section; each "
        "one besides linear holds another fp32 resident copy of the model and the vectors)",
    )
    p.add_argument(
        "--density", type=float, default=0.5, help="density of ties and DARE for --methods"
    )
    args = p.parse_args()
    device = bc.setup(args)
    merge_repeats = args.merge_repeats or max(10, 2 * args.repeats)
    dtypes = ["float32", "bfloat16"] if args.vector_dtype == "both" else [args.vector_dtype]

    with tempfile.TemporaryDirectory(prefix="dem-bench-ct-") as tmp_name:
        tmp = Path(tmp_name)
        base = bc.base_dir(args.size, args.cache_dir, tmp)
        tokenizer = load_tokenizer(base)
        rows = bc.validation_rows(tokenizer, args.rows, args.seq_len)
        log.info("base %s; validation %d x %d tokens", base, *rows.shape)

        model = load_model(base, str(device)).eval()
        shapes = bc.unique_shapes(model)
        params = bc.param_count(model)
        vectors = [
            bc.RandomVectors(shapes, seed=args.seed * 100 + i + 1, scale=args.scale)
            for i in range(args.k)
        ]
        log.info("%d parameters, k=%d; building the resident merges", params, args.k)
        build_s, linear_rm = bc.timed(lambda: ResidentMerge(model, vectors, "float32"), device)
        resident = {"float32": linear_rm}
        models = {"float32": model}
        if "bfloat16" in dtypes:
            models["bfloat16"] = load_model(base, str(device)).eval()
            resident["bfloat16"] = ResidentMerge(models["bfloat16"], vectors, "bfloat16")

        disk = None
        if not (args.no_disk and args.no_mergekit):
            log.info("writing vector files%s", "" if args.no_mergekit else " and fine-tune dirs")
            disk = DiskWays(base, resident["float32"], tmp, device, not args.no_mergekit)
        mergekit_status = disk.mergekit_reason if disk else "not requested (--no-mergekit)"

        # -- the candidate loop: every method evaluates the same candidate in a round ---------
        def forward():
            return token_nll(models["float32"], rows, args.batch_size)[0]

        def resident_way(dtype):
            def run():
                resident[dtype].apply(current["w"])
                return token_nll(models[dtype], rows, args.batch_size)[0]

            return run

        methods = {"(0) forward alone": forward}
        for dtype in dtypes:
            methods[f"(a) resident, {dtype} vectors"] = resident_way(dtype)
        outputs: list[Path] = []

        def on_disk(fn):
            def run():
                nll, out = fn(current["w"], rows, args.batch_size)
                outputs.append(out)
                return nll

            return run

        if disk and not args.no_disk:
            methods["(b) disk: state dict + save + load"] = on_disk(disk.state_dict_way)
            methods["(b') disk: dem_ray merge_to_dir + load"] = on_disk(disk.stream_way)
        if disk and disk.mergekit is not None:
            methods["(c) mergekit task_arithmetic + load"] = on_disk(disk.mergekit_way)

        rng = random.Random(args.seed)
        current = {"w": bc.random_simplex(args.k, rng)}
        resident["float32"].apply(current["w"])
        times: dict[str, list[float]] = {m: [] for m in methods}
        nlls: dict[str, list[float]] = {m: [] for m in methods}
        names = list(methods)
        for round_ in range(args.warmup + args.repeats):
            current["w"] = bc.random_simplex(args.k, rng)
            resident["float32"].apply(current["w"])
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:  # rotate the order round by round
                try:
                    seconds, nll = bc.timed(methods[name], device)
                except Exception as exc:
                    if "mergekit" not in name:
                        raise
                    log.error("mergekit failed:\n%s", traceback.format_exc())
                    mergekit_status = f"failed: {type(exc).__name__}: {exc}".splitlines()[0]
                    del methods[name], times[name], nlls[name]
                    names.remove(name)
                    continue
                finally:
                    for out in outputs:
                        shutil.rmtree(out, ignore_errors=True)
                    outputs.clear()
                    gc.collect()
                if round_ >= args.warmup:
                    times[name].append(seconds)
                    nlls[name].append(nll)
            log.info("round %d/%d done", round_ + 1, args.warmup + args.repeats)

        # -- the merge alone, side by side with a plain copy of a model-sized buffer ----------
        copy = bc.copy_seconds(params, resident["float32"].live.dtype, device)
        merge_fns = {"copy": copy}
        merge_w = bc.random_simplex(args.k, rng)
        for dtype in dtypes:
            merge_fns[f"apply {dtype}"] = lambda d=dtype: resident[d].apply(merge_w)
        merge_times = bc.interleaved(merge_fns, merge_repeats, max(args.warmup, 1), device)

        # -- the merge methods, side by side (the disk ways' and bf16 copies freed first) -----
        method_figures = {}
        if args.methods:
            methods = dict.fromkeys(methods)  # drops the closures that hold the disk copies
            disk = None
            resident.pop("bfloat16", None)
            models.pop("bfloat16", None)
            gc.collect()
            linear = (model, resident["float32"], build_s)
            method_figures = method_rounds(args, base, device, rows, vectors, linear, rng)

    # -- figures ------------------------------------------------------------------------------
    forward_key = "(0) forward alone"
    fwd_times = times[forward_key]
    first_a = f"(a) resident, {dtypes[0]} vectors"
    results = {}
    for name in methods:
        overheads = [t - f for t, f in zip(times[name], fwd_times, strict=True)]
        results[name] = {
            "seconds_per_candidate": bc.median(times[name]),
            "candidates_per_second": 1.0 / bc.median(times[name]),
            "overhead_seconds": 0.0 if name == forward_key else bc.median(overheads),
            "all_seconds": times[name],
            "nll_sum": nlls[name],
        }
    live_bytes = resident["float32"].live.element_size()
    copy_s = bc.median(merge_times["copy"])
    copy_bytes = 2 * params * live_bytes
    copy_bw = copy_bytes / copy_s
    merges = {}
    for dtype in dtypes:
        nbytes = merge_bytes(params, args.k, dtype, live_bytes)
        seconds = bc.median(merge_times[f"apply {dtype}"])
        merges[dtype] = {
            "bytes": nbytes,
            "seconds": seconds,
            "gb_per_s": bc.gbps(nbytes, seconds),
            "floor_seconds": nbytes / copy_bw,
            "all_seconds": merge_times[f"apply {dtype}"],
        }
    apply_a = merges[dtypes[0]]["seconds"]
    overhead_a = results[first_a]["overhead_seconds"]

    print(f"\ncandidate_throughput: size={args.size} device={device} params={params:,} k={args.k}")
    print(
        f"validation: {rows.shape[0]} rows x {rows.shape[1]} tokens of stdlib source "
        f"({rows[:, 1:].numel()} predicted tokens), batch {args.batch_size}; "
        f"median of {args.repeats} rounds after {args.warmup} warm-up; torch threads "
        f"{torch.get_num_threads()}"
    )
    print("overhead = median over rounds of (time per candidate - forward alone in that round)\n")
    ref_nll = results[first_a]["nll_sum"]
    rows_out = []
    for name, r in results.items():
        diffs = [abs(x - y) / abs(y) for x, y in zip(r["nll_sum"], ref_nll, strict=True)]
        rows_out.append(
            [
                name,
                r["seconds_per_candidate"],
                r["candidates_per_second"],
                r["overhead_seconds"],
                math.nan if name == forward_key else bc.ratio(r["overhead_seconds"], overhead_a),
                math.nan if name == forward_key else bc.ratio(r["overhead_seconds"], apply_a),
                max(diffs) if name != forward_key else math.nan,
            ]
        )
    print(
        bc.table(
            [
                "method",
                "s/candidate",
                "candidates/s",
                "overhead s",
                "overhead / (a)",
                "overhead / apply",
                "NLL rel.diff vs (a)",
            ],
            rows_out,
        )
    )
    print(f"(a) = {first_a}; apply = the merge alone, {dtypes[0]} vectors (below)")
    if "(c) mergekit task_arithmetic + load" not in results:
        print(f"mergekit: unavailable ({mergekit_status})")
    else:
        import importlib.metadata

        print(f"mergekit: {importlib.metadata.version('mergekit')} ran (task_arithmetic)")

    print(
        f"\nmerge alone (median of {merge_repeats}); bytes = read theta_0 ({live_bytes} B/param) + "
        f"read k vectors + write live ({live_bytes} B/param); copy bytes = read + write of one "
        f"model-sized buffer ({bc.gib(copy_bytes):.3f} GiB)"
    )
    merge_rows = [
        ["copy (dst.copy_(src))", bc.gib(copy_bytes), copy_s * 1e3, copy_bw / 1e9, "", ""]
    ]
    for dtype, m in merges.items():
        merge_rows.append(
            [
                f"apply, {dtype} vectors",
                bc.gib(m["bytes"]),
                m["seconds"] * 1e3,
                m["gb_per_s"],
                m["floor_seconds"] * 1e3,
                bc.ratio(m["seconds"], m["floor_seconds"]),
            ]
        )
    print(
        bc.table(
            ["what", "GiB touched", "ms", "GB/s", "bandwidth floor ms", "time / floor"],
            merge_rows,
        )
    )
    print(
        "bandwidth floor = bytes a merge must touch / copy bandwidth measured in this run "
        f"({copy_bw / 1e9:.2f} GB/s)"
    )
    if method_figures:
        print_methods(args, method_figures)
    bc.write_json(
        args.json,
        {
            "benchmark": "candidate_throughput",
            "args": vars(args),
            "machine": bc.machine(device),
            "params": params,
            "validation_tokens": int(rows[:, 1:].numel()),
            "methods": results,
            "mergekit": mergekit_status
            if "(c) mergekit task_arithmetic + load" not in results
            else "ran",
            "copy": {"bytes": copy_bytes, "seconds": copy_s, "gb_per_s": copy_bw / 1e9},
            "merge_alone": merges,
            "merge_methods": method_figures,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
