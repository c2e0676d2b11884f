"""The run config: a YAML file, validated into frozen pydantic models.

Each key's type, range, default and one-line meaning are written once, on its field; the
README's table is generated from the fields (`python -m dem_ray.config --write-readme
README.md`). Every error names the file and the dotted key at fault, and unknown keys get a
"did you mean" suggestion, because a typo in a config must fail before hours of fine-tuning
start, not after.

A field that never changes a result carries the role `resource` (placement, logging,
concurrency, retries) or `extent` (how far a search goes); stages hash `result_settings(...)`,
which leaves both out, so adding or changing such a key cannot invalidate finished work.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from dem_ray.core.sizes import SIZE_HELP, parse_size


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the file and key."""


Algorithm = Literal["tpe", "cmaes", "gp", "random", "grid"]
Objective = Literal["macro", "token_weighted"]
Scheduler = Literal["none", "asha"]
MergeMethodName = Literal["linear", "ties", "dare_linear", "dare_ties"]
Autocast = Literal["none", "bfloat16", "float16"]
VectorDtype = Literal["float32", "bfloat16", "float16"]
LrSchedule = Literal["constant", "cosine", "linear"]
Precision = Literal["fp32", "bf16-mixed"]
Strategy = Literal["ddp", "fsdp"]
FinetuneMethod = Literal["full", "lora"]
DataFormat = Literal["text", "chat", "prompt_completion"]
PrepareEngine = Literal["auto", "local", "ray"]
BaseKind = Literal["gguf", "dir", "hub"]
DownstreamModel = Literal["base", "dem", "best_mixture", "specialists"]

ALGORITHMS: tuple[str, ...] = get_args(Algorithm)
OBJECTIVES: tuple[str, ...] = get_args(Objective)
SCHEDULERS: tuple[str, ...] = get_args(Scheduler)
AUTOCAST: tuple[str, ...] = get_args(Autocast)
VECTOR_DTYPES: tuple[str, ...] = get_args(VectorDtype)
BASE_KINDS: tuple[str, ...] = get_args(BaseKind)
DOWNSTREAM_MODELS: tuple[str, ...] = get_args(DownstreamModel)

Role = Literal["result", "resource", "extent"]
# What the README adds to the meaning of a key that does not change results.
ROLE_NOTES: dict[str, str] = {
    "resource": "(never re-runs a stage)",
    "extent": "(raising it extends the search)",
}


def _meta(role: Role = "result", **display: Any) -> dict[str, Any]:
    """A field's metadata: its role, plus optional README and message overrides.

    `shown`: the README's default column where the value itself says less ("what fits").
    `note`: replaces the role's note in the README's meaning. `error`: a range-error
    template ({key}, {cond}, {value}) for the keys whose wording users already know.
    `subkeys` / `subkeys_meaning`: an extra README row for a key that may be a mapping.
    """
    return {"role": role, **display} if role != "result" else dict(display)


_RESOURCE: Role = "resource"
_EXTENT: Role = "extent"
# The long-standing wording of a few range errors (key unquoted); every other range error
# reads "'KEY' must be COND, got VALUE".
_PLAIN_RANGE = "{key} must be {cond}, got {value}"


# ---- messages that know their key only once the model's place in the config is known ----


class _Problem(ValueError):
    """What a validator found wrong, worded once the key's full dotted path is known.

    A validator sees its own model, not where that model sits in the config, so `template`
    names keys by placeholder: {key} is the key at fault (the model's path plus `below`),
    each name in `keys` is a sibling key path, and `values` are filled in as given. The
    filling is one pass, so text from the user's config is never read as a placeholder.
    """

    def __init__(
        self, template: str, below: str = "", keys: dict[str, str] | None = None, **values: Any
    ) -> None:
        self.template, self.below, self.keys, self.values = template, below, keys or {}, values
        super().__init__(self.render(""))

    def render(self, at: str) -> str:
        paths = {name: _join(at, key) for name, key in self.keys.items()}
        return _fill(self.template, key=_join(at, self.below), **paths, **self.values)


def _fill(template: str, **values: Any) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: str(values.get(m[1], m[0])), template)


def _join(at: str, below: str) -> str:
    if not at or not below:
        return at or below
    return f"{at}{below}" if below.startswith("[") else f"{at}.{below}"


def _dotted(loc: tuple[int | str, ...]) -> str:
    """Pydantic's location tuple as the config's dotted key: ('a', 0, 'b') -> 'a[0].b'."""
    key = ""
    for part in loc:
        key = _join(key, f"[{part}]" if isinstance(part, int) else str(part))
    return key


def _kind(value: Any) -> str:
    return type(value).__name__


def _got(value: Any) -> str:
    return f"{_kind(value)} {value!r}"


def _check_keys(raw: dict, known: list[str]) -> None:
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
            raise _Problem("unknown key '{key}'{hint}", below=str(key), hint=hint)


# ---- the sections ----------------------------------------------------------------------------


