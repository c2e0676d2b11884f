"""Token shards: the safetensors files the data stage writes and fine-tunes read.

Two layouts, one row per training sequence:

- text: `input_ids` int32 [N, seq_len], documents packed (joined by EOS, the remainder
  dropped); metadata {"dataset", "split"}.
- instruction (`chat`, `prompt_completion`): one example per row, right-padded to seq_len
  with the pad token (EOS when the tokenizer has none): `input_ids` int32 [N, seq_len] and
  `loss_mask` uint8 [N, seq_len] (1 where the token is a loss target, 0 on padding);
  metadata {"dataset", "split", "format"}.

`ShardWriter` never holds a shard: rows are spooled to an unnamed temp file as they come,
and the safetensors file (its header needs the final N) is written at the end from the
spool in chunks, under a temp name then renamed (`commit_shards` renames several shards
only once all of them are written). `ShardReader` reads single rows with `pread`, not a
memory map: a mapped page a fine-tune touches stays in its resident memory until the map
closes, so random rows over a long run would end with the whole shard resident.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from dem_ray.core.atomic import atomic_file
from dem_ray.core.safetensors_io import NAMES, SafetensorsFormatError, TensorReader
from dem_ray.data.readers import DataError

IDS, MASK = "input_ids", "loss_mask"
_COPY_CHUNK = 8 << 20


class ShardError(DataError):
    """A file that is not a dem-ray shard; the message names it."""


def shard_header(num_rows: int, seq_len: int, masked: bool, metadata: dict[str, str]) -> bytes:
    """The safetensors prefix (length + JSON header) of a shard of `num_rows` rows: the
    same bytes `core.safetensors_io.TensorWriter` writes for these tensors."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    specs = [(IDS, torch.int32, 4)] + ([(MASK, torch.uint8, 1)] if masked else [])
    for name, dtype, size in specs:
        nbytes = math.prod((num_rows, seq_len)) * size
        header[name] = {
            "dtype": NAMES[dtype],
            "shape": [num_rows, seq_len],
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """One shard, written row by row: `add(ids)` packs text, `add(ids, mask)` pads one
    instruction example per row. Nothing appears at `path` until `commit()`.

    `spool_dir`: where the rows wait (default: the shard's own directory, local disk the
    shard will need anyway; not /tmp, which may be memory)."""

    def __init__(
        self,
        path: Path,
        seq_len: int,
        metadata: dict[str, str],
        masked: bool = False,
        pad_id: int | None = None,
        spool_dir: Path | None = None,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if masked and pad_id is None:
            raise ValueError("an instruction shard needs a pad_id")
        self.path = Path(path)
        self.seq_len = seq_len
        self.metadata = dict(metadata)
        self.masked = masked
        self.pad_id = pad_id
        self._rows = 0  # rows in the spool
        spool_dir = Path(spool_dir) if spool_dir is not None else self.path.parent
        spool_dir.mkdir(parents=True, exist_ok=True)
        self._ids = _spool(spool_dir)
        self._mask = _spool(spool_dir) if masked else None
        self._row = np.empty(seq_len, dtype=np.int32)  # text: the row being filled
        self._fill = 0

    # ---- rows in ----------------------------------------------------------------------
    def add(self, ids: Sequence[int] | np.ndarray, mask: Sequence[int] | np.ndarray | None = None):
        """Text: append a document's tokens (EOS included) to the packed stream.
        Instruction: one example (at most seq_len tokens) and its loss mask, as one row."""
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        if not self.masked:
            if mask is not None:
                raise ValueError(f"{self.path}: a text shard takes no loss mask")
            self._pack(ids)
            return
        if mask is None:
            raise ValueError(f"{self.path}: an instruction shard needs each example's loss mask")
        n = ids.size
        if n > self.seq_len or len(mask) != n:
            raise ValueError(
                f"{self.path}: an example of {n} tokens (mask {len(mask)}) does not fit "
                f"a row of {self.seq_len}"
            )
        row = np.full(self.seq_len, self.pad_id, dtype=np.int32)
        row[:n] = ids
        keep = np.zeros(self.seq_len, dtype=np.uint8)
        keep[:n] = np.asarray(mask, dtype=np.uint8)
        self._ids.write(memoryview(row))
        self._mask.write(memoryview(keep))
        self._rows += 1

    def _pack(self, ids: np.ndarray) -> None:
        """Complete the row being filled, write whole rows straight from `ids`, keep the
        rest: one row of memory, whatever the documents' sizes."""
        seq, pos, n = self.seq_len, 0, ids.size
        if self._fill:
            pos = min(seq - self._fill, n)
            self._row[self._fill : self._fill + pos] = ids[:pos]
            self._fill += pos
            if self._fill < seq:
                return
            self._ids.write(memoryview(self._row))
            self._rows += 1
            self._fill = 0
        full = (n - pos) // seq * seq
        if full:
            self._ids.write(memoryview(ids[pos : pos + full]))
            self._rows += full // seq
            pos += full
        self._fill = n - pos
        self._row[: self._fill] = ids[pos:]

    @property
    def num_rows(self) -> int:
        """The rows the shard will hold (text: the full rows so far; the remainder of the
        stream, under one row, is dropped as packing always did)."""
        return self._rows

    # ---- the file out -------------------------------------------------------------------
    def write_to(self, fh) -> None:
        """The whole safetensors file into `fh`: the header, then the spool in chunks."""
        fh.write(shard_header(self.num_rows, self.seq_len, self.masked, self.metadata))
        for spool in filter(None, (self._ids, self._mask)):
            spool.flush()
            spool.seek(0)
            shutil.copyfileobj(spool, fh, _COPY_CHUNK)

    def commit(self) -> Path:
        """Write the shard (temp name, fsync, rename) and drop the spool."""
        commit_shards([self])
        return self.path

    def close(self) -> None:
        """Drop the spool (the unnamed temp files go with their handles)."""
        for spool in filter(None, (self._ids, self._mask)):
            spool.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _spool(directory: Path):
    """An unnamed temp file (closed with its writer, removed by the OS even on a kill)."""
    return tempfile.TemporaryFile(dir=directory, buffering=1 << 20)  # noqa: SIM115


def commit_shards(writers: Sequence[ShardWriter]) -> list[Path]:
    """Write every shard under a temp name first and rename them only when all are
    written, so a failure while writing any leaves every earlier shard in place."""
    with ExitStack() as stack:
        for writer in writers:
            writer.write_to(stack.enter_context(atomic_file(writer.path, "wb")))
    for writer in writers:
        writer.close()
    return [w.path for w in writers]


class ShardReader:
    """Random rows of one shard, read on demand (for fine-tune workers).

    Rows are read with `os.preadv` straight into the output tensors: no memory map (see
    the module docstring) and a handful of syscalls per batch."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fd = -1
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise ShardError(f"{self.path}: cannot be opened as a shard ({exc})") from exc
        try:
            self._layout = _layout(self.path, self._fd)
        except BaseException:
            self.close()
            raise
        self.num_rows, self.seq_len, self.metadata = self._layout[:3]
        self._ids_at, self._mask_at = self._layout[3:]

    @property
    def has_mask(self) -> bool:
        return self._mask_at is not None

    def rows(self, index: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows `index` (any order, repeats allowed): int32 ids [len(index), seq_len] and the
        uint8 loss mask of an instruction shard (None for text). The caller converts."""
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1).tolist()
        bad = [i for i in index if not 0 <= i < self.num_rows]
        if bad:
            raise IndexError(f"{self.path}: row {bad[0]} of {self.num_rows}")
        ids = torch.empty((len(index), self.seq_len), dtype=torch.int32)
        self._read(ids, self._ids_at, index)
        if self._mask_at is None:
            return ids, None
        mask = torch.empty((len(index), self.seq_len), dtype=torch.uint8)
        self._read(mask, self._mask_at, index)
        return ids, mask

    def _read(self, out: torch.Tensor, start: int, index: list[int]) -> None:
        width = self.seq_len * out.element_size()
        buffer = out.view(torch.uint8).numpy().reshape(len(index), width) if index else None
        for k, i in enumerate(index):
            got = os.preadv(self._fd, [memoryview(buffer[k])], start + i * width)
            if got != width:
                raise ShardError(f"{self.path}: row {i} is cut short; the shard is truncated")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)

    def __getstate__(self) -> dict:  # reopened by path wherever it is unpickled
        return {"path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])


def load_shard(path: Path | str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every row of a shard (for evaluators): int32 `input_ids` and, for instruction
    data, the uint8 `loss_mask` (None for text)."""
    path = Path(path)
    try:
        with TensorReader(path) as reader:
            check_shard(path, reader.header)
            ids = reader.read(IDS)
            mask = reader.read(MASK) if MASK in reader.header else None
    except (SafetensorsFormatError, OSError) as exc:
        raise ShardError(f"{path}: not a readable token shard ({exc})") from exc
    return ids, mask


def check_shard(path: Path, header: dict) -> tuple[int, int]:
    """(rows, seq_len) of a shard's safetensors header, or a ShardError naming the file."""
    ids = header.get(IDS)
    if ids is None:
        raise ShardError(
            f"{path}: no '{IDS}' tensor (it has: {', '.join(header) or 'none'}); not a token "
            "shard written by the data stage"
        )
    if ids.get("dtype") != "I32" or len(ids.get("shape", ())) != 2:
        raise ShardError(f"{path}: '{IDS}' is {ids.get('dtype')}{ids.get('shape')}, not I32 [N, L]")
    mask = header.get(MASK)
    if mask is not None and (mask.get("dtype") != "U8" or mask.get("shape") != ids["shape"]):
        raise ShardError(
            f"{path}: '{MASK}' is {mask.get('dtype')}{mask.get('shape')} but '{IDS}' is "
            f"{ids['shape']}; a loss mask must be U8 of the same shape"
        )
    return tuple(ids["shape"])


def _layout(path: Path, fd: int) -> tuple[int, int, dict, int, int | None]:
    raw = os.pread(fd, 8, 0)
    if len(raw) != 8:
        raise ShardError(f"{path}: too short to be a safetensors shard")
    (length,) = struct.unpack("<Q", raw)
    if length > 100 << 20:
        raise ShardError(f"{path}: header length {length} is not plausible; not a shard")
    try:
        header = json.loads(os.pread(fd, length, 8))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardError(f"{path}: the header is not valid JSON ({exc}); not a shard") from exc
    metadata = header.pop("__metadata__", None) or {}
    rows, seq_len = check_shard(path, header)
    data = 8 + length
    need = data + max(e["data_offsets"][1] for e in header.values())
    if os.fstat(fd).st_size < need:
        raise ShardError(f"{path}: {os.fstat(fd).st_size} bytes, the header needs {need}")
    mask = header.get(MASK)
    return (rows, seq_len, metadata, data + header[IDS]["data_offsets"][0],
            None if mask is None else data + mask["data_offsets"][0])  # fmt: skip
