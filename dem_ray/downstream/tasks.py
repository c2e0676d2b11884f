"""The config's downstream tasks, resolved against lm-eval's task index before any work.

A task is an lm-eval name (a task, group or tag) or a local task YAML file; local files
are found through a `TaskManager` whose include path holds their directories. Every data
file a task reads is checked here: a local file that is not there, or a Hub dataset on a
machine that cannot reach the Hub, is an error now, not an hour into the run.
"""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dem_ray.config import ConfigError
from dem_ray.core.hashing import hash_json, sha256_file

# Builders of `datasets` that read local files named in `dataset_kwargs.data_files`.
FILE_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas"})
HUB_PROBE_TIMEOUT_S = 5.0


class TaskError(ConfigError):
    """A downstream task that cannot be run; the message says which and what to do."""


@dataclass(frozen=True)
class TaskSet:
    """The tasks as lm-eval knows them, and what their scores depend on."""

    names: tuple[str, ...]  # lm-eval task (or group) names, in the config's order
    include_path: tuple[str, ...]  # directories of the local task files
    digests: dict[str, str]  # per name: its YAML and data files (a hub task: its YAML)
    lm_eval_version: str
    metrics: dict[str, tuple[str, ...]]  # per name: the metrics its config reports
    leaves: dict[str, tuple[str, ...]]  # per name: the tasks it stands for (a tag's, a group's)

    @property
    def inputs(self) -> dict[str, Any]:
        """What a downstream score depends on besides the model."""
        return {"tasks": self.digests, "lm_eval": self.lm_eval_version}

    def check_metric(self, metric: str, key: str = "downstream.rerank_metric") -> None:
        """Every task reports `metric`, or rerank could not rank by it."""
        for name, known in self.metrics.items():
            if known and metric not in known:
                raise TaskError(f"'{key}' is '{metric}', but task '{name}' reports "
                                f"{', '.join(known)}; choose one of those")  # fmt: skip


def lm_eval_module():
    """lm_eval, or an error that says how to install it."""
    try:
        import lm_eval
    except ImportError as exc:
        raise TaskError(
            "the 'downstream' section needs lm-evaluation-harness: pip install "
            "'dem-ray[downstream]' (or pip install lm-eval==0.4.13)"
        ) from exc
    return lm_eval


@functools.lru_cache(maxsize=4)
def task_manager(include_path: tuple[str, ...] = ()):
    """lm-eval's task index with the local task directories (building it takes seconds)."""
    lm_eval_module()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None)


