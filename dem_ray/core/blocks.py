"""Block groups of a transformer's tensors: embeddings, contiguous groups of layers, head.

Per-block coefficients give each dataset one weight per group, and the report's
diagnostics compare vectors group by group. A tensor's group depends only on its
name and the model's layer count, so the evaluator (which sees parameter names) and
`merge` (which sees the names stored in the safetensors files) agree on it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# `model.layers.3.`, `transformer.h.3.`, `blocks.3.`, `encoder.layer.3.`
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
EMBED_RE = re.compile(r"(?:^|\.)(?:embed_tokens|wte|wpe|embed_positions|embeddings?)(?:\.|$)")
GROUP_SEPARATOR = "@"  # dataset names cannot hold it (config's name rule)


def group_names(groups: int) -> list[str]:
    """`embed`, `block0` ... `block{groups-1}`, `head` (final norm, LM head, anything else)."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    return ["embed", *(f"block{j}" for j in range(groups)), "head"]


def layer_index(name: str) -> int | None:
    match = LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def count_layers(names: Iterable[str]) -> int:
    """Transformer layers among the tensor names: the largest layer index plus one."""
    indices = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(indices) + 1 if indices else 0


def block_of(name: str, num_layers: int, groups: int) -> int:
    """The group index (into `group_names(groups)`) of tensor `name`.

    Layer `l` of `num_layers` falls in layer group `floor(l * groups / num_layers)`, so
    the groups are contiguous and as even as the layer count allows; a tied embedding
    (stored once) counts as an embedding.
    """
    layer = layer_index(name)
    if layer is not None and num_layers > 0:
        return 1 + min(layer * groups // num_layers, groups - 1)
    if EMBED_RE.search(name):
        return 0
    return groups + 1


def weight_key(dataset: str, group: str) -> str:
    """The name of one per-block coefficient, e.g. `code@block1`."""
    return f"{dataset}{GROUP_SEPARATOR}{group}"
