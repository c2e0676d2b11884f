"""Encode a source's records into examples, in record order, locally or on Ray Data.

Both engines run the same function on the same units (`readers.Source.units`): read
the unit, decode its rows, `Encoder.encode` each record, and return one Arrow table of
results per batch (a status per raw row, the example's ids and mask, its length before
truncation). `local` calls it in the driver; `ray` maps it over the units with Ray Data
(an actor pool, one tokenizer per actor, order preserved) and the driver iterates the
results without materializing them. The driver turns the results into `EncodedBatch`es
and raises, for both engines alike, `dataset 'NAME': FILE: record N: <why>` for a bad
record (a worker returns the error as a row rather than raising it), so the two engines
give the same examples and the same errors, and the shards built from them are the same
bytes.

`ExampleSpool` keeps every example of a source on local disk for the document-level
split (which needs the number of documents before it can assign any), and `route` sends
examples to their splits' `ShardWriter`s.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dem_ray.data import readers
from dem_ray.data.formats import Encoder, Example, FormatSpec, FormatStats, RecordError
from dem_ray.data.readers import DataError, Source
from dem_ray.data.shards import ShardWriter

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")
# Result statuses: BLANK, BAD_JSON and FATAL pass through from readers.decode_rows.
OK, SKIP, ERROR = 10, 11, 12
BLANK, BAD_JSON, FATAL = readers.BLANK, readers.BAD_JSON, readers.FATAL
RAY_UNIT_BYTES = (256 << 10, 4 << 20)  # a Ray unit's size: at least, at most (its blocks)
UNITS_PER_WORKER = 4  # enough units that no worker waits on one long one
PROGRESS_SECONDS = 30.0


def choose_engine(engine: str, ray_min_mb: float, input_bytes: int, dataset: str) -> str:
    """`local` or `ray`: `auto` picks Ray Data for inputs of at least `ray_min_mb`."""
    if engine == "auto":
        engine = "ray" if input_bytes >= ray_min_mb * 2**20 else "local"
        why = f"{input_bytes / 2**20:.1f} MB of input, prepare.ray_min_mb {ray_min_mb:g}"
    else:
        why = "prepare.engine"
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use auto, local or ray")
    log.info("data %s: engine %s (%s)", dataset, engine, why)
    return engine


# ---- one batch of encoded records -------------------------------------------------------
def main_field(spec: FormatSpec) -> tuple[str, str]:
    """The field a record must have and the config key naming it."""
    if spec.format == "chat":
        return spec.messages_field, "messages_field"
    if spec.format == "prompt_completion":
        return spec.prompt_field, "prompt_field"
    return spec.text_field, "text_field"


def format_fields(spec: FormatSpec) -> tuple[tuple[str, str], ...]:
    """Every (column, config key) the format reads, for the column checks of a source."""
    if spec.format == "chat":
        return ((spec.messages_field, "messages_field"),)
    if spec.format == "prompt_completion":
        return ((spec.prompt_field, "prompt_field"), (spec.completion_field, "completion_field"))
    return ((spec.text_field, "text_field"),)


def encode_table(encoder: Encoder, table: pa.Table) -> pa.Table:
    """Encode one raw table: a result row per raw row (see the module docstring)."""
    import pyarrow as pa

    name, key = main_field(encoder.spec)
    status, ids, masks, lengths, truncated, messages = [], [], [], [], [], []
    for kind, value in readers.decode_rows(table):
        example, length, message = None, 0, None
        if kind in (readers.RECORD, readers.JSON_RECORD):
            try:
                if kind == readers.JSON_RECORD and not isinstance(value, dict):
                    raise RecordError(f"no field '{name}' (it has: {type(value).__name__}); "
                                      f"set {key} in the dataset's config")  # fmt: skip
                example, length = encoder.encode(value)
                code = SKIP if example is None else OK
            except RecordError as exc:
                code, message = ERROR, str(exc)
        else:
            code, message = kind, value
        status.append(code)
        ids.append(example.ids if example is not None else ())
        masks.append(example.mask if example is not None else None)
        lengths.append(length)
        truncated.append(bool(example is not None and example.truncated))
        messages.append(message)
    masked = encoder.spec.instruction
    return pa.table({
        "status": pa.array(status, pa.int8()),
        "ids": _lists(ids, pa.int32()),
        "mask": _lists([m or () for m in masks], pa.uint8()) if masked
        else pa.nulls(len(status), pa.large_list(pa.uint8())),
        "length": pa.array(lengths, pa.int64()),
        "truncated": pa.array(truncated, pa.bool_()),
        "message": pa.array(messages, pa.large_string()),
    })  # fmt: skip


def _lists(rows: list, dtype):
    """A large_list array from lists of ints, built from one flat buffer."""
    import pyarrow as pa

    sizes = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=dtype.to_pandas_dtype(),
                       count=int(offsets[-1]))  # fmt: skip
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat, dtype))


def encode_unit(encoder: Encoder, unit: dict, batch_size: int) -> Iterator[pa.Table]:
    """Read and encode one unit: result tables of at most `batch_size` records."""
    for table in readers.read_unit(unit, batch_size):
        yield encode_table(encoder, table)


@dataclass
class EncodedBatch:
    """Encoded examples in record order: example i is ids[offsets[i]:offsets[i+1]] (int32),
    with its mask (uint8, instruction data only) over the same span."""

    ids: np.ndarray
    offsets: np.ndarray
    mask: np.ndarray | None
    lengths: np.ndarray  # before truncation
    truncated: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)


@dataclass
class Encoding:
    """One source's examples as `EncodedBatch`es, in record order; after iterating,
    how many records there were and how many were skipped (empty text records)."""

    source: Source
    spec: FormatSpec
    results: Iterator
    records: int = 0
    skipped: int = 0
    examples: int = 0
    _lines: int = field(default=0, repr=False)

    def __iter__(self) -> Iterator[EncodedBatch]:
        last = time.monotonic()
        try:
            for table in self.results:
                batch = self._take(table)
                if batch is not None:
                    yield batch
                if time.monotonic() - last > PROGRESS_SECONDS:
                    last = time.monotonic()
                    log.info("data %s: %s: %d records encoded", self.source.dataset,
                             self.source.label, self.records)  # fmt: skip
        finally:  # on an error, stop the Ray Data execution now, not when collected
            close = getattr(self.results, "close", None)
            if close is not None:
                close()
        if self.records == 0 and self.source.kind in readers.EMPTY_WHEN_NO_RECORDS:
            raise DataError(f"{self.source.where}: the file is empty")
        if self.examples == 0:
            if self.spec.instruction:
                raise DataError(f"{self.source.where}: no records")
            raise DataError(
                f"{self.source.where}: no non-empty documents in field '{self.spec.text_field}'"
            )

    def _take(self, table) -> EncodedBatch | None:
        import pyarrow as pa

        status = table.column("status").to_numpy()
        is_record = status != BLANK
        bad = np.flatnonzero((status == ERROR) | (status == BAD_JSON) | (status == FATAL))
        if bad.size:
            i = int(bad[0])
            message = table.column("message")[i].as_py()
            if status[i] == ERROR:
                number = self.records + int(is_record[: i + 1].sum())
                raise DataError(f"{self.source.where}: record {number}: {message}")
            raise readers.row_error(self.source.where, int(status[i]), message, self._lines + i + 1)
        self._lines += len(status)
        self.records += int(is_record.sum())
        self.skipped += int((status == SKIP).sum())
        ok = status == OK
        if not ok.any():
            return None
        if not ok.all():
            table = table.filter(pa.array(ok))
        self.examples += table.num_rows
        ids, offsets = _flat(table.column("ids"))
        mask = _flat(table.column("mask"))[0] if self.spec.instruction else None
        return EncodedBatch(ids.astype(np.int32, copy=False), offsets, mask,
                            table.column("length").to_numpy().astype(np.int64),
                            table.column("truncated").to_numpy(zero_copy_only=False))  # fmt: skip


def _flat(column) -> tuple[np.ndarray, np.ndarray]:
    array = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    offsets = np.asarray(array.offsets, dtype=np.int64)
    values = array.flatten().to_numpy(zero_copy_only=False)
    return values, offsets - offsets[0]


def encode_source(
    source: Source,
    spec: FormatSpec,
    seq_len: int,
    *,
    engine: str = "local",
    tokenizer=None,
    tokenizer_dir: str | Path | None = None,
    trust_remote_code: bool = False,
    batch_size: int = 512,
    num_cpus: int | None = None,
    unit_bytes: int | None = None,
) -> Encoding:
    """The source's examples, by the `local` engine (in this process, with `tokenizer`)
    or the `ray` engine (Ray Data actors loading the tokenizer from `tokenizer_dir`;
    Ray must be initialized). `unit_bytes` overrides how finely the source is cut."""
    if engine == "local":
        if tokenizer is None:
            raise ValueError("the local engine needs the tokenizer")
        encoder = Encoder(spec, tokenizer, seq_len)
        units = source.units(unit_bytes or readers.UNIT_BYTES)
        results = (t for u in units for t in encode_unit(encoder, u, batch_size))
    elif engine == "ray":
        if tokenizer_dir is None:
            raise ValueError("the ray engine needs the tokenizer's directory")
        results = _ray_results(source, spec, seq_len, str(tokenizer_dir), trust_remote_code,
                               batch_size, num_cpus, unit_bytes)  # fmt: skip
    else:
        raise ValueError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    return Encoding(source, spec, results)


# ---- the Ray engine -----------------------------------------------------------------------
class _EncodeUnits:
    """A Ray Data actor: the tokenizer loaded once, then unit after unit encoded."""

    def __init__(self, spec: FormatSpec, tokenizer_dir: str, seq_len: int,
                 trust_remote_code: bool, batch_size: int) -> None:  # fmt: skip
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one CPU per actor
        from dem_ray.data.formats import load_encoder

        self.encoder = load_encoder(spec, tokenizer_dir, seq_len, trust_remote_code)
        self.batch_size = batch_size

    def __call__(self, batch) -> Iterator:
        for unit in batch.column("unit").to_pylist():
            yield from encode_unit(self.encoder, json.loads(unit), self.batch_size)


def ray_workers(num_cpus: int | None) -> int:
    """`prepare.num_cpus`, or every CPU of the cluster."""
    import ray

    return num_cpus or max(1, int(ray.cluster_resources().get("CPU", 1)))


def _ray_results(source: Source, spec: FormatSpec, seq_len: int, tokenizer_dir: str,
                 trust_remote_code: bool, batch_size: int, num_cpus: int | None,
                 unit_bytes: int | None) -> Iterator:  # fmt: skip
    import ray.data

    workers = ray_workers(num_cpus)
    if unit_bytes is None:
        low, high = RAY_UNIT_BYTES
        unit_bytes = min(high, max(low, source.size_bytes // (workers * UNITS_PER_WORKER)))
    units = source.units(unit_bytes)
    log.info("data %s: %s: %d units over %d Ray Data workers", source.dataset, source.label,
             len(units), workers)  # fmt: skip
    with _ordered_data_context():
        ds = ray.data.from_items([{"unit": json.dumps(u)} for u in units],
                                 override_num_blocks=len(units))  # fmt: skip
        ds = ds.map_batches(
            _EncodeUnits,
            fn_constructor_kwargs={
                "spec": spec,
                "tokenizer_dir": tokenizer_dir,
                "seq_len": seq_len,
                "trust_remote_code": trust_remote_code,
                "batch_size": batch_size,
            },  # fmt: skip
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=min(workers, len(units))),
            num_cpus=1,
        )
        # Batches of `batch_size` rows (slices of the blocks), not whole blocks: the driver
        # then copies little at a time, whatever the size of a unit.
        yield from ds.iter_batches(batch_size=batch_size, batch_format="pyarrow")


@contextlib.contextmanager
def _ordered_data_context():
    """Ray Data in record order and without progress bars (the stage logs its own)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


