"""Distribution vectors v = theta_finetuned - theta_base, streamed tensor by tensor.

Only one tensor of each model is read at a time and each vector tensor is written as
soon as it is computed, so the stage's memory is a few tensors whatever the model
size or the number of datasets. Pure torch: nothing here knows about Ray.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from dem_ray.core.safetensors_io import SafetensorsFormatError, TensorReader, TensorWriter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class VectorError(ValueError):
    """Checkpoints that cannot be subtracted, or a damaged vector file."""


def weight_files(model_dir: Path) -> list[Path]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise VectorError(f"{model_dir}: no *.safetensors files")
    return files


def tensor_index(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (handles sharded checkpoints)."""
    index: dict[str, Path] = {}
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                index[name] = path
    return index


# Float dtypes a fine-tune may widen its base's to (safetensors names): the fine-tune
# stage trains fp32 master weights and saves them, whatever the base's stored dtype.
_WIDER = {"BF16": {"F32", "F64"}, "F16": {"F32", "F64"}, "F32": {"F64"}}


def check_compatible(base_dir: Path, other_dir: Path) -> dict[str, Path]:
    """Same tensor names, shapes and dtypes as the base (or a wider float dtype: fp32
    weights trained from a bf16 base), or an error naming the tensor."""
    base, other = tensor_index(base_dir), tensor_index(other_dir)
    missing = sorted(set(base) - set(other))
    extra = sorted(set(other) - set(base))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise VectorError(
            f"{other_dir}: tensors differ in name from the base {base_dir}: {what}; "
            "a fine-tune must come from this same base model"
        )
    with ExitStack() as stack:
        handles: dict[Path, object] = {}
        for name in base:
            b = _slice(stack, handles, base[name], name)
            o = _slice(stack, handles, other[name], name)
            widened = o.get_dtype() in _WIDER.get(b.get_dtype(), ())
            if b.get_shape() != o.get_shape() or (b.get_dtype() != o.get_dtype() and not widened):
                raise VectorError(
                    f"{other_dir}: tensor '{name}' is {o.get_dtype()}{o.get_shape()} but the "
                    f"base has {b.get_dtype()}{b.get_shape()}; a fine-tune must come from "
                    "this same base model"
                )
    return other


def compute_vector(
    base_dir: Path,
    finetuned_dir: Path,
    out_path: Path,
    dtype: str = "float32",
    names: tuple[str, str] | None = None,
):
    """Write v = finetuned - base to `out_path` (safetensors), tensor by tensor.

    The difference is taken in fp32 (a bf16 base is upcast; an fp32 fine-tune of it keeps
    its every update) and stored as `dtype` (the vectors stage: float32).

    Tensors are read with plain reads and the vector is written as it is computed, so
    the process holds a few tensors at a time, never a model (see safetensors_stream).
    `names`: how the header names base and fine-tune (default: their paths); a URI
    run names them by URI, so the same vector has the same bytes on every machine.
    """
    base_index = tensor_index(base_dir)
    other_index = check_compatible(base_dir, finetuned_dir)
    out_dtype = DTYPES[dtype]
    source, tuned = names or (str(base_dir), str(finetuned_dir))
    metadata = {"base": source, "finetuned": tuned, "dtype": dtype}
    names = sorted(base_index)
    with ExitStack() as stack:
        readers: dict[Path, TensorReader] = {}

        def reader(path: Path) -> TensorReader:
            if path not in readers:
                readers[path] = stack.enter_context(TensorReader(path))
            return readers[path]

        try:
            specs = [(n, out_dtype, tuple(reader(base_index[n]).header[n]["shape"])) for n in names]
            with TensorWriter(Path(out_path), specs, metadata) as writer:
                for name in names:
                    f = reader(other_index[name]).read(name)
                    if not torch.isfinite(f).all():
                        raise VectorError(
                            f"{finetuned_dir}: tensor '{name}' has NaN or Inf; the fine-tune "
                            "diverged (lower finetune.learning_rate) - re-run the finetune stage"
                        )
                    v = f.to(torch.float32)
                    del f
                    b = reader(base_index[name]).read(name)
                    if not torch.isfinite(b).all():
                        raise VectorError(
                            f"{base_dir}: tensor '{name}' of the base model has NaN or Inf; "
                            "the base checkpoint is damaged - fetch or convert it again"
                        )
                    v -= b.to(torch.float32)
                    del b
                    writer.write(name, v.to(out_dtype))
                    del v
        except SafetensorsFormatError as exc:
            raise VectorError(str(exc)) from exc


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None):
    """A safetensors file that appears whole or not at all (see TensorWriter)."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    specs = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    with TensorWriter(Path(path), specs, meta) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file, with an error that names a damaged file."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118
    except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
        raise VectorError(f"{path}: cannot be read as safetensors ({exc})") from exc


def _handle(stack: ExitStack, handles: dict, path: Path):
    if path not in handles:
        handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
    return handles[path]


def _slice(stack: ExitStack, handles: dict, path: Path, name: str):
    return _handle(stack, handles, path).get_slice(name)
