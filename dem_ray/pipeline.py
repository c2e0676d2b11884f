"""The stages of a run over one run directory, with skip-if-done and cost records.

prepare  : base model as a local HF dir; each dataset tokenized into packed shards
finetune : one Ray Train run per dataset                    -> finetune/<name>/
vectors  : v_i = theta_i - theta_0                          -> vectors/<name>.safetensors
search   : Ray Tune + Optuna over the evaluator actor pool   -> search/trials.jsonl
merge    : theta_0 + sum_i w_i v_i for the best w           -> merged/
report   : every model on every validation shard, and cost -> report/
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import ray

from dem_ray import data as data_mod
from dem_ray.config import BaseModelSpec, RunConfig
from dem_ray.manifest import Manifest, hash_json, sha256_file, write_text_atomic
from dem_ray.models import (
    base_kind,
    base_path,
    check_model_dir,
    check_same_tokenizer,
    load_tokenizer,
    materialize_base,
)
from dem_ray.spaces import Space, load_space
from dem_ray.storage import RAY_OWNED, RunStorage
from dem_ray.vectors import check_compatible, compute_vector, save_tensors

log = logging.getLogger(__name__)

STAGES = ("prepare", "finetune", "vectors", "search", "merge", "baseline", "report")


class PipelineError(RuntimeError):
    """A stage cannot run; the message says what to do."""


def ensure_ray(address: str | None = None) -> None:
    """Join the cluster named by `address`/RAY_ADDRESS, or start a private local one."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # The dashboard serves the State API that Ray Train's placement-group cleaner polls.
        # "local" always starts a private instance, never one left by `ray start` on this host.
        ray.init(address="local", dashboard_host="127.0.0.1", log_to_driver=True)


