"""The evaluator actor pool: base, stacked vectors and validation shards stay resident.

Each actor loads everything once onto its device (a GPU when Ray gives it one);
a candidate then costs one in-place merge and one forward pass per validation
batch. Trials are light clients that send weights and get per-dataset NLL back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from dem_ray.core.lowrank import AdapterState, LowRankMerge, is_adapter_dir, lowrank_vectors
from dem_ray.core.merge import LazyTensors, ResidentMerge
from dem_ray.core.partition import evaluator_device_map
from dem_ray.core.perplexity import target_count, token_nll
from dem_ray.data.shards import load_shard
from dem_ray.downstream.tasks import TaskSet
from dem_ray.models.base import check_model_dir, load_model
from dem_ray.run.storage import RunPath, fetch

log = logging.getLogger(__name__)


class EvaluatorMemoryError(RuntimeError):
    """The evaluator's device ran out of memory; the message says what to change."""


@contextlib.contextmanager
def explain_out_of_memory(device: str, what: str) -> Iterator[None]:
    """Turn an out-of-memory error into one that says which settings make room."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not isinstance(exc, torch.OutOfMemoryError) and "out of memory" not in str(exc):
            raise
        raise EvaluatorMemoryError(
            f"evaluator on {device}: out of memory while {what} ({exc}). The actor holds the "
            "base and every vector resident: set `evaluator.vector_dtype: bfloat16` (halves "
            "the vectors), lower `evaluator.batch_size`, or put fewer actors on each GPU "
            "(raise `evaluator.gpus_per_actor` or lower `evaluator.num_actors`)"
        ) from exc


class Evaluator:
    """Plain class (usable without Ray in tests); `EvaluatorActor` is its Ray actor."""

    def __init__(
        self,
        base_dir: str | RunPath,
        vector_paths: list[str | RunPath],
        shard_paths: dict[str, str | RunPath],
        batch_size: int = 8,
        max_sequences: int | None = None,
        vector_dtype: str = "float32",
        torch_threads: int | None = None,
        trust_remote_code: bool = False,
        device: str | None = None,
        autocast: str = "none",
        merge_spec: dict | None = None,
        test_paths: dict[str, str | RunPath] | None = None,
        sample_seed: int = 0,
        spread_gpus: int | None = None,
    ) -> None:
        """`merge_spec`: ResidentMerge's method keywords (method, density, dare_seed,
        groups, names); the vectors are prepared for the method once, here. `spread_gpus`:
        the GPUs to spread the model over (default: the whole GPUs Ray gave the actor)."""
        gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
        if device is None:  # a GPU when Ray gave this actor one (or, outside Ray, when present)
            use_cuda = torch.cuda.is_available() and (gpu_ids or not ray.is_initialized())
            device = "cuda" if use_cuda else "cpu"
        self.device = device
        threads = torch_threads or (_cpus_held() if device == "cpu" else None)
        if threads:
            torch.set_num_threads(threads)
        self.num_gpus = _gpus_held() if self.device == "cuda" else 0.0
        start = self._clock()
        self.base_dir = fetch(base_dir)
        self.trust_remote_code = trust_remote_code
        # `evaluator.gpus_per_actor: N > 1`: contiguous blocks of layers on each of the N
        # GPUs, each holding (and merging) its layers' base and vectors.
        spread = spread_gpus or (int(self.num_gpus) if self.num_gpus > 1 else 1)
        device_map = None
        if spread > 1:
            device_map = evaluator_device_map(self.base_dir, spread, k=len(vector_paths),
                                              vector_dtype=vector_dtype,
                                              trust_remote_code=trust_remote_code)  # fmt: skip
            log.info("evaluator over %d GPUs: %s", spread, device_map)
        with explain_out_of_memory(self.device, "loading the base and the vectors"):
            self.model = load_model(self.base_dir, self.device, trust_remote_code,
                                    device_map=device_map).eval()  # fmt: skip
            paths = [fetch(p) for p in vector_paths]
            # LoRA fine-tunes' vectors stay low-rank here too (finetune.method: lora)
            merge_class = LowRankMerge if lowrank_vectors(paths) else ResidentMerge
            self.merge = merge_class(
                self.model,
                [LazyTensors(p) for p in paths],
                vector_dtype,
                **((merge_spec or {}) if vector_paths else {}),
            )
        # Validation (what the search sees) and test (only the report's): capped to the
        # same seeded sample of `max_sequences` rows per shard.
        self.shards = self._load_shards(shard_paths, max_sequences, sample_seed)
        self.test_shards = self._load_shards(test_paths or {}, max_sequences, sample_seed)
        self.batch_size = batch_size
        # Autocast runs the forward in lower precision; the loss is still summed in float64.
        self.autocast = None if autocast == "none" else getattr(torch, autocast)
        self.load_device_seconds = self._spent(start)  # part of the search's cost
        self.device_seconds = 0.0
        self.busy_seconds = 0.0  # wall time spent in evaluate (the search's utilisation)
        self.merge_seconds = 0.0  # of which merging candidates into the live weights
        self.tokens = 0
        self.calls = 0
        self.merges = 0
        self._merged: tuple[float, ...] | None = None
        self._tokenizer = None  # loaded on the first downstream call

    def evaluate(
        self, weights: list[float], part: int = 0, parts: int = 1, split: str = "validation"
    ) -> dict:
        """Merge `weights` in place (unless they are live already) and score `split`
        (`validation`, what the search uses, or `test`).

        With `parts` > 1 only rows `part::parts` of each shard are scored: one slice of
        a multi-fidelity trial. Every slice holds rows of every dataset, so the running
        objective over the slices seen so far estimates the full one.
        """
        if not 0 <= part < parts:
            raise ValueError(f"slice {part} of {parts} does not exist")
        shards = self._split(split)
        start = self._clock()
        with explain_out_of_memory(self.device, "scoring a candidate"):
            merged = self._set_weights(weights)
            return {**self._score(start, part, parts, shards), "merge_seconds": merged}

    def evaluate_checkpoint(self, model_dir: str | RunPath, split: str = "validation") -> dict:
        """Score another checkpoint of the same architecture (a specialist, the merged
        model) on `split`."""
        shards = self._split(split)
        start = self._clock()
        model_dir = self._load_checkpoint(model_dir)
        with explain_out_of_memory(self.device, f"scoring {model_dir}"):
            return self._score(start, shards=shards)

    def downstream(
        self,
        tasks: TaskSet,
        settings: dict,
        model_dir: str | RunPath | None = None,
        weights: list[float] | None = None,
    ) -> dict:
        """lm-eval's scores on `tasks` of a checkpoint (`model_dir`) or of a candidate
        (`weights`, merged in place as for `evaluate`): no model is written to disk.
        `settings`: num_fewshot, limit, batch_size."""
        from dem_ray.downstream.harness import evaluate_model

        if (model_dir is None) == (weights is None):
            raise ValueError("give exactly one of model_dir or weights")
        start = self._clock()
        if model_dir is not None:
            self._load_checkpoint(model_dir)
        else:
            with explain_out_of_memory(self.device, "merging a candidate"):
                self._set_weights(weights)
        if self._tokenizer is None:  # every model of a run has the base's tokenizer
            from transformers import AutoTokenizer  # as lm-eval loads it (no length override)

            self._tokenizer = AutoTokenizer.from_pretrained(
                str(self.base_dir), trust_remote_code=self.trust_remote_code
            )
        tokenizer = self._tokenizer
        with explain_out_of_memory(self.device, "scoring downstream tasks"), torch.no_grad():
            result = evaluate_model(self.model, tokenizer, tasks, **settings)
        spent = self._spent(start)
        self.device_seconds += spent
        self.calls += 1
        return {**result, "device_seconds": spent, "wall_seconds": time.perf_counter() - start[0]}

    def _set_weights(self, weights: list[float]) -> float:
        """Merge `weights` into the live model, unless they are live already; the wall
        seconds the merge took (0 when they were live)."""
        key = tuple(float(w) for w in weights)
        if key == self._merged:
            return 0.0
        start = self._clock()
        self._merged = None  # a failed apply must not leave stale weights marked live
        self.merge.apply(weights)
        self._merged = key
        self.merges += 1
        if self.device == "cuda":
            _synchronize()
        spent = time.perf_counter() - start[0]
        self.merge_seconds += spent
        return spent

    def _load_checkpoint(self, model_dir: str | RunPath) -> Path:
        """Another checkpoint's weights into the live model (the merge is no longer live)."""
        model_dir = fetch(model_dir)
        if is_adapter_dir(model_dir):  # a LoRA fine-tune: the base plus its adapter's change
            state = AdapterState(self.base_dir, model_dir)
        else:
            check_model_dir(model_dir, role="checkpoint")  # safetensors only, never pickles
            state = {}
            for path in sorted(model_dir.glob("*.safetensors")):
                state.update(LazyTensors(path))
        self._merged = None
        with explain_out_of_memory(self.device, f"loading {model_dir}"):
            self.merge.load_state(state)
        return model_dir

    def info(self) -> dict:
        return {
            "device": self.device,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
            "device_seconds": self.device_seconds,
            "busy_seconds": self.busy_seconds,
            "merge_seconds": self.merge_seconds,
            "load_device_seconds": self.load_device_seconds,
            "tokens": self.tokens,
            "calls": self.calls,
            "merges": self.merges,
            "rss_bytes": _rss_bytes(),
            "torch_threads": torch.get_num_threads(),
            "validation_tokens": {n: s.targets for n, s in self.shards.items()},
            "test_tokens": {n: s.targets for n, s in self.test_shards.items()},
        }

    def _load_shards(
        self, paths: dict[str, str | RunPath], max_sequences: int | None, seed: int
    ) -> dict[str, ScoredShard]:
        shards = {}
        for name, path in paths.items():
            rows, mask = load_shard(fetch(path))
            keep = sample_index(rows.shape[0], max_sequences, seed)
            if keep is not None:
                rows, mask = rows[keep], (None if mask is None else mask[keep])
            shards[name] = ScoredShard(
                rows.to(self.device, dtype=torch.long),
                None if mask is None else mask.to(self.device, dtype=torch.bool),
            )
        return shards

    def _split(self, split: str) -> dict[str, ScoredShard]:
        if split == "validation":
            return self.shards
        if split == "test":
            if not self.test_shards:
                raise ValueError("this evaluator holds no test shards (give test_paths)")
            return self.test_shards
        raise ValueError(f"no split '{split}' to score; use 'validation' or 'test'")

    def _score(
        self,
        start: tuple[float, float],
        part: int = 0,
        parts: int = 1,
        shards: dict[str, ScoredShard] | None = None,
    ) -> dict:
        shards = self.shards if shards is None else shards
        nll = {
            name: token_nll(self.model, shard.rows[part::parts], self.batch_size, self.autocast,
                            None if shard.mask is None else shard.mask[part::parts])
            for name, shard in shards.items()
        }  # fmt: skip
        spent = self._spent(start)
        tokens = sum(n for _, n in nll.values())
        self.device_seconds += spent
        self.tokens += tokens
        self.calls += 1
        busy = time.perf_counter() - start[0]  # merge and forward, wall clock
        self.busy_seconds += busy
        return {"nll": nll, "device_seconds": spent, "tokens": tokens, "wall_seconds": busy}

    def _clock(self) -> tuple[float, float]:
        if self.device == "cuda":
            _synchronize()
        return time.perf_counter(), time.process_time()

    def _spent(self, start: tuple[float, float]) -> float:
        """GPU-seconds on a GPU (wall x the GPUs held: 0.5 on half a GPU); CPU core-seconds
        (this process's CPU time) on a CPU."""
        if self.device == "cuda":
            _synchronize()
            return (time.perf_counter() - start[0]) * self.num_gpus
        return time.process_time() - start[1]


