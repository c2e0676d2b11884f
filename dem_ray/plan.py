"""`dem-ray plan`: the memory each fine-tune worker and evaluator actor will need, up front.

A config that cannot fit its GPUs should fail in the first second and name the key to
change, not an hour later when a worker dies of out-of-memory on a node the autoscaler took
minutes to boot. So the estimate is arithmetic only: the model's shape is counted on the
meta device from its config.json (no weights read), and every term below is a formula of
that shape and the config's keys, cheap enough for the preflight of every `dem-ray run`.

What a fine-tune worker holds (see `dem_ray.ray.finetune.train_loop`): fp32 master weights
(the base is loaded as fp32 whatever its stored dtype; with `method: lora` and
`bf16-mixed` the adapted layers' frozen weights are bf16), fp32 gradients and AdamW's two
fp32 moments for the trained parameters (under FSDP: 1/`num_workers` of each), and for one
micro-batch of `batch_size x seq_len` tokens the tensors autograd saves, the loss's logits
and, under bf16 autocast, the bf16 copies of the weights. The backward frees activations as
it makes gradients, so a step peaks at the larger of its start (activations) and its end
(gradients, and on a GPU the scratch of AdamW's foreach step).

What an evaluator actor holds (see `dem_ray.core.merge.ResidentMerge`): the live weights
and a theta_0 copy in the base's stored dtype, k vectors in `evaluator.vector_dtype` (low
rank with `method: lora`: r x (d_in + d_out) per adapted layer), `combine`'s float32
scratch, the validation and test shards, and one forward pass at `evaluator.batch_size`,
whose logits (batch x seq x vocabulary, in fp32 for the loss) dominate for a large vocabulary.

The activation coefficients were counted from the tensors autograd saves in a Llama-style
decoder (`torch.autograd.graph.saved_tensors_hooks` over configs of varied shape), and the
whole estimate is checked against measured peaks by `benchmarks/plan_accuracy.py`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dem_ray.config import ConfigError, EvaluatorConfig, FinetuneConfig, LoraSettings, RunConfig

log = logging.getLogger(__name__)

GIB = 1024**3
# What a worker process holds before any model: Python, torch, transformers and Ray's core
# worker in RAM; on a GPU the CUDA context and the caching allocator's slack.
RUNTIME_BYTES = GIB
# `merge.CUDA_CHUNK` / `merge.MIX_CHUNK`: the elements per chunk of combine's scratch.
SCRATCH_CHUNK = {"cuda": 1 << 22, "cpu": 1 << 18}
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
SKIP_ENV = "DEM_RAY_SKIP_MEMORY_CHECK"  # "1": the preflight checks nothing

# GPU memory by Ray's accelerator_type name (the values of `ray.util.accelerators`), in GiB
# as the driver reports the total. Where Ray's one name covers two sizes, the larger is
# used, so the preflight never refuses a config the bigger card holds; `plan` says so.
ACCELERATOR_GIB: dict[str, float] = {
    "K80": 12, "P4": 8, "P100": 16, "V100": 32, "T4": 15, "A10G": 22, "L4": 22, "L40S": 45,
    "A100": 80, "A100-40G": 40, "A100-80G": 80, "H100": 80, "H200": 140, "H20": 95,
    "B200": 179, "GB200": 184, "B300": 268, "GB300": 268, "RTX-PRO-6000": 95,
    "AMD-Instinct-MI100": 32, "AMD-Instinct-MI210": 64, "AMD-Instinct-MI250X": 64,
    "AMD-Instinct-MI250X-MI250": 64, "AMD-Instinct-MI300A": 128,
    "AMD-Instinct-MI300X-OAM": 192, "AMD-Instinct-MI300X-HF": 192,
    "AMD-Instinct-MI308X": 192, "AMD-Instinct-MI325X-OAM": 256,
    "AMD-Instinct-MI350X-OAM": 288, "AMD-Instinct-MI355X-OAM": 288,
}  # fmt: skip
AMBIGUOUS = {"A100": "A100-40G or A100-80G", "V100": "16 or 32 GiB"}
# GPUs without bf16: `finetune.precision: null` resolves to fp32 there (resolve_precision).
NO_BF16 = frozenset({"K80", "P4", "P100", "V100", "T4"})
# The GPUs the sizing table and the advice pick from, smallest first.
SIZING_GPUS = ("L4", "L40S", "A100-80G", "H200")
MAX_WORKERS = 64  # the most FSDP workers (or evaluator GPUs) the advice proposes

# Bytes per token (of one micro-batch) that autograd keeps for the backward in a Llama-style
# decoder: per layer, coefficients of the hidden size h, the MLP width i and the key/value
# width kv; outside the layers, of h and the vocabulary V (the loss's log-softmax, fp32).
# bf16-mixed keeps the matmul inputs and outputs in bf16, the norms and softmax in fp32.
# With gradient checkpointing a layer keeps only its fp32 input (4 B x h).
LAYER_ACT = {"fp32": (32, 16, 8), "bf16-mixed": (30, 8, 4)}
OUTER_ACT = {"fp32": (12, 4), "bf16-mixed": (10, 4)}
CHECKPOINTED_LAYER = 4
# The loss's transient beyond what autograd keeps, per token and vocabulary entry: the
# logits and, at the backward's start, the gradients of the log-softmax and of the logits
# (bf16-mixed: also the bf16 logits' own).
LOSS_TRANSIENT = {"fp32": 8, "bf16-mixed": 10}
# On a CPU, glibc's heap keeps the freed activations of a step (blocks below its 32 MiB mmap
# ceiling) as holes that the next step's tensors reuse only in part, so a worker's RSS stays
# above its live tensors by a share of one full pass's layer activations (checkpointing
# recomputes them all in the backward). Measured by benchmarks/plan_accuracy.py (tiny and
# SmolLM2-135M shapes, 4 steps: the heap has settled by then); LoRA's backward makes two input
# gradients per adapted layer (the frozen weight's and the adapter's), so more holes. A GPU's
# caching allocator is not measured here: its slack is in the runtime's share.
CPU_HEAP_SLACK = {"full": 0.45, "lora": 0.95}


class PlanError(ConfigError):
    """A config whose workers or actors cannot fit; the message names the keys to change."""


# ---- the model's shape ------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model, counted once on the meta device.

    `linears`: every `nn.Linear` but the output head, (name, d_in, d_out): what LoRA's
    `all-linear` adapts. `linear_weights`: the distinct weights of every `nn.Linear`, the
    head's included (what bf16 autocast casts). `pieces`: (name, parameters, buffer bytes)
    in forward order, as `partition.resident_sizes` cuts the model for an evaluator spread
    over GPUs; `tied`: {piece: the earlier piece whose Parameter it shares}.
    """

    architecture: str
    params: int
    dtype: str
    hidden: int
    intermediate: int
    layers: int
    kv_dim: int
    vocab: int
    linear_weights: int
    largest_layer: int
    linears: tuple[tuple[str, int, int], ...] = ()
    pieces: tuple[tuple[str, int, int], ...] = ()
    tied: tuple[tuple[str, str], ...] = ()

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def root_params(self) -> int:
        """Parameters outside the decoder layers (embeddings, final norm, an untied head):
        FSDP's root group, unsharded for the whole step."""
        in_layers = sum(n for name, n, _ in self.pieces if _is_layer(name))
        return self.params - in_layers if self.pieces else 0


