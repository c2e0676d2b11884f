"""Read a dataset's documents, tokenize them, and pack them into fixed-length rows.

Packing (documents joined by EOS, cut into `seq_len` rows) means no padding and
no attention mask, so every token of a batch is real: training sees exactly
`steps x batch x seq_len` tokens and validation perplexity counts real tokens.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst"}


class DataError(ValueError):
    """Unusable data; the message names the dataset and the file."""


def read_documents(path: str | Path, text_field: str, dataset: str) -> list[str]:
    """The non-empty documents of a jsonl, json, parquet, text file or saved HF dataset dir."""
    check_readable(path, dataset)
    path = Path(path)
    suffix = path.suffix.lower()
    where = f"dataset '{dataset}': {path}"
    if path.is_dir():
        docs = _read_dir(path, text_field, where)
    elif suffix == ".jsonl":
        docs = _field(_jsonl_rows(path, where), text_field, where)
    elif suffix == ".json":
        docs = _field(_json_rows(path, where), text_field, where)
    elif suffix == ".parquet":
        docs = _parquet_texts(path, text_field, where)
    else:  # a text file: check_readable refused every other kind
        docs = _paragraphs(path.read_text(encoding="utf-8", errors="replace"))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"{where}: no non-empty documents in field '{text_field}'")
    return docs


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
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    sizes = [max(1, math.ceil(round(f * len(docs), 9))) for f in fractions.values()]
    if sum(sizes) >= len(docs):
        parts = " and a ".join(fractions)
        raise DataError(f"only {len(docs)} documents: too few to split off a {parts} part")
    held, start = [], 0
    for size in sizes:
        held.append([docs[i] for i in sorted(order[start : start + size])])
        start += size
    return [docs[i] for i in sorted(order[start:])], held


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


def _read_dir(path: Path, text_field: str, where: str) -> list[str]:
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{where}: a DatasetDict without a 'train' split ({list(ds)})")
            ds = ds["train"]
        if text_field not in ds.column_names:
            raise DataError(
                f"{where}: no column '{text_field}' (columns: {', '.join(ds.column_names)}); "
                "set text_field"
            )
        return [str(t) for t in ds[text_field] if t is not None]
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{where}: a directory with neither a saved dataset nor text files")
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def _jsonl_rows(path: Path, where: str) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: line {number} is not valid JSON ({exc.msg})") from exc
    return rows


def _json_rows(path: Path, where: str) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return _jsonl_rows(path, where)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{where}: expected a list of objects")
    return data


def _field(rows: list, text_field: str, where: str) -> list[str]:
    if not rows:
        raise DataError(f"{where}: the file is empty")
    docs = []
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or text_field not in row:
            keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(
                f"{where}: record {number} has no field '{text_field}' (it has: {keys}); "
                "set text_field in the dataset's config"
            )
        if row[text_field] is not None:
            docs.append(str(row[text_field]))
    return docs


def _parquet_texts(path: Path, text_field: str, where: str) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if table.num_rows == 0:
        raise DataError(f"{where}: the file is empty")
    if text_field not in table.column_names:
        raise DataError(
            f"{where}: no column '{text_field}' (columns: {', '.join(table.column_names)}); "
            "set text_field"
        )
    return [str(t) for t in table.column(text_field).to_pylist() if t is not None]


def _paragraphs(text: str) -> list[str]:
    parts = text.replace("\r\n", "\n").split("\n\n")
    return [p.strip() for p in parts if p.strip()]
