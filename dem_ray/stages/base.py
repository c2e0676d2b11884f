"""The stage protocol, and the context every stage runs in.

A stage says what it would do as `Step`s: a manifest key, the named inputs that
invalidate it (declared where the stage uses them), and what the driver reads when it
runs. The pipeline decides which steps are up to date; the stage runs the rest and
records each with `ctx.record`. A stage knows the layout and the config, never another
stage's internals: what it needs from an earlier stage it reads from the manifest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dem_ray.config import RunConfig
from dem_ray.core.hashing import hash_json, sha256_file
from dem_ray.core.spaces import Space
from dem_ray.run.layout import RunLayout
from dem_ray.run.manifest import Manifest
from dem_ray.run.storage import RunStorage

log = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A stage cannot run; the message says what to do."""


@dataclass
class Step:
    """One unit of work a stage records under `key` in the manifest."""

    key: str
    inputs: dict[str, Any]
    reads: tuple[Path, ...] = ()
    # Beyond same inputs and intact outputs: is what was recorded enough? (e.g. as many
    # trials as asked for; raising num_trials extends the search instead of restarting it)
    enough: Callable[[dict], bool] | None = None
    payload: dict[str, Any] = field(default_factory=dict)  # what the stage planned, for run()

    @property
    def parts(self) -> dict[str, str]:
        return {name: hash_json(value) for name, value in self.inputs.items()}

    @property
    def digest(self) -> str:
        """The hash the manifest keeps (of the inputs themselves: a run dir made before
        the stage redesign keeps its data, fine-tunes and vectors)."""
        return hash_json(self.inputs)


class Stage:
    """Subclasses set `name` (the manifest key prefix), `command` (the CLI command that
    runs it), `invalidated_by` ({input name: what it means}, the README's table) and
    implement `steps` and `run`."""

    name: str = ""
    command: str = ""
    invalidated_by: dict[str, str] = {}
    outputs: str = ""

    def steps(self, ctx: RunContext) -> list[Step]:
        raise NotImplementedError

    def run(self, ctx: RunContext, todo: list[Step]) -> None:
        raise NotImplementedError


def resolve_data_path(path: str, config_dir: Path) -> Path:
    """A dataset path from the config: as given when it exists (or is absolute), else
    relative to the config file's directory."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or p.exists() else config_dir / p


class RunContext:
    """What stages share in one command: config, layout, storage, manifest, evaluator pool."""

    def __init__(
        self,
        cfg: RunConfig,
        storage: RunStorage,
        manifest: Manifest,
        space: Space,
        config_dir: Path,
        ray_address: str | None = None,
    ) -> None:
        from dem_ray.ray.pool import EvaluatorPool

        self.cfg = cfg
        self.storage = storage
        self.manifest = manifest
        self.space = space
        self.config_dir = config_dir
        self.ray_address = ray_address
        self.layout = RunLayout(storage.local, tuple(cfg.dataset_names))
        self.names = list(cfg.dataset_names)
        self.pool = EvaluatorPool(cfg.evaluator)
        self.options: dict[str, Any] = {}  # per-command options, e.g. merge --weights
        self.tasks = None  # the downstream tasks (a TaskSet), resolved when the run opens
        self._listing = None  # the bucket's files, listed once per record

    # ---- paths ----------------------------------------------------------------------
    @property
    def base_dir(self) -> Path:
        entry = self.manifest.entry("base")
        if entry is None:
            raise StageError("the base model is not prepared; run `dem-ray run CONFIG`")
        return self.layout.root / entry["path"]  # relative inside the run dir, else absolute

    def data_path(self, path: str) -> Path:
        return resolve_data_path(path, self.config_dir)

    def show(self, path: Path) -> str:
        """A path of this run as the user knows it (its URI for a bucket run_dir)."""
        return self.storage.show(path)

    def ref(self, path: Path):
        """A path as handed to Ray workers, which may run on other nodes."""
        return self.storage.ref(path)

    # ---- reading what earlier stages recorded -------------------------------------------
    def require(self, key: str, command: str) -> dict:
        """Stage `key` has run and its outputs are still what it wrote; its entry."""
        if not self.manifest.is_recorded(key):
            raise StageError(
                f"stage '{key}' has not run in {self.show(self.layout.root)}; run `dem-ray "
                f"{command} {self.cfg.source}` first (or `dem-ray run {self.cfg.source}`)"
            )
        damaged = self.manifest.damaged(key, listing=self.listing())
        if damaged:
            path, why = damaged[0]
            raise StageError(
                f"{self.show(path)} {why}; it is an output of stage '{key}': run "
                f"`dem-ray {command} {self.cfg.source} --force` to write it again "
                f"(or `dem-ray run {self.cfg.source}`, which redoes what is damaged)"
            )
        return self.manifest.entry(key)

    def outputs_hash(self, key: str) -> str:
        return self.manifest.outputs_hash(key)

    def base_fingerprint(self) -> str:
        return self.manifest.entry("base")["fingerprint"]

    def evaluation_inputs(self) -> dict:
        """What a validation (or test) score depends on besides the weights scored."""
        return {
            "validation": [self.manifest.entry(f"data/{n}")["outputs"] for n in self.names],
            "max_validation_sequences": self.cfg.evaluator.max_validation_sequences,
            "sample_seed": self.cfg.finetune.seed,  # which rows a capped shard keeps
            "autocast": self.cfg.evaluator.autocast,
        }

    def vector_hashes(self) -> dict[str, str]:
        return {n: self.outputs_hash(f"vectors/{n}") for n in self.names}

    def file_digest(self, path: Path) -> str:
        """sha256 of an input file (or directory), reused while its size and mtime hold."""
        path = Path(path)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            return hash_json([(str(p.relative_to(path)), self.file_digest(p)) for p in files])
        cache = self.manifest.data.setdefault("input_digests", {})
        stat = path.stat()
        key = str(path.resolve())
        seen = cache.get(key)
        if seen and seen[:2] == [stat.st_size, stat.st_mtime_ns]:
            return seen[2]
        digest = sha256_file(path)
        self.manifest.bytes_hashed += stat.st_size
        cache[key] = [stat.st_size, stat.st_mtime_ns, digest]
        return digest

    # ---- bucket runs ------------------------------------------------------------------------
    def listing(self):
        """The bucket's files (one listing per command, refreshed after each record)."""
        if not self.storage.remote:
            return None
        if self._listing is None:
            self._listing = self.storage.remote_files()
        return self._listing

    def fetch(self, paths: tuple[Path, ...]) -> None:
        """Bring what a step reads into the local mirror (nothing to do for a local run)."""
        if not self.storage.remote:
            return
        for path in paths:
            if Path(path).is_relative_to(self.layout.root):  # else not the run's: read in place
                self.storage.pull(Path(path).relative_to(self.layout.root).as_posix())

    # ---- recording ------------------------------------------------------------------------
    def record(
        self,
        step: Step,
        outputs: list[Path],
        cost: dict | None = None,
        extra: dict | None = None,
    ) -> None:
        self.manifest.record(step.key, step.digest, outputs, cost=cost, extra=extra,
                             input_parts=step.parts)  # fmt: skip
        self._listing = None

    def ensure_ray(self) -> None:
        from dem_ray.ray.session import ensure_ray

        ensure_ray(self.ray_address)


class Timer:
    """Wall seconds and this process's CPU seconds since it was made."""

    def __init__(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    @property
    def wall(self) -> float:
        return time.perf_counter() - self.wall0

    @property
    def cpu(self) -> float:
        return time.process_time() - self.cpu0
