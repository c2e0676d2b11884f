"""One Ray Train `TorchTrainer` per dataset, launched together so a cluster with room
runs them all at once. Each saves its model as an HF directory (safetensors)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig
from ray.train.torch import TorchTrainer

from dem_ray.config import FinetuneConfig
from dem_ray.core.atomic import atomic_dir
from dem_ray.core.merge import unique_parameters
from dem_ray.core.perplexity import last_target
from dem_ray.models.base import copy_tokenizer
from dem_ray.models.lora import add_adapters, freeze_base_in
from dem_ray.ray.parallel import (
    full_states,
    full_weights,
    gradient_sync,
    load_optimizer_state,
    shard_model,
)
from dem_ray.ray.placement import scaling_config, trainers_that_fit, worker_resources
from dem_ray.run.console import emit
from dem_ray.run.external_tracking import RunSpec, finish_run, open_run, worker_run
from dem_ray.run.stopping import start_threads, wait_threads
from dem_ray.run.storage import RunPath, fetch
from dem_ray.run.tracking import EVENTS, StepEvents, copy_events

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneJob:
    """One training run: a single dataset (DEM) or a mixture of several (the baseline)."""

    name: str
    base_dir: str | RunPath  # RunPaths are fetched by the worker, on whichever node
    train_shards: dict[str, str | RunPath]
    out_dir: str  # on the driver: it copies the result there
    mixture: dict[str, float] | None = None  # sampling ratio per dataset; None: one dataset
    max_steps: int | None = None  # overrides FinetuneConfig.max_steps
    # TensorBoard event files (`dem_ray.run.tracking`): the driver copies them there from the
    # final checkpoint; `events_live`: every node mounts that dir, rank 0 also writes it live.
    events_dir: str | None = None
    events_live: bool = False
    max_shard_size: int | str = "5GB"  # largest weight file saved (merge.max_shard_size)
    # MLflow / W&B (`dem_ray.run.external_tracking`): the run's spec; None: no tracker.
    tracking: RunSpec | None = None


def sample_batch(
    shards: list, probs: torch.Tensor, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Rows drawn from the shards (`ShardReader`s) in proportion to `probs`: their token
    ids, their loss masks (None when every shard is packed text, whose every next token
    is a target; ones for a text shard beside instruction shards), and the rows per shard."""
    source = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
    rows, masks = [], []
    masked = any(shard.has_mask for shard in shards)
    for s in source.tolist():
        index = torch.randint(shards[s].num_rows, (1,), generator=generator)
        ids, mask = shards[s].rows(index)
        rows.append(ids)
        if masked:
            masks.append(torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool())
    mask = torch.cat(masks) if masked else None
    return torch.cat(rows), mask, torch.bincount(source, minlength=len(shards))


