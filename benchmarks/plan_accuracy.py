"""How close `dem-ray plan`'s estimates are to the memory a fine-tune worker and an evaluator take.

For each variant the parent writes the model's config.json (the tiny Llama or SmolLM2-135M's
shape; no weights anywhere), asks `dem_ray.plan` for the estimate (`Need.working`: the
peak without the fixed runtime share), and measures the same work in a fresh child process:

- `train-*`: what `dem_ray.ray.finetune.train_loop` does on one worker for `--steps`
  optimizer steps: the model built from the config in fp32 (as the worker loads it), with
  `--method lora` the PEFT adapters (and their base layers in bf16 under bf16-mixed), AdamW
  on the trained parameters, the `lr_factor` schedule, `accumulate_gradients` over
  `--grad-accum` micro-batches of `--batch-size` x `--seq-len` random ids, clipping at 1.0.
- `eval-*`: what an evaluator actor holds: the model in its stored dtype, a `ResidentMerge`
  with k random vectors (N(0, 1e-3^2), made one tensor at a time as `LazyTensors` reads
  them) in the variant's vector dtype, one `apply` and `token_nll` over `--eval-batch`
  rows of `--seq-len` tokens.

The child imports everything and warms every code path on a throwaway micro model first, then
resets its RSS high-water mark (Linux `/proc/self/clear_refs`), does the work and reports its
peak RSS above the RSS it had before the work (`VmHWM - VmRSS`): what the process really
took, allocator slack included. The ratio is estimate / measured; the goal is within 25%.

    python benchmarks/plan_accuracy.py --size smollm2
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _common as bc

log = bc.log
VARIANTS = {
    # name: (kind, settings)
    "train-fp32": ("train", {"precision": "fp32"}),
    "train-bf16-mixed": ("train", {"precision": "bf16-mixed"}),
    "train-fp32+ckpt": ("train", {"precision": "fp32", "gradient_checkpointing": True}),
    "train-lora": ("train", {"precision": "fp32", "method": "lora"}),
    "train-lora-bf16": ("train", {"precision": "bf16-mixed", "method": "lora"}),
    "eval-fp32": ("eval", {"vector_dtype": "float32", "dtype": "float32"}),
    "eval-bf16": ("eval", {"vector_dtype": "bfloat16", "dtype": "bfloat16"}),
}
DEFAULT_VARIANTS = "train-fp32,train-bf16-mixed,train-fp32+ckpt,train-lora,eval-fp32,eval-bf16"


def shape_fields(size: str) -> dict:
    import merge_bandwidth

    fields = dict(merge_bandwidth.SHAPES[size])
    return {**fields, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}


def write_config(size: str, dtype: str, out: Path) -> Path:
    """A model dir holding only config.json: what `dem-ray plan` reads."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**shape_fields(size), "torch_dtype": dtype}))
    return out


def estimate(model_dir: Path, kind: str, settings: dict, args) -> dict:
    """The plan's estimate for the variant, part by part."""
    from dem_ray.config import EvaluatorConfig, FinetuneConfig
    from dem_ray.plan import evaluator_need, finetune_need, model_shape

    shape = model_shape(model_dir)
    if kind == "train":
        ft = FinetuneConfig(batch_size=args.batch_size, seq_len=args.seq_len,
                            grad_accum_steps=args.grad_accum,
                            **{k: v for k, v in settings.items() if k != "dtype"})  # fmt: skip
        need = finetune_need(shape, ft, device="cpu")
    else:
        ev = EvaluatorConfig(batch_size=args.eval_batch, vector_dtype=settings["vector_dtype"],
                             max_validation_sequences=None)  # fmt: skip
        need = evaluator_need(shape, ev, args.k, args.seq_len, device="cpu")
    return {
        "params": shape.params,
        "estimate": need.working,
        "parts": {name: size for name, size, _ in need.parts if name != "runtime"},
    }


# ---- the child ---------------------------------------------------------------------------------


def child(args) -> int:
    """In a fresh process: warm up, reset the high-water mark, do the work, print the peak."""
    import gc

    import torch

    torch.set_num_threads(args.threads or 1)
    if args.malloc == "pinned":
        pin_mmap_threshold()
    kind, settings = VARIANTS[args.variant]
    warm = Path(tempfile.mkdtemp(prefix="plan-warm-"))
    warm_dir = warm / "micro"
    warm_dir.mkdir()
    micro = {**shape_fields("tiny"), "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
             "vocab_size": 64}  # fmt: skip
    (warm_dir / "config.json").write_text(json.dumps(micro))
    work = train if kind == "train" else evaluate
    work(warm_dir, settings, args, batch=1, seq=8, k=1)  # every code path, a few KiB
    gc.collect()
    before = status_field("VmRSS")
    reset = reset_peak()
    work(Path(args.model_dir), settings, args, batch=None, seq=None, k=None)
    peak = status_field("VmHWM") if reset else bc_maxrss()
    print(json.dumps({"measured": peak - before, "rss_before": before, "hwm_reset": reset}))
    return 0


