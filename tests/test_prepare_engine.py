"""The data stage's streaming engine: shards byte-identical to the old in-memory code,
local and Ray Data engines byte-identical to each other, record-numbered errors, bounded
memory, shard reading, and nothing on disk changed by a failing prepare."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from pathlib import Path

import pytest
import torch

from dem_ray.config import DatasetConfig, parse_config
from dem_ray.core.hashing import hash_json
from dem_ray.core.vectors import save_tensors
from dem_ray.data import engine, readers
from dem_ray.data.formats import FormatSpec
from dem_ray.data.readers import DataError, read_documents, split_off, tokenize_and_pack
from dem_ray.data.shards import ShardError, ShardReader, ShardWriter, load_shard
from dem_ray.models.base import load_tokenizer
from dem_ray.models.tiny import synthetic_corpus, synthetic_instructions, write_jsonl, write_rows
from dem_ray.pipeline import Pipeline
from dem_ray.stages.prepare import dataset_key

SPLITS = ("train", "validation", "test")
SEQ = 32


# ---- helpers ---------------------------------------------------------------------------------
def prepare(tmp_path: Path, base: Path, make_config, datasets: dict, run: str = "run",
            engine_name: str = "local", **finetune) -> Pipeline:  # fmt: skip
    """Run `prepare` on `datasets` ({name: dataset config}, beside a small text dataset
    `other`: a run mixes two or more) and return the pipeline."""
    other = tmp_path / "other.jsonl"
    if not other.exists():
        write_jsonl(other, synthetic_corpus("numbers", 40, seed=9))
    raw = make_config(tmp_path / run, base, {"other": other},
                      finetune={"seq_len": SEQ, **finetune},
                      prepare={"engine": engine_name, "num_cpus": 2})  # fmt: skip
    raw["datasets"].update({n: {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}
                            for n, d in datasets.items()})  # fmt: skip
    pipeline = Pipeline(parse_config(raw))
    pipeline.run(("prepare",))
    return pipeline


def shard_bytes(pipeline: Pipeline, name: str) -> dict[str, bytes]:
    return {s: pipeline.layout.shard(name, s).read_bytes() for s in SPLITS}


def old_shards(path: Path, tokenizer, name: str, out: Path, seed: int = 0, fractions=None,
               max_train: int | None = None) -> dict[str, bytes]:  # fmt: skip
    """What the data stage wrote before the engine: read every document, `split_off`,
    `tokenize_and_pack`, `save_tensors`."""
    docs = read_documents(path, "text", name)
    train, (val, test) = split_off(docs, fractions or {"validation": 0.15, "test": 0.1}, seed)
    train = train[:max_train] if max_train else train
    shards = {}
    for split, part in zip(SPLITS, (train, val, test), strict=True):
        rows = tokenize_and_pack(part, tokenizer, SEQ)
        save_tensors({"input_ids": rows}, out / f"{split}.safetensors",
                     {"dataset": name, "split": split})  # fmt: skip
        shards[split] = (out / f"{split}.safetensors").read_bytes()
    return shards


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".dem-ray.lock"}  # fmt: skip


def docs_with_blanks(count: int, seed: int) -> list[str]:
    docs = synthetic_corpus("code", count, seed=seed)
    for i in range(0, count, 7):
        docs[i] = "   "  # empty documents: skipped, not documents of the split
    return docs


# ---- shard files -------------------------------------------------------------------------------
def test_text_shard_is_byte_identical_to_save_tensors(tmp_path) -> None:
    rows = torch.randint(0, 5000, (37, 16), dtype=torch.int32)
    save_tensors(
        {"input_ids": rows}, tmp_path / "old.safetensors", {"dataset": "d", "split": "train"}
    )
    with ShardWriter(tmp_path / "new.safetensors", 16, {"dataset": "d", "split": "train"}) as w:
        stream = rows.reshape(-1).tolist() + [1, 2, 3]  # a remainder, dropped as packing does
        for a in range(0, len(stream), 11):  # documents of odd sizes across row boundaries
            w.add(stream[a : a + 11])
        assert w.num_rows == 37
        w.commit()
    assert (tmp_path / "new.safetensors").read_bytes() == (
        tmp_path / "old.safetensors"
    ).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_instruction_shard_pads_and_masks(tmp_path) -> None:
    path = tmp_path / "i.safetensors"
    examples = [([5, 6, 7], [0, 1, 1]), ([8] * 6, [0, 0, 0, 1, 1, 1]), ([9], [1])]
    with ShardWriter(path, 6, {"dataset": "d", "split": "validation", "format": "chat"},
                     masked=True, pad_id=0) as w:  # fmt: skip
        for ids, mask in examples:
            w.add(ids, mask)
        w.commit()
    ids, mask = load_shard(path)
    assert ids.dtype == torch.int32 and mask.dtype == torch.uint8
    assert ids.tolist() == [[5, 6, 7, 0, 0, 0], [8] * 6, [9, 0, 0, 0, 0, 0]]
    assert mask.tolist() == [[0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1], [1, 0, 0, 0, 0, 0]]
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata() == {"dataset": "d", "split": "validation", "format": "chat"}
    with pytest.raises(ValueError, match="does not fit"):
        ShardWriter(tmp_path / "x.safetensors", 2, {}, masked=True, pad_id=0).add(
            [1, 2, 3], [1, 1, 1]
        )


@pytest.mark.parametrize("masked", [False, True])
def test_shard_reader_rows_equal_load_shard(tmp_path, masked) -> None:
    path = tmp_path / "s.safetensors"
    gen = torch.Generator().manual_seed(0)
    with ShardWriter(path, 24, {"dataset": "d", "split": "train"}, masked=masked, pad_id=7) as w:
        for _ in range(50):
            n = int(torch.randint(1, 25, (1,), generator=gen))
            ids = torch.randint(0, 300, (n,), generator=gen).tolist()
            w.add(ids, torch.randint(0, 2, (n,), generator=gen).tolist() if masked else None)
        w.commit()
    ids, mask = load_shard(path)
    reader = ShardReader(path)
    assert (reader.num_rows, reader.seq_len, reader.has_mask) == (ids.shape[0], 24, masked)
    index = torch.tensor([3, 0, ids.shape[0] - 1, 3, 17])  # any order, with a repeat
    got, got_mask = reader.rows(index)
    assert got.dtype == torch.int32 and torch.equal(got, ids[index])
    if masked:
        assert got_mask.dtype == torch.uint8 and torch.equal(got_mask, mask[index])
    else:
        assert got_mask is None and mask is None
    assert reader.rows(torch.tensor([5]))[0].shape == (1, 24)
    with pytest.raises(IndexError):
        reader.rows(torch.tensor([ids.shape[0]]))
    import pickle

    assert torch.equal(pickle.loads(pickle.dumps(reader)).rows([2])[0], ids[[2]])


def test_files_that_are_not_shards_are_named(tmp_path) -> None:
    other = tmp_path / "weights.safetensors"
    save_tensors({"w": torch.zeros(2, 2)}, other)
    bad_mask = tmp_path / "mask.safetensors"
    save_tensors({"input_ids": torch.zeros(2, 4, dtype=torch.int32),
                  "loss_mask": torch.zeros(2, 3, dtype=torch.uint8)}, bad_mask)  # fmt: skip
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    for path, needle in ((other, "no 'input_ids'"), (bad_mask, "same shape"), (garbage, "JSON")):
        for read in (ShardReader, load_shard):
            with pytest.raises(ShardError, match=needle) as info:
                read(path)
            assert str(path) in str(info.value)


# ---- streaming reads: units cut anywhere give the same records --------------------------------
def test_text_paragraphs_are_the_same_whatever_the_units(tmp_path) -> None:
    path = tmp_path / "t.txt"
    text = ("  one\r\nline two \r\n\r\n\r\npara two\n\n\nthree\rwith cr\r\rfour\n \nstill four"
            "\n\n\n\n\u00e9t\u00e9 \xff\n\nlast")  # fmt: skip
    path.write_bytes(text.encode("utf-8", "surrogateescape").replace(b"\xc3\xbf", b"\xff") * 5)
    expected = readers.paragraphs(path.read_text(encoding="utf-8", errors="replace"))
    source = readers.open_source(path, "d")
    for unit_bytes in (1, 3, 7, 50, 10_000):
        got = [r for u in source.units(unit_bytes) for t in readers.read_unit(u, 4)
               for _, r in readers.decode_rows(t)]  # fmt: skip
        assert got == expected, unit_bytes
    assert len(source.units(7)) > 5


def test_jsonl_records_and_line_numbers_are_the_same_whatever_the_units(
    tmp_path, tokenizer
) -> None:
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": f"doc {i} \u2028 é"}, ensure_ascii=False) for i in range(40)]
    lines[9] = ""
    lines[20] = "  \r"
    lines[33] = '{"text": oops}'
    path.write_text("\n".join(lines) + "\n")
    spec = FormatSpec()
    for unit_bytes in (1, 40, 333, 1 << 20):
        source = readers.open_source(path, "d")
        with pytest.raises(DataError, match=r"line 34 is not valid JSON") as info:
            list(engine.encode_source(source, spec, SEQ, tokenizer=tokenizer, batch_size=3,
                                      unit_bytes=unit_bytes))  # fmt: skip
        assert f"dataset 'd': {path}: line 34" in str(info.value)


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    return load_tokenizer(tiny_base)


def test_reading_is_bounded_by_the_unit_and_batch(tmp_path, tokenizer, monkeypatch) -> None:
    """The driver never holds the file: raw tables are at most a batch, reads at most a
    unit (plus a line), and the Python heap grows far less than the file does."""
    reads, rows = [], []
    read_range, read_unit = readers._read_range, readers.read_unit

    def ranged(path, a, b):
        reads.append(b - a)
        return read_range(path, a, b)

    def counted(unit, n):
        for table in read_unit(unit, n):
            rows.append(table.num_rows)
            yield table

    monkeypatch.setattr(readers, "_read_range", ranged)
    monkeypatch.setattr(readers, "read_unit", counted)

    def peak_of(path: Path, count: int) -> int:
        source = readers.open_source(path, "big")
        tracemalloc.start()
        try:
            encoding = engine.encode_source(source, FormatSpec(), SEQ, tokenizer=tokenizer,
                                            batch_size=64, unit_bytes=100_000)  # fmt: skip
            with engine.ExampleSpool(tmp_path, masked=False) as spool:
                for batch in encoding:
                    assert len(batch) <= 64
                    spool.add(batch)
                assert spool.count == count
                assert (
                    sum(len(b) for b in spool.batches(max_tokens=5000, max_examples=256)) == count
                )
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small = write_jsonl(tmp_path / "small.jsonl", synthetic_corpus("letters", 2000, seed=4))
    big = write_jsonl(tmp_path / "big.jsonl", synthetic_corpus("letters", 8000, seed=4))
    peak_of(small, 2000)  # warm: imports and caches are not the engine's
    small_peak, big_peak = peak_of(small, 2000), peak_of(big, 8000)
    grown = big.stat().st_size - small.stat().st_size
    assert grown > 1_000_000
    assert big_peak - small_peak < grown / 8, (small_peak, big_peak, grown)
    assert max(rows) <= 64 and max(reads) <= 100_000 + 1000 and len(reads) > 10


# ---- prepare: byte-identical to the old code --------------------------------------------------
@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "txt", "hf_dir", "text_dir"])
def test_prepare_text_matches_the_old_code_byte_for_byte(kind, tmp_path, tiny_base, make_config,
                                                         tokenizer) -> None:  # fmt: skip
    docs = docs_with_blanks(120, seed=5)
    path = tmp_path / f"d.{kind}"
    if kind == "jsonl":
        write_jsonl(path, docs)
    elif kind == "json":
        path.write_text(json.dumps([{"text": d, "n": i} for i, d in enumerate(docs)]))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs + [None]}), path, row_group_size=17)
    elif kind == "txt":
        path.write_text("\n\n".join(d.replace("\n", "\r\n") for d in docs))
    elif kind == "hf_dir":
        import datasets

        datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(path))
    else:
        path.mkdir()
        for i, doc in enumerate(docs):
            (path / f"{i:04d}.txt").write_text(doc + "\n\n" + doc)  # one document per file
    old = old_shards(path, tokenizer, "d", tmp_path, fractions={"validation": 0.2, "test": 0.1},
                     max_train=60)  # fmt: skip
    pipeline = prepare(tmp_path, tiny_base, make_config, {"d": {
        "path": path, "validation_fraction": 0.2, "test_fraction": 0.1,
        "max_train_documents": 60}})  # fmt: skip
    assert shard_bytes(pipeline, "d") == old
    entry = pipeline.manifest.entry("data/d")
    assert entry["train_documents"] == 60 and entry["format"] == "text"
    assert entry["format_stats"]["train"]["examples"] == 60
    assert entry["validation_documents"] == entry["format_stats"]["validation"]["examples"]


def test_prepare_with_separate_files_matches_the_old_code(tmp_path, tiny_base, make_config,
                                                          tokenizer) -> None:  # fmt: skip
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_corpus("code", 80, seed=1))
    val = write_jsonl(tmp_path / "val.jsonl", synthetic_corpus("code", 20, seed=2))
    pipeline = prepare(tmp_path, tiny_base, make_config, {"d": {
        "path": train, "validation_path": val, "test_fraction": 0.1}})  # fmt: skip
    docs = read_documents(train, "text", "d")
    rest, (test,) = split_off(docs, {"test": 0.1}, 0)
    expected = {"train": rest, "validation": read_documents(val, "text", "d"), "test": test}
    for split, part in expected.items():
        save_tensors({"input_ids": tokenize_and_pack(part, tokenizer, SEQ)},
                     tmp_path / "old.safetensors", {"dataset": "d", "split": split})  # fmt: skip
        assert shard_bytes(pipeline, "d")[split] == (tmp_path / "old.safetensors").read_bytes()


def test_a_text_dataset_keeps_its_input_hash() -> None:
    """The step's `dataset` input of a text dataset from a file is what it was before the
    formats and the Hub were added (so an existing run dir does not prepare again)."""
    ds = DatasetConfig(path="d.jsonl", validation_fraction=0.2, max_train_documents=5)
    old = {"path": "d.jsonl", "text_field": "text", "validation_path": None,
           "validation_fraction": 0.2, "test_path": None, "test_fraction": 0.1,
           "max_train_documents": 5}  # fmt: skip
    assert hash_json(dataset_key(ds)) == hash_json(old)
    chat = DatasetConfig(path="d.jsonl", format="chat")
    assert dataset_key(chat)["format"] == "chat"
    hub = DatasetConfig(hub="org/name", subset="s")
    assert dataset_key(hub)["hub"] == "org/name" and dataset_key(hub)["subset"] == "s"


# ---- local and Ray Data: the same bytes, the same errors ---------------------------------------
def instruction_files(tmp_path: Path, kind: str) -> dict:
    train = write_rows(tmp_path / f"{kind}.jsonl", synthetic_instructions("letters", 60, seed=1,
                                                                           kind=kind))  # fmt: skip
    return {"path": train, "format": kind, "validation_fraction": 0.15}


@pytest.mark.parametrize("kind", ["text", "chat", "prompt_completion"])
def test_local_and_ray_engines_write_the_same_bytes(kind, ray_session, tmp_path, tiny_base,
                                                    chat_base, make_config) -> None:  # fmt: skip
    if kind == "text":
        base = tiny_base
        dataset = {"path": write_jsonl(tmp_path / "t.jsonl", docs_with_blanks(150, seed=3))}
        seq = {}
    else:
        base, dataset, seq = chat_base, instruction_files(tmp_path, kind), {"seq_len": 96}
    local = prepare(tmp_path, base, make_config, {"d": dataset}, "local", "local", **seq)
    ray = prepare(tmp_path, base, make_config, {"d": dataset}, "ray", "ray", **seq)
    assert ray.manifest.entry("data/d")["engine"] == "ray"
    assert shard_bytes(local, "d") == shard_bytes(ray, "d")
    stats = [p.manifest.entry("data/d")["format_stats"] for p in (local, ray)]
    assert stats[0] == stats[1]
    if kind != "text":
        ids, mask = load_shard(local.layout.shard("d", "validation"))
        assert ids.shape == mask.shape and ids.shape[1] == 96
        assert stats[0]["validation"]["examples"] == ids.shape[0] == 9  # ceil(0.15 * 60)


@pytest.mark.parametrize("kind", ["jsonl", "txt", "parquet", "hf_dir", "chat"])
def test_many_units_over_ray_give_the_local_examples(kind, ray_session, tmp_path, tiny_base,
                                                     chat_base) -> None:  # fmt: skip
    """Cut into many units (more than the workers), the Ray engine's examples, in order,
    are the local engine's, for every kind of source Ray reads in its workers."""
    docs = docs_with_blanks(300, seed=8)
    base, spec = tiny_base, FormatSpec()
    if kind == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", docs)
    elif kind == "txt":
        path = tmp_path / "d.txt"
        path.write_text("\n\n".join(docs))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "d.parquet"
        pq.write_table(pa.table({"text": docs}), path, row_group_size=20)
    elif kind == "hf_dir":
        import datasets

        path = tmp_path / "hf"
        datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(path))
    else:
        base, spec = chat_base, FormatSpec(format="chat")
        path = write_rows(tmp_path / "c.jsonl", synthetic_instructions("letters", 80, seed=2))
    source = readers.open_source(path, "d", engine.format_fields(spec))
    tokenizer = load_tokenizer(base)

    def examples(engine_name: str, unit_bytes: int):
        encoding = engine.encode_source(source, spec, 64, engine=engine_name,
                                        tokenizer=tokenizer, tokenizer_dir=base,
                                        num_cpus=2, batch_size=16, unit_bytes=unit_bytes)  # fmt: skip
        batches = list(encoding)
        out = [torch.cat([torch.from_numpy(getattr(b, k).copy()) for b in batches])
               for k in ("ids", "lengths", "truncated")]  # fmt: skip
        if spec.instruction:
            out.append(torch.cat([torch.from_numpy(b.mask.copy()) for b in batches]))
        return out, encoding.records, encoding.skipped

    local, ray = examples("local", 1 << 20), examples("ray", 1500)
    assert all(torch.equal(a, b) for a, b in zip(local[0], ray[0], strict=True))
    assert local[1:] == ray[1:]
    assert len(source.units(1500)) > 4


