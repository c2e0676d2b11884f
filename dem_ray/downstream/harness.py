"""Scoring a model on the tasks with lm-eval's `simple_evaluate`, never a re-implementation.

The model is a live `transformers` model (the evaluator's, with a candidate's weights set
in place), wrapped for lm-eval as `HFLM(pretrained=model)`: the same code path lm-eval's
`model="hf"` takes after loading a directory, so the numbers equal lm-eval's own on the
saved model (tested).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
from collections.abc import Iterator
from typing import Any

from dem_ray.downstream.tasks import TaskSet, lm_eval_module, task_manager

log = logging.getLogger(__name__)
# What lm-eval says whenever it is handed a live model, which is what dem-ray means to do.
# (and that `downstream.num_fewshot` replaced a task's default, which the config asked for).
EXPECTED_WARNINGS = (
    "`pretrained` model kwarg is not of type",
    "Passed an already-initialized",
    "Overwriting default num_fewshot",
)


def _expected(line: str) -> bool:
    return any(text in line for text in EXPECTED_WARNINGS)


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _expected(str(record.msg))


PROGRESS_BAR = re.compile(r"\d+%\||/s\]|s/it\]")  # tqdm: "50%|", "8.29it/s]", "? examples/s]"
# Keys of an lm-eval task result that are not metrics.
NOT_METRICS = frozenset({"alias", "name", "sample_len", "samples", " "})


def evaluate_model(
    model,
    tokenizer,
    tasks: TaskSet,
    num_fewshot: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """{"scores": {task: {metric: value}}, "higher_is_better", "samples", "tokens"}: lm-eval's
    results for `model`, metric names without their filter suffix; `tokens` went through
    the model (padding included)."""
    lm_eval = lm_eval_module()
    lm = _counting_lm(model, tokenizer, batch_size)
    with _progress_bars_dropped():
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks.names),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=task_manager(tasks.include_path),
            log_samples=False,
        )
    scores, better, samples = parse_results(results)
    return {"scores": scores, "higher_is_better": better, "samples": samples,
            "tokens": lm.tokens_seen}  # fmt: skip


@contextlib.contextmanager
def _progress_bars_dropped() -> Iterator[None]:
    """lm-eval's tqdm bars (a line per update in a Ray worker's log) dropped; anything else
    written to stderr meanwhile is logged as a warning."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    finally:
        for line in re.split(r"[\r\n]+", captured.getvalue()):
            if line.strip() and not PROGRESS_BAR.search(line) and not _expected(line):
                log.warning("lm-eval: %s", line.strip())


def parse_results(results: dict) -> tuple[dict, dict, dict]:
    """lm-eval's results as ({task: {metric: value, metric_stderr: value}}, {task: {metric:
    higher is better}}, {task: examples scored}); 'N/A' and NaN become None."""
    scores: dict[str, dict[str, float | None]] = {}
    for task, values in results["results"].items():
        metrics: dict[str, float | None] = {}
        for key, value in values.items():
            if key in NOT_METRICS or not isinstance(value, int | float | str):
                continue
            metric, _, filt = key.partition(",")
            name = metric if metric not in metrics else f"{metric}_{filt}"
            metrics[name] = _number(value)
        scores[task] = metrics
    better = {task: dict(values) for task, values in results.get("higher_is_better", {}).items()}
    samples = {task: n.get("effective") for task, n in results.get("n-samples", {}).items()}
    return scores, better, samples


def _number(value: Any) -> float | None:
    if isinstance(value, str):
        return None  # lm-eval's "N/A" (a stderr it could not compute)
    value = float(value)
    return None if math.isnan(value) else value


def _counting_lm(model, tokenizer, batch_size: int):
    """`HFLM` over the live model, counting the tokens of every forward call."""
    from lm_eval.models.huggingface import HFLM

    for name in (HFLM.__module__, "lm_eval.evaluator"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropExpected) for f in logger.filters):
            logger.addFilter(_DropExpected())

    class CountingHFLM(HFLM):
        tokens_seen = 0

        def _model_call(self, inps, *args, **kwargs):
            self.tokens_seen += int(inps.numel())
            return super()._model_call(inps, *args, **kwargs)

    return CountingHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def mean_metric(scores: dict, tasks: TaskSet, metric: str, better: dict) -> tuple[float, bool]:
    """The mean over the config's tasks of `metric` (a tag: the mean over its tasks), and
    whether higher is better: what `rerank_top` ranks by. Tasks that disagree on the
    direction cannot be averaged."""
    values, directions = [], set()
    for name in tasks.names:
        parts = [name] if name in scores else list(tasks.leaves.get(name, ()))
        per_task = []
        for task in parts:
            value = scores.get(task, {}).get(metric)
            if value is None:
                known = ", ".join(k for k in scores.get(task, {}) if not k.endswith("_stderr"))
                raise KeyError(f"task '{task}' reports no '{metric}' (it reports: {known})")
            directions.add(bool(better.get(task, {}).get(metric, True)))
            per_task.append(value)
        values.append(sum(per_task) / len(per_task))
    if len(directions) > 1:
        raise KeyError(f"'{metric}' is higher-is-better in some tasks and lower in others; "
                       "rerank by a metric with one direction")  # fmt: skip
    return sum(values) / len(values), directions.pop()
