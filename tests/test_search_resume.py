"""A resumed or extended search never evaluates a candidate it has already evaluated.

The evaluator pool is built directly (no pipeline): the tiny base, three stand-in
vectors (the base's tensors times small seeded noise) and three validation shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import ray
import torch
from conftest import kill_processes_under, lines_in, wait_for
from ray.tune.search import Searcher
from safetensors.torch import load_file

from dem_ray.config import SearchConfig
from dem_ray.core.spaces import parse_space
from dem_ray.core.vectors import save_tensors
from dem_ray.data.readers import tokenize_and_pack
from dem_ray.models.base import load_tokenizer
from dem_ray.models.tiny import synthetic_corpus
from dem_ray.ray.evaluator import start_pool
from dem_ray.ray.search import read_trials, run_search

NAMES = ("numbers", "letters", "code")
SPACE = parse_space({"type": "simplex"}, list(NAMES))
INPUTS = "search-resume-test"
REPO = Path(__file__).resolve().parent.parent


# ---- helpers ------------------------------------------------------------------------------------
def search_config(**fields) -> SearchConfig:
    """Keyword arguments only: SearchConfig may be a dataclass or a pydantic model."""
    return SearchConfig(**{"num_trials": 16, "max_concurrent": 2, "seed": 0, **fields})


def with_fields(cfg, **changes):
    if dataclasses.is_dataclass(cfg):
        return dataclasses.replace(cfg, **changes)
    return cfg.model_copy(update=changes)


def search(cfg, pool, out: Path, fresh: bool = False) -> list[dict]:
    return run_search(cfg, SPACE, pool, out, inputs=INPUTS, fresh=fresh)


def calls(pool) -> int:
    return ray.get(pool[0].info.remote())["calls"]


def candidate(trial: dict) -> tuple[float, ...]:
    return tuple(float(trial["weights"][n]) for n in NAMES)


def assert_distinct(trials: list[dict], tol: float = 1e-9) -> None:
    points = [candidate(t) for t in trials]
    for i, a in enumerate(points):
        for j in range(i):
            b = points[j]
            assert max(abs(x - y) for x, y in zip(a, b, strict=True)) > tol, (
                f"trial {trials[i]['trial']} re-evaluated the candidate of trial "
                f"{trials[j]['trial']}: {a}"
            )


def complete_lines(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: data.rfind(b"\n") + 1]


# ---- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluator_kwargs(tmp_path_factory, tiny_base) -> dict:
    root = tmp_path_factory.mktemp("search-resume")
    base = load_file(tiny_base / "model.safetensors")
    vector_paths = []
    for i, name in enumerate(NAMES):
        gen = torch.Generator().manual_seed(100 + i)
        vector = {k: v * (0.2 * torch.randn(v.shape, generator=gen)) for k, v in base.items()}
        path = root / f"{name}.safetensors"
        save_tensors(vector, path)
        vector_paths.append(str(path))
    tokenizer = load_tokenizer(tiny_base)
    shard_paths = {}
    for name in NAMES:
        rows = tokenize_and_pack(synthetic_corpus(name, 40, seed=5), tokenizer, 32)
        assert rows.shape[0] >= 4
        path = root / f"{name}-validation.safetensors"
        save_tensors({"input_ids": rows}, path)
        shard_paths[name] = str(path)
    return {
        "base_dir": str(tiny_base),
        "vector_paths": vector_paths,
        "shard_paths": shard_paths,
        "batch_size": 8,
        "max_sequences": 4,
        "torch_threads": 1,
    }


@pytest.fixture(scope="module")
def pool(ray_session, evaluator_kwargs):
    actors = start_pool(1, evaluator_kwargs, cpus=0.5)
    yield actors
    for actor in actors:
        ray.kill(actor)


# ---- a driver killed mid-search -----------------------------------------------------------------
DRIVER = """
import json, sys, time
from pathlib import Path
import ray
spec = json.loads(Path(sys.argv[1]).read_text())
ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=spec["temp_dir"],
         log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
from dem_ray.config import SearchConfig
from dem_ray.core.spaces import parse_space
from dem_ray.ray.evaluator import start_pool
from dem_ray.ray.search import run_search
pool = start_pool(1, spec["kwargs"], cpus=0.5)
space = parse_space({"type": "simplex"}, spec["names"])
out = Path(spec["out"])

def stall():
    # Tune's loop stops here once `kill_after` trials are written, trials still in flight,
    # so the kill lands at a known point (inside TPE's random start-up phase).
    if len((out / "trials.jsonl").read_text().splitlines()) >= spec["kill_after"]:
        time.sleep(600)

