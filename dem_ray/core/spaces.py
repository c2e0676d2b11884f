"""Search spaces over the mixing coefficients, read from `search_spaces/*.yaml`.

A space turns a searcher's free parameters into weights, turns weights back into
parameters (to seed a study), and enumerates its grid. `simplex` and `box` give one
weight per dataset; `per_block` gives each dataset one weight per block group
(embeddings, `groups` contiguous groups of layers, final norm and head), each group
a simplex or a box over the datasets. Weights are a flat {key: weight}: the dataset
name, or `dataset@group` for per-block (`keys`, in the order the merge kernel takes).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from dem_ray.core.blocks import group_names, weight_key

SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"


class SpaceError(ValueError):
    """A search space file that cannot be used; the message names the file and key."""


@dataclass(frozen=True)
class Space:
    kind: str  # simplex | box | per_block
    names: tuple[str, ...]
    bounds: tuple[tuple[float, float], ...] = ()  # per dataset (box, and per_block over box)
    source: str = ""
    groups: int = 0  # per_block: layer groups (the block groups are groups + 2)
    per_group: str = ""  # per_block: `simplex` or `box` within each block group
    two_stage: bool = False  # per_block: a global search first, then per block from its best
    global_trials: int | None = None  # per_block two-stage: trials of the global stage

    # -- the weights a candidate has ---------------------------------------------------
    @property
    def group_labels(self) -> list[str]:
        return group_names(self.groups) if self.kind == "per_block" else []

    @property
    def keys(self) -> list[str]:
        """Weight keys in the merge kernel's order (dataset-major for per-block)."""
        if self.kind != "per_block":
            return list(self.names)
        return [weight_key(n, g) for n in self.names for g in self.group_labels]

    def keys_of(self, name: str) -> list[str]:
        """The weight keys of one dataset."""
        if self.kind != "per_block":
            return [name]
        return [weight_key(name, g) for g in self.group_labels]

    @property
    def merge_groups(self) -> int | None:
        """What the merge kernel takes as `groups`: None for one weight per dataset."""
        return self.groups if self.kind == "per_block" else None

    def inner(self) -> Space:
        """The one-weight-per-dataset space each block group is (the global stage's space)."""
        if self.kind != "per_block":
            return self
        return Space(self.per_group, self.names, self.bounds, self.source)

    def expand(self, weights: dict[str, float]) -> dict[str, float]:
        """Per-dataset weights -> this space's weights (every block group the same)."""
        if self.kind != "per_block":
            return {n: float(weights[n]) for n in self.names}
        return {weight_key(n, g): float(weights[n]) for n in self.names for g in self.group_labels}

    def per_dataset(self, weights: dict[str, float]) -> dict[str, list[float]]:
        """{dataset: [its weight per block group]} (one-element lists outside per-block)."""
        if self.kind != "per_block":
            return {n: [float(weights[n])] for n in self.names}
        return {
            n: [float(weights[weight_key(n, g)]) for g in self.group_labels] for n in self.names
        }

    def _group_weights(self, weights: dict[str, float], group: str) -> dict[str, float]:
        return {n: weights[weight_key(n, group)] for n in self.names}

    # -- parameters a searcher sees ------------------------------------------------
    @property
    def param_names(self) -> list[str]:
        if self.kind == "per_block":
            inner = self.inner()
            return [f"{p}@{g}" for g in self.group_labels for p in inner.param_names]
        if self.kind == "simplex":
            return [f"stick_{name}" for name in self.names[:-1]]
        return [f"w_{name}" for name in self.names]

    def param_bounds(self) -> list[tuple[float, float]]:
        if self.kind == "per_block":
            return self.inner().param_bounds() * len(self.group_labels)
        if self.kind == "simplex":
            return [(0.0, 1.0)] * (len(self.names) - 1)
        return list(self.bounds)

    def to_weights(self, params: dict[str, float]) -> dict[str, float]:
        """Searcher parameters -> {key: weight}."""
        if self.kind == "per_block":
            inner, out = self.inner(), {}
            for g in self.group_labels:
                part = inner.to_weights({p: params[f"{p}@{g}"] for p in inner.param_names})
                out.update({weight_key(n, g): w for n, w in part.items()})
            return {k: out[k] for k in self.keys}
        values = [float(params[p]) for p in self.param_names]
        if self.kind == "box":
            return dict(zip(self.names, values, strict=True))
        weights, rest, k = [], 1.0, len(self.names)
        for j, u in enumerate(values):
            # Beta(1, k-1-j) inverse CDF: uniform u gives a uniform point on the simplex.
            fraction = 1.0 - (1.0 - min(max(u, 0.0), 1.0)) ** (1.0 / (k - 1 - j))
            weights.append(rest * fraction)
            rest -= weights[-1]
        weights.append(max(rest, 0.0))
        return dict(zip(self.names, weights, strict=True))

    def to_params(self, weights: dict[str, float]) -> dict[str, float]:
        """{key: weight} -> searcher parameters (the inverse of to_weights)."""
        self.check(weights)
        if self.kind == "per_block":
            inner, params = self.inner(), {}
            for g in self.group_labels:
                part = inner.to_params(self._group_weights(weights, g))
                params.update({f"{p}@{g}": v for p, v in part.items()})
            return params
        if self.kind == "box":
            return {f"w_{n}": float(weights[n]) for n in self.names}
        params, rest, k = {}, 1.0, len(self.names)
        for j, name in enumerate(self.names[:-1]):
            fraction = 0.0 if rest <= 1e-12 else min(weights[name] / rest, 1.0)
            params[f"stick_{name}"] = 1.0 - (1.0 - fraction) ** (k - 1 - j)
            rest -= weights[name]
        return params

    def check(self, weights: dict[str, float], tol: float = 1e-6) -> None:
        """Raise SpaceError when weights are outside the space."""
        if set(weights) != set(self.keys):
            what = "weight keys" if self.kind == "per_block" else "datasets"
            raise SpaceError(
                f"weights name {sorted(weights)} but the space has {what} {list(self.keys)}"
            )
        for name, w in weights.items():
            if not math.isfinite(w):
                raise SpaceError(f"weight for '{name}' is {w}")
        if self.kind == "per_block":
            inner = self.inner()
            for g in self.group_labels:
                try:
                    inner.check(self._group_weights(weights, g), tol)
                except SpaceError as exc:
                    raise SpaceError(f"block group '{g}': {exc}") from None
            return
        if self.kind == "simplex":
            bad = [n for n, w in weights.items() if w < -tol]
            if bad or abs(sum(weights.values()) - 1.0) > 1e-4:
                raise SpaceError(
                    f"weights {weights} are not on the simplex (each >= 0, summing to 1)"
                )
        else:
            for name, (lo, hi) in zip(self.names, self.bounds, strict=True):
                if not lo - tol <= weights[name] <= hi + tol:
                    raise SpaceError(
                        f"weight {weights[name]} for '{name}' is outside its bounds [{lo}, {hi}]"
                        f" in {self.source}"
                    )

    def min_weight(self) -> float:
        """The lowest weight the space allows (ties merges need it >= 0)."""
        if self.kind == "simplex" or (self.kind == "per_block" and self.per_group == "simplex"):
            return 0.0
        return min(lo for lo, _ in self.bounds)

    def grid(self, step: float) -> list[dict[str, float]]:
        """Every point of the space's grid at `step` (the plain coefficient grid baseline).

        For per-block spaces this is the global grid with every block group the same:
        the plain grid is the one-weight-per-dataset baseline (a grid per block would
        have (points per group) ** groups points).
        """
        if self.kind == "per_block":
            return [self.expand(point) for point in self.inner().grid(step)]
        if self.kind == "simplex":
            n = round(1.0 / step)
            if abs(n * step - 1.0) > 1e-5:
                raise SpaceError(f"grid_step {step} must divide 1 for the simplex")
            points = [
                c for c in itertools.product(range(n + 1), repeat=len(self.names)) if sum(c) == n
            ]
            return [
                {name: c / n for name, c in zip(self.names, combo, strict=True)}
                for combo in sorted(points, reverse=True)
            ]
        axes = []
        for lo, hi in self.bounds:
            count = int(math.floor((hi - lo) / step + 1e-9)) + 1
            axes.append([round(lo + i * step, 10) for i in range(count)])
        return [dict(zip(self.names, combo, strict=True)) for combo in itertools.product(*axes)]


