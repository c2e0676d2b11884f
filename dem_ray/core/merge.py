"""theta = theta_0 + sum_i w_i v_i: resident in a live model, and streamed to disk.

`ResidentMerge` re-points every parameter of a live model at a view into one flat
buffer, and keeps theta_0 (in the model's dtype) and the stacked vectors as flat
buffers beside it (one set of buffers per device, for a model spread over GPUs). A
candidate is then one pass of `merge_methods.combine` over all parameters, chunk by
chunk through reused float32 scratch, written straight into the model's weights: no
allocation, no disk, no model re-creation. Pure torch.

`merge_to_dir` runs the same `combine` on the same inputs (theta_0 as stored, the
vectors rounded to the evaluators' `vector_dtype`), so the directory it writes holds,
bit for bit, the weights the search scored. It streams: the shards are planned from
the base's safetensors headers, and each tensor is read, merged and appended to its
shard file part by part, so the composite is never whole in memory.

Other merge methods (ties, DARE; `merge_methods`) and per-block coefficients (one
weight per dataset and block group; `blocks`) use the same buffers: the vectors are
prepared once when read, and a candidate combines them run by run.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
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
    float32_weights,
    prepare,
)
from dem_ray.core.safetensors_io import (
    INDEX_NAME,
    SafetensorsFormatError,
    TensorReader,
    TensorWriter,
    plan_shards,
)
from dem_ray.core.sizes import parse_size
from dem_ray.core.vectors import DTYPES, VectorError, tensor_index

log = logging.getLogger(__name__)

MODEL_SIDE_FILES = ("config.json", "generation_config.json")
# Elements per chunk of `combine`'s float32 scratch: on a CPU, small enough that the
# chunk's passes stay in cache; on a GPU, large enough that kernel launches do not count.
MIX_CHUNK = 1 << 18
CUDA_CHUNK = 1 << 22
# Elements per read of `merge_to_dir`: each tensor is read, merged and written in parts.
STREAM_CHUNK = 1 << 20
DEFAULT_SHARD_SIZE = "5GB"  # `merge.max_shard_size`'s default


def unique_parameters(model: torch.nn.Module) -> dict[str, list[str]]:
    """First name of each distinct parameter -> all its names (tied weights share one)."""
    by_id: dict[int, list[str]] = {}
    for name, param in model.state_dict(keep_vars=True).items():
        if isinstance(param, torch.nn.Parameter):
            by_id.setdefault(id(param), []).append(name)
    return {names[0]: names for names in by_id.values()}


@dataclass
class MergePart:
    """One device's share of a `ResidentMerge`: flat buffers of only its parameters.

    `segments`: maximal runs of the flat buffers in one block group, (start, end, group
    index); `scratch`: `combine`'s float32 buffers on this device (None without vectors).
    """

    key: Hashable
    device: torch.device
    live: torch.Tensor
    vectors: torch.Tensor
    base: torch.Tensor | None = None
    segments: list[tuple[int, int, int]] = field(default_factory=list)
    scratch: Scratch | None = None


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
        buffer_of: Callable[[str], Hashable] | Mapping[str, Hashable] | None = None,
    ) -> None:
        """`vectors` may be lazy mappings (e.g. `LazyTensors`): each tensor is read once.

        With no vectors the live model can still score checkpoints (`load_state`).
        `method`, `density`, `dare_seed`: see `merge_methods`; the prepared vectors
        replace the raw ones. `groups`: None for one weight per vector, G for one weight
        per vector and block group (`blocks.group_names(G)`), dataset-major. `names`:
        the vectors' dataset names, which seed DARE (default `vector0`, `vector1`, ...).

        The flat live, base, vectors and scratch buffers are kept per part (`parts`): by
        default one part per device the parameters are on, so a model spread over GPUs
        (`partition.evaluator_device_map`) holds and merges each GPU's parameters on that
        GPU. `buffer_of` (parameter name -> part key, a callable or a mapping) forces
        the parts instead, so tests can split a CPU model; a part's parameters must share
        one device. Every part uses the first parameter's dtype, as one buffer did.
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
        dtype = next(iter(params.values())).dtype
        keys = {name: _part_key(buffer_of, name, params[name]) for name in uniques}
        self.parts: list[MergePart] = []
        index: dict[Hashable, int] = {}
        totals: dict[Hashable, int] = {}
        for name, key in keys.items():
            if key not in index:
                index[key] = len(index)
                totals[key] = 0
            totals[key] += params[name].numel()
        for key in index:
            devices = {params[n].device for n in uniques if keys[n] == key}
            if len(devices) != 1:
                raise MergeError(
                    f"buffer part {key!r} holds parameters on {len(devices)} devices "
                    f"({', '.join(sorted(map(str, devices)))}); a part's must share one"
                )
            device = devices.pop()
            live = torch.empty(totals[key], dtype=dtype, device=device)
            stacked = torch.empty((self.k, totals[key]), dtype=DTYPES[vector_dtype], device=device)
            self.parts.append(MergePart(key, device, live, stacked))
        # Parameter name -> (offset, numel, shape) in its part's buffers, and the part.
        self.slices: dict[str, tuple[int, int, torch.Size]] = {}
        self.part_of: dict[str, int] = {}
        offsets = [0] * len(self.parts)
        for name, aliases in uniques.items():  # in the model's order, as before
            param = params[name]
            i = index[keys[name]]
            part, offset, n = self.parts[i], offsets[i], param.numel()
            view = part.live[offset : offset + n]
            view.copy_(param.data.reshape(-1))
            stored = name  # the name the vector files store it under (the first vector's)
            for j, vector in enumerate(vectors):
                alias, tensor = _pick(vector, aliases, j)
                if j == 0:
                    stored = alias
                _check_vector_tensor(vector, j, aliases[0], tensor, param.shape)
                tensor = prepare(tensor, method, density, dare_seed, self.names[j], alias)
                part.vectors[j, offset : offset + n].copy_(tensor.reshape(-1))
            param.data = view.view(param.shape)
            for alias in aliases:
                self.slices[alias] = (offset, n, param.shape)
                self.part_of[alias] = i
            group = 0 if self.groups is None else block_of(stored, num_layers, self.groups)
            segments = part.segments
            if segments and segments[-1][2] == group and segments[-1][1] == offset:
                segments[-1] = (segments[-1][0], offset + n, group)
            elif n:
                segments.append((offset, offset + n, group))
            offsets[i] = offset + n
        for part in self.parts:
            part.base = part.live.clone()  # theta_0 in the model's dtype, upcast per chunk
            # combine()'s float32 scratch, made once: apply() allocates nothing per candidate.
            if self.k:
                size = part.live.numel()
                chunk = min(CUDA_CHUNK if part.device.type == "cuda" else MIX_CHUNK, max(size, 1))
                part.scratch = Scratch(self.method, self.k, chunk, dtype, part.device,
                                       part.vectors.dtype)  # fmt: skip
        # One row of weights per block group (a single row without groups), as float32: what
        # the last apply() multiplied by.
        self._wmat = torch.zeros((_group_count(self.groups), self.k), dtype=torch.float32)
        self._weights = self._wmat[0]

    # With one part (every parameter on one device), its buffers as they always were.
    @property
    def live(self) -> torch.Tensor:
        return self._single("live").live

    @property
    def base(self) -> torch.Tensor:
        return self._single("base").base

    @property
    def vectors(self) -> torch.Tensor:
        return self._single("vectors").vectors

    @property
    def segments(self) -> list[tuple[int, int, int]]:
        return self._single("segments").segments

    @property
    def _scratch(self) -> Scratch | None:
        return self._single("_scratch").scratch

    @property
    def devices(self) -> list[torch.device]:
        """The devices the parts are on (each once), e.g. to synchronize them all."""
        return list(dict.fromkeys(part.device for part in self.parts))

    def _single(self, what: str) -> MergePart:
        if len(self.parts) != 1:
            raise MergeError(
                f"ResidentMerge.{what}: the buffers are in {len(self.parts)} parts, one per "
                "device; use .parts[i] (and .part_of[name] with .slices[name])"
            )
        return self.parts[0]

    def apply(self, weights: Sequence[float]) -> None:
        """Set the live model to the method's merge of theta_0 and the vectors with `weights`.

        Without groups: one weight per vector. With G groups: k x (G + 2), dataset-major.
        Each part is combined on its own device; an element's result depends on its own
        inputs only, so it is the same however the parameters are split into parts.
        """
        weights = _check_weight_count(weights, self.k, self.groups)
        if self.k == 0:
            for part in self.parts:
                part.live.copy_(part.base)
            return
        weights = check_weights(self.method, weights)
        columns = _columns(weights, self.k, self.groups)
        self._wmat.copy_(torch.tensor(columns, dtype=torch.float32))
        for part in self.parts:
            for start, end, group in _runs(part.segments, columns):
                combine(
                    part.base[start:end],
                    part.vectors[:, start:end],
                    columns[group],
                    self.method,
                    part.live[start:end],
                    part.scratch,
                )

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put another checkpoint of the same architecture into the live weights (each
        tensor copied to its parameter's device)."""
        seen = set()
        for name, tensor in state.items():
            if name not in self.slices:
                raise MergeError(f"tensor '{name}' is not a parameter of the base model")
            offset, n, shape = self.slices[name]
            if tuple(tensor.shape) != tuple(shape):
                raise MergeError(f"tensor '{name}' has shape {tuple(tensor.shape)}, base {shape}")
            part = self.part_of[name]
            self.parts[part].live[offset : offset + n].copy_(tensor.reshape(-1))
            seen.add((part, offset))
        if len(seen) != len({(self.part_of[a], o) for a, (o, _, _) in self.slices.items()}):
            raise MergeError("the checkpoint does not cover every parameter of the base model")


def _part_key(
    buffer_of: Callable[[str], Hashable] | Mapping[str, Hashable] | None,
    name: str,
    param: torch.nn.Parameter,
) -> Hashable:
    """Which part a parameter's buffers go in: its device, unless `buffer_of` says."""
    if buffer_of is None:
        return param.device
    if isinstance(buffer_of, Mapping):
        if name not in buffer_of:
            raise MergeError(f"buffer_of gives no part for parameter '{name}'")
        return buffer_of[name]
    return buffer_of(name)


def _check_vector_tensor(
    vector: Mapping[str, torch.Tensor], index: int, name: str, tensor: torch.Tensor, shape
) -> None:
    if not torch.isfinite(tensor).all():
        raise VectorError(
            f"{getattr(vector, 'path', f'vector {index}')}: tensor '{name}' has "
            "NaN or Inf; re-run `dem-ray vectors CONFIG --force` (and the finetune "
            "stage if the fine-tune itself diverged)"
        )
    if tuple(tensor.shape) != tuple(shape):
        raise VectorError(
            f"vector {index}: tensor '{name}' has shape {tuple(tensor.shape)}, "
            f"the model {tuple(shape)}"
        )


def _runs(
    segments: list[tuple[int, int, int]], columns: list[tuple[float, ...]]
) -> list[list[int]]:
    """Adjacent segments whose groups carry the same weights, merged as one run (fewer
    calls; the result is the same either way: combine's elements do not depend on runs)."""
    runs: list[list[int]] = []
    for start, end, group in segments:
        if runs and runs[-1][1] == start and columns[runs[-1][2]] == columns[group]:
            runs[-1][1] = end
        else:
            runs.append([start, end, group])
    return runs


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


def _columns(weights: Sequence[float], k: int, groups: int | None) -> list[tuple[float, ...]]:
    """Per block group (one without groups), the k weights as float32, from the
    dataset-major list."""
    rows = _group_count(groups)
    return [tuple(float32_weights([weights[i * rows + j] for i in range(k)])) for j in range(rows)]


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
    weights: torch.Tensor | Sequence[float],
    method: str = "linear",
    scratch: Scratch | None = None,
) -> torch.Tensor:
    """One tensor of the merge, in the base's dtype (`combine`'s float32 arithmetic).

    `stacked`: the k prepared vectors of this tensor; `weights`: their k weights.
    """
    out = torch.empty(base.numel(), dtype=base.dtype)
    combine(base.reshape(-1), stacked.reshape(stacked.shape[0], -1), weights, method, out, scratch)
    return out.view(base.shape)


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
    vector_dtype: str = "float32",
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
) -> None:
    """Stream the composite tensor by tensor into an HF model directory (atomic swap).

    The weight files are planned from the base's safetensors headers (names, dtypes,
    shapes): one `model.safetensors` when everything fits in `max_shard_size` (bytes, or
    "5GB" etc.), else HF shards `model-0000i-of-0000N.safetensors` and their
    `model.safetensors.index.json`. Each tensor is then merged in parts of
    `STREAM_CHUNK` elements (read with plain reads, combined, appended to its shard), so
    the process holds a few parts, never the composite; ties and DARE at density < 1
    read each vector's tensor whole, as their trim and mask need it.

    `side_files`: copied beside the weights (the tokenizer's files, so the directory
    stands alone). `method` ... `names`: as for `ResidentMerge`, with the same weight
    layout; `vector_dtype`: the evaluators' (`evaluator.vector_dtype`), which the vectors
    are rounded to as the evaluators hold them. So the directory holds, bit for bit, the
    model the evaluator scored.
    """
    check_method(method, density)
    groups = _check_groups(groups)
    k = len(vector_paths)
    names = _check_names(names, k)
    floats = check_weights(method, _check_weight_count(weights, k, groups))
    columns = _columns(floats, k, groups)
    out = output_settings(base_dir, weights, metadata, method, density, dare_seed, groups,
                          vector_dtype, max_shard_size)  # fmt: skip
    vdtype, base_index, num_layers = out.vector_dtype, out.base_index, out.num_layers
    with ExitStack() as stack:
        readers, specs, vectors = open_inputs(stack, base_index, vector_paths)
        for vpath, reader in zip(vector_paths, vectors, strict=True):
            for name, (_, shape) in specs.items():
                if name not in reader.header:
                    raise MergeError(f"{vpath}: no tensor '{name}'; re-run the vectors stage")
                if reader.spec(name)[1] != shape:
                    raise MergeError(
                        f"{vpath}: tensor '{name}' has shape {reader.spec(name)[1]}, the base "
                        f"{shape}; re-run the vectors stage"
                    )
        plan = plan_shards([(name, *spec) for name, spec in specs.items()], out.shard_bytes)
        largest = max((math.prod(shape) for _, shape in specs.values()), default=1)
        parts = _Parts(k, vdtype, max(1, min(STREAM_CHUNK, largest)))
        scratch = Scratch(method, k, max(1, min(MIX_CHUNK, largest)), torch.float32, "cpu", vdtype)
        with atomic_dir(out_dir) as tmp:
            for filename, shard in plan.items():
                with TensorWriter(tmp / filename, shard, out.tensor_meta) as writer:
                    for name, dtype, shape in shard:
                        group = 0 if groups is None else block_of(name, num_layers, groups)
                        try:
                            _merge_into(writer, name, dtype, math.prod(shape),
                                        readers[base_index[name]], vectors, vector_paths,
                                        columns[group], method, density, dare_seed, names,
                                        parts, scratch)  # fmt: skip
                        except SafetensorsFormatError as exc:
                            raise MergeError(str(exc)) from exc
            finish_dir(tmp, plan, specs, base_dir, side_files, out.record)


