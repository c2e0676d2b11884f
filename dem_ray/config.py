"""The run config: a YAML file, parsed into typed sections.

Every error names the file and the dotted key at fault, and unknown keys get a
"did you mean" suggestion, because a typo in a config must fail before hours of
fine-tuning start, not after.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the file and key."""


@dataclass(frozen=True)
class DatasetConfig:
    """One training distribution: the data one specialist is fine-tuned on."""

    path: str
    text_field: str = "text"
    validation_path: str | None = None
    validation_fraction: float = 0.05
    max_train_documents: int | None = None


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters shared by every per-dataset fine-tune (and the baseline)."""

    max_steps: int = 60
    batch_size: int = 8
    seq_len: int = 128
    learning_rate: float = 1.0e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    torch_threads: int | None = None
    max_concurrent: int | None = None
    log_every: int = 10
    seed: int = 0
    max_failures: int = 2
    checkpoint_every: int = 100
    # Placement: what each worker asks Ray for besides CPUs and GPUs (see dem_ray/placement.py).
    memory_gb: float | None = None
    resources: dict[str, float] = field(default_factory=dict)
    accelerator_type: str | None = None


@dataclass(frozen=True)
class SearchConfig:
    """How the coefficients are searched."""

    space: str = "simplex"
    algorithm: str = "tpe"
    num_trials: int = 24
    max_concurrent: int = 2
    seed: int = 0
    objective: str = "macro"
    grid_step: float = 0.25
    compare_grid: bool = False
    scheduler: str = "none"
    slices: int = 4
    grace_slices: int = 1
    reduction_factor: int = 3
    warm_start: int = 8


@dataclass(frozen=True)
class EvaluatorConfig:
    """The pool of actors that hold base, vectors and validation shards resident."""

    num_actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    batch_size: int = 8
    max_validation_sequences: int | None = 64
    vector_dtype: str = "float32"
    torch_threads: int | None = None
    autocast: str = "none"
    memory_gb: float | None = None
    resources: dict[str, float] = field(default_factory=dict)
    accelerator_type: str | None = None


@dataclass(frozen=True)
class BaselineConfig:
    """The data-mixing grid: one model trained per mixing ratio on the mixed data."""

    grid_step: float | None = None
    mixtures: tuple[tuple[tuple[str, float], ...], ...] = ()
    steps: int | None = None
    keep_all: bool = False

    def mixture_dicts(self) -> list[dict[str, float]]:
        return [dict(m) for m in self.mixtures]


@dataclass(frozen=True)
class CostConfig:
    """Prices that turn measured device-seconds into money, per kind of device."""

    usd_per_gpu_hour: float = 3.0
    usd_per_cpu_hour: float = 0.05


BASE_KINDS = ("gguf", "dir", "hub")


@dataclass(frozen=True)
class BaseModelSpec:
    """Where the base model comes from, and how to load it.

    `kind` is None for a plain string, whose form decides (a `.gguf` suffix, an existing
    path, else a Hub id); a mapping such as `{gguf: PATH}` names the kind outright, so a
    GGUF file without the suffix loads too. Every later step reads this one shape.
    """

    location: str
    kind: str | None = None

    def __str__(self) -> str:
        return self.location


@dataclass(frozen=True)
class RunConfig:
    """A whole DEM run; `source` is the file it came from (for error messages)."""

    run_dir: str
    base_model: BaseModelSpec
    datasets: dict[str, DatasetConfig]
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)
    baseline: BaselineConfig | None = None
    cost: CostConfig = field(default_factory=CostConfig)
    trust_remote_code: bool = False
    source: str = "<dict>"

    @property
    def dataset_names(self) -> list[str]:
        return list(self.datasets)

    def section(self, name: str) -> dict[str, Any]:
        """A section as plain data, for hashing a stage's inputs."""
        return dataclasses.asdict(getattr(self, name))


