"""Placement keys: parsed and validated, and turned into exactly the Ray requests they name."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dem_ray.config import ConfigError, load_config
from dem_ray.ray.placement import GIB, actor_options, scaling_config, trainers_that_fit


def config_with(tmp_path: Path, **sections) -> Path:
    raw = {
        "run_dir": "runs/x",
        "base_model": "some/model",
        "datasets": {"a": "a.jsonl", "b": "b.jsonl"},
        **sections,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def error(tmp_path: Path, **sections) -> str:
    path = config_with(tmp_path, **sections)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    return str(info.value)


def test_defaults_ask_only_for_cpus(tmp_path: Path) -> None:
    config = load_config(config_with(tmp_path))
    assert config.finetune.resources == {} and config.finetune.memory_gb is None
    assert scaling_config(config.finetune)._resources_per_worker_not_none == {"CPU": 1.0}
    assert actor_options(config.evaluator) == {}


def test_finetune_request_carries_every_key(tmp_path: Path) -> None:
    finetune = {
        "num_workers": 2,
        "cpus_per_worker": 4,
        "gpus_per_worker": 1,
        "memory_gb": 24,
        "resources": {"trainer_node": 1},
        "accelerator_type": "A100",
    }
    config = load_config(config_with(tmp_path, finetune=finetune))
    scaling = scaling_config(config.finetune)
    assert scaling.num_workers == 2 and scaling.use_gpu
    assert scaling._resources_per_worker_not_none == {
        "CPU": 4.0,
        "GPU": 1.0,
        "memory": 24.0 * GIB,
        "trainer_node": 1.0,
        "accelerator_type:A100": 0.001,
    }


def test_evaluator_options_carry_every_key(tmp_path: Path) -> None:
    evaluator = {
        "gpus_per_actor": 1,
        "memory_gb": 1.5,
        "resources": {"eval_node": 0.5},
        "accelerator_type": "H100",
    }
    config = load_config(config_with(tmp_path, evaluator=evaluator))
    assert actor_options(config.evaluator) == {
        "memory": int(1.5 * GIB),
        "resources": {"eval_node": 0.5},
        "accelerator_type": "H100",
    }


def test_trainers_that_fit_counts_every_resource(tmp_path: Path) -> None:
    finetune = {"num_workers": 2, "cpus_per_worker": 1, "memory_gb": 1, "resources": {"big": 1}}
    hp = load_config(config_with(tmp_path, finetune=finetune)).finetune
    free = {"CPU": 16.0, "memory": 10.0 * GIB, "big": 5.0}
    assert trainers_that_fit(hp, free) == 2  # custom resource: 5 // 2
    assert trainers_that_fit(hp, {**free, "memory": 3.0 * GIB}) == 1  # memory: 3 // 2
    assert trainers_that_fit(hp, {**free, "big": 0.0}) == 1  # none free: one at a time
    assert trainers_that_fit(hp, {**free, "big": 0.0}, minimum=0) == 0  # what the log reports


@pytest.mark.parametrize(
    ("sections", "fragment"),
    [
        ({"finetune": {"memory_gb": 0}}, "'finetune.memory_gb' must be > 0"),
        ({"evaluator": {"memory_gb": -1}}, "'evaluator.memory_gb' must be > 0"),
        (
            {"finetune": {"resources": {"node_a": 0}}},
            "'finetune.resources.node_a' must be > 0",
        ),
        (
            {"finetune": {"resources": {"node_a": "one"}}},
            "'finetune.resources.node_a' must be float",
        ),
        (
            {"evaluator": {"resources": ["node_a"]}},
            "'evaluator.resources' must be a mapping of names to numbers",
        ),
        (
            {"finetune": {"resources": {"GPU": 1}}},
            "'GPU' is not a custom resource; set 'finetune.gpus_per_worker' instead",
        ),
        (
            {"evaluator": {"resources": {"CPU": 1}}},
            "'CPU' is not a custom resource; set 'evaluator.cpus_per_actor' instead",
        ),
        (
            {"evaluator": {"resources": {"memory": 1}}},
            "set 'evaluator.memory_gb' instead",
        ),
        (
            {"evaluator": {"resources": {"object_store_memory": 1}}},
            "Ray sizes the object store per node",
        ),
        (
            {"finetune": {"resources": {"accelerator_type:A100": 1}}},
            "set 'finetune.accelerator_type' instead",
        ),
        (
            {"finetune": {"accelerator_type": "A100"}},
            "'finetune.gpus_per_worker' is 0; an accelerator type only selects GPU nodes",
        ),
        (
            {"evaluator": {"accelerator_type": "L4", "gpus_per_actor": 0}},
            "'evaluator.gpus_per_actor' is 0",
        ),
        (
            {"finetune": {"accelerator_type": " ", "gpus_per_worker": 1}},
            "'finetune.accelerator_type' is empty",
        ),
        ({"finetune": {"memory_gbs": 4}}, "did you mean 'memory_gb'?"),
    ],
)
def test_bad_placement_keys(tmp_path: Path, sections, fragment) -> None:
    assert fragment in error(tmp_path, **sections)


def test_placement_does_not_change_the_finetune_inputs(tmp_path: Path) -> None:
    """Moving a fine-tune to other nodes gives the same model, so it must not re-run."""
    from dem_ray.config import parse_config, result_settings

    base = {"run_dir": str(tmp_path / "r"), "base_model": "m", "datasets": {"a": "a", "b": "b"}}
    placed = {
        **base,
        "finetune": {"memory_gb": 8, "resources": {"x": 1}, "gpus_per_worker": 1},
    }
    plain = result_settings(parse_config(base).finetune)
    assert result_settings(parse_config(placed).finetune) == plain
