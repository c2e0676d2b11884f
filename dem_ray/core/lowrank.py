"""Low-rank distribution vectors: a LoRA fine-tune's v = B A kept as its factors.

`finetune.method: lora` saves PEFT adapters, whose change to a weight W (d_out x d_in)
is `scale * B @ A` with A (r x d_in) and B (d_out x r). A dense vector of it would cost
a whole model per dataset on disk and on every evaluator; its factors cost
`r x (d_in + d_out)` per adapted weight. So the vectors stage writes the factors
(`lora_vector`: `<param>::A` and `<param>::B`, the scale folded into B), and the
evaluators and `merge` combine them without ever making a dense vector:

    theta = theta_0 + sum_i w_i B_i A_i = theta_0 + (B_cat * w_columns) @ A_cat

one GEMM per block of output rows over the k vectors' concatenated factors
(`lowrank_update`). The evaluators (`LowRankMerge`), the merged directory
(`merge_lowrank_to_dir`) and a fine-tune scored on its own (`AdapterState`) all call
that one function with the same row blocks, so on one kind of device the merged model
is, bit for bit, the model the search scored. Parameters no adapter touches are never
rewritten. Pure torch and safetensors: nothing here knows about Ray.

Only `linear` merges: ties and DARE act on a vector's entries one by one, which low-rank
vectors do not hold.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from dem_ray.core.atomic import atomic_dir
from dem_ray.core.blocks import block_of, count_layers
from dem_ray.core.merge import (
    DEFAULT_SHARD_SIZE,
    STREAM_CHUNK,
    _check_groups,
    _check_names,
    _check_weight_count,
    _columns,
    _group_count,
    finish_dir,
    open_inputs,
    output_settings,
    unique_parameters,
)
from dem_ray.core.merge_methods import MergeError, check_method, check_weights
from dem_ray.core.safetensors_io import (
    SafetensorsFormatError,
    TensorReader,
    TensorWriter,
    plan_shards,
)
from dem_ray.core.vectors import DTYPES, VectorError, save_tensors, tensor_index

FORMAT = "lowrank"  # the vector file's `format` metadata
SEPARATOR = "::"  # `<param>::A`, `<param>::B`
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Output rows per GEMM of `lowrank_update`. The same in every caller on a CPU, so the
# evaluators and `merge` run the same GEMMs (same shapes, same blocking) and agree to the
# bit; on a GPU, larger blocks keep kernel launches from counting.
ROWS = 256
CUDA_ROWS = 8192
# PEFT's saved names: `base_model.model.<module>.lora_A.weight` (the adapter name dropped).
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")

# adapter_config.json keys whose non-default values make the change to a weight
# something other than scale * B @ A (or touch tensors other than the adapted weights).
_REFUSED = (
    ("use_dora", "DoRA rescales each weight's columns by a trained magnitude vector"),
    ("modules_to_save", "whole modules were trained beside the adapters"),
    ("rank_pattern", "modules have their own rank"),
    ("alpha_pattern", "modules have their own alpha"),
    ("lora_bias", "lora_B has a trained bias"),
    ("trainable_token_indices", "token embeddings were trained beside the adapters"),
    ("target_parameters", "parameters (not modules) were adapted"),
    ("layer_replication", "layers were replicated"),
    ("use_qalora", "QALoRA pools its inputs"),
    ("alora_invocation_tokens", "activated LoRA acts only after its invocation tokens"),
)


def is_adapter_dir(path: Path) -> bool:
    """A PEFT adapter directory (what `finetune.method: lora` writes), not a model."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def factor_names(param: str) -> tuple[str, str]:
    """The vector file's names of parameter `param`'s factors A and B."""
    return f"{param}{SEPARATOR}A", f"{param}{SEPARATOR}B"


def is_lowrank(vector_path: Path) -> bool:
    """Whether a vector file holds low-rank factors (from its header alone)."""
    try:
        with TensorReader(Path(vector_path)) as reader:
            return reader.metadata.get("format") == FORMAT
    except (OSError, SafetensorsFormatError) as exc:
        raise VectorError(f"{vector_path}: cannot be read as a vector file ({exc})") from exc