SIGN_ELECTING_METHODS = ("ties", "dare_ties")


def check_space_for_method(
    space: Space, method: str, algorithm: str, num_trials: int | None = None
) -> None:
    """Refuse a space that the merge method, the algorithm or the budget cannot use,
    before any work."""
    if method in SIGN_ELECTING_METHODS and space.min_weight() < 0:
        raise SpaceError(
            f"{space.source}: search.merge_method '{method}' elects signs from non-negative "
            f"weights, but the space allows weights down to {space.min_weight()}; use bounds "
            "with low >= 0 or merge_method linear / dare_linear"
        )
    if space.two_stage and algorithm == "grid":
        raise SpaceError(
            f"{space.source}: 'two_stage: true' needs a sampler; the plain grid "
            "(search.algorithm: grid) visits the global grid once"
        )
    if (
        space.two_stage
        and num_trials is not None
        and global_trials(space, num_trials) >= num_trials
    ):
        raise SpaceError(
            f"{space.source}: global_trials ({global_trials(space, num_trials)}) leaves none of "
            f"search.num_trials ({num_trials}) for the per-block stage; raise num_trials or "
            "lower global_trials"
        )


def global_trials(space: Space, num_trials: int) -> int:
    """Trials of a two-stage search's global stage (the rest search per block)."""
    return space.global_trials or max(1, num_trials // 2)


def resolve_space_file(space: str, config_dir: Path | None = None) -> Path:
    """A space name (a file in search_spaces/) or a path to a YAML file."""
    candidates = [Path(space)]
    if config_dir is not None:
        candidates += [config_dir / space, config_dir / "search_spaces" / f"{space}.yaml"]
    candidates += [Path("search_spaces") / f"{space}.yaml", SPACES_DIR / f"{space}.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    known = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))
    raise SpaceError(
        f"search.space '{space}': no such space; known spaces: {', '.join(known)} "
        "(or give a path to a YAML file)"
    )


def load_space(space: str, names: list[str], config_dir: Path | None = None) -> Space:
    path = resolve_space_file(space, config_dir)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SpaceError(f"{path}: not valid YAML: {exc}") from exc
    return parse_space(raw, names, str(path))


def parse_space(raw: dict, names: list[str], source: str = "<dict>") -> Space:
    if not isinstance(raw, dict):
        raise SpaceError(f"{source}: a space must be a mapping with a 'type' key")
    kind = raw.get("type")
    box_keys = {"type", "default_bounds", "bounds"}
    known_keys = {
        "simplex": {"type"},
        "box": box_keys,
        "per_block": {*box_keys, "groups", "per_group", "two_stage", "global_trials"},
    }
    if not isinstance(kind, str) or kind not in known_keys:
        raise SpaceError(f"{source}: 'type' is {kind!r}; choose simplex, box or per_block")
    unknown = set(raw) - known_keys[kind]
    if unknown:
        raise SpaceError(f"{source}: unknown key '{sorted(unknown)[0]}' for a {kind} space")
    if kind == "simplex":
        return Space("simplex", tuple(names), source=source)
    if kind == "per_block":
        return _parse_per_block(raw, names, source)
    default = _pair(raw.get("default_bounds", [0.0, 1.0]), source, "default_bounds")
    overrides = raw.get("bounds") or {}
    if not isinstance(overrides, dict):
        raise SpaceError(f"{source}: 'bounds' must map dataset names to [low, high]")
    for name in overrides:
        if name not in names:
            raise SpaceError(
                f"{source}: bounds.{name}: no dataset '{name}' in the config "
                f"(datasets: {', '.join(names)})"
            )
    bounds = tuple(_pair(overrides.get(n, default), source, f"bounds.{n}") for n in names)
    return Space("box", tuple(names), bounds, source)


def _parse_per_block(raw: dict, names: list[str], source: str) -> Space:
    groups = raw.get("groups", 4)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise SpaceError(
            f"{source}: 'groups' must be an integer >= 1 (layer groups), got {groups!r}"
        )
    per_group = raw.get("per_group", "box")
    if per_group not in ("box", "simplex"):
        raise SpaceError(f"{source}: 'per_group' is {per_group!r}; choose box or simplex")
    if per_group == "simplex" and ("bounds" in raw or "default_bounds" in raw):
        raise SpaceError(f"{source}: bounds apply to 'per_group: box' only")
    two_stage = raw.get("two_stage", False)
    if not isinstance(two_stage, bool):
        raise SpaceError(f"{source}: 'two_stage' must be true or false, got {two_stage!r}")
    global_trials = raw.get("global_trials")
    if global_trials is not None and (
        not isinstance(global_trials, int) or isinstance(global_trials, bool) or global_trials < 1
    ):
        raise SpaceError(f"{source}: 'global_trials' must be an integer >= 1 or absent")
    if global_trials is not None and not two_stage:
        raise SpaceError(f"{source}: 'global_trials' needs 'two_stage: true'")
    bounds: tuple[tuple[float, float], ...] = ()
    if per_group == "box":
        bounds = parse_space({"type": "box", **{k: raw[k] for k in ("default_bounds", "bounds")
                                                if k in raw}}, names, source).bounds  # fmt: skip
    return Space("per_block", tuple(names), bounds, source, groups, per_group, two_stage,
                 global_trials)  # fmt: skip


def _pair(value, source: str, key: str) -> tuple[float, float]:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        raise SpaceError(f"{source}: '{key}' must be [low, high], got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not lo < hi:
        raise SpaceError(f"{source}: '{key}' is empty: low {lo} must be below high {hi}")
    return lo, hi