class Pipeline:
    def __init__(self, config: RunConfig, ray_address: str | None = None) -> None:
        self.cfg = config
        # A URI run_dir is worked on through a local mirror (see dem_ray.storage).
        self.storage = RunStorage(config.run_dir)
        self.run_dir = self.storage.local
        self.ray_address = ray_address
        self.names = config.dataset_names
        self.config_dir = (
            Path(config.source).resolve().parent if config.source != "<dict>" else Path.cwd()
        )
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self._pool: list | None = None
        self._prepared = False
        self._pool_device = "cpu"
        self._pool_key: str | None = None
        self._space: Space | None = None
        self.manifest: Manifest | None = None

    # ---- paths -------------------------------------------------------------------------
    def shard_path(self, name: str, split: str) -> Path:
        return self.run_dir / "data" / f"{name}.{split}.safetensors"

    def finetune_dir(self, name: str) -> Path:
        return self.run_dir / "finetune" / name

    def vector_path(self, name: str) -> Path:
        return self.run_dir / "vectors" / f"{name}.safetensors"

    @property
    def base_dir(self) -> Path:
        entry = self.manifest.entry("base") if self.manifest else None
        if entry is None:
            raise PipelineError("the base model is not prepared; run `dem-ray run CONFIG`")
        return self.run_dir / entry["path"]  # relative inside the run dir, else absolute

    def show(self, path: Path) -> str:
        """A path of this run as the user knows it (its URI for a URI run_dir)."""
        return self.storage.show(path)

    def ref(self, path: Path):
        """A path as handed to Ray workers, which may run on other nodes."""
        return self.storage.ref(path)

    # ---- checks before any long work ------------------------------------------------------
    def preflight(self) -> None:
        """Every check that is cheap: fail here, not an hour into fine-tuning."""
        self._check_run_dir()
        self._space = load_space(self.cfg.search.space, self.names, self.config_dir)
        if base_kind(self.cfg.base_model) == "dir":
            check_model_dir(base_path(self.cfg.base_model), role="base model")
        for name, ds in self.cfg.datasets.items():
            data_mod.read_documents(self._data_path(ds.path), ds.text_field, name)
            if ds.validation_path:
                data_mod.read_documents(self._data_path(ds.validation_path), ds.text_field, name)
        if self.storage.remote:
            log.info("run_dir %s: local mirror %s", self.storage.display, self.run_dir)
            self.storage.pull(skip=RAY_OWNED, exact=True)
        self.manifest = Manifest(self.run_dir, self.storage)
        self._recover_dirs()

    def _recover_dirs(self) -> None:
        """Directories a kill left only at `.NAME.old` (mid-swap) go back under their name."""
        from dem_ray.models import recover_dir

        for path in (self.run_dir / "merged", self.run_dir / "base",
                     self.run_dir / "baseline" / "best",
                     *(self.finetune_dir(n) for n in self.names)):  # fmt: skip
            recover_dir(path)

    def _check_run_dir(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=self.run_dir)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise PipelineError(
                f"run_dir {self.run_dir} is not writable ({exc.strerror}); "
                f"set run_dir in {self.cfg.source} to a directory you can write"
            ) from exc
        if self.storage.remote:
            self.storage.check_writable()

    def _data_path(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() or p.exists() else self.config_dir / p

    # ---- driver ---------------------------------------------------------------------------
    def run(self, stages: tuple[str, ...] = STAGES, force: bool = False) -> None:
        self.preflight()
        for stage in stages:
            getattr(self, f"stage_{stage}")(force=force)
        self.release_pool()

    def _begin(self, key: str, inputs: str, force: bool) -> bool:
        if not force and self.manifest.is_done(key, inputs):
            log.info("stage %s: up to date, skipped", key)
            self.skipped.append(key)
            return False
        log.info("stage %s: running", key)
        self.ran.append(key)
        return True

    def _require(self, key: str, stage: str) -> None:
        """Stage `key` has run and its outputs are still exactly what it wrote."""
        if not self._is_recorded(key):
            raise PipelineError(
                f"stage '{key}' has not run in {self.run_dir}; run `dem-ray {stage} "
                f"{self.cfg.source}` first (or `dem-ray run {self.cfg.source}`)"
            )
        damaged = self.manifest.damaged(key)
        if damaged:
            path, why = damaged[0]
            raise PipelineError(
                f"{path} {why}; it is an output of stage '{key}': run "
                f"`dem-ray {stage} {self.cfg.source} --force` to write it again "
                f"(or `dem-ray run {self.cfg.source}`, which redoes what is damaged)"
            )

    # ---- prepare ----------------------------------------------------------------------------
    def stage_prepare(self, force: bool = False) -> None:
        if self._prepared:
            return
        self._prepared = True
        spec = self.cfg.base_model
        inputs = hash_json(_base_fingerprint(spec, self.cfg.trust_remote_code))
        if self._begin("base", inputs, force):
            start = time.perf_counter()
            target = self.run_dir / "base"
            base = materialize_base(spec, target, self.cfg.trust_remote_code)
            check_model_dir(base, role="base model")
            inside = base.resolve().is_relative_to(self.run_dir)
            self.manifest.record(
                "base",
                inputs,
                [base] if inside else [],
                cost={"wall_seconds": time.perf_counter() - start},
                extra={
                    "path": str(
                        base.resolve().relative_to(self.run_dir) if inside else base.resolve()
                    ),
                    "fingerprint": hash_json(_dir_fingerprint(base)),
                },  # fmt: skip
            )
        tokenizer = None
        base_fp = self.manifest.entry("base")["fingerprint"]
        for name, ds in self.cfg.datasets.items():
            files = [self._data_path(ds.path)]
            if ds.validation_path:
                files.append(self._data_path(ds.validation_path))
            inputs = hash_json(
                {
                    "dataset": dataclasses.asdict(ds),
                    "files": [_content_hash(f) for f in files],
                    "seq_len": self.cfg.finetune.seq_len,
                    "seed": self.cfg.finetune.seed,
                    "base": base_fp,
                }
            )
            if not self._begin(f"data/{name}", inputs, force):
                continue
            if tokenizer is None:
                tokenizer = load_tokenizer(self.base_dir, self.cfg.trust_remote_code)
            self._prepare_dataset(name, ds, tokenizer, inputs)

    def _prepare_dataset(self, name: str, ds, tokenizer, inputs: str) -> None:
        seq_len = self.cfg.finetune.seq_len
        docs = data_mod.read_documents(self._data_path(ds.path), ds.text_field, name)
        if ds.validation_path:
            train_docs = docs
            val_docs = data_mod.read_documents(
                self._data_path(ds.validation_path), ds.text_field, name
            )
        else:
            try:
                train_docs, val_docs = data_mod.split_documents(
                    docs, ds.validation_fraction, self.cfg.finetune.seed
                )
            except data_mod.DataError as exc:
                raise data_mod.DataError(f"dataset '{name}': {ds.path}: {exc}") from exc
        if ds.max_train_documents is not None:
            train_docs = train_docs[: ds.max_train_documents]
        train = data_mod.tokenize_and_pack(train_docs, tokenizer, seq_len)
        val = data_mod.tokenize_and_pack(val_docs, tokenizer, seq_len)
        where = ds.validation_path or ds.path
        if val.shape[0] == 0:
            raise data_mod.DataError(
                f"dataset '{name}': the validation split of {where} has fewer than "
                f"{seq_len} tokens, too few for one sequence of finetune.seq_len; raise "
                "validation_fraction or give a larger validation_path"
            )
        if train.shape[0] == 0:
            raise data_mod.DataError(
                f"dataset '{name}': {ds.path} has fewer than {seq_len} training tokens after "
                "tokenization; give more text or a smaller finetune.seq_len"
            )
        outputs = []
        for split, rows in (("train", train), ("validation", val)):
            path = self.shard_path(name, split)
            save_tensors({"input_ids": rows}, path, {"dataset": name, "split": split})
            outputs.append(path)
        log.info(
            "data %s: %d train rows, %d validation rows of %d tokens -> %s",
            name,
            train.shape[0],
            val.shape[0],
            seq_len,
            outputs[0].parent,
        )
        self.manifest.record(
            f"data/{name}",
            inputs,
            outputs,
            extra={
                "train_rows": int(train.shape[0]),
                "validation_rows": int(val.shape[0]),
                "train_documents": len(train_docs),
                "validation_documents": len(val_docs),
            },
        )

    # ---- finetune ---------------------------------------------------------------------------
    def _finetune_hparams(self) -> dict:
        """The fine-tune settings that change the result (not resources or logging)."""
        hp = dataclasses.asdict(self.cfg.finetune)
        for key in (
            "log_every",
            "torch_threads",
            "cpus_per_worker",
            "gpus_per_worker",
            "max_concurrent",
            "max_failures",
            "checkpoint_every",
            "memory_gb",
            "resources",
            "accelerator_type",
        ):
            hp.pop(key)
        return hp

    def _finetune_inputs(self, name: str) -> str:
        return hash_json(
            {
                "finetune": self._finetune_hparams(),
                "base": self.manifest.entry("base")["fingerprint"],
                "train": self.manifest.entry(f"data/{name}")["outputs"],
            }
        )

    def stage_finetune(self, force: bool = False) -> None:
        from dem_ray.finetune import FinetuneJob, run_finetunes

        self.stage_prepare(force=False)
        todo = []
        for name in self.names:
            inputs = self._finetune_inputs(name)
            if self._begin(f"finetune/{name}", inputs, force):
                todo.append((name, inputs))
        if not todo:
            return
        ensure_ray(self.ray_address)
        jobs = [
            FinetuneJob(
                name,
                self.ref(self.base_dir),
                {name: self.ref(self.shard_path(name, "train"))},
                str(self.finetune_dir(name)),
            )
            for name, _ in todo
        ]
        results, errors = run_finetunes(jobs, self.cfg.finetune, self.run_dir / "ray_train",
                                        self.storage.ray_storage("ray_train"))  # fmt: skip
        for name, inputs in todo:
            if name in results:
                m = results[name]
                self.manifest.record(
                    f"finetune/{name}",
                    inputs,
                    [self.finetune_dir(name)],
                    cost={
                        "device_seconds": m["device_seconds"],
                        "tokens_trained": m["tokens"],
                        "wall_seconds": m["wall_seconds"],
                        "device": m["device"],
                    },
                    extra={
                        "final_loss": m["final_loss"],
                        "steps": m["steps"],
                        "node_id": m.get("node_id"),
                    },  # fmt: skip
                )
        if errors:
            name, exc = next(iter(errors.items()))
            raise PipelineError(f"fine-tune '{name}' failed: {exc}") from exc

    # ---- vectors ----------------------------------------------------------------------------
    def stage_vectors(self, force: bool = False) -> None:
        for name in self.names:
            self._require(f"finetune/{name}", "finetune")
            inputs = hash_json(
                {
                    "base": self.manifest.entry("base")["fingerprint"],
                    "finetuned": self.manifest.outputs_hash(f"finetune/{name}"),
                }
            )
            if not self._begin(f"vectors/{name}", inputs, force):
                continue
            start, cpu = time.perf_counter(), time.process_time()
            role = f"fine-tune '{name}'"
            check_model_dir(self.finetune_dir(name), role=role)
            check_same_tokenizer(self.base_dir, self.finetune_dir(name), role=role)
            check_compatible(self.base_dir, self.finetune_dir(name))
            compute_vector(self.base_dir, self.finetune_dir(name), self.vector_path(name),
                           names=(self.show(self.base_dir), self.show(self.finetune_dir(name))))  # fmt: skip
            log.info("vector %s -> %s", name, self.vector_path(name))
            self.manifest.record(
                f"vectors/{name}",
                inputs,
                [self.vector_path(name)],
                cost={
                    "wall_seconds": time.perf_counter() - start,
                    "device_seconds": time.process_time() - cpu,
                },
            )

    # ---- the evaluator pool -----------------------------------------------------------------
    def pool(self, need_vectors: bool = True) -> list:
        """The evaluator actors; without the vectors they can still score checkpoints."""
        from dem_ray.evaluator import start_pool
        from dem_ray.placement import actor_options

        ev = self.cfg.evaluator
        have_vectors = all(self._is_recorded(f"vectors/{n}") for n in self.names)
        if need_vectors and not have_vectors:
            raise PipelineError("the vectors stage has not run; run `dem-ray vectors` first")
        vectors = []
        if need_vectors:
            for n in self.names:
                self._require(f"vectors/{n}", "vectors")
        if have_vectors:
            vectors = [self.manifest.outputs_hash(f"vectors/{n}") for n in self.names]
        key = hash_json({"vectors": vectors, "evaluator": dataclasses.asdict(ev)})
        if self._pool is not None and (self._pool_key == key or not need_vectors):
            return self._pool
        self.release_pool()
        ensure_ray(self.ray_address)
        kwargs = {
            "base_dir": self.ref(self.base_dir),
            "vector_paths": [self.ref(self.vector_path(n)) for n in self.names] if vectors else [],
            "shard_paths": {n: self.ref(self.shard_path(n, "validation")) for n in self.names},
            "batch_size": ev.batch_size,
            "max_sequences": ev.max_validation_sequences,
            "vector_dtype": ev.vector_dtype,
            "torch_threads": ev.torch_threads,
            "autocast": ev.autocast,
            "trust_remote_code": self.cfg.trust_remote_code,
        }
        log.info("starting %d evaluator actor(s)", ev.num_actors)
        self._pool = start_pool(ev.num_actors, kwargs, ev.cpus_per_actor, ev.gpus_per_actor,
                                placement=actor_options(ev))  # fmt: skip
        self._pool_key = key
        self._pool_device = ray.get(self._pool[0].info.remote())["device"]
        return self._pool

    def _tune_storage(self, trials_path: Path) -> dict:
        """run_search's storage arguments: a URI run gets each finished trial uploaded, so
        a search resumed on another machine keeps it."""
        from dem_ray.search import inputs_marker

        if not self.storage.remote:
            return {}
        return {
            "ray_storage": self.storage.ray_storage("ray_tune"),
            "after_write": lambda: self.storage.push([trials_path, inputs_marker(trials_path)]),
        }

    def _is_recorded(self, key: str) -> bool:
        entry = self.manifest.entry(key)
        return entry is not None and entry.get("status") == "done"

    def release_pool(self) -> None:
        """Kill the evaluator actors and wait until Ray has their CPUs/GPUs back.

        `ray.kill` returns before the resources are free; whoever counts free resources
        next (the baseline's trainer launches) would otherwise see the actors' share as
        taken and start fewer trainers at once.
        """
        if self._pool is None:
            return
        ev = self.cfg.evaluator
        before = ray.available_resources()
        for actor in self._pool:
            ray.kill(actor)
        want = {
            "CPU": before.get("CPU", 0.0) + ev.cpus_per_actor * len(self._pool),
            "GPU": before.get("GPU", 0.0) + ev.gpus_per_actor * len(self._pool),
        }
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline:
            free = ray.available_resources()
            if all(free.get(k, 0.0) >= v - 1e-6 for k, v in want.items()):
                break
            time.sleep(0.1)
        else:
            log.warning("the evaluator actors' resources were not back after 15 s")
        self._pool = None

    def _eval_inputs(self) -> dict:
        return {
            "vectors": [self.manifest.outputs_hash(f"vectors/{n}") for n in self.names],
            "validation": [self.manifest.entry(f"data/{n}")["outputs"] for n in self.names],
            "max_validation_sequences": self.cfg.evaluator.max_validation_sequences,
            "vector_dtype": self.cfg.evaluator.vector_dtype,
            "autocast": self.cfg.evaluator.autocast,
        }

    # ---- search -----------------------------------------------------------------------------
    def stage_search(self, force: bool = False) -> None:
        for name in self.names:
            self._require(f"vectors/{name}", "vectors")
        space_file = Path(self._space.source)
        inputs = hash_json(
            {
                "search": {
                    k: v
                    for k, v in dataclasses.asdict(self.cfg.search).items()
                    if k != "max_concurrent"
                },
                "space": space_file.read_text(),
                **self._eval_inputs(),
            }
        )
        earlier = self.manifest.entry("search")
        if self._begin("search", inputs, force):
            changed = earlier is not None and earlier.get("inputs") != inputs
            self._search(inputs, fresh=force, earlier=earlier if changed else None)
        if self.cfg.search.compare_grid:
            self._compare_grid(force)

    def _search(self, inputs: str, fresh: bool, earlier: dict | None) -> None:
        """The search; without `fresh`, trials an interrupted search finished are kept.

        `earlier`: the record of a finished search with other inputs (datasets added or
        changed since), whose best candidates warm-start this one.
        """
        from dem_ray.search import best_trial, run_search

        start = time.perf_counter()
        pool = self.pool()
        out = self.run_dir / "search"
        points, update = self._warm_start(earlier, out, inputs)
        trials = run_search(self.cfg.search, self._space, pool, out, self.run_dir / "ray_tune",
                            inputs=inputs, fresh=fresh, warm_start=points,
                            **self._tune_storage(out / "trials.jsonl"))  # fmt: skip
        best = best_trial(trials)
        best_record = {
            "weights": best["weights"],
            "objective": {"name": self.cfg.search.objective, "value": best["objective"]},
            "ppl": best["ppl"],
            "trial": best["trial"],
            "num_trials": len(trials),
            "algorithm": self.cfg.search.algorithm,
            "space": self._space.kind,
            "update": update,
        }
        write_text_atomic(out / "best.json", json.dumps(best_record, indent=2))
        weights = ", ".join(f"{k}={v:.4f}" for k, v in best["weights"].items())
        log.info("search done: best objective %.4f at %s -> %s", best["objective"], weights, out)
        self.manifest.record(
            "search",
            inputs,
            [out / "trials.jsonl", out / "best.json"],
            cost=self._search_cost(trials, start),
            extra={"vectors": self._vector_hashes()},
        )

    def _vector_hashes(self) -> dict[str, str]:
        return {n: self.manifest.outputs_hash(f"vectors/{n}") for n in self.names}

    def _warm_start(
        self, earlier: dict | None, out: Path, inputs: str
    ) -> tuple[list[dict], dict | None]:
        """After datasets were added or changed: the earlier search's best candidates first.

        Also says which datasets' vectors are new since that search, for the report's
        cost of the update. ([], None) on a first search or a forced re-run.
        """
        from dem_ray.search import made_with, read_trials, warm_start_points

        if earlier is None:
            return [], None
        before = earlier.get("vectors", {})
        updated = [n for n, h in self._vector_hashes().items() if before.get(n) != h]
        points: list[dict] = []
        new: list[str] = []
        resuming = made_with(out / "trials.jsonl", inputs)
        if self.cfg.search.algorithm != "grid" and not resuming:
            earlier_trials = read_trials(out / "trials.jsonl")
            points, new = warm_start_points(earlier_trials, self._space, self.cfg.search.warm_start)
            if earlier_trials and not points and self.cfg.search.warm_start:
                log.info(
                    "search: earlier trials not reusable here (a dataset removed?); cold start"
                )
            if points:
                log.info(
                    "search: warm start from %d of %d earlier trials (new datasets: %s)",
                    len(points),
                    len(earlier_trials),
                    ", ".join(new) or "none",
                )
        return points, {"updated": updated, "new": new, "warm_start_points": len(points)}

    def _search_cost(self, trials: list[dict], start: float) -> dict:
        return {
            "device_seconds": sum(t["device_seconds"] for t in trials),
            "tokens_evaluated": sum(t["tokens_evaluated"] for t in trials),
            "wall_seconds": time.perf_counter() - start,
            "evaluations": len(trials),
            "device": self._pool_device,
        }

    def grid_step_for_comparison(self) -> float:
        """The baseline's mixture-grid resolution when it has one, else search.grid_step."""
        b = self.cfg.baseline
        return b.grid_step if b is not None and b.grid_step else self.cfg.search.grid_step

    def _compare_grid(self, force: bool) -> None:
        """The plain coefficient grid over the same space, to compare the search against."""
        from dem_ray.search import run_search

        cfg = dataclasses.replace(
            self.cfg.search,
            algorithm="grid",
            grid_step=self.grid_step_for_comparison(),
            scheduler="none",  # the reference scores every grid point on all tokens
        )
        space_text = Path(self._space.source).read_text()
        inputs = hash_json({"grid": dataclasses.asdict(cfg), "space": space_text,
                            **self._eval_inputs()})  # fmt: skip
        if not self._begin("search_grid", inputs, force):
            return
        start = time.perf_counter()
        out = self.run_dir / "search"
        trials = run_search(cfg, self._space, self.pool(), out, self.run_dir / "ray_tune",
                            trials_name="grid_trials.jsonl", inputs=inputs, fresh=force,
                            **self._tune_storage(out / "grid_trials.jsonl"))  # fmt: skip
        self.manifest.record(
            "search_grid", inputs, [out / "grid_trials.jsonl"],
            cost=self._search_cost(trials, start),
        )  # fmt: skip

    def best(self) -> dict:
        self._require("search", "search")
        return json.loads((self.run_dir / "search" / "best.json").read_text())

    # ---- merge ------------------------------------------------------------------------------
    def stage_merge(self, force: bool = False, weights: dict[str, float] | None = None) -> None:
        from dem_ray.merge import merge_to_dir

        for name in self.names:
            self._require(f"vectors/{name}", "vectors")
        if weights is None:
            weights = self.best()["weights"]
        self._space.check(weights)
        inputs = hash_json(
            {
                "weights": weights,
                "vectors": [self.manifest.outputs_hash(f"vectors/{n}") for n in self.names],
                "base": self.manifest.entry("base")["fingerprint"],
            }
        )
        if not self._begin("merge", inputs, force):
            return
        start, cpu = time.perf_counter(), time.process_time()
        out = self.run_dir / "merged"
        merge_to_dir(
            self.base_dir,
            [self.vector_path(n) for n in self.names],
            [weights[n] for n in self.names],
            out,
            tokenizer_src=self.base_dir,
            metadata={"datasets": self.names},
        )
        log.info("merged model -> %s", out)
        self.manifest.record(
            "merge",
            inputs,
            [out],
            cost={
                "wall_seconds": time.perf_counter() - start,
                "device_seconds": time.process_time() - cpu,
            },
            extra={"weights": weights},
        )

    # ---- baseline ----------------------------------------------------------------------------
    def mixture_dir(self, mixture_id: str) -> Path:
        return self.run_dir / "baseline" / "mixtures" / mixture_id

    def stage_baseline(self, force: bool = False) -> None:
        """Train one model per mixing ratio, score each with the same evaluator pool."""
        from dem_ray.baseline import mixture_id, mixtures, steps_per_mixture
        from dem_ray.finetune import FinetuneJob, run_finetunes

        if self.cfg.baseline is None:
            log.info("stage baseline: no 'baseline' section in the config; nothing to do")
            return
        self.stage_prepare(force=False)
        mixes = {mixture_id(m): m for m in mixtures(self.cfg.baseline, self.names)}
        steps = steps_per_mixture(self.cfg.baseline, self.cfg.finetune, len(self.names))
        common = {
            "steps": steps,
            "finetune": self._finetune_hparams(),
            "base": self.manifest.entry("base")["fingerprint"],
            "data": [self.manifest.entry(f"data/{n}")["outputs"] for n in self.names],
            "max_validation_sequences": self.cfg.evaluator.max_validation_sequences,
        }
        inputs = {mid: hash_json({"mixture": mix, **common}) for mid, mix in mixes.items()}
        todo = [mid for mid in mixes if self._begin(f"baseline/{mid}", inputs[mid], force)]
        if todo:
            log.info(
                "baseline: %d of %d mixtures to train, %d steps each (%d tokens)",
                len(todo), len(mixes), steps,
                steps * self.cfg.finetune.batch_size * self.cfg.finetune.seq_len
                * self.cfg.finetune.num_workers,
            )  # fmt: skip
            ensure_ray(self.ray_address)
            self.release_pool()  # its CPUs/GPUs go to the trainers; it is started again after
            shards = {n: self.ref(self.shard_path(n, "train")) for n in self.names}
            jobs = [
                FinetuneJob(f"mixture {mid}", self.ref(self.base_dir), shards,
                            str(self.mixture_dir(mid)), mixture=mixes[mid], max_steps=steps)
                for mid in todo
            ]  # fmt: skip
            results, errors = run_finetunes(jobs, self.cfg.finetune, self.run_dir / "ray_train",
                                            self.storage.ray_storage("ray_train"))  # fmt: skip
            pool = self.pool(need_vectors=False)
            for mid in todo:
                if f"mixture {mid}" in results:
                    self._score_mixture(pool[0], mid, mixes[mid], inputs[mid],
                                        results[f"mixture {mid}"])  # fmt: skip
            if errors:
                name, exc = next(iter(errors.items()))
                raise PipelineError(f"baseline {name} failed: {exc}") from exc
        self._keep_best_mixture(list(mixes))

    def _score_mixture(self, actor, mid: str, mix: dict, inputs: str, trained: dict) -> None:
        from dem_ray.perplexity import objective, perplexity

        start = time.perf_counter()
        self.storage.push([self.mixture_dir(mid)])  # evaluators on other nodes read it there
        result = ray.get(actor.evaluate_checkpoint.remote(self.ref(self.mixture_dir(mid))))
        eval_wall = time.perf_counter() - start
        nll = {n: tuple(v) for n, v in result["nll"].items()}
        score = objective(nll, self.cfg.search.objective)
        write_text_atomic(
            self.mixture_dir(mid) / "dem_ray_mixture.json",
            json.dumps({"id": mid, "weights": mix, "objective": score}, indent=2),
        )
        log.info("baseline: mixture %s objective %.4f", mid, score)
        self.manifest.record(
            f"baseline/{mid}", inputs, [],
            cost={
                "device_seconds": trained["device_seconds"] + result["device_seconds"],
                "train_device_seconds": trained["device_seconds"],
                "eval_device_seconds": result["device_seconds"],
                "tokens_trained": trained["tokens"],
                "tokens_evaluated": result["tokens"],
                "wall_seconds": trained["wall_seconds"] + eval_wall,
                "train_wall_seconds": trained["wall_seconds"],
                "eval_wall_seconds": eval_wall,
                "device": trained["device"],
                "eval_device": self._pool_device,
            },
            extra={"weights": mix, "objective": score,
                   "ppl": {n: perplexity(*v) for n, v in nll.items()},
                   "tokens_by_dataset": trained["tokens_by_dataset"]},
        )  # fmt: skip

    def _keep_best_mixture(self, ids: list[str]) -> None:
        """Keep the best mixture's model as baseline/best; drop the others unless keep_all."""
        from dem_ray.models import replace_dir

        entries = {mid: self.manifest.entry(f"baseline/{mid}") for mid in ids}
        best_id = min(ids, key=lambda mid: entries[mid]["objective"])
        best_dir = self.run_dir / "baseline" / "best"
        marker = best_dir / "dem_ray_mixture.json"
        current = json.loads(marker.read_text())["id"] if marker.exists() else None
        if current != best_id:
            if not self.mixture_dir(best_id).exists():
                raise PipelineError(
                    f"the best mixture {best_id} has no saved model; run "
                    f"`dem-ray baseline {self.cfg.source} --force` to train it again"
                )
            replace_dir(self.mixture_dir(best_id), best_dir)
        if not self.cfg.baseline.keep_all:
            shutil.rmtree(self.run_dir / "baseline" / "mixtures", ignore_errors=True)
            self.storage.delete(self.run_dir / "baseline" / "mixtures")
        inputs = hash_json({mid: entries[mid]["inputs"] for mid in ids})
        self.manifest.record(
            "baseline", inputs, [best_dir],
            extra={"best": best_id, "weights": entries[best_id]["weights"], "mixtures": ids},
        )  # fmt: skip
        log.info("baseline: best mixture %s -> %s", best_id, best_dir)

    # ---- report -----------------------------------------------------------------------------
    def stage_report(self, force: bool = False) -> None:
        from dem_ray.report import build_report, write_report

        self._require("merge", "merge")
        inputs = hash_json(
            {
                "merge": self.manifest.outputs_hash("merge"),
                "search": self.manifest.outputs_hash("search"),
                "finetune": [self.manifest.outputs_hash(f"finetune/{n}") for n in self.names],
                "cost": dataclasses.asdict(self.cfg.cost),
                **self._comparison_inputs(),
                **self._eval_inputs(),
            }
        )
        if not self._begin("report", inputs, force):
            return
        start = time.perf_counter()
        actor = self.pool()[0]
        models = {
            "base": None,
            **{f"finetuned/{n}": self.finetune_dir(n) for n in self.names},
            "dem": self.run_dir / "merged",
        }
        scores, device_seconds, tokens = {}, 0.0, 0
        for label, path in models.items():
            if path is None:
                result = ray.get(actor.evaluate.remote([0.0] * len(self.names)))
            else:
                result = ray.get(actor.evaluate_checkpoint.remote(self.ref(path)))
            scores[label] = {n: tuple(v) for n, v in result["nll"].items()}
            device_seconds += result["device_seconds"]
            tokens += result["tokens"]
            log.info("report: scored %s", label)
        cost = {
            "device_seconds": device_seconds,
            "tokens_evaluated": tokens,
            "wall_seconds": time.perf_counter() - start,
            "device": self._pool_device,
        }
        report = build_report(self, scores, cost)
        out = self.run_dir / "report"
        paths = write_report(report, self.run_dir / "search", out)
        self.manifest.record("report", inputs, paths, cost=cost)
        log.info("report -> %s", out)

    def _comparison_inputs(self) -> dict:
        extra = {}
        if self.cfg.baseline is not None:
            self._require("baseline", "baseline")
            entry = self.manifest.entry("baseline")
            extra["baseline"] = [entry["inputs"], entry["outputs"]]
        if self.cfg.search.compare_grid:
            self._require("search_grid", "search")
            extra["grid"] = self.manifest.outputs_hash("search_grid")
        return extra

    def report(self) -> dict:
        return json.loads((self.run_dir / "report" / "report.json").read_text())


def _base_fingerprint(spec: BaseModelSpec, trust_remote_code: bool) -> dict:
    """What the prepared base depends on. Only location and resolved kind go in, so a
    `.gguf` string and `{gguf: same path}` count as the same input (and old run dirs,
    from before the mapping form, keep their hash)."""
    kind = base_kind(spec)
    fingerprint = {"spec": spec.location, "kind": kind, "trust": trust_remote_code}
    if kind == "dir":
        fingerprint["files"] = _dir_fingerprint(base_path(spec))
    elif kind == "gguf":
        path = base_path(spec)
        fingerprint["gguf"] = (str(path), path.stat().st_size, path.stat().st_mtime_ns)
    return fingerprint


def _dir_fingerprint(path: Path) -> list:
    """Names, sizes and mtimes of a model dir's files: cheap, and changes when they do."""
    return [
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(Path(path).iterdir())
        if p.is_file()
    ]


def _content_hash(path: Path) -> str:
    if path.is_dir():
        return hash_json(
            [
                (str(p.relative_to(path)), sha256_file(p))
                for p in sorted(path.rglob("*"))
                if p.is_file()
            ]
        )
    return sha256_file(path)