class _Strict(BaseModel):
    """Frozen and strict: a bool is not an int and a string is not a number (an int is a
    float), because YAML's `yes` or `"8"` is a typo, not a value to coerce."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")


class _Section(_Strict):
    """A mapping of settings under one key of the config."""

    @model_validator(mode="before")
    @classmethod
    def _a_mapping_of_known_keys(cls, data: Any) -> Any:
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise _Problem("'{key}' must be a mapping, got {kind}", kind=_kind(data))
        _check_keys(data, list(cls.model_fields))
        return data


class DatasetConfig(_Section):
    """One training distribution: the data one specialist is fine-tuned on."""

    path: str | None = Field(
        None,
        description="`.jsonl`, `.json`, `.parquet`, text files (`.txt/.md/.rst`, one document "
        "per blank-line-separated paragraph), a directory of text files, or a directory "
        "written by `datasets.save_to_disk` (give `path` or `hub`)",
        json_schema_extra=_meta(shown="`path` or `hub`"),
    )
    hub: str | None = Field(
        None,
        description="an HF Hub dataset id, read with `datasets.load_dataset` (needs the "
        "network, or the datasets cache); instead of `path`",
    )
    subset: str | None = Field(None, description="the Hub dataset's configuration name")
    split: str = Field("train", description="the split of a Hub or saved dataset to read")
    format: DataFormat = Field(
        "text",
        description="`text`: packed documents, loss on every token; `chat`: rows of "
        "`messages`, loss on the assistant turns; `prompt_completion`: loss on the completion",
    )
    text_field: str = Field("text", description="the field/column holding the text")
    messages_field: str = Field(
        "messages", description="`format: chat`: the field holding the list of {role, content}"
    )
    prompt_field: str = Field("prompt", description="`format: prompt_completion`: the prompt")
    completion_field: str = Field(
        "completion", description="`format: prompt_completion`: the completion"
    )
    chat_template: str | None = Field(
        None,
        description="`format: chat`: a Jinja chat template file used instead of the base "
        "tokenizer's own",
    )
    validation_path: str | None = Field(
        None,
        description="a separate validation file; without it, a seeded document-level split",
    )
    validation_fraction: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="the share of documents held out when there is no `validation_path`",
        json_schema_extra=_meta(error=_PLAIN_RANGE),
    )
    test_path: str | None = Field(
        None,
        description="a separate test file, scored only by the report; without it, a seeded "
        "document-level split of `path` (disjoint from train and validation)",
    )
    test_fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="the share of `path`'s documents held out as test without a `test_path`",
        json_schema_extra=_meta(error=_PLAIN_RANGE),
    )
    max_train_documents: int | None = Field(
        None,
        ge=1,
        description="cap on training documents",
        json_schema_extra=_meta(error=_PLAIN_RANGE),
    )

    @model_validator(mode="after")
    def _one_source(self) -> DatasetConfig:
        if (self.path is None) == (self.hub is None):
            raise _Problem("'{key}' needs exactly one of `path` (a local file) or `hub` (an id)")
        if self.chat_template is not None and self.format != "chat":
            raise _Problem("'{key}': `chat_template` is for `format: chat` only")
        return self


class _Placed(_Section):
    """A section whose workers ask Ray for resources (each declares `memory_gb`,
    `resources` and `accelerator_type`). The request must be schedulable, or an autoscaler
    waits forever for a node that cannot exist."""

    cpu_key: ClassVar[str]
    gpu_key: ClassVar[str]

    @field_validator("resources", mode="before", check_fields=False)
    @classmethod
    def _resources_are_named(cls, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise _Problem(
                "'{key}' must be a mapping of names to numbers, e.g. {my_resource: 1}, got {got}",
                got=_got(value),
            )
        for name in value:
            if not isinstance(name, str) or not name:
                raise _Problem("'{key}' has a key {name} that is not a name", name=repr(name))
        return value

    @field_validator("accelerator_type", check_fields=False)
    @classmethod
    def _accelerator_named(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise _Problem("'{key}' is empty; remove it or name one (e.g. A100, H100, L4)")
        return value

    @model_validator(mode="after")
    def _schedulable(self) -> _Placed:
        dedicated = {
            "cpu": self.cpu_key,
            "gpu": self.gpu_key,
            "memory": "memory_gb",
            "accelerator_type": "accelerator_type",
        }
        for name in self.resources:
            kind = name.lower().partition(":")[0]
            if kind in dedicated:
                raise _Problem(
                    "'{key}': '{name}' is not a custom resource; set '{instead}' instead",
                    below=f"resources.{name}",
                    keys={"instead": dedicated[kind]},
                    name=name,
                )
            if kind == "object_store_memory":
                raise _Problem(
                    "'{key}': Ray sizes the object store per node, not per task; remove it",
                    below=f"resources.{name}",
                )
        if self.accelerator_type is not None and getattr(self, self.gpu_key) <= 0:
            raise _Problem(
                "'{key}' is {value} but '{gpus}' is 0; an accelerator type only selects GPU "
                "nodes, so set {gpus} > 0 (or remove accelerator_type)",
                below="accelerator_type",
                keys={"gpus": self.gpu_key},
                value=repr(self.accelerator_type),
            )
        return self


class LoraSettings(_Section):
    """The low-rank adapters of `finetune.method: lora` (PEFT's `LoraConfig`)."""

    rank: int = Field(16, gt=0, description="the adapters' rank r")
    alpha: float = Field(
        32.0, gt=0, description="LoRA's alpha: each update is scaled by `alpha / rank`"
    )
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="dropout on the adapters' input while training",
        json_schema_extra=_meta(error=_PLAIN_RANGE),
    )
    target_modules: str | list[str] = Field(
        "all-linear",
        description="the modules that get adapters: `all-linear` (every linear layer but the "
        "output head), or a list of module name suffixes such as `[q_proj, v_proj]`",
    )

    @field_validator("target_modules")
    @classmethod
    def _named_modules(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str) and not value.strip():
            raise _Problem("'{key}' is empty; use all-linear or a list of module names")
        if isinstance(value, list) and (not value or not all(v.strip() for v in value)):
            raise _Problem("'{key}' must list at least one module name, e.g. [q_proj, v_proj]")
        return value


