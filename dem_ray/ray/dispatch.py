"""Candidates to the evaluator actors: least-loaded routing, a queue on every actor, busy time.

An actor runs one call at a time; calls sent to it while it works wait in its queue, so
an actor that has a second call queued starts it the moment the first one ends, with no
round trip to the driver in between (pipelining). Each call goes to the actor with the
fewest calls outstanding; a trial's next validation slice stays on the actor that holds
its weights merged when that actor is among the least loaded (no second merge).

The actors report how long each call kept them busy (merge and forward, wall clock), so
the dispatch can say what share of the search's wall time each actor spent working.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray


@dataclass
class SearchStats:
    """Evaluator work over one or more searches on one pool (a two-stage search: both)."""

    busy_seconds: list[float] = field(default_factory=list)  # per actor
    wall_seconds: float = 0.0  # first call sent to last result back, summed over searches
    wait_seconds: float = 0.0  # of which the driver waited on the actors (the rest: its own work)
    merge_seconds: float = 0.0  # the actors' time merging candidates (part of busy_seconds)
    candidates: int = 0  # trials finished (stopped ones included)
    calls: int = 0  # evaluator calls (a trial of s slices makes s)
    # Per actor, the most calls it had outstanding at once: 2 or more means the next
    # candidate was queued on it before the current one finished.
    peak_outstanding: list[int] = field(default_factory=list)

    def utilisation(self) -> list[float]:
        """Per actor, the share of the wall time it spent merging and scoring."""
        if self.wall_seconds <= 0:
            return [0.0 for _ in self.busy_seconds]
        return [min(b / self.wall_seconds, 1.0) for b in self.busy_seconds]

    def driver_seconds(self) -> float:
        """The driver's own work in the search: sampler, trial records, sending calls."""
        return max(self.wall_seconds - self.wait_seconds, 0.0)

    def candidates_per_second(self) -> float:
        return self.candidates / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "evaluator_busy_seconds": [round(b, 6) for b in self.busy_seconds],
            "evaluator_utilisation": [round(u, 4) for u in self.utilisation()],
            "search_wall_seconds": round(self.wall_seconds, 6),
            "driver_seconds": round(self.driver_seconds(), 6),
            "merge_seconds": round(self.merge_seconds, 6),
            "candidates": self.candidates,
            "candidates_per_second": round(self.candidates_per_second(), 4),
            "evaluator_calls": self.calls,
            "evaluator_peak_outstanding": list(self.peak_outstanding),
        }


class Dispatch:
    """Sends evaluator calls to the least-loaded actor and hands back what finished."""

    def __init__(self, actors: list, stats: SearchStats | None = None) -> None:
        if not actors:
            raise ValueError("no evaluator actors to send candidates to")
        self.actors = actors
        self.stats = stats if stats is not None else SearchStats()
        missing = len(actors) - len(self.stats.busy_seconds)
        if missing > 0:
            self.stats.busy_seconds += [0.0] * missing
            self.stats.peak_outstanding += [0] * missing
        self.outstanding = [0] * len(actors)
        self._calls: dict = {}  # ObjectRef -> (actor index, the caller's tag)
        self._first_sent: float | None = None

    def send(self, tag: object, vector: list[float], part: int, parts: int,
             prefer: int | None = None) -> int:  # fmt: skip
        """Queue one evaluation; returns the actor index it went to."""
        least = min(self.outstanding)
        if prefer is not None and self.outstanding[prefer] == least:
            index = prefer
        else:
            index = self.outstanding.index(least)
        ref = self.actors[index].evaluate.remote(vector, part, parts)
        self._calls[ref] = (index, tag)
        self.outstanding[index] += 1
        peak = self.stats.peak_outstanding
        peak[index] = max(peak[index], self.outstanding[index])
        if self._first_sent is None:
            self._first_sent = time.perf_counter()
        return index

    def __len__(self) -> int:
        return len(self._calls)

    def finished(self) -> list[tuple[object, int, dict | BaseException]]:
        """Wait for at least one call; (tag, actor index, result or the error it raised)."""
        start = time.perf_counter()
        ray.wait(list(self._calls), num_returns=1)
        self.stats.wait_seconds += time.perf_counter() - start
        ready, _ = ray.wait(list(self._calls), num_returns=len(self._calls), timeout=0)
        done = []
        for ref in ready:
            index, tag = self._calls.pop(ref)
            self.outstanding[index] -= 1
            try:
                result = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - handed to the caller, who raises
                done.append((tag, index, exc))
                continue
            self.stats.busy_seconds[index] += result.get("wall_seconds", 0.0)
            self.stats.merge_seconds += result.get("merge_seconds", 0.0)
            self.stats.calls += 1
            done.append((tag, index, result))
        return done

    def close(self) -> None:
        """End the wall-time span of this search (call once, after the last result)."""
        if self._first_sent is not None:
            self.stats.wall_seconds += time.perf_counter() - self._first_sent
            self._first_sent = None