@dataclass(frozen=True)
class ScoredShard:
    """A split's rows on the evaluator's device, with the loss mask of instruction data
    (None for packed text, where every next token is a target)."""

    rows: torch.Tensor
    mask: torch.Tensor | None = None

    @property
    def targets(self) -> int:
        return target_count(self.rows, self.mask)


def sample_index(count: int, max_sequences: int | None, seed: int) -> torch.Tensor | None:
    """The rows to keep of `count`: at most `max_sequences`, a seeded random sample (the
    same for a shard with the same seed, whichever shards load beside it), kept in the
    shard's order; None keeps all. Not the first rows: shards keep the file's order, so
    those would be its first documents."""
    if max_sequences is None or count <= max_sequences:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(count, generator=generator)[:max_sequences].sort().values


def sample_rows(rows: torch.Tensor, max_sequences: int | None, seed: int) -> torch.Tensor:
    """`rows` cut to `sample_index`'s sample."""
    keep = sample_index(rows.shape[0], max_sequences, seed)
    return rows if keep is None else rows[keep]


def _synchronize() -> None:
    """Wait for every GPU this actor sees (Ray sets CUDA_VISIBLE_DEVICES to its own), not
    only the current one: a model spread over several merges and computes on each."""
    for index in range(torch.cuda.device_count()):
        torch.cuda.synchronize(index)