class FinetuneConfig(_Placed):
    """Hyper-parameters shared by every per-dataset fine-tune (and the baseline)."""

    cpu_key: ClassVar[str] = "cpus_per_worker"
    gpu_key: ClassVar[str] = "gpus_per_worker"
    # Result keys added after runs were recorded: hashed only when set to something other
    # than their default, so a run dir made before they existed keeps its fine-tunes (each
    # default is what those runs did). `precision: null` resolves per device in the worker
    # (the manifest records the resolved one); an explicit value is hashed as given.
    added_later: ClassVar[frozenset[str]] = frozenset(
        {"lr_schedule", "min_lr_ratio", "grad_accum_steps", "precision", "strategy", "method",
         "lora"}
    )  # fmt: skip
    # `lora` is read (and hashed) only with `method: lora`.
    only_with: ClassVar[dict[str, tuple[str, str]]] = {"lora": ("method", "lora")}

    max_steps: int = Field(60, gt=0, description="optimizer steps per fine-tune")
    batch_size: int = Field(
        8,
        gt=0,
        description="rows per micro-batch per worker (global batch = `batch_size x "
        "grad_accum_steps x num_workers`)",
    )
    seq_len: int = Field(
        128,
        ge=2,
        description="tokens per row, for training and scoring: packed text, or one instruction "
        "example (right-padded; longer ones cut by the truncation rule)",
        json_schema_extra=_meta(
            error="{key} must be {cond} (one token predicts the next), got {value}"
        ),
    )
    learning_rate: float = Field(
        1.0e-4,
        gt=0,
        description="AdamW peak learning rate (reached after warm-up, then as `lr_schedule` "
        "says), gradients clipped at 1.0",
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    lr_schedule: LrSchedule = Field(
        "constant",
        description="the learning rate after warm-up: `constant`, or `linear` / `cosine` decay "
        "to `min_lr_ratio` x the peak at `max_steps`",
    )
    min_lr_ratio: float = Field(
        0.0,
        ge=0,
        le=1,
        description="where `linear` and `cosine` end, as a share of `learning_rate`",
        json_schema_extra=_meta(error=_PLAIN_RANGE),
    )
    grad_accum_steps: int = Field(
        1,
        gt=0,
        description="micro-batches of `batch_size` rows per optimizer step (each step trains "
        "`batch_size x grad_accum_steps x num_workers` rows)",
    )
    precision: Precision | None = Field(
        None,
        description="`fp32`, or `bf16-mixed` (forward and backward under bf16 autocast); "
        "both keep fp32 master weights and AdamW state (a bf16 base is upcast) and save the "
        "fine-tune in fp32. Default: `bf16-mixed` on a GPU that has bf16, else `fp32`; the "
        "manifest records the one used",
        json_schema_extra=_meta(shown="bf16-mixed on GPU, fp32 on CPU"),
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute activations in the backward pass: less memory, one more forward "
        "pass of compute a step, the same result",
        json_schema_extra=_meta(_RESOURCE),
    )
    num_workers: int = Field(
        1, gt=0, description="Ray Train workers per fine-tune (data parallel when > 1)"
    )
    strategy: Strategy = Field(
        "ddp",
        description="how the workers share a fine-tune: `ddp` (each holds the whole model, "
        "its gradients and AdamW state) or `fsdp` (FSDP2: each holds 1/`num_workers` of them, "
        "for models one device cannot train)",
    )
    method: FinetuneMethod = Field(
        "full",
        description="`full`: every weight trains and the vector is dense; `lora`: low-rank "
        "adapters (`finetune.lora`) train, `finetune/<name>/` is a PEFT adapter and its vector "
        "stays low-rank on disk and on the evaluators",
    )
    lora: LoraSettings = Field(
        default_factory=LoraSettings,
        description="`method: lora`'s adapters: `{rank: 16, alpha: 32, dropout: 0.0, "
        "target_modules: all-linear}`",
        json_schema_extra=_meta(shown="rank 16, alpha 32"),
    )
    cpus_per_worker: float = Field(
        1.0, gt=0, description="CPUs Ray reserves per worker", json_schema_extra=_meta(_RESOURCE)
    )
    gpus_per_worker: float = Field(
        0.0,
        ge=0,
        description="GPUs per worker; > 0 trains on GPU",
        json_schema_extra=_meta(_RESOURCE),
    )
    memory_gb: float | None = Field(
        None,
        gt=0,
        description="RAM (GiB) Ray reserves per worker; the autoscaler picks a node type with "
        "that much",
        json_schema_extra=_meta(_RESOURCE),
    )
    resources: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict,
        description="custom Ray resources per worker, e.g. `{trainer_node: 1}` (a node started "
        """with `--resources='{"trainer_node": 4}'` holds four)""",
        json_schema_extra=_meta(_RESOURCE),
    )
    accelerator_type: str | None = Field(
        None,
        description="GPU model the workers need (`A100`, `H100`, `L4`, ... as Ray names them); "
        "needs `gpus_per_worker > 0`",
        json_schema_extra=_meta(_RESOURCE),
    )
    torch_threads: int | None = Field(
        None,
        gt=0,
        description="`torch.set_num_threads` in each worker",
        json_schema_extra=_meta(_RESOURCE),
    )
    max_concurrent: int | None = Field(
        None,
        gt=0,
        description="trainers in flight at once; by default every fine-tune is launched "
        "together, so an autoscaler sees the whole demand, and those that find no room wait "
        "(`cluster.node_start_timeout_s`). A cap, e.g. for a budget of nodes",
        json_schema_extra=_meta(_RESOURCE, shown="all"),
    )
    log_every: int = Field(
        10, gt=0, description="steps between progress lines", json_schema_extra=_meta(_RESOURCE)
    )
    seed: int = Field(0, description="batch sampling, initialisation and the validation split")
    checkpoint_every: int = Field(
        100,
        gt=0,
        description="steps between resumable checkpoints (weights as safetensors, optimizer and "
        "step state as safetensors + JSON)",
        json_schema_extra=_meta(_RESOURCE),
    )
    max_failures: int = Field(
        2,
        ge=0,
        description="times Ray Train restarts a failed worker group from its latest checkpoint",
        json_schema_extra=_meta(_RESOURCE),
    )

    @model_validator(mode="after")
    def _lora_without_fsdp(self) -> FinetuneConfig:
        if self.method == "lora" and self.strategy == "fsdp":
            raise _Problem(
                "{strategy}: fsdp with {method}: lora is not supported; LoRA trains and keeps "
                "optimizer state only for the adapters, so use {strategy}: ddp (a 13B base in "
                "bf16-mixed holds its frozen layers in bf16: 26 GB)",
                keys={"strategy": "strategy", "method": "method"},
            )
        return self