def lowrank_vectors(vector_paths: Sequence[Path]) -> bool:
    """True when every vector is low-rank, False when none is; a mixture cannot be merged
    by either kernel, so it is an error naming one file of each kind."""
    kinds = {Path(p): is_lowrank(p) for p in vector_paths}
    if len(set(kinds.values())) > 1:
        low = next(p for p, k in kinds.items() if k)
        dense = next(p for p, k in kinds.items() if not k)
        raise VectorError(
            f"{low} is a low-rank vector (a LoRA fine-tune) but {dense} is dense: every "
            "fine-tune of a run must use the same finetune.method; re-run the finetune and "
            "vectors stages with --force"
        )
    return bool(kinds) and all(kinds.values())


# ---- adapters -> factors ---------------------------------------------------------------------
def _base_specs(base_dir: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Every base tensor's (dtype, shape), from the safetensors headers."""
    specs = {}
    for name, path in tensor_index(base_dir).items():
        with TensorReader(path) as reader:
            specs[name] = reader.spec(name)
    return specs


def _adapter_settings(adapter_dir: Path) -> dict:
    """rank, alpha, scale and fan_in_fan_out of a plain LoRA adapter, or a VectorError
    naming the config file and the key that makes it something else."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VectorError(f"{path}: not a readable adapter config ({exc})") from exc
    if not isinstance(config, dict):
        raise VectorError(f"{path}: not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise VectorError(
            f"{path}: key 'peft_type' is {config.get('peft_type')!r}; only LoRA adapters "
            "make low-rank vectors"
        )
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise VectorError(
            f"{path}: key 'bias' is {bias!r}: biases were trained beside the adapters, which "
            "a low-rank vector cannot hold; fine-tune with bias 'none' (finetune.method: lora "
            "does) or use finetune.method: full"
        )
    for key, why in _REFUSED:
        value = config.get(key)
        if value:
            raise VectorError(
                f"{path}: key '{key}' is {value!r}: {why}, so the fine-tune's change is not "
                "scale * B @ A; dem-ray makes low-rank vectors of plain LoRA adapters only "
                "(as finetune.method: lora trains them), or use finetune.method: full"
            )
    r, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise VectorError(f"{path}: key 'r' is {r!r}, not a rank >= 1")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise VectorError(f"{path}: key 'lora_alpha' is {alpha!r}, not a number")
    rslora = bool(config.get("use_rslora", False))
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    return {"r": r, "alpha": alpha, "use_rslora": rslora, "scale": scale,
            "fan_in_fan_out": bool(config.get("fan_in_fan_out", False))}  # fmt: skip


def _adapter_factors(
    base_dir: Path,
    adapter_dir: Path,
    base_specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(settings, base parameter -> (A, B) in float32, shaped for `B @ A` to be the
    parameter's change: scale folded into B, fan_in_fan_out's transpose applied)."""
    settings = _adapter_settings(adapter_dir)
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        pickles = sorted(p.name for p in Path(adapter_dir).glob("adapter_model.*"))
        what = f"only {', '.join(pickles)}, which dem-ray never loads (pickles can run code)"
        raise VectorError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}" + (f"; {what}" if pickles else ""))
    r, fan = settings["r"], settings["fan_in_fan_out"]
    raw: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    try:
        with TensorReader(path) as reader:
            for key in reader.names():
                match = _PEFT_KEY.match(key)
                if match is None:
                    raise VectorError(
                        f"{path}: tensor '{key}' is not a LoRA factor (base_model.model.<module>"
                        ".lora_A/lora_B.weight): the adapter trained more than low-rank factors "
                        "of linear layers, which a low-rank vector cannot hold"
                    )
                tensor = reader.read(key)
                if not torch.isfinite(tensor).all():
                    raise VectorError(
                        f"{path}: tensor '{key}' has NaN or Inf; the fine-tune diverged (lower "
                        "finetune.learning_rate) - re-run the finetune stage"
                    )
                raw.setdefault(match["module"], {})[match["factor"]] = (key, tensor)
    except (OSError, SafetensorsFormatError) as exc:
        raise VectorError(f"{path}: cannot be read as safetensors ({exc})") from exc
    factors = {}
    for module in sorted(raw):
        pair = raw[module]
        if set(pair) != {"A", "B"}:
            (key, _) = next(iter(pair.values()))
            missing = "lora_B" if "A" in pair else "lora_A"
            raise VectorError(f"{path}: tensor '{key}' has no {missing} beside it")
        (a_key, a), (b_key, b) = pair["A"], pair["B"]
        param = f"{module}.weight"
        if param not in base_specs:
            raise VectorError(
                f"{path}: tensor '{a_key}' adapts '{param}', which the base {base_dir} does not "
                "have; the adapter was trained on another base model"
            )
        shape = base_specs[param][1]
        want = (a.shape[1], b.shape[0]) if fan else (b.shape[0], a.shape[1])
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r or want != shape:
            raise VectorError(
                f"{path}: tensors '{a_key}' {list(a.shape)} and '{b_key}' {list(b.shape)} "
                f"(rank {r}) do not make a change of '{param}' {list(shape)} in the base "
                f"{base_dir}; the adapter was trained on another base model"
            )
        a, b = a.to(torch.float32), b.to(torch.float32)
        if fan:  # W is (d_in, d_out): its change is (B A)^T = A^T B^T
            a, b = b.t(), a.t()
        b = b * settings["scale"]
        if not torch.isfinite(b).all():
            raise VectorError(f"{path}: tensor '{b_key}' times the scale overflows float32")
        factors[param] = (a.contiguous(), b.contiguous())
    if not factors:
        raise VectorError(f"{path}: no LoRA factors in it")
    return settings, factors


