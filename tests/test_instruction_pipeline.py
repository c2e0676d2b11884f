"""DEM end to end on instruction data: a chat dataset and a prompt/completion dataset.

The report's perplexities are checked against an independent computation: every
validation and test example encoded again here (the assistant spans found by a regex on
the rendered conversation, the prompt and completion tokenized apart), scored alone and
unpadded, response tokens only."""

from __future__ import annotations

import math
import re

import pytest
import torch
from safetensors.torch import load_file

from dem_ray.config import parse_config
from dem_ray.models.base import load_tokenizer
from dem_ray.models.tiny import synthetic_instructions, write_rows
from dem_ray.pipeline import Pipeline

SEQ_LEN = 192


@pytest.fixture(scope="module")
def instructed(ray_session, chat_base, make_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("instruct")
    files = {}
    for name, style, kind in (("qa", "letters", "chat"), ("sums", "numbers", "prompt_completion")):
        for split, seed, count in (("train", 1, 80), ("val", 2, 10), ("test", 3, 12)):
            rows = synthetic_instructions(style, count, seed=seed, kind=kind)
            files[name, split] = write_rows(root / f"{name}.{split}.jsonl", rows)
    raw = make_config(root / "run", chat_base, {},
                      finetune={"max_steps": 6, "seq_len": SEQ_LEN, "batch_size": 4},
                      search={"num_trials": 3, "max_concurrent": 1},
                      evaluator={"max_validation_sequences": None, "batch_size": 3},
                      baseline={"grid_step": 0.5, "steps": 4})  # fmt: skip
    raw["datasets"] = {
        name: {"path": str(files[name, "train"]), "validation_path": str(files[name, "val"]),
               "test_path": str(files[name, "test"]), "format": kind}
        for name, kind in (("qa", "chat"), ("sums", "prompt_completion"))
    }  # fmt: skip
    pipeline = Pipeline(parse_config(raw))
    pipeline.run()
    return pipeline, files


def independent_examples(path, kind: str, tokenizer) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) per example, written out from the README's rule, not the encoder."""
    import json

    out = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if kind == "chat":
            whole = tokenizer.apply_chat_template(row["messages"], tokenize=False)
            spans = [m.span(1) for m in
                     re.finditer(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>\n)", whole, re.S)]  # fmt: skip
            enc = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
            ids = enc["input_ids"]
            mask = [int(any(a <= s < b for a, b in spans)) for s, _ in enc["offset_mapping"]]
        else:
            prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
            ids = prompt + completion + [tokenizer.eos_token_id]
            mask = [0] * len(prompt) + [1] * (len(completion) + 1)
        assert len(ids) <= SEQ_LEN  # the data is sized so that the truncation rule is not in play
        out.append((ids, mask))
    return out


def score_alone(model_dir, examples) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    nll, count = 0.0, 0
    with torch.inference_mode():
        for ids, mask in examples:
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            for t in range(1, len(ids)):
                if mask[t]:
                    nll -= float(logp[t - 1, ids[t]])
                    count += 1
    return nll, count


def test_report_perplexities_equal_independent_response_only_scoring(instructed, chat_base):
    pipeline, files = instructed
    report = pipeline.report()
    tokenizer = load_tokenizer(chat_base)
    kinds = {"qa": "chat", "sums": "prompt_completion"}
    models = {"base": pipeline.ctx.base_dir, "dem": pipeline.layout.merged,
              "finetuned/qa": pipeline.layout.finetune("qa"),
              "baseline/best": pipeline.layout.best_mixture}  # fmt: skip
    for split, key, tokens in (
        ("val", "ppl", "validation_tokens"),
        ("test", "test_ppl", "test_tokens"),
    ):
        for name, kind in kinds.items():
            examples = independent_examples(files[name, split], kind, tokenizer)
            every = sum(len(ids) - 1 for ids, _ in examples)
            for label, path in models.items():
                nll, count = score_alone(path, examples)
                assert report[tokens][name] == count < every  # response tokens only
                assert report[key][label][name] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_shards_hold_one_padded_example_per_row_with_its_mask(instructed):
    pipeline, files = instructed
    for name in ("qa", "sums"):
        shard = load_file(pipeline.layout.shard(name, "validation"))
        assert shard["input_ids"].shape == shard["loss_mask"].shape
        assert shard["input_ids"].shape == (10, SEQ_LEN)
        stats = pipeline.manifest.entry(f"data/{name}")["format_stats"]
        assert stats["validation"]["examples"] == 10 and stats["validation"]["truncated"] == 0


def test_merged_model_is_base_plus_weighted_vectors(instructed, chat_base):
    pipeline, _ = instructed
    weights = pipeline.report()["best_weights"]
    base = load_file(chat_base / "model.safetensors")
    merged = load_file(pipeline.layout.merged / "model.safetensors")
    vectors = {n: load_file(pipeline.layout.vector(n)) for n in pipeline.names}
    for key, value in base.items():
        expected = value.double() + sum(weights[n] * vectors[n][key].double() for n in vectors)
        torch.testing.assert_close(merged[key].double(), expected, atol=1e-6, rtol=1e-6)


def test_finetunes_trained_on_responses(instructed):
    """A specialist beats the base on its own data's responses, and its loss was finite."""
    pipeline, _ = instructed
    report = pipeline.report()
    for name in ("qa", "sums"):
        assert report["ppl"][f"finetuned/{name}"][name] < report["ppl"]["base"][name]
        assert math.isfinite(pipeline.manifest.entry(f"finetune/{name}")["final_loss"])