run_search(SearchConfig(**spec["search"]), space, pool, out,
           inputs=spec["inputs"], fresh=False, after_write=stall)
"""


def test_driver_killed_mid_search_resumes_without_repeating_a_candidate(
    pool, evaluator_kwargs, tmp_path
):
    total = 40
    fields = {"algorithm": "tpe", "num_trials": total, "max_concurrent": 2, "seed": 0}
    out = tmp_path / "search"
    trials_path = out / "trials.jsonl"
    temp_dir = Path(f"/tmp/dsr-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    spec_path = tmp_path / "driver.json"
    spec_path.write_text(
        json.dumps(
            {
                "temp_dir": str(temp_dir),
                "kwargs": evaluator_kwargs,
                "names": list(NAMES),
                "search": fields,
                "out": str(out),
                "inputs": INPUTS,
                "kill_after": 8,
            }
        )
    )
    log_path = tmp_path / "killed-driver.log"
    with log_path.open("w") as log_file:
        driver = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(DRIVER), str(spec_path)],
            stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO,
            start_new_session=True,  # its own process group, killed as a whole below
        )  # fmt: skip
    try:
        wait_for(lambda: lines_in(trials_path) >= 8 or driver.poll() is not None, 300, "8 trials")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)  # the driver and its process group
        driver.wait(timeout=30)
        kill_processes_under(temp_dir)
    assert driver.returncode == -signal.SIGKILL, log_path.read_text()[-3000:]
    kept_bytes = complete_lines(trials_path)
    kept = read_trials(trials_path)
    assert len(kept) == 8, "the driver was not killed after 8 trials; nothing was tested"

    before = calls(pool)
    trials = search(search_config(**fields), pool, out)
    assert len(trials) == total
    assert trials_path.read_bytes().startswith(kept_bytes)  # kept byte for byte
    assert trials[: len(kept)] == kept
    assert [t["trial"] for t in trials] == list(range(total))
    assert_distinct(trials)  # 40 trials, 40 different candidates
    assert calls(pool) - before == total - len(kept)  # the kept ones were not evaluated again


# ---- extending a finished search ----------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["tpe", "random", "cmaes"])
def test_extending_a_search_runs_only_the_missing_trials(pool, tmp_path, algorithm):
    out = tmp_path / "search"
    trials_path = out / "trials.jsonl"
    cfg = search_config(algorithm=algorithm, num_trials=16)
    first = search(cfg, pool, out)
    assert len(first) == 16
    first_bytes = trials_path.read_bytes()

    before = calls(pool)
    trials = search(with_fields(cfg, num_trials=24), pool, out)
    assert calls(pool) - before == 8  # only the 8 missing trials ran
    assert len(trials) == 24 and trials == read_trials(trials_path)
    assert trials[:16] == first and trials_path.read_bytes().startswith(first_bytes)
    assert [t["trial"] for t in trials] == list(range(24))
    assert_distinct(trials)  # none of the 8 new ones repeats one of the 16

    # Fewer trials asked for than are finished: the finished ones, nothing run.
    before = calls(pool)
    again = search(with_fields(cfg, num_trials=12), pool, out)
    assert calls(pool) == before
    assert again == trials and read_trials(trials_path) == trials


def param_space() -> dict:
    from ray import tune

    return {
        p: tune.uniform(lo, hi)
        for p, (lo, hi) in zip(SPACE.param_names, SPACE.param_bounds(), strict=True)
    }


@pytest.mark.parametrize("algorithm", ["tpe", "random", "cmaes"])
def test_the_sampler_learns_the_finished_trials_and_its_random_state_moves_on(algorithm):
    from dem_ray.ray.search import make_searcher

    cfg = search_config(algorithm=algorithm, num_trials=24)

    def suggestions(finished: list[dict], count: int):
        searcher = make_searcher(cfg, SPACE, finished)
        searcher.set_search_properties("objective", "min", param_space())
        out = [searcher.suggest(f"t{i}") for i in range(count)]
        return searcher, out

    _, fresh = suggestions([], 16)
    finished = [
        {"trial": i, "weights": SPACE.to_weights(p), "params": p, "objective": 1.0 + i}
        for i, p in enumerate(fresh)
    ]
    searcher, resumed = suggestions(finished, 8)
    study = searcher.searcher._ot_study  # the OptunaSearch inside the guard
    told = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert [t.value for t in told] == [1.0 + i for i in range(16)]  # the sampler knows the 16
    assert all(r not in fresh for r in resumed)  # and draws new points, not its first ones
    _, again = suggestions(finished, 8)
    assert again == resumed  # reproducibly so, from the same finished trials


# ---- the duplicate guard ------------------------------------------------------------------------
class ScriptedSearcher(Searcher):
    """A stand-in inner searcher that proposes a fixed list of points, in order."""

    def __init__(self, points: list[dict]) -> None:
        super().__init__(metric="objective", mode="min")
        self.points = list(points)
        self.asked: list[str] = []
        self.told: dict[str, tuple] = {}

    def suggest(self, trial_id: str):
        self.asked.append(trial_id)
        return self.points.pop(0) if self.points else None

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.told[trial_id] = (result, error)


def test_the_guard_never_hands_out_an_evaluated_or_in_flight_candidate():
    from dem_ray.ray.search import UniqueCandidates

    done = {"stick_numbers": 0.3, "stick_letters": 0.6}
    fresh = {"stick_numbers": 0.1, "stick_letters": 0.2}
    other = {"stick_numbers": 0.9, "stick_letters": 0.05}
    finished = [{"trial": 0, "weights": SPACE.to_weights(done), "objective": 2.5}]
    near = {k: v + 1e-12 for k, v in done.items()}  # the same candidate to 1e-9
    inner = ScriptedSearcher([done, near, fresh, dict(fresh), other])
    guard = UniqueCandidates(inner, SPACE, finished)

    assert guard.suggest("a") == fresh  # `done` and `near` were refused
    assert len(inner.asked) == 3
    refused = inner.asked[:2]
    assert all(inner.told[r][0] is None and inner.told[r][1] for r in refused)  # told: failed
    assert guard.suggest("b") == other  # `fresh` again is in flight under "a": refused too
    assert len(inner.told) == 3
    guard.on_trial_complete("a", {"objective": 1.0})
    assert inner.told[inner.asked[2]] == ({"objective": 1.0}, False)  # "a" told under its id


def test_the_guard_gives_up_on_a_searcher_that_only_repeats():
    from dem_ray.ray.search import UniqueCandidates

    done = {"stick_numbers": 0.3, "stick_letters": 0.6}
    finished = [{"trial": 0, "weights": SPACE.to_weights(done), "objective": 2.5}]
    guard = UniqueCandidates(ScriptedSearcher([dict(done) for _ in range(500)]), SPACE, finished)
    with pytest.raises(RuntimeError, match="already evaluated"):
        guard.suggest("a")


def test_the_guard_makes_a_reseeded_optuna_sampler_draw_new_points():
    """The bug itself: a sampler seeded as before proposes the finished points again."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from dem_ray.ray.search import UniqueCandidates

    def guarded(finished: list[dict]) -> UniqueCandidates:
        inner = OptunaSearch(sampler=optuna.samplers.RandomSampler(seed=0))
        guard = UniqueCandidates(inner, SPACE, finished)
        guard.set_search_properties("objective", "min", param_space())
        return guard

    first = guarded([])
    drawn = [first.suggest(f"t{i}") for i in range(3)]
    finished = [{"weights": SPACE.to_weights(p), "objective": 1.0} for p in drawn]
    guard = guarded(finished)
    new = guard.suggest("x")
    assert new not in drawn and guard.refused == 3
    study = guard.searcher._ot_study
    assert [t.state.name for t in study.trials] == ["FAIL"] * 3 + ["RUNNING"]
    guard.on_trial_complete("x", {"objective": 2.0, "training_iteration": 1})
    assert study.trials[-1].state.name == "COMPLETE" and study.trials[-1].value == 2.0


# ---- a resumed search is reproducible -----------------------------------------------------------
def test_resuming_the_same_kept_trials_twice_gives_the_same_next_candidates(pool, tmp_path):
    cfg = search_config(algorithm="tpe", num_trials=6, max_concurrent=1, seed=4)
    prefix = tmp_path / "prefix"
    kept = search(cfg, pool, prefix)
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        out.mkdir()
        for f in ("trials.jsonl", "trials.jsonl.inputs"):
            shutil.copy(prefix / f, out / f)
        runs.append(search(with_fields(cfg, num_trials=12), pool, out))
    a, b = runs
    assert a[:6] == b[:6] == kept
    new_a = [(t["params"], t["weights"], t["objective"]) for t in a[6:]]
    new_b = [(t["params"], t["weights"], t["objective"]) for t in b[6:]]
    assert new_a == new_b  # the same next candidates, in the same order
    assert_distinct(a)  # none of them one the kept trials already evaluated
