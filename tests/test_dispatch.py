"""Candidates reach the evaluators without idling them: least-loaded routing, the next
candidate queued behind the current one, busy time counted exactly, and torch threads
that follow the CPUs an actor holds."""

from __future__ import annotations

import pytest
import ray
from conftest import stand_in_run

from dem_ray.ray.dispatch import Dispatch, SearchStats


@ray.remote(num_cpus=0)
class EchoEvaluator:
    """Answers like an evaluator, at once: what the routing does is all this tests."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, int, int]] = []

    def evaluate(self, vector, part, parts):
        self.seen.append((vector[0], part, parts))
        return {"nll": {"d": (1.0, 2)}, "device_seconds": 0.0, "tokens": 2,
                "wall_seconds": 0.25 * (part + 1)}  # fmt: skip

    def calls(self):
        return self.seen


def test_each_call_goes_to_the_least_loaded_actor_and_a_slice_stays_where_it_was(ray_session):
    actors = [EchoEvaluator.remote() for _ in range(2)]
    dispatch = Dispatch(actors)
    assert [dispatch.send(i, [float(i)], 0, 2) for i in range(3)] == [0, 1, 0]
    assert dispatch.outstanding == [2, 1]
    assert dispatch.send("x", [9.0], 1, 2, prefer=0) == 1  # actor 0 is busier: not kept there
    assert dispatch.send("y", [9.0], 1, 2, prefer=1) == 1  # a tie: stays on its actor
    assert dispatch.stats.peak_outstanding == [2, 3]
    results = []
    while len(dispatch):
        results += dispatch.finished()
    dispatch.close()
    assert sorted(str(tag) for tag, _, _ in results) == ["0", "1", "2", "x", "y"]
    assert dispatch.outstanding == [0, 0]
    assert [len(ray.get(a.calls.remote())) for a in actors] == [2, 3]
    # Busy time is what each actor said its calls took: 0.25 per slice-0 call, 0.5 per slice 1.
    assert dispatch.stats.busy_seconds == [0.5, 0.25 + 0.5 + 0.5]
    assert dispatch.stats.calls == 5


def test_utilisation_is_busy_time_over_wall_time():
    stats = SearchStats(busy_seconds=[3.0, 1.5], wall_seconds=4.0, wait_seconds=3.5,
                        candidates=10, calls=10)  # fmt: skip
    assert stats.utilisation() == [0.75, 0.375]
    assert stats.driver_seconds() == 0.5
    assert stats.candidates_per_second() == 2.5
    assert stats.as_dict()["evaluator_utilisation"] == [0.75, 0.375]
    assert SearchStats(busy_seconds=[1.0]).utilisation() == [0.0]  # nothing timed yet


def test_an_evaluator_runs_as_many_torch_threads_as_the_cpus_it_holds(ray_session, tiny_base,
                                                                       tmp_path):  # fmt: skip
    from dem_ray.ray.evaluator import start_pool

    kwargs = {"base_dir": str(tiny_base), "vector_paths": [], "shard_paths": {}}
    threads = {}
    for cpus in (2, 0.5):
        [actor] = start_pool(1, kwargs, cpus=cpus)
        threads[cpus] = ray.get(actor.info.remote())["torch_threads"]
        ray.kill(actor)
    [actor] = start_pool(1, {**kwargs, "torch_threads": 3}, cpus=1)  # an explicit count wins
    threads["given"] = ray.get(actor.info.remote())["torch_threads"]
    ray.kill(actor)
    assert threads == {2: 2, 0.5: 1, "given": 3}


@pytest.mark.parametrize("scheduler", ["none", "asha"])
def test_a_search_over_two_actors_keeps_both_fed_and_reports_how_busy_they_were(
    ray_session, tiny_base, tiny_data, make_config, tmp_path, scheduler
):
    from dem_ray.ray.search import read_trials
    from dem_ray.report.build import search_throughput
    from dem_ray.report.render import throughput_lines

    search = {"num_trials": 8, "max_concurrent": None, "scheduler": scheduler, "slices": 2}
    raw = make_config(tmp_path / "run", tiny_base, tiny_data, search=search,
                      evaluator={"num_actors": 2})  # fmt: skip
    pipeline = stand_in_run(raw, tmp_path / "config.yaml")
    try:
        actors = pipeline.evaluators()
        before = ray.get([a.info.remote() for a in actors])
        pipeline.run_command("search")
        after = ray.get([a.info.remote() for a in actors])
    finally:
        pipeline.close()
    trials = read_trials(pipeline.layout.trials)
    cost = pipeline.manifest.entry("search")["cost"]
    calls = [a["calls"] - b["calls"] for a, b in zip(after, before, strict=True)]
    slices = sum(t["slices_done"] for t in trials)
    assert len(trials) == 8 and cost["candidates"] == 8
    assert sum(calls) == slices == cost["evaluator_calls"]  # every slice scored once
    assert all(c > 0 for c in calls)  # both actors served candidates
    # 4 in flight (2 per actor by default): each actor had the next call queued behind one.
    assert cost["evaluator_peak_outstanding"] == [2, 2]
    # Each actor's busy time as the report has it equals what the actor itself counted.
    busy = [a["busy_seconds"] - b["busy_seconds"] for a, b in zip(after, before, strict=True)]
    assert cost["evaluator_busy_seconds"] == pytest.approx(busy, abs=1e-6)
    assert cost["evaluator_utilisation"] == pytest.approx(
        [min(b / cost["search_wall_seconds"], 1.0) for b in busy], abs=1e-4
    )
    assert cost["candidates_per_second"] == pytest.approx(8 / cost["search_wall_seconds"],
                                                          rel=1e-3)  # fmt: skip
    [line] = throughput_lines({"search_throughput": {"search": search_throughput(cost)}})
    assert "evaluated 8 candidates" in line and "per second" in line
