"""Search spaces over the mixing coefficients, read from `search_spaces/*.yaml`.

A space turns a searcher's free parameters into weights (one per dataset), turns
weights back into parameters (to seed a study), and enumerates its grid.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"


class SpaceError(ValueError):
    """A search space file that cannot be used; the message names the file and key."""


@dataclass(frozen=True)
class Space:
    kind: str
    names: tuple[str, ...]
    bounds: tuple[tuple[float, float], ...] = ()
    source: str = ""

    # -- parameters a searcher sees ------------------------------------------------
    @property
    def param_names(self) -> list[str]:
        if self.kind == "simplex":
            return [f"stick_{name}" for name in self.names[:-1]]
        return [f"w_{name}" for name in self.names]

    def param_bounds(self) -> list[tuple[float, float]]:
        if self.kind == "simplex":
            return [(0.0, 1.0)] * (len(self.names) - 1)
        return list(self.bounds)

    def to_weights(self, params: dict[str, float]) -> dict[str, float]:
        """Searcher parameters -> {dataset: weight}."""
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
        """{dataset: weight} -> searcher parameters (the inverse of to_weights)."""
        self.check(weights)
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
        if set(weights) != set(self.names):
            raise SpaceError(
                f"weights name {sorted(weights)} but the space has datasets {list(self.names)}"
            )
        for name, w in weights.items():
            if not math.isfinite(w):
                raise SpaceError(f"weight for '{name}' is {w}")
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

    def grid(self, step: float) -> list[dict[str, float]]:
        """Every point of the space's grid at `step` (the plain coefficient grid baseline)."""
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
    known_keys = {"simplex": {"type"}, "box": {"type", "default_bounds", "bounds"}}
    if not isinstance(kind, str) or kind not in known_keys:
        raise SpaceError(f"{source}: 'type' is {kind!r}; choose simplex or box")
    unknown = set(raw) - known_keys[kind]
    if unknown:
        raise SpaceError(f"{source}: unknown key '{sorted(unknown)[0]}' for a {kind} space")
    if kind == "simplex":
        return Space("simplex", tuple(names), source=source)
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