@dataclass(frozen=True)
class OutputSettings:
    """What every merged-directory writer derives from its arguments before reading."""

    vector_dtype: torch.dtype
    shard_bytes: int
    base_index: dict[str, Path]
    num_layers: int
    tensor_meta: dict[str, str]  # each weight file's safetensors metadata
    record: dict  # dem_ray_merge.json


def output_settings(
    base_dir: Path,
    weights: Sequence[float],
    metadata: dict | None,
    method: str,
    density: float,
    dare_seed: int,
    groups: int | None,
    vector_dtype: str,
    max_shard_size: int | str,
) -> OutputSettings:
    """The checked settings of a merged directory (`merge_to_dir`, `merge_lowrank_to_dir`)."""
    if vector_dtype not in DTYPES:
        raise MergeError(f"vector_dtype {vector_dtype!r} is not one of {', '.join(DTYPES)}")
    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as exc:
        raise MergeError(f"max_shard_size: {exc}") from None
    base_index = tensor_index(base_dir)
    tensor_meta = {
        key: value if isinstance(value, str) else json.dumps(value)
        for key, value in {"format": "pt", **(metadata or {})}.items()
    }
    record = {"weights": [float(x) for x in weights], "method": method,
              "density": float(density), "dare_seed": dare_seed, "groups": groups}  # fmt: skip
    if vector_dtype != "float32":
        record["vector_dtype"] = vector_dtype
    return OutputSettings(DTYPES[vector_dtype], shard_bytes, base_index,
                          count_layers(base_index), tensor_meta,
                          {**record, **(metadata or {})})  # fmt: skip


