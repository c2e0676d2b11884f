"""prepare: the base model as a local HF directory, and each dataset as token shards
(packed text, or one padded instruction example per row with its loss mask)."""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path

from dem_ray.config import BaseModelSpec, DatasetConfig
from dem_ray.core.hashing import hash_json
from dem_ray.data import engine, readers
from dem_ray.data.formats import FormatSpec, RecordError, check_tokenizer, read_chat_template
from dem_ray.data.shards import ShardWriter, commit_shards
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
        "files": "the content (sha256) of its `path`, `validation_path`, `test_path` and "
        "`chat_template` (a `hub` dataset: its id, subset and split)",
        "seq_len": "`finetune.seq_len`",
        "seed": "`finetune.seed` (the validation and test splits)",
        "base": "the prepared base (its tokenizer)",
    }

    def steps(self, ctx: RunContext) -> list[Step]:
        steps = []
        for name, ds in ctx.cfg.datasets.items():
            files = [ctx.data_path(p) for p in (ds.path, ds.validation_path, ds.test_path) if p]
            digests = [ctx.file_digest(f) for f in files]
            if ds.chat_template:  # its text renders every conversation; prepare names a missing one
                template = ctx.data_path(ds.chat_template)
                digests.append(ctx.file_digest(template) if template.is_file() else "missing")
            if ds.hub and ctx.data_path(ds.hub).exists():  # `hub: DIR`, a local dataset
                digests.append(ctx.file_digest(ctx.data_path(ds.hub)))
            inputs = {
                "dataset": dataset_key(ds),
                "files": digests,
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


def dataset_key(ds: DatasetConfig) -> dict:
    """The dataset's config as the step hashes it: keys added with the formats and the Hub
    are left out while they hold their defaults, so a text dataset from a file keeps the
    input hash it had before they existed (its shards are the same bytes)."""
    dump = ds.model_dump()
    fields = DatasetConfig.model_fields
    return {k: v for k, v in dump.items() if k in _KEYS_BEFORE_FORMATS or v != fields[k].default}


_KEYS_BEFORE_FORMATS = frozenset({
    "path", "text_field", "validation_path", "validation_fraction", "test_path",
    "test_fraction", "max_train_documents",
})  # fmt: skip


def format_spec(ctx: RunContext, name: str) -> FormatSpec:
    """The encoder's view of a dataset's config (with its chat template file's text)."""
    ds = ctx.cfg.datasets[name]
    template = None
    if ds.chat_template:
        try:
            template = read_chat_template(ctx.data_path(ds.chat_template), name)
        except RecordError as exc:
            raise readers.DataError(str(exc)) from exc
    return FormatSpec(ds.format, ds.text_field, ds.messages_field, ds.prompt_field,
                      ds.completion_field, template)  # fmt: skip


def prepare_dataset(ctx: RunContext, step: Step, name: str, tokenizer) -> None:
    """Encode a dataset's sources, split, write its three shards, record them.

    The tokenizer is checked before any record is read. `path` is encoded once into a
    spool on local disk; once its documents are counted, the seeded split (`split_off`'s)
    assigns each, and the spool is streamed into the shard writers. Every check that can
    fail runs before the first shard is renamed into place.
    """
    ds = ctx.cfg.datasets[name]
    seq_len, seed, prep = ctx.cfg.finetune.seq_len, ctx.cfg.finetune.seed, ctx.cfg.prepare
    timer = Timer()
    spec = format_spec(ctx, name)
    try:
        check_tokenizer(spec, tokenizer, name)
    except RecordError as exc:
        raise readers.DataError(str(exc)) from exc
    fields = engine.format_fields(spec)
    hub = None
    if ds.hub is not None:
        local = ctx.data_path(ds.hub)
        hub = str(local) if local.exists() else ds.hub
    main = readers.open_source(ctx.data_path(ds.path) if ds.path else None, name, fields,
                               hub=hub, subset=ds.subset, split=ds.split)  # fmt: skip
    separate = {split: readers.open_source(ctx.data_path(path), name, fields)
                for split, path in (("validation", ds.validation_path), ("test", ds.test_path))
                if path}  # fmt: skip
    input_bytes = main.size_bytes + sum(s.size_bytes for s in separate.values())
    chosen = engine.choose_engine(prep.engine, prep.ray_min_mb, input_bytes, name)
    if chosen == "ray":
        ctx.ensure_ray()

    def encode(source: readers.Source) -> engine.Encoding:
        return engine.encode_source(
            source, spec, seq_len, engine=chosen, tokenizer=tokenizer,
            tokenizer_dir=ctx.base_dir, trust_remote_code=ctx.cfg.trust_remote_code,
            batch_size=prep.batch_size, num_cpus=prep.num_cpus,
        )  # fmt: skip

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    fractions = held_out_fractions(ds)
    label = ds.path or main.label
    with ExitStack() as stack:
        out: dict[str, engine.SplitOutput] = {}
        for split in SPLITS:
            meta = {"dataset": name, "split": split}
            if spec.instruction:
                meta["format"] = ds.format
            writer = ShardWriter(ctx.layout.shard(name, split), seq_len, meta,
                                 masked=spec.instruction, pad_id=pad)  # fmt: skip
            stack.enter_context(writer)
            limit = ds.max_train_documents if split == "train" else None
            out[split] = engine.SplitOutput(split, writer, limit=limit)
        encoding = encode(main)
        if fractions:  # pass one: every example of `path` to the spool
            spool = stack.enter_context(engine.ExampleSpool(ctx.layout.shard(name, "train").parent,
                                                            spec.instruction))  # fmt: skip
            for batch in encoding:
                spool.add(batch)
            try:
                part = readers.split_assignment(spool.count, fractions, seed)
            except readers.DataError as exc:
                raise readers.DataError(f"dataset '{name}': {label}: {exc}") from exc
        else:
            for batch in encoding:
                engine.route(batch, 0, [out["train"]])
        out["train"].stats.skipped += encoding.skipped
        for split, source in separate.items():
            given = encode(source)
            for batch in given:
                engine.route(batch, 0, [out[split]])
            out[split].stats.skipped += given.skipped
        if fractions:  # pass two: the spool to the splits, each in file order
            parts = [out["train"], *(out[s] for s in fractions)]
            start = 0
            for batch in spool.batches():
                engine.route(batch, part[start : start + len(batch)], parts)
                start += len(batch)
        check_splits(name, ds, label, out, seq_len, spec.instruction)
        outputs = commit_shards([out[s].writer for s in SPLITS])
    rows = {s: out[s].writer.num_rows for s in SPLITS}
    if spec.instruction:
        log.info("data %s (%s, engine %s): %d train, %d validation, %d test examples of at "
                 "most %d tokens; truncated %s, dropped %s (train/validation/test) -> %s",
                 name, ds.format, chosen, rows["train"], rows["validation"], rows["test"],
                 seq_len, "/".join(str(out[s].stats.truncated) for s in SPLITS),
                 "/".join(str(out[s].stats.dropped) for s in SPLITS),
                 ctx.show(outputs[0].parent))  # fmt: skip
    else:
        log.info("data %s (engine %s): %d train, %d validation, %d test rows of %d tokens -> %s",
                 name, chosen, rows["train"], rows["validation"], rows["test"], seq_len,
                 ctx.show(outputs[0].parent))  # fmt: skip
    extra = {f"{s}_rows": rows[s] for s in SPLITS}
    extra.update({f"{s}_documents": out[s].documents for s in SPLITS})
    extra["format"] = ds.format
    extra["format_stats"] = {s: out[s].stats.as_dict() for s in SPLITS}
    extra["engine"] = chosen
    extra["prepare_seconds"] = round(timer.wall, 3)
    ctx.record(step, outputs, extra=extra)


SPLITS = ("train", "validation", "test")


def check_splits(name: str, ds: DatasetConfig, label: str, out: dict, seq_len: int,
                 instruction: bool) -> None:  # fmt: skip
    """A DataError for the first split that cannot be used (validation, test, train)."""
    for split, given, fraction in (
        ("validation", ds.validation_path, "validation_fraction"),
        ("test", ds.test_path, "test_fraction"),
        ("train", None, None),
    ):
        where = given or label
        stats = out[split].stats
        if instruction:
            if stats.examples == 0:
                raise readers.DataError(
                    f"dataset '{name}': the {split} split of {where} has no example left: all "
                    f"{stats.dropped} were dropped, none keeping a loss-carrying token after "
                    f"its first (an empty response, or one cut off by truncation to "
                    f"finetune.seq_len {seq_len}); check the data or raise finetune.seq_len"
                )
            if stats.truncated == stats.examples:
                raise readers.DataError(
                    f"dataset '{name}': every example of the {split} split of {where} is "
                    f"longer than finetune.seq_len ({seq_len} tokens; the shortest has "
                    f"{stats.shortest}), so each would be cut; raise finetune.seq_len"
                )
            continue
        if out[split].writer.num_rows > 0:
            continue
        if split == "train":
            raise readers.DataError(
                f"dataset '{name}': {label} has fewer than {seq_len} training tokens after "
                "tokenization; give more text or a smaller finetune.seq_len"
            )
        raise readers.DataError(
            f"dataset '{name}': the {split} split of {where} has fewer than "
            f"{seq_len} tokens, too few for one sequence of finetune.seq_len; raise "
            f"{fraction} or give a larger {split}_path"
        )


def held_out_fractions(ds: DatasetConfig) -> dict[str, float]:
    """The splits held out of `path` (those without a file of their own), in split order."""
    fractions = {}
    if not ds.validation_path:
        fractions["validation"] = ds.validation_fraction
    if not ds.test_path:
        fractions["test"] = ds.test_fraction
    return fractions


def split_dataset(ctx: RunContext, name: str) -> tuple[list[str], list[str], list[str]]:
    """Train, validation and test documents of a text dataset, disjoint by document, as
    lists (for tests and tools: `prepare_dataset` makes the same split, streamed).

    A split without its own file is held out of `path` by a seeded document-level split
    (`finetune.seed`); with neither file, validation and test come from one shuffle.
    """
    ds = ctx.cfg.datasets[name]
    seed = ctx.cfg.finetune.seed

    def read(path: str) -> list[str]:
        return readers.read_documents(ctx.data_path(path), ds.text_field, name)

    docs = read(ds.path)
    fractions = held_out_fractions(ds)
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
