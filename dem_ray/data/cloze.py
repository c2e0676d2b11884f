"""Local lm-evaluation-harness multiple-choice cloze tasks built from held-out corpus rows.

Each item shows a passage's beginning (`context`) and asks which of a few `choices` truly
continues it: the passage's own continuation, or continuations taken from the *other* corpora.
A model fine-tuned on a corpus should prefer its corpus's continuations, so the accuracy on
`cloze_<name>` measures, offline, how well a model has picked up corpus `name`.

`cloze_item(fmt, record)` cuts one row of a corpus (any of `corpora.FORMATS`) into (context,
continuation); `build_cloze_tasks(held_out, out_dir)` writes `out_dir/cloze/cloze_<name>.jsonl`
and a task YAML for lm-eval 0.4 (`lm_eval --include_path out_dir/cloze --tasks cloze_<name>`).
lm-eval joins context and choice with one space, so contexts never end with whitespace and
continuations never start with it.

This module is pure Python plus PyYAML: it does not import lm_eval, torch or ray.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from dem_ray.core.atomic import atomic_file

logger = logging.getLogger("dem_ray.data.cloze")

__all__ = [
    "CONTEXT_CHARS",
    "CONTINUATION_CHARS",
    "build_cloze_tasks",
    "cloze_item",
    "make_cloze_items",
    "task_name",
    "write_cloze_tasks",
]

# A context is at most about this many characters, a continuation at most about this many;
# both are cut at whitespace, so they may be a little shorter.
CONTEXT_CHARS = 400
CONTINUATION_CHARS = 160
# A text row shorter than CONTEXT_CHARS + CONTINUATION_CHARS is split in the same proportion;
# it gives no item if its context or continuation would be shorter than these.
MIN_CONTEXT_CHARS = 20
MIN_CONTINUATION_CHARS = 10
# How a chat row's turns are labelled in its plain-text context.
ROLE_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}
CLOZE_DIR = "cloze"

Record = dict[str, Any]
Item = dict[str, Any]


# --------------------------------------------------------------------------------------------
# Cutting one row into (context, continuation)


def cloze_item(fmt: str, record: Record) -> tuple[str, str] | None:
    """(context, continuation) from one corpus row of format `fmt`, or None if it makes none.

    - `text`: the first ~CONTEXT_CHARS characters and the ~CONTINUATION_CHARS after them,
      both cut at whitespace (a text shorter than both together is split in the same
      proportion); None if either part would be too short.
    - `prompt_completion`: the prompt's last ~CONTEXT_CHARS characters (cut at a line or
      whitespace boundary) and the completion's first ~CONTINUATION_CHARS.
    - `chat`: the last assistant message's first ~CONTINUATION_CHARS characters; the context
      is the turns before it as 'System: ...' / 'User: ...' / 'Assistant: ...' lines ending
      with 'Assistant:' (its last ~CONTEXT_CHARS characters).  None if the last assistant
      message is not preceded by another message.

    Both parts are non-empty; the context never ends, the continuation never starts, with
    whitespace.
    """
    if fmt == "text":
        pair = _text_item(record["text"])
    elif fmt == "prompt_completion":
        pair = (
            _tail(record["prompt"], CONTEXT_CHARS),
            _head(record["completion"], CONTINUATION_CHARS),
        )
    elif fmt == "chat":
        pair = _chat_item(record["messages"])
    else:
        raise ValueError(f"unknown format {fmt!r}; known formats: text, chat, prompt_completion")
    if pair is None:
        return None
    context, continuation = pair[0].rstrip(), pair[1].strip()
    if not context.strip() or not continuation:
        return None
    return context, continuation


def _text_item(text: str) -> tuple[str, str] | None:
    text = text.strip()
    total = CONTEXT_CHARS + CONTINUATION_CHARS
    limit = CONTEXT_CHARS if len(text) >= total else len(text) * CONTEXT_CHARS // total
    context = _head(text, limit)
    continuation = _head(text[len(context) :].lstrip(), CONTINUATION_CHARS)
    if len(context) < MIN_CONTEXT_CHARS or len(continuation) < MIN_CONTINUATION_CHARS:
        return None
    return context, continuation


def _chat_item(messages: list[dict[str, str]]) -> tuple[str, str] | None:
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last < 1:
        return None
    lines = [
        f"{ROLE_LABELS.get(m['role'], m['role'].title())}: {m['content'].strip()}"
        for m in messages[:last]
    ]
    lines.append(f"{ROLE_LABELS['assistant']}:")
    context = _tail("\n".join(lines), CONTEXT_CHARS)
    return context, _head(messages[last]["content"], CONTINUATION_CHARS)


def _head(text: str, limit: int) -> str:
    """`text`'s first `limit` characters or fewer, cut at whitespace (hard cut if there is
    none), without trailing whitespace."""
    text = text.lstrip()
    if len(text) <= limit:
        return text.rstrip()
    if text[limit].isspace():
        return text[:limit].rstrip()
    cut = next((i for i in range(limit - 1, 0, -1) if text[i].isspace()), 0)
    return (text[:cut] if cut > 0 else text[:limit]).rstrip()


def _tail(text: str, limit: int) -> str:
    """`text`'s last `limit` characters or fewer, starting at a line boundary if one is in the
    window's first half, else at whitespace (hard cut if there is none), stripped."""
    text = text.rstrip()
    if len(text) <= limit:
        return text.strip()
    start = len(text) - limit
    window = text[start:]
    if text[start - 1] == "\n":
        return window.strip()
    newline = window.find("\n")
    if 0 <= newline < limit // 2:
        return window[newline + 1 :].strip()
    if text[start - 1].isspace():
        return window.strip()
    space = next((i for i, ch in enumerate(window) if ch.isspace()), -1)
    return (window[space + 1 :] if space != -1 else window).strip()


