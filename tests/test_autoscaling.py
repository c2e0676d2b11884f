"""The fine-tunes scale a cluster out: Ray's fake multi-node autoscaler adds 1-CPU nodes to
a head that has no CPU, while every fine-tune waits for one.

The head is `ray start --head` with an autoscaling config whose provider is
`fake_multinode`: its monitor starts each "node" as a raylet on this host. The driver runs
in a child process (tests/fake_autoscaler.py), apart from the suite's session Ray. Only
this cluster's processes are ended afterwards, found by its temp dir (never `ray stop`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import kill_processes_under

DRIVER = Path(__file__).with_name("fake_autoscaler.py")
RAY = Path(sys.executable).with_name("ray")
MIB = 1024**2
STORE = 80 * MIB  # each node's object store: the least Ray takes
WORKER_TYPE = "cpu.1"
MAX_WORKERS = 3
DEADLINE_S = 300  # a guard only: the whole test takes far less


def autoscaling_config(gcs_address: str) -> dict:
    """What the monitor reads (as is: Ray fills in no defaults for this provider)."""
    return {
        "cluster_name": "demray-fake",
        "max_workers": MAX_WORKERS,
        "upscaling_speed": 100.0,  # every pending fine-tune's node at once
        "idle_timeout_minutes": 10,  # no node goes while the test runs
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,  # else it assumes port 6379
            "launch_multiple": True,  # else one node per launch, whatever the count
            "use_node_id_as_ip": True,  # every fake node has this host's IP
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {},
        "docker": {},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {
                "resources": {"CPU": 1, "object_store_memory": STORE},
                "node_config": {},
                "min_workers": 0,
                "max_workers": MAX_WORKERS,
            },
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def processes_under(temp_dir: Path) -> list[int]:
    """Live processes of the cluster: their command line names `temp_dir`, or they inherited
    RAY_TMPDIR=`temp_dir` from `ray start` (Ray's workers rename their command line, and
    its client server's names no dir)."""
    mark = str(temp_dir).encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone, or another user's
            continue
        if state != "Z" and (mark in cmdline or b"RAY_TMPDIR=" + mark in environ):
            found.append(int(proc.name))
    return found


def autoscaler_events(temp_dir: Path) -> list[str]:
    """What the autoscaler did and warned about, from its log (gone with the temp dir)."""
    log = temp_dir / "session_latest" / "logs" / "monitor.log"
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    marks = (":event_summary:", " WARNING ", " ERROR ")
    return [line for line in lines if any(mark in line for mark in marks)]


def end_cluster(temp_dir: Path) -> None:
    """SIGKILL this cluster's processes, and no others; wait until they are gone."""
    kill_processes_under(temp_dir)  # those that name the dir: gcs, raylets, monitor, ...
    deadline = time.monotonic() + 15
    while (left := processes_under(temp_dir)) and time.monotonic() < deadline:
        for pid in left:  # the workers the raylets left, and the client server
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def test_finetunes_start_as_the_autoscaler_adds_nodes(
    tiny_base, tiny_data, make_config, free_ports, tmp_path
):
    t0 = time.monotonic()
    raw = make_config(
        tmp_path / "run", tiny_base, tiny_data,
        # One 1-CPU worker each: a fine-tune fills a node. max_failures 0: a lost worker
        # fails the run instead of resuming out of sight.
        finetune={"max_steps": 2, "log_every": 1, "cpus_per_worker": 1, "max_failures": 0},
    )  # fmt: skip
    assert "max_concurrent" not in raw["finetune"]
    config = tmp_path / "config.json"
    config.write_text(json.dumps(raw))
    result_file = tmp_path / "result.json"
    k = len(raw["datasets"])
    assert k == MAX_WORKERS == 3

    temp_dir = Path("/tmp") / f"demray-as-{os.getpid()}"
    gcs, client, agent, dashboard = free_ports(4)
    gcs_address = f"127.0.0.1:{gcs}"
    scaling = temp_dir / "autoscaling.json"  # JSON is YAML
    # RAY_FAKE_CLUSTER: the monitor may use the fake provider, and `ray start` gives the head
    # the node id the provider expects (FAKE_HEAD_NODE_ID). RAY_TMPDIR: the head notes its
    # address there, not in /tmp/ray where another `ray.init()` on this host would look.
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "RAY_TMPDIR": str(temp_dir), "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    driver, events = None, []
    try:
        (temp_dir / "ray").mkdir(parents=True, exist_ok=True)
        scaling.write_text(json.dumps(autoscaling_config(gcs_address)))
        started = subprocess.run(
            [str(RAY), "start", "--head", f"--autoscaling-config={scaling}", f"--port={gcs}",
             "--num-cpus=0", f"--temp-dir={temp_dir}", f"--object-store-memory={STORE}",
             "--include-dashboard=false", f"--dashboard-port={dashboard}",
             f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
             "--disable-usage-stats"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr[-4000:]
        t_head = time.monotonic()
        driver = subprocess.Popen(
            [sys.executable, str(DRIVER), str(config), gcs_address, str(result_file)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            out, err = driver.communicate(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            os.killpg(driver.pid, signal.SIGKILL)
            out, err = driver.communicate()
            raise AssertionError(f"no result after {DEADLINE_S} s:\n{err[-4000:]}") from None
    finally:
        if driver is not None and driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        events = autoscaler_events(temp_dir)
        end_cluster(temp_dir)
    left = processes_under(temp_dir)
    assert not left, f"processes of the fake cluster still up: {left}"
    print("\nautoscaler:", *events, sep="\n  ")
    assert driver.returncode == 0, (out[-2000:], err[-4000:])
    result = json.loads(result_file.read_text())
    print(
        f"autoscaling test: head up in {t_head - t0:.1f} s, prepare + finetune "
        f"{result['finetune_seconds']:.1f} s, total {time.monotonic() - t0:.1f} s"
    )

    head, nodes = result["head"], result["nodes"]  # node ids
    assert result["nodes_before"] == [head]  # no worker node before the demand
    assert nodes[head]["cpus"] == 0
    # The nodes up at the end. On a loaded host the autoscaler may have started and ended
    # others too (a dead node lists no resources).
    workers = {node for node, info in nodes.items() if node != head and info["alive"]}
    assert 1 < len(workers) <= MAX_WORKERS, nodes
    assert all(nodes[node]["cpus"] == 1 for node in workers)

    names = sorted(raw["datasets"])
    assert sorted(result["entries"]) == names  # all finished (a failed one fails the stage)
    used = {result["entries"][n]["node_id"] for n in names}
    assert len(used) > 1, used
    assert used <= workers  # each on a node the autoscaler added, none on the head
    for name in names:
        entry = result["entries"][name]
        assert entry["steps"] == 2
        assert entry["resumed_from_step"] == 0  # no restart
        assert (tmp_path / "run" / "finetune" / name / "config.json").is_file()
    # One placement group per fine-tune: none timed out waiting for its node (Ray Train
    # would have removed it and asked again with a new one).
    groups = result["placement_groups"]
    assert len(groups) == k, groups
    assert all(g["bundles"] == [{"CPU": 1.0}] for g in groups), groups