class SearchConfig(_Section):
    """How the coefficients are searched."""

    space: str = Field(
        "per_block",
        description="a file in `search_spaces/` by name, or a path to a space YAML; the "
        "default, `per_block` (a weight per dataset and block group, two-stage), had the best "
        "mean test score over the quality study's budgets (docs/results.md)",
    )
    merge_method: MergeMethodName = Field(
        "linear",
        description="how the weighted vectors are combined, the same in the search and in "
        "`merge`: `linear` (theta_0 + sum_i w_i v_i), `ties` (trim each vector to `density`, "
        "elect a sign per weight, average the agreeing ones), `dare_linear` / `dare_ties` "
        "(drop each entry with probability 1 - `density`, rescale the rest, then linear / ties)",
    )
    density: float = Field(
        0.5,
        gt=0,
        le=1,
        description="the share of each vector's entries kept by `ties` and the `dare` methods",
        json_schema_extra=_meta(error=_PLAIN_RANGE),
    )
    dare_seed: int = Field(0, description="the seed of the `dare` methods' drop masks")
    algorithm: Algorithm = Field(
        "tpe",
        description="`tpe`, `cmaes`, `gp`, `random` (Optuna samplers through Ray Tune's "
        "`OptunaSearch`), or `grid` (the plain coefficient grid)",
    )
    num_trials: int = Field(
        24,
        gt=0,
        description="candidates evaluated (ignored by `grid`, which visits every grid point)",
        json_schema_extra=_meta(_EXTENT),
    )
    max_concurrent: int | None = Field(
        None,
        gt=0,
        description="candidates in flight at once (`null`: 2 x `evaluator.num_actors`, so each "
        "actor has the next one queued while it scores the current one; fewer than "
        "`num_actors` leaves actors idle, many more gives the sampler less to learn from)",
        json_schema_extra=_meta(_RESOURCE, shown="2 per evaluator actor"),
    )
    seed: int = Field(0, description="the sampler's seed")
    storage: str | None = Field(
        None,
        description="the Optuna storage every trial is also written to, one study per search "
        "inputs (`<stage>-<hash>`), for `optuna-dashboard URL` and `optuna.load_study`: an "
        "`sqlite:///` or `postgresql://` URL, or `off`; `trials.jsonl` stays what a search "
        "resumes from",
        json_schema_extra=_meta(_RESOURCE, shown="`search/study.db` in the run dir (SQLite)"),
    )
    objective: Objective = Field(
        "macro",
        description="`macro`: mean over datasets of log-perplexity; `token_weighted`: "
        "log-perplexity of all validation tokens pooled",
    )
    grid_step: float = Field(
        0.25,
        gt=0,
        le=1,
        description="the grid's step for `algorithm: grid`",
        json_schema_extra=_meta(error=_PLAIN_RANGE),
    )
    compare_grid: bool = Field(
        False,
        description="also run the plain coefficient grid (at `baseline.grid_step` when there "
        "is a baseline grid, else `search.grid_step`) and report how many evaluations the "
        "search needed to come within 1% and 0.1% of the grid's best",
        json_schema_extra=_meta(_EXTENT, note="(turning it on extends the search)"),
    )
    warm_start: int = Field(
        8,
        ge=0,
        description="when the search re-runs because datasets were added or changed, it first "
        "re-scores this many of the earlier search's best candidates (new datasets at weight "
        "0); `0`: cold start",
    )
    scheduler: Scheduler = Field(
        "none",
        description="`asha`: multi-fidelity search; each trial scores the validation shards in "
        "`slices` slices and reports the running objective after each, and ASHA (Ray Tune's "
        "rule) stops candidates that trail the others early. Only fully scored trials can be the "
        "best; stopped ones are kept in `trials.jsonl` with `complete: false`",
    )
    slices: int = Field(
        4,
        gt=0,
        description="validation slices per trial with `asha` (slice `i` holds rows `i, i+s, "
        "i+2s, ...` of every dataset, so each slice estimates the whole)",
    )
    grace_slices: int = Field(
        1, gt=0, description="slices every trial scores before ASHA may stop it"
    )
    reduction_factor: int = Field(
        3,
        description="ASHA keeps about 1 in this many trials at each rung (at least 2 with `asha`)",
    )

    @model_validator(mode="after")
    def _asha_can_stop_something(self) -> SearchConfig:
        if self.scheduler != "asha":
            return self
        keys = {"slices": "slices", "grace": "grace_slices", "scheduler": "scheduler"}
        if self.slices < 2:
            raise _Problem(
                "{slices} must be >= 2 with {scheduler}: asha (a trial reports after each "
                "validation slice), got {n}",
                keys=keys,
                n=self.slices,
            )
        if self.grace_slices >= self.slices:
            raise _Problem(
                "{grace} ({g}) must be below {slices} ({n}), or no trial can be stopped early",
                keys=keys,
                g=self.grace_slices,
                n=self.slices,
            )
        if self.reduction_factor < 2:
            raise _Problem(
                "{key} must be >= 2 with {scheduler}: asha, got {n}",
                below="reduction_factor",
                keys=keys,
                n=self.reduction_factor,
            )
        return self


class EvaluatorConfig(_Placed):
    """The pool of actors that hold base, vectors and validation shards resident."""

    cpu_key: ClassVar[str] = "cpus_per_actor"
    gpu_key: ClassVar[str] = "gpus_per_actor"

    num_actors: int = Field(
        1,
        gt=0,
        description="evaluator actors (spread over nodes)",
        json_schema_extra=_meta(_RESOURCE),
    )
    gpus_per_actor: float = Field(
        0.0,
        ge=0,
        description="GPUs per actor; > 0 evaluates on GPU. A whole number N > 1 spreads each "
        "actor's model over N GPUs in contiguous blocks of layers (each GPU holds and merges "
        "its layers' base and vectors), for a base + k vectors one GPU cannot hold",
        json_schema_extra=_meta(_RESOURCE),
    )

    @field_validator("gpus_per_actor")
    @classmethod
    def _whole_above_one(cls, value: float) -> float:
        if value > 1 and value != int(value):
            raise _Problem(
                "'{key}' is {value}: above 1 it must be a whole number of GPUs to spread the "
                "model over (e.g. 2 or 4); a share of one GPU is a number up to 1",
                value=value,
            )
        return value

    cpus_per_actor: float = Field(
        1.0,
        gt=0,
        description="CPUs per actor; on CPU also its torch threads (see `torch_threads`)",
        json_schema_extra=_meta(_RESOURCE),
    )
    batch_size: int = Field(
        8, gt=0, description="validation rows per forward pass", json_schema_extra=_meta(_RESOURCE)
    )
    max_validation_sequences: int | None = Field(
        64,
        gt=0,
        description="validation (and test) rows scored per dataset (`null`: all): a random "
        "sample seeded by `finetune.seed`, kept in the shard's order",
    )
    vector_dtype: VectorDtype = Field(
        "float32",
        description="dtype the vectors are held in on the actor: `float32`, `bfloat16`, `float16`",
    )
    torch_threads: int | None = Field(
        None,
        gt=0,
        description="`torch.set_num_threads` in each actor",
        json_schema_extra=_meta(_RESOURCE, shown="on CPU, the actor's whole CPUs (at least 1)"),
    )
    autocast: Autocast = Field(
        "none",
        description="`bfloat16` or `float16`: run the validation forward pass under "
        "`torch.autocast` (for GPUs; the loss is still summed in float64)",
    )
    memory_gb: float | None = Field(
        None,
        gt=0,
        description="RAM (GiB) Ray reserves per actor (base + k vectors + shards when on CPU)",
        json_schema_extra=_meta(_RESOURCE),
    )
    resources: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict,
        description="custom Ray resources per actor, e.g. `{eval_node: 1}`",
        json_schema_extra=_meta(_RESOURCE),
    )
    accelerator_type: str | None = Field(
        None,
        description="GPU model the actors need; needs `gpus_per_actor > 0`",
        json_schema_extra=_meta(_RESOURCE),
    )


Mixture = tuple[tuple[str, float], ...]


