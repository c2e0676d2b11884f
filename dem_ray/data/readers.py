"""Read a dataset's records, streamed; and the document-level split and packing helpers.

A `Source` is one input (a file, a directory, a saved or Hub dataset). It is cut into
*units* (byte ranges of a jsonl or text file cut at line or paragraph boundaries,
parquet row groups, row ranges of an HF dataset) that are read one at a time into small
Arrow tables: in the driver by the local engine, in Ray workers by the Ray engine, with
the same code, so both see the same records in the same order. Nothing here holds a
whole file, except a `.json` file (one JSON value: it is parsed whole).

Packing (documents joined by EOS, cut into `seq_len` rows) means no padding and no
attention mask, so every token of a batch is real: training sees exactly
`steps x batch x seq_len` tokens and validation perplexity counts real tokens.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst"}
UNIT_BYTES = 2 << 20  # what the local engine reads at a time: a few times this is held
EMPTY_WHEN_NO_RECORDS = ("jsonl", "json", "parquet")  # kinds where no record means "empty file"

# Raw tables of file sources: one row per line (jsonl), JSON value (json), text record
# (a paragraph or a whole file of a directory), or a problem found while reading.
KIND, PAYLOAD = "__kind", "__payload"
LINE, JSON_VALUE, TEXT, FATAL = 0, 1, 2, 3
# What `decode_rows` makes of a raw row.
RECORD, JSON_RECORD, BLANK, BAD_JSON = 0, 1, 2, 3  # and FATAL


class DataError(ValueError):
    """Unusable data; the message names the dataset and the file."""


# ---- sources --------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One input of a dataset: what to read and how it is cut into units (plain data)."""

    dataset: str
    label: str  # the file, directory or Hub id, as errors name it
    kind: str  # jsonl | json | text | textfiles | parquet | hf
    files: tuple[str, ...]
    columns: tuple[str, ...] = ()  # parquet/hf: the columns the format reads
    num_rows: int | None = None  # parquet/hf
    size_bytes: int = 0

    @property
    def where(self) -> str:
        return f"dataset '{self.dataset}': {self.label}"

    @property
    def json_records(self) -> bool:
        """Records are parsed JSON values, which must be objects."""
        return self.kind in ("jsonl", "json")

    def units(self, unit_bytes: int = UNIT_BYTES) -> list[dict]:
        """The source cut into pieces of about `unit_bytes`, in record order (JSON-able)."""
        unit_bytes = max(1, int(unit_bytes))
        if self.kind in ("jsonl", "text"):
            seps = (b"\n",) if self.kind == "jsonl" else PARAGRAPH_CUTS
            [path] = self.files
            return [{"kind": self.kind, "file": path, "start": a, "stop": b}
                    for a, b in byte_ranges(Path(path), unit_bytes, seps)]  # fmt: skip
        if self.kind == "json":
            return [{"kind": "json", "file": self.files[0]}]
        if self.kind == "textfiles":
            groups: list[list[str]] = [[]]
            size = 0
            for path in self.files:
                if groups[-1] and size >= unit_bytes:
                    groups.append([])
                    size = 0
                groups[-1].append(path)
                size += Path(path).stat().st_size
            return [{"kind": "textfiles", "files": g} for g in groups]
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(self.files[0]).metadata
            units, group, size = [], [], 0
            for i in range(meta.num_row_groups):
                if group and size >= unit_bytes:
                    units.append(group)
                    group, size = [], 0
                group.append(i)
                size += meta.row_group(i).total_byte_size
            units.append(group)
            return [{"kind": "parquet", "file": self.files[0], "row_groups": g,
                     "columns": list(self.columns)} for g in units if g]  # fmt: skip
        # hf: row ranges of about unit_bytes
        rows = self.num_rows or 0
        per = max(1, rows * unit_bytes // max(1, self.size_bytes)) if rows else 1
        return [{"kind": "hf", "files": list(self.files), "columns": list(self.columns),
                 "start": a, "stop": min(rows, a + per)} for a in range(0, rows, per)]  # fmt: skip


def open_source(
    path: str | Path | None,
    dataset: str,
    fields: Iterable[tuple[str, str]] = (("text", "text_field"),),
    *,
    hub: str | None = None,
    subset: str | None = None,
    split: str = "train",
) -> Source:
    """A source over `path` (or the Hub dataset `hub`), with the checks that need no
    reading of records: the kind, an empty parquet file, the columns `fields` names
    ((column, config key) pairs) present in a parquet or HF dataset, the split of a
    DatasetDict. A Hub dataset is downloaded to the HF cache here."""
    fields = tuple(fields)
    if hub is not None:
        return _hub_source(hub, subset, split, dataset, fields)
    check_readable(path, dataset)
    path = Path(path)
    where = f"dataset '{dataset}': {path}"
    suffix = path.suffix.lower()
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            import datasets

            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(
                        f"{where}: a DatasetDict without a '{split}' split ({list(ds)})"
                    )
                ds = ds[split]
            return _hf_source(ds, str(path), dataset, fields)
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"{where}: a directory with neither a saved dataset nor text files")
        return Source(dataset, str(path), "textfiles", tuple(map(str, files)),
                      size_bytes=sum(p.stat().st_size for p in files))  # fmt: skip
    size = path.stat().st_size
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
        if meta.num_rows == 0:
            raise DataError(f"{where}: the file is empty")
        names = meta.schema.to_arrow_schema().names
        _check_columns(where, names, fields)
        return Source(dataset, str(path), "parquet", (str(path),), _columns(fields),
                      meta.num_rows, size)  # fmt: skip
    kind = {".jsonl": "jsonl", ".json": "json"}.get(suffix, "text")
    return Source(dataset, str(path), kind, (str(path),), size_bytes=size)


