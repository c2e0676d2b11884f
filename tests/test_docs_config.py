"""The README's config table is generated from the config models, so it cannot drift."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from dem_ray.config import (
    README_END,
    README_START,
    BaselineConfig,
    ClusterConfig,
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
    config_table_markdown,
    main,
    readme_with_config_table,
)

README = Path(__file__).resolve().parent.parent / "README.md"
REGENERATE = ".venv/bin/python -m dem_ray.config --write-readme README.md"
MODELS: list[type[BaseModel]] = [
    RunConfig,
    DatasetConfig,
    FinetuneConfig,
    SearchConfig,
    EvaluatorConfig,
    MergeConfig,
    BaselineConfig,
    DownstreamConfig,
    CostConfig,
    PrepareConfig,
    TrackingConfig,
    MlflowConfig,
    WandbConfig,
]


def table_rows() -> dict[str, list[str]]:
    """The generated table as {key: [default, meaning]}."""
    rows = {}
    for line in config_table_markdown().splitlines()[2:]:
        key, default, meaning = (cell.strip() for cell in line.split("|")[1:-1])
        rows[key] = [default, meaning]
    return rows


def test_readme_config_table_is_generated_from_the_models() -> None:
    text = README.read_text()
    assert README_START in text and README_END in text, "README.md lacks the table markers"
    region = text[text.index(README_START) + len(README_START) : text.index(README_END)]
    assert region.strip() == config_table_markdown().strip(), (
        f"README.md's config table differs from dem_ray/config.py; run `{REGENERATE}`"
    )
    assert readme_with_config_table(text) == text, f"run `{REGENERATE}`"


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_key_is_documented(model) -> None:
    for name, info in model.model_fields.items():
        nested = name in {
            "datasets",
            "finetune",
            "search",
            "evaluator",
            "merge",
            "baseline",
            "downstream",
            "prepare",
            "cost",
            "tracking",
            "cluster",
        }
        if model is RunConfig and (nested or info.exclude):
            continue
        assert info.description, f"{model.__name__}.{name} has no description="


def test_table_lists_every_key_once_in_field_order() -> None:
    keys = list(table_rows())
    expected = ["`run_dir`", "`base_model`", "`base_model.gguf` / `.dir` / `.hub`"]
    expected.append("`trust_remote_code`")
    expected += [f"`datasets.<name>.{k}`" for k in DatasetConfig.model_fields]
    for prefix, model in [
        ("finetune", FinetuneConfig),
        ("search", SearchConfig),
        ("evaluator", EvaluatorConfig),
        ("merge", MergeConfig),
        ("baseline", BaselineConfig),
        ("downstream", DownstreamConfig),
        ("prepare", PrepareConfig),
        ("cost", CostConfig),
    ]:
        for k in model.model_fields:
            if model is FinetuneConfig and k == "lora":  # a nested section: its keys
                expected += [f"`finetune.lora.{n}`" for n in LoraSettings.model_fields]
            else:
                expected.append(f"`{prefix}.{k}`")
    for tracker, model in [("mlflow", MlflowConfig), ("wandb", WandbConfig)]:
        expected += [f"`tracking.{tracker}.{k}`" for k in model.model_fields]
    expected += [f"`cluster.{k}`" for k in ClusterConfig.model_fields]
    assert keys == expected
    assert "`source`" not in keys  # not a key of the file


@pytest.mark.parametrize(
    ("key", "default"),
    [
        ("`run_dir`", "required"),
        ("`datasets.<name>.path`", "`path` or `hub`"),
        ("`datasets.<name>.validation_path`", "none"),
        ("`datasets.<name>.validation_fraction`", "`0.05`"),
        ("`trust_remote_code`", "`false`"),
        ("`finetune.max_steps`", "`60`"),
        ("`finetune.learning_rate`", "`1e-4`"),
        ("`finetune.gpus_per_worker`", "`0.0`"),
        ("`finetune.resources`", "`{}`"),
        ("`finetune.max_concurrent`", "all"),
        ("`search.algorithm`", "`tpe`"),
        ("`search.scheduler`", "`none`"),
        ("`baseline.grid_step`", "one of the two"),
        ("`baseline.mixtures`", "one of the two"),
        ("`baseline.steps`", "DEM's total"),
        ("`cost.usd_per_gpu_hour`", "`3.0`"),
    ],
)
def test_defaults_are_shown_as_before(key, default) -> None:
    assert table_rows()[key][0] == default


def test_roles_are_noted_in_the_meaning() -> None:
    rows = table_rows()
    assert rows["`finetune.cpus_per_worker`"][1].endswith("(never re-runs a stage)")
    assert rows["`evaluator.batch_size`"][1].endswith("(never re-runs a stage)")
    assert rows["`search.num_trials`"][1].endswith("(raising it extends the search)")
    assert rows["`search.compare_grid`"][1].endswith("extends the search)")
    assert "re-runs" not in rows["`finetune.max_steps`"][1]


def test_write_readme_rewrites_only_the_region(tmp_path: Path, capsys) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n{README_START}\n| stale |\n{README_END}\nafter\n")
    assert main(["--write-readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(f"# Title\n\nbefore\n{README_START}\n| key | default | meaning |\n")
    assert text.endswith(f"{config_table_markdown()}{README_END}\nafter\n")
    assert "updated" in capsys.readouterr().out
    assert main(["--write-readme", str(readme)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert readme.read_text() == text


def test_write_readme_needs_the_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# no table here\n")
    with pytest.raises(ValueError, match="config-table:start"):
        main(["--write-readme", str(readme)])