class BaselineConfig(_Section):
    """The data-mixing grid: one model trained per mixing ratio on the mixed data."""

    grid_step: float | None = Field(
        None,
        gt=0,
        le=1,
        description="every mixture on the simplex at this step (`0.5`, `0.25`, `0.3333333333` "
        "for thirds, ...)",
        json_schema_extra=_meta(shown="one of the two"),
    )
    mixtures: tuple[Mixture, ...] = Field(
        (),
        description="an explicit list, e.g. `[{code: 0.5, dialog: 0.5}, {code: 1.0}]` (ratios "
        "are normalised; missing datasets get 0)",
        json_schema_extra=_meta(shown="one of the two"),
    )
    steps: int | None = Field(
        None,
        ge=1,
        description="optimizer steps per mixture; by default `finetune.max_steps x number of "
        "datasets`, so one mixture sees as many tokens as all DEM fine-tunes together. "
        "Optimiser, learning rate, sequence length and batch size are `finetune`'s",
        json_schema_extra=_meta(shown="DEM's total"),
    )
    keep_all: bool = Field(
        False,
        description="keep every mixture's model (by default only the best is kept, as "
        "`baseline/best/`)",
    )

    def mixture_dicts(self) -> list[dict[str, float]]:
        return [dict(m) for m in self.mixtures]

    @field_validator("grid_step")
    @classmethod
    def _divides_one(cls, step: float | None) -> float | None:
        if step is not None and abs(round(1.0 / step) * step - 1.0) > 1e-5:
            raise _Problem("'{key}' must divide 1 (e.g. 0.5, 0.25, 0.2), got {step}", step=step)
        return step

    @field_validator("mixtures", mode="before")
    @classmethod
    def _normalised(cls, value: Any) -> Any:
        """YAML's [{name: ratio}, ...] as ((name, share), ...) per mixture, shares summing to
        1; sequences of pairs (a `model_dump()`) are taken as they are, once normalised."""
        if value is None:
            return ()
        if not isinstance(value, list | tuple) or not value:
            raise _Problem("'{key}' must be a non-empty list")
        return tuple(_mixture(mix, i) for i, mix in enumerate(value))

    @model_validator(mode="after")
    def _grid_or_list(self) -> BaselineConfig:
        if (self.grid_step is None) == (not self.mixtures):
            raise _Problem("'{key}' needs exactly one of grid_step or mixtures")
        return self


def _mixture(mix: Any, index: int) -> Mixture:
    at = f"[{index}]"
    pairs = list(mix.items()) if isinstance(mix, dict) else mix
    if not isinstance(pairs, list | tuple) or not all(
        isinstance(p, list | tuple) and len(p) == 2 and isinstance(p[0], str) for p in pairs
    ):
        raise _Problem("'{key}' must map dataset names to ratios", below=at)
    for name, ratio in pairs:
        below = f"{at}.{name}"
        if isinstance(ratio, bool) or not isinstance(ratio, int | float):
            raise _Problem("'{key}' must be float, got {got}", below=below, got=_got(ratio))
        if ratio < 0:
            raise _Problem("'{key}' must be >= 0, got {ratio}", below=below, ratio=ratio)
    total = sum(float(r) for _, r in pairs)
    if total <= 0:
        raise _Problem("'{key}' has no positive ratio", below=at)
    scale = 1.0 if abs(total - 1.0) < 1e-12 else total
    return tuple((name, float(ratio) / scale) for name, ratio in pairs)


class PrepareConfig(_Section):
    """How datasets are read and tokenized; never what the shards hold (every engine writes
    the same bytes)."""

    engine: PrepareEngine = Field(
        "auto",
        description="`ray`: Ray Data reads and tokenizes over the cluster's CPUs; `local`: "
        "in the driver, streamed; `auto`: `ray` for inputs of at least `ray_min_mb`",
        json_schema_extra=_meta(_RESOURCE),
    )
    ray_min_mb: float = Field(
        64.0,
        ge=0,
        description="`engine: auto` uses Ray Data from this input size (MB) up",
        json_schema_extra=_meta(_RESOURCE),
    )
    batch_size: int = Field(
        512, gt=0, description="records per tokenization batch", json_schema_extra=_meta(_RESOURCE)
    )
    num_cpus: int | None = Field(
        None,
        gt=0,
        description="tokenizing workers of `engine: ray` (default: the cluster's CPUs)",
        json_schema_extra=_meta(_RESOURCE),
    )