def open_inputs(
    stack: ExitStack, base_index: Mapping[str, Path], vector_paths: Sequence[Path]
) -> tuple[dict[Path, TensorReader], dict[str, tuple], list[TensorReader]]:
    """Readers of the base's files, the base's tensor specs by name, the vectors' readers."""
    try:
        readers: dict[Path, TensorReader] = {}
        for path in sorted(set(base_index.values())):
            readers[path] = stack.enter_context(TensorReader(path))
        specs = {name: readers[base_index[name]].spec(name) for name in sorted(base_index)}
        vectors = [stack.enter_context(TensorReader(Path(p))) for p in vector_paths]
    except SafetensorsFormatError as exc:
        raise MergeError(str(exc)) from exc
    return readers, specs, vectors


def finish_dir(
    tmp: Path,
    plan: Mapping[str, list],
    specs: Mapping[str, tuple],
    base_dir: Path,
    side_files: Sequence[Path],
    record: dict,
) -> None:
    """The rest of a merged directory beside its weight files: the shard index (when
    there are several), the model's and the caller's side files, `dem_ray_merge.json`."""
    if len(plan) > 1:
        index = {
            "metadata": {"total_size": sum(_nbytes(s) for s in specs.values())},
            "weight_map": {n: f for f, shard in plan.items() for n, _, _ in shard},
        }
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for path in [*(Path(base_dir) / n for n in MODEL_SIDE_FILES), *side_files]:
        if path.exists():
            shutil.copy2(path, tmp / path.name)
    (tmp / "dem_ray_merge.json").write_text(json.dumps(record, indent=2))