def check_readable(path: str | Path, dataset: str) -> None:
    """The checks worth making before any work without reading the whole file: that it
    exists and is of a kind dem-ray reads (the content is checked when it is prepared)."""
    path = Path(path)
    where = f"dataset '{dataset}': {path}"
    if not path.exists():
        raise DataError(f"{where}: file not found")
    suffix = path.suffix.lower()
    if path.is_dir() or suffix in {".jsonl", ".json", ".parquet", *TEXT_SUFFIXES}:
        return
    if suffix in {".pt", ".bin", ".pkl", ".pickle"}:
        raise DataError(f"{where}: pickle files are refused; give jsonl, json, parquet or text")
    raise DataError(
        f"{where}: unknown file type '{path.suffix}'; use .jsonl, .json, .parquet, "
        f".txt, or a directory saved by datasets.save_to_disk"
    )


def _hub_source(hub: str, subset: str | None, split: str, dataset: str, fields) -> Source:
    import datasets

    label = f"hub {hub}" + (f" ({subset})" if subset else "")
    try:
        ds = datasets.load_dataset(hub, subset, split=split)
    except Exception as exc:  # noqa: BLE001 - network, auth, unknown id or split: all say why
        raise DataError(
            f"dataset '{dataset}': {label}: cannot be loaded with datasets.load_dataset "
            f"(split '{split}'): {exc}"
        ) from exc
    return _hf_source(ds, label, dataset, fields)


def _hf_source(ds, label: str, dataset: str, fields) -> Source:
    """An HF dataset read from its Arrow files (memory-mapped), wherever a unit is read."""
    where = f"dataset '{dataset}': {label}"
    _check_columns(where, ds.column_names, fields)
    files = tuple(f["filename"] for f in ds.cache_files)
    if not files or _hf_dataset(files).num_rows != ds.num_rows:
        raise DataError(
            f"{where}: not backed by its Arrow files (an in-memory or re-indexed dataset); "
            "save it with datasets.save_to_disk and give that directory"
        )
    size = sum(Path(f).stat().st_size for f in files)
    return Source(dataset, label, "hf", files, _columns(fields), ds.num_rows, size)


def _check_columns(where: str, names: list[str], fields) -> None:
    for column, key in fields:
        if column not in names:
            raise DataError(
                f"{where}: no column '{column}' (columns: {', '.join(names)}); set {key}"
            )


def _columns(fields) -> tuple[str, ...]:
    return tuple(dict.fromkeys(column for column, _ in fields))


@functools.lru_cache(maxsize=8)
def _hf_dataset(files: tuple[str, ...]):
    import datasets

    parts = [datasets.Dataset.from_file(f) for f in files]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


# ---- units ----------------------------------------------------------------------------
# A text file may be cut right after a raw b"\n\n" or b"\n\r\n": the text before the cut
# then ends in two newlines, and paragraphs (split on "\n\n" after newline translation,
# stripped, empty ones dropped) come out the same cut or not. Never between "\r" and "\n".
PARAGRAPH_CUTS = (b"\n\n", b"\n\r\n")


def byte_ranges(path: Path, unit_bytes: int, seps: tuple[bytes, ...]) -> list[tuple[int, int]]:
    """[start, stop) ranges covering the file, each cut right after a separator found
    at or after a multiple of about `unit_bytes` (one range when none is found)."""
    size = path.stat().st_size
    bounds = [0]
    with path.open("rb") as fh:
        while bounds[-1] + unit_bytes < size:
            cut = _next_cut(fh, bounds[-1] + unit_bytes, seps, size)
            if cut >= size:
                break
            bounds.append(cut)
    return list(zip(bounds, bounds[1:] + [size], strict=True))