def train(model_dir: Path, settings: dict, args, batch, seq, k) -> None:
    """`train_loop`'s steps, without Ray: the worker's model, optimizer and step."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dem_ray.config import LoraSettings
    from dem_ray.models.lora import add_adapters, freeze_base_in
    from dem_ray.ray.finetune import accumulate_gradients, lr_factor

    batch, seq = batch or args.batch_size, seq or args.seq_len
    precision = settings["precision"]
    config = AutoConfig.from_pretrained(str(model_dir))
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if settings.get("method") == "lora":
        model = add_adapters(model, LoraSettings())
        if precision == "bf16-mixed":
            freeze_base_in(model, torch.bfloat16)
    if settings.get("gradient_checkpointing"):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
        model.config.use_cache = False
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, 1, args.steps, "cosine")
    )
    gen = torch.Generator().manual_seed(args.seed)
    device = torch.device("cpu")
    for _ in range(args.steps):
        micro = []
        for _ in range(args.grad_accum):
            ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
            micro.append((ids, ids))
        accumulate_gradients(model, micro, device, precision)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def evaluate(model_dir: Path, settings: dict, args, batch, seq, k) -> None:
    """An evaluator actor's resident merge and one candidate scored."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dem_ray.core.merge import ResidentMerge
    from dem_ray.core.perplexity import token_nll

    batch, seq, k = batch or args.eval_batch, seq or args.seq_len, k or args.k
    config = AutoConfig.from_pretrained(str(model_dir))
    torch.manual_seed(args.seed)
    dtype = getattr(torch, settings["dtype"])
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    shapes = bc.unique_shapes(model)
    vectors = [bc.RandomVectors(shapes, seed=args.seed + i) for i in range(k)]
    merge = ResidentMerge(model, vectors, settings["vector_dtype"])
    merge.apply([1.0 / k] * k)
    gen = torch.Generator().manual_seed(args.seed)
    rows = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    token_nll(model, rows, batch)


def pin_mmap_threshold() -> None:
    """glibc: every allocation of 128 KiB or more by mmap, so RSS follows the live tensors."""
    import ctypes

    m_mmap_threshold = -3
    ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 128 * 1024)


def status_field(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {name} in /proc/self/status")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def bc_maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- the parent --------------------------------------------------------------------------------


def measure(variant: str, model_dir: Path, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--variant", variant,
           "--model-dir", str(model_dir), "--size", args.size, "--k", str(args.k),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--grad-accum", str(args.grad_accum), "--eval-batch", str(args.eval_batch),
           "--steps", str(args.steps), "--seed", str(args.seed), "--malloc", args.malloc]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise RuntimeError(f"child for {variant} exited {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    p = bc.parser(__doc__.splitlines()[0], default_repeats="1")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma-separated, of {', '.join(VARIANTS)}")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=4, help="fine-tune rows per micro-batch")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=4,
                   help="optimizer steps measured (glibc's heap settles after 3 or 4)")  # fmt: skip
    p.add_argument("--eval-batch", type=int, default=8, help="evaluator rows per forward pass")
    p.add_argument("--k", type=int, default=3, help="vectors the evaluator holds")
    p.add_argument("--jobs", type=int, default=1,
                   help="children measured at once (memory does not depend on timing)")  # fmt: skip
    p.add_argument("--malloc", choices=("default", "pinned"), default="default",
                   help="pinned: glibc's mmap threshold fixed at 128 KiB in the child, so the "
                   "figure is the live tensors alone, without the heap's slack")  # fmt: skip
    p.add_argument("--child", action="store_true", help=argparse_hidden())
    p.add_argument("--variant", help=argparse_hidden())
    p.add_argument("--model-dir", help=argparse_hidden())
    args = p.parse_args()
    if args.child:
        return child(args)
    device = bc.setup(args, tiny_repeats=1, smollm2_repeats=1)
    if device.type != "cpu":
        sys.exit("error: plan_accuracy measures CPU RSS; run it with --device cpu")
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        sys.exit(f"error: --variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    rows, figures = [], {"size": args.size, "machine": bc.machine(device), "variants": {}}
    with tempfile.TemporaryDirectory(prefix="plan-accuracy-") as tmp:
        dirs, estimates = {}, {}
        for variant in variants:
            kind, settings = VARIANTS[variant]
            dirs[variant] = write_config(args.size, settings.get("dtype", "float32"),
                                         Path(tmp) / variant)  # fmt: skip
            estimates[variant] = estimate(dirs[variant], kind, settings, args)
        # Children side by side (--jobs): each measures its own RSS, which the others leave be.
        runs = [(v, r) for r in range(args.repeats) for v in variants]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            measured_runs = list(pool.map(lambda vr: measure(vr[0], dirs[vr[0]], args), runs))
    for variant in variants:
        est = estimates[variant]
        got = [m["measured"] for (v, _), m in zip(runs, measured_runs, strict=True) if v == variant]
        measured = bc.median(got)
        ratio = bc.ratio(est["estimate"], measured)
        log.info("%s: estimate %s, measured %s", variant, bc.human_bytes(est["estimate"]),
                 bc.human_bytes(measured))  # fmt: skip
        figures["variants"][variant] = {**est, "measured": measured, "runs": got, "ratio": ratio}
        rows.append([variant, est["estimate"] / 2**20, measured / 2**20, ratio,
                     "yes" if abs(ratio - 1) <= 0.25 else "NO"])  # fmt: skip
    params = next(iter(figures["variants"].values()))["params"]
    print(f"plan_accuracy: {args.size}, {params:,} parameters, CPU; fine-tune {args.batch_size} "
          f"x {args.seq_len} tokens x {args.grad_accum} micro-batch(es), {args.steps} steps; "
          f"evaluator k = {args.k}, {args.eval_batch} x {args.seq_len} tokens")  # fmt: skip
    print("measured = peak RSS of a fresh child above its RSS before the work (VmHWM reset)")
    print()
    print(bc.table(["variant", "estimate MiB", "measured MiB", "estimate / measured",
                    "within 25%"], rows))  # fmt: skip
    bc.write_json(args.json, figures)
    return 0


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