def lora_vector(
    base_dir: Path,
    adapter_dir: Path,
    out_path: Path,
    dtype: str = "float32",
    names: tuple[str, str] | None = None,
) -> None:
    """Write a PEFT adapter's low-rank vector to `out_path` (one safetensors file, atomic).

    Per adapted base tensor `<param>` (the base's own name): `<param>::A` (r x d_in) and
    `<param>::B` (d_out x r, the scale alpha/r or alpha/sqrt(r) folded in, in float32),
    stored as `dtype`. The header says `format: lowrank` and keeps the base's tensor names
    and shapes (`base_shapes`), so diagnostics know the whole model without reading it.
    `names`: how the header names base and adapter (default: their paths), as for
    `compute_vector`.
    """
    if dtype not in DTYPES:
        raise VectorError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    specs = _base_specs(base_dir)
    settings, factors = _adapter_factors(base_dir, adapter_dir, specs)
    source, tuned = names or (str(base_dir), str(adapter_dir))
    tensors = {}
    for param, (a, b) in factors.items():
        a_name, b_name = factor_names(param)
        tensors[a_name] = a.to(DTYPES[dtype])
        tensors[b_name] = b.to(DTYPES[dtype])
    metadata = {
        "base": source,
        "finetuned": tuned,
        "dtype": dtype,
        "format": FORMAT,
        "rank": str(settings["r"]),
        "lora_alpha": repr(settings["alpha"]),
        "use_rslora": str(settings["use_rslora"]).lower(),
        "scale": repr(settings["scale"]),
        "base_shapes": {name: list(shape) for name, (_, shape) in sorted(specs.items())},
    }
    save_tensors(tensors, Path(out_path), metadata)


# ---- the one arithmetic ------------------------------------------------------------------------
class LowRankScratch:
    """float32 buffers `lowrank_update` reuses: B_cat * w (rows x K), A_cat upcast (K x
    cols) and the result before its cast (rows x cols), sized for the largest module."""

    def __init__(self, rows: int, k: int, cols: int, device: torch.device | str) -> None:
        self.rows, self.k, self.cols = max(1, rows), max(1, k), max(1, cols)
        self.device = torch.device(device)
        f32 = {"dtype": torch.float32, "device": self.device}
        self.bw = torch.empty(self.rows * self.k, **f32)
        self.a = torch.empty(self.k * self.cols, **f32)
        self.acc = torch.empty(self.rows * self.cols, **f32)

    def fits(self, rows: int, k: int, cols: int) -> bool:
        return rows <= self.rows and k <= self.k and cols <= self.cols

    @property
    def nbytes(self) -> int:
        return 4 * (self.bw.numel() + self.a.numel() + self.acc.numel())


