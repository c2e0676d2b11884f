"""dem-ray's ASHA rule (`dem_ray.run.asha`) decides exactly as Ray Tune's ASHAScheduler,
which the search used before it drove Optuna itself."""

from __future__ import annotations

import random

import pytest

from dem_ray.run.asha import SuccessiveHalving


class _Trial:
    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id


def tune_decisions(grace: int, max_t: int, rf: int, results: list[tuple[str, int, float]]):
    """Tune's own ASHA (one bracket, mode min, as dem-ray configured it) on `results`."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    scheduler = ASHAScheduler(time_attr="t", metric="objective", mode="min", max_t=max_t,
                              grace_period=grace, reduction_factor=rf)  # fmt: skip
    trials: dict[str, _Trial] = {}
    out = []
    for trial_id, step, value in results:
        trial = trials.setdefault(trial_id, _Trial(trial_id))
        if trial_id not in scheduler._trial_info:
            scheduler.on_trial_add(None, trial)
        action = scheduler.on_trial_result(None, trial, {"t": step, "objective": value})
        out.append(action == TrialScheduler.CONTINUE)
    return out


def interleaved_results(seed: int, trials: int, max_t: int) -> list[tuple[str, int, float]]:
    """Results as a search with several trials in flight reports them (each trial's steps
    in order, trials interleaved), stopping each trial where Tune's rule stops it."""
    rng = random.Random(seed)
    level = {f"t{i}": rng.uniform(1.0, 3.0) for i in range(trials)}
    pending = {t: 1 for t in level}
    results = []
    while pending:
        trial_id = rng.choice(sorted(pending))
        step = pending[trial_id]
        results.append((trial_id, step, level[trial_id] + rng.gauss(0, 0.1) / step))
        pending[trial_id] += 1
        if pending[trial_id] > max_t:
            del pending[trial_id]
    return results


@pytest.mark.parametrize(("grace", "max_t", "rf"), [(1, 4, 3), (1, 4, 2), (2, 8, 2), (1, 9, 3)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_same_decisions_as_tunes_asha(grace, max_t, rf, seed):
    results = interleaved_results(seed, 12, max_t)
    halving = SuccessiveHalving(grace, max_t, rf)
    ours = []
    stopped: set[str] = set()
    kept = []
    for trial_id, step, value in results:  # a stopped trial reports nothing more
        if trial_id in stopped:
            continue
        kept.append((trial_id, step, value))
        go_on = halving.keep_going(trial_id, step, value)
        ours.append(go_on)
        if not go_on:
            stopped.add(trial_id)
    assert ours == tune_decisions(grace, max_t, rf, kept)
    assert not all(ours)  # some trials were stopped, so the rule was exercised
    assert any(step < max_t and not go for (_, step, _), go in zip(kept, ours, strict=True))


def test_a_trial_worse_than_the_rung_is_stopped_and_a_better_one_goes_on():
    halving = SuccessiveHalving(grace=1, max_t=4, reduction_factor=2)
    assert halving.keep_going("a", 1, 2.0)  # first at the rung: nothing to compare with
    assert not halving.keep_going("b", 1, 3.0)  # worse than the best half of {2.0}
    assert halving.keep_going("c", 1, 1.0)
    assert not halving.keep_going("c", 4, 1.0)  # every slice scored: finished


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="grace"):
        SuccessiveHalving(grace=5, max_t=4, reduction_factor=2)
    with pytest.raises(ValueError, match="reduction factor"):
        SuccessiveHalving(grace=1, max_t=4, reduction_factor=1)
