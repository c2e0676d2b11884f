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


# A ChatML template, as many instruction-tuned bases ship: each turn between
# <|im_start|>ROLE and <|im_end|>, the generation prompt an open assistant turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 384, chat: bool = False):
    """A byte-level BPE tokenizer with <|endoftext|> as BOS/EOS/pad; with `chat`, also
    ChatML's turn markers as special tokens and `CHATML_TEMPLATE` as its chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", *(CHAT_TOKENS if chat else ())],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(CHAT_TOKENS) if chat else None,
    )
    if chat:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def make_tiny_model(
    out_dir: Path,
    texts: Iterable[str],
    architecture: str = "llama",
    hidden: int = 32,
    layers: int = 2,
    vocab_size: int = 384,
    tie_embeddings: bool = True,
    seed: int = 0,
    chat: bool = False,
) -> Path:
    """Save a tiny causal LM with a tokenizer trained on `texts` to `out_dir` (with
    `chat`, a tokenizer with a ChatML chat template)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    tokenizer = train_tokenizer(texts, vocab_size, chat=chat)
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


def pretrain_tiny_model(
    model_dir: Path,
    texts: Iterable[str],
    steps: int = 200,
    seq_len: int = 32,
    batch_size: int = 16,
    learning_rate: float = 3e-3,
    seed: int = 0,
) -> Path:
    """Train a tiny model in place on packed `texts` (CPU, seconds): a base that has
    learned something, so fine-tunes specialise it the way they would a real base."""
    from transformers import AutoModelForCausalLM

    from dem_ray.core.atomic import atomic_dir
    from dem_ray.data.readers import tokenize_and_pack
    from dem_ray.models.base import copy_tokenizer, load_tokenizer

    model_dir = Path(model_dir)
    tokenizer = load_tokenizer(model_dir)
    rows = tokenize_and_pack(list(texts), tokenizer, seq_len).long()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = rows[torch.randint(rows.shape[0], (batch_size,), generator=generator)]
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with atomic_dir(model_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        copy_tokenizer(model_dir, tmp)
    return model_dir


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


def synthetic_instructions(style: str, count: int, seed: int = 0, kind: str = "chat") -> list:
    """Instruction rows built from `synthetic_corpus(style)` (for tests only): `chat` rows
    of one to three user/assistant exchanges, some with a system message, or
    `prompt_completion` rows (a document's first half, then the rest)."""
    docs = synthetic_corpus(style, count * 3, seed)
    rng = random.Random(f"{style}-{seed}-{kind}")
    rows = []
    for i in range(count):
        doc = docs[i].split()
        cut = max(1, len(doc) // 2)
        if kind == "prompt_completion":
            rows.append(
                {"prompt": " ".join(doc[:cut]) + " ->", "completion": " " + " ".join(doc[cut:])}
            )
            continue
        messages = [{"role": "system", "content": f"continue the {style}"}] if i % 3 == 0 else []
        for turn in range(rng.randint(1, 3)):
            words = docs[(i + turn * count) % len(docs)].split()
            half = max(1, len(words) // 2)
            messages.append({"role": "user", "content": " ".join(words[:half])})
            messages.append({"role": "assistant", "content": " ".join(words[half:]) or "ok"})
        rows.append({"messages": messages})
    if kind not in ("chat", "prompt_completion"):
        raise ValueError(f"unknown kind {kind!r}; use 'chat' or 'prompt_completion'")
    return rows


def write_rows(path: Path, rows: Iterable[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return path


def write_jsonl(path: Path, texts: Iterable[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for text in texts:
            fh.write(json.dumps({field: text}) + "\n")
    return path


# GGUF names of a Llama's tensors: llama.cpp's spelling of the HF parameter names.
_GGUF_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_GGUF_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_GGUF_TOKEN_NORMAL, _GGUF_TOKEN_CONTROL = 1, 3


def make_tiny_gguf(
    out_path: Path,
    texts: Iterable[str],
    hidden: int = 64,
    layers: int = 2,
    vocab_size: int = 384,
    seed: int = 0,
    architecture: str = "llama",
) -> tuple[Path, Path]:
    """A tiny Llama written as an F32 GGUF file, and the HF directory it was made from.

    Tests of the GGUF loader need a real file without downloading one; the HF twin
    (saved beside it as `<stem>.hf/`) is what the converted model must equal.
    `architecture` is written as general.architecture, to make files that no loader knows.
    """
    out_path = Path(out_path)
    source = make_tiny_model(
        out_path.with_name(f"{out_path.stem}.hf"),
        texts,
        hidden=hidden,
        layers=layers,
        vocab_size=vocab_size,
        seed=seed,
    )
    return write_llama_gguf(source, out_path, architecture), source


def write_llama_gguf(hf_dir: Path, out_path: Path, architecture: str = "llama") -> Path:
    """Write a Llama HF directory (byte-level BPE tokenizer) as a GGUF file, F32 throughout."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    hf_dir, out_path = Path(hf_dir), Path(out_path)
    config = AutoConfig.from_pretrained(str(hf_dir))
    writer = gguf.GGUFWriter(str(out_path), architecture)
    _add_llama_hyperparameters(writer, config)
    _add_byte_level_tokenizer(writer, json.loads((hf_dir / "tokenizer.json").read_text()), config)
    for path in sorted(hf_dir.glob("*.safetensors")):  # one file, or HF shards
        for name, tensor in load_file(path).items():
            writer.add_tensor(_gguf_tensor_name(name), _to_gguf_layout(name, tensor, config))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


def _add_llama_hyperparameters(writer, config) -> None:
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def _add_byte_level_tokenizer(writer, tokenizer_json: dict, config) -> None:
    """Vocabulary, merges and special ids as llama.cpp stores a GPT-2 style BPE."""
    model = tokenizer_json["model"]
    by_id = {index: token for token, index in model["vocab"].items()}
    special = {t["id"]: t["content"] for t in tokenizer_json["added_tokens"] if t["special"]}
    by_id.update(special)
    tokens = [by_id[i] for i in range(len(by_id))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [_GGUF_TOKEN_CONTROL if i in special else _GGUF_TOKEN_NORMAL for i in range(len(tokens))]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)


def _gguf_tensor_name(hf_name: str) -> str:
    if hf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[hf_name]
    _, _, index, rest = hf_name.split(".", 3)  # model.layers.<i>.<rest>
    return f"blk.{index}.{_GGUF_LAYER_NAMES[rest]}"


def _to_gguf_layout(hf_name: str, tensor: torch.Tensor, config):
    """llama.cpp interleaves the rotary halves of q and k rows; transformers undoes it on load."""
    array = tensor.to(torch.float32)
    if hf_name.endswith("q_proj.weight"):
        array = _interleave_rotary(array, config.num_attention_heads)
    elif hf_name.endswith("k_proj.weight"):
        array = _interleave_rotary(array, config.num_key_value_heads)
    return array.contiguous().numpy()


def _interleave_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Per head, rows [first half, second half] -> pairs (first[i], second[i]) side by side."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)
