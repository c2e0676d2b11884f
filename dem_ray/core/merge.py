"""theta = theta_0 + sum_i w_i v_i: resident in a live model, and streamed to disk.

`ResidentMerge` re-points every parameter of a live model at a view into one flat
buffer, and keeps theta_0 and the stacked vectors as flat buffers beside it. A
candidate is then one `addmv` over all parameters, written straight into the
model's weights: no allocation, no disk, no model re-creation. Pure torch.

Other merge methods (ties, DARE; `merge_methods`) and per-block coefficients (one
weight per dataset and block group; `blocks`) use the same buffers: the vectors are
prepared once when read, and a candidate combines them run by run.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from dem_ray.core.atomic import atomic_dir
from dem_ray.core.blocks import block_of, count_layers, group_names
from dem_ray.core.merge_methods import (
    METHODS,
    MergeError,
    Scratch,
    check_method,
    check_weights,
    combine,
    prepare,
)
from dem_ray.core.vectors import DTYPES, VectorError, save_tensors, tensor_index

log = logging.getLogger(__name__)

MODEL_SIDE_FILES = ("config.json", "generation_config.json")
# Elements per chunk of a mixed-dtype merge (bf16/fp16 vectors into fp32 weights).
MIX_CHUNK = 1 << 22


def unique_parameters(model: torch.nn.Module) -> dict[str, list[str]]:
    """First name of each distinct parameter -> all its names (tied weights share one)."""
    by_id: dict[int, list[str]] = {}
    for name, param in model.state_dict(keep_vars=True).items():
        if isinstance(param, torch.nn.Parameter):
            by_id.setdefault(id(param), []).append(name)
    return {names[0]: names for names in by_id.values()}


class ResidentMerge:
    """A live model whose weights are rewritten in place for each candidate."""

    def __init__(
        self,
        model: torch.nn.Module,
        vectors: Sequence[Mapping[str, torch.Tensor]],
        vector_dtype: str = "float32",
        *,
        method: str = "linear",
        density: float = 1.0,
        dare_seed: int = 0,
        groups: int | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        """`vectors` may be lazy mappings (e.g. `LazyTensors`): each tensor is read once.

        With no vectors the live model can still score checkpoints (`load_state`).
        `method`, `density`, `dare_seed`: see `merge_methods`; the prepared vectors
        replace the raw ones. `groups`: None for one weight per vector, G for one weight
        per vector and block group (`blocks.group_names(G)`), dataset-major. `names`:
        the vectors' dataset names, which seed DARE (default `vector0`, `vector1`, ...).
        """
        self.model = model
        self.k = len(vectors)
        self.method = check_method(method, density).name
        self.density = float(density)
        self.dare_seed = dare_seed
        self.groups = _check_groups(groups)
        self.names = _check_names(names, self.k)
        params = dict(model.named_parameters(remove_duplicate=False))
        uniques = unique_parameters(model)
        num_layers = count_layers(params)
        first = next(iter(params.values()))
        device, dtype = first.device, first.dtype
        total = sum(params[name].numel() for name in uniques)
        self.live = torch.empty(total, dtype=dtype, device=device)
        self.vectors = torch.empty((self.k, total), dtype=DTYPES[vector_dtype], device=device)
        self.slices: dict[str, tuple[int, int, torch.Size]] = {}
        # Maximal runs of the flat buffer in one block group: (start, end, group index).
        self.segments: list[tuple[int, int, int]] = []
        offset = 0
        for name, aliases in uniques.items():
            param = params[name]
            n = param.numel()
            view = self.live[offset : offset + n]
            view.copy_(param.data.reshape(-1))
            stored = name  # the name the vector files store it under (the first vector's)
            for i, vector in enumerate(vectors):
                alias, tensor = _pick(vector, aliases, i)
                if i == 0:
                    stored = alias
                if not torch.isfinite(tensor).all():
                    raise VectorError(
                        f"{getattr(vector, 'path', f'vector {i}')}: tensor '{aliases[0]}' has "
                        "NaN or Inf; re-run `dem-ray vectors CONFIG --force` (and the finetune "
                        "stage if the fine-tune itself diverged)"
                    )
                if tuple(tensor.shape) != tuple(param.shape):
                    raise VectorError(
                        f"vector {i}: tensor '{aliases[0]}' has shape {tuple(tensor.shape)}, "
                        f"the model {tuple(param.shape)}"
                    )
                tensor = prepare(tensor, method, density, dare_seed, self.names[i], alias)
                self.vectors[i, offset : offset + n].copy_(tensor.reshape(-1))
            param.data = view.view(param.shape)
            for alias in aliases:
                self.slices[alias] = (offset, n, param.shape)
            group = 0 if self.groups is None else block_of(stored, num_layers, self.groups)
            if self.segments and self.segments[-1][2] == group and self.segments[-1][1] == offset:
                self.segments[-1] = (self.segments[-1][0], offset + n, group)
            elif n:
                self.segments.append((offset, offset + n, group))
            offset += n
        self.base = self.live.clone()
        # One row of weights per block group (a single row without groups), reused.
        self._wmat = torch.zeros((_group_count(self.groups), self.k), dtype=dtype, device=device)
        self._weights = self._wmat[0]
        # Mixed dtypes: one reusable scratch in the weights' dtype, so apply() allocates
        # nothing per candidate (measured 3.3-3.8x faster than converting each chunk afresh).
        # The ties combination needs a few chunk-sized buffers more.
        self._scratch = None
        if self.k and (self.vectors.dtype != dtype or METHODS[self.method].elect):
            chunk = min(MIX_CHUNK, total)
            self._scratch = Scratch(self.method, self.k, chunk, dtype, device, self.vectors.dtype)

    def apply(self, weights: Sequence[float]) -> None:
        """Set the live model to the method's merge of theta_0 and the vectors with `weights`.

        Without groups: one weight per vector. With G groups: k x (G + 2), dataset-major.
        """
        weights = _check_weight_count(weights, self.k, self.groups)
        if self.k == 0:
            self.live.copy_(self.base)
            return
        weights = check_weights(self.method, weights)
        rows = _group_count(self.groups)
        columns = [tuple(weights[i * rows + j] for i in range(self.k)) for j in range(rows)]
        self._wmat.copy_(torch.tensor(weights, dtype=self._wmat.dtype).view(self.k, rows).t())
        # Adjacent runs whose groups carry the same weights merge as one run, so equal
        # weights across groups compute exactly the global merge (and in fewer calls).
        runs: list[list[int]] = []
        for start, end, group in self.segments:
            if runs and runs[-1][1] == start and columns[runs[-1][2]] == columns[group]:
                runs[-1][1] = end
            else:
                runs.append([start, end, group])
        for start, end, group in runs:
            combine(
                self.base[start:end],
                self.vectors[:, start:end],
                self._wmat[group],
                self.method,
                self.live[start:end],
                self._scratch,
            )

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put another checkpoint of the same architecture into the live weights."""
        seen = set()
        for name, tensor in state.items():
            if name not in self.slices:
                raise MergeError(f"tensor '{name}' is not a parameter of the base model")
            offset, n, shape = self.slices[name]
            if tuple(tensor.shape) != tuple(shape):
                raise MergeError(f"tensor '{name}' has shape {tuple(tensor.shape)}, base {shape}")
            self.live[offset : offset + n].copy_(tensor.reshape(-1))
            seen.add(offset)
        if len(seen) != len({o for o, _, _ in self.slices.values()}):
            raise MergeError("the checkpoint does not cover every parameter of the base model")