def rows_for(device: torch.device | str) -> int:
    """`lowrank_update`'s row block on `device` (`ROWS` on a CPU, as `merge` uses)."""
    return CUDA_ROWS if torch.device(device).type == "cuda" else ROWS


def lowrank_update(
    base: torch.Tensor,
    a_cat: torch.Tensor,
    b_cat: torch.Tensor,
    column_weights: torch.Tensor,
    out: torch.Tensor,
    scratch: LowRankScratch | None = None,
    rows: int = ROWS,
) -> None:
    """out = (base.float() + (b_cat.float() * column_weights) @ a_cat.float()).to(out.dtype).

    `base` (d_out x d_in, any float dtype), `a_cat` (K x d_in) and `b_cat` (d_out x K):
    the k vectors' factors concatenated, as held (the vector dtype); `column_weights`
    (K,), float32: the weight of the vector each column came from. `rows` output rows at
    a time, each block one GEMM in float32 through `scratch`'s buffers (always those, so
    two callers run the same GEMMs on identically placed inputs): every caller that
    passes the same rows gets the same bits on the same device.
    """
    n_rows, n_cols = base.shape
    k = a_cat.shape[0]
    block = min(rows, n_rows)
    if scratch is None or not scratch.fits(block, k, n_cols):
        scratch = LowRankScratch(block, k, n_cols, base.device)
    a = scratch.a[: k * n_cols].view(k, n_cols)
    a.copy_(a_cat)
    w = column_weights.view(1, k)
    for start in range(0, n_rows, rows):
        stop = min(start + rows, n_rows)
        m = stop - start
        bw = scratch.bw[: m * k].view(m, k)
        torch.mul(b_cat[start:stop], w, out=bw)
        acc = scratch.acc[: m * n_cols].view(m, n_cols)
        torch.mm(bw, a, out=acc)
        acc.add_(base[start:stop])
        out[start:stop].copy_(acc)


def check_lowrank_method(method: str, density: float = 1.0) -> None:
    """Low-rank vectors merge with `linear` only (which ignores `density`, as dense
    vectors do): the others act on a vector's entries one by one."""
    check_method(method, density)
    if method != "linear":
        raise MergeError(
            f"merge method {method!r} needs dense distribution vectors: ties and DARE trim, "
            "elect signs for or drop the entries of each v = B A one by one, and low-rank "
            "vectors (finetune.method: lora) do not hold them; set search.merge_method: "
            "linear, or finetune.method: full"
        )


# ---- low-rank vector files --------------------------------------------------------------------
def _split_key(key: str, where: object) -> tuple[str, str]:
    param, sep, part = key.rpartition(SEPARATOR)
    if not sep or part not in ("A", "B"):
        raise VectorError(
            f"{where}: tensor '{key}' is not a low-rank factor (<param>::A or ::B): a dense "
            "vector among low-rank ones; every fine-tune of a run must use the same "
            "finetune.method"
        )
    return param, part