class DownstreamConfig(_Section):
    """Downstream tasks through lm-evaluation-harness: scored after merge (and the baseline),
    and optionally the choice of the merged model among the search's best candidates."""

    tasks: tuple[str, ...] = Field(
        description="lm-eval task (or group) names, e.g. `arc_easy` (hub tasks need the "
        "network), or local task YAML files (`*.yaml`, relative to the config file; "
        "`dem-ray corpora build --cloze N` writes some)",
        json_schema_extra=_meta(shown="required"),
    )
    num_fewshot: int = Field(0, ge=0, description="few-shot examples per prompt")
    limit: int | None = Field(None, gt=0, description="examples per task (`null`: all of them)")
    batch_size: int = Field(
        8, gt=0, description="lm-eval's batch size", json_schema_extra=_meta(_RESOURCE)
    )
    models: tuple[DownstreamModel, ...] | None = Field(
        None,
        description="which models to score: `base`, `dem`, `best_mixture` (needs a `baseline` "
        "section), `specialists` (every fine-tune)",
        json_schema_extra=_meta(shown="all the run has"),
    )
    rerank_top: int = Field(
        0,
        ge=0,
        description="> 0: score the search's N best candidates (by validation objective) on "
        "the tasks, in the resident evaluators; the best by `rerank_metric` (mean over the "
        "tasks) becomes the merged model",
    )
    rerank_metric: str = Field(
        "acc",
        min_length=1,
        description="the lm-eval metric `rerank_top` ranks by (`acc`, `acc_norm`, "
        "`exact_match`, ...; the task's own direction: higher or lower is better)",
    )

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not value:
            raise _Problem("'{key}' must be a non-empty list of lm-eval task names or task "
                           "YAML files")  # fmt: skip
        for i, task in enumerate(value):
            if not isinstance(task, str) or not task.strip():
                raise _Problem("'{key}' must be a task name or a YAML file, got {got}",
                               below=f"[{i}]", got=_got(task))  # fmt: skip
        if len(set(value)) != len(value):
            raise _Problem("'{key}' lists a task twice")
        return tuple(value)

    @field_validator("models", mode="before")
    @classmethod
    def _model_list(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise _Problem("'{key}' is empty; leave it out to score every model the run has")
        return tuple(value) if isinstance(value, list) else value

    def scored_models(self, has_baseline: bool) -> tuple[str, ...]:
        """The model kinds to score, in the report's order."""
        wanted = self.models or tuple(m for m in DOWNSTREAM_MODELS
                                      if has_baseline or m != "best_mixture")  # fmt: skip
        order = ("base", "specialists", "dem", "best_mixture")
        return tuple(m for m in order if m in wanted)


class MergeConfig(_Section):
    """How `merge` writes the composite (and the fine-tunes their weights); never what the
    tensors hold."""

    max_shard_size: str = Field(
        "5GB",
        description="the largest weight file of a written model (`merged/`, and each "
        "fine-tune): bigger models are saved as Hugging Face shards `model-0000i-of-0000N."
        "safetensors` with a `model.safetensors.index.json`; `500KB`, `100MB`, `5GB` (powers "
        "of 1000) or `KiB`, `MiB`, `GiB` (powers of 1024). A tensor larger than this gets a "
        "file of its own",
        json_schema_extra=_meta(_RESOURCE),
    )

    @field_validator("max_shard_size", mode="before")
    @classmethod
    def _a_size(cls, value: Any) -> Any:
        try:
            if not isinstance(value, str):  # a number of bytes is written with its unit: 5GB
                raise ValueError(value)
            parse_size(value)
        except ValueError:
            raise _Problem("'{key}' must be {help}, got {got}", help=SIZE_HELP,
                           got=_got(value)) from None  # fmt: skip
        return value

    @property
    def shard_bytes(self) -> int:
        """`max_shard_size` in bytes."""
        return parse_size(self.max_shard_size)


class CostConfig(_Section):
    """Prices that turn measured device-seconds into money, per kind of device."""

    usd_per_gpu_hour: float = Field(
        3.0, ge=0, description="price of a GPU-hour, for the report's USD column"
    )
    usd_per_cpu_hour: float = Field(0.05, ge=0, description="price of a CPU core-hour")


WandbMode = Literal["online", "offline", "disabled"]


def _needs_package(module: str, extra: str) -> None:
    """An experiment tracker named in the config must be installed: fail at load, not after
    the fine-tunes (the check finds the package without importing it)."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken install, or a module blocked by sys.modules
        found = False
    if not found:
        raise _Problem("{key} needs {module}: pip install 'dem-ray[{extra}]'", module=module,
                       extra=extra)  # fmt: skip


class MlflowConfig(_Section):
    """An MLflow experiment that mirrors the TensorBoard scalars (`dem-ray[mlflow]`)."""

    tracking_uri: str | None = Field(
        None,
        min_length=1,
        description="where MLflow keeps runs: `http(s)://` a tracking server (on a cluster, one "
        "every node reaches), `sqlite:///PATH`, or a directory (a file store; relative paths "
        "from the working directory). Default: `MLFLOW_TRACKING_URI`, else MLflow's own",
        json_schema_extra=_meta(_RESOURCE, shown="MLflow's default"),
    )
    experiment: str = Field(
        "dem-ray",
        min_length=1,
        description="the MLflow experiment the runs go to (created when missing)",
        json_schema_extra=_meta(_RESOURCE),
    )

    @model_validator(mode="after")
    def _installed(self) -> MlflowConfig:
        _needs_package("mlflow", "mlflow")
        return self


class WandbConfig(_Section):
    """A Weights & Biases project that mirrors the TensorBoard scalars (`dem-ray[wandb]`)."""

    project: str = Field(
        "dem-ray", min_length=1, description="the W&B project", json_schema_extra=_meta(_RESOURCE)
    )
    mode: WandbMode = Field(
        "online",
        description="`online` (needs `WANDB_API_KEY` or `wandb login` on every node), "
        "`offline` (runs kept in `RUN_DIR/wandb/` or `WANDB_DIR`, for `wandb sync`), `disabled`",
        json_schema_extra=_meta(_RESOURCE),
    )
    entity: str | None = Field(
        None,
        min_length=1,
        description="the W&B team or user (default: the API key's)",
        json_schema_extra=_meta(_RESOURCE),
    )

    @model_validator(mode="after")
    def _installed(self) -> WandbConfig:
        _needs_package("wandb", "wandb")
        return self


class TrackingConfig(_Section):
    """Experiment trackers beside the TensorBoard event files, which are always written: a
    run per fine-tune (each step's loss, lr, tokens/s) and per search stage (each trial's
    objective, best so far and weights). No stage hashes this section."""

    mlflow: MlflowConfig | None = Field(
        None,
        description="an MLflow experiment (`{}` or `true`: every default)",
        json_schema_extra=_meta(_RESOURCE),
    )
    wandb: WandbConfig | None = Field(
        None,
        description="a W&B project (`{}` or `true`: every default)",
        json_schema_extra=_meta(_RESOURCE),
    )

    @field_validator("mlflow", "wandb", mode="before")
    @classmethod
    def _on_or_off(cls, value: Any) -> Any:
        """`true` turns a tracker on with its defaults; `false` or `null` leaves it off."""
        if value is True:
            return {}
        return None if value is False else value


class ClusterConfig(_Section):
    """How the run waits for an autoscaling cluster. No stage hashes this section."""

    node_start_timeout_s: float = Field(
        900.0,
        gt=0,
        description="seconds each request of a fine-tune's workers for their resources stands "
        "(Ray Train's worker-group start timeout; its own default, 60 s, withdraws the request "
        "before a cloud node has booted). Ray Train then asks again: a fine-tune waits for "
        "the autoscaler, or for the others to finish, however long that takes",
        json_schema_extra=_meta(_RESOURCE),
    )


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


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_REQUIRED = ("run_dir", "base_model", "datasets")


class RunConfig(_Strict):
    """A whole DEM run; `source` is the file it came from (for error messages)."""

    run_dir: str = Field(
        description="where every artifact and the manifest go: a directory path (on a cluster, "
        "one that every node mounts at the same path) or a bucket URI such as `s3://BUCKET/PATH` "
        '(see "`run_dir` in a bucket")'
    )
    base_model: BaseModelSpec = Field(
        description="an HF id (downloaded once into `run_dir/base/`, where every node of a "
        "cluster reads it; needs the network), a local HF directory with `*.safetensors`, a "
        "`.gguf` file (dequantized to fp32 once into `run_dir/base/`; needs the `gguf` "
        "package), or `package://PKG/FILE` for a file inside an installed package. A string's "
        "form decides how it is loaded (a `.gguf` suffix, an existing path, else a Hub id)",
        json_schema_extra=_meta(
            subkeys=BASE_KINDS,
            subkeys_meaning="instead of a string, a mapping with exactly one of these keys says "
            "how to load the value: `{gguf: PATH}` (a GGUF file, with or without the `.gguf` "
            "suffix), `{dir: PATH}` (a local HF directory), `{hub: ID}` (a Hub id, even one that "
            "looks like a path). `package://` works in `gguf` and `dir`. The conversion of a "
            "GGUF is reused while the file's bytes (sha256) are the same",
        ),
    )
    trust_remote_code: bool = Field(
        False, description="passed to transformers; off unless you say so"
    )
    datasets: dict[str, DatasetConfig]
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    evaluator: EvaluatorConfig = Field(default_factory=EvaluatorConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    baseline: BaselineConfig | None = None
    downstream: DownstreamConfig | None = None
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    cost: CostConfig = Field(default_factory=CostConfig)
    # No stage hashes it (each hashes its own sections), so tracking never re-runs one.
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)  # hashed by no stage
    # Not a key of the file: `parse_config` sets it, and it is left out of dumps.
    source: str = Field("<dict>", exclude=True)

    @property
    def dataset_names(self) -> list[str]:
        return list(self.datasets)

    def section(self, name: str) -> dict[str, Any]:
        """A section as plain data, e.g. for a stage's recorded inputs."""
        return getattr(self, name).model_dump()

    @model_validator(mode="before")
    @classmethod
    def _top_level(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, cls) or not isinstance(data, dict):
            return data
        source = (info.context or {}).get("source")
        keys = [key for key in cls.model_fields if source is None or key != "source"]
        _check_keys(data, keys)
        for key in _REQUIRED:
            if data.get(key) in (None, "", {}):
                raise _Problem("missing required key '{key}'", below=key)
        return data if source is None else {**data, "source": source}

    @field_validator(
        "finetune", "search", "evaluator", "merge", "cost", "tracking", "cluster", mode="before"
    )
    @classmethod
    def _empty_section_takes_defaults(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("base_model", mode="before")
    @classmethod
    def _base_model(cls, raw: Any) -> Any:
        """A string (its form decides the kind) or a mapping with exactly one of the kinds."""
        if isinstance(raw, str):
            return BaseModelSpec(raw)
        if isinstance(raw, BaseModelSpec):
            return raw
        kinds = ", ".join(BASE_KINDS)
        if not isinstance(raw, dict):
            raise _Problem(
                "'{key}' must be a string or a mapping with one of {kinds} "
                "(e.g. {gguf: model.gguf}), got {got}",
                kinds=kinds,
                got=_got(raw),
            )
        _check_keys(raw, list(BASE_KINDS))
        if len(raw) != 1:
            raise _Problem(
                "'{key}' has {given}; give exactly one of {kinds}, which says how to load it",
                given=", ".join(map(str, raw)),
                kinds=kinds,
            )
        [(kind, location)] = raw.items()
        if not isinstance(location, str):
            raise _Problem("'{key}' must be str, got {got}", below=kind, got=_got(location))
        if not location.strip():
            raise _Problem("'{key}' is empty; give a path or a Hub id", below=kind)
        return BaseModelSpec(location, kind)

    @field_validator("datasets", mode="before")
    @classmethod
    def _named_datasets(cls, raw: Any) -> Any:
        """Names usable as file names; a bare string is the dataset's path."""
        if not isinstance(raw, dict):
            raise _Problem("'{key}' must map names to dataset settings")
        for name in raw:
            if not isinstance(name, str) or not _NAME_RE.match(name):
                raise _Problem(
                    "dataset name {name} must be letters, digits, '_', '-' or '.'",
                    name=repr(name),
                )
        return {name: {"path": s} if isinstance(s, str) else s for name, s in raw.items()}

    @field_validator("datasets")
    @classmethod
    def _at_least_two(cls, datasets: dict[str, DatasetConfig]) -> dict[str, DatasetConfig]:
        if len(datasets) < 2:
            raise _Problem("'{key}' needs at least two datasets to mix")
        return datasets

    @field_validator("baseline")
    @classmethod
    def _mixtures_over_all_datasets(
        cls, baseline: BaselineConfig | None, info: ValidationInfo
    ) -> BaselineConfig | None:
        """Every mixture names only configured datasets and lists all of them, in order."""
        if baseline is None or not baseline.mixtures or "datasets" not in info.data:
            return baseline
        names = list(info.data["datasets"])
        for i, mix in enumerate(baseline.mixtures):
            for name, _ in mix:
                if name not in names:
                    raise _Problem(
                        "'{key}': no dataset '{name}' in the config (datasets: {names})",
                        below=f"mixtures[{i}].{name}",
                        name=name,
                        names=", ".join(names),
                    )
        full = tuple(tuple((n, dict(mix).get(n, 0.0)) for n in names) for mix in baseline.mixtures)
        return baseline.model_copy(update={"mixtures": full})

    @model_validator(mode="after")
    def _lowrank_vectors_merge_linearly(self) -> RunConfig:
        if self.finetune.method == "lora" and self.search.merge_method != "linear":
            raise _Problem(
                "'search.merge_method' is {method}, but 'finetune.method: lora' keeps its vectors "
                "low-rank, which only `linear` merges (ties and DARE trim or drop entries of the "
                "dense vector); set search.merge_method: linear or finetune.method: full",
                method=self.search.merge_method,
            )
        return self

    @model_validator(mode="after")
    def _downstream_fits_the_run(self) -> RunConfig:
        ds = self.downstream
        if ds is None:
            return self
        if ds.models and "best_mixture" in ds.models and self.baseline is None:
            raise _Problem("'downstream.models' lists best_mixture, but the config has no "
                           "'baseline' section to make one; add it or drop best_mixture")  # fmt: skip
        search = self.search
        if ds.rerank_top and search.algorithm != "grid" and ds.rerank_top > search.num_trials:
            raise _Problem(
                "'downstream.rerank_top' ({top}) is larger than 'search.num_trials' ({n}): "
                "there are not that many candidates to rerank",
                top=ds.rerank_top, n=search.num_trials,
            )  # fmt: skip
        return self


# ---- what a stage hashes -----------------------------------------------------------------


def field_role(info: FieldInfo) -> Role:
    """`result` unless the field's metadata says `resource` or `extent`."""
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return extra.get("role", "result")  # type: ignore[return-value]


def result_settings(section: BaseModel) -> dict[str, Any]:
    """`section.model_dump()` without its resource and extent fields: what a stage hashes to
    decide whether to re-run, so placement, logging or a longer search never re-run it."""
    fields = type(section).model_fields
    skip = {n for n, f in fields.items() if field_role(f) != "result"}
    # A section's `added_later` keys are left out at their default (see FinetuneConfig).
    later = getattr(type(section), "added_later", frozenset())
    skip |= {
        n for n in later if getattr(section, n) == fields[n].get_default(call_default_factory=True)
    }
    # Keys that mean something only beside another's value (`lora` with `method: lora`).
    for name, (key, value) in getattr(type(section), "only_with", {}).items():
        if getattr(section, key) != value:
            skip.add(name)
    return section.model_dump(exclude=skip)


# ---- reading a file ----------------------------------------------------------------------


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
    try:
        return RunConfig.model_validate(raw, context={"source": source})
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc.errors()[0])}") from exc