def labels_of(batch: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch cut after its last loss target (padding needs no compute: a token never
    attends to later ones) and its labels, -100 where the mask says no loss."""
    if mask is None:
        return batch, batch
    width = max(2, last_target(mask) + 1)
    batch, mask = batch[:, :width], mask[:, :width]
    return batch, batch.masked_fill(~mask, -100)


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The sampler's generator for one step: a restart replays the same batches."""
    return torch.Generator().manual_seed((seed * 1000 + rank) * 1_000_003 + step)


def micro_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    """The sampler's generator for micro-batch `micro` of one step. The first is the step's
    own (`step_generator`: one micro-batch a step draws the batches it always drew); the
    others are seeded from (seed, rank, step, micro), so a restart replays them too."""
    if micro == 0:
        return step_generator(seed, rank, step)
    key = hashlib.sha256(f"{seed}/{rank}/{step}/{micro}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)


def rows_before(
    probs: torch.Tensor, batch_size: int, seed: int, rank: int, steps: int, grad_accum: int = 1
):
    """Rows per shard the first `steps` steps drew (the sampler replayed, no data read)."""
    counts = torch.zeros(probs.numel(), dtype=torch.long)
    for step in range(1, steps + 1):
        for micro in range(grad_accum):
            generator = micro_generator(seed, rank, step, micro)
            source = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
            counts += torch.bincount(source, minlength=probs.numel())
    return counts


def lr_factor(
    step: int, warmup: int, max_steps: int, schedule: str = "constant", min_ratio: float = 0.0
) -> float:
    """The learning rate of the optimizer step after `step` steps done, as a share of the
    peak: (step + 1) / (warmup + 1) during warm-up, then 1 (`constant`) or a `linear` /
    `cosine` decay from 1 at `step == warmup` to `min_ratio` at `step == max_steps`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if schedule == "linear":
        decay = 1.0 - progress
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}")
    return min_ratio + (1.0 - min_ratio) * decay


def resolve_precision(configured: str | None, device: torch.device) -> str:
    """`finetune.precision`, or where it is null: bf16-mixed on a GPU with bf16, else fp32."""
    if configured is not None:
        return configured
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "fp32"


def accumulate_gradients(
    model, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
    precision: str = "fp32",
) -> torch.Tensor:  # fmt: skip
    """Forward and backward over one optimizer step's micro-batches (input ids, labels);
    returns the step's loss (detached).

    Each micro-batch's mean loss is weighted by its share of the step's loss targets, so
    the gradient is the one a single batch of all their rows gives (packed text: 1/N
    each). One micro-batch is today's plain `loss.backward()`. Under DDP and FSDP only
    the last backward all-reduces (`parallel.gradient_sync`). `bf16-mixed`: the forward
    under bf16 autocast, the weights and their gradients fp32.
    """
    targets = [int((labels[:, 1:] != -100).sum()) for _, labels in micro_batches]
    total = sum(targets)
    # A micro-batch without targets adds nothing (and its mean loss is 0/0); if none has
    # any, the last runs alone and its NaN loss stops the fine-tune as it always did.
    live = [i for i, n in enumerate(targets) if n] or [len(micro_batches) - 1]
    step_loss = None
    for i in live:
        ids, labels = micro_batches[i]
        with gradient_sync(model, sync=i == live[-1]):
            with contextlib.ExitStack() as forward:
                if precision == "bf16-mixed":
                    forward.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
                loss = model(input_ids=ids.to(device), labels=labels.to(device)).loss
            if len(micro_batches) > 1 and total:
                loss = loss * (targets[i] / total)
            loss.backward()
        step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
    return step_loss


# A seam for tests and tools: when set (in the driver, before the fine-tunes launch), every
# worker calls it as `AFTER_STEP(job_name, step, rank)` after each optimizer step. It travels
# to the workers with the job's config (cloudpickle); None in normal runs.
AFTER_STEP: Callable[[str, int, int], None] | None = None


def _save_state(
    model, weights: dict | None, opt: dict, scheduler, step: int, device_seconds: float, out: Path
) -> None:
    """A resumable checkpoint: weights, optimizer tensors (safetensors) and step state (JSON).

    `weights`, `opt`: the model's and optimizer's state as `parallel.full_states` gives
    them (weights None: the model's own). Safetensors and JSON rather than `torch.save`:
    nothing dem-ray reads is a pickle.
    """
    from safetensors.torch import save_file

    _save_model(model, weights, out)
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict] = {}
    for index, fields in opt["state"].items():
        for key, value in fields.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(index), {})[key] = value
    meta = {
        "step": step,
        "device_seconds": device_seconds,
        "param_groups": opt["param_groups"],
        "plain_state": plain,
        "scheduler": scheduler.state_dict(),
    }
    state_dir = out / TRAIN_STATE
    state_dir.mkdir(exist_ok=True)
    save_file(
        tensors, str(state_dir / "optimizer.safetensors"), metadata={"meta": json.dumps(meta)}
    )


def _load_state(source: Path) -> dict:
    """The inverse of `_save_state`: {step, device_seconds, optimizer, scheduler}."""
    from safetensors import safe_open

    with safe_open(str(source / TRAIN_STATE / "optimizer.safetensors"), framework="pt") as fh:
        meta = json.loads(fh.metadata()["meta"])
        state: dict[int, dict] = {int(i): dict(v) for i, v in meta["plain_state"].items()}
        for name in fh.keys():  # noqa: SIM118 - safe_open is not a dict
            index, key = name.split(".", 1)
            state.setdefault(int(index), {})[key] = fh.get_tensor(name)
    optimizer = {"state": state, "param_groups": meta["param_groups"]}
    return {
        "step": meta["step"],
        "device_seconds": meta["device_seconds"],
        "optimizer": optimizer,
        "scheduler": meta["scheduler"],
    }


# A sub-directory, so that a checkpoint's top-level *.safetensors are the model's alone.
TRAIN_STATE = "dem_ray_train_state"


def _save_model(model, weights: dict | None, out: Path, max_shard_size: int | str = "5GB") -> None:
    """An HF model directory (or, for `method: lora`, a PEFT adapter directory), from the
    gathered `weights` under FSDP."""
    extra = {}
    if weights is not None:  # the gathered dict names a tied weight twice; HF saves it once
        aliases = {a for names in unique_parameters(model).values() for a in names[1:]}
        extra["state_dict"] = {n: t for n, t in weights.items() if n not in aliases}
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size=max_shard_size,
                          **extra)  # fmt: skip


def train_loop(config: dict) -> None:
    """Runs on each Ray Train worker: AdamW on random packed rows of one dataset or a mixture.

    Every `checkpoint_every` steps it reports a checkpoint (weights, optimizer, step);
    a worker restarted by Ray Train after a failure resumes from the latest one, and
    the sampler, seeded per step, draws the very batches the lost worker would have.
    Rank 0 writes loss, lr and tokens/s of every step as TensorBoard events, which go
    into each checkpoint (the run dir may be a bucket it cannot write).
    """
    import ray.train.torch as rt
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from dem_ray.data.shards import ShardReader

    wall0, cpu0 = time.perf_counter(), time.process_time()
    hf_logging.disable_progress_bar()  # a bar per weight load, in every worker's log
    hp = FinetuneConfig(**config["finetune"])
    max_steps = config.get("max_steps") or hp.max_steps
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if hp.torch_threads:
        torch.set_num_threads(hp.torch_threads)
    torch.manual_seed(hp.seed)
    names = list(config["train_shards"])
    shards = [ShardReader(fetch(config["train_shards"][n])) for n in names]  # memory-mapped
    base_dir = fetch(config["base_dir"])
    mixture = config.get("mixture") or {names[0]: 1.0}
    probs = torch.tensor([mixture[n] for n in names], dtype=torch.float64)
    tag = f"[finetune {config['name']}]"
    with contextlib.ExitStack() as stack:
        checkpoint = ray.train.get_checkpoint()
        source, state, events = base_dir, None, None
        if checkpoint is not None:
            source = Path(stack.enter_context(checkpoint.as_directory()))
            state = _load_state(source)
        if rank == 0:  # the events so far are the checkpoint's: a lost worker's later ones go
            events = StepEvents(config.get("events_live_dir"), None if state is None else source,
                                extra=worker_run(config.get("tracking")))  # fmt: skip
        # fp32 master weights whatever the base's stored dtype (a bf16 base is upcast): in
        # pure bf16, updates smaller than half a weight's bf16 spacing round away. LoRA
        # resumes the base plus the checkpoint's adapters.
        lora = hp.method == "lora"
        model = AutoModelForCausalLM.from_pretrained(
            str(base_dir if lora else source), use_safetensors=True, dtype=torch.float32,
            trust_remote_code=config.get("trust_remote_code", False),
        )  # fmt: skip
        device = rt.get_device()
        precision = resolve_precision(hp.precision, device)
        if lora:
            model = add_adapters(model, hp.lora, None if state is None else source)
            if precision == "bf16-mixed":
                freeze_base_in(model, torch.bfloat16)
        if hp.gradient_checkpointing:  # non-reentrant: the kind DDP works with
            kwargs = {"use_reentrant": False}  # (transformers 5 renamed gradient_checkpointing_*)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            model.config.use_cache = False
        model.train()
        if hp.strategy == "fsdp" and world > 1:
            model = shard_model(model, device)
        else:
            model = rt.prepare_model(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=hp.learning_rate,
                                      weight_decay=hp.weight_decay)  # fmt: skip
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
            s, hp.warmup_steps, max_steps, hp.lr_schedule, hp.min_lr_ratio))  # fmt: skip
        start_step, earlier_seconds = 0, 0.0
        if state is not None:
            load_optimizer_state(model, optimizer, state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_step, earlier_seconds = state["step"], state["device_seconds"]
            emit("message", text=f"{tag} resuming from the checkpoint of step {start_step}")
    gpus, accum = hp.gpus_per_worker, hp.grad_accum_steps
    rows_seen = rows_before(probs, hp.batch_size, hp.seed, rank, start_step, accum)
    tokens_per_step = hp.batch_size * accum * hp.seq_len * world
    interval_start, loss_value = time.perf_counter(), float("nan")
    if rank == 0:
        emit("step", name=config["name"], step=start_step, of=max_steps, loss=None)
    for step in range(start_step + 1, max_steps + 1):
        step_start, lr = time.perf_counter(), scheduler.get_last_lr()[0]
        micro_batches = []
        for micro in range(accum):
            generator = micro_generator(hp.seed, rank, step, micro)
            batch, mask, counts = sample_batch(shards, probs, hp.batch_size, generator)
            rows_seen += counts
            micro_batches.append(labels_of(batch.to(dtype=torch.long), mask))
        loss = accumulate_gradients(model, micro_batches, device, precision)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"{tag} loss is {loss_value} at step {step}; lower the lr")
        if events is not None:
            rate = tokens_per_step / (time.perf_counter() - step_start)
            events.write(step, {"loss": loss_value, "lr": lr, "tokens_per_s": rate})
        if rank == 0 and (step % hp.log_every == 0 or step == max_steps):
            done = hp.log_every if step % hp.log_every == 0 else step % hp.log_every
            rate = done * tokens_per_step / (time.perf_counter() - interval_start)
            emit("step", name=config["name"], step=step, of=max_steps, loss=loss_value,
                 tokens_per_s=rate)  # fmt: skip
            interval_start = time.perf_counter()
        if step % hp.checkpoint_every == 0 and step < max_steps:
            spent = _sum_over_workers(_device_seconds(device, wall0, cpu0, gpus), world, device)
            weights, opt_state = full_states(model, optimizer)  # every rank: FSDP gathers
            _report(model, rank, {"step": step}, lambda out, s=step, t=spent, w=weights,
                    o=opt_state: _save_state(_unwrap(model), w, o, scheduler, s,
                                             earlier_seconds + t, out), events)  # fmt: skip
        if config.get("after_step") is not None:
            config["after_step"](config["name"], step, rank)
    device_seconds = earlier_seconds + _sum_over_workers(
        _device_seconds(device, wall0, cpu0, gpus), world, device
    )
    tokens_by_dataset = {
        n: int(_sum_over_workers(float(rows_seen[i]), world, device)) * hp.seq_len
        for i, n in enumerate(names)
    }
    metrics = {
        "tokens": sum(tokens_by_dataset.values()),
        "tokens_by_dataset": tokens_by_dataset,
        "device_seconds": device_seconds,
        "final_loss": loss_value,
        "steps": max_steps,
        "resumed_from_step": start_step,
        "workers": world,
        "device": device.type,
        "precision": precision,  # the one used: `finetune.precision` resolved on this device
        "node_id": ray.get_runtime_context().get_node_id(),
    }
    weights = full_weights(model)  # every rank: FSDP gathers

    def save_final(out: Path) -> None:
        _save_model(_unwrap(model), weights, out, config.get("max_shard_size", "5GB"))
        copy_tokenizer(base_dir, out)

    if events is not None:
        events.close()
    _report(model, rank, metrics, save_final, events)
    if events is not None:
        events.discard()


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _device_seconds(device: torch.device, wall0: float, cpu0: float, gpus: float) -> float:
    """This worker's GPU-seconds (wall x the GPUs it holds) or CPU core-seconds."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return (time.perf_counter() - wall0) * gpus
    return time.process_time() - cpu0


def _report(model, rank: int, metrics: dict, save, events: StepEvents | None = None) -> None:
    """Every worker reports; rank 0 attaches a checkpoint that `save(dir)` writes, with
    the event files so far (`events`)."""
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save(Path(tmp))
        if events is not None:
            events.save_into(Path(tmp))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


def loop_config(
    job: FinetuneJob, hp: FinetuneConfig, trust_remote_code: bool, tracking: RunSpec | None = None
) -> dict:
    """What each worker of `job` receives: plain data, plus the optional step hook;
    `tracking`: the MLflow / W&B run its rank 0 logs into (`open_run`'s)."""
    return {
        "name": job.name,
        "base_dir": job.base_dir,
        "train_shards": job.train_shards,
        "mixture": job.mixture,
        "max_steps": job.max_steps,
        "finetune": hp.model_dump(),
        "trust_remote_code": trust_remote_code,
        "events_live_dir": job.events_dir if job.events_live else None,
        "max_shard_size": job.max_shard_size,
        "tracking": tracking,
        "after_step": AFTER_STEP,
    }


# Ray Train V2 (2.60) waits this long for a worker group's placement group, then tears it
# down and asks again (a retried controller error, without limit by default). Its 60 s
# default withdraws the request before a cloud node has booted.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


@contextlib.contextmanager
def worker_group_start_timeout(seconds: float):
    """Ray Train's worker-group start timeout (`cluster.node_start_timeout_s`) for the
    trainers made inside; Ray passes the driver's value to each trainer's controller."""
    before = os.environ.get(START_TIMEOUT_ENV)
    os.environ[START_TIMEOUT_ENV] = str(float(seconds))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(START_TIMEOUT_ENV, None)
        else:
            os.environ[START_TIMEOUT_ENV] = before


def _log_demand(jobs: list[FinetuneJob], hp: FinetuneConfig, limit: int, timeout: float) -> None:
    """What the launch asks the cluster for, and how much of it is there now."""
    fits_now = trainers_that_fit(hp, ray.available_resources(), minimum=0)
    launched = min(limit, len(jobs))
    log.info(
        "launching %d fine-tunes, %d at a time (%d x %s each): %s",
        len(jobs), launched, hp.num_workers, worker_resources(hp),
        ", ".join(j.name for j in jobs),
    )  # fmt: skip
    if launched > fits_now:
        log.info(
            "the free resources hold %d of them now; the others wait for the autoscaler to add "
            "nodes, or for a fine-tune to finish (each request stands %.0f s, "
            "cluster.node_start_timeout_s, then is made again)",
            fits_now, timeout,
        )  # fmt: skip


def _sum_over_workers(value: float, world: int, device: torch.device) -> float:
    if world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def run_finetunes(
    jobs: list[FinetuneJob],
    hp: FinetuneConfig,
    storage_dir: Path,
    ray_storage: tuple[str, object] | None = None,
    trust_remote_code: bool = False,
    on_done: Callable[[str, dict], None] | None = None,
    node_start_timeout_s: float = 900.0,
) -> tuple[dict[str, dict], dict[str, BaseException]]:
    """Fit every job concurrently; copy each result to its out_dir.

    Every trainer is launched at once (at most `finetune.max_concurrent`), so an
    autoscaler sees the whole demand and adds nodes for all of it; a trainer that finds
    no room waits for it (`node_start_timeout_s` per request, Ray Train re-asking).

    Ray Train keeps its checkpoints in `storage_dir`, or at `ray_storage` (a
    `storage_path` and `storage_filesystem`, for a URI run directory) when given.
    Returns the measured metrics of the fine-tunes that finished and the errors of
    those that did not, so the finished ones are recorded even when one fails.
    `on_done(name, metrics)` runs in the caller's thread as each one finishes, so a run
    stopped while others still train keeps (records) the finished ones.
    """
    storage_path, storage_fs = ray_storage or (str(storage_dir), None)
    results: dict[str, dict] = {}
    errors: dict[str, BaseException] = {}

    def fit(job: FinetuneJob, start: float) -> None:
        """`start` is when the job was launched: its wall time includes waiting for a slot."""
        tracking = None
        try:
            tracking = open_run(job.tracking)  # one tracker run, whatever restarts the workers
            trainer = TorchTrainer(
                train_loop,
                train_loop_config=loop_config(job, hp, trust_remote_code, tracking),
                scaling_config=scaling_config(hp),
                run_config=RunConfig(
                    name=f"finetune-{job.name}-{time.time_ns()}",
                    storage_path=storage_path,
                    storage_filesystem=storage_fs,
                    failure_config=FailureConfig(max_failures=hp.max_failures),
                    checkpoint_config=CheckpointConfig(num_to_keep=2),
                ),
            )
            result = trainer.fit()
            if result.error is not None:
                raise result.error
            if result.checkpoint is None:
                raise RuntimeError(f"fine-tune '{job.name}' reported no checkpoint")
            out = Path(job.out_dir)
            with atomic_dir(out) as tmp, result.checkpoint.as_directory() as ckpt:
                # The model only: optimizer state is for resuming, not for the vectors, and
                # the event files go to their own dir (the model dir stays an HF model's).
                shutil.copytree(ckpt, tmp, ignore=shutil.ignore_patterns(TRAIN_STATE, EVENTS),
                                dirs_exist_ok=True)  # fmt: skip
                if job.events_dir is not None:
                    copy_events(Path(ckpt), Path(job.events_dir))
            with contextlib.suppress(OSError):  # the run's checkpoints: no longer needed
                result.filesystem.delete_dir(result.path)
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
        finish_run(tracking, failed=job.name in errors)

    limit = hp.max_concurrent or len(jobs)
    _log_demand(jobs, hp, limit, node_start_timeout_s)
    slots = threading.Semaphore(limit)

    def fit_in_slot(job: FinetuneJob) -> None:
        start = time.perf_counter()
        with slots:
            fit(job, start)

    # Daemon threads, waited for in a way a signal interrupts: a stopped run is not kept
    # alive by a fit() still blocked in Ray, and each result is handed over as it lands.
    def done(thread) -> None:
        if on_done is not None and thread.name in results:
            on_done(thread.name, results[thread.name])

    with worker_group_start_timeout(node_start_timeout_s):
        threads = start_threads((fit_in_slot, (job,), job.name) for job in jobs)
        wait_threads(threads, on_done=done)
    return results, errors
