"""The trial log of a search: `trials.jsonl`, one finished trial per line, and its marker.

Each finished trial is appended as one JSON line, flushed and fsync'd, so a driver
killed mid-search loses only the trials in flight. A sidecar `<name>.inputs` holds
the inputs hash (everything that decides a trial's result) the trials were made with.

The resume rule: a search with the same inputs, not forced afresh, keeps every trial
in the file, byte for byte, and numbers new trials on after them. A larger total
runs only the difference; a total at or below the number finished runs nothing and
returns the finished trials. No candidate (its weights, to 1e-9) is ever evaluated
twice in one trial log: the plain grid skips the points already done, and a sampler's
suggestions are checked against every finished and in-flight candidate (`Candidates`).
Other inputs, or `fresh`, start an empty log.

Nothing here imports Ray: the log is read by the report and by tests without it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from dem_ray.core.atomic import write_text_atomic
from dem_ray.core.spaces import Space

log = logging.getLogger(__name__)

SAME_CANDIDATE = 1e-9  # weights closer than this (each one) are one candidate


def read_trials(path: Path) -> list[dict]:
    """The finished trials in `path`; a last line cut short by a kill is ignored."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    trials = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            trials.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                log.warning("%s: ignoring its last line, cut short (%s)", path, exc)
                break
            raise RuntimeError(
                f"{path}: line {number} is not a trial record ({exc}); delete the file "
                "to run the search afresh"
            ) from exc
    return trials


def resume_trials(path: Path, inputs: str, fresh: bool) -> list[dict]:
    """Trials an earlier search with the same inputs finished; otherwise start afresh.

    A sidecar `<name>.inputs` holds the inputs hash the trials were made with, so
    trials of changed vectors, data or search settings are never mixed in. The file
    is rewritten without a cut-short last line so new trials append cleanly (each kept
    line is re-serialised as it was written, so the kept lines stay byte-identical).
    """
    marker = inputs_marker(path)
    same = not fresh and marker.exists() and marker.read_text().strip() == inputs
    if not same:
        path.unlink(missing_ok=True)
        write_text_atomic(marker, inputs + "\n")
        return []
    trials = read_trials(path)
    write_text_atomic(path, "".join(json.dumps(t) + "\n" for t in trials))
    return trials


def made_with(path: Path, inputs: str) -> bool:
    """Whether the trials in `path` were made by a search with these inputs (resumable)."""
    marker = inputs_marker(path)
    return marker.exists() and marker.read_text().strip() == inputs


def inputs_marker(path: Path) -> Path:
    """The sidecar holding the inputs hash the trials in `path` were made with."""
    return path.with_name(path.name + ".inputs")


class Candidates:
    """The candidates (weight vectors over `names`) a search has evaluated or started.

    `find` answers whether a weight vector is one of them: every weight within `tol`.
    A plain scan: a search holds hundreds of candidates, not millions.
    """

    def __init__(
        self, names: Sequence[str], weights: Iterable[dict] = (), tol: float = SAME_CANDIDATE
    ) -> None:
        self.names = tuple(names)
        self.tol = tol
        self._points: list[tuple[float, ...]] = []
        for w in weights:
            self.add(w)

    def _vector(self, weights: dict) -> tuple[float, ...]:
        return tuple(float(weights.get(n, 0.0)) for n in self.names)

    def add(self, weights: dict) -> None:
        self._points.append(self._vector(weights))

    def find(self, weights: dict) -> int | None:
        """The index of the known candidate equal to `weights` (to `tol`), else None."""
        x = self._vector(weights)
        for i, p in enumerate(self._points):
            if all(abs(a - b) <= self.tol for a, b in zip(x, p, strict=True)):
                return i
        return None

    def __contains__(self, weights: dict) -> bool:
        return self.find(weights) is not None

    def __len__(self) -> int:
        return len(self._points)


def remaining_grid_points(points: list[dict], finished: list[dict]) -> list[dict]:
    """Grid points no finished trial has evaluated yet (the same notion of one candidate
    as the samplers' guard: every weight within `SAME_CANDIDATE`)."""
    if not points:
        return []
    done = Candidates(list(points[0]), (t["weights"] for t in finished))
    return [p for p in points if p not in done]


class TrialLog:
    """Appends finished trials to the log (numbered after the kept ones) and tracks the best.

    `after_write` is called after each append (e.g. to upload the file to a URI run
    directory).
    """

    def __init__(
        self,
        path: Path,
        finished: list[dict] | None = None,
        after_write: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self.after_write = after_write
        self.done = len(finished or [])
        scored = [t for t in finished or [] if math.isfinite(full_objective(t))]
        self.best: dict | None = min(scored, key=full_objective) if scored else None

    def append(self, trial_id: str, params: dict, result: dict) -> dict:
        """Write one finished trial (its last reported result) and return its record."""
        record = {
            "trial": self.done,
            "trial_id": trial_id,
            "weights": result["weights"],
            "params": params,
            "objective": result["objective"],
            "ppl": result["ppl"],
            "device_seconds": result["device_seconds"],
            "tokens_evaluated": result["tokens_evaluated"],
            "slices_done": result.get("slices_done", 1),
            "complete": result.get("complete", True),
        }
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())  # a finished trial survives the driver being killed
        if self.after_write is not None:
            self.after_write()
        self.done += 1
        if record["complete"] and (
            self.best is None or record["objective"] < self.best["objective"]
        ):
            self.best = record
        return record


def warm_start_points(
    earlier: list[dict], space: Space, limit: int
) -> tuple[list[dict[str, float]], list[str]]:
    """The best `limit` fully scored earlier candidates, as weights over `space`'s keys.

    Datasets new since then get weight 0, so each point is the earlier composite
    itself, re-scored on today's validation shards. Returns (points, new datasets);
    no points when a dataset was removed, the space's kind of weights changed (one per
    dataset against per block) or a point falls outside the space.
    """
    scored = sorted(
        (t for t in earlier if math.isfinite(full_objective(t))), key=lambda t: t["objective"]
    )
    if not scored or limit <= 0:
        return [], []
    before = set(scored[0]["weights"])
    if not before <= set(space.keys):
        return [], []
    points = []
    for trial in scored[:limit]:
        weights = {k: float(trial["weights"].get(k, 0.0)) for k in space.keys}
        try:
            space.check(weights)
        except ValueError:
            continue
        if weights not in points:
            points.append(weights)
    return points, [n for n in space.names if not before & set(space.keys_of(n))]


def full_objective(trial: dict) -> float:
    """The objective of a trial scored on every validation slice; inf for an early stop."""
    return trial["objective"] if trial.get("complete", True) else math.inf


def best_trial(trials: list[dict]) -> dict:
    """The best trial scored on all validation tokens (early-stopped ones are estimates)."""
    finite = [t for t in trials if t.get("complete", True) and math.isfinite(t["objective"])]
    if not finite:
        raise RuntimeError("no search trial scored all validation slices with a finite objective")
    return min(finite, key=lambda t: t["objective"])
