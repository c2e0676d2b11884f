"""Ray Tune over the coefficient space: Optuna samplers, or the plain coefficient grid.

Trials are light clients of the evaluator pool: a trial turns its parameters into
weights, asks one evaluator actor for per-dataset NLL, and reports the objective.
A driver-side callback appends every finished trial to `trials.jsonl` (flushed and
fsync'd; the log itself is `dem_ray.run.trials`), so a driver killed mid-search loses
only the trials in flight.

Resuming and extending (`fresh=False`, the same `inputs`): the finished trials are
kept as they are and only `num_trials` minus their number run (none when as many or
more are finished: the finished trials are returned). A resumed search never
evaluates a candidate it has evaluated:

* the sampler is told every finished trial (Optuna `evaluated_rewards`: completed
  trials in its study, which TPE, GP and the start-up counts use);
* its random state carries on: the sampler seed is `search.seed` for a fresh search
  and a hash of (seed, number of finished trials) for a resumed one (`resumed_seed`),
  so it does not draw its first random points again, and a resume from the same kept
  trials draws the same candidates (reproducible, with max_concurrent 1 exactly);
* as a hard guarantee, `UniqueCandidates` wraps the Optuna searcher: a suggestion
  whose weights equal (to 1e-9) a finished or in-flight candidate is told to Optuna
  as a failed trial (ignored by its samplers; their random state moves on) and a new
  suggestion is drawn. The plain grid skips the grid points already done.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import ray
from ray import tune
from ray.tune.search import ConcurrencyLimiter, Searcher

from dem_ray.config import SearchConfig
from dem_ray.core.perplexity import objective, perplexity
from dem_ray.core.spaces import Space
from dem_ray.run.trials import (
    Candidates,
    TrialLog,
    best_trial,
    full_objective,
    inputs_marker,
    made_with,
    read_trials,
    remaining_grid_points,
    resume_trials,
    warm_start_points,
)

__all__ = [
    "TrialRecorder",
    "UniqueCandidates",
    "best_trial",
    "full_objective",
    "inputs_marker",
    "made_with",
    "make_sampler",
    "make_searcher",
    "read_trials",
    "remaining_grid_points",
    "resume_hints",
    "resume_trials",
    "resumed_seed",
    "run_search",
    "run_trial",
    "warm_start_points",
]

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


def resumed_seed(seed: int, done: int) -> int:
    """The sampler seed of a search with `done` trials already finished.

    `seed` itself for a fresh search (so fresh searches are what they always were);
    otherwise a hash of (seed, done): a re-seeded sampler would draw its first points
    again (telling it about finished trials does not move its random state), while
    the same kept trials always give the same seed, so a resume is reproducible.
    """
    if done <= 0:
        return seed
    digest = hashlib.sha256(f"dem-ray sampler seed {seed} after {done} trials".encode()).digest()
    return int.from_bytes(digest[:4], "big") % (2**31 - 1)


def _trial_index(trial_id: str) -> int:
    match = re.search(r"(\d+)$", trial_id)
    return int(match.group(1)) if match else abs(hash(trial_id))


def _candidate_weights(config: dict, space: Space) -> dict[str, float]:
    """The weights a trial config stands for (a grid point, or a searcher's parameters)."""
    if "grid_point" in config:
        return dict(config["grid_point"])
    return space.to_weights(config)


def run_trial(
    config: dict,
    evaluators: list,
    space: Space,
    objective_kind: str,
    slices: int = 1,
    evaluate_in: Space | None = None,
) -> None:
    """One candidate: weights -> an evaluator actor -> objective, reported to Tune.

    With `slices` > 1 the validation shards are scored one slice at a time and the
    running objective is reported after each, so a scheduler (ASHA) can stop a
    hopeless candidate after a fraction of the validation tokens. `evaluate_in`: the
    space the evaluators merge in, when it is not `space` (a per-block pool scoring
    the global stage's candidates, every block group the same).
    """
    weights = _candidate_weights(config, space)
    actor = evaluators[_trial_index(tune.get_context().get_trial_id()) % len(evaluators)]
    target = evaluate_in or space
    merged = target.expand(weights) if evaluate_in is not None else weights
    vector = [merged[k] for k in target.keys]
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


class UniqueCandidates(Searcher):
    """A Searcher around another (OptunaSearch) that never hands out a known candidate.

    A suggestion whose weights equal (to 1e-9, `Candidates`) a finished trial's or one
    still in flight is refused: the inner searcher is told it failed (Optuna records a
    FAIL trial, which its samplers ignore; the sampler already knows the original) and
    asked again under a fresh id. Results of the accepted suggestion are forwarded
    under the id it was drawn with. `searcher` is the wrapped one (Tune's wrapper
    convention, as in ConcurrencyLimiter, so Tune's searcher checkpoints find it).
    """

    MAX_REFUSALS = 200

    def __init__(self, searcher: Searcher, space: Space, finished: Iterable[dict] = ()) -> None:
        self.searcher = searcher
        self.space = space
        self.known = Candidates(space.keys, (t["weights"] for t in finished))
        self.inner_ids: dict[str, str] = {}  # Tune's trial id -> the id the inner one drew
        self.refused = 0
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    @property
    def metric(self):
        return self.searcher.metric

    @property
    def mode(self):
        return self.searcher.mode

    def set_search_properties(self, metric, mode, config: dict, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.searcher.set_max_concurrency(max_concurrent)

    def suggest(self, trial_id: str) -> dict | None:
        for attempt in range(self.MAX_REFUSALS + 1):
            inner_id = trial_id if attempt == 0 else f"{trial_id}~{attempt}"
            config = self.searcher.suggest(inner_id)
            if config is None or config == Searcher.FINISHED:
                return config
            weights = _candidate_weights(config, self.space)
            if weights not in self.known:
                self.known.add(weights)
                self.inner_ids[trial_id] = inner_id
                return config
            self.searcher.on_trial_complete(inner_id, result=None, error=True)
            self.refused += 1
            log.info(
                "search: the sampler proposed a candidate already evaluated (%s); drawing another",
                ", ".join(f"{k}={v:.4f}" for k, v in weights.items()),
            )
        raise RuntimeError(
            f"search: the sampler proposed {self.MAX_REFUSALS + 1} candidates in a row that were "
            f"already evaluated ({len(self.known)} known); it is not exploring the space"
        )

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.inner_ids:
            self.searcher.on_trial_result(self.inner_ids[trial_id], result)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        inner_id = self.inner_ids.pop(trial_id, None)
        if inner_id is not None:  # its candidate stays known: finished, or failed this search
            self.searcher.on_trial_complete(inner_id, result=result, error=error)

    def add_evaluated_point(
        self,
        parameters: dict,
        value: float,
        error: bool = False,
        pruned: bool = False,
        intermediate_values: list[float] | None = None,
    ):
        self.known.add(_candidate_weights(parameters, self.space))
        return self.searcher.add_evaluated_point(
            parameters, value, error, pruned, intermediate_values
        )

    def get_state(self) -> dict:
        state = self.__dict__.copy()
        del state["searcher"]
        return copy.deepcopy(state)

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)


def make_searcher(
    cfg: SearchConfig,
    space: Space,
    finished: list[dict],
    warm_start: list[dict[str, float]] | None = None,
    known: list[dict] = (),
) -> UniqueCandidates:
    """The Optuna searcher of a search with `finished` trials kept, inside the guard.

    The sampler learns the finished trials and is seeded with `resumed_seed`;
    `warm_start` points are evaluated first, on a search with nothing finished yet.
    `known`: trials evaluated elsewhere (a two-stage search's global stage, as this
    space's weights): the sampler learns them and the guard never evaluates them again.
    """
    from ray.tune.search.optuna import OptunaSearch

    warm_points = {}
    if warm_start and not finished and not known:
        points = [space.to_params(w) for w in warm_start][: cfg.num_trials]
        log.info("search: the first %d trials re-score earlier candidates", len(points))
        warm_points = {"points_to_evaluate": points}
    inner = OptunaSearch(
        sampler=make_sampler(cfg.algorithm, resumed_seed(cfg.seed, len(finished))),
        **(resume_hints([*known, *finished], space) or warm_points),
    )
    return UniqueCandidates(inner, space, [*known, *finished])


class TrialRecorder(tune.Callback):
    """Appends each finished trial to trials.jsonl (a `TrialLog`) and logs progress."""

    def __init__(
        self,
        path: Path,
        total: int,
        finished: list[dict] | None = None,
        after_write: Callable[[], None] | None = None,
    ) -> None:
        self.trial_log = TrialLog(path, finished, after_write)
        self.path = path
        self.total = total

    @property
    def done(self) -> int:
        return self.trial_log.done

    @property
    def best(self) -> dict | None:
        return self.trial_log.best

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        if "objective" not in result:
            return
        params = {k: v for k, v in trial.config.items() if k != "grid_point"}
        record = self.trial_log.append(trial.trial_id, params, result)
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
    evaluate_in: Space | None = None,
    known: list[dict] = (),
) -> list[dict]:
    """Run the search; return the finished trials in order (also in out_dir/trials_name).

    With `fresh=False`, trials that an earlier search with the same `inputs` (a hash
    of everything that decides a trial's result) finished are kept and not re-run,
    and no candidate they evaluated is evaluated again: only `cfg.num_trials` minus
    their number run (nothing when as many or more are finished, which are returned).
    `warm_start`: weights the sampler evaluates first (they count as trials), e.g. the
    best candidates of an earlier search before a dataset was added; ignored when
    resuming (the resumed trials already began with them).
    `ray_storage`: Tune's `storage_path` and `storage_filesystem`, instead of `storage_dir`;
    `after_write`: called after each trial is appended to the trials file.
    `evaluate_in`: the space the evaluators merge in, when it is not `space` (`run_trial`).
    `known`: trials evaluated elsewhere that the sampler learns and never repeats
    (`make_searcher`); they are not written to this search's trial log.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    trials_path = out_dir / trials_name
    finished = resume_trials(trials_path, inputs, fresh)
    slices = cfg.slices if cfg.scheduler == "asha" else 1
    if cfg.algorithm == "grid":
        all_points = space.grid(cfg.grid_step)
        total = len(all_points)
        log.info("search: the plain coefficient grid, %d points at step %g", total, cfg.grid_step)
        points = remaining_grid_points(all_points, finished)
        to_run = len(points)
    else:
        total = cfg.num_trials
        log.info(
            "search: Optuna %s over the %s space, %d trials, %d at a time",
            cfg.algorithm,
            space.kind,
            total,
            cfg.max_concurrent,
        )
        to_run = max(total - len(finished), 0)
    if finished:
        log.info("search: resuming, %d of %d trials already finished", len(finished), total)
    if to_run == 0:
        log.info("search: nothing left to run; %d trials finished", len(finished))
        return finished
    if cfg.algorithm == "grid":
        param_space = {"grid_point": tune.grid_search(points)}
        tune_config = dict(num_samples=1, max_concurrent_trials=cfg.max_concurrent)
    else:
        param_space = {
            p: tune.uniform(lo, hi)
            for p, (lo, hi) in zip(space.param_names, space.param_bounds(), strict=True)
        }
        searcher = make_searcher(cfg, space, finished, warm_start, known)
        tune_config = dict(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=cfg.max_concurrent),
            num_samples=to_run,
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
    trainable = tune.with_parameters(
        run_trial,
        evaluators=evaluators,
        space=space,
        objective_kind=cfg.objective,
        slices=slices,
        evaluate_in=evaluate_in,
    )
    trainable = tune.with_resources(trainable, {"cpu": 0.01})
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
    if len(trials) != len(finished) + to_run:
        raise RuntimeError(f"search finished {len(trials)} trials of {total}")
    return trials


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