def _is_layer(piece: str) -> bool:
    """A piece that is a whole decoder layer (`model.layers.3`), as `partition` names them."""
    from dem_ray.core.partition import piece_of

    return piece_of(piece + ".") == piece


def model_shape(source: Any, dtype: Any = None, trust_remote_code: bool = False) -> ModelShape:
    """The shape of a model directory (its config.json, and the dtype its safetensors
    headers say) or a transformers config, built on the meta device: nothing is loaded."""
    import torch

    from dem_ray.core.partition import meta_model, resident_sizes

    if dtype is not None and not isinstance(source, str | Path):
        source = copy.deepcopy(source)
        source.dtype = dtype
    model = meta_model(Path(source) if isinstance(source, str) else source, trust_remote_code)
    config = model.config
    unique: dict[int, torch.nn.Parameter] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        unique.setdefault(id(param), param)
    head = model.get_output_embeddings()
    linears, weights = [], {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            weights[id(module.weight)] = module.weight.numel()
            if module is not head:
                linears.append((name, module.in_features, module.out_features))
    # resident_sizes' pieces at k=0 (2 x element bytes per parameter, buffers once) and at
    # k=1 in float32 (4 more per parameter): their difference counts each piece's parameters.
    without, tied = resident_sizes(model, 0, "float32")
    with_one, _ = resident_sizes(model, 1, "float32")
    element = next(iter(unique.values())).element_size()
    pieces = []
    for (name, bytes0), (_, bytes1) in zip(without, with_one, strict=True):
        numel = (bytes1 - bytes0) // 4
        pieces.append((name, numel, bytes0 - 2 * element * numel))
    layer_sizes = [n for name, n, _ in pieces if _is_layer(name)]
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    heads = _first(config, "num_attention_heads", "n_head") or 1
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = _first(config, "num_key_value_heads") or heads
    return ModelShape(
        architecture=type(model).__name__,
        params=sum(p.numel() for p in unique.values()),
        dtype=str(next(iter(unique.values())).dtype).removeprefix("torch."),
        hidden=hidden,
        intermediate=_first(config, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden,
        layers=_first(config, "num_hidden_layers", "n_layer", "num_layers") or len(layer_sizes),
        kv_dim=kv_heads * head_dim,
        vocab=config.vocab_size,
        linear_weights=sum(weights.values()),
        largest_layer=max(layer_sizes, default=0),
        linears=tuple(linears),
        pieces=tuple(pieces),
        tied=tuple(tied.items()),
    )


def _first(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def lora_modules(shape: ModelShape, lora: LoraSettings) -> list[tuple[str, int, int]]:
    """The linear layers `finetune.lora.target_modules` adapts (PEFT's matching: all-linear,
    or a name equal to an entry or ending in `.ENTRY`)."""
    targets = lora.target_modules
    if targets == "all-linear":
        return list(shape.linears)
    names = [targets] if isinstance(targets, str) else list(targets)
    return [m for m in shape.linears if any(m[0] == t or m[0].endswith("." + t) for t in names)]


def adapter_params(shape: ModelShape, lora: LoraSettings) -> int:
    """r x (d_in + d_out) per adapted layer: the parameters LoRA trains."""
    return sum(lora.rank * (d_in + d_out) for _, d_in, d_out in lora_modules(shape, lora))


# ---- the estimates --------------------------------------------------------------------------


@dataclass(frozen=True)
class Need:
    """The memory one worker, actor or GPU needs, part by part (bytes), and how it was counted."""

    what: str
    device: str
    parts: tuple[tuple[str, int, str], ...]
    settings: str = ""

    @property
    def total(self) -> int:
        return sum(b for _, b, _ in self.parts)

    @property
    def working(self) -> int:
        """The total without the runtime's fixed share: what the measured peak is compared to,
        and what the preflight refuses on."""
        return sum(b for name, b, _ in self.parts if name != "runtime")


def resolved_precision(ft: FinetuneConfig, device: str, accelerator: str | None = None) -> str:
    """`finetune.precision` as the worker resolves it (bf16-mixed on a GPU that has bf16)."""
    if ft.precision is not None:
        return ft.precision
    return "bf16-mixed" if device == "cuda" and accelerator not in NO_BF16 else "fp32"


def activation_bytes(
    shape: ModelShape, tokens: int, precision: str, checkpointing: bool = False,
    adapter_rank_sum: int = 0, layers: int | None = None,
) -> int:  # fmt: skip
    """What autograd keeps for one micro-batch of `tokens` tokens (see LAYER_ACT);
    `adapter_rank_sum`: r summed over the adapted layers of the model (LoRA's A outputs);
    `layers`: instead of the model's own count."""
    layers = shape.layers if layers is None else layers
    a, b, c = LAYER_ACT[precision]
    layer = a * shape.hidden + b * shape.intermediate + c * shape.kv_dim
    d, e = OUTER_ACT[precision]
    outer = d * shape.hidden + e * shape.vocab
    act_bytes = 4 if precision == "fp32" else 2
    lora = adapter_rank_sum * act_bytes
    if checkpointing:  # every layer's input, plus one layer recomputed in the backward
        return tokens * (layers * CHECKPOINTED_LAYER * shape.hidden + layer + outer + lora)
    return tokens * (layers * layer + outer + lora)


def finetune_need(
    shape: ModelShape, ft: FinetuneConfig, device: str | None = None,
    accelerator: str | None = None,
) -> Need:  # fmt: skip
    """One fine-tune worker's peak (see the module's docstring for what it holds)."""
    device = device or ("cuda" if ft.gpus_per_worker > 0 else "cpu")
    precision = resolved_precision(ft, device, accelerator)
    bf16 = precision == "bf16-mixed"
    world = ft.num_workers
    shard = world if ft.strategy == "fsdp" and world > 1 else 1
    tokens = ft.batch_size * ft.seq_len
    parts: list[tuple[str, int, str]] = []
    if ft.method == "lora":
        adapted = lora_modules(shape, ft.lora)
        frozen_linear = sum(d_in * d_out for _, d_in, d_out in adapted)
        trained = adapter_params(shape, ft.lora)
        frozen = (shape.params - frozen_linear) * 4 + frozen_linear * (2 if bf16 else 4)
        parts.append(
            (
                "frozen base weights",
                frozen,
                f"{_count(shape.params)} parameters, fp32"
                + (f" (the {len(adapted)} adapted layers' in bf16)" if bf16 else ""),
            )
        )
        parts.append(
            ("adapters", 4 * trained, f"{_count(trained)} parameters (rank {ft.lora.rank}), fp32")
        )
        rank_sum = ft.lora.rank * len(adapted)
        casts = 2 * (shape.linear_weights - frozen_linear + trained) if bf16 else 0
    else:
        trained = shape.params
        parts.append(
            (
                "fp32 master weights",
                4 * shape.params // shard,
                f"{_count(shape.params)} x 4 B" + (f" / {shard} (FSDP)" if shard > 1 else ""),
            )
        )
        rank_sum = 0
        casts = 2 * shape.linear_weights if bf16 else 0
    parts.append(("AdamW moments", 8 * trained // shard, "2 x 4 B per trained parameter"
                  + (f" / {shard}" if shard > 1 else "")))  # fmt: skip
    if world > 1 and shard == 1:
        parts.append(("DDP gradient buckets", 4 * trained, "a copy of the gradients to all-reduce"))
    if shard > 1:  # FSDP2: the root group (embeddings, head) whole all step, two layers gathered
        gathered = shape.root_params + 2 * shape.largest_layer
        parts.append(
            (
                "FSDP gathered weights",
                8 * gathered,
                "embeddings, head and two decoder layers unsharded, with their gradients",
            )
        )
    acts = activation_bytes(shape, tokens, precision, ft.gradient_checkpointing, rank_sum)
    loss = tokens * shape.vocab * LOSS_TRANSIENT[precision]
    head_grad = 4 * shape.vocab * shape.hidden // shard if ft.method == "full" else 0
    start = acts + loss + head_grad + casts
    grads = 4 * trained // shard
    step_scratch = grads if device == "cuda" else 0  # foreach AdamW's sqrt of the moments
    end = grads + step_scratch
    batch = f"batch {ft.batch_size} x {ft.seq_len} tokens"
    if start >= end:
        note = (f"{batch}{', checkpointed' if ft.gradient_checkpointing else ''}: autograd's "
                f"tensors, the loss's logits{', bf16 weight copies' if casts else ''}; "
                f"the step's end holds {_gib(end)} of gradients instead")  # fmt: skip
        parts.append(("activations (backward start)", start, note))
    else:
        note = "fp32, per trained parameter" + (
            " + foreach AdamW's scratch" if step_scratch else ""
        )
        parts.append(("gradients (backward end)", end, f"{note}; the backward's start holds "
                      f"{_gib(start)} of activations instead ({batch})"))  # fmt: skip
    if device == "cpu":
        layer = activation_bytes(shape, tokens, precision) - activation_bytes(
            shape, tokens, precision, layers=0
        )
        slack = int(CPU_HEAP_SLACK[ft.method] * layer)
        parts.append(("heap slack", slack, f"{CPU_HEAP_SLACK[ft.method]:g} x one pass's layer "
                      "activations: freed blocks glibc keeps in RSS"))  # fmt: skip
    parts.append(("runtime", RUNTIME_BYTES, _runtime_note(device)))
    settings = (f"{'GPU' if device == 'cuda' else 'CPU'}, {precision}, {ft.strategy} x "
                f"{world} worker{'s' * (world > 1)}, {ft.method}")  # fmt: skip
    return Need("finetune worker", device, tuple(parts), settings)


def _runtime_note(device: str) -> str:
    if device == "cuda":
        return "CUDA context, the caching allocator's slack"
    return "Python, torch, transformers, Ray's worker"


def evaluator_need(
    shape: ModelShape, ev: EvaluatorConfig, k: int, seq_len: int, *,
    lora: LoraSettings | None = None, merge_method: str = "linear", datasets: int | None = None,
    device: str | None = None,
) -> Need:  # fmt: skip
    """One evaluator actor's peak, or with `gpus_per_actor: N > 1` the fullest of its GPUs
    (the model cut as `partition.evaluator_device_map` cuts it)."""
    from dem_ray.core.merge_methods import METHODS
    from dem_ray.core.partition import partition_layers

    device = device or ("cuda" if ev.gpus_per_actor > 0 else "cpu")
    spread = int(ev.gpus_per_actor) if ev.gpus_per_actor > 1 else 1
    mb, vb = shape.dtype_bytes, DTYPE_BYTES[ev.vector_dtype]
    vector_params = shape.params if lora is None else adapter_params(shape, lora)
    # On one device: everything. Spread: the pieces' resident bytes on the fullest GPU.
    share, held_params, held_vectors = 1.0, shape.params, vector_params
    if spread > 1 and shape.pieces:
        per_piece = _piece_vector_params(shape, lora)
        sizes = [(name, n * 2 * mb + per_piece.get(name, 0) * k * vb + buffers)
                 for name, n, buffers in shape.pieces]  # fmt: skip
        placed = partition_layers(sizes, spread, dict(shape.tied))
        loads = [0] * spread
        for name, size in sizes:
            loads[placed[name]] += size
        fullest = max(range(spread), key=loads.__getitem__)
        held_params = sum(n for name, n, _ in shape.pieces if placed[name] == fullest)
        held_vectors = sum(per_piece.get(name, 0) for name, _, _ in shape.pieces
                           if placed[name] == fullest)  # fmt: skip
        share = held_params / shape.params
    where = f" (on the fullest of {spread} GPUs: {share:.0%} of the model)" if spread > 1 else ""
    parts: list[tuple[str, int, str]] = [
        ("live weights", held_params * mb, f"{_count(held_params)} x {mb} B ({shape.dtype}){where}"),
        ("theta_0 copy", held_params * mb, f"the base, {shape.dtype}"),
        ("vectors", k * held_vectors * vb,
         f"{k} x {_count(held_vectors)} x {vb} B ({ev.vector_dtype}"
         + (", low-rank)" if lora is not None else ")")),
    ]  # fmt: skip
    if k:
        rows = k + k * (vb != 4) + 2 * (mb != 4) + (k + 3) * METHODS[merge_method].elect
        chunk = min(SCRATCH_CHUNK[device], max(held_params, 1))
        parts.append(("merge scratch", 4 * rows * chunk, f"float32, {rows} x {chunk:,} elements"))
    if k and lora is not None:  # a low-rank vector's dense update, one layer at a time
        largest = max((a * b for _, a, b in lora_modules(shape, lora)), default=0)
        parts.append(
            ("low-rank product", 4 * largest, "float32, the largest adapted layer's B x A")
        )
    rows_held = ev.max_validation_sequences
    if rows_held is not None:
        shards = 2 * (datasets or k) * rows_held * seq_len * 9
        parts.append(("validation + test shards", shards,
                      f"{rows_held} rows x {seq_len} tokens per dataset and split"))  # fmt: skip
    tokens = ev.batch_size * seq_len
    logits_bytes = 2 if (ev.autocast != "none" or mb == 2) else 4
    forward = tokens * shape.vocab * (logits_bytes + 8)
    forward += tokens * (3 * shape.intermediate + 7 * shape.hidden) * logits_bytes
    parts.append(("forward pass", forward, f"batch {ev.batch_size} x {seq_len} tokens: logits "
                  f"(x vocabulary {shape.vocab:,}) and the loss's fp32 log-softmax"))  # fmt: skip
    parts.append(("runtime", RUNTIME_BYTES, _runtime_note(device)))
    what = "evaluator actor" if spread == 1 else f"evaluator actor, per GPU (of {spread})"
    settings = (f"{'GPU' if device == 'cuda' else 'CPU'}, k = {k} {ev.vector_dtype} vectors, "
                f"{shape.dtype} model")  # fmt: skip
    return Need(what, device, tuple(parts), settings)


def _piece_vector_params(shape: ModelShape, lora: LoraSettings | None) -> dict[str, int]:
    """Vector parameters per piece: the piece's own, or its adapters' with LoRA."""
    if lora is None:
        return {name: n for name, n, _ in shape.pieces}
    names = [name for name, _, _ in shape.pieces]
    out: dict[str, int] = {}
    for module, d_in, d_out in lora_modules(shape, lora):
        piece = max((p for p in names if module == p or module.startswith(p + ".")),
                    key=len, default=None)  # fmt: skip
        if piece is not None:
            out[piece] = out.get(piece, 0) + lora.rank * (d_in + d_out)
    return out


# ---- capacity and checks ------------------------------------------------------------------------


@dataclass(frozen=True)
class Capacity:
    """What one worker or actor may use on the machine it lands on, and where that came from."""

    bytes: int
    where: str
    note: str = ""


def accelerator_memory(name: str) -> float | None:
    """GiB of GPU memory of a Ray accelerator_type name (case-insensitive), or None."""
    if name in ACCELERATOR_GIB:
        return ACCELERATOR_GIB[name]
    lowered = {k.lower(): v for k, v in ACCELERATOR_GIB.items()}
    return lowered.get(name.lower())


def gpu_capacity(
    accelerator: str | None, gpu_memory_gib: float | None, gpus: float
) -> Capacity | None:
    """One worker's share of its GPU (`gpus` < 1 shares one GPU; a worker computes on one)."""
    share = min(1.0, gpus)
    if gpu_memory_gib is not None:
        gib, where, note = gpu_memory_gib, f"--gpu-memory {gpu_memory_gib:g} GiB", ""
    elif accelerator is not None and accelerator_memory(accelerator) is not None:
        gib = accelerator_memory(accelerator)
        where = f"accelerator_type {accelerator} ({gib:g} GiB)"
        note = (f"Ray's {accelerator} covers {AMBIGUOUS[accelerator]}; checked against "
                f"{gib:g} GiB" if accelerator in AMBIGUOUS else "")  # fmt: skip
    else:
        return None
    if share < 1:
        where += f", {share:g} of it per worker"
    return Capacity(int(gib * GIB * share), where, note)


@dataclass
class Check:
    """A need against a capacity (None: unknown), and the key changes that would make it fit."""

    key: str  # the config section: finetune or evaluator
    need: Need
    capacity: Capacity | None
    advice: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.need.total <= self.capacity.bytes

    @property
    def refused(self) -> bool:
        """Clearly too big: even without the runtime's share it exceeds the capacity."""
        return self.capacity is not None and self.need.working > self.capacity.bytes


@dataclass
class Plan:
    """The whole answer of `dem-ray plan`."""

    base: str
    shape: ModelShape
    datasets: int
    checks: list[Check]
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "base": self.base,
            "model": {k: v for k, v in asdict(self.shape).items()
                      if k not in ("linears", "pieces", "tied")},  # fmt: skip
            "datasets": self.datasets,
            "checks": [
                {
                    "key": c.key, "what": c.need.what, "device": c.need.device,
                    "settings": c.need.settings, "total_bytes": c.need.total,
                    "working_bytes": c.need.working,
                    "parts": [{"name": n, "bytes": b, "how": h} for n, b, h in c.need.parts],
                    "capacity_bytes": None if c.capacity is None else c.capacity.bytes,
                    "capacity": None if c.capacity is None else c.capacity.where,
                    "fits": c.fits, "advice": c.advice,
                }
                for c in self.checks
            ],
            "notes": self.notes,
        }  # fmt: skip


@dataclass(frozen=True)
class Node:
    """One alive Ray node: its RAM (Ray's memory plus object store) and its GPUs."""

    name: str
    ram: int
    gpus: float
    accelerator: str | None


def build_plan(
    cfg: RunConfig, shape: ModelShape, *, gpu_memory_gib: float | None = None,
    nodes: Sequence[Node] | None = None, local_ram: int | None = None,
) -> Plan:  # fmt: skip
    """Every check of a run config: the fine-tune worker and the evaluator actor.

    `nodes`: a live cluster's (`cluster_nodes`); `local_ram`: this machine's RAM, for a
    run that starts a local Ray instance. GPU memory comes from `gpu_memory_gib`, else
    the section's `accelerator_type`, else the GPU nodes' accelerator labels."""
    k = len(cfg.datasets)
    ft, ev = cfg.finetune, cfg.evaluator
    lora = ft.lora if ft.method == "lora" else None
    plan = Plan(str(cfg.base_model), shape, k, [])

    def eval_need(e: EvaluatorConfig, device: str | None = None) -> Need:
        return evaluator_need(shape, e, k, ft.seq_len, lora=lora, device=device,
                              merge_method=cfg.search.merge_method)  # fmt: skip

    ft_cap = _capacity(ft.gpus_per_worker, ft.accelerator_type, gpu_memory_gib, nodes, local_ram)
    accel = ft.accelerator_type or _node_accelerator(nodes)
    ft_check = Check("finetune", finetune_need(shape, ft, accelerator=accel), ft_cap)
    if ft_check.fits is False:
        ft_check.advice = finetune_advice(shape, ft, ft_cap.bytes, accel)
    ev_cap = _capacity(ev.gpus_per_actor, ev.accelerator_type, gpu_memory_gib, nodes, local_ram,
                       whole=ev.gpus_per_actor > 1)  # fmt: skip
    ev_check = Check("evaluator", eval_need(ev), ev_cap)
    if ev_check.fits is False:
        ev_check.advice = evaluator_advice(eval_need, ev, ev_cap.bytes)
    plan.checks = [ft_check, ev_check]
    for check in plan.checks:
        if check.capacity is not None and check.capacity.note:
            plan.notes.append(check.capacity.note)
        if check.need.device == "cpu":
            _memory_gb_note(plan, check, ft.memory_gb if check.key == "finetune" else ev.memory_gb)
    if (
        ft.strategy == "fsdp"
        and ft.num_workers > 1
        and resolved_precision(ft, ft_check.need.device, accel) == "bf16-mixed"
    ):
        plan.notes.append("fsdp with bf16-mixed: autocast's bf16 weight copies are of the whole "
                          "model on every worker, counted in full")  # fmt: skip
    at_once = min(ft.max_concurrent or k, k) * ft.num_workers
    if at_once > 1 and ft_check.need.device == "cpu":
        plan.notes.append(
            f"{at_once} fine-tune workers run at once (finetune.max_concurrent: "
            f"{ft.max_concurrent or 'all'}): workers that share a node share its RAM, "
            f"{at_once} x {_gib(ft_check.need.total)} = {_gib(at_once * ft_check.need.total)} on one"
        )
    if cfg.baseline is not None:
        plan.notes.append("the baseline's mixtures train with the finetune settings: the same need")
    return plan


def _memory_gb_note(plan: Plan, check: Check, memory_gb: float | None) -> None:
    if memory_gb is not None and memory_gb * GIB < check.need.total:
        plan.notes.append(
            f"{check.key}.memory_gb is {memory_gb:g} GiB, below the ~{_gib(check.need.total)} a "
            f"{check.need.what} needs: Ray reserves too little, so the node may be "
            f"overcommitted; raise {check.key}.memory_gb to {math.ceil(check.need.total / GIB)}"
        )


def _node_accelerator(nodes: Sequence[Node] | None) -> str | None:
    kinds = {n.accelerator for n in nodes or () if n.gpus and n.accelerator}
    return kinds.pop() if len(kinds) == 1 else None


def _capacity(
    gpus: float, accelerator: str | None, gpu_memory_gib: float | None,
    nodes: Sequence[Node] | None, local_ram: int | None, whole: bool = False,
) -> Capacity | None:  # fmt: skip
    """The memory one worker or actor may use: its GPU share, or on CPU the largest node's RAM."""
    if gpus > 0:
        cap = gpu_capacity(accelerator, gpu_memory_gib, 1.0 if whole else gpus)
        if cap is None and nodes:
            sizes = [(accelerator_memory(n.accelerator), n.accelerator)
                     for n in nodes if n.gpus and n.accelerator]  # fmt: skip
            known = [(gib, name) for gib, name in sizes if gib is not None]
            if known:
                gib, name = max(known)
                cap = gpu_capacity(name, None, 1.0 if whole else gpus)
                cap = Capacity(cap.bytes, f"the cluster's largest GPU, {name} ({gib:g} GiB)")
        return cap
    if nodes:
        node = max(nodes, key=lambda n: n.ram)
        return Capacity(node.ram, f"the largest node's RAM, {_gib(node.ram)} ({node.name})")
    if local_ram is not None:
        return Capacity(local_ram, f"this machine's RAM, {_gib(local_ram)}")
    return None


def finetune_advice(
    shape: ModelShape, ft: FinetuneConfig, capacity: int, accelerator: str | None = None
) -> list[str]:
    """Key changes that bring a fine-tune worker within `capacity` bytes: each alone where
    one is enough, else FSDP or LoRA together with checkpointing (and bf16-mixed)."""

    def fits(**changes: Any) -> bool:
        changed = ft.model_copy(update=changes)
        return finetune_need(shape, changed, accelerator=accelerator).total <= capacity

    def fsdp_workers(**changes: Any) -> int | None:
        start = max(2, ft.num_workers)
        return next((n for n in range(start, MAX_WORKERS + 1)
                     if fits(strategy="fsdp", num_workers=n, **changes)), None)  # fmt: skip

    gpu_bf16 = ft.gpus_per_worker > 0 and accelerator not in NO_BF16
    advice = []
    full = ft.method == "full"
    workers = fsdp_workers() if full else None
    if workers:
        advice.append(f"finetune.strategy: fsdp with finetune.num_workers >= {workers}")
    lora_fits = full and fits(method="lora", strategy="ddp")
    if lora_fits:
        advice.append("finetune.method: lora")
    if ft.precision == "fp32" and gpu_bf16 and fits(precision="bf16-mixed"):
        advice.append("finetune.precision: bf16-mixed")
    if not ft.gradient_checkpointing and fits(gradient_checkpointing=True):
        advice.append("finetune.gradient_checkpointing: true")
    smaller = next((b for b in range(ft.batch_size - 1, 0, -1) if fits(batch_size=b)), None)
    if smaller is not None:
        advice.append(f"finetune.batch_size: {smaller} (raise grad_accum_steps to keep the "
                      "global batch)")  # fmt: skip
    if full and not (lora_fits and workers and workers <= 8):
        # FSDP needs many workers, or LoRA alone is not enough: each way with checkpointing,
        # and with the other precision (under FSDP, bf16 autocast's weight copies are of the
        # whole model: fp32 can need fewer workers)
        fewest, lora_way = (workers, ""), None
        for extra in _combinations(ft, gpu_bf16, accelerator):
            n = fsdp_workers(**extra)
            if n and (fewest[0] is None or n < fewest[0]):
                fewest = (n, _keys(extra))
            if lora_way is None and not lora_fits and fits(method="lora", strategy="ddp", **extra):
                lora_way = "finetune.method: lora, " + _keys(extra)
        if fewest[1]:
            advice.append(f"finetune.strategy: fsdp with finetune.num_workers >= {fewest[0]}, "
                          + fewest[1])  # fmt: skip
        if lora_way:
            advice.append(lora_way)
    if ft.gpus_per_worker > 0:
        share = min(1.0, ft.gpus_per_worker)
        need = finetune_need(shape, ft, accelerator=accelerator).total
        advice += _bigger_gpu("finetune", lambda gib: need <= gib * GIB * share)
    return advice


def _combinations(ft: FinetuneConfig, gpu_bf16: bool, accelerator: str | None) -> list[dict]:
    """Changes to try beside FSDP or LoRA when neither is enough alone."""
    precision = resolved_precision(ft, "cuda" if ft.gpus_per_worker > 0 else "cpu", accelerator)
    other = {"bf16-mixed": "fp32", "fp32": "bf16-mixed" if gpu_bf16 else None}[precision]
    combos: list[dict] = []
    if not ft.gradient_checkpointing:
        combos.append({"gradient_checkpointing": True})
    if other is not None:
        combos.append({"precision": other})
        if not ft.gradient_checkpointing:
            combos.append({"precision": other, "gradient_checkpointing": True})
    return combos


def _keys(changes: dict) -> str:
    """`{"precision": "fp32", "gradient_checkpointing": True}` as the config says it."""
    words = [f"finetune.{k}: {str(v).lower() if isinstance(v, bool) else v}"
             for k, v in changes.items()]  # fmt: skip
    return " and ".join(words)


def evaluator_advice(need_of, ev: EvaluatorConfig, capacity: int) -> list[str]:
    """Key changes, each alone, that bring an evaluator actor (or its fullest GPU) within
    `capacity`; `need_of(EvaluatorConfig)` estimates one."""

    def fits(**changes: Any) -> bool:
        return need_of(ev.model_copy(update=changes)).total <= capacity

    advice = []
    if ev.gpus_per_actor > 0:
        if ev.gpus_per_actor < 1 and fits(gpus_per_actor=1.0):
            advice.append("evaluator.gpus_per_actor: 1 (a whole GPU per actor)")
        else:
            start = max(2, int(ev.gpus_per_actor) + 1)
            spread = next((n for n in range(start, MAX_WORKERS + 1)
                           if fits(gpus_per_actor=float(n))), None)  # fmt: skip
            if spread is not None:
                advice.append(f"evaluator.gpus_per_actor: {spread} (or more)")
    if ev.vector_dtype == "float32" and fits(vector_dtype="bfloat16"):
        advice.append("evaluator.vector_dtype: bfloat16")
    smaller = next((b for b in range(ev.batch_size - 1, 0, -1) if fits(batch_size=b)), None)
    if smaller is not None:
        advice.append(f"evaluator.batch_size: {smaller}")
    if ev.gpus_per_actor > 0:
        share = 1.0 if ev.gpus_per_actor > 1 else ev.gpus_per_actor
        advice += _bigger_gpu("evaluator", lambda gib: need_of(ev).total <= gib * GIB * share)
    return advice


def _bigger_gpu(section: str, fits_in) -> list[str]:
    for name in SIZING_GPUS:
        if fits_in(ACCELERATOR_GIB[name]):
            return [f"{section}.accelerator_type: {name} ({ACCELERATOR_GIB[name]:g} GiB)"]
    return []


# ---- the base's shape from a run config -------------------------------------------------------


def base_source(cfg: RunConfig, allow_slow: bool = True) -> tuple[Any, Any]:
    """(a model directory or a transformers config, the dtype the run's base will have:
    None = what the directory says) for `cfg.base_model`, reading no weights.

    A base already prepared into `run_dir/base/` is read from there; a GGUF's config comes
    from the file's header (dequantized to fp32, as prepare does); a Hub id's from the Hub or
    its cache. `allow_slow=False` (the preflight): only what is on disk as a directory; None
    when there is none, so an unprepared GGUF or Hub base is checked after prepare."""
    from dem_ray.models.base import ModelError, base_kind, base_path

    kind = base_kind(cfg.base_model)
    if kind == "dir":
        return base_path(cfg.base_model), None
    prepared = Path(cfg.run_dir) / "base"
    if "://" not in cfg.run_dir and (prepared / "config.json").is_file():
        return prepared, None
    if not allow_slow:
        return None, None
    from transformers import AutoConfig

    try:
        if kind == "gguf":
            path = base_path(cfg.base_model)
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
            return config, "float32"
        config = AutoConfig.from_pretrained(cfg.base_model.location,
                                            trust_remote_code=cfg.trust_remote_code)  # fmt: skip
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"base_model '{cfg.base_model}': cannot read its config ({exc})") from exc
    return config, None


def shape_of_run(cfg: RunConfig, allow_slow: bool = True) -> ModelShape | None:
    """`model_shape` of the run's base (None where `base_source` finds nothing fast)."""
    source, dtype = base_source(cfg, allow_slow)
    if source is None:
        return None
    if isinstance(source, Path) and not (source / "config.json").is_file():
        from dem_ray.models.base import ModelError

        raise ModelError(f"base model {source}: no config.json; not a Hugging Face model directory")
    return model_shape(source, dtype, cfg.trust_remote_code)


def cluster_nodes(address: str) -> list[Node]:
    """The alive nodes of the Ray cluster at `address` (joined as a driver, briefly)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        nodes = []
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            res = node.get("Resources", {})
            accel = next((key.split(":", 1)[1] for key in res
                          if key.startswith("accelerator_type:")), None)  # fmt: skip
            ram = int(res.get("memory", 0) + res.get("object_store_memory", 0))
            nodes.append(Node(node.get("NodeManagerAddress", "?"), ram, res.get("GPU", 0.0), accel))
        return nodes
    finally:
        if started:
            ray.shutdown()


def local_ram() -> int | None:
    """This machine's RAM in bytes (None where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


# ---- the preflight of `dem-ray run` ------------------------------------------------------------


def preflight(cfg: RunConfig, ray_address: str | None = None) -> None:
    """Refuse a run whose fine-tune workers or evaluator actors clearly cannot fit.

    Only where the answer is known without starting anything: a section that names its
    `accelerator_type`, or a CPU section of a run that starts a local Ray on this machine
    (or joins one already started in this process). Estimates from a base directory on disk
    only (a GGUF or Hub base is checked once prepared). Cheap: one meta-device model.
    """
    if os.environ.get(SKIP_ENV) == "1":
        return
    ft, ev = cfg.finetune, cfg.evaluator
    named = (ft.gpus_per_worker > 0 and ft.accelerator_type) or (
        ev.gpus_per_actor > 0 and ev.accelerator_type
    )
    nodes, ram = None, None
    local = not (ray_address or os.environ.get("RAY_ADDRESS"))
    on_cpu = ft.gpus_per_worker == 0 or ev.gpus_per_actor == 0
    if on_cpu:
        import ray

        if ray.is_initialized():
            nodes = _nodes_of_this_driver()
        elif local:
            ram = local_ram()
    if not named and not nodes and ram is None:
        return
    try:
        shape = shape_of_run(cfg, allow_slow=bool(named))
        plan = None if shape is None else build_plan(cfg, shape, nodes=nodes, local_ram=ram)
    except Exception as exc:  # noqa: BLE001 - an estimate that fails must never stop a run
        log.info("memory check skipped: the base's shape could not be estimated (%s)", exc)
        return
    if plan is None:
        return
    for check in plan.checks:
        gpu = check.need.device == "cuda"
        section = ft if check.key == "finetune" else ev
        if gpu and not section.accelerator_type:
            continue  # the GPU's memory is not known: nothing to refuse on
        if check.refused:
            raise PlanError(refusal(cfg, check))


def _nodes_of_this_driver() -> list[Node]:
    import ray

    return [
        Node(n.get("NodeManagerAddress", "?"),
             int(n["Resources"].get("memory", 0) + n["Resources"].get("object_store_memory", 0)),
             n["Resources"].get("GPU", 0.0), None)
        for n in ray.nodes() if n.get("Alive")
    ]  # fmt: skip


def refusal(cfg: RunConfig, check: Check) -> str:
    """The preflight's message: the need, the capacity, and the keys to change."""
    advice = check.advice or [f"a larger {'GPU' if check.need.device == 'cuda' else 'node'}"]
    per = "per GPU" if "per GPU" in check.need.what else (
        "per worker" if check.key == "finetune" else "per actor")  # fmt: skip
    return (
        f"{cfg.source}: {check.key} needs ~{_gib(check.need.total)} {per} ({check.need.settings})"
        f", {check.capacity.where} holds {_gib(check.capacity.bytes)}: set "
        f"{'; or '.join(advice)}. `dem-ray plan {cfg.source}` shows the estimate part by part; "
        f"{SKIP_ENV}=1 skips this check"
    )


# ---- rendering --------------------------------------------------------------------------------


def render(plan: Plan) -> str:
    """The plan as `dem-ray plan` prints it."""
    s = plan.shape
    lines = [
        f"base: {plan.base} ({s.architecture}: {_count(s.params)} parameters, {s.layers} "
        f"layers, hidden {s.hidden:,}, vocabulary {s.vocab:,}; evaluators hold it in {s.dtype})",
        f"datasets: {plan.datasets} (each evaluator holds {plan.datasets} vectors)",
    ]
    for check in plan.checks:
        need = check.need
        lines += ["", f"{need.what}: ~{_gib(need.total)} ({need.settings})"]
        width = max(len(name) for name, _, _ in need.parts)
        for name, size, how in need.parts:
            lines.append(f"  {name:<{width}}  {_gib(size):>10}  {how}")
        if check.capacity is None:
            hint = ("name its accelerator_type, or give --gpu-memory GIB" if need.device == "cuda"
                    else "give --ray-address to compare with a cluster's nodes")  # fmt: skip
            lines.append(f"  -> capacity unknown: {hint}")
        elif check.fits:
            spare = check.capacity.bytes - need.total
            lines.append(f"  -> fits: {check.capacity.where} ({_gib(spare)} to spare)")
        else:
            verdict = "does not fit" if check.refused else "tight: may not fit"
            lines.append(f"  -> {verdict}: {check.capacity.where}")
            for item in check.advice:
                lines.append(f"     to fit, set {item}")
    if plan.notes:
        lines.append("")
        lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


def _gib(nbytes: float) -> str:
    if abs(nbytes) < 0.1 * GIB:
        return f"{nbytes / 1024**2:.1f} MiB"
    return f"{nbytes / GIB:.1f} GiB"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


# ---- the cluster guide's sizing table -------------------------------------------------------

# Published shapes (Llama 3.2 3B, Llama 2 7B and 13B), built from their config fields alone.
SIZING_MODELS: dict[str, dict[str, Any]] = {
    "3B": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8, vocab_size=128256,
               tie_word_embeddings=True),
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, vocab_size=32000),
    "13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                num_attention_heads=40, vocab_size=32000),
}  # fmt: skip
SIZING_K, SIZING_SEQ, SIZING_BATCH = 4, 1024, 8
TABLE_REGION = "sizing-table"


