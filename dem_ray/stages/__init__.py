"""The stages of a run, in the order they run, and the CLI command each belongs to."""

from __future__ import annotations

from dem_ray.stages.base import RunContext, Stage, StageError, Step
from dem_ray.stages.baseline import BestMixtureStage, MixturesStage
from dem_ray.stages.downstream import DownstreamStage, RerankStage
from dem_ray.stages.finetune import FinetuneStage
from dem_ray.stages.merge import MergeStage
from dem_ray.stages.prepare import BaseStage, DataStage
from dem_ray.stages.report import ReportStage
from dem_ray.stages.search import GridStage, SearchStage
from dem_ray.stages.vectors import VectorsStage

STAGES: tuple[Stage, ...] = (
    BaseStage(),
    DataStage(),
    FinetuneStage(),
    VectorsStage(),
    SearchStage(),
    GridStage(),
    RerankStage(),
    MergeStage(),
    MixturesStage(),
    BestMixtureStage(),
    DownstreamStage(),
    ReportStage(),
)
COMMANDS: dict[str, str] = {
    "prepare": "materialize the base model and tokenize the datasets",
    "finetune": "one Ray Train fine-tune per dataset (prepares first if needed)",
    "vectors": "distribution vectors v_i = theta_i - theta_0",
    "search": "Optuna search of the coefficients over the evaluator pool (and the plain grid, and the "
    "downstream rerank, if asked)",
    "merge": "write theta_0 + sum_i w_i v_i for the best (or given) weights",
    "baseline": "the data-mixing grid: one model per mixing ratio (prepares first if needed)",
    "downstream": "lm-evaluation-harness tasks on the base, the fine-tunes, the merged model "
    "and the best mixture",
    "report": "perplexity of every model on every dataset, and the cost",
}
# Commands that first bring these up to date themselves (never forced) instead of asking.
PREREQUISITES: dict[str, tuple[str, ...]] = {"finetune": ("prepare",), "baseline": ("prepare",)}


def stages_of(command: str) -> list[Stage]:
    return [s for s in STAGES if s.command == command]


__all__ = [
    "COMMANDS",
    "PREREQUISITES",
    "STAGES",
    "RunContext",
    "Stage",
    "StageError",
    "Step",
    "stages_of",
]
