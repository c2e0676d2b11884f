"""Validation perplexity over token rows (packed text, or masked instruction rows), and
the search objectives. Pure torch."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F


@torch.inference_mode()
def token_nll(
    model: torch.nn.Module,
    rows: torch.Tensor,
    batch_size: int,
    autocast_dtype=None,
    mask: torch.Tensor | None = None,
) -> tuple[float, int]:
    """(sum of next-token negative log-likelihoods, number of predicted tokens) over `rows`.

    Without `mask` (packed text) each row of `seq_len` tokens predicts its last
    `seq_len - 1` tokens. With `mask` (instruction rows: one example each, right-padded)
    only the tokens where it is 1 are targets; a batch is cut after its last target,
    which changes nothing under causal attention (no token sees a later one) and skips
    the padding. Summing in float64 keeps the total exact enough to compare runs.
    """
    total = 0.0
    count = 0
    device = next(model.parameters()).device
    for start in range(0, rows.shape[0], batch_size):
        batch = rows[start : start + batch_size].to(device=device, dtype=torch.long)
        targets = batch[:, 1:]
        if mask is not None:
            keep = mask[start : start + batch_size].to(device=device, dtype=torch.bool)
            width = last_target(keep) + 1
            if width <= 1:
                continue
            batch, keep = batch[:, :width], keep[:, :width]
            targets = batch[:, 1:].masked_fill(~keep[:, 1:], -100)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(input_ids=batch).logits
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            targets.reshape(-1),
            reduction="sum",
            ignore_index=-100,
        )
        total += float(loss.double())
        count += int((targets != -100).sum()) if mask is not None else targets.numel()
    return total, count


def last_target(mask: torch.Tensor) -> int:
    """The last column of `mask` [rows, seq_len] that holds a 1 in any row (-1: none)."""
    columns = mask.any(dim=0).nonzero()
    return int(columns[-1]) if columns.numel() else -1


def target_count(rows: torch.Tensor, mask: torch.Tensor | None) -> int:
    """How many tokens `token_nll` scores over these rows."""
    return int(mask[:, 1:].sum()) if mask is not None else int(rows[:, 1:].numel())


def perplexity(nll_sum: float, tokens: int) -> float:
    return math.exp(nll_sum / tokens)


def objective(nll: Mapping[str, tuple[float, int]], kind: str = "macro") -> float:
    """The search's objective, lower is better.

    macro: the mean over datasets of log-perplexity, so each distribution counts the
    same however large its validation shard; token_weighted: the log-perplexity of
    all validation tokens pooled.
    """
    if not nll:
        raise ValueError("no datasets to score")
    empty = [name for name, (_, n) in nll.items() if n <= 0]
    if empty:
        raise ValueError(f"no validation tokens for {', '.join(empty)}")
    if kind == "macro":
        return sum(s / n for s, n in nll.values()) / len(nll)
    if kind == "token_weighted":
        return sum(s for s, _ in nll.values()) / sum(n for _, n in nll.values())
    raise ValueError(f"unknown objective {kind!r}; use 'macro' or 'token_weighted'")
