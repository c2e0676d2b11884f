"""Ray Tune over the coefficient space: Optuna samplers, or the plain coefficient grid.

Trials are light clients of the evaluator pool: a trial turns its parameters into
weights, asks one evaluator actor for per-dataset NLL, and reports the objective.
A driver-side callback appends every finished trial to `trials.jsonl` (flushed and
fsync'd), so a driver killed mid-search loses only the trials in flight: the next
search keeps the finished ones, tells the sampler about them and runs the rest.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import ray
from ray import tune
from ray.tune.search import ConcurrencyLimiter

from dem_ray.config import SearchConfig
from dem_ray.manifest import write_text_atomic
from dem_ray.perplexity import objective, perplexity
from dem_ray.spaces import Space

log = logging.getLogger(__name__)


def make_sampler(algorithm: str, seed: int):
    import optuna

    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
    }
    return samplers[algorithm]()


def _trial_index(trial_id: str) -> int:
    match = re.search(r"(\d+)$", trial_id)
    return int(match.group(1)) if match else abs(hash(trial_id))


def run_trial(
    config: dict, evaluators: list, space: Space, objective_kind: str, slices: int = 1
) -> None:
    """One candidate: weights -> an evaluator actor -> objective, reported to Tune.

    With `slices` > 1 the validation shards are scored one slice at a time and the
    running objective is reported after each, so a scheduler (ASHA) can stop a
    hopeless candidate after a fraction of the validation tokens.
    """
    if "grid_point" in config:
        weights = dict(config["grid_point"])
    else:
        weights = space.to_weights(config)
    actor = evaluators[_trial_index(tune.get_context().get_trial_id()) % len(evaluators)]
    vector = [weights[n] for n in space.names]
    sums: dict[str, list[float]] = {}
    seconds = 0.0
    tokens = 0
    for part in range(slices):
        result = ray.get(actor.evaluate.remote(vector, part, slices))
        for name, (nll, count) in result["nll"].items():
            total = sums.setdefault(name, [0.0, 0])
            total[0] += nll
            total[1] += count
        seconds += result["device_seconds"]
        tokens += result["tokens"]
        nll = {name: (v[0], int(v[1])) for name, v in sums.items()}
        tune.report(
            {
                "objective": objective(nll, objective_kind),
                "weights": weights,
                "ppl": {name: perplexity(s, n) for name, (s, n) in nll.items()},
                "device_seconds": seconds,
                "tokens_evaluated": tokens,
                "slices_done": part + 1,
                "complete": part + 1 == slices,
            }
        )


class TrialRecorder(tune.Callback):
    """Appends each finished trial to trials.jsonl and logs progress as trials finish."""

    def __init__(
        self,
        path: Path,
        total: int,
        finished: list[dict] | None = None,
        after_write: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self.after_write = after_write  # e.g. upload the file to a URI run directory
        self.total = total
        self.done = len(finished or [])
        scored = [t for t in finished or [] if math.isfinite(full_objective(t))]
        self.best: dict | None = min(scored, key=full_objective) if scored else None

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        if "objective" not in result:
            return
        record = {
            "trial": self.done,
            "trial_id": trial.trial_id,
            "weights": result["weights"],
            "params": {k: v for k, v in trial.config.items() if k != "grid_point"},
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
        what = (
            "objective" if record["complete"] else f"stopped after slice {record['slices_done']}:"
        )
        best = "none yet"
        if self.best is not None:
            weights = ", ".join(f"{k}={v:.3f}" for k, v in self.best["weights"].items())
            best = f"{self.best['objective']:.4f} ({weights})"
        log.info(
            "search: trial %d/%d %s %.4f; best %s",
            self.done,
            self.total,
            what,
            record["objective"],
            best,
        )


def run_search(
    cfg: SearchConfig,
    space: Space,
    evaluators: list,
    out_dir: Path,
    storage_dir: Path,
    trials_name: str = "trials.jsonl",
    inputs: str = "",
    fresh: bool = True,
    warm_start: list[dict[str, float]] | None = None,
    ray_storage: tuple[str, object] | None = None,
    after_write: Callable[[], None] | None = None,
) -> list[dict]:
    """Run the search; return the finished trials in order (also in out_dir/trials_name).

    With `fresh=False`, trials that an earlier search with the same `inputs` (a hash
    of everything that decides a trial's result) finished are kept and not re-run.
    `warm_start`: weights the sampler evaluates first (they count as trials), e.g. the
    best candidates of an earlier search before a dataset was added; ignored when
    resuming (the resumed trials already began with them).
    `ray_storage`: Tune's `storage_path` and `storage_filesystem`, instead of `storage_dir`;
    `after_write`: called after each trial is appended to the trials file.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    trials_path = out_dir / trials_name
    finished = resume_trials(trials_path, inputs, fresh)
    slices = cfg.slices if cfg.scheduler == "asha" else 1
    trainable = tune.with_parameters(
        run_trial,
        evaluators=evaluators,
        space=space,
        objective_kind=cfg.objective,
        slices=slices,
    )
    trainable = tune.with_resources(trainable, {"cpu": 0.01})
    if cfg.algorithm == "grid":
        all_points = space.grid(cfg.grid_step)
        total = len(all_points)
        log.info("search: the plain coefficient grid, %d points at step %g", total, cfg.grid_step)
        points = remaining_grid_points(all_points, finished)
        param_space = {"grid_point": tune.grid_search(points)}
        tune_config = dict(num_samples=1, max_concurrent_trials=cfg.max_concurrent)
    else:
        from ray.tune.search.optuna import OptunaSearch

        total = cfg.num_trials
        log.info(
            "search: Optuna %s over the %s space, %d trials, %d at a time",
            cfg.algorithm,
            space.kind,
            total,
            cfg.max_concurrent,
        )
        param_space = {
            p: tune.uniform(lo, hi)
            for p, (lo, hi) in zip(space.param_names, space.param_bounds(), strict=True)
        }
        warm_points = {}
        if warm_start and not finished:
            points = [space.to_params(w) for w in warm_start][:total]
            log.info("search: the first %d trials re-score earlier candidates", len(points))
            warm_points = {"points_to_evaluate": points}
        searcher = OptunaSearch(
            sampler=make_sampler(cfg.algorithm, cfg.seed),
            **(resume_hints(finished, space) or warm_points),
        )
        tune_config = dict(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=cfg.max_concurrent),
            num_samples=max(total - len(finished), 0),
        )
    if cfg.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        log.info(
            "search: ASHA over %d validation slices (grace %d, reduction factor %d)",
            slices,
            cfg.grace_slices,
            cfg.reduction_factor,
        )
        tune_config["scheduler"] = ASHAScheduler(
            time_attr="training_iteration",
            max_t=slices,
            grace_period=cfg.grace_slices,
            reduction_factor=cfg.reduction_factor,
        )
    if finished:
        log.info("search: resuming, %d of %d trials already finished", len(finished), total)
    if len(finished) >= total:
        return finished[:total]
    recorder = TrialRecorder(trials_path, total, finished, after_write)
    storage_path, storage_fs = ray_storage or (str(storage_dir), None)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric="objective", mode="min", reuse_actors=True, **tune_config
        ),
        run_config=tune.RunConfig(
            name=f"search-{time.time_ns()}",
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            callbacks=[recorder],
            verbose=0,
        ),
    )
    grid = tuner.fit()
    errors = [r.error for r in grid if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} search trial(s) failed; first: {errors[0]}")
    trials = read_trials(trials_path)
    if len(trials) != total:
        raise RuntimeError(f"search finished {len(trials)} trials of {total}")
    return trials


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
    is rewritten without a cut-short last line so new trials append cleanly.
    """
    marker = path.with_name(path.name + ".inputs")
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


def resume_hints(finished: list[dict], space: Space) -> dict:
    """OptunaSearch arguments that tell the sampler about trials already evaluated."""
    points, rewards = [], []
    bounds = dict(zip(space.param_names, space.param_bounds(), strict=True))
    for t in finished:
        if not math.isfinite(t["objective"]):
            continue  # Optuna cannot take a non-finite value; the trial still counts as done
        params = t.get("params") or space.to_params(t["weights"])
        points.append({k: min(max(params[k], lo), hi) for k, (lo, hi) in bounds.items()})
        rewards.append(t["objective"])
    return {"points_to_evaluate": points, "evaluated_rewards": rewards} if points else {}


def remaining_grid_points(points: list[dict], finished: list[dict]) -> list[dict]:
    """Grid points no finished trial has evaluated yet."""
    done = {_point_key(t["weights"]) for t in finished}
    return [p for p in points if _point_key(p) not in done]


def _point_key(weights: dict) -> tuple:
    return tuple(sorted((k, round(float(v), 9)) for k, v in weights.items()))


def warm_start_points(
    earlier: list[dict], space: Space, limit: int
) -> tuple[list[dict[str, float]], list[str]]:
    """The best `limit` fully scored earlier candidates, as weights over `space`'s datasets.

    Datasets new since then get weight 0, so each point is the earlier composite
    itself, re-scored on today's validation shards. Returns (points, new datasets);
    no points when a dataset was removed or a point falls outside the space.
    """
    scored = sorted(
        (t for t in earlier if math.isfinite(full_objective(t))), key=lambda t: t["objective"]
    )
    if not scored or limit <= 0:
        return [], []
    before = set(scored[0]["weights"])
    if not before <= set(space.names):
        return [], []
    points = []
    for trial in scored[:limit]:
        weights = {n: float(trial["weights"].get(n, 0.0)) for n in space.names}
        try:
            space.check(weights)
        except ValueError:
            continue
        if weights not in points:
            points.append(weights)
    return points, [n for n in space.names if n not in before]


def full_objective(trial: dict) -> float:
    """The objective of a trial scored on every validation slice; inf for an early stop."""
    return trial["objective"] if trial.get("complete", True) else math.inf


def best_trial(trials: list[dict]) -> dict:
    """The best trial scored on all validation tokens (early-stopped ones are estimates)."""
    finite = [t for t in trials if t.get("complete", True) and math.isfinite(t["objective"])]
    if not finite:
        raise RuntimeError("no search trial scored all validation slices with a finite objective")
    return min(finite, key=lambda t: t["objective"])