# ---- pass one of a split: every example on disk ---------------------------------------------
_META = np.dtype([("n", "<i8"), ("length", "<i8"), ("truncated", "u1")])


class ExampleSpool:
    """Every example of a source on local disk (ids, masks, and per example its size,
    length and truncation), so the document-level split can be made once the number of
    documents is known and then streamed. Unnamed temp files: gone with the spool."""

    def __init__(self, directory: Path, masked: bool) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self._files = [tempfile.TemporaryFile(dir=directory, buffering=1 << 20)  # noqa: SIM115
                       for _ in range(3 if masked else 2)]  # fmt: skip
        self.masked = masked
        self.count = 0

    def add(self, batch: EncodedBatch) -> None:
        meta = np.empty(len(batch), dtype=_META)
        meta["n"] = np.diff(batch.offsets)
        meta["length"] = batch.lengths
        meta["truncated"] = batch.truncated
        self._files[0].write(meta.tobytes())
        self._files[1].write(batch.ids.astype(np.int32, copy=False).tobytes())
        if self.masked:
            self._files[2].write(batch.mask.astype(np.uint8, copy=False).tobytes())
        self.count += len(batch)

    def batches(self, max_tokens: int = 1 << 20, max_examples: int = 1 << 15):
        """The examples back, in order, a bounded batch at a time."""
        for fh in self._files:
            fh.flush()
            fh.seek(0)
        meta_fh, ids_fh = self._files[:2]
        while chunk := meta_fh.read(max_examples * _META.itemsize):
            meta = np.frombuffer(chunk, dtype=_META)
            ends = np.cumsum(meta["n"])
            start = 0
            while start < len(meta):
                base = ends[start - 1] if start else 0
                stop = max(start + 1, int(np.searchsorted(ends, base + max_tokens, "right")))
                part = meta[start:stop]
                offsets = np.concatenate(([0], ends[start:stop] - base)).astype(np.int64)
                total = int(offsets[-1])
                ids = np.frombuffer(ids_fh.read(total * 4), dtype=np.int32)
                mask = np.frombuffer(self._files[2].read(total), np.uint8) if self.masked else None
                yield EncodedBatch(ids, offsets, mask, part["length"].astype(np.int64),
                                   part["truncated"].astype(bool))  # fmt: skip
                start = stop

    def close(self) -> None:
        for fh in self._files:
            fh.close()

    def __enter__(self) -> ExampleSpool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- pass two: examples to their splits ------------------------------------------------------