def _gpus_held() -> float:
    """The GPUs Ray gave this actor, fractions included; 1 outside Ray."""
    if not ray.is_initialized():
        return 1.0
    held = ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0)
    return float(held) or 1.0


def _cpus_held() -> int | None:
    """The CPUs Ray gave this actor, as torch threads (at least 1); None outside an actor,
    where torch keeps its own default. Without this an actor runs as many threads as the node
    has cores (or Ray's OMP_NUM_THREADS), whatever share of them it holds."""
    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return None  # not an actor (a plain Evaluator in the driver): leave torch alone
    held = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
    return max(1, int(held))


def _rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; 0 where it cannot be read)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


EvaluatorActor = ray.remote(Evaluator)


def start_pool(
    count: int,
    kwargs: dict,
    cpus: float = 1.0,
    gpus: float = 0.0,
    placement: dict | None = None,
) -> list:
    """Start `count` evaluator actors, spread over nodes, and wait until all are loaded.

    `placement`: further `.options()` (memory, custom resources, accelerator_type).
    """
    options = {"num_cpus": cpus, "num_gpus": gpus, "max_restarts": 2, "max_task_retries": 2}
    options.update(placement or {})
    if count > 1:
        options["scheduling_strategy"] = "SPREAD"
    actors = [EvaluatorActor.options(**options).remote(**kwargs) for _ in range(count)]
    infos = ray.get([a.info.remote() for a in actors])
    for info in infos:
        log.info(
            "evaluator ready on %s (node %s, pid %s): validation tokens %s",
            info["device"],
            info["node_id"],
            info["pid"],
            info["validation_tokens"],
        )
    return actors