def bad_record_file(tmp_path: Path, kind: str) -> tuple[Path, int, str]:
    """A file whose record `n` is bad, after blank lines (which are not records)."""
    if kind == "text":
        rows = [{"text": t} for t in synthetic_corpus("code", 30, seed=1)]
        rows[11] = {"body": "no text here", "id": 3}
        needle = "no field 'text' (it has: body, id); set text_field"
    else:
        rows = synthetic_instructions("letters", 30, seed=1, kind=kind)
        rows[11] = {"messages": [{"role": "user", "content": "hello"}]}
        needle = "no assistant turn"
    path = tmp_path / f"bad-{kind}.jsonl"
    lines = [json.dumps(r) for r in rows]
    path.write_text("\n".join(lines[:5]) + "\n\n\n" + "\n".join(lines[5:]) + "\n")
    return path, 12, needle


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_a_bad_record_is_named_alike_by_both_engines(kind, ray_session, tmp_path, tiny_base,
                                                      chat_base) -> None:  # fmt: skip
    base = tiny_base if kind == "text" else chat_base
    path, number, needle = bad_record_file(tmp_path, kind)
    spec = FormatSpec(format=kind)
    source = readers.open_source(path, "mine", engine.format_fields(spec))
    messages = []
    for engine_name in ("local", "ray"):
        with pytest.raises(DataError) as info:
            list(engine.encode_source(source, spec, 64, engine=engine_name,
                                      tokenizer=load_tokenizer(base), tokenizer_dir=base,
                                      num_cpus=2, batch_size=4, unit_bytes=500))  # fmt: skip
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"dataset 'mine': {path}: record {number}: ")
    assert needle in messages[0]


