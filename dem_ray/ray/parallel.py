"""How a fine-tune's workers share the model: DDP (Ray Train's `prepare_model`) or FSDP2.

FSDP2 (`fully_shard`) is called directly: Ray 2.60's `prepare_model(parallel_strategy=
"fsdp")` wraps the model in FSDP1. Each decoder layer is its own shard group, the root
holds the rest (embeddings, tied head, final norm), so a worker holds 1/world of the
weights, gradients and AdamW state between the layer it computes.

Checkpoints keep the DDP format whatever the strategy: the model as an HF directory and
the optimizer state keyed by parameter index (`full_states` gathers both onto rank 0's
CPU), so a checkpoint is read the same way and a run may resume under either strategy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: modules of the classes HF names in `_no_split_modules`
    (e.g. `LlamaDecoderLayer`), found through a PEFT wrapper too."""
    kinds: set[str] = set()
    for module in model.modules():
        kinds |= set(getattr(module, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in kinds]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} names no decoder layer class (`_no_split_modules`); "
            "finetune.strategy: fsdp cannot split it - use ddp"
        )
    return layers


def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2 over every worker of the process group: one group per decoder layer, the
    root for the rest (a tied embedding and head stay one parameter, in the root).

    The model may sit on the CPU: `fully_shard` moves each group to `device` as it shards
    it, so the device never holds more than one whole layer (not the whole model)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Backward passes that only accumulate (`sync=False`) or also all-reduce / reduce-scatter
    (`sync=True`, the last micro-batch of a step): DDP's `no_sync`, FSDP2's
    `set_requires_gradient_sync`."""
    if sync:
        yield
    elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The model's whole state dict on rank 0's CPU under FSDP (a collective: every rank
    calls it); None otherwise (the module's own state dict is whole)."""
    if not is_fsdp(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def full_states(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor] | None, dict]:
    """The model's state dict (None: the module's own, not sharded) and the optimizer's
    in `optimizer.state_dict()` form (state by parameter index). Under FSDP both are
    gathered whole onto rank 0's CPU (the others get empty dicts): a collective, so every
    rank calls it."""
    if not is_fsdp(model):
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    weights = full_weights(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    # cpu_offload leaves them on rank 0 only (the one that saves); the others get {}.
    return weights, _indexed(model, optimizer, by_name) if by_name else {}


def load_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """The inverse of `full_states` for the optimizer (state by parameter index)."""
    if not is_fsdp(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, optimizer)
    by_name = {
        "state": {names[int(i)]: fields for i, fields in state["state"].items()},
        "param_groups": [
            {**group, "params": [names[int(i)] for i in group["params"]]}
            for group in state["param_groups"]
        ],
    }
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    set_optimizer_state_dict(model, optimizer, by_name, options=options)


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer parameter, in the optimizer's index order."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _indexed(model: torch.nn.Module, optimizer: torch.optim.Optimizer, by_name: dict) -> dict:
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    return {
        "state": {index[n]: fields for n, fields in by_name["state"].items()},
        "param_groups": [
            {**group, "params": [index[n] for n in group["params"]]}
            for group in by_name["param_groups"]
        ],
    }
