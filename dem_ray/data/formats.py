"""Dataset formats: a record becomes token ids and, for instruction data, a loss mask.

- `text`: the record's `text_field`; documents are later packed, joined by EOS, and
  every token carries loss.
- `prompt_completion`: prompt tokens, then completion tokens and EOS; only the
  completion and the EOS carry loss.
- `chat`: the conversation rendered with the base tokenizer's chat template (or the
  dataset's `chat_template` file); only the assistant turns carry loss: each turn's
  content and whatever the template emits after it up to the next turn (its
  end-of-turn tokens).

The assistant tokens are found by rendering: for the i-th message, when it is an
assistant turn, the conversation up to it with the generation prompt is the prefix,
and the conversation including it extends that prefix by exactly the turn. Templates
that render earlier turns differently once later ones follow (some strip reasoning
from past turns) break that and are refused with an error, rather than mislabelled.
Each piece is tokenized on its own (no special tokens added: the template writes its
own), so a label boundary never falls inside a token.

Instruction examples longer than `seq_len` are cut by one rule: drop tokens from the
left, but never the first response token nor the one before it (the prompt's end
predicts it); if the example is still too long, cut its end. An example left with no
loss-carrying token is dropped.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("text", "chat", "prompt_completion")
ROLES = ("system", "user", "assistant")


class RecordError(ValueError):
    """One record cannot be encoded; the caller adds the file and record number."""


@dataclass(frozen=True)
class FormatSpec:
    """What the encoder needs to know of a dataset's config (plain data, picklable)."""

    format: str = "text"
    text_field: str = "text"
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    chat_template: str | None = None  # the template's text, when the dataset gives one

    @property
    def instruction(self) -> bool:
        return self.format != "text"


@dataclass
class Example:
    """One encoded record. `mask[t]` is 1 when token t is a target of the loss; None for
    text, whose every token is one."""

    ids: list[int]
    mask: list[int] | None = None
    truncated: bool = False


@dataclass
class FormatStats:
    """What encoding did to a split's records, for the log and the manifest."""

    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    skipped: int = 0  # text records that were empty or null
    loss_tokens: int = 0
    longest: int = 0
    shortest: int | None = None

    def add(self, example: Example | None, length: int | None = None) -> None:
        """`length`: the example's token count before truncation."""
        if example is None:
            self.skipped += 1
            return
        if example.mask is not None and not any(example.mask[1:]):
            self.dropped += 1
            return
        self.examples += 1
        self.truncated += int(example.truncated)
        n = len(example.ids) if length is None else length
        self.longest = max(self.longest, n)
        self.shortest = n if self.shortest is None else min(self.shortest, n)
        self.loss_tokens += sum(example.mask[1:]) if example.mask is not None else len(example.ids)

    def as_dict(self) -> dict:
        return {
            "examples": self.examples,
            "truncated": self.truncated,
            "dropped": self.dropped,
            "skipped": self.skipped,
            "loss_tokens": self.loss_tokens,
            "longest": self.longest,
            "shortest": self.shortest or 0,
        }


def read_chat_template(path: str | Path, dataset: str) -> str:
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"dataset '{dataset}': chat_template {path}: file not found")
    return path.read_text(encoding="utf-8")


def check_tokenizer(spec: FormatSpec, tokenizer, dataset: str) -> None:
    """Problems of the tokenizer for this format, before any record is read."""
    if tokenizer.eos_token_id is None:
        raise RecordError(
            f"dataset '{dataset}': the tokenizer has no eos_token_id; set one in its config"
        )
    if spec.format == "chat" and not (spec.chat_template or tokenizer.chat_template):
        raise RecordError(
            f"dataset '{dataset}': format chat needs a chat template, and the base "
            "tokenizer has none; set `chat_template: PATH` (a Jinja file) on the dataset"
        )


