"""Smoke runs of benchmarks/*.py at their smallest size: they exit 0 and print their figures.

Each runs as its own subprocess, the way a user runs it. The figures themselves are
not checked (the machine is shared and noisy); only that they are there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--size", "tiny", "--repeats", "1", "--threads", "1"]


def run(script: str, *args: str, tmp_path: Path, check: bool = True, timeout: int = 300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check:
        assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done


def test_candidate_throughput(tmp_path):
    out = tmp_path / "ct.json"
    args = [*SMALL, "--rows", "2", "--seq-len", "64", "--no-mergekit", "--merge-repeats", "3"]
    done = run(
        "candidate_throughput.py",
        *args,
        "--cache-dir",
        str(tmp_path),
        "--json",
        str(out),
        tmp_path=tmp_path,
    )
    for figure in (
        "candidates/s",
        "overhead / (a)",
        "(0) forward alone",
        "(a) resident, float32 vectors",
        "(a) resident, bfloat16 vectors",
        "(b) disk: state dict + save + load",
        "(b') disk: dem_ray merge_to_dir + load",
        "mergekit: unavailable (not requested",
        "apply, bfloat16 vectors",
        "bandwidth floor",
    ):
        assert figure in done.stdout, figure
    figures = json.loads(out.read_text())
    assert figures["methods"]["(a) resident, float32 vectors"]["candidates_per_second"] > 0
    assert figures["merge_alone"]["float32"]["floor_seconds"] > 0


def test_merge_bandwidth(tmp_path):
    out = tmp_path / "mb.json"
    done = run("merge_bandwidth.py", *SMALL, "--ks", "2,4", "--json", str(out), tmp_path=tmp_path)
    for figure in ("apply GB/s", "copy GB/s", "apply/copy", "addmv/copy", "bfloat16", "float32"):
        assert figure in done.stdout, figure
    results = json.loads(out.read_text())["results"]
    assert {(r["vector_dtype"], r["k"]) for r in results} == {
        (d, k) for d in ("float32", "bfloat16") for k in (2, 4)
    }
    # the previous kernel sums in another order: the same merge to float32 rounding
    assert all(r["addmv_max_abs_diff"] < 1e-6 for r in results)


def test_vector_memory(tmp_path):
    out = tmp_path / "vm.json"
    done = run(
        "vector_memory.py",
        *SMALL,
        "--ks",
        "2",
        "--cache-dir",
        str(tmp_path),
        "--json",
        str(out),
        tmp_path=tmp_path,
    )
    assert "peak RSS / model size" in done.stdout
    assert "model size on disk" in done.stdout
    figures = json.loads(out.read_text())
    assert set(figures["ks"]) == {"2"}
    assert figures["model_bytes"] > 0


def test_merge_memory(tmp_path):
    out = tmp_path / "mm.json"
    done = run("merge_memory.py", *SMALL, "--max-shard-size", "1MB", "--cache-dir",
               str(tmp_path), "--json", str(out), tmp_path=tmp_path)  # fmt: skip
    for figure in ("peak RSS / model size", "work peak - start RSS / model size", "shards"):
        assert figure in done.stdout, figure
    figures = json.loads(out.read_text())
    assert set(figures["variants"]) == {"float32/linear", "bfloat16/linear"}
    for variant in figures["variants"].values():
        assert variant["model_bytes"] > 0 and variant["peak_rss"] > 0
        assert len(variant["shards"]) > 1  # the tiny model (10 MB) in 1 MB shards


def test_search_efficiency(tmp_path):
    out = tmp_path / "se.json"
    args = ["--ks", "3", "--grid-steps", "3:0.25", "--tpe-budget", "8", "--docs", "60"]
    args += ["--pretrain-steps", "4", "--finetune-steps", "3", "--val-rows", "4"]
    args += ["--tune-seeds", "1", "--tune-budget", "6", "--slices", "2"]
    done = run("search_efficiency.py", *SMALL, *args, "--json", str(out), tmp_path=tmp_path)
    for figure in ("grid evals", "TPE evals (median)", "tokens/eval", "tokens (ASHA)"):
        assert figure in done.stdout, figure
    result = json.loads(out.read_text())["results"][0]
    assert result["grid_points"] == 15  # the simplex grid for k=3 at step 0.25
    assert result["tokens_per_evaluation"] == 3 * 4 * 63
    for arm in ("none", "asha"):
        (seed,) = result["tune_arms"][arm]
        assert seed["tokens_total"] <= 6 * 3 * 4 * 63
    assert result["tune_arms"]["none"][0]["tokens_total"] == 6 * 3 * 4 * 63


def test_lora_vectors(tmp_path):
    out = tmp_path / "lv.json"
    args = [*SMALL, "--k", "2", "--rank", "4", "--rows", "1", "--seq-len", "16"]
    done = run("lora_vectors.py", *args, "--json", str(out), tmp_path=tmp_path)
    for figure in ("resident MiB", "apply ms", "candidates/s", "dense / low-rank", "low-rank"):
        assert figure in done.stdout, figure
    results = json.loads(out.read_text())
    low, dense = results["results"]["low-rank"], results["results"]["dense"]
    assert low["resident_bytes"] < dense["resident_bytes"]
    assert low["vector_file_bytes"] < dense["vector_file_bytes"] / 4
    assert low["candidates_per_second"] > 0 and dense["candidates_per_second"] > 0
    assert results["max_abs_diff"] < 1e-6  # the same merge, summed in another order


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is absent")
def test_cuda_refused_clearly(tmp_path):
    done = run("merge_bandwidth.py", *SMALL, "--device", "cuda", tmp_path=tmp_path, check=False)
    assert done.returncode != 0
    assert "sees no CUDA device" in done.stderr


def test_search_load(tmp_path):
    """300 trials, 4 in flight, resumed after 30 on the same evaluator: no trial is run
    twice and the evaluator's memory after 300 trials is within 10% of after 30."""
    out = tmp_path / "sl.json"
    args = ["--size", "tiny", "--threads", "1", "--trials", "300", "--first", "30"]
    args += ["--concurrent", "4", "--rows", "2", "--seq-len", "32"]
    done = run("search_load.py", *args, "--json", str(out), tmp_path=tmp_path, timeout=2400)
    for figure in ("evaluator RSS MiB", "trials/s", "after 300 / after 30 trials"):
        assert figure in done.stdout, figure
    figures = json.loads(out.read_text())
    assert figures["calls"] == 300  # resumed: the first 30 trials were not evaluated again
    assert figures["rss_first_bytes"] > 0
    assert figures["rss_all_bytes"] <= 1.10 * figures["rss_first_bytes"]