class _Parts:
    """merge_to_dir's reusable buffers of `size` elements (a part), by use and dtype."""

    def __init__(self, k: int, vector_dtype: torch.dtype, size: int) -> None:
        self.k = k
        self.vector_dtype = vector_dtype
        self.size = size
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, use: str, dtype: torch.dtype) -> torch.Tensor:
        if (use, dtype) not in self._buffers:
            shape = (self.k, self.size) if use == "vectors" else (self.size,)
            self._buffers[use, dtype] = torch.empty(shape, dtype=dtype)
        return self._buffers[use, dtype]


def _merge_into(
    writer: TensorWriter,
    name: str,
    dtype: torch.dtype,
    numel: int,
    base: TensorReader,
    vectors: list[TensorReader],
    vector_paths: Sequence[Path],
    weights: Sequence[float],
    method: str,
    density: float,
    dare_seed: int,
    names: list[str],
    parts: _Parts,
    scratch: Scratch,
) -> None:
    """Merge tensor `name` part by part and append each part to `writer`."""
    k = len(vectors)
    if numel == 0:
        writer.append(name, torch.empty(0, dtype=dtype))
        return
    whole = None  # the prepared vectors, where the method needs each tensor whole
    if METHODS[method].prepare != "none" and density != 1:
        whole = torch.empty((k, numel), dtype=parts.vector_dtype)
        for i, reader in enumerate(vectors):
            tensor = reader.read(name)
            _check_finite(tensor, vector_paths[i], name)
            prepared = prepare(tensor, method, density, dare_seed, names[i], name)
            whole[i].copy_(prepared.reshape(-1))
            del tensor, prepared
    for start in range(0, numel, parts.size):
        stop = min(start + parts.size, numel)
        theta = base.read_range(name, start, stop, out=parts.get("base", dtype))
        if whole is not None:
            stacked = whole[:, start:stop]
        else:
            stacked = parts.get("vectors", parts.vector_dtype)[:, : stop - start]
            for i, reader in enumerate(vectors):
                stored = reader.spec(name)[0]
                if stored == parts.vector_dtype:  # read straight into its row
                    part = reader.read_range(name, start, stop, out=stacked[i])
                else:  # rounded as the evaluators hold it (`copy_`, as ResidentMerge does)
                    part = reader.read_range(name, start, stop, out=parts.get("read", stored))
                    stacked[i].copy_(part)
                _check_finite(part, vector_paths[i], name)
        out = parts.get("out", dtype)[: stop - start]
        combine(theta, stacked, weights, method, out, scratch)
        writer.append(name, out)


def _check_finite(tensor: torch.Tensor, path: Path, name: str) -> None:
    if not torch.isfinite(tensor).all():
        raise MergeError(
            f"{path}: tensor '{name}' has NaN or Inf; re-run `dem-ray vectors CONFIG --force` "
            "(and the finetune stage if the fine-tune diverged)"
        )


def _nbytes(spec: tuple[torch.dtype, tuple[int, ...]]) -> int:
    dtype, shape = spec
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()
