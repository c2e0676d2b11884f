"""Spread one evaluator's model over several GPUs: contiguous blocks of layers per GPU.

With `evaluator.gpus_per_actor: N > 1` an actor holds, on each of its N GPUs, a
contiguous run of the model's top-level pieces (embeddings, decoder layers, final norm,
head) together with those pieces' theta_0 copy and k vectors, and `ResidentMerge`
merges each GPU's parameters there. What a GPU holds is then per piece live + base +
k x vector bytes, so the blocks are balanced on those bytes, not on the weights alone.

The device map has the form transformers' `from_pretrained(device_map=...)` takes
(module name -> device); accelerate's hooks move the hidden states from GPU to GPU
during the one forward pass.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import torch

from dem_ray.core.blocks import LAYER_RE
from dem_ray.core.safetensors_io import stored_dtype
from dem_ray.core.vectors import DTYPES

Sizes = list[tuple[str, int]]


class PartitionError(ValueError):
    """Sizes or a device count that cannot be partitioned; the message says which."""


def partition_layers(
    sizes: Sequence[tuple[str, int]],
    num_devices: int,
    tied: Mapping[str, str] | None = None,
) -> dict[str, int]:
    """{piece name: device index} for `sizes`, the model's pieces in forward order.

    Each device gets one contiguous run of pieces, and the runs minimise the largest
    device's bytes (exactly: the smallest feasible capacity, found by bisection, then a
    greedy fill). Ties go to the front: earlier devices are filled up to that capacity
    and the last one gets what is left, which leaves the most room on the device that
    also holds the logits. Every device is used when there are at least as many pieces
    as devices; with fewer, piece i goes on device i and the later devices stay empty.
    So the input embedding is on device 0 and the head on the last device used.

    `tied`: {piece: the earlier piece it shares a Parameter with}, e.g. an LM head whose
    weight is the input embedding's (`tie_word_embeddings`). One Parameter lives on one
    device, so a tied piece goes where its partner goes (the head then sits on device 0,
    with the embedding) and its bytes count there; the other pieces stay contiguous.
    """
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
        raise PartitionError(f"num_devices must be a whole number >= 1, got {num_devices!r}")
    names = [name for name, _ in sizes]
    if len(set(names)) != len(names):
        raise PartitionError("piece names must be unique")
    for name, size in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise PartitionError(f"piece '{name}': size must be bytes >= 0, got {size!r}")
    roots = _tie_roots(names, dict(tied or {}))
    bytes_of = {name: 0 for name in names}
    for name, size in sizes:
        bytes_of[roots.get(name, name)] += size
    free = [name for name in names if name not in roots]
    weights = [bytes_of[name] for name in free]
    placed = dict(zip(free, _contiguous(weights, num_devices), strict=True))
    return {name: placed[roots.get(name, name)] for name in names}


def _tie_roots(names: list[str], tied: dict[str, str]) -> dict[str, str]:
    """{tied piece: the untied piece it ends up with}, following chains of ties."""
    known = set(names)
    for piece, partner in tied.items():
        if piece not in known or partner not in known:
            raise PartitionError(f"tied pieces '{piece}' and '{partner}' must both be in sizes")
    roots = {}
    for piece in tied:
        root, seen = piece, {piece}
        while root in tied:
            root = tied[root]
            if root in seen:
                raise PartitionError(f"pieces tied in a cycle through '{piece}'")
            seen.add(root)
        roots[piece] = root
    return roots


def _contiguous(weights: list[int], num_devices: int) -> list[int]:
    """A device index per weight: contiguous runs, the largest run as small as it can be."""
    n = len(weights)
    if n == 0:
        return []
    blocks = min(num_devices, n)
    low, high = max(weights), sum(weights)
    while low < high:  # the smallest capacity the greedy packs into `blocks` runs
        middle = (low + high) // 2
        if _runs_needed(weights, middle) <= blocks:
            high = middle
        else:
            low = middle + 1
    capacity = low
    devices, device, held = [], 0, 0
    for i, weight in enumerate(weights):
        left_after = n - i  # pieces from this one on
        if i and (held + weight > capacity or left_after <= blocks - 1 - device):
            # full, or every later device still needs a piece of its own
            device, held = device + 1, 0
        devices.append(device)
        held += weight
    return devices


def _runs_needed(weights: list[int], capacity: int) -> int:
    runs, held = 1, 0
    for weight in weights:
        if held + weight > capacity:
            runs, held = runs + 1, 0
        held += weight
    return runs


def piece_of(name: str) -> str | None:
    """The decoder layer a tensor name belongs to (`model.layers.3`), or None."""
    match = LAYER_RE.search(name)
    return name[: match.end() - 1] if match else None


def resident_sizes(
    model: torch.nn.Module, k: int = 0, vector_dtype: str = "float32"
) -> tuple[Sizes, dict[str, str]]:
    """(sizes, tied) of `model`'s pieces for `partition_layers`; the model may be on meta.

    A piece is a decoder layer (`model.layers.<i>`, everything under it), else the module
    that owns a tensor (`model.embed_tokens`, `model.norm`, `lm_head`, a rotary
    embedding's buffers), else, for a tensor held by a module with submodules, the tensor
    itself (a device-map key must not swallow the pieces under it). In forward order as
    the modules are registered. Bytes are what the evaluator keeps resident per
    parameter: the live weight, its theta_0 copy and k vectors in `vector_dtype`; a
    buffer counts once. `tied`: {piece: earlier piece} where a piece holds a Parameter
    already seen (a tied LM head); that Parameter's bytes count with the earlier piece.
    """
    per_vector = torch.empty((), dtype=DTYPES[vector_dtype]).element_size()
    sizes: dict[str, int] = {}
    tied: dict[str, str] = {}
    owner: dict[int, str] = {}  # id(Parameter) -> the piece that holds it
    for module_name, module in model.named_modules():
        has_children = next(module.children(), None) is not None
        tensors = [(n, t, True) for n, t in module.named_parameters(recurse=False)]
        tensors += [(n, t, False) for n, t in module.named_buffers(recurse=False)]
        for tensor_name, tensor, is_param in tensors:
            full = f"{module_name}.{tensor_name}" if module_name else tensor_name
            piece = piece_of(full) or (full if has_children or not module_name else module_name)
            sizes.setdefault(piece, 0)
            if is_param and id(tensor) in owner:
                if owner[id(tensor)] != piece:
                    tied.setdefault(piece, owner[id(tensor)])
                continue
            numel, element = tensor.numel(), tensor.element_size()
            if is_param:
                owner[id(tensor)] = piece
                sizes[piece] += numel * (2 * element + k * per_vector)
            else:
                sizes[piece] += numel * element
    return list(sizes.items()), tied


def evaluator_device_map(
    model: torch.nn.Module | object | str | Path,
    num_gpus: int,
    *,
    k: int = 0,
    vector_dtype: str = "float32",
    devices: Sequence[Hashable] | None = None,
    trust_remote_code: bool = False,
) -> dict[str, str]:
    """The device map for an evaluator holding a base and `k` vectors on `num_gpus` GPUs.

    `model`: a model (meta is fine), a transformers config, or a model directory (its
    config is built on the meta device in the dtype its weights are stored in, so nothing
    is read but config.json and the safetensors headers). `devices`: what to call the
    devices (default `cuda:0` ... `cuda:{num_gpus-1}`, the GPUs Ray gave the actor).
    """
    if devices is None:
        devices = [f"cuda:{i}" for i in range(num_gpus)]
    if len(devices) != num_gpus:
        raise PartitionError(f"{len(devices)} device names given for {num_gpus} devices")
    if not isinstance(model, torch.nn.Module):
        model = meta_model(model, trust_remote_code)
    sizes, tied = resident_sizes(model, k, vector_dtype)
    return {name: devices[i] for name, i in partition_layers(sizes, num_gpus, tied).items()}


def meta_model(config_or_dir: object, trust_remote_code: bool = False) -> torch.nn.Module:
    """The causal LM of a config or model directory, on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = None
    if isinstance(config_or_dir, str | Path):
        dtype = stored_dtype(Path(config_or_dir))
        config = AutoConfig.from_pretrained(str(config_or_dir), trust_remote_code=trust_remote_code)
    else:
        config = config_or_dir
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code
        )


def device_of(name: str, device_map: Mapping[str, object]) -> object:
    """The device `device_map` gives tensor `name`: its longest key that is the name or
    a dotted prefix of it (as accelerate reads a map); KeyError when none is."""
    parts = name.split(".")
    for end in range(len(parts), -1, -1):
        key = ".".join(parts[:end])
        if key in device_map:
            return device_map[key]
    raise KeyError(f"device map has no entry for '{name}'")
