"""Instruction formats: which tokens carry loss, the truncation rule, bad records, and
response-only perplexity against an independent per-example computation."""

from __future__ import annotations

import math
import re

import pytest
import torch

from dem_ray.core.perplexity import target_count, token_nll
from dem_ray.data.formats import (
    Encoder,
    FormatSpec,
    FormatStats,
    RecordError,
    check_tokenizer,
    truncate,
)
from dem_ray.models.base import load_model, load_tokenizer
from dem_ray.models.tiny import (
    CHATML_TEMPLATE,
    synthetic_instructions,
)


@pytest.fixture(scope="module")
def tokenizer(chat_base):
    return load_tokenizer(chat_base)


def labelled_text(tokenizer, example) -> str:
    return tokenizer.decode([i for i, m in zip(example.ids, example.mask, strict=True) if m])


def test_chat_labels_are_the_assistant_turns_found_independently(tokenizer) -> None:
    """The labelled tokens are exactly those whose characters lie in an assistant turn's
    content plus its `<|im_end|>\\n`, located by a regex on the whole rendering and
    tokenized as one string (offsets), not by the encoder's prefix rendering."""
    encoder = Encoder(FormatSpec(format="chat"), tokenizer, seq_len=10_000)
    for row in synthetic_instructions("letters", 12, seed=5):
        example, length = encoder.encode(row)
        assert not example.truncated and length == len(example.ids)
        whole = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        spans = [m.span(1) for m in re.finditer(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>\n)",
                                                whole, re.S)]  # fmt: skip
        enc = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
        expected = [int(any(a <= s < b for a, b in spans)) for s, _ in enc["offset_mapping"]]
        assert example.ids == enc["input_ids"]
        assert example.mask == expected
        assert sum(example.mask) > 0


def test_multi_turn_and_system_messages(tokenizer) -> None:
    row = {"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "alpha beta"},
        {"role": "assistant", "content": "gamma"},
        {"role": "user", "content": "delta"},
        {"role": "assistant", "content": "omega sigma"},
        {"role": "user", "content": "kappa"},
    ]}  # fmt: skip
    example, _ = Encoder(FormatSpec(format="chat"), tokenizer, 10_000).encode(row)
    assert labelled_text(tokenizer, example) == "gamma<|im_end|>\nomega sigma<|im_end|>\n"
    assert tokenizer.decode(example.ids) == tokenizer.apply_chat_template(
        row["messages"], tokenize=False
    )  # the trailing user turn is there, without loss


def test_prompt_completion_labels_completion_and_eos(tokenizer) -> None:
    spec = FormatSpec(format="prompt_completion", prompt_field="q", completion_field="a")
    example, _ = Encoder(spec, tokenizer, 10_000).encode({"q": "12 13 ->", "a": " 14 15"})
    prompt = tokenizer("12 13 ->", add_special_tokens=False)["input_ids"]
    completion = tokenizer(" 14 15", add_special_tokens=False)["input_ids"]
    assert example.ids == prompt + completion + [tokenizer.eos_token_id]
    assert example.mask == [0] * len(prompt) + [1] * (len(completion) + 1)


def test_an_explicit_chat_template_replaces_the_tokenizers(tokenizer) -> None:
    template = CHATML_TEMPLATE.replace("<|im_start|>", "[").replace("<|im_end|>", "]")
    example, _ = Encoder(FormatSpec(format="chat", chat_template=template), tokenizer,
                         10_000).encode({"messages": [{"role": "user", "content": "a"},
                                                      {"role": "assistant", "content": "b"}]})  # fmt: skip
    assert labelled_text(tokenizer, example) == "b]\n"


def test_truncation_cuts_the_prompt_from_the_left_then_the_response_end() -> None:
    ids = list(range(10))
    mask = [0] * 6 + [1] * 4
    short = truncate(ids, mask, 20)
    assert (short.ids, short.truncated) == (ids, False)
    cut = truncate(ids, mask, 7)  # 3 prompt tokens go; the response is whole
    assert cut.ids == [3, 4, 5, 6, 7, 8, 9] and cut.mask == [0, 0, 0, 1, 1, 1, 1]
    assert cut.truncated
    tight = truncate(ids, mask, 3)  # the token before the response stays; the end goes
    assert tight.ids == [5, 6, 7] and tight.mask == [0, 1, 1]


def test_stats_count_truncated_and_dropped() -> None:
    stats = FormatStats()
    stats.add(truncate(list(range(10)), [0] * 6 + [1] * 4, 7), 10)
    stats.add(truncate([1, 2], [1, 0], 8), 2)  # no target after position 0: dropped
    stats.add(None)
    assert stats.as_dict() == {"examples": 1, "truncated": 1, "dropped": 1, "skipped": 1,
                               "loss_tokens": 4, "longest": 10, "shortest": 10}  # fmt: skip


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ({"text": "hi"}, "no field 'messages'"),
        ({"messages": [{"role": "user", "content": "a"}]}, "no assistant turn"),
        ({"messages": [{"role": "bot", "content": "a"}]}, "role 'bot'"),
        ({"messages": [{"role": "user"}]}, "'role' and 'content'"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "assistant", "content": 3}]}, "must be a string"),
    ],
)
def test_bad_chat_records(tokenizer, row, words) -> None:
    with pytest.raises(RecordError, match=re.escape(words)):
        Encoder(FormatSpec(format="chat"), tokenizer, 64).encode(row)