class Encoder:
    """Records to `Example`s for one dataset: the same code in the driver and in Ray
    Data workers, so it holds only plain data and the tokenizer."""

    def __init__(self, spec: FormatSpec, tokenizer, seq_len: int) -> None:
        if spec.format not in FORMATS:
            raise ValueError(f"unknown format {spec.format!r}; use one of {', '.join(FORMATS)}")
        self.spec = spec
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.eos = tokenizer.eos_token_id

    def encode(self, record: Mapping | str) -> tuple[Example | None, int]:
        """The record's example (None: an empty text record, skipped) and its length
        in tokens before truncation. Raises RecordError for a bad record."""
        spec = self.spec
        if spec.format == "text":
            text = record if isinstance(record, str) else _field(record, spec.text_field,
                                                                 "text_field", allow_none=True)  # fmt: skip
            if text is None or not str(text).strip():
                return None, 0
            ids = self._tokens(str(text)) + [self.eos]
            return Example(ids), len(ids)
        if not isinstance(record, Mapping):
            raise RecordError(f"expected an object, got {type(record).__name__}")
        if spec.format == "prompt_completion":
            prompt = _text(record, spec.prompt_field, "prompt_field")
            completion = _text(record, spec.completion_field, "completion_field")
            pieces = [(prompt, False), (completion, True)]
            ids, mask = self._pieces(pieces)
            ids.append(self.eos)
            mask.append(1)
        else:
            ids, mask = self._pieces(self._chat_pieces(record))
        length = len(ids)
        return truncate(ids, mask, self.seq_len), length

    def _tokens(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _pieces(self, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        mask: list[int] = []
        for text, labelled in pieces:
            if not text:
                continue
            tokens = self._tokens(text)
            ids.extend(tokens)
            mask.extend([int(labelled)] * len(tokens))
        return ids, mask

    def _chat_pieces(self, record: Mapping) -> list[tuple[str, bool]]:
        messages = _field(record, self.spec.messages_field, "messages_field")
        messages = check_messages(messages)
        pieces: list[tuple[str, bool]] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self._render(messages[:i], generation_prompt=True)
            full = self._render(messages[: i + 1], generation_prompt=False)
            if not prefix.startswith(done) or not full.startswith(prefix):
                raise RecordError(
                    "the chat template renders earlier turns differently once later turns "
                    "follow, so the assistant tokens cannot be located; give the dataset a "
                    "`chat_template` that renders each turn the same wherever it stands"
                )
            pieces.append((prefix[len(done) :], False))
            pieces.append((full[len(prefix) :], True))
            done = full
        whole = self._render(messages, generation_prompt=False)
        if whole.startswith(done):
            pieces.append((whole[len(done) :], False))
        return pieces

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.spec.chat_template,
                tokenize=False,
                add_generation_prompt=generation_prompt,
            )
        except Exception as exc:  # noqa: BLE001 - a Jinja template raises anything
            raise RecordError(f"the chat template failed on this conversation: {exc}") from exc


def check_messages(messages) -> list[dict]:
    """A conversation's messages as plain dicts, or a RecordError that says what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise RecordError("the messages field must be a non-empty list of {role, content}")
    out = []
    for n, message in enumerate(messages, 1):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise RecordError(f"message {n} must be an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise RecordError(f"message {n} has role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RecordError(f"message {n}'s content must be a string")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise RecordError("the conversation has no assistant turn: nothing to train or score on")
    return out


def truncate(ids: list[int], mask: list[int], seq_len: int) -> Example:
    """The module docstring's rule: cut the left (keeping the first response token and
    the one before it), then the right."""
    if len(ids) <= seq_len:
        return Example(ids, mask)
    first = next((t for t, m in enumerate(mask) if m), len(mask))
    left = min(len(ids) - seq_len, max(0, first - 1))
    return Example(ids[left : left + seq_len], mask[left : left + seq_len], truncated=True)


def _field(record: Mapping, name: str, key: str, allow_none: bool = False):
    if not isinstance(record, Mapping) or name not in record:
        keys = ", ".join(map(str, record)) if isinstance(record, Mapping) else type(record).__name__
        raise RecordError(f"no field '{name}' (it has: {keys}); set {key} in the dataset's config")
    value = record[name]
    if value is None and not allow_none:
        raise RecordError(f"field '{name}' is null")
    return value


def _text(record: Mapping, name: str, key: str) -> str:
    value = _field(record, name, key)
    if not isinstance(value, str):
        raise RecordError(f"field '{name}' must be a string, not {type(value).__name__}")
    return value


@functools.lru_cache(maxsize=4)
def load_encoder(spec: FormatSpec, tokenizer_dir: str, seq_len: int, trust_remote_code: bool):
    """An Encoder over the tokenizer saved in `tokenizer_dir` (cached per process, so a
    Ray Data worker loads the tokenizer once)."""
    from dem_ray.models.base import load_tokenizer

    return Encoder(spec, load_tokenizer(Path(tokenizer_dir), trust_remote_code), seq_len)
