"""prepare: the base model as a local HF directory, and each dataset as packed token shards."""

from __future__ import annotations

import logging
from pathlib import Path

from dem_ray.config import BaseModelSpec
from dem_ray.core.hashing import hash_json
from dem_ray.core.vectors import save_tensors
from dem_ray.data import readers
from dem_ray.models.base import (
    base_kind,
    base_path,
    check_model_dir,
    load_tokenizer,
    materialize_base,
)
from dem_ray.stages.base import RunContext, Stage, Step, Timer

log = logging.getLogger(__name__)


class BaseStage(Stage):
    name = "base"
    command = "prepare"
    outputs = "`base/` (a GGUF or Hub base; a local directory is used where it is)"
    invalidated_by = {
        "base_model": "`base_model` (its location and kind), the files of a local base "
        "directory (names, sizes, times) or a GGUF file's size and time, `trust_remote_code`",
    }

    def steps(self, ctx: RunContext) -> list[Step]:
        return [Step("base", {"base_model": base_fingerprint(ctx.cfg.base_model,
                                                              ctx.cfg.trust_remote_code)})]  # fmt: skip

    def run(self, ctx: RunContext, todo: list[Step]) -> None:
        [step] = todo
        timer = Timer()
        base = materialize_base(ctx.cfg.base_model, ctx.layout.base, ctx.cfg.trust_remote_code)
        check_model_dir(base, role="base model")
        root = ctx.layout.root
        inside = base.resolve().is_relative_to(root)
        ctx.record(
            step,
            [base] if inside else [],
            cost={"wall_seconds": timer.wall},
            extra={
                "path": str(base.resolve().relative_to(root) if inside else base.resolve()),
                "fingerprint": hash_json(dir_fingerprint(base)),
            },
        )


class DataStage(Stage):
    name = "data"
    command = "prepare"
    outputs = "`data/<name>.{train,validation,test}.safetensors`"
    invalidated_by = {
        "dataset": "the dataset's keys under `datasets.<name>`",
        "files": "the content (sha256) of its `path`, `validation_path` and `test_path`",
        "seq_len": "`finetune.seq_len`",
        "seed": "`finetune.seed` (the validation and test splits)",
        "base": "the prepared base (its tokenizer)",
    }

    def steps(self, ctx: RunContext) -> list[Step]:
        steps = []
        for name, ds in ctx.cfg.datasets.items():
            files = [ctx.data_path(ds.path)]
            if ds.validation_path:
                files.append(ctx.data_path(ds.validation_path))
            if ds.test_path:
                files.append(ctx.data_path(ds.test_path))
            inputs = {
                "dataset": ds.model_dump(),
                "files": [ctx.file_digest(f) for f in files],
                "seq_len": ctx.cfg.finetune.seq_len,
                "seed": ctx.cfg.finetune.seed,
                "base": ctx.base_fingerprint(),
            }
            steps.append(Step(f"data/{name}", inputs, reads=(ctx.base_dir,),
                              payload={"name": name}))  # fmt: skip
        return steps

    def run(self, ctx: RunContext, todo: list[Step]) -> None:
        tokenizer = load_tokenizer(ctx.base_dir, ctx.cfg.trust_remote_code)
        for step in todo:
            prepare_dataset(ctx, step, step.payload["name"], tokenizer)


def prepare_dataset(ctx: RunContext, step: Step, name: str, tokenizer) -> None:
    ds = ctx.cfg.datasets[name]
    seq_len = ctx.cfg.finetune.seq_len
    train_docs, val_docs, test_docs = split_dataset(ctx, name)
    if ds.max_train_documents is not None:
        train_docs = train_docs[: ds.max_train_documents]
    train = readers.tokenize_and_pack(train_docs, tokenizer, seq_len)
    val = readers.tokenize_and_pack(val_docs, tokenizer, seq_len)
    test = readers.tokenize_and_pack(test_docs, tokenizer, seq_len)
    for split, rows, given, fraction in (
        ("validation", val, ds.validation_path, "validation_fraction"),
        ("test", test, ds.test_path, "test_fraction"),
    ):
        if rows.shape[0] == 0:
            raise readers.DataError(
                f"dataset '{name}': the {split} split of {given or ds.path} has fewer than "
                f"{seq_len} tokens, too few for one sequence of finetune.seq_len; raise "
                f"{fraction} or give a larger {split}_path"
            )
    if train.shape[0] == 0:
        raise readers.DataError(
            f"dataset '{name}': {ds.path} has fewer than {seq_len} training tokens after "
            "tokenization; give more text or a smaller finetune.seq_len"
        )
    outputs = []
    for split, rows in (("train", train), ("validation", val), ("test", test)):
        path = ctx.layout.shard(name, split)
        save_tensors({"input_ids": rows}, path, {"dataset": name, "split": split})
        outputs.append(path)
    log.info("data %s: %d train, %d validation, %d test rows of %d tokens -> %s", name,
             train.shape[0], val.shape[0], test.shape[0], seq_len,
             ctx.show(outputs[0].parent))  # fmt: skip
    ctx.record(
        step,
        outputs,
        extra={
            "train_rows": int(train.shape[0]),
            "validation_rows": int(val.shape[0]),
            "test_rows": int(test.shape[0]),
            "train_documents": len(train_docs),
            "validation_documents": len(val_docs),
            "test_documents": len(test_docs),
        },
    )


def split_dataset(ctx: RunContext, name: str) -> tuple[list[str], list[str], list[str]]:
    """Train, validation and test documents, disjoint by document.

    A split without its own file is held out of `path` by a seeded document-level split
    (`finetune.seed`); with neither file, validation and test come from one shuffle.
    """
    ds = ctx.cfg.datasets[name]
    seed = ctx.cfg.finetune.seed

    def read(path: str) -> list[str]:
        return readers.read_documents(ctx.data_path(path), ds.text_field, name)

    docs = read(ds.path)
    fractions = {}
    if not ds.validation_path:
        fractions["validation"] = ds.validation_fraction
    if not ds.test_path:
        fractions["test"] = ds.test_fraction
    held: dict[str, list[str]] = {}
    train = docs
    if fractions:
        try:
            train, parts = readers.split_off(docs, fractions, seed)
        except readers.DataError as exc:
            raise readers.DataError(f"dataset '{name}': {ds.path}: {exc}") from exc
        held = dict(zip(fractions, parts, strict=True))
    val = held["validation"] if "validation" in held else read(ds.validation_path)
    test = held["test"] if "test" in held else read(ds.test_path)
    return train, val, test


def base_fingerprint(spec: BaseModelSpec, trust_remote_code: bool) -> dict:
    """What the prepared base depends on. Only location and resolved kind go in, so a
    `.gguf` string and `{gguf: same path}` count as the same input."""
    kind = base_kind(spec)
    fingerprint = {"spec": spec.location, "kind": kind, "trust": trust_remote_code}
    if kind == "dir":
        fingerprint["files"] = dir_fingerprint(base_path(spec))
    elif kind == "gguf":
        path = base_path(spec)
        fingerprint["gguf"] = (str(path), path.stat().st_size, path.stat().st_mtime_ns)
    return fingerprint


def dir_fingerprint(path: Path) -> list:
    """Names, sizes and mtimes of a model dir's files: cheap, and changes when they do."""
    return [
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(Path(path).iterdir())
        if p.is_file()
    ]
