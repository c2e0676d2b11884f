"""The search's trials as an Optuna study in Optuna storage, for optuna-dashboard and scripts.

`trials.jsonl` stays what a search resumes from (fsync'd per trial, uploaded to a bucket
run dir, checked against the candidate guard); the study is its export, kept in step
trial by trial: `optuna-dashboard sqlite:///RUN_DIR/search/study.db` shows a search live.
One study per search inputs hash (`<stage>-<hash>`), so studies of earlier searches stay
beside it; a (re)started search rebuilds its own study from the trial log, so the two
never disagree (a driver killed between the log's line and the study's row loses
nothing). No Ray here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

from dem_ray.core.spaces import Space


def study_name(stage: str, inputs: str) -> str:
    """The study of a search with these inputs (`stage`: search, search-global, search_grid)."""
    return f"{stage}-{inputs[:16]}"


class StudyExport:
    """Writes each finished trial to the study `name` in the Optuna storage at `url`."""

    def __init__(self, url: str, name: str, space: Space, finished: Iterable[dict] = ()) -> None:
        import optuna

        self.space = space
        self._optuna = optuna
        storage = optuna.storages.RDBStorage(url) if "://" in url else url
        with contextlib.suppress(KeyError):  # a (re)started search rebuilds its study
            optuna.delete_study(study_name=name, storage=storage)
        self.study = optuna.create_study(study_name=name, storage=storage, direction="minimize")
        self.study.set_user_attr("weights", list(space.keys))
        self.study.set_user_attr("space", space.kind)
        trials = [self._trial(t) for t in finished]
        if trials:
            self.study.add_trials(trials)

    def add(self, record: dict) -> None:
        self.study.add_trial(self._trial(record))

    def _trial(self, record: dict):
        """A trial record of the log as an Optuna FrozenTrial: parameters, value, state."""
        optuna = self._optuna
        state = optuna.trial.TrialState
        params, distributions = self._params(record)
        value = record["objective"]
        attrs = {
            "trial": record["trial"],
            "weights": record["weights"],
            "ppl": record["ppl"],
            "tokens_evaluated": record["tokens_evaluated"],
            "slices_done": record.get("slices_done", 1),
        }
        attrs.update({f"ppl/{name}": ppl for name, ppl in record["ppl"].items()})
        if not record.get("complete", True):  # stopped by ASHA: its value is an estimate
            attrs["objective_estimate"] = value
            kind, value = state.PRUNED, None
        elif not math.isfinite(value):
            attrs["objective"] = str(value)
            kind, value = state.FAIL, None
        else:
            kind = state.COMPLETE
        return optuna.trial.create_trial(params=params, distributions=distributions,
                                         value=value, state=kind, user_attrs=attrs)  # fmt: skip

    def _params(self, record: dict) -> tuple[dict, dict]:
        """The sampler's parameters; the plain grid has none, so its weights stand in."""
        dist = self._optuna.distributions.FloatDistribution
        params = record.get("params") or {}
        if params:
            bounds = dict(zip(self.space.param_names, self.space.param_bounds(), strict=True))
            return params, {k: dist(*_around(bounds[k], params[k])) for k in params}
        weights = record["weights"]
        return weights, {k: dist(*_around((0.0, 1.0), w)) for k, w in weights.items()}


def _around(bounds: tuple[float, float], value: float) -> tuple[float, float]:
    """Bounds that hold `value` (a finished trial's parameter may sit a hair outside)."""
    lo, hi = bounds
    return min(lo, value), max(hi, value)
