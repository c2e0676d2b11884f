"""The coefficient search: Optuna samplers (ask and tell) or the plain grid, over the
evaluator pool.

The driver asks the sampler for a candidate, sends it to the least-loaded evaluator
actor (`dem_ray.ray.dispatch`), and tells the sampler the objective when it comes
back. Up to `search.max_concurrent` candidates are in flight (default two per actor),
so every actor has the next one queued while it scores the current one: no actor waits
on the driver. Optuna is driven through Ray Tune's `OptunaSearch` (its resume hints and
its study), without Tune's trial machinery. Through Tune (`tuner.fit()`, one function
trainable per trial, routed by trial index), `benchmarks/search_overhead.py` measured
about 40 ms of fixed cost per trial with one actor and 4.4 s with two, where Tune started
a new worker process for nearly every trial; this loop measures 14-17 ms, the merge
included, and starts none. ASHA is Tune's rule over the trial's validation slices
(`dem_ray.run.asha`).

Every finished trial is appended to `trials.jsonl` (flushed and fsync'd; the log itself
is `dem_ray.run.trials`), so a driver killed mid-search loses only the trials in flight.

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
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ray import tune
from ray.tune.search import Searcher

from dem_ray.config import SearchConfig
from dem_ray.core.perplexity import objective, perplexity
from dem_ray.core.spaces import Space
from dem_ray.ray.dispatch import Dispatch, SearchStats
from dem_ray.run.asha import SuccessiveHalving
from dem_ray.run.console import emit
from dem_ray.run.external_tracking import RunSpec, search_run
from dem_ray.run.study import StudyExport
from dem_ray.run.tracking import TrialEvents
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
    "SearchStats",
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


def _candidate_weights(config: dict, space: Space) -> dict[str, float]:
    """The weights a trial config stands for (a grid point, or a searcher's parameters)."""
    if "grid_point" in config:
        return dict(config["grid_point"])
    return space.to_weights(config)


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


@dataclass
class _Trial:
    """A candidate in flight: its slices' NLL sums so far and where its weights are merged."""

    trial_id: str
    config: dict
    weights: dict[str, float]
    vector: list[float]
    sums: dict[str, list[float]] = field(default_factory=dict)
    device_seconds: float = 0.0
    tokens: int = 0
    slices_done: int = 0
    actor: int | None = None

    def add(self, result: dict) -> dict[str, tuple[float, int]]:
        for name, (nll, count) in result["nll"].items():
            total = self.sums.setdefault(name, [0.0, 0])
            total[0] += nll
            total[1] += count
        self.device_seconds += result["device_seconds"]
        self.tokens += result["tokens"]
        self.slices_done += 1
        return {name: (v[0], int(v[1])) for name, v in self.sums.items()}


class _Candidates:
    """The next trial configs: the grid's remaining points, or the guarded Optuna searcher."""

    def __init__(self, searcher: UniqueCandidates | None, points: list[dict] | None) -> None:
        self.searcher = searcher
        self.points = list(points or [])

    def next(self, trial_id: str) -> dict | None:
        if self.searcher is None:
            return {"grid_point": self.points.pop(0)} if self.points else None
        config = self.searcher.suggest(trial_id)
        return None if config in (None, Searcher.FINISHED) else config

    def result(self, trial_id: str, result: dict) -> None:
        if self.searcher is not None:
            self.searcher.on_trial_result(trial_id, result)

    def complete(self, trial_id: str, result: dict | None, error: bool = False) -> None:
        if self.searcher is not None:
            self.searcher.on_trial_complete(trial_id, result=result, error=error)


def run_search(
    cfg: SearchConfig,
    space: Space,
    evaluators: list,
    out_dir: Path,
    *,
    trials_name: str = "trials.jsonl",
    inputs: str = "",
    fresh: bool = True,
    warm_start: list[dict[str, float]] | None = None,
    after_write: Callable[[], None] | None = None,
    evaluate_in: Space | None = None,
    known: list[dict] = (),
    stats: SearchStats | None = None,
    study: tuple[str, str] | None = None,
    events: Path | None = None,
    tracking: RunSpec | None = None,
) -> list[dict]:
    """Run the search; return the finished trials in order (also in out_dir/trials_name).

    With `fresh=False`, trials that an earlier search with the same `inputs` (a hash
    of everything that decides a trial's result) finished are kept and not re-run,
    and no candidate they evaluated is evaluated again: only `cfg.num_trials` minus
    their number run (nothing when as many or more are finished, which are returned).
    `warm_start`: weights the sampler evaluates first (they count as trials), e.g. the
    best candidates of an earlier search before a dataset was added; ignored when
    resuming (the resumed trials already began with them).
    `after_write`: called after each trial is appended to the trials file.
    `evaluate_in`: the space the evaluators merge in, when it is not `space` (a per-block
    pool scoring the global stage's candidates, every block group the same).
    `known`: trials evaluated elsewhere that the sampler learns and never repeats
    (`make_searcher`); they are not written to this search's trial log.
    `stats`: filled with the evaluators' busy time and the search's wall time.
    `study`: (Optuna storage URL, study name): every trial also goes to that study
    (`dem_ray.run.study`), rebuilt from the trial log when the search starts.
    `events`: a dir for TensorBoard event files of each trial's objective and the best so
    far (`dem_ray.run.tracking`), rewritten from the trial log when the search starts.
    `tracking`: with `events`, a new MLflow / W&B run of the same, and of each trial's
    weights (`dem_ray.run.external_tracking`; the kept trials replayed into it).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    trials_path = out_dir / trials_name
    label = Path(trials_name).name.removesuffix(".jsonl").replace("trials", "search")
    finished = resume_trials(trials_path, inputs, fresh)
    slices = cfg.slices if cfg.scheduler == "asha" else 1
    in_flight = cfg.max_concurrent or 2 * len(evaluators)
    if cfg.algorithm == "grid":
        all_points = space.grid(cfg.grid_step)
        total = len(all_points)
        log.info("search: the plain coefficient grid, %d points at step %g", total, cfg.grid_step)
        points = remaining_grid_points(all_points, finished)
        to_run = len(points)
    else:
        total = cfg.num_trials
        log.info("search: Optuna %s over the %s space, %d trials, %d at a time on %d "
                 "evaluator(s)", cfg.algorithm, space.kind, total, in_flight,
                 len(evaluators))  # fmt: skip
        to_run = max(total - len(finished), 0)
    if in_flight < len(evaluators):
        log.warning("search: max_concurrent %d < %d evaluator actors: %d of them stay idle; "
                    "set search.max_concurrent to 2 x evaluator.num_actors", in_flight,
                    len(evaluators), len(evaluators) - in_flight)  # fmt: skip
    if finished:
        log.info("search: resuming, %d of %d trials already finished", len(finished), total)
    if to_run == 0:
        log.info("search: nothing left to run; %d trials finished", len(finished))
        return finished
    if cfg.algorithm == "grid":
        candidates = _Candidates(None, points)
    else:
        searcher = make_searcher(cfg, space, finished, warm_start, known)
        param_space = {
            p: tune.uniform(lo, hi)
            for p, (lo, hi) in zip(space.param_names, space.param_bounds(), strict=True)
        }
        searcher.set_search_properties("objective", "min", param_space)
        candidates = _Candidates(searcher, None)
    halving = None
    if cfg.scheduler == "asha":
        log.info("search: ASHA over %d validation slices (grace %d, reduction factor %d)",
                 slices, cfg.grace_slices, cfg.reduction_factor)  # fmt: skip
        halving = SuccessiveHalving(cfg.grace_slices, slices, cfg.reduction_factor)
    trial_log = TrialLog(trials_path, finished)
    export = StudyExport(study[0], study[1], space, finished) if study else None
    trial_events = None
    if events is not None:
        extra = search_run(tracking, inputs, len(finished))
        trial_events = TrialEvents(events, finished, extra)
    target = evaluate_in or space
    dispatch = Dispatch(evaluators, stats)
    tag = uuid.uuid4().hex[:8]
    started = 0
    running: dict[str, _Trial] = {}

    def start_next() -> bool:
        nonlocal started
        trial_id = f"{tag}_{started + len(finished):05d}"
        config = candidates.next(trial_id)
        if config is None:
            return False
        weights = _candidate_weights(config, space)
        merged = target.expand(weights) if evaluate_in is not None else weights
        trial = _Trial(trial_id, config, weights, [merged[k] for k in target.keys])
        running[trial_id] = trial
        trial.actor = dispatch.send(trial_id, trial.vector, 0, slices)
        started += 1
        return True

    try:
        while True:
            while started < to_run and len(running) < in_flight and start_next():
                pass
            if not running:
                break
            for trial_id, actor, result in dispatch.finished():
                trial = running[trial_id]
                if isinstance(result, BaseException):
                    candidates.complete(trial_id, None, error=True)
                    raise RuntimeError(
                        f"search trial {trial_id} ({_show(trial.weights)}) failed on evaluator "
                        f"{actor}: {result}"
                    ) from result
                nll = trial.add(result)
                report = {
                    "objective": objective(nll, cfg.objective),
                    "weights": trial.weights,
                    "ppl": {name: perplexity(s, n) for name, (s, n) in nll.items()},
                    "device_seconds": trial.device_seconds,
                    "tokens_evaluated": trial.tokens,
                    "slices_done": trial.slices_done,
                    "complete": trial.slices_done == slices,
                    "training_iteration": trial.slices_done,  # what Optuna's reports step by
                }
                go_on = not report["complete"] and (
                    halving is None
                    or halving.keep_going(trial_id, trial.slices_done, report["objective"])
                )
                if go_on:
                    candidates.result(trial_id, report)
                    trial.actor = dispatch.send(trial_id, trial.vector, trial.slices_done,
                                                slices, prefer=actor)  # fmt: skip
                    continue
                del running[trial_id]
                candidates.complete(trial_id, report)
                params = {k: v for k, v in trial.config.items() if k != "grid_point"}
                record = trial_log.append(trial_id, params, report)
                if export is not None:
                    export.add(record)
                if trial_events is not None:
                    trial_events.add(record, trial_log.best)
                if after_write is not None:
                    after_write()
                dispatch.stats.candidates += 1
                _log_progress(record, trial_log, total, label)
    finally:
        dispatch.close()
        if trial_events is not None:
            trial_events.close()
    trials = read_trials(trials_path)
    if len(trials) != len(finished) + to_run:
        raise RuntimeError(
            f"search finished {len(trials)} trials of {total}: the sampler stopped "
            "proposing candidates"
        )
    return trials


def _show(weights: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in weights.items())


def _log_progress(record: dict, trial_log: TrialLog, total: int, stage: str) -> None:
    what = "objective" if record["complete"] else f"stopped after slice {record['slices_done']}:"
    best = "none yet"
    if trial_log.best is not None:
        best = f"{trial_log.best['objective']:.4f} ({_show(trial_log.best['weights'])})"
    line = f"search: trial {trial_log.done}/{total} {what} {record['objective']:.4f}; best {best}"
    best_value = None if trial_log.best is None else trial_log.best["objective"]
    emit("trial", stage=stage, done=trial_log.done, total=total, best=best_value, line=line,
         logger=__name__)  # fmt: skip


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
