"""Placement on several nodes: a `ray.cluster_utils.Cluster` whose nodes carry custom resources.

The Cluster runs in a child process (tests/simulated_cluster.py): it needs its own Ray, apart
from the suite's session one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("simulated_cluster.py")


def test_finetunes_and_evaluators_go_where_resources_say(
    tiny_base, tiny_data, make_config, free_ports, tmp_path
):
    data = {n: tiny_data[n] for n in ("numbers", "code")}
    raw = make_config(
        tmp_path / "run", tiny_base, data,
        finetune={"max_steps": 4, "log_every": 2, "resources": {"trainer_node": 1}},
        search={"num_trials": 2},
        evaluator={"num_actors": 2, "resources": {"eval_node": 1}},
    )  # fmt: skip
    config = tmp_path / "config.json"
    config.write_text(json.dumps(raw))
    temp_dir = Path("/tmp") / f"demray-cl-{os.getpid()}"
    (temp_dir / "ray").mkdir(parents=True, exist_ok=True)  # where RAY_TMPDIR notes the address
    # RAY_TMPDIR: the Cluster notes its address there, not in /tmp/ray where `ray.init()`
    # elsewhere on this host would find it.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "RAY_TMPDIR": str(temp_dir)}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(config), str(temp_dir), *map(str, free_ports(2))],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = process.communicate(timeout=420)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert process.returncode == 0, err[-4000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["finetunes"] == {"numbers": "trainer", "code": "trainer"}
    assert result["evaluators"] == ["eval-1", "eval-2"]  # one on each evaluator node
    assert "report" in result["ran"]
    assert (tmp_path / "run" / "report" / "report.json").is_file()
