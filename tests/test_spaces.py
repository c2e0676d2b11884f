"""Tests for dem_ray.core.spaces: the shipped spaces, the simplex parameterisation, grids, errors."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from dem_ray.core.spaces import SPACES_DIR, Space, SpaceError, load_space, parse_space

NAMES = ["code", "prose", "math"]


def random_params(space: Space, rng: random.Random) -> dict[str, float]:
    return {p: rng.random() for p in space.param_names}


# -- the shipped spaces -----------------------------------------------------------


def test_shipped_spaces_exist() -> None:
    assert sorted(p.stem for p in SPACES_DIR.glob("*.yaml")) == [
        "box",
        "box_wide",
        "per_block",
        "simplex",
    ]


def test_load_simplex() -> None:
    space = load_space("simplex", NAMES)
    assert space.kind == "simplex"
    assert space.names == tuple(NAMES)
    assert space.bounds == ()
    assert Path(space.source).name == "simplex.yaml"
    assert space.param_names == ["stick_code", "stick_prose"]
    assert space.param_bounds() == [(0.0, 1.0), (0.0, 1.0)]


def test_load_box() -> None:
    space = load_space("box", NAMES)
    assert space.kind == "box"
    assert space.bounds == ((0.0, 1.0),) * 3
    assert space.param_names == ["w_code", "w_prose", "w_math"]
    assert space.param_bounds() == [(0.0, 1.0)] * 3


def test_load_box_wide() -> None:
    space = load_space("box_wide", ["a", "b"])
    assert space.kind == "box"
    assert space.bounds == ((0.0, 1.5), (0.0, 1.5))


def test_load_space_by_path_and_config_dir(tmp_path: Path) -> None:
    (tmp_path / "search_spaces").mkdir()
    (tmp_path / "search_spaces" / "mine.yaml").write_text(
        "type: box\ndefault_bounds: [0, 2]\nbounds:\n  b: [0.5, 1]\n"
    )
    space = load_space("mine", ["a", "b"], config_dir=tmp_path)
    assert space.bounds == ((0.0, 2.0), (0.5, 1.0))
    direct = load_space(str(tmp_path / "search_spaces" / "mine.yaml"), ["a", "b"])
    assert direct == space


def test_unknown_space_lists_known() -> None:
    with pytest.raises(SpaceError) as info:
        load_space("triangle", NAMES)
    message = str(info.value)
    assert "'triangle'" in message
    assert "known spaces: box, box_wide, per_block, simplex" in message


def test_space_file_with_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("type: [box\n")
    with pytest.raises(SpaceError, match="not valid YAML"):
        load_space(str(path), NAMES)


# -- the simplex parameterisation -------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 5])
def test_simplex_weights_valid_and_round_trip(k) -> None:
    names = [f"d{i}" for i in range(k)]
    space = parse_space({"type": "simplex"}, names)
    rng = random.Random(k)
    for _ in range(500):
        params = random_params(space, rng)
        weights = space.to_weights(params)
        assert list(weights) == names
        assert all(w >= 0.0 for w in weights.values())
        assert abs(sum(weights.values()) - 1.0) <= 1e-12
        back = space.to_params(weights)
        assert list(back) == space.param_names
        for p in params:
            assert back[p] == pytest.approx(params[p], abs=1e-9)
        again = space.to_weights(back)
        for n in names:
            assert again[n] == pytest.approx(weights[n], abs=1e-12)


def test_simplex_weights_to_params_to_weights() -> None:
    space = parse_space({"type": "simplex"}, NAMES)
    for weights in (
        {"code": 0.2, "prose": 0.3, "math": 0.5},
        {"code": 1.0, "prose": 0.0, "math": 0.0},
        {"code": 0.0, "prose": 0.0, "math": 1.0},
        {"code": 0.0, "prose": 0.75, "math": 0.25},
        {"code": 1 / 3, "prose": 1 / 3, "math": 1 / 3},
    ):
        got = space.to_weights(space.to_params(weights))
        for n in NAMES:
            assert got[n] == pytest.approx(weights[n], abs=1e-12), weights


def test_simplex_known_values() -> None:
    space = parse_space({"type": "simplex"}, NAMES)
    # stick 1 is a Beta(1, 2) draw: u -> 1 - sqrt(1 - u); stick 2 is uniform on the rest.
    weights = space.to_weights({"stick_code": 0.75, "stick_prose": 0.5})
    assert weights["code"] == pytest.approx(0.5, abs=1e-15)
    assert weights["prose"] == pytest.approx(0.25, abs=1e-15)
    assert weights["math"] == pytest.approx(0.25, abs=1e-15)
    assert space.to_weights({"stick_code": 0.0, "stick_prose": 0.0}) == {
        "code": 0.0,
        "prose": 0.0,
        "math": 1.0,
    }
    corner = space.to_weights({"stick_code": 1.0, "stick_prose": 0.3})
    assert corner == {"code": 1.0, "prose": 0.0, "math": 0.0}


def test_simplex_clamps_out_of_range_params() -> None:
    space = parse_space({"type": "simplex"}, ["a", "b"])
    assert space.to_weights({"stick_a": -0.5}) == {"a": 0.0, "b": 1.0}
    assert space.to_weights({"stick_a": 1.5}) == {"a": 1.0, "b": 0.0}


def test_simplex_uniform_params_give_uniform_mixture() -> None:
    space = parse_space({"type": "simplex"}, NAMES)
    rng = random.Random(1234)
    n = 20000
    sums = dict.fromkeys(NAMES, 0.0)
    above_half = dict.fromkeys(NAMES, 0)
    for _ in range(n):
        weights = space.to_weights(random_params(space, rng))
        for name, w in weights.items():
            sums[name] += w
            above_half[name] += w > 0.5
    for name in NAMES:
        # Dirichlet(1, 1, 1): each marginal is Beta(1, 2): mean 1/3, P(w > 1/2) = 1/4.
        assert sums[name] / n == pytest.approx(1 / 3, abs=0.01), name
        assert above_half[name] / n == pytest.approx(0.25, abs=0.015), name


# -- grids ------------------------------------------------------------------------


def test_simplex_grid_k3() -> None:
    space = parse_space({"type": "simplex"}, NAMES)
    grid = space.grid(0.25)
    assert len(grid) == 15
    keys = {tuple(p[n] for n in NAMES) for p in grid}
    assert len(keys) == 15
    for point in grid:
        assert list(point) == NAMES
        assert all(v in (0.0, 0.25, 0.5, 0.75, 1.0) for v in point.values())
        assert sum(point.values()) == pytest.approx(1.0, abs=1e-12)
        space.check(point)
    assert grid[0] == {"code": 1.0, "prose": 0.0, "math": 0.0}
    assert {"code": 0.25, "prose": 0.25, "math": 0.5} in grid


@pytest.mark.parametrize(("k", "step", "count"), [(2, 0.5, 3), (2, 0.1, 11), (4, 0.5, 10)])
def test_simplex_grid_counts(k, step, count) -> None:
    space = parse_space({"type": "simplex"}, [f"d{i}" for i in range(k)])
    assert len(space.grid(step)) == count  # C(n + k - 1, k - 1) with n = 1 / step


def test_simplex_grid_step_must_divide_one() -> None:
    space = parse_space({"type": "simplex"}, NAMES)
    with pytest.raises(SpaceError, match="must divide 1"):
        space.grid(0.3)


def test_box_grid() -> None:
    space = parse_space({"type": "box", "default_bounds": [0, 1]}, ["a", "b"])
    grid = space.grid(0.5)
    assert len(grid) == 9
    assert grid[0] == {"a": 0.0, "b": 0.0} and grid[-1] == {"a": 1.0, "b": 1.0}
    assert {"a": 0.5, "b": 1.0} in grid
    assert len({(p["a"], p["b"]) for p in grid}) == 9


def test_box_grid_uneven_bounds() -> None:
    space = parse_space(
        {"type": "box", "default_bounds": [0, 1.5], "bounds": {"b": [0.5, 1.0]}}, ["a", "b"]
    )
    grid = space.grid(0.25)
    assert len(grid) == 7 * 3
    assert sorted({p["a"] for p in grid}) == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    assert sorted({p["b"] for p in grid}) == [0.5, 0.75, 1.0]
    assert len(space.grid(0.1)) == 16 * 6  # floating steps do not lose the end point


# -- check ------------------------------------------------------------------------


def test_simplex_check_rejects_off_simplex() -> None:
    space = parse_space({"type": "simplex"}, NAMES)
    space.check({"code": 0.5, "prose": 0.5, "math": 0.0})
    with pytest.raises(SpaceError, match="not on the simplex") as info:
        space.check({"code": 0.5, "prose": 0.6, "math": 0.0})
    assert "'prose'" in str(info.value)
    with pytest.raises(SpaceError, match="not on the simplex") as info:
        space.check({"code": 1.2, "prose": 0.0, "math": -0.2})
    assert "'math': -0.2" in str(info.value)


def test_check_rejects_wrong_names_and_non_finite() -> None:
    space = parse_space({"type": "simplex"}, NAMES)
    with pytest.raises(SpaceError, match="space has datasets"):
        space.check({"code": 0.5, "prose": 0.5})
    with pytest.raises(SpaceError, match="weight for 'math' is nan"):
        space.check({"code": 0.5, "prose": 0.5, "math": math.nan})


def test_box_check_rejects_out_of_bounds() -> None:
    space = parse_space({"type": "box", "bounds": {"prose": [0.0, 2.0]}}, NAMES, "my.yaml")
    space.check({"code": 1.0, "prose": 2.0, "math": 0.0})
    with pytest.raises(SpaceError) as info:
        space.check({"code": 0.5, "prose": 0.5, "math": 1.1})
    message = str(info.value)
    assert "weight 1.1 for 'math' is outside its bounds [0.0, 1.0]" in message
    assert "my.yaml" in message
    with pytest.raises(SpaceError, match="'code'"):
        space.check({"code": -0.01, "prose": 0.5, "math": 0.5})


def test_box_to_weights_and_params() -> None:
    space = parse_space({"type": "box"}, ["a", "b"])
    weights = space.to_weights({"w_a": 0.25, "w_b": 0.8})
    assert weights == {"a": 0.25, "b": 0.8}
    assert space.to_params(weights) == {"w_a": 0.25, "w_b": 0.8}
    with pytest.raises(SpaceError, match="outside its bounds"):
        space.to_params({"a": 1.5, "b": 0.0})


# -- parse_space errors -----------------------------------------------------------


def test_parse_unknown_type() -> None:
    with pytest.raises(SpaceError, match="'type' is 'cube'; choose simplex, box or per_block"):
        parse_space({"type": "cube"}, NAMES, "s.yaml")
    with pytest.raises(SpaceError, match="'type' is None"):
        parse_space({}, NAMES)
    with pytest.raises(SpaceError, match="must be a mapping"):
        parse_space(["simplex"], NAMES)


def test_parse_unhashable_type() -> None:
    with pytest.raises(SpaceError, match="s.yaml"):
        parse_space({"type": ["simplex"]}, NAMES, "s.yaml")


@pytest.mark.parametrize(
    "raw",
    [{"type": "simplex", "bounds": {}}, {"type": "box", "bound": {}}],
)
def test_parse_unknown_key(raw) -> None:
    bad = next(k for k in raw if k != "type")
    with pytest.raises(SpaceError, match=f"s.yaml: unknown key '{bad}' for a {raw['type']} space"):
        parse_space(raw, NAMES, "s.yaml")


@pytest.mark.parametrize("pair", [[1, 1], [2, 1], [0.5, 0.5]])
def test_parse_empty_bounds(pair) -> None:
    with pytest.raises(SpaceError, match="'default_bounds' is empty"):
        parse_space({"type": "box", "default_bounds": pair}, NAMES, "s.yaml")
    with pytest.raises(SpaceError, match="'bounds.prose' is empty"):
        parse_space({"type": "box", "bounds": {"prose": pair}}, NAMES, "s.yaml")


@pytest.mark.parametrize("pair", [[0], [0, 1, 2], ["0", 1], [True, 2], 1.0, None])
def test_parse_malformed_bounds(pair) -> None:
    with pytest.raises(SpaceError, match=r"'bounds.code' must be \[low, high\]"):
        parse_space({"type": "box", "bounds": {"code": pair}}, NAMES)


def test_parse_bounds_for_unknown_dataset() -> None:
    with pytest.raises(SpaceError) as info:
        parse_space({"type": "box", "bounds": {"poetry": [0, 2]}}, NAMES, "s.yaml")
    message = str(info.value)
    assert "bounds.poetry" in message and "no dataset 'poetry'" in message
    assert "code, prose, math" in message


def test_parse_bounds_not_a_mapping() -> None:
    with pytest.raises(SpaceError, match="'bounds' must map dataset names"):
        parse_space({"type": "box", "bounds": [[0, 1]]}, NAMES)
