"""What fine-tune workers and evaluator actors ask Ray for.

An autoscaler adds a node only for a request it can see, so every need is declared here:
CPUs, GPUs, memory, custom resources and the accelerator type. Nothing assumes one node.
"""

from __future__ import annotations

from ray.train import ScalingConfig

from dem_ray.config import EvaluatorConfig, FinetuneConfig

GIB = 1024**3


def worker_resources(hp: FinetuneConfig) -> dict[str, float]:
    """The resources one fine-tune worker reserves (Ray's names; memory in bytes)."""
    resources: dict[str, float] = {"CPU": hp.cpus_per_worker}
    if hp.gpus_per_worker:
        resources["GPU"] = hp.gpus_per_worker
    if hp.memory_gb:
        resources["memory"] = float(int(hp.memory_gb * GIB))
    resources.update(hp.resources)
    return resources


def scaling_config(hp: FinetuneConfig) -> ScalingConfig:
    """Ray Train's request for one fine-tune: `num_workers` x `worker_resources`."""
    return ScalingConfig(
        num_workers=hp.num_workers,
        use_gpu=hp.gpus_per_worker > 0,
        resources_per_worker=worker_resources(hp),
        accelerator_type=hp.accelerator_type,
    )


def actor_options(ev: EvaluatorConfig) -> dict:
    """`.options()` for an evaluator actor beyond CPUs and GPUs; several actors spread."""
    options: dict = {}
    if ev.memory_gb:
        options["memory"] = int(ev.memory_gb * GIB)
    if ev.resources:
        options["resources"] = dict(ev.resources)
    if ev.accelerator_type:
        options["accelerator_type"] = ev.accelerator_type
    return options


def trainers_that_fit(hp: FinetuneConfig, free: dict[str, float], minimum: int = 1) -> int:
    """How many fine-tunes the free resources `free` hold at once (at least `minimum`).

    Every resource a worker asks for counts, custom ones included. Ray marks a node with
    accelerator type X by the resource `accelerator_type:X` (1 per node) and each request for
    it takes 0.001, so it only counts when no such node is up.
    """
    request = worker_resources(hp)
    if hp.accelerator_type:
        request[f"accelerator_type:{hp.accelerator_type}"] = 0.001
    fits = min(
        int(free.get(name, 0.0) // (amount * hp.num_workers))
        for name, amount in request.items()
        if amount > 0
    )
    return max(fits, minimum)
