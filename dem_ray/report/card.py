"""The model card (`README.md`) in `merged/` and in `baseline/best/`.

Hub front matter, then the method, the weights, every model's perplexity as the report
measured it, and how the model was made. Rendering is pure (the report's data in,
Markdown out) so a card can never say other numbers than report.json. The report stage
writes the cards and records them as its own outputs: the merge and the baseline record
only their model files, so a card written later leaves their steps up to date.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from dem_ray import __version__
from dem_ray.report.render import (
    downstream_line,
    downstream_table,
    markdown_table,
    ppl_table,
    tokens_note,
)

CARD_NAME = "README.md"
DEM_TAGS = ("merge", "dem", "dem-ray")
BASELINE_TAGS = ("dem-ray", "data-mixing")  # a fine-tune on mixed data, not a merge
MODELS = ("dem", "baseline/best")  # the report's labels of the models that get a card
LEGEND = (
    "`base`: the base model; `finetuned/NAME`: the specialist fine-tuned on NAME alone; "
    "`dem`: the merged model; `baseline/best`: the best data mixture (one fine-tune on "
    "all the datasets mixed)."
)


def model_files(model_dir: Path) -> list[Path]:
    """A model directory's files less its card: what the stage that wrote the model records
    (the card is the report's, rewritten after the model was recorded)."""
    from dem_ray.run.storage import files_under

    return [p for p in files_under(model_dir) if p != Path(model_dir) / CARD_NAME]


def made_by(argv: Sequence[str], command: str, config: str, args: Sequence[str] = ()) -> dict:
    """What a stage records beside a model: the dem-ray command line running now, or
    (dem-ray driven from Python: a notebook, the tests) the command that does the same."""
    program = argv[0] if argv else ""
    if Path(program).name == "dem-ray" or program.endswith("dem_ray/cli.py"):
        line: str | None = shlex.join(["dem-ray", *argv[1:]])
    elif config == "<dict>":  # a config given as data: no file a command could name
        line = None
    else:
        line = shlex.join(["dem-ray", command, config, *args])
    return {"command": line, "dem_ray_version": __version__}


def hub_model_id(location: str, kind: str) -> str | None:
    """The base model's Hub id, where one is known: a `hub` base, or a directory in the
    HF cache (`models--ORG--NAME/snapshots/REV`). The Hub refuses a card whose
    `base_model` is anything else (a local path), so an unknown base has none."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if kind == "hub":
        found = location
    else:
        path = Path(location).expanduser()
        repo = path.parent.parent.name
        if kind != "dir" or path.parent.name != "snapshots" or not repo.startswith("models--"):
            return None
        found = repo[len("models--") :].replace("--", "/")
    try:
        validate_repo_id(found)
    except HFValidationError:
        return None
    return found


def render_card(
    report: dict,
    model: str,
    made: dict | None,
    base_model: str | None,
    datasets: Sequence[str] = (),
) -> str:
    """The card of `model` (`dem` or `baseline/best`) from report.json's data.

    `made`: what the stage that wrote the model recorded (`made_by`; None for a model an
    earlier dem-ray wrote). `base_model`: the base's Hub id or None (`hub_model_id`).
    `datasets`: the Hub ids of the datasets that came from the Hub.
    """
    if model not in MODELS:
        raise ValueError(f"no model card for '{model}'; cards are for {', '.join(MODELS)}")
    if model == "baseline/best" and "baseline" not in report:
        raise ValueError("the report has no baseline: there is no baseline/best to describe")
    body = _body(report, model, made, base_model or Path(report["base_model"]).name)
    return f"---\n{front_matter(model, base_model, datasets)}\n---\n\n{body}"


def front_matter(model: str, base_model: str | None, datasets: Sequence[str] = ()) -> str:
    """The Hub metadata (YAML, without the `---` lines): the lineage only with a base id."""
    from huggingface_hub import ModelCardData

    relation = "merge" if model == "dem" else "finetune"
    data = ModelCardData(
        base_model=base_model,
        base_model_relation=relation if base_model else None,
        tags=list(DEM_TAGS if model == "dem" else BASELINE_TAGS),
        datasets=list(datasets) or None,
        library_name="transformers",
    )
    order = ["base_model", "base_model_relation", "library_name", "tags", "datasets"]
    return data.to_yaml(original_order=order)


def _body(report: dict, model: str, made: dict | None, base_name: str) -> str:
    names = report["datasets"]
    dem = model == "dem"
    title = "DEM merge" if dem else "Best data mixture"
    parts = [
        f"# {title} of {base_name} on {', '.join(names)}",
        "",
        *(_dem_lines(report) if dem else _baseline_lines(report)),
        "",
        f"Base model: `{report['base_model']}` ({report['parameters']:,} parameters). "
        f"This model is the `{model}` row of the tables below.",
        "",
    ]
    for split, heading in (("validation", "Validation perplexity"), ("test", "Test perplexity")):
        parts += [f"## {heading}", "", markdown_table(_rows(ppl_table(report, split))), ""]
    parts += [" ".join(filter(None, [LEGEND, tokens_note(report)])), ""]
    rows = _rows(downstream_table(report)) if report.get("downstream") else []
    if len(rows) > 1:
        parts += ["## Downstream tasks", "", downstream_line(report), "", markdown_table(rows), ""]
    parts += ["## How it was made", "", _made_line(made), "",
              f"The whole report: `{report['run_dir']}/report/report.md`.", ""]  # fmt: skip
    return "\n".join(parts)


def _dem_lines(report: dict) -> list[str]:
    m = report["merge_method"]
    method = m["method"] if m["method"] == "linear" else f"{m['method']} (density {m['density']:g})"
    weights = ", ".join(f"{k} = {v:.4f}" for k, v in report["dem_weights"].items())
    chosen = {
        "search": f"the {report['algorithm']} search's best of {report['num_trials']} trials "
        f"by validation {report['objective']['name']} log-perplexity",
        "rerank": "the downstream rerank, among the search's best candidates",
        "given": "given with `dem-ray merge --weights`",
    }[report.get("weights_source", "search")]
    sums = ", ".join(f"{g} {v:.3f}" for g, v in report["weights_sum"].items())
    return [
        "A Distribution-Edited Model made by dem-ray: the base model theta_0 was fine-tuned "
        "once per dataset, each distribution vector v_i = theta_i - theta_0 taken, and the "
        "model is theta_0 + sum_i w_i v_i.",
        "",
        f"- Merge method: {method}",
        f"- Space of the weights: {report['space']}",
        f"- Weights: {weights} ({chosen}); their sum: {sums}",
    ]


def _baseline_lines(report: dict) -> list[str]:
    b = report["baseline"]
    best = b["best"]
    ratios = ", ".join(f"{k} = {v:.4f}" for k, v in best["weights"].items())
    return [
        "The data-mixing baseline of a dem-ray run: one fine-tune of the base model on "
        "batches drawn from the datasets in fixed ratios. This is the best of the "
        f"{len(b['mixtures'])} mixtures by validation {report['objective']['name']} "
        "log-perplexity.",
        "",
        f"- Mixture: `{best['id']}` ({ratios})",
        f"- Steps: {b['steps_per_mixture']}",
        f"- Objective: {best['objective']:.4f} on validation, {best['test_objective']:.4f} on test",
    ]


def _rows(table: list[list[str]]) -> list[list[str]]:
    """A report table with only the models a card compares: base, specialists, DEM and
    the best mixture (not every mixture of the grid)."""
    keep = [r for r in table[1:] if r[0] in ("base", *MODELS) or r[0].startswith("finetuned/")]
    return [table[0], *keep]


def _made_line(made: dict | None) -> str:
    if not made:
        return (
            f"Made by an earlier dem-ray, which did not record its command; this card was "
            f"written by dem-ray {__version__}."
        )
    how = f"`{made['command']}`" if made.get("command") else "dem-ray's Python API"
    return f"Made by {how} with dem-ray {made['dem_ray_version']}."