def _next_cut(fh, pos: int, seps: tuple[bytes, ...], size: int) -> int:
    keep = max(map(len, seps)) - 1
    fh.seek(pos)
    buf, base = b"", pos
    while True:
        block = fh.read(1 << 16)
        if not block:
            return size
        buf += block
        hits = [(i, len(s)) for s in seps if (i := buf.find(s)) >= 0]
        if hits:
            i, n = min(hits)
            return base + i + n
        base += len(buf) - keep
        buf = buf[len(buf) - keep :]


def read_unit(unit: dict, rows: int = 512) -> Iterator[pa.Table]:
    """A unit's raw records as pyarrow tables of at most `rows` rows: (KIND, PAYLOAD)
    tables for files, the format's columns for parquet and HF datasets."""
    import pyarrow as pa

    kind = unit["kind"]
    if kind == "parquet":
        import pyarrow.parquet as pq

        fh = pq.ParquetFile(unit["file"])
        for batch in fh.iter_batches(rows, row_groups=unit["row_groups"], columns=unit["columns"]):
            yield pa.Table.from_batches([batch])
        return
    if kind == "hf":
        ds = _hf_dataset(tuple(unit["files"])).select_columns(unit["columns"])
        ds = ds.with_format("arrow")
        for start in range(unit["start"], unit["stop"], rows):
            yield ds[start : min(unit["stop"], start + rows)]
        return
    if kind == "textfiles":
        texts = [_decode_text(Path(p).read_bytes()) for p in unit["files"]]
        yield from _raw_tables([TEXT] * len(texts), texts, rows)
        return
    if kind == "json":
        yield from _raw_tables(*_json_payloads(Path(unit["file"]).read_bytes()), rows)
        return
    data = _read_range(Path(unit["file"]), unit["start"], unit["stop"])
    if kind == "text":
        texts = paragraphs(_decode_text(data))
        yield from _raw_tables([TEXT] * len(texts), texts, rows)
        return
    try:  # jsonl
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError as exc:
        at = unit["start"] + exc.start
        yield from _raw_tables([FATAL], [f"byte {at} is not valid UTF-8 ({exc.reason})"], rows)
        return
    if lines[-1] == "":
        lines.pop()  # after the last newline
    yield from _raw_tables([LINE] * len(lines), lines, rows)


def _read_range(path: Path, start: int, stop: int) -> bytes:
    with path.open("rb") as fh:
        fh.seek(start)
        return fh.read(stop - start)


def _decode_text(data: bytes) -> str:
    """As `Path.read_text(encoding="utf-8", errors="replace")` reads it (universal newlines)."""
    return data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")


def _json_payloads(data: bytes) -> tuple[list[int], list[str]]:
    """A .json file: a list of objects or one object, else (not one JSON value) jsonl."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return [FATAL], [f"byte {exc.start} is not valid UTF-8 ({exc.reason})"]
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()
        return [LINE] * len(lines), lines
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return [FATAL], ["expected a list of objects"]
    return [JSON_VALUE] * len(value), [json.dumps(v) for v in value]


def _raw_tables(kinds: list[int], payloads: list[str], rows: int) -> Iterator[pa.Table]:
    import pyarrow as pa

    for a in range(0, len(kinds), max(1, rows)):
        yield pa.table({KIND: pa.array(kinds[a : a + rows], pa.int8()),
                        PAYLOAD: pa.array(payloads[a : a + rows], pa.large_string())})  # fmt: skip


def decode_rows(table: pa.Table) -> Iterator[tuple[int, Any]]:
    """(status, value) per raw row: (RECORD, a str or a column dict), (JSON_RECORD, a
    parsed JSON value), (BLANK, None) for a blank jsonl line, (BAD_JSON, the parser's
    message), (FATAL, a message about the whole file)."""
    if KIND not in table.column_names:
        for row in table.to_pylist():
            yield RECORD, row
        return
    for kind, payload in zip(table.column(KIND).to_pylist(), table.column(PAYLOAD).to_pylist(),
                             strict=True):  # fmt: skip
        if kind == TEXT:
            yield RECORD, payload
        elif kind == JSON_VALUE:
            yield JSON_RECORD, json.loads(payload)
        elif kind == LINE:
            if not payload.strip():
                yield BLANK, None
                continue
            try:
                yield JSON_RECORD, json.loads(payload)
            except json.JSONDecodeError as exc:
                yield BAD_JSON, exc.msg
        else:
            yield FATAL, payload


def row_error(where: str, status: int, message: str, line: int) -> DataError:
    """The DataError for a BAD_JSON or FATAL row (line: its 1-based line number)."""
    if status == BAD_JSON:
        return DataError(f"{where}: line {line} is not valid JSON ({message})")
    return DataError(f"{where}: {message}")


def iter_records(source: Source, batch_size: int = 512) -> Iterator[tuple[int, list]]:
    """The source's records, `batch_size` at most at a time, each batch with the 1-based
    number of its first record (blank jsonl lines are not records)."""
    line = record = 0
    for unit in source.units():
        for table in read_unit(unit, batch_size):
            batch: list = []
            first = record + 1
            for status, value in decode_rows(table):
                line += 1
                if status == BLANK:
                    continue
                if status in (BAD_JSON, FATAL):
                    raise row_error(source.where, status, value, line)
                record += 1
                batch.append(value)
            if batch:
                yield first, batch
    if record == 0 and source.kind in EMPTY_WHEN_NO_RECORDS:
        raise DataError(f"{source.where}: the file is empty")


# ---- documents (text) -------------------------------------------------------------------
def read_documents(path: str | Path, text_field: str, dataset: str) -> list[str]:
    """The non-empty documents of a jsonl, json, parquet, text file or saved HF dataset
    dir, as a list (for tests and small tools; the data stage streams instead)."""
    source = open_source(path, dataset, ((text_field, "text_field"),))
    docs = []
    for first, records in iter_records(source):
        for number, record in enumerate(records, first):
            if isinstance(record, str) and not source.json_records:
                text = record
            elif isinstance(record, dict) and text_field in record:
                if record[text_field] is None:
                    continue
                text = str(record[text_field])
            else:
                keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(
                    f"{source.where}: record {number} has no field '{text_field}' (it has: "
                    f"{keys}); set text_field in the dataset's config"
                )
            if text.strip():
                docs.append(text)
    if not docs:
        raise DataError(f"{source.where}: no non-empty documents in field '{text_field}'")
    return docs


def paragraphs(text: str) -> list[str]:
    """A text file's documents: blank-line-separated paragraphs, stripped."""
    parts = text.replace("\r\n", "\n").split("\n\n")
    return [p.strip() for p in parts if p.strip()]


