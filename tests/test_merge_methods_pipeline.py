"""Merge methods and per-block spaces through the stages: what the search scores is what
`merge` writes, a two-stage search runs its global stage first and never repeats a candidate."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dem_ray.config import parse_config
from dem_ray.core.merge import LazyTensors, ResidentMerge
from dem_ray.pipeline import Pipeline
from dem_ray.run.trials import read_trials


@pytest.fixture(scope="module")
def two_stage(ray_session, tiny_base, tiny_data, make_config, tmp_path_factory):
    from conftest import stand_in_run

    root = tmp_path_factory.mktemp("two_stage")
    search = {"space": "per_block", "merge_method": "ties", "density": 0.6, "num_trials": 8}
    raw = make_config(root / "run", tiny_base, tiny_data, search=search)
    pipeline = stand_in_run(raw, root / "config.yaml")
    pipeline.run_command("search")
    pipeline.run_command("merge")
    pipeline.run_command("report")
    pipeline.close()
    return pipeline, raw, root


def candidates(trials: list[dict]) -> set[tuple]:
    return {tuple(sorted((k, round(v, 12)) for k, v in t["weights"].items())) for t in trials}


def test_global_stage_first_then_per_block_knowing_it(two_stage):
    pipeline, _, _ = two_stage
    space = pipeline.ctx.space
    first = read_trials(pipeline.layout.search / "global_trials.jsonl")
    second = read_trials(pipeline.layout.trials)
    assert len(first) == 4 and len(second) == 4
    assert all(set(t["weights"]) == set(pipeline.names) for t in first)
    assert all(set(t["weights"]) == set(space.keys) for t in second)
    # the per-block stage was told the global trials; none is evaluated again
    every = [*({**t, "weights": space.expand(t["weights"])} for t in first), *second]
    assert len(candidates(every)) == 8
    entry = pipeline.manifest.entry("search")
    assert entry["num_trials"] == 8
    best = min(every, key=lambda t: t["objective"])
    assert entry["best_weights"] == pytest.approx(best["weights"], abs=1e-12)
    record = json.loads(pipeline.layout.best.read_text())
    held = first if record["stage"] == "global" else second
    assert record["stage"] in ("global", "search")
    assert held[record["trial"]]["objective"] == record["objective"]["value"] == best["objective"]


def test_merged_dir_is_what_the_evaluator_scored(two_stage, tiny_base):
    pipeline, raw, _ = two_stage
    merged = pipeline.layout.merged
    info = json.loads((merged / "dem_ray_merge.json").read_text())
    assert (info["method"], info["density"], info["groups"]) == ("ties", 0.6, 2)
    # merge a per-block candidate (the best may be a global one, every group the same)
    [trial] = read_trials(pipeline.layout.trials)[:1]
    again = Pipeline(parse_config(raw))
    again.run(("merge",), force=True, weights=trial["weights"])
    weights = again.manifest.entry("merge")["weights"]
    assert weights == trial["weights"]
    space = again.ctx.space
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base)).eval()
    resident = ResidentMerge(
        model,
        [LazyTensors(again.layout.vector(n)) for n in again.names],
        method="ties",
        density=0.6,
        dare_seed=raw["search"].get("dare_seed", 0),
        groups=2,
        names=again.names,
    )
    resident.apply([weights[k] for k in space.keys])
    live = model.state_dict()
    written = load_file(str(merged / "model.safetensors"))
    for name, tensor in written.items():
        torch.testing.assert_close(tensor, live[name], rtol=0, atol=1e-7, msg=name)
    # a per-block candidate really differs between groups (else this proves little)
    per = space.per_dataset(weights)
    assert any(len(set(ws)) > 1 for ws in per.values())


def test_raising_num_trials_extends_both_stages_without_repeats(
    two_stage, tiny_base, tiny_data, make_config
):
    pipeline, raw, root = two_stage
    before_global = read_trials(pipeline.layout.search / "global_trials.jsonl")
    before = read_trials(pipeline.layout.trials)
    raw = {**raw, "search": {**raw["search"], "num_trials": 10}}
    more = Pipeline(parse_config(raw))
    more.open()
    try:
        more.run_command("search")
    finally:
        more.close()
    assert more.ran == ["search"]
    after_global = read_trials(more.layout.search / "global_trials.jsonl")
    after = read_trials(more.layout.trials)
    assert after_global[:4] == before_global and len(after_global) == 5
    assert after[:4] == before and len(after) == 5
    space = more.ctx.space
    every = [*({**t, "weights": space.expand(t["weights"])} for t in after_global), *after]
    assert len(candidates(every)) == 10
    assert more.manifest.entry("search")["num_trials"] == 10


def test_ties_with_negative_bounds_fails_before_any_work(
    tiny_base, tiny_data, make_config, tmp_path
):
    from dem_ray.core.spaces import SpaceError

    space = tmp_path / "neg.yaml"
    space.write_text("type: box\ndefault_bounds: [-1.0, 1.0]\n")
    raw = make_config(tmp_path / "run", tiny_base, tiny_data,
                      search={"space": str(space), "merge_method": "dare_ties"})  # fmt: skip
    with pytest.raises(SpaceError, match="elects signs from non-negative weights"):
        Pipeline(parse_config(raw)).run()
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_report_carries_the_method_weights_sum_and_vector_diagnostics(two_stage):
    pipeline, _, _ = two_stage
    report = pipeline.report()
    space = pipeline.ctx.space
    weights = report["dem_weights"]
    assert list(weights) == space.keys
    assert report["merge_method"] == {"method": "ties", "density": 0.6, "dare_seed": 0}
    per = space.per_dataset(weights)
    for j, group in enumerate(space.group_labels):
        assert report["weights_sum"][group] == pytest.approx(sum(ws[j] for ws in per.values()))
    diag = report["diagnostics"]
    assert diag["groups"] == space.group_labels and diag["datasets"] == pipeline.names
    vectors = [load_file(str(pipeline.layout.vector(n))) for n in pipeline.names]
    flat = [torch.cat([v[k].double().reshape(-1) for k in sorted(v)]) for v in vectors]
    for i in range(len(flat)):
        assert diag["norm"][pipeline.names[i]] == pytest.approx(flat[i].norm().item(), rel=1e-9)
        for j in range(len(flat)):
            cos = (flat[i] @ flat[j] / (flat[i].norm() * flat[j].norm())).item()
            assert diag["cosine"][i][j] == pytest.approx(cos, rel=1e-9, abs=1e-12)
    off = [diag["cosine"][i][j] for i in range(3) for j in range(3) if i != j]
    assert diag["mean_cosine"] == pytest.approx(sum(off) / len(off))
    markdown = (pipeline.layout.report / "report.md").read_text()
    assert "## Distribution vectors" in markdown and "Merge method: ties (density 0.6)" in markdown
    assert (pipeline.layout.report / "similarity.png").stat().st_size > 0
