"""Bad instruction data fails in `prepare`, names the dataset, file and record, and leaves
the shards an earlier prepare wrote byte for byte as they were."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_bad_input import assert_untouched, run_cli, snapshot

from dem_ray.models.tiny import CHATML_TEMPLATE, synthetic_instructions, write_rows


@pytest.fixture
def prepared(tmp_path, chat_base, make_config, capsys):
    """A run dir already prepared from good chat and prompt/completion data."""
    data = {
        "qa": write_rows(tmp_path / "qa.jsonl", synthetic_instructions("letters", 40, seed=1)),
        "sums": write_rows(tmp_path / "sums.jsonl", synthetic_instructions(
            "numbers", 40, seed=1, kind="prompt_completion")),
    }  # fmt: skip
    raw = make_config(tmp_path / "run", chat_base, data, finetune={"seq_len": 192})
    raw["datasets"]["qa"]["format"] = "chat"
    raw["datasets"]["sums"]["format"] = "prompt_completion"
    config = tmp_path / "config.yaml"

    def prepare(config_data: dict) -> tuple[int, str]:
        config.write_text(json.dumps(config_data))
        return run_cli(capsys, "prepare", config)

    code, err = prepare(raw)
    assert code == 0, err
    return raw, prepare, tmp_path / "run", data


def expect(prepared, raw: dict, *needles: str) -> None:
    _, prepare, run_dir, _ = prepared
    before = snapshot(run_dir)
    assert any(k.startswith("data/") for k in before)
    code, err = prepare(raw)
    assert code != 0
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert_untouched(before, snapshot(run_dir))


def rewrite(path: Path, index: int, row: dict) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[index] = row
    write_rows(path, rows)


def test_a_row_without_the_messages_field(prepared):
    raw, _, _, data = prepared
    rewrite(data["qa"], 2, {"conversation": []})
    expect(prepared, raw, "dataset 'qa'", str(data["qa"]), "record 3", "no field 'messages'",
           "set messages_field")  # fmt: skip


def test_a_conversation_with_no_assistant_turn(prepared):
    raw, _, _, data = prepared
    rewrite(data["qa"], 0, {"messages": [{"role": "user", "content": "hello"}]})
    expect(prepared, raw, "dataset 'qa'", "record 1", "no assistant turn")


def test_an_unknown_role(prepared):
    raw, _, _, data = prepared
    rewrite(data["qa"], 5, {"messages": [{"role": "user", "content": "a"},
                                         {"role": "bot", "content": "b"}]})  # fmt: skip
    expect(prepared, raw, "dataset 'qa'", "record 6", "role 'bot'", "system, user, assistant")


def test_chat_with_a_tokenizer_without_a_template(prepared, tiny_base):
    raw, _, _, _ = prepared
    raw = {**raw, "base_model": str(tiny_base)}
    expect(prepared, raw, "dataset 'qa'", "has none", "set `chat_template: PATH`")


def test_a_missing_chat_template_file(prepared, tmp_path):
    raw, _, _, _ = prepared
    raw["datasets"]["qa"]["chat_template"] = str(tmp_path / "nope.jinja")
    expect(prepared, raw, "dataset 'qa'", "nope.jinja", "not found")


def test_an_explicit_chat_template_is_an_input_of_the_data_step(prepared, tmp_path):
    raw, prepare, run_dir, _ = prepared
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML_TEMPLATE)
    raw["datasets"]["qa"]["chat_template"] = str(template)
    assert prepare(raw)[0] == 0
    before = (run_dir / "data" / "qa.train.safetensors").read_bytes()
    template.write_text(CHATML_TEMPLATE.replace("<|im_end|>", " <|im_end|>"))  # another rendering
    code, err = prepare(raw)
    assert code == 0, err
    assert (run_dir / "data" / "qa.train.safetensors").read_bytes() != before


@pytest.mark.parametrize("field", ["prompt", "completion"])
def test_a_missing_prompt_or_completion_field(prepared, field):
    raw, _, _, data = prepared
    rewrite(data["sums"], 3, {"prompt" if field == "completion" else "completion": "1 2"})
    expect(prepared, raw, "dataset 'sums'", "record 4", f"no field '{field}'",
           f"set {field}_field")  # fmt: skip


def test_every_example_longer_than_seq_len(prepared):
    raw, _, _, _ = prepared
    raw["finetune"]["seq_len"] = 4
    expect(prepared, raw, "dataset '", "longer than", "finetune.seq_len")


def test_chat_template_on_a_text_dataset_is_a_config_error(prepared, tmp_path):
    raw, _, _, _ = prepared
    raw["datasets"]["sums"]["chat_template"] = str(tmp_path / "t.jinja")
    expect(prepared, raw, "datasets.sums", "`chat_template` is for `format: chat` only")