# ---- pydantic's errors in the config's words ---------------------------------------------

_BOUND_OPS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _describe(error: dict[str, Any]) -> str:
    """One pydantic error as a config message, e.g. "'finetune.max_steps' must be > 0, got 0"."""
    loc, kind, value = error["loc"], error["type"], error.get("input")
    key = _dotted(loc)
    ctx = error.get("ctx") or {}
    if isinstance(ctx.get("error"), _Problem):
        return ctx["error"].render(key)
    annotation, info = _field_at(loc)
    if kind == "missing":
        return f"missing required key '{key}'"
    if kind == "literal_error" and isinstance(value, str):
        options = get_args(annotation) if get_origin(annotation) is Literal else ()
        choices = ", ".join(options) if options else ctx.get("expected", "")
        return f"'{key}' is {value!r}; choose one of {choices}"
    if kind.endswith("_type") or kind == "literal_error":
        wanted = _type_names(annotation) if annotation is not None else kind.removesuffix("_type")
        return f"'{key}' must be {wanted}, got {_got(value)}"
    if kind in _RANGE_ERRORS:
        bounds = _bounds(info) if info is not None else {}
        bounds = bounds or {op: ctx[op] for op in _BOUND_OPS if op in ctx}
        extra = info.json_schema_extra if info is not None else None
        template = extra.get("error") if isinstance(extra, dict) else None
        template = template or "'{key}' must be {cond}, got {value}"
        return _fill(template, key=key, cond=_condition(bounds), value=value)
    return f"'{key}': {error['msg']}"


