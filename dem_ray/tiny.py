"""Tiny models and data made on the spot: for tests, benchmarks and smoke runs offline.

The tokenizer is a real byte-level BPE trained on the given text; the model is a
real transformers architecture with random weights, saved as an HF directory.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

import torch

ARCHITECTURES = ("llama", "gpt2", "qwen2")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 384):
    """A byte-level BPE tokenizer with <|endoftext|> as BOS/EOS/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def make_tiny_model(
    out_dir: Path,
    texts: Iterable[str],
    architecture: str = "llama",
    hidden: int = 32,
    layers: int = 2,
    vocab_size: int = 384,
    tie_embeddings: bool = True,
    seed: int = 0,
) -> Path:
    """Save a tiny causal LM with a tokenizer trained on `texts` to `out_dir`."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    tokenizer = train_tokenizer(texts, vocab_size)
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    common = {"vocab_size": vocab, "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
    common = {**common, "tie_word_embeddings": tie_embeddings}
    if architecture in ("llama", "qwen2"):
        config_class = LlamaConfig if architecture == "llama" else Qwen2Config
        config = config_class(
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **common,
        )
    elif architecture == "gpt2":
        config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, **common)
    else:
        raise ValueError(f"unknown architecture {architecture!r}; use one of {ARCHITECTURES}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def synthetic_corpus(style: str, count: int, seed: int = 0) -> list[str]:
    """Small distinct text distributions made from templates (for tests only)."""
    rng = random.Random(f"{style}-{seed}")
    if style == "numbers":
        return [
            " ".join(str(rng.randint(0, 99)) for _ in range(rng.randint(20, 60)))
            for _ in range(count)
        ]
    if style == "letters":
        words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa"]
        return [
            " ".join(rng.choice(words) for _ in range(rng.randint(15, 40))) for _ in range(count)
        ]
    if style == "code":
        names = ["x", "y", "total", "item", "value", "count"]
        return [
            "\n".join(
                f"{rng.choice(names)} = {rng.choice(names)} + {rng.randint(0, 9)}"
                for _ in range(rng.randint(4, 12))
            )
            for _ in range(count)
        ]
    raise ValueError(f"unknown style {style!r}")


def write_jsonl(path: Path, texts: Iterable[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for text in texts:
            fh.write(json.dumps({field: text}) + "\n")
    return path