@dataclass
class SplitOutput:
    """One split being written: its shard, what encoding did to it, its documents."""

    split: str
    writer: ShardWriter
    stats: FormatStats = field(default_factory=FormatStats)
    documents: int = 0
    limit: int | None = None  # max_train_documents: the first K documents only

    def take(self, batch: EncodedBatch, i: int) -> None:
        if self.limit is not None and self.documents >= self.limit:
            return
        self.documents += 1
        a, b = int(batch.offsets[i]), int(batch.offsets[i + 1])
        ids = batch.ids[a:b]
        mask = None if batch.mask is None else batch.mask[a:b]
        dropped = self.stats.dropped
        example = Example(ids, None if mask is None else mask.tolist(), bool(batch.truncated[i]))
        self.stats.add(example, int(batch.lengths[i]))
        if self.stats.dropped == dropped:  # FormatStats decides what is dropped
            self.writer.add(ids, mask)


def route(batch: EncodedBatch, part: int | np.ndarray, outputs: list[SplitOutput | None]) -> None:
    """Each example of the batch to `outputs[part]` (`part`: one index for all, or one per
    example, as `readers.split_assignment` gives)."""
    if isinstance(part, int):
        out = outputs[part]
        for i in range(len(batch)):
            out.take(batch, i)
        return
    for i, k in enumerate(part.tolist()):
        outputs[k].take(batch, i)
