"""Peak memory of the vectors stage (dem_ray.core.vectors.compute_vector) against the model size.

For each k, a fresh child process runs what the vectors stage (`dem_ray.stages.vectors`) runs for k
fine-tunes (check_compatible + compute_vector, one after the other) and reports its
peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`). A baseline child imports the
same modules and does nothing; its peak is subtracted. The fine-tunes are fakes:
the base plus N(0, scale^2) noise per weight, saved as safetensors once and cached.
RSS counts the pages of memory-mapped safetensors files the child has touched.

    python benchmarks/vector_memory.py --size smollm2
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _common as bc
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dem_ray.core.merge import MODEL_SIDE_FILES
from dem_ray.core.vectors import check_compatible, compute_vector, weight_files

log = bc.log


def child(args) -> int:
    """Run in a fresh process: compute the vectors of the given fine-tunes, print peak RSS."""
    finetunes = [Path(p) for p in args.finetunes.split(",") if p]
    import_peak = maxrss()  # the peak so far: importing the modules
    start_rss = proc_status("VmRSS")
    # Reset the high-water mark (Linux) so the peak of the work alone can be read as well;
    # the child's ru_maxrss is then max(import_peak, maxrss() after the work).
    reset = reset_peak()
    sampler = RssSampler()
    start = time.perf_counter()
    after_each = []
    for i, ft in enumerate(finetunes):
        check_compatible(Path(args.base), ft)
        compute_vector(Path(args.base), ft, Path(args.out) / f"v{i}.safetensors")
        after_each.append(max(import_peak, maxrss()))
    work_peak = maxrss()
    split = sampler.stop()
    print(
        json.dumps(
            {
                "peak_rss": max(import_peak, work_peak),
                "after_each": after_each,
                "seconds": time.perf_counter() - start,
                "work_peak_over_start": work_peak - start_rss if reset and start_rss else None,
                "sampled_peak_anon": split["RssAnon"],
                "sampled_peak_file": split["RssFile"],
            }
        )
    )
    return 0


class RssSampler:
    """Peak anonymous and file-backed resident memory, sampled every few ms (Linux)."""

    FIELDS = ("RssAnon", "RssFile")

    def __init__(self, every: float = 0.005) -> None:
        self.peak = {f: 0 for f in self.FIELDS}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            for field in self.FIELDS:
                value = proc_status(field) or 0
                self.peak[field] = max(self.peak[field], value)
            time.sleep(every)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peak


def maxrss() -> int:
    """ru_maxrss of this process in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def proc_status(field: str) -> int | None:
    """A `kB` field of /proc/self/status in bytes (None where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset VmHWM (Linux: write 5 to /proc/self/clear_refs); True when it worked."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return proc_status("VmHWM") is not None


def build_fake(base: Path, out: Path, seed: int, scale: float) -> None:
    """A fake fine-tune: every tensor of the base plus small seeded noise."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for path in weight_files(base):
        with safe_open(str(path), framework="pt") as fh:
            for name in sorted(fh.keys()):  # noqa: SIM118 - safe_open is not a dict
                t = fh.get_tensor(name)
                noise = torch.randn(t.shape, generator=gen, dtype=torch.float32) * scale
                tensors[name] = (t.float() + noise).to(t.dtype)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in MODEL_SIDE_FILES:
        if (base / name).exists():
            shutil.copy2(base / name, out / name)


# Linux folds the parent's memory high-water mark into a child's ru_maxrss at exec
# (the child's mm before exec is the parent's, shared by vfork or copied by fork). So the
# measured children are started by this small launcher, started before anything big is
# loaded here: what they inherit is the launcher's few MiB, not this process's peak.
LAUNCHER = """
import json, subprocess, sys
for line in sys.stdin:
    done = subprocess.run(json.loads(line), capture_output=True, text=True, check=False)
    print(json.dumps([done.returncode, done.stdout, done.stderr]), flush=True)
"""


