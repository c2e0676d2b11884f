"""The data-mixing grid baseline: what DEM replaces.

One model is trained per mixing ratio, on batches drawn from the datasets in
proportion to that ratio, with the same optimiser, learning rate, sequence length
and batch size as the DEM fine-tunes. By default each mixture sees as many
training tokens as all DEM fine-tunes together, so one mixture costs what DEM's
whole fine-tuning stage costs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dem_ray.core.spaces import Space

if TYPE_CHECKING:  # core reads the config's shape, never imports the package above it
    from dem_ray.config import BaselineConfig, FinetuneConfig


def mixtures(cfg: BaselineConfig, names: list[str]) -> list[dict[str, float]]:
    """The baseline's mixing ratios, from an explicit list or the simplex grid."""
    if cfg.mixtures:
        return cfg.mixture_dicts()
    return Space("simplex", tuple(names)).grid(cfg.grid_step)


def mixture_id(weights: dict[str, float]) -> str:
    """A stable, readable and exact name for a mixture, e.g. 'code0.5-chat0.5'.

    Each ratio is written as the shortest decimal that reads back as the same float, so
    two mixtures that differ anywhere have different ids (a fixed number of decimals
    made 0.1234 and 0.1231 one mixture).
    """
    return "-".join(f"{name}{float(ratio)!r}" for name, ratio in weights.items())


def steps_per_mixture(cfg: BaselineConfig, finetune: FinetuneConfig, num_datasets: int) -> int:
    """The fair budget: all DEM fine-tunes' steps together, unless `baseline.steps` says."""
    return cfg.steps if cfg.steps is not None else finetune.max_steps * num_datasets


def grid_step_for_comparison(cfg) -> float:
    """The grid the search is compared against: the baseline's mixture grid when it has
    one, else `search.grid_step` (`cfg` is a RunConfig)."""
    b = cfg.baseline
    return b.grid_step if b is not None and b.grid_step else cfg.search.grid_step