def is_task_file(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml"))


def resolve_tasks(specs: tuple[str, ...], config_dir: Path, source: str = "") -> TaskSet:
    """The config's `downstream.tasks` as a `TaskSet`; a `TaskError` for a task that is not
    found or whose data cannot be read from here."""
    lm_eval = lm_eval_module()
    where = f"{source}: " if source else ""
    files: dict[str, Path] = {}
    for spec in specs:
        if is_task_file(spec):
            path = Path(spec).expanduser()
            path = path if path.is_absolute() or path.exists() else config_dir / path
            if not path.is_file():
                raise TaskError(f"{where}downstream task file {spec} not found (looked for "
                                f"{path}); give a task YAML that exists")  # fmt: skip
            files[spec] = path.resolve()
    include = tuple(sorted({str(p.parent) for p in files.values()}))
    manager = task_manager(include)
    by_file = {e.yaml_path.resolve(): name for name, e in manager.task_index.items()
               if e.yaml_path is not None and e.kind.name in ("TASK", "GROUP")}  # fmt: skip
    names, digests, metrics, leaf_names = [], {}, {}, {}
    for spec in specs:
        if spec in files:
            name = by_file.get(files[spec])
            if name is None:
                raise TaskError(f"{where}downstream task file {files[spec]}: lm-eval found no "
                                "task in it (it needs a `task:` or `group:` key and must parse "
                                "as an lm-eval task config)")  # fmt: skip
        else:
            name = spec
            if name not in manager.task_index:
                raise TaskError(f"{where}downstream task '{spec}' is not an lm-eval task, group "
                                f"or tag{_close(spec, manager)}; name a task lm-eval knows "
                                "(`lm-eval ls tasks`) or a local task YAML file")  # fmt: skip
        leaves = _leaf_entries(manager, name)
        for entry in leaves:
            _check_data(entry, name, where)
        digests[name] = hash_json([_entry_digest(e) for e in leaves])
        metrics[name] = _metrics(manager.task_index[name])
        leaf_names[name] = tuple(e.name for e in leaves)
        names.append(name)
    if len(set(names)) != len(names):
        raise TaskError(f"{where}downstream.tasks names the same lm-eval task twice: {names}")
    return TaskSet(tuple(names), include, digests, lm_eval.__version__, metrics, leaf_names)


# lm-eval's metrics for a task config without a metric_list, by output type.
DEFAULT_METRICS = {
    "multiple_choice": ("acc", "acc_norm"),
    "loglikelihood": ("perplexity", "acc"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    "generate_until": ("exact_match",),
}


def _metrics(entry) -> tuple[str, ...]:
    """The metrics a task (or a group's aggregate) reports; () where the config cannot say."""
    cfg = entry.cfg or {}
    if entry.kind.name == "GROUP":
        listed = cfg.get("aggregate_metric_list") or []
        return tuple(m["metric"] for m in listed if isinstance(m, dict) and "metric" in m)
    if entry.kind.name != "TASK":
        return ()  # a tag (each task reports its own) or a Python task
    listed = cfg.get("metric_list")
    if listed:
        return tuple(m["metric"] for m in listed if isinstance(m, dict) and "metric" in m)
    return DEFAULT_METRICS.get(cfg.get("output_type", ""), ())


def _close(spec: str, manager) -> str:
    import difflib

    close = difflib.get_close_matches(spec, manager.all_tasks, n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _leaf_entries(manager, name: str, seen: frozenset = frozenset()) -> list:
    """The tasks a name stands for: itself, a group's members, or a tag's tasks."""
    entry = manager.task_index[name]
    kind = entry.kind.name
    if name in seen:
        return []
    if kind in ("TASK", "PY_TASK"):
        return [entry]
    if kind == "TAG":
        members = [n for n, e in manager.task_index.items() if name in e.tags]
    else:  # a group: its `task` list holds names or inline task configs
        members = []
        for item in (entry.cfg or {}).get("task", []):
            if isinstance(item, str) and item in manager.task_index:
                members.append(item)
            elif isinstance(item, dict) and item.get("task") in manager.task_index:
                members.append(item["task"])
    leaves = []
    for member in members:
        leaves += _leaf_entries(manager, member, seen | {name})
    return leaves


def _entry_digest(entry) -> list:
    files = [entry.yaml_path] if entry.yaml_path is not None else []
    files += [p for p in _data_files(entry.cfg or {}) if p.is_file()]
    return [entry.name, [sha256_file(p) for p in files]]


def _data_files(cfg: dict) -> list[Path]:
    """The local files a file-builder task reads (`dataset_kwargs.data_files`)."""
    if cfg.get("dataset_path") not in FILE_BUILDERS:
        return []
    found = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(found, dict):
        found = list(found.values())
    if isinstance(found, str):
        found = [found]
    paths = []
    for item in found or []:
        paths += [Path(p) for p in (item if isinstance(item, list | tuple) else [item])]
    return paths


def _check_data(entry, name: str, where: str) -> None:
    cfg = entry.cfg or {}
    what = f"downstream task '{name}'" + (f" (its subtask '{entry.name}')" if entry.name != name
                                          else "")  # fmt: skip
    source = f" in {entry.yaml_path}" if entry.yaml_path else ""
    dataset = cfg.get("dataset_path")
    if dataset in FILE_BUILDERS:
        files = _data_files(cfg)
        if not files:
            raise TaskError(f"{where}{what}{source}: dataset_path '{dataset}' needs "
                            "dataset_kwargs.data_files naming the files to read")  # fmt: skip
        for path in files:
            if "://" not in str(path) and not path.is_file():
                raise TaskError(f"{where}{what}{source}: data file {path} not found (relative "
                                f"paths are read from the directory dem-ray runs in, "
                                f"{Path.cwd()}); fix dataset_kwargs.data_files")  # fmt: skip
        return
    if dataset is None or Path(str(dataset)).expanduser().exists():
        return  # a Python task's own loading, or a local dataset directory
    if _hub_dataset_cached(str(dataset)):
        return
    reason = _hub_unreachable()
    if reason:
        raise TaskError(f"{where}{what}{source} reads the dataset '{dataset}' from the Hugging "
                        f"Face Hub, which cannot be reached from here ({reason}), and it is not "
                        "in the local datasets cache: run once on a machine with the network "
                        "(or copy its cache), or use a local task file whose dataset_path: json "
                        "points at local data")  # fmt: skip


def _hub_dataset_cached(dataset: str) -> bool:
    try:
        from datasets import config as ds_config
        from huggingface_hub import constants
    except ImportError:
        return False
    flat = dataset.replace("/", "___")
    hub = "datasets--" + dataset.replace("/", "--")
    return (Path(ds_config.HF_DATASETS_CACHE) / flat).exists() or (
        Path(constants.HF_HUB_CACHE) / hub
    ).exists()


@functools.lru_cache(maxsize=1)
def _hub_unreachable() -> str:
    """Why the Hub cannot be reached ('' when it can)."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        request = urllib.request.Request(f"{endpoint}/api/datasets?limit=1", method="HEAD")
        urllib.request.urlopen(request, timeout=HUB_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return ""  # the Hub answered
    except (urllib.error.URLError, OSError) as exc:
        return f"{endpoint}: {getattr(exc, 'reason', exc)}"
    return ""