class Launcher:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, cmd: list[str]) -> tuple[int, str, str]:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the launcher process died")
        rc, out, err = json.loads(line)
        return rc, out, err

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def run_child(
    launcher: Launcher, base: Path, finetunes: list[Path], out: Path, threads: int | None
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--base",
        str(base),
        "--finetunes",
        ",".join(str(f) for f in finetunes),
        "--out",
        str(out),
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    rc, stdout, stderr = launcher.run(cmd)
    if rc != 0:
        sys.stderr.write(stderr)
        raise RuntimeError(f"child for k={len(finetunes)} exited {rc}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(stdout.strip().splitlines()[-1])


def rounds(args, launcher, base, fakes, tmp, peaks, seconds, after_each, over_start, split):
    """Each round: the baseline child, then one child per k, in a fresh process each."""
    for round_ in range(args.repeats):
        for k in peaks:
            log.info("round %d: child with k=%d", round_ + 1, k)
            got = run_child(launcher, base, fakes[:k], tmp / f"k{k}", args.threads)
            peaks[k].append(got["peak_rss"])
            seconds[k].append(got["seconds"])
            after_each[k] = got["after_each"]
            if got["work_peak_over_start"] is not None:
                over_start[k].append(got["work_peak_over_start"])
            split.setdefault(k, []).append((got["sampled_peak_anon"], got["sampled_peak_file"]))


def main() -> int:
    p = bc.parser(__doc__.splitlines()[0], default_repeats="3 on tiny, 1 on smollm2")
    p.add_argument("--ks", default="2,6", help="numbers of fine-tunes, comma-separated")
    p.add_argument("--scale", type=float, default=1e-3, help="std of the fake fine-tunes' noise")
    p.add_argument("--child", action="store_true", help=argparse_hidden())
    p.add_argument("--base", help=argparse_hidden())
    p.add_argument("--finetunes", default="", help=argparse_hidden())
    p.add_argument("--out", help=argparse_hidden())
    args = p.parse_args()
    if args.child:
        if args.threads:
            torch.set_num_threads(args.threads)
        return child(args)
    device = bc.setup(args, tiny_repeats=3, smollm2_repeats=1)
    launcher = Launcher()
    if device.type == "cuda":
        log.info("the vectors stage runs on the CPU; --device cuda changes nothing here")
    ks = sorted({int(x) for x in args.ks.split(",")})

    cache = Path(args.cache_dir)
    if args.size == "smollm2":
        base = bc.smollm2_dir(cache)
    else:
        base = bc.cached_build(cache / "tiny-base", lambda d: bc.tiny_dir(d / "m")) / "m"
    fakes = []
    for i in range(max(ks)):
        final = cache / f"{args.size}-fake-finetunes" / f"ft{i}-scale{args.scale:g}"
        if not (final / ".complete").exists():
            log.info("building fake fine-tune %d at %s (once)", i, final)
        fakes.append(
            bc.cached_build(
                final, lambda d, i=i: build_fake(base, d, seed=1000 + i, scale=args.scale)
            )
        )
    model_bytes = sum(f.stat().st_size for f in weight_files(base))
    log.info("base %s: %.1f MiB of safetensors", base, model_bytes / 2**20)

    peaks: dict[int, list[int]] = {0: [], **{k: [] for k in ks}}
    seconds: dict[int, list[float]] = {k: [] for k in peaks}
    after_each: dict[int, list[int]] = {}
    over_start: dict[int, list[int]] = {k: [] for k in peaks}
    split: dict[int, list[tuple[int, int]]] = {}
    with tempfile.TemporaryDirectory(prefix="dem-bench-vm-") as tmp:
        try:
            rounds(
                args,
                launcher,
                base,
                fakes,
                Path(tmp),
                peaks,
                seconds,
                after_each,
                over_start,
                split,
            )
        finally:
            launcher.close()

    baseline = bc.median(peaks[0])
    print(f"\nvector_memory: size={args.size}, base {base}")
    print(
        f"model size on disk: {model_bytes / 2**20:.1f} MiB (safetensors); baseline child "
        f"(imports only) peak RSS {baseline / 2**20:.1f} MiB; median of {args.repeats} "
        "fresh child processes per k\n"
    )
    rows = []
    figures = {}
    base_anon = bc.median([a for a, _ in split[0]])
    base_file = bc.median([f for _, f in split[0]])
    for k in ks:
        peak = bc.median(peaks[k])
        above = peak - baseline
        anon = bc.median([a for a, _ in split[k]]) - base_anon
        file_backed = bc.median([f for _, f in split[k]]) - base_file
        rows.append(
            [
                k,
                peak / 2**20,
                above / 2**20,
                above / model_bytes,
                bc.median(over_start[k]) / model_bytes,
                anon / model_bytes,
                file_backed / model_bytes,
                bc.median(seconds[k]),
                " ".join(f"{(x - baseline) / model_bytes:.2f}" for x in after_each[k]),
            ]
        )
        figures[k] = {
            "peak_rss": peak,
            "above_baseline": above,
            "per_model_size": above / model_bytes,
            "seconds": bc.median(seconds[k]),
            "work_peak_over_start": bc.median(over_start[k]),
            "sampled_peak_anon_above_baseline": anon,
            "sampled_peak_file_above_baseline": file_backed,
            "all_peak_rss": peaks[k],
            "peak_after_each_vector": after_each[k],
        }
    print(
        bc.table(
            [
                "k",
                "peak RSS MiB",
                "above baseline MiB",
                "peak RSS / model size",
                "work peak - start RSS / model size",
                "anon / model",
                "file-backed / model",
                "stage s",
                "peak / model size after each vector",
            ],
            rows,
        )
    )
    print(
        "peak RSS / model size = (child's ru_maxrss - baseline child's) / model size on disk; "
        "work peak - start RSS = the child's peak during compute_vector minus its RSS when that "
        "began (high-water mark reset via /proc/self/clear_refs): the same without imports;\n"
        "anon, file-backed = peaks of RssAnon and RssFile (sampled every 5 ms, above the "
        "baseline child's): heap tensors, and touched pages of memory-mapped safetensors"
    )
    bc.write_json(
        args.json,
        {
            "benchmark": "vector_memory",
            "args": vars(args),
            "machine": bc.machine(device),
            "model_bytes": model_bytes,
            "baseline_peak_rss": baseline,
            "all_baseline_peak_rss": peaks[0],
            "ks": figures,
        },
    )
    return 0


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