def sizing_rows() -> list[list[str]]:
    """Per base: evaluator and fine-tune needs on a bf16 base, and the smallest GPU of
    SIZING_GPUS that holds each (or the spread / FSDP workers an 80 GiB GPU needs)."""
    from transformers import LlamaConfig

    rows = []
    for label, fields in SIZING_MODELS.items():
        shape = model_shape(LlamaConfig(**fields), "bfloat16")
        ev = EvaluatorConfig(gpus_per_actor=1.0, batch_size=SIZING_BATCH, vector_dtype="bfloat16")
        ev32 = ev.model_copy(update={"vector_dtype": "float32"})
        ft = FinetuneConfig(gpus_per_worker=1.0, batch_size=SIZING_BATCH, seq_len=SIZING_SEQ)
        ckpt = ft.model_copy(update={"gradient_checkpointing": True})
        lora = ckpt.model_copy(update={"method": "lora"})

        def ev_need(e: EvaluatorConfig, shape: ModelShape = shape) -> Need:
            return evaluator_need(shape, e, SIZING_K, SIZING_SEQ)

        def ft_need(f: FinetuneConfig, shape: ModelShape = shape) -> Need:
            return finetune_need(shape, f)

        spread = next(n for n in range(1, 65) if ev_need(
            ev.model_copy(update={"gpus_per_actor": float(n)})).total <= 80 * GIB)  # fmt: skip
        fsdp = next(n for n in range(2, 257) if ft_need(
            ckpt.model_copy(update={"strategy": "fsdp", "num_workers": n})).total <= 80 * GIB)  # fmt: skip
        rows.append([
            f"{label} ({_count(shape.params)} params)",
            _gib(ev_need(ev).total), _gib(ev_need(ev32).total),
            _smallest(ev_need(ev).total, spread=spread, what="`gpus_per_actor`"),
            _gib(ft_need(ft).total), _gib(ft_need(ckpt).total),
            _smallest(ft_need(ckpt).total, spread=fsdp, what="`strategy: fsdp`, `num_workers`"),
            _gib(ft_need(lora).total), _smallest(ft_need(lora).total),
        ])  # fmt: skip
    return rows


