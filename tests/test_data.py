"""Tests for dem_ray.data.readers: reading every supported format, splitting, and packing tokens."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from dem_ray.data.readers import DataError, read_documents, split_documents, tokenize_and_pack
from dem_ray.models.tiny import synthetic_corpus, train_tokenizer, write_jsonl

DOCS = ["first document", "second one\nwith two lines", "third"]


@pytest.fixture(scope="module")
def tokenizer():
    texts = synthetic_corpus("numbers", 40, seed=1) + synthetic_corpus("code", 40, seed=1)
    return train_tokenizer(texts, vocab_size=300)


def error_of(path: Path, text_field: str = "text") -> str:
    with pytest.raises(DataError) as info:
        read_documents(path, text_field, "mine")
    message = str(info.value)
    assert str(path) in message, message
    assert "dataset 'mine'" in message
    return message


# -- read_documents: formats ------------------------------------------------------


def test_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", DOCS)
    assert read_documents(path, "text", "d") == DOCS


def test_jsonl_custom_field_skips_blank_lines_and_empty_docs(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"body": "a", "id": 1}, {"body": "   "}, {"body": None}, {"body": 12}, {"body": "b"}]
    path.write_text(
        "\n".join(json.dumps(r) for r in rows[:2])
        + "\n\n\n"
        + "\n".join(json.dumps(r) for r in rows[2:])
        + "\n"
    )
    assert read_documents(str(path), "body", "d") == ["a", "12", "b"]


def test_json_list(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": d} for d in DOCS]))
    assert read_documents(path, "text", "d") == DOCS


def test_json_single_object(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"text": "only"}))
    assert read_documents(path, "text", "d") == ["only"]


def test_jsonl_inside_dot_json(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    assert read_documents(path, "text", "d") == DOCS


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": DOCS + [None], "n": [1, 2, 3, 4]}), path)
    assert read_documents(path, "content", "d") == DOCS


def test_parquet_missing_column(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": DOCS}), path)
    message = error_of(path)
    assert "no column 'text'" in message
    assert "content" in message


def test_parquet_empty(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": pa.array([], type=pa.string())}), path)
    assert "empty" in error_of(path)


@pytest.mark.parametrize("suffix", [".txt", ".md"])
def test_text_paragraphs(tmp_path: Path, suffix) -> None:
    path = tmp_path / f"d{suffix}"
    path.write_text("  para one\nline two  \n\n\n\npara two\r\n\r\npara three\n\n   \n")
    assert read_documents(path, "ignored", "d") == [
        "para one\nline two",
        "para two",
        "para three",
    ]


def test_directory_of_text_files(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "sub" / "a.md").write_text("ay")
    (tmp_path / "skip.csv").write_text("no")
    (tmp_path / "empty.txt").write_text("  \n")
    assert read_documents(tmp_path, "text", "d") == ["bee", "ay"]


def test_directory_without_data(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("a,b")
    assert "neither a saved dataset nor text files" in error_of(tmp_path)


def test_hf_dataset_dir(tmp_path: Path) -> None:
    import datasets

    out = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": DOCS, "label": [0, 1, 2]}).save_to_disk(str(out))
    assert read_documents(out, "text", "d") == DOCS


def test_hf_dataset_dict_uses_train_split(tmp_path: Path) -> None:
    import datasets

    out = tmp_path / "dd"
    datasets.DatasetDict(
        {
            "validation": datasets.Dataset.from_dict({"text": ["val doc"]}),
            "train": datasets.Dataset.from_dict({"text": DOCS}),
        }
    ).save_to_disk(str(out))
    assert read_documents(out, "text", "d") == DOCS


def test_hf_dataset_dict_without_train(tmp_path: Path) -> None:
    import datasets

    out = tmp_path / "dd"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": DOCS})}).save_to_disk(
        str(out)
    )
    message = error_of(out)
    assert "'train'" in message and "test" in message


def test_hf_dataset_missing_column(tmp_path: Path) -> None:
    import datasets

    out = tmp_path / "ds"
    datasets.Dataset.from_dict({"content": DOCS}).save_to_disk(str(out))
    message = error_of(out)
    assert "no column 'text'" in message and "content" in message


# -- read_documents: errors -------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    assert "not found" in error_of(tmp_path / "absent.jsonl")


@pytest.mark.parametrize("name", ["e.jsonl", "e.json"])
def test_empty_json_files(tmp_path: Path, name) -> None:
    path = tmp_path / name
    path.write_text("")
    assert "empty" in error_of(path)


def test_empty_text_file(tmp_path: Path) -> None:
    path = tmp_path / "e.txt"
    path.write_text("\n\n   \n")
    assert "no non-empty documents" in error_of(path)


def test_only_blank_documents(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "b.jsonl", ["", "  ", "\n"])
    assert "no non-empty documents in field 'text'" in error_of(path)


def test_absent_text_field_names_field_and_keys(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x", "id": 3}) + "\n")
    message = error_of(path)
    assert "record 2 has no field 'text'" in message
    assert "it has: body, id" in message


def test_record_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps(["just a string"]))
    assert "record 1 has no field 'text' (it has: str)" in error_of(path)


def test_json_scalar_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text("42")
    assert "expected a list of objects" in error_of(path)


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pkl", ".pickle"])
def test_pickle_refused(tmp_path: Path, suffix) -> None:
    path = tmp_path / f"data{suffix}"
    path.write_bytes(pickle.dumps([{"text": "x"}]))
    assert "pickle files are refused" in error_of(path)


def test_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text\nhello\n")
    message = error_of(path)
    assert "unknown file type '.csv'" in message


def test_invalid_json_line_number(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": oops}\n{"text": "c"}\n')
    assert "line 4 is not valid JSON" in error_of(path)


def test_invalid_json_line_in_dot_json(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('{"text": "a"}\n{broken\n')
    assert "line 2 is not valid JSON" in error_of(path)


# -- split_documents --------------------------------------------------------------


def test_split_deterministic_disjoint_covering() -> None:
    docs = [f"doc {i}" for i in range(50)]
    train, val = split_documents(docs, 0.2, seed=7)
    assert len(val) == 10 and len(train) == 40
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == sorted(docs)
    # Both parts keep the documents' original order.
    assert train == [d for d in docs if d in set(train)]
    assert val == [d for d in docs if d in set(val)]
    assert split_documents(docs, 0.2, seed=7) == (train, val)
    assert split_documents(docs, 0.2, seed=8)[1] != val


def test_split_rounds_validation_up_and_keeps_one() -> None:
    docs = [str(i) for i in range(10)]
    assert len(split_documents(docs, 0.25, 0)[1]) == 3  # ceil(2.5)
    assert len(split_documents(docs, 0.01, 0)[1]) == 1  # at least one
    assert split_documents(["a", "b"], 0.05, 0)[0] in (["a"], ["b"])


def test_split_size_exact_for_decimal_fraction() -> None:
    docs = [str(i) for i in range(100)]
    assert len(split_documents(docs, 0.07, 0)[1]) == 7


@pytest.mark.parametrize("count", [0, 1])
def test_split_too_few_documents(count) -> None:
    with pytest.raises(DataError, match="too few"):
        split_documents(["x"] * count, 0.05, 0)


def test_split_fraction_taking_everything() -> None:
    with pytest.raises(DataError, match="only 3 documents"):
        split_documents(["a", "b", "c"], 0.9, 0)


# -- tokenize_and_pack ------------------------------------------------------------


def expected_stream(tokenizer, docs) -> list[int]:
    stream: list[int] = []
    for doc in docs:
        stream += tokenizer.encode(doc, add_special_tokens=False)
        stream.append(tokenizer.eos_token_id)
    return stream


@pytest.mark.parametrize("seq_len", [2, 7, 16])
def test_pack_rows_equal_eos_joined_stream(tokenizer, seq_len) -> None:
    docs = synthetic_corpus("code", 12, seed=3)
    stream = expected_stream(tokenizer, docs)
    rows = tokenize_and_pack(docs, tokenizer, seq_len)
    n = len(stream) // seq_len
    assert n > 0
    assert rows.shape == (n, seq_len)
    assert rows.dtype == torch.int32
    assert rows.reshape(-1).tolist() == stream[: n * seq_len]


def test_pack_crosses_tokenizer_batches(tokenizer) -> None:
    docs = [f"x = {i}" for i in range(600)]  # more than the 256-document batch
    stream = expected_stream(tokenizer, docs)
    assert stream.count(tokenizer.eos_token_id) == 600
    rows = tokenize_and_pack(iter(docs), tokenizer, 32)
    assert rows.shape == (len(stream) // 32, 32)
    assert rows.reshape(-1).tolist() == stream[: rows.numel()]


def test_pack_exact_multiple_keeps_every_token(tokenizer) -> None:
    docs = ["x = 1"]
    stream = expected_stream(tokenizer, docs)
    rows = tokenize_and_pack(docs, tokenizer, len(stream))
    assert rows.tolist() == [stream]


def test_pack_too_few_tokens_is_empty(tokenizer) -> None:
    docs = ["x"]
    stream = expected_stream(tokenizer, docs)
    rows = tokenize_and_pack(docs, tokenizer, len(stream) + 1)
    assert rows.shape == (0, len(stream) + 1)
    assert rows.dtype == torch.int32
    assert tokenize_and_pack([], tokenizer, 4).shape == (0, 4)


def test_pack_needs_eos() -> None:
    class NoEos:
        eos_token_id = None

    with pytest.raises(DataError, match="eos_token_id"):
        tokenize_and_pack(["a"], NoEos(), 4)