class LazyTensors(Mapping):
    """A safetensors file as a read-only mapping that reads a tensor only when asked."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._file = safe_open(str(path), framework="pt")
        except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
            raise VectorError(f"{path}: cannot be read as safetensors ({exc})") from exc
        self._names = list(self._file.keys())  # noqa: SIM118
        self._known = set(self._names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._known:
            raise KeyError(name)
        return self._file.get_tensor(name)

    def __contains__(self, name: object) -> bool:  # without reading the tensor
        return name in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _pick(
    vector: Mapping[str, torch.Tensor], aliases: list[str], index: int
) -> tuple[str, torch.Tensor]:
    """(the name the vector stores the parameter under, its tensor).

    Looked up with [] alone: `in` on a plain Mapping reads the tensor a second time.
    """
    for alias in aliases:
        try:
            return alias, vector[alias]
        except KeyError:
            continue
    raise VectorError(f"vector {index} has no tensor for parameter '{aliases[0]}'")


def _check_groups(groups: int | None) -> int | None:
    if groups is None:
        return None
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise MergeError(f"groups must be None or a whole number >= 1, got {groups!r}")
    return groups


def _group_count(groups: int | None) -> int:
    """Weights per vector: 1, or embed + G layer groups + head."""
    return 1 if groups is None else groups + 2


def _check_names(names: Sequence[str] | None, k: int) -> list[str]:
    if names is None:
        return [f"vector{i}" for i in range(k)]
    names = list(names)
    if len(names) != k or not all(isinstance(n, str) for n in names):
        raise MergeError(f"names must be {k} dataset names, one per vector, got {names!r}")
    return names


def _check_weight_count(weights: Sequence[float], k: int, groups: int | None) -> list:
    weights = list(weights)
    if groups is None:
        if len(weights) != k:
            raise MergeError(f"{len(weights)} weights given for {k} vectors")
        return weights
    rows = _group_count(groups)
    if len(weights) != k * rows:
        raise MergeError(
            f"{len(weights)} weights given, expected {k * rows}: {k} vectors x {rows} block "
            f"groups ({', '.join(group_names(groups))}), dataset-major (all of the first "
            "vector's groups, then the next vector's)"
        )
    return weights


def merge_tensor(
    base: torch.Tensor,
    stacked: torch.Tensor,
    weights: torch.Tensor,
    method: str = "linear",
    scratch: Scratch | None = None,
) -> torch.Tensor:
    """One tensor of the merge, computed in float32, in the base's dtype.

    `stacked`: the k prepared vectors of this tensor; `weights`: their k weights.
    """
    flat = torch.empty(base.numel(), dtype=torch.float32)
    combine(
        base.reshape(-1).to(torch.float32),
        stacked.reshape(stacked.shape[0], -1).to(torch.float32),
        weights.to(torch.float32),
        method,
        flat,
        scratch,
    )
    return flat.view(base.shape).to(base.dtype)


def merge_to_dir(
    base_dir: Path,
    vector_paths: Sequence[Path],
    weights: Sequence[float],
    out_dir: Path,
    side_files: Sequence[Path] = (),
    metadata: dict | None = None,
    *,
    method: str = "linear",
    density: float = 1.0,
    dare_seed: int = 0,
    groups: int | None = None,
    names: Sequence[str] | None = None,
) -> None:
    """Stream the composite tensor by tensor into an HF model directory (atomic swap).

    `side_files`: copied beside the weights (the tokenizer's files, so the directory
    stands alone). `method` ... `names`: as for `ResidentMerge`, with the same weight
    layout, so the directory holds the very model the evaluator scored.
    """
    check_method(method, density)
    groups = _check_groups(groups)
    names = _check_names(names, len(vector_paths))
    floats = check_weights(method, _check_weight_count(weights, len(vector_paths), groups))
    rows = _group_count(groups)
    wmat = torch.tensor(floats, dtype=torch.float32).view(len(vector_paths), rows).t()
    wmat = wmat.contiguous()
    base_index = tensor_index(base_dir)
    num_layers = count_layers(base_index)
    scratch = Scratch(method, len(vector_paths), MIX_CHUNK, torch.float32, "cpu", torch.float32)
    out: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        vec_handles = [stack.enter_context(safe_open(str(p), framework="pt")) for p in vector_paths]
        base_handles: dict[Path, object] = {}
        for name, path in sorted(base_index.items()):
            if path not in base_handles:
                base_handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            base = base_handles[path].get_tensor(name)
            stacked = []
            for i, (vpath, handle) in enumerate(zip(vector_paths, vec_handles, strict=True)):
                if name not in handle.keys():  # noqa: SIM118
                    raise MergeError(f"{vpath}: no tensor '{name}'; re-run the vectors stage")
                tensor = handle.get_tensor(name)
                if not torch.isfinite(tensor).all():
                    raise MergeError(
                        f"{vpath}: tensor '{name}' has NaN or Inf; re-run `dem-ray vectors "
                        "CONFIG --force` (and the finetune stage if the fine-tune diverged)"
                    )
                stacked.append(prepare(tensor, method, density, dare_seed, names[i], name))
            group = 0 if groups is None else block_of(name, num_layers, groups)
            out[name] = merge_tensor(base, torch.stack(stacked), wmat[group], method, scratch)
    record = {"weights": [float(x) for x in weights], "method": method,
              "density": float(density), "dare_seed": dare_seed, "groups": groups}  # fmt: skip
    with atomic_dir(out_dir) as tmp:
        save_tensors(out, tmp / "model.safetensors", {"format": "pt", **(metadata or {})})
        for path in [*(Path(base_dir) / n for n in MODEL_SIDE_FILES), *side_files]:
            if path.exists():
                shutil.copy2(path, tmp / path.name)
        (tmp / "dem_ray_merge.json").write_text(
            json.dumps({**record, **(metadata or {})}, indent=2)
        )