# ---- the document-level split ---------------------------------------------------------
def split_documents(
    docs: list[str], validation_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """A seeded document-level split, so no document straddles train and validation."""
    train, (val,) = split_off(docs, {"validation": validation_fraction}, seed)
    return train, val


def split_three(
    docs: list[str], validation_fraction: float, test_fraction: float, seed: int
) -> tuple[list[str], list[str], list[str]]:
    """Train, validation and test, disjoint by document, from one seeded shuffle.

    Validation is the same documents `split_documents` holds out with this seed; test
    comes next in the shuffled order, so only train gives documents up to it.
    """
    train, (val, test) = split_off(
        docs, {"validation": validation_fraction, "test": test_fraction}, seed
    )
    return train, val, test


def split_off(
    docs: list[str], fractions: dict[str, float], seed: int
) -> tuple[list[str], list[list[str]]]:
    """The documents left over, and one held-out part per fraction (in the order given),
    taken one after another from a single seeded shuffle. Each part holds at least one
    document, rounded up from its fraction; every part keeps the documents' order."""
    part = split_assignment(len(docs), fractions, seed)
    held = [[d for d, p in zip(docs, part, strict=True) if p == k]
            for k in range(1, len(fractions) + 1)]  # fmt: skip
    return [d for d, p in zip(docs, part, strict=True) if p == 0], held


def split_assignment(count: int, fractions: dict[str, float], seed: int) -> np.ndarray:
    """`split_off`'s split of `count` documents without the documents: per document, 0
    for the part left over, k for the k-th fraction's part (int8)."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    sizes = [max(1, math.ceil(round(f * count, 9))) for f in fractions.values()]
    if sum(sizes) >= count:
        parts = " and a ".join(fractions)
        raise DataError(f"only {count} documents: too few to split off a {parts} part")
    part = np.zeros(count, dtype=np.int8)
    start = 0
    for k, size in enumerate(sizes, 1):
        part[np.asarray(order[start : start + size], dtype=np.int64)] = k
        start += size
    return part


# ---- packing (for callers that hold documents) --------------------------------------------
def tokenize_and_pack(docs: Iterable[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Token rows of shape [N, seq_len]: documents joined by EOS, the remainder dropped."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token_id; set one in its config")
    stream: list[int] = []
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == 256:
            _extend(stream, batch, tokenizer, eos)
            batch = []
    if batch:
        _extend(stream, batch, tokenizer, eos)
    rows = len(stream) // seq_len
    if rows == 0:
        return torch.empty((0, seq_len), dtype=torch.int32)
    return torch.tensor(stream[: rows * seq_len], dtype=torch.int32).view(rows, seq_len)


def _extend(stream: list[int], batch: list[str], tokenizer, eos: int) -> None:
    for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