ALGORITHMS = ("tpe", "cmaes", "gp", "random", "grid")
OBJECTIVES = ("macro", "token_weighted")
SCHEDULERS = ("none", "asha")
AUTOCAST = ("none", "bfloat16", "float16")
VECTOR_DTYPES = ("float32", "bfloat16", "float16")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats such as 1e-4 (YAML 1.1 wants 1.0e-4)."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    """A YAML mapping; a key given twice is an error (plain YAML keeps the last silently)."""
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise ConfigError(
                f"line {key_node.start_mark.line + 1}: key {key!r} appears twice in one mapping "
                f"(first on line {seen[key]}); give each dataset and setting a unique name"
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a run config YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return parse_config(raw, source=str(path))


def parse_config(raw: Any, source: str = "<dict>") -> RunConfig:
    """Validate a config given as plain data (as read from YAML)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a mapping of keys, got {_kind(raw)}")
    sections = {
        "finetune": FinetuneConfig,
        "search": SearchConfig,
        "evaluator": EvaluatorConfig,
        "cost": CostConfig,
    }
    top_keys = ["run_dir", "base_model", "datasets", *sections, "baseline", "trust_remote_code"]
    _check_keys(raw, top_keys, source, prefix="")
    for key in ("run_dir", "base_model", "datasets"):
        if raw.get(key) in (None, "", {}):
            raise ConfigError(f"{source}: missing required key '{key}'")
    run_dir = _typed(raw["run_dir"], str, source, "run_dir")
    base_model = _parse_base_model(raw["base_model"], source)
    trust = _typed(raw.get("trust_remote_code", False), bool, source, "trust_remote_code")

    if not isinstance(raw["datasets"], dict):
        raise ConfigError(f"{source}: 'datasets' must map names to dataset settings")
    datasets = {}
    for name, spec in raw["datasets"].items():
        key = f"datasets.{name}"
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ConfigError(
                f"{source}: dataset name {name!r} must be letters, digits, '_', '-' or '.'"
            )
        if isinstance(spec, str):
            spec = {"path": spec}
        datasets[name] = _build(DatasetConfig, spec, source, key)
    if len(datasets) < 2:
        raise ConfigError(f"{source}: 'datasets' needs at least two datasets to mix")

    built = {
        name: _build(cls, {} if raw.get(name) is None else raw[name], source, name)
        for name, cls in sections.items()
    }
    baseline = None
    if raw.get("baseline") is not None:
        baseline = _parse_baseline(raw["baseline"], list(datasets), source)
    config = RunConfig(
        run_dir=run_dir,
        base_model=base_model,
        datasets=datasets,
        baseline=baseline,
        trust_remote_code=trust,
        source=source,
        **built,
    )
    _check_ranges(config)
    return config


def _parse_base_model(raw: Any, source: str) -> BaseModelSpec:
    """A string (kind from its form) or a mapping with exactly one of gguf, dir, hub."""
    if isinstance(raw, str):
        return BaseModelSpec(raw)
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: 'base_model' must be a string or a mapping with one of "
            f"{', '.join(BASE_KINDS)} (e.g. {{gguf: model.gguf}}), got {_kind(raw)} {raw!r}"
        )
    _check_keys(raw, list(BASE_KINDS), source, "base_model")
    if len(raw) != 1:
        raise ConfigError(
            f"{source}: 'base_model' has {', '.join(map(str, raw))}; give exactly one of "
            f"{', '.join(BASE_KINDS)}, which says how to load it"
        )
    [(kind, value)] = raw.items()
    location = _typed(value, str, source, f"base_model.{kind}")
    if not location.strip():
        raise ConfigError(f"{source}: 'base_model.{kind}' is empty; give a path or a Hub id")
    return BaseModelSpec(location, kind)


def _parse_baseline(raw: Any, names: list[str], source: str) -> BaselineConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: 'baseline' must be a mapping, got {_kind(raw)}")
    _check_keys(raw, ["grid_step", "mixtures", "steps", "keep_all"], source, "baseline")
    mixtures = raw.get("mixtures")
    grid_step = raw.get("grid_step")
    if (mixtures is None) == (grid_step is None):
        raise ConfigError(f"{source}: 'baseline' needs exactly one of grid_step or mixtures")
    parsed: list[tuple[tuple[str, float], ...]] = []
    if mixtures is not None:
        if not isinstance(mixtures, list) or not mixtures:
            raise ConfigError(f"{source}: 'baseline.mixtures' must be a non-empty list")
        for i, mix in enumerate(mixtures):
            key = f"baseline.mixtures[{i}]"
            if not isinstance(mix, dict):
                raise ConfigError(f"{source}: '{key}' must map dataset names to ratios")
            for name, ratio in mix.items():
                if name not in names:
                    raise ConfigError(
                        f"{source}: '{key}.{name}': no dataset '{name}' in the config "
                        f"(datasets: {', '.join(names)})"
                    )
                value = _typed(ratio, float, source, f"{key}.{name}")
                if value < 0:
                    raise ConfigError(f"{source}: '{key}.{name}' must be >= 0, got {value}")
            total = sum(float(v) for v in mix.values())
            if total <= 0:
                raise ConfigError(f"{source}: '{key}' has no positive ratio")
            parsed.append(tuple((n, float(mix.get(n, 0.0)) / total) for n in names))
    else:
        grid_step = _typed(grid_step, float, source, "baseline.grid_step")
        n = round(1.0 / grid_step) if grid_step > 0 else 0
        if not 0 < grid_step <= 1 or abs(n * grid_step - 1.0) > 1e-5:
            raise ConfigError(
                f"{source}: 'baseline.grid_step' must divide 1 (e.g. 0.5, 0.25, 0.2), "
                f"got {grid_step}"
            )
    steps = _typed(raw.get("steps"), int | None, source, "baseline.steps")
    if steps is not None and steps < 1:
        raise ConfigError(f"{source}: 'baseline.steps' must be >= 1, got {steps}")
    keep_all = _typed(raw.get("keep_all", False), bool, source, "baseline.keep_all")
    return BaselineConfig(grid_step, tuple(parsed), steps, keep_all)