# --------------------------------------------------------------------------------------------
# Items and task files


def task_name(name: str) -> str:
    """The lm-eval task name of corpus `name`'s cloze task."""
    return f"cloze_{name}"


def make_cloze_items(
    held_out: Mapping[str, tuple[str, list[Record]]], choices: int = 4, seed: int = 0
) -> dict[str, list[Item]]:
    """`{name: [{"context", "choices", "label"}, ...]}` for each corpus of `held_out`.

    `held_out` maps a corpus name to (format, rows).  Every row that makes a `cloze_item`
    gives one item: its true continuation and `choices - 1` distractors drawn without
    replacement from the other corpora's (distinct) continuations, never equal to the true
    one (fewer if the other corpora have fewer, but at least one), in a seeded random order;
    `label` is the true continuation's index.  Deterministic for a given `seed`.
    """
    if choices < 2:
        raise ValueError(f"a cloze task needs at least 2 choices, got {choices}")
    if len(held_out) < 2:
        raise ValueError(
            "cloze tasks need at least 2 corpora (distractors come from the other corpora), "
            f"got {len(held_out)}: {', '.join(held_out) or '(none)'}"
        )
    pairs: dict[str, list[tuple[str, str]]] = {}
    for name, (fmt, rows) in held_out.items():
        pairs[name] = [p for p in (cloze_item(fmt, r) for r in rows) if p is not None]
    result: dict[str, list[Item]] = {}
    for name, own in pairs.items():
        if not own:
            n_rows = len(held_out[name][1])
            raise ValueError(f"corpus {name!r}: none of its {n_rows} rows makes a cloze item")
        # The other corpora's continuations, distinct, in a fixed order (corpus names sorted).
        pool = list(
            dict.fromkeys(c for other in sorted(pairs) if other != name for _, c in pairs[other])
        )
        rng = random.Random(f"cloze:{seed}:{name}")  # str seeds hash with sha512: stable
        items: list[Item] = []
        for context, truth in own:
            candidates = [c for c in pool if c != truth]
            if not candidates:
                raise ValueError(
                    f"corpus {name!r}: the other corpora have no continuation to use as a "
                    "distractor"
                )
            options = [truth, *rng.sample(candidates, min(choices - 1, len(candidates)))]
            rng.shuffle(options)
            items.append({"context": context, "choices": options, "label": options.index(truth)})
        result[name] = items
    return result


def write_cloze_tasks(items: Mapping[str, list[Item]], out_dir: str | Path) -> dict[str, Path]:
    """Write `out_dir/cloze/cloze_<name>.jsonl` and `.yaml` for each corpus of `items` (as
    `make_cloze_items` returns them), each atomically; return `{name: yaml path}`."""
    folder = Path(out_dir) / CLOZE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, rows in items.items():
        data = folder / f"{task_name(name)}.jsonl"
        with atomic_file(data, encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False))
                f.write("\n")
        others = [n for n in items if n != name]
        n_choices = max((len(r["choices"]) for r in rows), default=0)
        config = {
            "task": task_name(name),
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": "{{context}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "label",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
            "metadata": {
                "version": 1.0,
                "description": (
                    f"Cloze on {len(rows)} held-out {name} passages: pick the true "
                    f"continuation among {n_choices} choices; distractors from "
                    f"{', '.join(others)}."
                ),
            },
        }
        task = folder / f"{task_name(name)}.yaml"
        with atomic_file(task, encoding="utf-8", newline="\n") as f:
            yaml.safe_dump(config, f, sort_keys=False, allow_unicode=True, width=1000)
        logger.debug("cloze task %s: %d items -> %s", task_name(name), len(rows), task)
        paths[name] = task
    return paths


def build_cloze_tasks(
    held_out: dict[str, tuple[str, list[Record]]],
    out_dir: Path,
    choices: int = 4,
    seed: int = 0,
) -> dict[str, Path]:
    """Make the cloze items of every corpus of `held_out` (name -> (format, rows)) and write
    them as lm-eval tasks under `out_dir/cloze/`; return `{name: yaml path}`.  See
    `make_cloze_items` and `write_cloze_tasks`."""
    return write_cloze_tasks(make_cloze_items(held_out, choices, seed), out_dir)