def test_search_overhead(tmp_path):
    out = tmp_path / "so.json"
    args = ["--size", "tiny", "--threads", "1", "--actors", "1", "--trials", "6", "--skip", "1"]
    args += ["--rows", "1,2", "--seq-len", "32", "--repeats", "1"]
    done = run("search_overhead.py", *args, "--json", str(out), tmp_path=tmp_path)
    for figure in ("fixed ms/trial (a)", "per-token ratio", "min utilisation", "a - merge"):
        assert figure in done.stdout, figure
    figures = json.loads(out.read_text())
    assert [leg["rows"] for leg in figures["legs"]] == [1, 2]
    for leg in figures["legs"]:
        assert leg["tokens_per_trial"] > 0 and all(0 < u <= 1 for u in leg["utilisation"])
    assert figures["legs"][1]["tokens_per_trial"] == 2 * figures["legs"][0]["tokens_per_trial"]


def test_noop_run(tmp_path):
    out = tmp_path / "noop.json"
    done = run("noop_run.py", "--size", "tiny", "--repeats", "1", "--cache-dir", str(tmp_path),
               "--json", str(out), tmp_path=tmp_path, timeout=600)  # fmt: skip
    assert "default" in done.stdout and "--verify" in done.stdout
    figures = json.loads(out.read_text())
    default, verify = figures["median"]["default"], figures["median"]["--verify"]
    assert default["hashed"] == 0  # a no-op trusts what it recorded: nothing re-hashed
    assert verify["hashed"] >= figures["artifacts_bytes"] * 0.5  # --verify reads them all


def test_prepare_throughput(tmp_path):
    out = tmp_path / "pt.json"
    done = run("prepare_throughput.py", "--size", "tiny", "--mb", "1", "--variants",
               "loop,local", "--cache-dir", str(tmp_path), "--json", str(out),
               tmp_path=tmp_path)  # fmt: skip
    for figure in ("(a) tokenizer(batch) loop", "(b) engine local", "tokens/s", "/ file size"):
        assert figure in done.stdout, figure
    assert out.exists()


def test_finetune_precision(tmp_path):
    out = tmp_path / "fp.json"
    done = run("finetune_precision.py", *SMALL, "--seq-len", "32", "--variants",
               "fp32,bf16-mixed,bf16-mixed+ckpt", "--json", str(out), tmp_path=tmp_path)  # fmt: skip
    for figure in ("s/step", "tokens/s", "time / fp32", "step peak MiB", "bf16 autocast"):
        assert figure in done.stdout, figure
    figures = json.loads(out.read_text())
    assert set(figures["variants"]) == {"fp32", "bf16-mixed", "bf16-mixed+ckpt"}
    assert all(v["seconds"] > 0 for v in figures["variants"].values())
    assert figures["tokens_per_step"] == 4 * 32


def test_plan_accuracy(tmp_path):
    out = tmp_path / "pa.json"
    done = run("plan_accuracy.py", "--size", "tiny", "--threads", "1", "--steps", "2", "--jobs",
               "2", "--variants", "train-lora,eval-bf16", "--json", str(out),
               tmp_path=tmp_path)  # fmt: skip
    for figure in (
        "estimate MiB",
        "measured MiB",
        "estimate / measured",
        "train-lora",
        "eval-bf16",
    ):
        assert figure in done.stdout, figure
    figures = json.loads(out.read_text())
    assert set(figures["variants"]) == {"train-lora", "eval-bf16"}
    for variant in figures["variants"].values():
        assert variant["estimate"] > 0 and variant["measured"] > 0 and variant["ratio"] > 0