def test_bad_prompt_completion_records(tokenizer) -> None:
    encoder = Encoder(FormatSpec(format="prompt_completion"), tokenizer, 64)
    with pytest.raises(RecordError, match="no field 'completion'.*completion_field"):
        encoder.encode({"prompt": "a"})
    with pytest.raises(RecordError, match="no field 'prompt'.*prompt_field"):
        encoder.encode({"completion": "a"})


def test_chat_without_a_template_says_to_set_chat_template(tiny_base, tokenizer) -> None:
    plain = load_tokenizer(tiny_base)
    with pytest.raises(RecordError, match="set `chat_template: PATH`"):
        check_tokenizer(FormatSpec(format="chat"), plain, "qa")
    check_tokenizer(FormatSpec(format="chat", chat_template=CHATML_TEMPLATE), plain, "qa")
    check_tokenizer(FormatSpec(format="chat"), tokenizer, "qa")


def test_a_template_that_rewrites_past_turns_is_refused(tokenizer) -> None:
    # Renders only the last assistant turn's content: earlier turns change once more follow.
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "<|im_start|>assistant\n<|im_end|>\n{% else %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}  # fmt: skip
    with pytest.raises(RecordError, match="renders earlier turns differently"):
        Encoder(FormatSpec(format="chat", chat_template=template), tokenizer, 64).encode(row)


def test_masked_perplexity_equals_independent_per_example_scoring(chat_base, tokenizer) -> None:
    """Right-padded rows scored in batches (cut after the last target) against each
    example scored alone, unpadded, with log_softmax: the same sum and count to 1e-4."""
    seq_len = 96
    encoder = Encoder(FormatSpec(format="chat"), tokenizer, seq_len)
    examples = [encoder.encode(r)[0] for r in synthetic_instructions("code", 10, seed=2)]
    pad = tokenizer.pad_token_id
    rows = torch.tensor([e.ids + [pad] * (seq_len - len(e.ids)) for e in examples])
    mask = torch.tensor([e.mask + [0] * (seq_len - len(e.mask)) for e in examples])
    model = load_model(chat_base, "cpu").eval()
    nll, count = token_nll(model, rows, batch_size=3, mask=mask)
    expected, n = 0.0, 0
    with torch.inference_mode():
        for e in examples:
            ids = torch.tensor([e.ids])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
            for t in range(1, len(e.ids)):
                if e.mask[t]:
                    expected -= float(logp[t - 1, e.ids[t]])
                    n += 1
    assert count == n == target_count(rows, mask)
    assert nll == pytest.approx(expected, rel=1e-4)
    assert math.isfinite(nll) and n < rows[:, 1:].numel()


def test_a_mixture_batch_of_text_and_instruction_rows(tmp_path) -> None:
    """Text rows beside instruction rows: every text token is a target, the instruction
    rows' masked tokens are not, and the batch is cut after its last target."""
    from safetensors.torch import save_file

    from dem_ray.data.shards import ShardReader
    from dem_ray.ray.finetune import labels_of, sample_batch, step_generator

    text = tmp_path / "text.safetensors"
    save_file({"input_ids": torch.full((3, 8), 7, dtype=torch.int32)}, str(text))
    chat = tmp_path / "chat.safetensors"
    mask = torch.tensor([[0, 0, 1, 1, 0, 0, 0, 0]] * 4, dtype=torch.uint8)
    save_file({"input_ids": torch.full((4, 8), 9, dtype=torch.int32), "loss_mask": mask},
              str(chat))  # fmt: skip
    shards = [ShardReader(text), ShardReader(chat)]
    probs = torch.tensor([0.5, 0.5], dtype=torch.float64)
    ids, got, counts = sample_batch(shards, probs, 16, step_generator(0, 0, 1))
    assert counts.tolist()[0] > 0 and counts.tolist()[1] > 0
    assert got[ids[:, 0] == 7].all() and torch.equal(got[ids[:, 0] == 9][0], mask[0].bool())
    batch, labels = labels_of(ids.long(), got)
    assert batch.shape[1] == 8  # a text row's last token is a target
    only_chat = sample_batch([shards[1]], torch.ones(1, dtype=torch.float64), 4,
                             step_generator(0, 0, 1))  # fmt: skip
    batch, labels = labels_of(only_chat[0].long(), only_chat[1])
    assert batch.shape[1] == 4 and labels.tolist() == [[-100, -100, 9, 9]] * 4
    plain = sample_batch([shards[0]], torch.ones(1, dtype=torch.float64), 2,
                         step_generator(0, 0, 1))  # fmt: skip
    assert plain[1] is None and labels_of(plain[0], None)[1] is plain[0]
