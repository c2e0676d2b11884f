"""Per-block spaces: one weight per dataset and block group, their parameters, grids and the
checks a merge method needs (dem_ray.core.spaces, dem_ray.core.blocks)."""

from __future__ import annotations

import random

import pytest

from dem_ray.core.blocks import block_of, count_layers, group_names, weight_key
from dem_ray.core.spaces import (
    Space,
    SpaceError,
    check_space_for_method,
    load_space,
    parse_space,
)

NAMES = ["code", "prose", "talk"]


def per_block(**raw) -> Space:
    return parse_space({"type": "per_block", **raw}, NAMES, "pb.yaml")


def test_block_groups_of_llama_and_gpt2_names() -> None:
    llama = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(6)]
    names = ["model.embed_tokens.weight", *llama, "model.norm.weight", "lm_head.weight"]
    assert count_layers(names) == 6
    groups = [block_of(n, 6, 2) for n in names]
    assert groups == [0, 1, 1, 1, 2, 2, 2, 3, 3]
    assert group_names(2) == ["embed", "block0", "block1", "head"]
    gpt2 = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight",
            "transformer.h.1.mlp.c_fc.bias", "transformer.ln_f.weight"]  # fmt: skip
    assert [block_of(n, count_layers(gpt2), 2) for n in gpt2] == [0, 0, 1, 2, 3]
    # more groups than layers: every layer its own group, none out of range
    assert [block_of(n, 6, 10) for n in llama] == [1, 2, 4, 6, 7, 9]


def test_keys_params_and_round_trip() -> None:
    space = per_block(groups=2)
    assert space.keys == [weight_key(n, g) for n in NAMES for g in group_names(2)]
    assert space.keys[:2] == ["code@embed", "code@block0"]
    assert len(space.param_names) == len(space.param_bounds()) == 12
    rng = random.Random(0)
    for _ in range(20):
        params = {p: rng.random() for p in space.param_names}
        weights = space.to_weights(params)
        space.check(weights)
        back = space.to_params(weights)
        assert all(abs(back[p] - params[p]) < 1e-12 for p in params)


def test_simplex_within_each_group() -> None:
    space = per_block(groups=1, per_group="simplex")
    assert len(space.param_names) == 3 * 2  # embed, block0, head; k-1 sticks each
    rng = random.Random(1)
    weights = space.to_weights({p: rng.random() for p in space.param_names})
    for g in space.group_labels:
        assert sum(weights[weight_key(n, g)] for n in NAMES) == pytest.approx(1.0)
    bad = dict(weights, **{"code@head": weights["code@head"] + 0.2})
    with pytest.raises(SpaceError, match="block group 'head'.*simplex"):
        space.check(bad)


def test_box_bounds_per_dataset_apply_to_every_group() -> None:
    space = per_block(groups=1, default_bounds=[0, 2], bounds={"talk": [0.5, 1.0]})
    assert space.param_bounds()[:3] == [(0.0, 2.0), (0.0, 2.0), (0.5, 1.0)]
    weights = space.expand({"code": 1.5, "prose": 0.0, "talk": 0.75})
    space.check(weights)
    with pytest.raises(SpaceError, match="block group 'block0'.*'talk' is outside"):
        space.check({**weights, "talk@block0": 1.2})


def test_expand_per_dataset_and_grid() -> None:
    space = per_block(groups=2)
    w = space.expand({"code": 0.2, "prose": 0.3, "talk": 0.5})
    assert space.per_dataset(w) == {"code": [0.2] * 4, "prose": [0.3] * 4, "talk": [0.5] * 4}
    grid = space.grid(0.5)
    assert len(grid) == 27  # the global box grid, every block group the same
    assert all(len(set(space.per_dataset(p)["code"])) == 1 for p in grid)
    assert space.inner().kind == "box" and space.inner().keys == NAMES


def test_shipped_per_block_space() -> None:
    space = load_space("per_block", NAMES)
    assert space.kind == "per_block" and space.two_stage and space.groups == 2
    assert space.merge_groups == 2
    assert load_space("simplex", NAMES).merge_groups is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"groups": 0}, "'groups' must be an integer >= 1"),
        ({"groups": True}, "'groups' must be an integer >= 1"),
        ({"per_group": "cube"}, "'per_group' is 'cube'"),
        ({"per_group": "simplex", "bounds": {}}, "bounds apply to 'per_group: box' only"),
        ({"two_stage": "yes"}, "'two_stage' must be true or false"),
        ({"global_trials": 4}, "'global_trials' needs 'two_stage: true'"),
        ({"two_stage": True, "global_trials": 0}, "'global_trials' must be an integer >= 1"),
        ({"blocks": 3}, "unknown key 'blocks' for a per_block space"),
        ({"bounds": {"poetry": [0, 1]}}, "no dataset 'poetry'"),
    ],
)
def test_per_block_errors(raw, message) -> None:
    with pytest.raises(SpaceError, match=message):
        per_block(**raw)


def test_sign_electing_methods_need_non_negative_weights() -> None:
    negative = parse_space({"type": "box", "default_bounds": [-0.5, 1.0]}, NAMES, "neg.yaml")
    for method in ("ties", "dare_ties"):
        with pytest.raises(SpaceError, match=f"neg.yaml: search.merge_method '{method}'"):
            check_space_for_method(negative, method, "tpe")
    check_space_for_method(negative, "linear", "tpe")
    check_space_for_method(negative, "dare_linear", "tpe")
    check_space_for_method(load_space("simplex", NAMES), "ties", "tpe")
    with pytest.raises(SpaceError, match="'two_stage: true' needs a sampler"):
        check_space_for_method(per_block(two_stage=True), "linear", "grid")


def test_two_stage_budget_must_leave_per_block_trials() -> None:
    space = per_block(two_stage=True, global_trials=8)
    with pytest.raises(
        SpaceError, match=r"global_trials \(8\) leaves none of search.num_trials \(8\)"
    ):
        check_space_for_method(space, "linear", "tpe", 8)
    check_space_for_method(space, "linear", "tpe", 9)
    check_space_for_method(per_block(two_stage=True), "linear", "tpe", 2)  # 1 global, 1 per block
    with pytest.raises(SpaceError, match="leaves none"):
        check_space_for_method(per_block(two_stage=True), "linear", "tpe", 1)
