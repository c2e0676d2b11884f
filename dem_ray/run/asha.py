"""Asynchronous successive halving (ASHA) over a trial's validation slices. No Ray.

The rule is Ray Tune's `ASHAScheduler` with one bracket (the one dem-ray used through
Tune, and its results with it): rungs at `grace x rf^j` slices below `max_t`; the first
time a trial reaches a rung its objective is recorded there, and the trial stops if the
objective is worse than the best `1/rf` of the objectives recorded at that rung before
it (numpy's linearly interpolated percentile, as Tune computes it). A trial that reaches
`max_t` slices is finished, not stopped.
"""

from __future__ import annotations

import math

import numpy as np


class SuccessiveHalving:
    """Stop-or-continue decisions for trials that report a running objective (lower is better)."""

    def __init__(self, grace: int, max_t: int, reduction_factor: int) -> None:
        if not 0 < grace <= max_t or reduction_factor < 2:
            raise ValueError(
                f"ASHA needs 0 < grace ({grace}) <= max_t ({max_t}) and a reduction factor "
                f">= 2 ({reduction_factor})"
            )
        self.max_t = max_t
        self.rf = reduction_factor
        count = int(math.log(max_t / grace) / math.log(reduction_factor) + 1)
        # Highest rung first: a result is recorded at the highest rung it has reached.
        self.rungs: list[tuple[float, dict[str, float]]] = [
            (grace * reduction_factor**j, {}) for j in reversed(range(count))
        ]

    def keep_going(self, trial_id: str, step: int, objective: float) -> bool:
        """Whether the trial scores its next slice, given its objective after `step` slices."""
        if step >= self.max_t:
            return False  # done: every slice scored
        for milestone, recorded in self.rungs:
            if step < milestone or trial_id in recorded:
                continue
            reward = -objective  # Tune's sign for mode "min"
            stop = bool(recorded) and reward < self._cutoff(recorded)
            recorded[trial_id] = reward  # a NaN is kept and ignored by the percentile
            return not stop
        return True

    def _cutoff(self, recorded: dict[str, float]) -> float:
        return float(np.nanpercentile(list(recorded.values()), (1 - 1 / self.rf) * 100))
