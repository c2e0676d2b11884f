"""The cost arithmetic, pinned with numbers worked out by hand."""

from __future__ import annotations

import pytest

from dem_ray.core import cost


def test_flops_six_per_trained_token_two_per_evaluated_token():
    assert (
        cost.flops(params=1_000, tokens_trained=10, tokens_evaluated=5)
        == 6 * 1_000 * 10 + 2 * 1_000 * 5
    )


def test_usd_uses_the_price_of_the_device_kind():
    assert cost.usd(7200, "cuda", usd_per_gpu_hour=3.0, usd_per_cpu_hour=0.05) == pytest.approx(6.0)
    assert cost.usd(7200, "cpu", usd_per_gpu_hour=3.0, usd_per_cpu_hour=0.05) == pytest.approx(0.1)


def test_priced_item_and_mixture_with_split_devices():
    item = {"device_seconds": 3600, "wall_seconds": 100, "tokens_trained": 4, "device": "cuda"}
    out = cost.priced(item, params=10, gpu_price=2.0, cpu_price=0.5)
    assert out == {
        "device_seconds": 3600, "wall_seconds": 100, "tokens_trained": 4, "tokens_evaluated": 0,
        "flops": 240.0, "usd": 2.0,
    }  # fmt: skip
    mixture = {
        "device_seconds": 5400, "train_device_seconds": 3600, "eval_device_seconds": 1800,
        "device": "cuda", "eval_device": "cpu", "tokens_trained": 1, "tokens_evaluated": 1,
    }  # fmt: skip
    out = cost.priced(mixture, params=1, gpu_price=2.0, cpu_price=0.5)
    assert out["usd"] == pytest.approx(2.0 + 0.25)
    assert out["flops"] == 8.0


def test_total_sums_but_concurrent_wall_time_is_the_longest():
    a = dict.fromkeys(cost.KEYS, 1.0) | {"wall_seconds": 10.0}
    b = dict.fromkeys(cost.KEYS, 2.0) | {"wall_seconds": 30.0}
    assert cost.total([a, b])["wall_seconds"] == 40.0
    together = cost.total([a, b], concurrent=True)
    assert together["wall_seconds"] == 30.0
    assert together["device_seconds"] == 3.0 and together["usd"] == 3.0


def test_reduction_is_one_minus_dem_over_baseline():
    dem = dict.fromkeys(cost.KEYS, 1.0)
    base = dict.fromkeys(cost.KEYS, 4.0) | {"tokens_evaluated": 0.0}
    red = cost.reduction(dem, base)
    assert red["device_seconds"] == pytest.approx(0.75)
    assert red["usd"] == pytest.approx(0.75)
    assert red["tokens_evaluated"] is None


def test_evaluations_to_reach():
    values = [3.0, 2.5, 2.6, 2.02, 2.0]
    assert cost.evaluations_to_reach(values, 2.0 * 1.01) == 4
    assert cost.evaluations_to_reach(values, 2.0) == 5
    assert cost.evaluations_to_reach(values, 1.9) is None
