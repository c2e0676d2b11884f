"""One Ray Train `TorchTrainer` per dataset, launched together so a cluster with room
runs them all at once. Each saves its model as an HF directory (safetensors)."""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
import ray.train
import torch
from ray.train import Checkpoint, RunConfig
from ray.train.torch import TorchTrainer

from dem_ray.config import FinetuneConfig
from dem_ray.models import copy_tokenizer, replace_dir
from dem_ray.placement import scaling_config, trainers_that_fit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneJob:
    """One training run: a single dataset (DEM) or a mixture of several (the baseline)."""

    name: str
    base_dir: str
    train_shards: dict[str, str]
    out_dir: str
    mixture: dict[str, float] | None = None  # sampling ratio per dataset; None: one dataset
    max_steps: int | None = None  # overrides FinetuneConfig.max_steps


def sample_batch(
    shards: list[torch.Tensor], probs: torch.Tensor, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows drawn from the shards in proportion to `probs`; also the rows per shard."""
    source = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
    rows = []
    for s in source.tolist():
        index = torch.randint(shards[s].shape[0], (1,), generator=generator)
        rows.append(shards[s][index])
    return torch.cat(rows), torch.bincount(source, minlength=len(shards))


def train_loop(config: dict) -> None:
    """Runs on each Ray Train worker: AdamW on random packed rows of one dataset or a mixture."""
    import ray.train.torch as rt
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    wall0, cpu0 = time.perf_counter(), time.process_time()
    hp = FinetuneConfig(**config["finetune"])
    max_steps = config.get("max_steps") or hp.max_steps
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if hp.torch_threads:
        torch.set_num_threads(hp.torch_threads)
    torch.manual_seed(hp.seed)
    model = AutoModelForCausalLM.from_pretrained(config["base_dir"], use_safetensors=True)
    model.train()
    model = rt.prepare_model(model)
    device = next(model.parameters()).device
    names = list(config["train_shards"])
    shards = [load_file(config["train_shards"][n])["input_ids"] for n in names]
    mixture = config.get("mixture") or {names[0]: 1.0}
    probs = torch.tensor([mixture[n] for n in names], dtype=torch.float64)
    rows_seen = torch.zeros(len(names), dtype=torch.long)
    generator = torch.Generator().manual_seed(hp.seed * 1000 + rank)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / (hp.warmup_steps + 1))
    )
    tag = f"[finetune {config['name']}]"
    tokens_per_step = hp.batch_size * hp.seq_len * world
    interval_start, loss_value = time.perf_counter(), float("nan")
    for step in range(1, max_steps + 1):
        batch, counts = sample_batch(shards, probs, hp.batch_size, generator)
        rows_seen += counts
        batch = batch.to(device=device, dtype=torch.long)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"{tag} loss is {loss_value} at step {step}; lower the lr")
        if rank == 0 and (step % hp.log_every == 0 or step == max_steps):
            done = hp.log_every if step % hp.log_every == 0 else step % hp.log_every
            rate = done * tokens_per_step / (time.perf_counter() - interval_start)
            print(
                f"{tag} step {step}/{max_steps} loss {loss_value:.4f} tokens/s {rate:.0f}",
                file=sys.stderr,
                flush=True,
            )
            interval_start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize()
        device_seconds = time.perf_counter() - wall0
    else:
        device_seconds = time.process_time() - cpu0
    device_seconds = _sum_over_workers(device_seconds, world, device)
    tokens_by_dataset = {
        n: int(_sum_over_workers(float(rows_seen[i]), world, device)) * hp.seq_len
        for i, n in enumerate(names)
    }
    metrics = {
        "tokens": max_steps * tokens_per_step,
        "tokens_by_dataset": tokens_by_dataset,
        "device_seconds": device_seconds,
        "final_loss": loss_value,
        "steps": max_steps,
        "workers": world,
        "device": device.type,
        "node_id": ray.get_runtime_context().get_node_id(),
    }
    if rank != 0:
        ray.train.report(metrics)
        return
    unwrapped = model.module if hasattr(model, "module") else model
    with tempfile.TemporaryDirectory() as tmp:
        unwrapped.save_pretrained(tmp, safe_serialization=True)
        copy_tokenizer(Path(config["base_dir"]), Path(tmp))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


def concurrency_that_fits(hp: FinetuneConfig) -> int:
    """How many trainers the cluster's free resources hold now (at least one).

    Ray Train gives up on a worker group that waits more than 60 s for resources, so
    launching more trainers than fit would fail the rest; on an autoscaling cluster
    set `finetune.max_concurrent` to what the autoscaler may add.
    """
    return trainers_that_fit(hp, ray.available_resources())


def _sum_over_workers(value: float, world: int, device: torch.device) -> float:
    if world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def run_finetunes(
    jobs: list[FinetuneJob], hp: FinetuneConfig, storage_dir: Path
) -> tuple[dict[str, dict], dict[str, BaseException]]:
    """Fit every job concurrently; copy each result to its out_dir.

    Returns the measured metrics of the fine-tunes that finished and the errors of
    those that did not, so the finished ones are recorded even when one fails.
    """
    results: dict[str, dict] = {}
    errors: dict[str, BaseException] = {}

    def fit(job: FinetuneJob, start: float) -> None:
        """`start` is when the job was launched: its wall time includes waiting for a slot."""
        try:
            trainer = TorchTrainer(
                train_loop,
                train_loop_config={
                    "name": job.name,
                    "base_dir": job.base_dir,
                    "train_shards": job.train_shards,
                    "mixture": job.mixture,
                    "max_steps": job.max_steps,
                    "finetune": asdict(hp),
                },
                scaling_config=scaling_config(hp),
                run_config=RunConfig(
                    name=f"finetune-{job.name}-{time.time_ns()}",
                    storage_path=str(storage_dir),
                ),
            )
            result = trainer.fit()
            if result.error is not None:
                raise result.error
            if result.checkpoint is None:
                raise RuntimeError(f"fine-tune '{job.name}' reported no checkpoint")
            out = Path(job.out_dir)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
            shutil.rmtree(tmp)
            with result.checkpoint.as_directory() as ckpt:
                shutil.copytree(ckpt, tmp)
            replace_dir(tmp, out)
            shutil.rmtree(result.path, ignore_errors=True)
            metrics = dict(result.metrics)
            metrics["wall_seconds"] = time.perf_counter() - start
            results[job.name] = metrics
            log.info(
                "fine-tune '%s' done: %d tokens, %.1f device-s, %.1f s wall -> %s",
                job.name,
                metrics["tokens"],
                metrics["device_seconds"],
                metrics["wall_seconds"],
                out,
            )
        except BaseException as exc:  # noqa: BLE001 - re-raised in the driver thread below
            errors[job.name] = exc

    limit = hp.max_concurrent or concurrency_that_fits(hp)
    log.info(
        "launching %d fine-tunes, %d at a time: %s",
        len(jobs), min(limit, len(jobs)), ", ".join(j.name for j in jobs),
    )  # fmt: skip
    slots = threading.Semaphore(limit)

    def fit_in_slot(job: FinetuneJob) -> None:
        start = time.perf_counter()
        with slots:
            fit(job, start)

    threads = [
        threading.Thread(target=fit_in_slot, args=(job,), name=f"fit-{job.name}") for job in jobs
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors
