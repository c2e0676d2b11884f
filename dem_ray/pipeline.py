"""The loop over the stages: for each step, check its inputs and outputs, run it or skip it.

Everything a stage does lives in `dem_ray/stages/`; this module only opens the run
(checks, lock, manifest), walks the stages of the commands asked for, and closes the
run (evaluator actors released, lock freed) however it ends.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from dem_ray.config import RunConfig
from dem_ray.core.atomic import recover_dir
from dem_ray.core.spaces import Space, check_space_for_method, load_space
from dem_ray.data import readers
from dem_ray.models.base import base_kind, base_path, check_model_dir
from dem_ray.plan import preflight
from dem_ray.run.layout import RunLayout
from dem_ray.run.lock import RunLock
from dem_ray.run.manifest import Manifest
from dem_ray.run.stopping import reinstall_stop_handlers
from dem_ray.run.storage import RunStorage
from dem_ray.stages import (
    COMMANDS,
    PREREQUISITES,
    RunContext,
    Stage,
    StageError,
    Step,
    stages_of,
)
from dem_ray.stages.base import resolve_data_path

log = logging.getLogger(__name__)


class Pipeline:
    """One command over one run directory. `open` before running, `close` after (`run`
    does both); `ran` and `skipped` list the manifest keys of the steps, in order."""

    def __init__(
        self, config: RunConfig, ray_address: str | None = None, verify: bool = False
    ) -> None:
        self.cfg = config
        self.storage = RunStorage(config.run_dir)
        self.ray_address = ray_address
        self.verify = verify
        self.config_dir = (
            Path(config.source).resolve().parent if config.source != "<dict>" else Path.cwd()
        )
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self.ctx: RunContext | None = None
        self._lock: RunLock | None = None
        self._commands_done: set[str] = set()

    # ---- what tests and the CLI read ---------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return self.storage.local

    @property
    def names(self) -> list[str]:
        return list(self.cfg.dataset_names)

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.storage.local, tuple(self.names))

    @property
    def manifest(self) -> Manifest:
        return self.ctx.manifest

    def show(self, path: Path) -> str:
        return self.storage.show(path)

    # ---- open / run / close ------------------------------------------------------------------
    def open(self, command: str = "run") -> None:
        """Every cheap check, then the lock: fail here, not an hour into fine-tuning."""
        if self._lock is not None:
            return
        self._check_run_dir()
        space, tasks = self.check()
        preflight(self.cfg, self.ray_address)  # workers and actors that cannot fit their memory
        self._lock = _acquire_lock(self.storage, command)
        self._commands_done = set()
        try:
            if self.storage.remote:
                log.info("run_dir %s: local mirror %s", self.storage.display, self.run_dir)
                self.storage.pull("manifest.json")  # the rest only as a stage needs it
            manifest = Manifest(self.run_dir, self.storage)
            for path in self.layout.swapped_dirs():
                recover_dir(path)
            self.ctx = RunContext(self.cfg, self.storage, manifest, space, self.config_dir,
                                  self.ray_address)  # fmt: skip
            self.ctx.tasks = tasks
        except BaseException:
            _release_lock(self._lock)
            self._lock = None
            raise

    def check(self) -> tuple[Space, Any]:
        """The checks that need no run dir: the space, the base, the data files, the
        downstream tasks (`dem-ray status` makes them too). Returns the space and tasks."""
        space = load_space(self.cfg.search.space, self.names, self.config_dir)
        search = self.cfg.search
        check_space_for_method(space, search.merge_method, search.algorithm, search.num_trials)
        if base_kind(self.cfg.base_model) == "dir":
            check_model_dir(base_path(self.cfg.base_model), role="base model")
        for name, ds in self.cfg.datasets.items():
            for path in filter(None, (ds.path, ds.validation_path, ds.test_path)):
                readers.check_readable(resolve_data_path(path, self.config_dir), name)
        return space, self._check_downstream(space)

    def run(
        self, commands: tuple[str, ...] = tuple(COMMANDS), force: bool = False, **options: Any
    ) -> None:
        """Open, run the commands' stages (`options` reach them, e.g. merge's weights), close."""
        self.open(commands[0] if len(commands) == 1 else "run")
        try:
            for command in commands:
                self.run_command(command, force=force, **options)
        except BaseException as exc:  # a failure, or a stop (`Stopped`, Ray's re-raise of it)
            try:
                self.close(stopping=isinstance(exc, KeyboardInterrupt))
            except Exception as close_exc:  # noqa: BLE001 - the first error is the one to see
                log.warning("closing the run after the error above failed too: %s", close_exc)
            raise
        self.close()

    def run_command(self, command: str, force: bool = False, **options: Any) -> None:
        """The stages of one CLI command; `options` reach the stages (merge's weights)."""
        if command not in COMMANDS:
            raise StageError(f"unknown command {command!r}; choose one of {', '.join(COMMANDS)}")
        if self._lock is None:
            raise StageError("the pipeline is not open; call open() first (or run())")
        for before in PREREQUISITES.get(command, ()):
            if before not in self._commands_done:
                self.run_command(before, force=False)
        if command == "baseline" and self.cfg.baseline is None:
            log.info("stage baseline: no 'baseline' section in the config; nothing to do")
        if command == "downstream" and self.cfg.downstream is None:
            log.info("stage downstream: no 'downstream' section in the config; nothing to do")
        self.ctx.options = {"force": force, **options}
        try:
            for stage in stages_of(command):
                self.run_stage(stage, force)
        finally:
            self.ctx.options = {}
        self._commands_done.add(command)

    def run_stage(self, stage: Stage, force: bool = False) -> None:
        reinstall_stop_handlers()  # in case a library set a handler of its own
        ctx = self.ctx
        steps = stage.steps(ctx)
        todo = []
        for step in steps:
            if set(step.inputs) != set(stage.invalidated_by):
                raise AssertionError(f"stage {stage.name}: step {step.key} declares inputs "
                                     f"{sorted(step.inputs)}, the stage {sorted(stage.invalidated_by)}")  # fmt: skip
            if not force and self._is_done(step):
                log.info("stage %s: up to date, skipped", step.key)
                self.skipped.append(step.key)
                continue
            entry = ctx.manifest.entry(step.key)
            why = ""
            if entry is not None and not entry.get("input_parts"):
                why = " (its inputs were recorded by an earlier dem-ray)"
            elif entry is not None and entry.get("inputs") != step.digest:
                why = f" (changed: {', '.join(ctx.manifest.changed_inputs(step.key, step.parts))})"
            log.info("stage %s: running%s", step.key, why)
            self.ran.append(step.key)
            todo.append(step)
        if todo:
            ctx.fetch(tuple(path for step in todo for path in step.reads))
            stage.run(ctx, todo)

    def _is_done(self, step: Step) -> bool:
        return step_is_done(self.ctx, step, self.verify)

    def close(self, stopping: bool = False) -> None:
        """Release the evaluator actors and the lock; keep the input digests computed.

        The context stays readable (manifest, paths); `open` takes the lock again. When
        `stopping`, the actors are left to Ray's shutdown, which ends them at once."""
        try:
            if self.ctx is not None:
                if not stopping:
                    self.ctx.pool.release()
                self.ctx.manifest.save_if_changed()
        finally:
            if self._lock is not None:
                _release_lock(self._lock)
                self._lock = None

    # ---- helpers ------------------------------------------------------------------------
    def evaluators(self, need_vectors: bool = True) -> list:
        from dem_ray.stages.search import evaluators

        return evaluators(self.ctx, need_vectors)

    def report(self) -> dict:
        """The report's data (fetched first for a bucket run: the CLI's summary reads it)."""
        import json

        path = self.layout.report / "report.json"
        self.storage.pull(path.relative_to(self.run_dir).as_posix())
        return json.loads(path.read_text())

    def _check_downstream(self, space):
        """The downstream tasks exist and can be read from here (a TaskSet, or None)."""
        ds = self.cfg.downstream
        if ds is None:
            return None
        from dem_ray.downstream.tasks import TaskError, resolve_tasks

        log.info("downstream: checking the tasks %s", ", ".join(ds.tasks))
        tasks = resolve_tasks(ds.tasks, self.config_dir, source=self.cfg.source)
        if ds.rerank_top:
            tasks.check_metric(ds.rerank_metric)
            search = self.cfg.search
            points = len(space.grid(search.grid_step)) if search.algorithm == "grid" else None
            if points is not None and ds.rerank_top > points:
                raise TaskError(
                    f"{self.cfg.source}: 'downstream.rerank_top' ({ds.rerank_top}) is larger "
                    f"than the grid's {points} points"
                )
        return tasks

    def _check_run_dir(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=self.run_dir)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise StageError(
                f"run_dir {self.run_dir} is not writable ({exc.strerror}); "
                f"set run_dir in {self.cfg.source} to a directory you can write"
            ) from exc
        if self.storage.remote:
            self.storage.check_writable()


def step_is_done(ctx: RunContext, step: Step, verify: bool = False) -> bool:
    """Whether a run skips `step`: recorded with these inputs, its outputs intact, and
    enough of it (`dem-ray status` asks the same question, so it cannot disagree)."""
    if not ctx.manifest.is_done(step.key, step.digest, verify=verify, listing=ctx.listing()):
        return False
    return step.enough is None or step.enough(ctx.manifest.entry(step.key))


# One lock per run dir and process: a second Pipeline in the same process (tests, a
# notebook) shares it; another process is refused.
_HELD: dict[str, list] = {}


def _acquire_lock(storage: RunStorage, command: str) -> RunLock:
    held = _HELD.get(storage.display)
    if held is not None:
        held[1] += 1
        return held[0]
    lock = RunLock(storage, command)
    lock.acquire()
    _HELD[storage.display] = [lock, 1]
    return lock


def _release_lock(lock: RunLock) -> None:
    for key, held in list(_HELD.items()):
        if held[0] is lock:
            held[1] -= 1
            if held[1] == 0:
                del _HELD[key]
                lock.release()