def _check_ranges(c: RunConfig) -> None:
    s = c.source
    for name, d in c.datasets.items():
        if not 0.0 < d.validation_fraction < 1.0:
            raise ConfigError(f"{s}: datasets.{name}.validation_fraction must be in (0, 1)")
        if d.max_train_documents is not None and d.max_train_documents < 1:
            raise ConfigError(f"{s}: datasets.{name}.max_train_documents must be >= 1")
    f = c.finetune
    for key in ("max_steps", "batch_size", "num_workers", "log_every", "checkpoint_every"):
        _positive(getattr(f, key), s, f"finetune.{key}")
    if f.seq_len < 2:
        raise ConfigError(f"{s}: finetune.seq_len must be >= 2 (one token predicts the next)")
    _positive(f.learning_rate, s, "finetune.learning_rate")
    _positive(f.cpus_per_worker, s, "finetune.cpus_per_worker")
    _non_negative(f.gpus_per_worker, s, "finetune.gpus_per_worker")
    _non_negative(f.warmup_steps, s, "finetune.warmup_steps")
    _non_negative(f.weight_decay, s, "finetune.weight_decay")
    _non_negative(f.max_failures, s, "finetune.max_failures")
    if f.torch_threads is not None:
        _positive(f.torch_threads, s, "finetune.torch_threads")
    if f.max_concurrent is not None:
        _positive(f.max_concurrent, s, "finetune.max_concurrent")
    _check_placement(f.memory_gb, f.resources, f.accelerator_type, f.gpus_per_worker, s,
                     "finetune", "gpus_per_worker")  # fmt: skip
    r = c.search
    _choice(r.algorithm, ALGORITHMS, s, "search.algorithm")
    _choice(r.objective, OBJECTIVES, s, "search.objective")
    _positive(r.num_trials, s, "search.num_trials")
    _positive(r.max_concurrent, s, "search.max_concurrent")
    if not 0.0 < r.grid_step <= 1.0:
        raise ConfigError(f"{s}: search.grid_step must be in (0, 1]")
    _non_negative(r.warm_start, s, "search.warm_start")
    _choice(r.scheduler, SCHEDULERS, s, "search.scheduler")
    _positive(r.slices, s, "search.slices")
    _positive(r.grace_slices, s, "search.grace_slices")
    if r.scheduler == "asha":
        if r.slices < 2:
            raise ConfigError(
                f"{s}: search.slices must be >= 2 with search.scheduler: asha (a trial "
                f"reports after each validation slice), got {r.slices}"
            )
        if r.grace_slices >= r.slices:
            raise ConfigError(
                f"{s}: search.grace_slices ({r.grace_slices}) must be below search.slices "
                f"({r.slices}), or no trial can be stopped early"
            )
        if r.reduction_factor < 2:
            raise ConfigError(f"{s}: search.reduction_factor must be >= 2")
    _non_negative(c.cost.usd_per_gpu_hour, s, "cost.usd_per_gpu_hour")
    _non_negative(c.cost.usd_per_cpu_hour, s, "cost.usd_per_cpu_hour")
    e = c.evaluator
    _positive(e.num_actors, s, "evaluator.num_actors")
    _positive(e.batch_size, s, "evaluator.batch_size")
    _positive(e.cpus_per_actor, s, "evaluator.cpus_per_actor")
    _non_negative(e.gpus_per_actor, s, "evaluator.gpus_per_actor")
    if e.max_validation_sequences is not None:
        _positive(e.max_validation_sequences, s, "evaluator.max_validation_sequences")
    _choice(e.vector_dtype, VECTOR_DTYPES, s, "evaluator.vector_dtype")
    _choice(e.autocast, AUTOCAST, s, "evaluator.autocast")
    if e.torch_threads is not None:
        _positive(e.torch_threads, s, "evaluator.torch_threads")
    _check_placement(e.memory_gb, e.resources, e.accelerator_type, e.gpus_per_actor, s,
                     "evaluator", "gpus_per_actor")  # fmt: skip