def _field_at(loc: tuple[int | str, ...]) -> tuple[Any, FieldInfo | None]:
    """The annotation (and field, when it is one) at a location of RunConfig, or (None, None)."""
    annotation: Any = RunConfig
    info: FieldInfo | None = None
    for part in loc:
        annotation = _model_in(annotation) or annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            info = annotation.model_fields.get(str(part))
            if info is None:
                return None, None
            annotation = info.annotation
        elif get_origin(annotation) is dict:
            annotation, info = get_args(annotation)[1], None
        else:
            return None, None
    return annotation, info


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The section model an annotation holds: `X`, `X | None` or `Annotated[X, ...]`."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, UnionType):
        others = [a for a in get_args(annotation) if a is not NoneType]
        annotation = others[0] if len(others) == 1 else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _type_names(annotation: Any) -> str:
    """'int', 'int or NoneType', 'str' for a Literal of strings: the words of today's errors."""
    if get_origin(annotation) is Annotated:
        return _type_names(get_args(annotation)[0])
    if get_origin(annotation) is Literal:
        return " or ".join(dict.fromkeys(_kind(o) for o in get_args(annotation)))
    if get_origin(annotation) in (Union, UnionType):
        return " or ".join(_type_names(a) for a in get_args(annotation))
    if get_origin(annotation) is dict or annotation is dict:
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(info: FieldInfo) -> dict[str, Any]:
    return {op: getattr(m, op) for m in info.metadata for op in _BOUND_OPS if hasattr(m, op)}


def _condition(bounds: dict[str, Any]) -> str:
    """'> 0', 'in (0, 1]': the range a value must be in, as a user reads it."""
    text = {op: _plain_number(v) for op, v in bounds.items()}
    low = next((op for op in ("gt", "ge") if op in text), None)
    high = next((op for op in ("lt", "le") if op in text), None)
    if low and high:
        opening, closing = "(" if low == "gt" else "[", ")" if high == "lt" else "]"
        return f"in {opening}{text[low]}, {text[high]}{closing}"
    op = low or high
    return f"{_BOUND_OPS[op]} {text[op]}" if op else "in range"


def _plain_number(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


# ---- the README's table ------------------------------------------------------------------

README_START = "<!-- config-table:start -->"
README_END = "<!-- config-table:end -->"


def config_table_markdown() -> str:
    """The README's `| key | default | meaning |` table, one row per key, in field order."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [
        "|" + "|".join(f" {cell} " if cell else " " for cell in row) + "|"
        for row in _rows(RunConfig)
    ]
    return "\n".join(lines) + "\n"


def _rows(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, str, str]]:
    for name, info in model.model_fields.items():
        if info.exclude:
            continue
        key = prefix + name
        section = _model_in(info.annotation)
        if get_origin(info.annotation) is dict and _model_in(get_args(info.annotation)[1]):
            yield from _rows(_model_in(get_args(info.annotation)[1]), f"{key}.<name>.")
        elif section is not None:
            yield from _rows(section, f"{key}.")
        else:
            yield from _field_rows(key, info)


def _field_rows(key: str, info: FieldInfo) -> Iterator[tuple[str, str, str]]:
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    meaning = info.description or ""
    note = extra.get("note") or ROLE_NOTES.get(field_role(info))
    yield (
        f"`{key}`",
        str(extra.get("shown") or _shown(info)),
        _cell(f"{meaning} {note}" if note else meaning),
    )
    subkeys = extra.get("subkeys")
    if subkeys:
        first, *rest = subkeys
        cell = " / ".join([f"`{key}.{first}`", *(f"`.{k}`" for k in rest)])
        yield cell, "", _cell(str(extra.get("subkeys_meaning", "")))


def _shown(info: FieldInfo) -> str:
    """A default as the README writes it: `60`, `1e-4`, `false`, `{}`, none, required."""
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value and abs(value) < 1e-3:
        mantissa, exponent = f"{value:e}".split("e")
        return f"`{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}`"
    if isinstance(value, dict | tuple | list) and not value:
        return "`{}`" if isinstance(value, dict) else "`[]`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def readme_with_config_table(text: str) -> str:
    """`text` with the region between the config-table markers replaced by the table."""
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"no {README_START} ... {README_END} region in the README")
    return f"{text[: start + len(README_START)]}\n{config_table_markdown()}{text[end:]}"


def main(argv: list[str] | None = None) -> int:
    """`python -m dem_ray.config [--write-readme README.md]`: print or rewrite the table."""
    parser = argparse.ArgumentParser(
        prog="python -m dem_ray.config",
        description="Print the run config's key table, or rewrite it in the README.",
    )
    parser.add_argument(
        "--write-readme",
        metavar="README",
        type=Path,
        help="rewrite the table between the config-table markers of this file",
    )
    args = parser.parse_args(argv)
    if args.write_readme is None:
        sys.stdout.write(config_table_markdown())
        return 0
    text = args.write_readme.read_text()
    updated = readme_with_config_table(text)
    if updated != text:
        args.write_readme.write_text(updated)
    print(f"{args.write_readme}: config table {'updated' if updated != text else 'up to date'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
