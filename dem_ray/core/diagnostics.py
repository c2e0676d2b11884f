"""How the distribution vectors relate: norms and pairwise cosines, whole-model and per block group.

Vectors that share a direction interfere when they are added; nearly orthogonal ones
combine almost independently. Everything is accumulated in float64 while the vector
files are streamed one tensor name at a time (that tensor from every file, never a
whole vector), so the memory is `k` tensors of one name whatever the model size.
Pure torch: nothing here knows about Ray.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import torch

from dem_ray.core.blocks import block_of, count_layers, group_names
from dem_ray.core.safetensors_io import SafetensorsFormatError, TensorReader
from dem_ray.core.vectors import VectorError

CHUNK = 1 << 22  # elements per float64 chunk: k x 32 MiB at most besides the tensors read


def vector_diagnostics(vector_paths: Sequence[Path], names: Sequence[str], groups: int = 4) -> dict:
    """Norms and cosines of the vectors in `vector_paths` (dataset `names[i]` for file i).

    Returns plain JSON-ready Python::

        {"datasets": [name, ...], "groups": [group, ...],
         "norm": {dataset: float},                       # L2 norm over all tensors
         "cosine": [[float]],                            # k x k, in dataset order
         "norm_by_group": {group: {dataset: float}},
         "cosine_by_group": {group: [[float]]},
         "parameters_by_group": {group: int}}            # elements of each group

    Groups are `dem_ray.core.blocks.group_names(g)` with `g = max(1, min(groups,
    layers))`. The diagonal of a cosine matrix is 1.0; every entry of a vector whose
    norm is 0 (over the model, or within a group) is 0.0, its diagonal included.
    The tensors are those named in the first file (tied weights are stored once);
    every other file must hold the same names with the same shapes.
    """
    paths = [Path(p) for p in vector_paths]
    datasets = [str(n) for n in names]
    if len(paths) != len(datasets):
        raise ValueError(f"{len(paths)} vector files but {len(datasets)} dataset names")
    if not paths:
        raise ValueError("no vectors to compare")
    if len(set(datasets)) != len(datasets):
        raise ValueError(f"dataset names repeat: {datasets}")
    k = len(paths)
    with ExitStack() as stack:
        readers = [_open(stack, p) for p in paths]
        tensor_names = readers[0].names()
        _check_names(readers, tensor_names)
        layers = count_layers(tensor_names)
        g = max(1, min(groups, layers))
        gnames = group_names(g)
        gram = torch.zeros((len(gnames), k, k), dtype=torch.float64)
        parameters = [0] * len(gnames)
        for name in tensor_names:
            shape = _shape(readers, name)
            numel = math.prod(shape)
            b = block_of(name, layers, g)
            parameters[b] += numel
            if numel == 0:
                continue
            tensors = [_read(r, name) for r in readers]
            part = _gram(tensors, numel)
            del tensors
            if not torch.isfinite(part).all():
                _raise_non_finite(readers, name)
            gram[b] += part
    total = gram.sum(dim=0)
    norms = _norms(total)
    return {
        "datasets": datasets,
        "groups": gnames,
        "norm": dict(zip(datasets, norms, strict=True)),
        "cosine": _cosine(total),
        "norm_by_group": {
            group: dict(zip(datasets, _norms(gram[i]), strict=True))
            for i, group in enumerate(gnames)
        },
        "cosine_by_group": {group: _cosine(gram[i]) for i, group in enumerate(gnames)},
        "parameters_by_group": dict(zip(gnames, parameters, strict=True)),
    }


def mean_offdiagonal(matrix: Sequence[Sequence[float]]) -> float:
    """The mean of the entries off the diagonal (NaN for fewer than two rows)."""
    k = len(matrix)
    if k < 2:
        return math.nan
    values = [float(matrix[i][j]) for i in range(k) for j in range(k) if i != j]
    return sum(values) / len(values)


# ---- helpers -------------------------------------------------------------------------------
def _open(stack: ExitStack, path: Path) -> TensorReader:
    try:
        return stack.enter_context(TensorReader(path))
    except (OSError, SafetensorsFormatError) as exc:
        raise VectorError(f"{path}: cannot be read as a vector file ({exc})") from exc


def _check_names(readers: list[TensorReader], tensor_names: list[str]) -> None:
    first = readers[0]
    expected = set(tensor_names)
    for reader in readers[1:]:
        have = set(reader.names())
        missing = sorted(expected - have)
        if missing:
            raise VectorError(
                f"{reader.path}: tensor '{missing[0]}' is missing (it is in {first.path}); "
                "every vector must come from the same base model"
            )
        extra = sorted(have - expected)
        if extra:
            raise VectorError(
                f"{reader.path}: tensor '{extra[0]}' is not in {first.path}; "
                "every vector must come from the same base model"
            )


def _shape(readers: list[TensorReader], name: str) -> tuple[int, ...]:
    shape = tuple(readers[0].header[name]["shape"])
    for reader in readers[1:]:
        other = tuple(reader.header[name]["shape"])
        if other != shape:
            raise VectorError(
                f"{reader.path}: tensor '{name}' has shape {list(other)} but "
                f"{readers[0].path} has {list(shape)}; every vector must come from the same "
                "base model"
            )
    return shape


def _read(reader: TensorReader, name: str) -> torch.Tensor:
    try:
        tensor = reader.read(name)
    except (OSError, SafetensorsFormatError) as exc:
        raise VectorError(f"{reader.path}: tensor '{name}' cannot be read ({exc})") from exc
    return tensor.reshape(-1)


def _gram(tensors: list[torch.Tensor], numel: int) -> torch.Tensor:
    """sum over the elements of v_i * v_j, in float64 chunk by chunk."""
    k = len(tensors)
    out = torch.zeros((k, k), dtype=torch.float64)
    for start in range(0, numel, CHUNK):
        stop = min(start + CHUNK, numel)
        block = torch.stack([t[start:stop].to(torch.float64) for t in tensors])
        out += block @ block.T
    return out


def _raise_non_finite(readers: list[TensorReader], name: str):
    for reader in readers:
        if not torch.isfinite(_read(reader, name).to(torch.float64)).all():
            raise VectorError(
                f"{reader.path}: tensor '{name}' has NaN or Inf; re-run the vectors stage "
                "(and the fine-tune, if it diverged)"
            )
    raise VectorError(f"tensor '{name}': the inner products overflow")  # not for real vectors


def _norms(gram: torch.Tensor) -> list[float]:
    return [math.sqrt(max(float(gram[i, i]), 0.0)) for i in range(gram.shape[0])]


def _cosine(gram: torch.Tensor) -> list[list[float]]:
    norms = _norms(gram)
    k = len(norms)
    out = [[0.0] * k for _ in range(k)]
    for i in range(k):
        if norms[i] == 0.0:
            continue
        out[i][i] = 1.0
        for j in range(i + 1, k):
            if norms[j] == 0.0:
                continue
            value = float(gram[i, j]) / (norms[i] * norms[j])
            out[i][j] = out[j][i] = min(1.0, max(-1.0, value))  # symmetric to the last bit
    return out