# ---- the Hub path, offline -------------------------------------------------------------------
def test_a_hub_dataset_is_read_like_its_file(tmp_path, tiny_base, make_config, monkeypatch) -> None:
    """`hub: DIR` goes through `datasets.load_dataset(DIR)` (its json builder for a
    train.jsonl: the Hub's code path) and gives the shards of `path: DIR/train.jsonl`."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    hub_dir = tmp_path / "hubdata"
    write_jsonl(hub_dir / "train.jsonl", docs_with_blanks(90, seed=6))
    by_path = prepare(tmp_path, tiny_base, make_config, {"d": {"path": hub_dir / "train.jsonl"}})
    by_hub = prepare(tmp_path, tiny_base, make_config, {"d": {"hub": str(hub_dir)}}, "hub")
    assert shard_bytes(by_hub, "d") == shard_bytes(by_path, "d")
    assert any((tmp_path / "hf-cache").iterdir())
    with pytest.raises(DataError, match="hub .*cannot be loaded.*split 'nope'"):
        prepare(tmp_path, tiny_base, make_config, {"d": {"hub": str(hub_dir), "split": "nope"}},
                "hub2")  # fmt: skip


# ---- errors of a whole split; nothing changed on disk -----------------------------------------
def test_every_example_truncated_names_dataset_split_lengths(tmp_path, chat_base, make_config):
    dataset = instruction_files(tmp_path, "chat")
    with pytest.raises(DataError) as info:
        prepare(tmp_path, chat_base, make_config, {"qa": dataset}, seq_len=8)
    message = str(info.value)
    assert message.startswith("dataset 'qa': every example of the validation split of ")
    assert "longer than finetune.seq_len (8 tokens; the shortest has " in message
    assert "raise finetune.seq_len" in message


def test_a_split_with_every_example_dropped(tmp_path, chat_base, make_config) -> None:
    dataset = instruction_files(tmp_path, "prompt_completion")
    empty = write_rows(tmp_path / "empty-val.jsonl", [{"prompt": "", "completion": ""}] * 3)
    dataset.update(validation_path=empty)
    with pytest.raises(DataError) as info:
        prepare(tmp_path, chat_base, make_config, {"qa": dataset}, seq_len=96)
    assert f"dataset 'qa': the validation split of {empty} has no example left: all 3" in str(
        info.value
    )


def test_a_failing_prepare_leaves_the_run_dir_as_it_was(tmp_path, tiny_base, make_config) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", synthetic_corpus("code", 100, seed=1))
    pipeline = prepare(tmp_path, tiny_base, make_config, {"d": {"path": path}})
    before = snapshot(pipeline.run_dir)
    assert any(k.startswith("data/") for k in before)
    lines = path.read_text().splitlines()
    lines[70] = json.dumps({"body": "x"})  # a bad record after most of the work is done
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"record 71: no field 'text'"):
        prepare(tmp_path, tiny_base, make_config, {"d": {"path": path}})
    after = snapshot(pipeline.run_dir)
    kept = {k: v for k, v in before.items() if k != "manifest.json"}
    assert {k: after.get(k) for k in kept} == kept
    assert set(after) <= set(before)  # no temp file or spool left behind