def _read_factors(
    vector: Mapping[str, torch.Tensor], where: object
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """param -> (A, B) of one low-rank vector (a mapping, read once), checked finite and
    shaped as factors of one rank."""
    keys = list(vector)
    params: dict[str, set[str]] = {}
    for key in keys:
        param, part = _split_key(key, where)
        params.setdefault(param, set()).add(part)
    out = {}
    for param, parts in params.items():
        a_name, b_name = factor_names(param)
        if parts != {"A", "B"}:
            have = a_name if "A" in parts else b_name
            raise VectorError(f"{where}: tensor '{have}' has no other factor beside it")
        a, b = vector[a_name], vector[b_name]
        for name, tensor in ((a_name, a), (b_name, b)):
            if not torch.isfinite(tensor).all():
                raise VectorError(
                    f"{where}: tensor '{name}' has NaN or Inf; re-run `dem-ray vectors CONFIG "
                    "--force` (and the finetune stage if the fine-tune itself diverged)"
                )
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise VectorError(
                f"{where}: tensors '{a_name}' {list(a.shape)} and '{b_name}' {list(b.shape)} "
                "are not factors of one rank; re-run the vectors stage"
            )
        out[param] = (a, b)
    return out


@dataclass
class _Module:
    """One adapted parameter of a `LowRankMerge`."""

    name: str
    param: torch.nn.Parameter
    base: torch.Tensor  # theta_0, the model's dtype, on its device
    a: torch.Tensor  # A_cat (K x d_in), vector dtype
    b: torch.Tensor  # B_cat (d_out x K), vector dtype
    weights: torch.Tensor  # (K,) float32 view into its device's column weights
    device: torch.device


class LowRankMerge:
    """A live model whose adapted weights are rewritten in place for each candidate from
    the vectors' low-rank factors (`ResidentMerge`'s interface, `linear` only)."""

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
        """`vectors`: low-rank vector files as mappings (e.g. `LazyTensors`), each tensor
        read once. Keeps theta_0 of the adapted parameters only (the others are never
        rewritten) and each one's concatenated factors on its own device, in
        `vector_dtype`. `groups`, `names`: as for `ResidentMerge` (a module's weights are
        its block group's); `density`, `dare_seed` are ignored (linear), `buffer_of` too
        (factors always follow their parameter's device)."""
        check_lowrank_method(method, density)
        if vector_dtype not in DTYPES:
            raise MergeError(f"vector_dtype {vector_dtype!r} is not one of {', '.join(DTYPES)}")
        vdtype = DTYPES[vector_dtype]
        self.model = model
        self.k = len(vectors)
        self.method = "linear"
        self.density = float(density)
        self.dare_seed = dare_seed
        self.groups = _check_groups(groups)
        self.names = _check_names(names, self.k)
        params = dict(model.named_parameters(remove_duplicate=False))
        uniques = unique_parameters(model)
        first_of = {alias: first for first, aliases in uniques.items() for alias in aliases}
        num_layers = count_layers(params)
        per_param: dict[str, list[tuple[int, torch.Tensor, torch.Tensor, str]]] = {}
        for i, vector in enumerate(vectors):
            where = getattr(vector, "path", f"vector {i}")
            for stored, (a, b) in _read_factors(vector, where).items():
                if stored not in first_of:
                    raise VectorError(
                        f"{where}: tensor '{factor_names(stored)[0]}' is for '{stored}', which "
                        "is not a parameter of the model; re-run the vectors stage"
                    )
                shape = tuple(params[stored].shape)
                if (b.shape[0], a.shape[1]) != shape:
                    raise VectorError(
                        f"{where}: factors of '{stored}' make a change of shape "
                        f"{(b.shape[0], a.shape[1])}, the model's is {shape}"
                    )
                entries = per_param.setdefault(first_of[stored], [])
                if entries and entries[-1][0] == i:  # tied weights, stored under two names
                    raise VectorError(
                        f"{where}: '{stored}' and '{entries[-1][3]}' are one (tied) parameter "
                        "but have factors each; re-run the vectors stage"
                    )
                entries.append((i, a, b, stored))
        self.modules: list[_Module] = []
        index: list[int] = []  # per column of every module: row of the flat weight matrix
        columns_of: dict[torch.device, int] = {}
        layout = []  # (name, device, columns, A_cat, B_cat, param), in the model's order
        for name in uniques:
            if name not in per_param:
                continue
            entries = per_param[name]
            param = params[name]
            if not param.data.is_contiguous():
                raise MergeError(f"parameter '{name}' is not contiguous; cannot merge in place")
            group = 0 if self.groups is None else block_of(entries[0][3], num_layers, self.groups)
            device = param.device
            a = torch.cat([e[1].to(vdtype) for e in entries]).to(device)
            b = torch.cat([e[2].to(vdtype) for e in entries], dim=1).to(device)
            owners = [e[0] for e in entries for _ in range(e[1].shape[0])]
            index += [group * self.k + i for i in owners]
            layout.append((name, device, len(owners), a, b, param))
            columns_of[device] = columns_of.get(device, 0) + len(owners)
        # Column weights: gathered on the CPU from the (groups x k) matrix in one index,
        # then one copy to each device's buffer, which the modules view.
        self._index = torch.tensor(index, dtype=torch.long)
        self._flat = torch.zeros(len(index), dtype=torch.float32)
        self._wmat = torch.zeros((_group_count(self.groups), self.k), dtype=torch.float32)
        self._weights = self._wmat[0]
        buffers = {d: torch.zeros(n, dtype=torch.float32, device=d) for d, n in columns_of.items()}
        used = dict.fromkeys(columns_of, 0)
        for name, device, count, a, b, param in layout:
            view = buffers[device][used[device] : used[device] + count]
            used[device] += count
            base = param.data.clone()  # theta_0 of this parameter, in the model's dtype
            self.modules.append(_Module(name, param, base, a, b, view, device))
        self._runs = _device_runs(layout)  # flat column runs -> each device's buffer
        self._buffers = buffers
        self._scratch: dict[torch.device, LowRankScratch] = {}
        for module in self.modules:
            rows, cols = module.base.shape
            need = (min(rows_for(module.device), rows), module.a.shape[0], cols)
            have = self._scratch.get(module.device)
            if have is None or not have.fits(*need):
                old = (have.rows, have.k, have.cols) if have else (1, 1, 1)
                size = tuple(max(x, y) for x, y in zip(old, need, strict=True))
                self._scratch[module.device] = LowRankScratch(*size, module.device)
        adapted = {m.name for m in self.modules}
        self._others = [n for n in uniques if n not in adapted]  # never rewritten by apply
        self._aliases = first_of
        self._stash: dict[str, torch.Tensor] | None = None  # theta_0 of the others, on load
        self._restore = False

    @property
    def devices(self) -> list[torch.device]:
        """The devices the adapted parameters are on (each once)."""
        return list(dict.fromkeys(m.device for m in self.modules))

    def resident_bytes(self) -> int:
        """Bytes this merge holds besides the model: theta_0 of the adapted parameters,
        the factors, the weights and the scratch (a CPU stash after `load_state` too)."""
        total = sum(m.base.nbytes + m.a.nbytes + m.b.nbytes for m in self.modules) + sum(
            b.nbytes for b in self._buffers.values()
        )
        total += sum(s.nbytes for s in self._scratch.values())
        if self._stash:
            total += sum(t.nbytes for t in self._stash.values())
        return total

    def apply(self, weights: Sequence[float]) -> None:
        """Set the live model to theta_0 + sum_i w_i B_i A_i with `weights` (one per
        vector, or k x (G + 2) dataset-major with G groups, as `ResidentMerge`)."""
        weights = check_weights("linear", _check_weight_count(weights, self.k, self.groups))
        columns = _columns(weights, self.k, self.groups)
        self._wmat.copy_(torch.tensor(columns, dtype=torch.float32))
        torch.index_select(self._wmat.view(-1), 0, self._index, out=self._flat)
        for start, stop, device, at in self._runs:
            self._buffers[device][at : at + stop - start].copy_(self._flat[start:stop])
        if self._restore:  # a checkpoint was loaded: put theta_0 back where apply never writes
            params = dict(self.model.named_parameters(remove_duplicate=False))
            for name, tensor in self._stash.items():
                params[name].data.copy_(tensor)
            self._restore = False
        for m in self.modules:
            lowrank_update(m.base, m.a, m.b, m.weights, m.param.data, self._scratch[m.device],
                           rows_for(m.device))  # fmt: skip

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Put another checkpoint of the same architecture into the live weights (every
        parameter). The first time, theta_0 of the parameters `apply` never rewrites is
        kept on the CPU, so the next `apply` gives the merge again."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        if self._stash is None:
            self._stash = {n: params[n].data.detach().to("cpu", copy=True) for n in self._others}
        self._restore = True
        seen = set()
        for name, tensor in state.items():
            if name not in self._aliases:
                raise MergeError(f"tensor '{name}' is not a parameter of the base model")
            param = params[self._aliases[name]]
            if tuple(tensor.shape) != tuple(param.shape):
                raise MergeError(
                    f"tensor '{name}' has shape {tuple(tensor.shape)}, base {tuple(param.shape)}"
                )
            param.data.copy_(tensor)
            seen.add(self._aliases[name])
        if len(seen) != len(set(self._aliases.values())):
            raise MergeError("the checkpoint does not cover every parameter of the base model")


def _device_runs(layout: list) -> list[tuple[int, int, torch.device, int]]:
    """(flat start, flat stop, device, start in the device's buffer): maximal runs of
    consecutive modules on one device, in module order."""
    runs: list[list] = []
    used: dict[torch.device, int] = {}
    offset = 0
    for _, device, count, *_ in layout:
        if runs and runs[-1][2] == device:
            runs[-1][1] += count
        else:
            runs.append([offset, offset + count, device, used.get(device, 0)])
        used[device] = used.get(device, 0) + count
        offset += count
    return [tuple(r) for r in runs]


class AdapterState(Mapping):
    """A LoRA fine-tune as a full checkpoint, read lazily: base tensor name -> the base's
    tensor plus the adapter's change (for the adapted ones), in the base's dtype.

    What `Evaluator._load_checkpoint` loads for an adapter directory, so a fine-tune is
    scored without a merged copy on disk; the change is `lowrank_update`'s with weight 1.
    """

    def __init__(self, base_dir: Path, adapter_dir: Path) -> None:
        self.base_dir, self.adapter_dir = Path(base_dir), Path(adapter_dir)
        self._index = tensor_index(self.base_dir)
        self._names = sorted(self._index)
        specs = _base_specs(self.base_dir)
        _, self._factors = _adapter_factors(self.base_dir, self.adapter_dir, specs)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._index:
            raise KeyError(name)
        try:
            with TensorReader(self._index[name]) as reader:
                base = reader.read(name)
        except (OSError, SafetensorsFormatError) as exc:
            raise VectorError(
                f"{self._index[name]}: tensor '{name}' cannot be read ({exc})"
            ) from exc
        if name not in self._factors:
            return base
        a, b = self._factors[name]
        out = torch.empty_like(base)
        lowrank_update(base, a, b, torch.ones(a.shape[0], dtype=torch.float32), out)
        return out

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


# ---- the merged directory ---------------------------------------------------------------------
def merge_lowrank_to_dir(
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
    """`merge_to_dir` for low-rank vectors: the same directory (atomic; shards, index,
    side files, `dem_ray_merge.json`), streamed tensor by tensor.

    Each adapted tensor is `lowrank_update` of the base's rows, `ROWS` at a time (read,
    merged, appended), over the factors rounded to `vector_dtype` as the evaluators hold
    them: on a CPU, the bits `LowRankMerge` scored. The others are copied from the base.
    """
    check_lowrank_method(method, density)
    groups = _check_groups(groups)
    k = len(vector_paths)
    _check_names(names, k)
    floats = check_weights("linear", _check_weight_count(weights, k, groups))
    columns = _columns(floats, k, groups)
    out = output_settings(base_dir, weights, metadata, method, density, dare_seed, groups,
                          vector_dtype, max_shard_size)  # fmt: skip
    vdtype, base_index, num_layers = out.vector_dtype, out.base_index, out.num_layers
    with ExitStack() as stack:
        readers, specs, vectors = open_inputs(stack, base_index, vector_paths)
        adapted = _check_files(vector_paths, vectors, specs, base_dir)
        plan = plan_shards([(name, *spec) for name, spec in specs.items()], out.shard_bytes)
        largest = max((math.prod(shape) for _, shape in specs.values()), default=1)
        part_size = max(1, min(STREAM_CHUNK, largest))
        scratch = None
        with atomic_dir(out_dir) as tmp:
            for filename, shard in plan.items():
                with TensorWriter(tmp / filename, shard, out.tensor_meta) as writer:
                    for name, dtype, shape in shard:
                        base = readers[base_index[name]]
                        try:
                            if name not in adapted:
                                _copy_into(writer, base, name, math.prod(shape), part_size)
                                continue
                            group = 0 if groups is None else block_of(name, num_layers, groups)
                            a, b, owners = _factors_of(vectors, vector_paths, name, vdtype)
                            w = torch.tensor([columns[group][i] for i in owners],
                                             dtype=torch.float32)  # fmt: skip
                            need = (min(ROWS, shape[0]), a.shape[0], shape[1])
                            if scratch is None or not scratch.fits(*need):
                                old = (scratch.rows, scratch.k, scratch.cols) if scratch else need
                                size = tuple(max(x, y) for x, y in zip(old, need, strict=True))
                                scratch = LowRankScratch(*size, "cpu")
                            _merge_rows(writer, base, name, dtype, shape, a, b, w, scratch)
                        except SafetensorsFormatError as exc:
                            raise MergeError(str(exc)) from exc
            finish_dir(tmp, plan, specs, base_dir, side_files, out.record)


def _check_files(
    vector_paths: Sequence[Path],
    vectors: list[TensorReader],
    specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    base_dir: Path,
) -> set[str]:
    """The base tensors some vector changes, from the headers; a MergeError naming the file
    and tensor where a file is not low-rank factors of this base's tensors."""
    adapted = set()
    for vpath, reader in zip(vector_paths, vectors, strict=True):
        params: dict[str, set[str]] = {}
        for key in reader.names():
            try:
                param, part = _split_key(key, vpath)
            except VectorError as exc:
                raise MergeError(str(exc)) from None
            params.setdefault(param, set()).add(part)
        for param, parts in params.items():
            a_name, b_name = factor_names(param)
            if parts != {"A", "B"}:
                have = a_name if "A" in parts else b_name
                raise MergeError(f"{vpath}: tensor '{have}' has no other factor beside it")
            if param not in specs:
                raise MergeError(f"{vpath}: tensor '{a_name}' is for '{param}', which the base "
                                 f"{base_dir} does not have; re-run the vectors stage")  # fmt: skip
            (_, a_shape), (_, b_shape), want = (
                reader.spec(a_name),
                reader.spec(b_name),
                specs[param][1],
            )
            if (len(a_shape), len(b_shape)) != (2, 2) or a_shape[0] != b_shape[1] or (
                b_shape[0], a_shape[1]) != tuple(want):  # fmt: skip
                raise MergeError(
                    f"{vpath}: factors of '{param}' are {list(a_shape)} and {list(b_shape)}, "
                    f"not a change of the base's {list(want)}; re-run the vectors stage"
                )
            adapted.add(param)
    return adapted


def _factors_of(
    vectors: list[TensorReader], vector_paths: Sequence[Path], name: str, vdtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """A_cat, B_cat (as the evaluators hold them) and each column's vector, for `name`."""
    a_name, b_name = factor_names(name)
    a_parts, b_parts, owners = [], [], []
    for i, reader in enumerate(vectors):
        if a_name not in reader.header:
            continue
        for key in (a_name, b_name):
            tensor = reader.read(key)
            if not torch.isfinite(tensor).all():
                raise MergeError(
                    f"{vector_paths[i]}: tensor '{key}' has NaN or Inf; re-run `dem-ray vectors "
                    "CONFIG --force` (and the finetune stage if the fine-tune diverged)"
                )
            (a_parts if key == a_name else b_parts).append(tensor.to(vdtype))
        owners += [i] * a_parts[-1].shape[0]
    return torch.cat(a_parts), torch.cat(b_parts, dim=1), owners


def _merge_rows(
    writer: TensorWriter,
    base: TensorReader,
    name: str,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    a: torch.Tensor,
    b: torch.Tensor,
    weights: torch.Tensor,
    scratch: LowRankScratch,
) -> None:
    """Tensor `name` merged `ROWS` rows at a time, each block appended as it is done."""
    rows, cols = shape
    theta = torch.empty(min(ROWS, rows) * cols, dtype=dtype)
    out = torch.empty_like(theta)
    for start in range(0, rows, ROWS):
        stop = min(start + ROWS, rows)
        n = (stop - start) * cols
        part = base.read_range(name, start * cols, stop * cols, out=theta).view(stop - start, cols)
        target = out[:n].view(stop - start, cols)
        lowrank_update(part, a, b[start:stop], weights, target, scratch, ROWS)
        writer.append(name, target)


def _copy_into(
    writer: TensorWriter, base: TensorReader, name: str, numel: int, part_size: int
) -> None:
    """A tensor no vector changes, copied from the base part by part."""
    if numel == 0:
        dtype, _ = base.spec(name)
        writer.append(name, torch.empty(0, dtype=dtype))
        return
    buffer = torch.empty(min(part_size, numel), dtype=base.spec(name)[0])
    for start in range(0, numel, part_size):
        stop = min(start + part_size, numel)
        writer.append(name, base.read_range(name, start, stop, out=buffer))


def _nbytes(spec: tuple[torch.dtype, tuple[int, ...]]) -> int:
    dtype, shape = spec
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()
