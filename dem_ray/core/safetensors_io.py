"""Read and write safetensors one tensor at a time, with plain file reads and writes.

`safe_open` memory-maps a file, and every page a process touches through a mapping
counts in its resident memory until the mapping closes, so streaming a model through
it still ends with the whole file resident. Plain reads into a buffer leave the page
cache to the kernel (reclaimable, not the process's), and writing the header first
lets a file be produced tensor by tensor. The format: an 8-byte little-endian header
length, a JSON header of `name: {dtype, shape, data_offsets}` (offsets relative to the
end of the header), then the tensors' bytes back to back.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from dem_ray.core.atomic import atomic_file

CODES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {dtype: code for code, dtype in CODES.items()}
MAX_HEADER = 100 * 2**20
WEIGHTS_NAME = "model.safetensors"  # an unsharded model's weights, as Hugging Face names them
INDEX_NAME = "model.safetensors.index.json"  # a sharded model's map of tensor -> file


class SafetensorsFormatError(ValueError):
    """A file that is not a well-formed safetensors file."""


class TensorReader:
    """One safetensors file's header, and its tensors read on demand into fresh memory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fh = self.path.open("rb")
        try:
            self.header, self.metadata, self._data_start = _read_header(self._fh, self.path)
        except BaseException:
            self._fh.close()
            raise

    def names(self) -> list[str]:
        return list(self.header)

    def read(self, name: str) -> torch.Tensor:
        entry = self.header[name]
        begin, end = entry["data_offsets"]
        out = torch.empty(entry["shape"], dtype=CODES[entry["dtype"]])
        buffer = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
        if end - begin != out.numel() * out.element_size():
            raise SafetensorsFormatError(
                f"{self.path}: tensor '{name}' has {end - begin} bytes for shape "
                f"{entry['shape']} {entry['dtype']}; the file is damaged"
            )
        if buffer is not None:
            self._fh.seek(self._data_start + begin)
            got = self._fh.readinto(memoryview(buffer))
            if got != end - begin:
                raise SafetensorsFormatError(
                    f"{self.path}: tensor '{name}' is cut short ({got} of {end - begin} bytes); "
                    "the file is truncated"
                )
        return out

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """(dtype, shape) of tensor `name`, from the header alone."""
        entry = self.header[name]
        return CODES[entry["dtype"]], tuple(entry["shape"])

    def read_range(
        self, name: str, start: int, stop: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Elements [start, stop) of tensor `name`, flattened: part of a tensor, read with one
        plain read (into `out[: stop - start]` when given, a 1-D tensor of its dtype)."""
        entry = self.header[name]
        dtype, shape = self.spec(name)
        numel = math.prod(shape)
        begin, end = entry["data_offsets"]
        size = torch.empty((), dtype=dtype).element_size()
        if end - begin != numel * size:
            raise SafetensorsFormatError(
                f"{self.path}: tensor '{name}' has {end - begin} bytes for shape "
                f"{entry['shape']} {entry['dtype']}; the file is damaged"
            )
        if not 0 <= start <= stop <= numel:
            raise ValueError(f"{self.path}: elements [{start}, {stop}) of '{name}' ({numel})")
        if out is None:
            part = torch.empty(stop - start, dtype=dtype)
        elif out.dtype != dtype or out.dim() != 1 or out.numel() < stop - start:
            raise ValueError(f"{self.path}: '{name}' needs a 1-D {dtype} buffer of "
                             f"{stop - start} elements, got {out.dtype}{tuple(out.shape)}")  # fmt: skip
        else:
            part = out[: stop - start]
        if stop > start:
            self._fh.seek(self._data_start + begin + start * size)
            got = self._fh.readinto(memoryview(part.view(torch.uint8).numpy()))
            if got != (stop - start) * size:
                raise SafetensorsFormatError(
                    f"{self.path}: tensor '{name}' is cut short; the file is truncated"
                )
        return part

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorWriter:
    """Writes a safetensors file whose tensors are all declared up front, then given in order.

    The file appears under its final name only when every declared tensor was written
    (temp file in the same directory, fsync, rename); on any error it never appears.
    """

    def __init__(
        self,
        path: Path,
        specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self._order: list[tuple[str, torch.dtype, tuple[int, ...]]] = list(specs)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for name, dtype, shape in self._order:
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._prefix = struct.pack("<Q", len(raw)) + raw
        self._next = 0
        self._filled = 0  # elements of tensor `_next` written so far (see `append`)
        self._file = atomic_file(self.path, "wb")
        self._fh = None

    def __enter__(self) -> TensorWriter:
        self._fh = self._file.__enter__()
        self._fh.write(self._prefix)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, dtype, shape = self._expected()
        if self._filled or tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"{self.path}: expected tensor '{want_name}' {dtype}{tuple(shape)} next, "
                f"got '{name}' {tensor.dtype}{tuple(tensor.shape)}"
            )
        self.append(name, tensor)

    def append(self, name: str, part: torch.Tensor) -> None:
        """The next elements of tensor `name` (flat, in order): a tensor written in parts, so
        it never has to be whole in memory. It is done when all its elements are in."""
        want_name, dtype, shape = self._expected()
        numel = math.prod(shape)
        if name != want_name or part.dtype != dtype or self._filled + part.numel() > numel:
            raise ValueError(
                f"{self.path}: expected tensor '{want_name}' {dtype}{tuple(shape)} next "
                f"({self._filled} of {numel} elements written), got '{name}' "
                f"{part.dtype}{tuple(part.shape)}"
            )
        if part.numel():
            self._fh.write(memoryview(part.contiguous().view(-1).view(torch.uint8).numpy()))
        self._filled += part.numel()
        if self._filled == numel:
            self._next += 1
            self._filled = 0

    def _expected(self) -> tuple[str, torch.dtype, tuple[int, ...]]:
        if self._next >= len(self._order):
            raise ValueError(f"{self.path}: every declared tensor is written already")
        return self._order[self._next]

    def __exit__(self, exc_type, exc, tb) -> bool | None:
        if exc_type is None and self._next != len(self._order):
            missing = self._order[self._next][0]
            error = ValueError(f"{self.path}: tensor '{missing}' was declared but not written")
            self._file.__exit__(ValueError, error, None)
            raise error
        return self._file.__exit__(exc_type, exc, tb)


def plan_shards(
    specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int
) -> dict[str, list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """The weight files of a model, as Hugging Face names them: file name -> its tensors.

    Tensors in the given order fill a file until the next would take it past `max_bytes`
    (a tensor larger than that gets a file of its own). One file is `model.safetensors`;
    more are `model-0000i-of-0000N.safetensors`, which a model lists in `INDEX_NAME`.
    """
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = []
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[2]) * torch.empty((), dtype=spec[1]).element_size()
        if not shards or (shards[-1] and size + nbytes > max_bytes):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    if len(shards) <= 1:
        return {WEIGHTS_NAME: shards[0] if shards else []}
    count = len(shards)
    return {f"model-{i + 1:05d}-of-{count:05d}.safetensors": s for i, s in enumerate(shards)}


def _read_header(fh, path: Path) -> tuple[dict, dict, int]:
    raw_len = fh.read(8)
    if len(raw_len) != 8:
        raise SafetensorsFormatError(f"{path}: too short to be a safetensors file")
    (length,) = struct.unpack("<Q", raw_len)
    if length > MAX_HEADER:
        raise SafetensorsFormatError(f"{path}: header length {length} is not plausible")
    raw = fh.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsFormatError(f"{path}: header is not valid JSON ({exc})") from exc
    metadata = header.pop("__metadata__", None) or {}
    for name, entry in header.items():
        if entry.get("dtype") not in CODES:
            raise SafetensorsFormatError(
                f"{path}: tensor '{name}' has unsupported dtype {entry.get('dtype')!r}"
            )
    return header, metadata, 8 + length


def stored_dtype(model_dir: Path) -> torch.dtype | None:
    """The one float dtype of a model directory's safetensors weights (read from their
    headers, sharded or not); None when they hold several."""
    dtypes = set()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with TensorReader(path) as reader:
            dtypes |= {reader.spec(name)[0] for name in reader.names()}
    floats = {d for d in dtypes if d.is_floating_point}
    return floats.pop() if len(floats) == 1 else None
