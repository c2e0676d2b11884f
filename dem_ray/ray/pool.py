"""The evaluator pool's lifecycle: start once, reuse while its inputs hold, give resources back.

The pool is what makes a candidate cheap (base, vectors and validation shards resident),
and also what a run pays for up front: loading base and vectors into every actor is a
cost that grows with k, so it is measured here and charged to the stage that started
the pool.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import ray

from dem_ray.config import EvaluatorConfig
from dem_ray.core.hashing import hash_json
from dem_ray.ray.evaluator import start_pool
from dem_ray.ray.placement import actor_options

log = logging.getLogger(__name__)


@dataclass
class PoolSpec:
    """What the actors load: they are started again only when this changes."""

    base_dir: object
    vector_paths: list
    shard_paths: dict
    trust_remote_code: bool
    vector_hashes: list[str] = field(default_factory=list)
    # ResidentMerge's method keywords (method, density, dare_seed, groups, names): the
    # vectors are prepared for the method when an actor loads them.
    merge_spec: dict = field(default_factory=dict)
    test_paths: dict = field(default_factory=dict)  # the test shards (scored by the report)
    sample_seed: int = 0  # which rows a capped shard keeps (`finetune.seed`)

    def key(self, ev: EvaluatorConfig) -> str:
        return hash_json(
            {
                "vectors": self.vector_hashes,
                "merge": self.merge_spec,
                "shards": sorted(map(str, self.shard_paths.values())),
                "test": sorted(map(str, self.test_paths.values())),
                "sample_seed": self.sample_seed,
                "evaluator": ev.model_dump(),
            }
        )


class EvaluatorPool:
    """Started on first use by a stage; `startup_cost` is what its start cost, once."""

    def __init__(self, ev: EvaluatorConfig) -> None:
        self.ev = ev
        self.actors: list | None = None
        self.device = "cpu"
        self._key: str | None = None
        self._has_vectors = False
        self._unbilled: dict | None = None

    def get(self, spec: PoolSpec) -> list:
        """The actors for `spec`; an actor pool with vectors also serves a request without."""
        key = spec.key(self.ev)
        if self.actors is not None and (
            key == self._key or (not spec.vector_paths and self._has_vectors)
        ):
            return self.actors
        self.release()
        ev = self.ev
        kwargs = {
            "base_dir": spec.base_dir,
            "vector_paths": spec.vector_paths,
            "shard_paths": spec.shard_paths,
            "batch_size": ev.batch_size,
            "max_sequences": ev.max_validation_sequences,
            "vector_dtype": ev.vector_dtype,
            "torch_threads": ev.torch_threads,
            "autocast": ev.autocast,
            "trust_remote_code": spec.trust_remote_code,
            "merge_spec": spec.merge_spec,
            "test_paths": spec.test_paths,
            "sample_seed": spec.sample_seed,
        }
        log.info("starting %d evaluator actor(s)", ev.num_actors)
        start = time.perf_counter()
        self.actors = start_pool(ev.num_actors, kwargs, ev.cpus_per_actor, ev.gpus_per_actor,
                                 placement=actor_options(ev))  # fmt: skip
        infos = ray.get([a.info.remote() for a in self.actors])
        self.device = infos[0]["device"]
        self._key = key
        self._has_vectors = bool(spec.vector_paths)
        self._unbilled = {
            "startup_device_seconds": sum(i["load_device_seconds"] for i in infos),
            "startup_wall_seconds": time.perf_counter() - start,
        }
        return self.actors

    def take_startup_cost(self) -> dict:
        """The start-up cost not yet charged to a stage (zeros once charged)."""
        cost = self._unbilled or {"startup_device_seconds": 0.0, "startup_wall_seconds": 0.0}
        self._unbilled = None
        return cost

    def release(self) -> None:
        """Kill the actors and wait until Ray has their CPUs/GPUs back.

        `ray.kill` returns before the resources are free; whoever counts free resources
        next (the baseline's trainer launches) would otherwise see the actors' share as
        taken and start fewer trainers at once.
        """
        if self.actors is None:
            return
        ev = self.ev
        before = ray.available_resources()
        for actor in self.actors:
            ray.kill(actor)
        want = {
            "CPU": before.get("CPU", 0.0) + ev.cpus_per_actor * len(self.actors),
            "GPU": before.get("GPU", 0.0) + ev.gpus_per_actor * len(self.actors),
        }
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline:
            free = ray.available_resources()
            if all(free.get(k, 0.0) >= v - 1e-6 for k, v in want.items()):
                break
            time.sleep(0.1)
        else:
            log.warning("the evaluator actors' resources were not back after 15 s")
        self.actors = None
        self._key = None