def _check_placement(
    memory_gb: float | None,
    resources: dict[str, float],
    accelerator_type: str | None,
    gpus: float,
    s: str,
    section: str,
    gpu_key: str,
) -> None:
    """What a worker asks Ray for must be schedulable, or the autoscaler waits forever."""
    if memory_gb is not None:
        _positive(memory_gb, s, f"{section}.memory_gb")
    dedicated = {
        "cpu": f"{section}.{gpu_key.replace('gpus', 'cpus')}",
        "gpu": f"{section}.{gpu_key}",
        "memory": f"{section}.memory_gb",
        "accelerator_type": f"{section}.accelerator_type",
    }
    for name, amount in resources.items():
        key = f"{section}.resources.{name}"
        kind = name.lower().partition(":")[0]
        if kind in dedicated:
            raise ConfigError(
                f"{s}: '{key}': '{name}' is not a custom resource; set '{dedicated[kind]}' instead"
            )
        if kind == "object_store_memory":
            raise ConfigError(
                f"{s}: '{key}': Ray sizes the object store per node, not per task; remove it"
            )
        _positive(amount, s, key)
    if accelerator_type is not None:
        if not accelerator_type.strip():
            raise ConfigError(f"{s}: '{section}.accelerator_type' is empty; remove it or name "
                              "one (e.g. A100, H100, L4)")  # fmt: skip
        if gpus <= 0:
            raise ConfigError(
                f"{s}: '{section}.accelerator_type' is {accelerator_type!r} but "
                f"'{section}.{gpu_key}' is 0; an accelerator type only selects GPU nodes, so "
                f"set {section}.{gpu_key} > 0 (or remove accelerator_type)"
            )


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{prefix}' must be a mapping, got {_kind(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_keys(raw, list(fields), source, prefix)
    hints = get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        values[key] = _typed(value, hints[key], source, f"{prefix}.{key}")
    missing = [
        n
        for n, f in fields.items()
        if n not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{source}: missing required key '{prefix}.{missing[0]}'")
    return cls(**values)


def _typed(value: Any, hint: Any, source: str, key: str) -> Any:
    """Check one value against a simple type hint (int, float, str, bool, X | None, dict)."""
    if get_origin(hint) is dict:
        return _typed_mapping(value, hint, source, key)
    options = get_args(hint) if get_origin(hint) is not None else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
    wanted = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{source}: '{key}' must be {wanted}, got {_kind(value)} {value!r}")


def _typed_mapping(value: Any, hint: Any, source: str, key: str) -> dict:
    """A {name: value} mapping, e.g. custom resources {"node_a": 1}."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(
            f"{source}: '{key}' must be a mapping of names to numbers, e.g. {{my_resource: 1}}, "
            f"got {_kind(value)} {value!r}"
        )
    key_hint, value_hint = get_args(hint)
    out = {}
    for name, item in value.items():
        if not isinstance(name, key_hint) or not name:
            raise ConfigError(f"{source}: '{key}' has a key {name!r} that is not a name")
        out[name] = _typed(item, value_hint, source, f"{key}.{name}")
    return out


def _check_keys(raw: dict, known: list[str], source: str, prefix: str) -> None:
    for key in raw:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"{source}: unknown key '{where}'{hint}")


def _positive(value: float, source: str, key: str) -> None:
    if value <= 0:
        raise ConfigError(f"{source}: '{key}' must be > 0, got {value}")


def _non_negative(value: float, source: str, key: str) -> None:
    if value < 0:
        raise ConfigError(f"{source}: '{key}' must be >= 0, got {value}")


def _choice(value: str, options: tuple[str, ...], source: str, key: str) -> None:
    if value not in options:
        raise ConfigError(f"{source}: '{key}' is {value!r}; choose one of {', '.join(options)}")


def _kind(value: Any) -> str:
    return type(value).__name__
