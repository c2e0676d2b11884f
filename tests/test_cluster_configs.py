"""cluster/: launcher YAMLs against the launcher's own schema; KubeRay manifests for the fields
KubeRay needs; every image on the Ray and Python versions dem-ray pins."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
LAUNCHER = ["aws.yaml", "gcp.yaml"]
IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"


def schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_yaml_matches_the_schema(name):
    config = load(name)
    jsonschema.validate(config, schema())
    assert config["provider"]["type"] == name.removesuffix(".yaml")


def test_the_schema_rejects_what_the_launcher_would():
    """The check above can fail: a misspelt key or a fractional GPU count is refused."""
    config = load("aws.yaml")
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_worker"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema())
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema())


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_shape(name):
    config = load(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no training on the head
    workers = [t for key, t in types.items() if key != config["head_node_type"]]
    assert workers
    for worker in workers:
        assert worker["min_workers"] == 0 < worker["max_workers"] <= config["max_workers"]
        assert worker["resources"]["GPU"] >= 1
        assert any(k.startswith("accelerator_type:") for k in worker["resources"])
    assert config["docker"]["image"] == IMAGE
    assert config["file_mounts"] == {"~/dem-ray": "."}
    assert any(
        "pip install" in c and "$HOME/dem-ray[downstream]" in c for c in config["setup_commands"]
    )
    assert "/mnt/dem" in " ".join(config["initialization_commands"])
    assert "-v /mnt/dem:/mnt/dem" in config["docker"]["run_options"]
    assert any("--head" in c for c in config["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in c for c in config["worker_start_ray_commands"])


def test_gcp_gpu_nodes_have_accelerators():
    worker = load("gcp.yaml")["available_node_types"]["gpu_worker"]["node_config"]
    assert worker["guestAccelerators"][0]["acceleratorCount"] >= 1
    assert worker["scheduling"][0]["onHostMaintenance"] == "TERMINATE"


def test_dockerfile_uses_the_pinned_ray_image():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^FROM (\S+)$", text, re.M).group(1) == IMAGE
    assert 'pip install --no-cache-dir -e "/home/ray/dem-ray[downstream]"' in text


def test_raycluster_manifest():
    cluster = load("kuberay/raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_pod = head["template"]["spec"]
    head_container = head_pod["containers"][0]
    assert head_container["image"].endswith("/dem-ray:0.1.0")
    assert {p["containerPort"] for p in head_container["ports"]} >= {6379, 8265}
    claim = load("kuberay/storage.yaml")
    assert claim["kind"] == "PersistentVolumeClaim"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]

    def volume_at(pod: dict, path: str) -> dict:
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        return {v["name"]: v for v in pod["volumes"]}[mounts[path]]

    assert volume_at(head_pod, "/etc/dem-ray")["configMap"]["name"] == "dem-ray-run-config"
    run_storage = volume_at(head_pod, "/mnt/dem")["persistentVolumeClaim"]
    assert run_storage["claimName"] == claim["metadata"]["name"]
    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["groupName"]
        assert "rayStartParams" in group
        assert 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] >= 1
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        assert container["image"] == head_container["image"]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert container["resources"]["limits"] == container["resources"]["requests"]
        assert volume_at(pod, "/mnt/dem")["persistentVolumeClaim"] == run_storage


def test_rayjob_manifest_runs_dem_ray_on_the_cluster():
    job = load("kuberay/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert (
        spec["clusterSelector"]["ray.io/cluster"]
        == load("kuberay/raycluster.yaml")["metadata"]["name"]
    )
    assert spec["entrypoint"] == "dem-ray run /etc/dem-ray/run.yaml"
    submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
    assert submitter["image"].endswith("/dem-ray:0.1.0")
