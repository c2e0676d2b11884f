"""Cost arithmetic for the DEM-vs-baseline report. Pure: numbers in, numbers out.

A cost item is what one stage (or one mixture) measured: device-seconds (GPU-seconds
on GPUs, CPU core-seconds on CPUs), wall seconds, tokens trained and evaluated, and
the kind of device, which sets the price.
"""

from __future__ import annotations

from collections.abc import Iterable

KEYS = ("device_seconds", "wall_seconds", "tokens_trained", "tokens_evaluated", "flops", "usd")


def flops(params: int, tokens_trained: float, tokens_evaluated: float) -> float:
    """Forward+backward is ~6 FLOPs per parameter per token, a forward pass ~2."""
    return 6.0 * params * tokens_trained + 2.0 * params * tokens_evaluated


def usd(device_seconds: float, device: str, usd_per_gpu_hour: float, usd_per_cpu_hour: float):
    price = usd_per_gpu_hour if device == "cuda" else usd_per_cpu_hour
    return device_seconds / 3600.0 * price


def priced(item: dict, params: int, gpu_price: float, cpu_price: float) -> dict:
    """One measured item with its FLOPs and dollars filled in."""
    trained = item.get("tokens_trained", 0)
    evaluated = item.get("tokens_evaluated", 0)
    if "train_device_seconds" in item:  # a baseline mixture: trained and evaluated apart
        dollars = usd(item["train_device_seconds"], item.get("device", "cpu"), gpu_price,
                      cpu_price) + usd(item["eval_device_seconds"],
                                       item.get("eval_device", "cpu"), gpu_price, cpu_price)  # fmt: skip
    else:
        dollars = usd(item.get("device_seconds", 0.0), item.get("device", "cpu"), gpu_price,
                      cpu_price)  # fmt: skip
    return {
        "device_seconds": item.get("device_seconds", 0.0),
        "wall_seconds": item.get("wall_seconds", 0.0),
        "tokens_trained": trained,
        "tokens_evaluated": evaluated,
        "flops": flops(params, trained, evaluated),
        "usd": dollars,
    }


def total(items: Iterable[dict], concurrent: bool = False) -> dict:
    """Sum priced items; items that ran concurrently take the longest wall time, not the sum."""
    out = dict.fromkeys(KEYS, 0.0)
    for item in items:
        for key in KEYS:
            if key == "wall_seconds" and concurrent:
                out[key] = max(out[key], item[key])
            else:
                out[key] += item[key]
    return out


def reduction(dem: dict, baseline: dict) -> dict:
    """1 - dem / baseline for every key (None where the baseline spent nothing)."""
    return {k: (1.0 - dem[k] / baseline[k]) if baseline[k] else None for k in KEYS}


def evaluations_to_reach(objectives: list[float], target: float) -> int | None:
    """1-based count of evaluations until one scores <= target (lower is better), or None."""
    for i, value in enumerate(objectives, 1):
        if value <= target:
            return i
    return None
