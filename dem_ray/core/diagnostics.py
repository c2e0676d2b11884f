"""How the distribution vectors relate: norms and pairwise cosines, whole-model and per block group.

Vectors that share a direction interfere when they are added; nearly orthogonal ones
combine almost independently. Everything is accumulated in float64 while the vector
files are streamed one tensor name at a time (that tensor from every file, never a
whole vector), so the memory is `k` tensors of one name whatever the model size.
Low-rank vectors (LoRA fine-tunes, `dem_ray.core.lowrank`) are compared through their
factors, exactly and without a dense tensor: <B_i A_i, B_j A_j> = tr((B_i^T B_j)(A_j A_i^T)),
products of r x r matrices. Pure torch: nothing here knows about Ray.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import torch

from dem_ray.core.blocks import block_of, count_layers, group_names
from dem_ray.core.lowrank import SEPARATOR, lowrank_vectors
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
    every other file must hold the same names with the same shapes. Low-rank files (all
    of them or none) count the base's every tensor (their `base_shapes`), a tensor no
    adapter changed as zero.
    """
    paths = [Path(p) for p in vector_paths]
    datasets = [str(n) for n in names]
    if len(paths) != len(datasets):
        raise ValueError(f"{len(paths)} vector files but {len(datasets)} dataset names")
    if not paths:
        raise ValueError("no vectors to compare")
    if len(set(datasets)) != len(datasets):
        raise ValueError(f"dataset names repeat: {datasets}")
    with ExitStack() as stack:
        readers = [_open(stack, p) for p in paths]
        if lowrank_vectors(paths):  # a mixture of kinds is an error naming one of each
            gnames, gram, parameters = _lowrank_gram(readers, groups)
        else:
            gnames, gram, parameters = _dense_gram(readers, groups)
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
def _dense_gram(
    readers: list[TensorReader], groups: int
) -> tuple[list[str], torch.Tensor, list[int]]:
    """(group names, per-group k x k inner products, elements per group) of dense files."""
    k = len(readers)
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
    return gnames, gram, parameters


def _lowrank_gram(
    readers: list[TensorReader], groups: int
) -> tuple[list[str], torch.Tensor, list[int]]:
    """`_dense_gram` of low-rank files, from the factors: per adapted tensor, with A_cat
    (K x d_in) and B_cat (d_out x K) the files' factors side by side, the K x K matrix
    (B_cat^T B_cat) * (A_cat A_cat^T), summed over each pair of files' blocks, is their
    Frobenius inner products of B_i A_i and B_j A_j (in float64)."""
    k = len(readers)
    shapes = _base_shapes(readers)
    layers = count_layers(shapes)
    g = max(1, min(groups, layers))
    gnames = group_names(g)
    gram = torch.zeros((len(gnames), k, k), dtype=torch.float64)
    parameters = [0] * len(gnames)
    for name, shape in shapes.items():
        parameters[block_of(name, layers, g)] += math.prod(shape)
    adapted: dict[str, list[int]] = {}
    for i, reader in enumerate(readers):
        for key in reader.names():
            param, _, part = key.rpartition(SEPARATOR)
            if part not in ("A", "B") or not param:
                raise VectorError(
                    f"{reader.path}: tensor '{key}' is not a low-rank factor (<param>::A or "
                    "::B); re-run the vectors stage"
                )
            if part == "A":
                adapted.setdefault(param, []).append(i)
    for param in sorted(adapted):
        if param not in shapes:
            raise VectorError(
                f"{readers[adapted[param][0]].path}: tensor '{param}::A' is for '{param}', "
                "which the other vectors' base does not have; every vector must come from "
                "the same base model"
            )
        owners, a_parts, b_parts = [], [], []
        for i in adapted[param]:
            a = _read_factor(readers[i], f"{param}{SEPARATOR}A").to(torch.float64)
            b = _read_factor(readers[i], f"{param}{SEPARATOR}B").to(torch.float64)
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or (
                b.shape[0], a.shape[1]) != tuple(shapes[param]):  # fmt: skip
                raise VectorError(
                    f"{readers[i].path}: factors of '{param}' are {list(a.shape)} and "
                    f"{list(b.shape)}, not a change of its {list(shapes[param])}; re-run the "
                    "vectors stage"
                )
            owners += [i] * a.shape[0]
            a_parts.append(a)
            b_parts.append(b)
        a_cat, b_cat = torch.cat(a_parts), torch.cat(b_parts, dim=1)
        products = (b_cat.T @ b_cat) * (a_cat @ a_cat.T)  # K x K
        select = torch.zeros((len(owners), k), dtype=torch.float64)
        select[torch.arange(len(owners)), torch.tensor(owners)] = 1.0
        part = select.T @ products @ select
        if not torch.isfinite(part).all():
            for i in adapted[param]:
                for key in (f"{param}{SEPARATOR}A", f"{param}{SEPARATOR}B"):
                    if not torch.isfinite(_read_factor(readers[i], key)).all():
                        raise VectorError(
                            f"{readers[i].path}: tensor '{key}' has NaN or Inf; re-run the "
                            "vectors stage (and the fine-tune, if it diverged)"
                        )
            raise VectorError(f"tensor '{param}': the inner products overflow")
        gram[block_of(param, layers, g)] += part
    return gnames, gram, parameters


def _base_shapes(readers: list[TensorReader]) -> dict[str, tuple[int, ...]]:
    """Every base tensor's shape, from the low-rank files' headers (the same in each); a
    file written without them counts the tensors its factors change."""
    found = []
    for reader in readers:
        raw = reader.metadata.get("base_shapes")
        try:
            shapes = None if raw is None else {n: tuple(s) for n, s in json.loads(raw).items()}
        except (ValueError, TypeError, AttributeError) as exc:
            raise VectorError(f"{reader.path}: metadata 'base_shapes' is damaged ({exc})") from exc
        found.append(shapes)
    known = [s for s in found if s is not None]
    if known:
        for reader, shapes in zip(readers, found, strict=True):
            if shapes is not None and shapes != known[0]:
                raise VectorError(
                    f"{reader.path}: its base has other tensors than {readers[0].path}'s; "
                    "every vector must come from the same base model"
                )
        return dict(sorted(known[0].items()))
    shapes: dict[str, tuple[int, ...]] = {}
    for reader in readers:
        for key in reader.names():
            param, _, part = key.rpartition(SEPARATOR)
            b_name = f"{param}{SEPARATOR}B"
            if part == "A" and b_name in reader.header:
                shapes[param] = (reader.spec(b_name)[1][0], reader.spec(key)[1][-1])
    return dict(sorted(shapes.items()))


def _read_factor(reader: TensorReader, name: str) -> torch.Tensor:
    if name not in reader.header:
        raise VectorError(f"{reader.path}: tensor '{name}' is missing beside its other factor")
    try:
        return reader.read(name)
    except (OSError, SafetensorsFormatError) as exc:
        raise VectorError(f"{reader.path}: tensor '{name}' cannot be read ({exc})") from exc


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
