"""Fine-tune step time and peak memory: bf16-mixed against fp32, side by side in one run.

One step is what `dem_ray.ray.finetune.train_loop` does for one optimizer step on one
worker: `accumulate_gradients` (forward and backward over `--grad-accum` micro-batches of
`--batch-size` x `--seq-len` tokens, under bf16 autocast for bf16-mixed), gradient clipping
at 1.0, AdamW. Both precisions keep fp32 master weights and AdamW state, so they share one
model and one optimizer here: each round times one step of every variant, in an order
rotated round by round. A `+ckpt` variant turns on activation (gradient) checkpointing for
its step. The model has SmolLM2-135M's shape (`--size smollm2`, weights N(0, 0.02^2),
nothing downloaded) or the tiny one; the token ids are seeded random (a step costs the
same whatever the ids).

Peak memory of a step: on CUDA, `torch.cuda.max_memory_allocated` over the step minus what
was allocated before it (the weights, the AdamW state); on CPU, the peak anonymous RSS
sampled every 2 ms during the step minus the RSS before it, with glibc's mmap threshold
pinned at 128 KiB so that freed tensors go back to the OS and the next step's peak is its
own. Both are the transient memory of the step: activations, gradients, autocast's bf16
weight copies. The persistent state (fp32 weights + AdamW's two moments) is the same for
every variant and printed once.

    python benchmarks/finetune_precision.py --size smollm2 --device cpu
"""

from __future__ import annotations

import ctypes
import math
import sys
import threading
import time
from pathlib import Path

import _common as bc
import torch

from dem_ray.ray.finetune import accumulate_gradients

log = bc.log
VARIANTS = ("fp32", "bf16-mixed", "fp32+ckpt", "bf16-mixed+ckpt")


def build_model(size: str, device: torch.device):
    """merge_bandwidth's random model of that shape, set up for training."""
    import merge_bandwidth

    model = merge_bandwidth.build_model(size, None, device)
    model.config.use_cache = False  # read at each forward; checkpointing wants it off
    model.train()
    return model


class RssPeak:
    """The peak of RssAnon (Linux) while it runs, sampled every `every` seconds."""

    def __init__(self, every: float = 0.002) -> None:
        self.start = anon_rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, anon_rss())
            time.sleep(every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_rss())
        return self.peak - self.start


def anon_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pin_mmap_threshold() -> bool:
    """glibc: serve every allocation of 128 KiB or more by mmap (a fixed threshold, not the
    adaptive one), so a freed activation is returned to the OS and RSS follows the tensors."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3
    return bool(libc.mallopt(m_mmap_threshold, 128 * 1024))


def set_checkpointing(model, on: bool) -> None:
    if on and not model.is_activation_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    elif not on and model.is_activation_checkpointing:
        model.activation_checkpointing_disable()


def main() -> int:
    p = bc.parser(__doc__.splitlines()[0], default_repeats="5 on tiny, 3 on smollm2")
    p.add_argument("--batch-size", type=int, default=4, help="rows per micro-batch")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--variants", default="fp32,bf16-mixed",
                   help=f"comma-separated, of {', '.join(VARIANTS)}")  # fmt: skip
    args = p.parse_args()
    device = bc.setup(args)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        sys.exit(f"error: --variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    pinned = device.type == "cpu" and pin_mmap_threshold()
    model = build_model(args.size, device)
    params = bc.param_count(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    micro = [
        (ids, ids)
        for ids in (
            torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=gen)
            for _ in range(args.grad_accum)
        )
    ]
    tokens = args.batch_size * args.seq_len * args.grad_accum

    # The loss of both precisions at the same weights and batch (no step between them).
    losses = {}
    with torch.no_grad():
        ids = micro[0][0].to(device)
        losses["fp32"] = float(model(input_ids=ids, labels=ids).loss)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            losses["bf16-mixed"] = float(model(input_ids=ids, labels=ids).loss)

    def one_step(variant: str) -> tuple[float, int]:
        precision, _, ckpt = variant.partition("+")
        set_checkpointing(model, bool(ckpt))
        bc.sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        else:
            sampler = RssPeak()
        start = time.perf_counter()
        accumulate_gradients(model, micro, device, precision)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bc.sync(device)
        seconds = time.perf_counter() - start
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - before
        else:
            peak = sampler.stop()
        return seconds, peak

    times = {v: [] for v in variants}
    peaks = {v: [] for v in variants}
    for round_ in range(args.warmup + args.repeats):
        shift = round_ % len(variants)
        for variant in variants[shift:] + variants[:shift]:  # rotate the order round by round
            seconds, peak = one_step(variant)
            log.info("round %d %s: %.3f s, peak %s", round_ + 1, variant, seconds,
                     bc.human_bytes(peak))  # fmt: skip
            if round_ >= args.warmup:
                times[variant].append(seconds)
                peaks[variant].append(peak)

    state_bytes = 4 * params * 3  # fp32 weights + AdamW exp_avg + exp_avg_sq
    ref = variants[0]
    figures = {
        v: {"seconds": bc.median(times[v]), "tokens_per_second": tokens / bc.median(times[v]),
            "peak_bytes": max(peaks[v]), "times": times[v], "peaks": peaks[v]}
        for v in variants
    }  # fmt: skip
    print(f"\nfinetune_precision: {args.size}, {params:,} parameters, device={device}; "
          f"{args.grad_accum} x {args.batch_size} rows x {args.seq_len} tokens a step "
          f"({tokens:,} tokens); median of {args.repeats} rounds after {args.warmup} warm-up; "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    where = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
             else "peak RssAnon sampled every 2 ms" + (", mmap threshold pinned" if pinned else ""))  # fmt: skip
    print(f"step peak = the most memory a step took beyond what it started with ({where})")
    print(f"persistent state (fp32 weights + AdamW moments, every variant): "
          f"{bc.human_bytes(state_bytes)}\n")  # fmt: skip
    for f in figures.values():  # each round's ratio to the reference's step in that round
        f["paired_time_ratio"] = bc.median([bc.ratio(t, r) for t, r in
                                            zip(f["times"], figures[ref]["times"], strict=True)])  # fmt: skip
    rows = [
        [v, f["seconds"], f["tokens_per_second"], bc.ratio(f["seconds"], figures[ref]["seconds"]),
         f["paired_time_ratio"], f["peak_bytes"] / 2**20,
         bc.ratio(f["peak_bytes"], figures[ref]["peak_bytes"])]
        for v, f in figures.items()
    ]  # fmt: skip
    print(bc.table(["variant", "s/step", "tokens/s", f"time / {ref}", "paired", "step peak MiB",
                    f"peak / {ref}"], rows))  # fmt: skip
    print(
        f"paired = the median over rounds of (the variant's step / {ref}'s step in the same round)"
    )
    rel = abs(losses["bf16-mixed"] - losses["fp32"]) / abs(losses["fp32"])
    print(f"loss at the same weights and batch: fp32 {losses['fp32']:.5f}, bf16 autocast "
          f"{losses['bf16-mixed']:.5f} (relative difference {rel:.2e}; random weights: both "
          f"near ln(vocab) = {math.log(vocab):.5f})")  # fmt: skip
    bc.write_json(args.json, {
        "benchmark": "finetune_precision", "args": vars(args), "machine": bc.machine(device),
        "params": params, "tokens_per_step": tokens, "state_bytes": state_bytes,
        "mmap_threshold_pinned": pinned, "losses": losses, "variants": figures,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
