"""The data-mixing grid baseline: what DEM replaces.

One model is trained per mixing ratio, on batches drawn from the datasets in
proportion to that ratio, with the same optimiser, learning rate, sequence length
and batch size as the DEM fine-tunes. By default each mixture sees as many
training tokens as all DEM fine-tunes together, so one mixture costs what DEM's
whole fine-tuning stage costs.
"""

from __future__ import annotations

from dem_ray.config import BaselineConfig, FinetuneConfig
from dem_ray.spaces import Space


def mixtures(cfg: BaselineConfig, names: list[str]) -> list[dict[str, float]]:
    """The baseline's mixing ratios, from an explicit list or the simplex grid."""
    if cfg.mixtures:
        return cfg.mixture_dicts()
    return Space("simplex", tuple(names)).grid(cfg.grid_step)


def mixture_id(weights: dict[str, float]) -> str:
    """A stable, readable name for a mixture, e.g. 'code0.500-chat0.500'."""
    return "-".join(f"{name}{ratio:.3f}" for name, ratio in weights.items())


def steps_per_mixture(cfg: BaselineConfig, finetune: FinetuneConfig, num_datasets: int) -> int:
    """The fair budget: all DEM fine-tunes' steps together, unless `baseline.steps` says."""
    return cfg.steps if cfg.steps is not None else finetune.max_steps * num_datasets
