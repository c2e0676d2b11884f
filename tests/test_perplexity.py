"""Tests for dem_ray.core.perplexity: the NLL of known tokens under a known model, and objectives."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from dem_ray.core.perplexity import objective, perplexity, token_nll
from dem_ray.models.tiny import make_tiny_model, synthetic_corpus

SEQ_LEN = 9
ROWS = 5


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tmp_path_factory):
    texts = synthetic_corpus("code", 30, seed=4)
    path = make_tiny_model(
        Path(tmp_path_factory.mktemp(request.param)), texts, architecture=request.param, seed=3
    )
    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


@pytest.fixture(scope="module")
def rows(model) -> torch.Tensor:
    gen = torch.Generator().manual_seed(21)
    return torch.randint(0, model.config.vocab_size, (ROWS, SEQ_LEN), generator=gen).to(torch.int32)


def hand_nll(model, rows: torch.Tensor) -> float:
    """sum over rows and positions t >= 1 of -log softmax(logits[t-1])[token t], in float64."""
    total = 0.0
    with torch.no_grad():
        for row in rows.long():
            logits = model(input_ids=row[None]).logits[0].double()
            for t in range(1, row.numel()):
                log_z = torch.logsumexp(logits[t - 1], dim=0)
                total += float(log_z - logits[t - 1, row[t]])
    return total


def test_token_nll_equals_hand_computation(model, rows) -> None:
    total, count = token_nll(model, rows, batch_size=2)
    assert count == ROWS * (SEQ_LEN - 1)
    expected = hand_nll(model, rows)
    assert total == pytest.approx(expected, rel=1e-6)
    # a random model over a vocab of V tokens sits near log V per token
    assert (
        0.5 * math.log(model.config.vocab_size)
        < total / count
        < 2 * math.log(model.config.vocab_size)
    )


def test_token_nll_independent_of_batch_size(model, rows) -> None:
    results = [token_nll(model, rows, batch_size=b) for b in (1, 3, ROWS, 100)]
    for total, count in results:
        assert count == ROWS * (SEQ_LEN - 1)
        assert total == pytest.approx(results[0][0], rel=1e-6)


def test_token_nll_sums_rows(model, rows) -> None:
    first, n1 = token_nll(model, rows[:2], batch_size=4)
    rest, n2 = token_nll(model, rows[2:], batch_size=4)
    total, n = token_nll(model, rows, batch_size=4)
    assert n == n1 + n2
    assert total == pytest.approx(first + rest, rel=1e-6)


def test_token_nll_depends_on_tokens(model, rows) -> None:
    """A row's score is not a function of the row count alone."""
    shifted = (rows.long() + 1) % model.config.vocab_size
    assert token_nll(model, shifted.int(), 5)[0] != pytest.approx(token_nll(model, rows, 5)[0])


def test_token_nll_empty_rows(model) -> None:
    assert token_nll(model, torch.empty((0, SEQ_LEN), dtype=torch.int32), 4) == (0.0, 0)


def test_token_nll_leaves_no_grad(model, rows) -> None:
    token_nll(model, rows, 2)
    assert all(p.grad is None for p in model.parameters())


def test_perplexity_is_exp_of_mean(model, rows) -> None:
    total, count = token_nll(model, rows, 3)
    assert perplexity(total, count) == pytest.approx(math.exp(total / count), rel=1e-12)
    assert perplexity(13.0, 8) == math.exp(13.0 / 8)
    assert perplexity(0.0, 5) == 1.0


def test_objective_macro_and_token_weighted() -> None:
    nll = {"a": (10.0, 5), "b": (3.0, 3)}
    assert objective(nll, "macro") == pytest.approx(1.5, abs=1e-15)
    assert objective(nll) == pytest.approx(1.5, abs=1e-15)  # macro is the default
    assert objective(nll, "token_weighted") == pytest.approx(13 / 8, abs=1e-15)


def test_objective_macro_counts_each_dataset_equally() -> None:
    small, large = (2.0, 1), (1000.0, 1000)
    assert objective({"s": small, "l": large}, "macro") == pytest.approx(1.5)
    assert objective({"s": small, "l": large}, "token_weighted") == pytest.approx(1002 / 1001)


def test_objective_single_dataset_kinds_agree() -> None:
    nll = {"only": (7.5, 3)}
    assert objective(nll, "macro") == objective(nll, "token_weighted") == 2.5


def test_objective_errors() -> None:
    with pytest.raises(ValueError, match="unknown objective 'median'"):
        objective({"a": (1.0, 1)}, "median")
    with pytest.raises(ValueError, match="no datasets"):
        objective({}, "macro")
