"""Run a whole pipeline on a `ray.cluster_utils.Cluster` of simulated nodes; print placements.

Run as its own process by tests/test_cluster.py, because the suite's session Ray and a
Cluster cannot live in one process. Usage: simulated_cluster.py CONFIG.json TEMP_DIR GCS_PORT DASHBOARD_PORT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from dem_ray.config import parse_config
from dem_ray.pipeline import Pipeline
from dem_ray.stages import COMMANDS

MIB = 1024**2


def main(config_path: str, temp_dir: str, gcs: int, dashboard: int) -> None:
    common = {"object_store_memory": 80 * MIB}
    # The head (where the driver runs) and one more node hold the evaluators, a third node
    # the fine-tunes: custom resources say which is which. Each evaluator node could hold both
    # actors, so only SPREAD puts them on different nodes.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1, "resources": {"eval_node": 2}, "temp_dir": temp_dir,
            "gcs_server_port": gcs, "include_dashboard": False, "dashboard_port": dashboard,
            **common,
        },
    )  # fmt: skip
    roles = {
        cluster.head_node.node_id: "eval-1",
        cluster.add_node(num_cpus=1, resources={"eval_node": 2}, **common).node_id: "eval-2",
        cluster.add_node(num_cpus=2, resources={"trainer_node": 2}, **common).node_id: "trainer",
    }
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)

    raw = json.loads(Path(config_path).read_text())
    pipeline = Pipeline(parse_config(raw, source=config_path), ray_address=cluster.address)
    pipeline.open()
    for command in COMMANDS:
        pipeline.run_command(command)
    finetunes = {
        n: roles[pipeline.manifest.entry(f"finetune/{n}")["node_id"]] for n in pipeline.names
    }
    evaluators = sorted(roles[ray.get(a.info.remote())["node_id"]] for a in pipeline.evaluators())
    pipeline.ctx.pool.release()
    print(json.dumps({"ran": pipeline.ran, "finetunes": finetunes, "evaluators": evaluators}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
