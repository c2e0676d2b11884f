"""The driver of tests/test_autoscaling.py: joins a head started with Ray's fake multi-node
autoscaler, runs `prepare` and `finetune`, and writes what the fine-tunes ran on to a JSON file.

A process of its own, because the suite's session Ray cannot share one with another
cluster. Usage: fake_autoscaler.py CONFIG.json GCS_ADDRESS RESULT.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import ray
from ray.util import placement_group_table

from dem_ray.config import parse_config
from dem_ray.pipeline import Pipeline


def main(config_path: str, address: str, result_path: str) -> None:
    ray.init(address=address, log_to_driver=False)
    # The driver joins the only node up when it starts: the head (the autoscaler starts
    # no worker before there is demand, min_workers being 0).
    head = ray.get_runtime_context().get_node_id()
    nodes_before = [n["NodeID"] for n in ray.nodes() if n["Alive"]]

    raw = json.loads(Path(config_path).read_text())
    pipeline = Pipeline(parse_config(raw, source=config_path), ray_address=address)
    pipeline.open()
    started = time.perf_counter()
    try:
        pipeline.run_command("prepare")
        pipeline.run_command("finetune")
    finally:
        pipeline.close()
    finetune_seconds = time.perf_counter() - started
    entries = {name: pipeline.manifest.entry(f"finetune/{name}") for name in pipeline.names}
    nodes = {
        n["NodeID"]: {"alive": n["Alive"], "cpus": n["Resources"].get("CPU", 0.0)}
        for n in ray.nodes()
    }
    groups = [
        {"state": g["state"], "bundles": list(g["bundles"].values())}
        for g in placement_group_table().values()
    ]
    Path(result_path).write_text(json.dumps({
        "head": head, "nodes_before": nodes_before, "nodes": nodes, "entries": entries,
        "placement_groups": groups,
        "finetune_seconds": finetune_seconds,
    }, default=str))  # fmt: skip
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