def _smallest(need: int, spread: int | None = None, what: str = "") -> str:
    for name in SIZING_GPUS:
        if need <= ACCELERATOR_GIB[name] * GIB:
            return f"{name} ({ACCELERATOR_GIB[name]:g} GiB)"
    return f"{what}: {spread}, on 80 GiB GPUs" if spread else "none of these"


def sizing_table_markdown() -> str:
    """The cluster guide's table (cluster/README.md), from `sizing_rows`."""
    head = ["base", "evaluator, bf16 vectors", "evaluator, fp32 vectors",
            "one evaluator (bf16 vectors) fits on", "fine-tune, full", "full, checkpointed",
            "fits on (FSDP where one GPU is too small)", "LoRA r 16, checkpointed",
            "fits on"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in sizing_rows()]
    caption = (f"k = {SIZING_K} datasets, a bf16 base, `seq_len: {SIZING_SEQ}`, "
               f"`batch_size: {SIZING_BATCH}` for fine-tunes and evaluators, bf16-mixed, "
               "one GPU per worker and per actor; each figure is a peak per worker, per actor "
               "or per GPU, the 1 GiB runtime share included.")  # fmt: skip
    return caption + "\n\n" + "\n".join(lines) + "\n"


def write_region(path: Path, name: str, body: str) -> bool:
    """Replace the text between `<!-- NAME:start -->` and `<!-- NAME:end -->` in `path`;
    True when it changed."""
    import re

    text = path.read_text()
    pattern = rf"(<!-- {name}:start -->\n)(.*?)(<!-- {name}:end -->)"
    if not re.search(pattern, text, re.S):
        raise ValueError(f"{path}: no <!-- {name}:start --> ... <!-- {name}:end --> region")
    new = re.sub(pattern, lambda m: m.group(1) + body + m.group(3), text, flags=re.S)
    if new != text:
        path.write_text(new)
    return new != text


def main(argv: Iterable[str] | None = None) -> int:
    """`python -m dem_ray.plan --sizing-table [--write PATH]`: print or rewrite the table."""
    parser = argparse.ArgumentParser(prog="python -m dem_ray.plan",
                                     description="The cluster guide's GPU sizing table.")  # fmt: skip
    parser.add_argument("--sizing-table", action="store_true", help="print the table")
    parser.add_argument("--write", type=Path, metavar="PATH",
                        help=f"rewrite the <!-- {TABLE_REGION} --> region of this file")  # fmt: skip
    args = parser.parse_args(list(argv) if argv is not None else None)
    table = sizing_table_markdown()
    if args.write is not None:
        changed = write_region(args.write, TABLE_REGION, table)
        print(f"{args.write}: sizing table {'updated' if changed else 'up to date'}")
    else:
        sys.stdout.write(table)
    return 0


def dumps(plan: Plan) -> str:
    return json.dumps(plan.as_dict(), indent=2)


if __name__ == "__main__":
    raise SystemExit(main())
