"""Every path of a run directory, in one place.

Stages ask the layout where things go; no stage builds a path of its own, so the shape
of a run directory can be read (and changed) here alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "validation", "test")  # the shards prepare writes per dataset


@dataclass(frozen=True)
class RunLayout:
    root: Path
    names: tuple[str, ...]

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    # ---- prepare --------------------------------------------------------------------
    @property
    def base(self) -> Path:
        """Where a GGUF or Hub base is materialized (a local `{dir: PATH}` base stays put)."""
        return self.root / "base"

    def shard(self, name: str, split: str) -> Path:
        """A dataset's packed token rows of one split (`train`, `validation` or `test`)."""
        if split not in SPLITS:
            raise ValueError(f"no split '{split}'; the splits are {', '.join(SPLITS)}")
        return self.root / "data" / f"{name}.{split}.safetensors"

    # ---- DEM ------------------------------------------------------------------------
    def finetune(self, name: str) -> Path:
        return self.root / "finetune" / name

    def vector(self, name: str) -> Path:
        return self.root / "vectors" / f"{name}.safetensors"

    @property
    def search(self) -> Path:
        return self.root / "search"

    @property
    def trials(self) -> Path:
        return self.search / "trials.jsonl"

    @property
    def study(self) -> Path:
        return self.search / "study.db"

    @property
    def grid_trials(self) -> Path:
        return self.search / "grid_trials.jsonl"

    @property
    def best(self) -> Path:
        return self.search / "best.json"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    # ---- the data-mixing baseline ---------------------------------------------------------
    @property
    def baseline(self) -> Path:
        return self.root / "baseline"

    @property
    def mixtures(self) -> Path:
        return self.baseline / "mixtures"

    def mixture(self, mixture_id: str) -> Path:
        return self.mixtures / mixture_id

    @property
    def best_mixture(self) -> Path:
        return self.baseline / "best"

    # ---- report and Ray's own storage -------------------------------------------------------
    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def logs(self) -> Path:
        """A folder per command (`console.new_log_dir`): the driver's, workers' and Ray's logs."""
        return self.root / "logs"

    @property
    def ray_train(self) -> Path:
        return self.root / "ray_train"

    def swapped_dirs(self) -> list[Path]:
        """Directories written by an atomic swap: a kill mid-swap may leave `.NAME.old`."""
        return [
            self.merged,
            self.base,
            self.best_mixture,
            *(self.finetune(n) for n in self.names),
        ]
