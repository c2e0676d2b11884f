"""cluster/: launcher YAMLs against the launcher's own schema; KubeRay manifests for the fields
KubeRay needs; every image on the Ray and Python versions dem-ray pins; and every cluster locked,
with Ray's token authentication on."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.version import Version
from ray._private.authentication.authentication_token_setup import _get_default_token_path

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
LAUNCHER = ["aws.yaml", "gcp.yaml"]
KUBERAY = ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/storage.yaml"]
IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"
# Where `ray get-auth-token --generate` writes the token and where Ray reads it from when
# neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH is set: ~/.ray/auth_token.
TOKEN_FILE = "~/" + _get_default_token_path().relative_to(Path.home()).as_posix()


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
    assert config["file_mounts"] == {"~/dem-ray": ".", TOKEN_FILE: TOKEN_FILE}
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


# Token authentication: no file under cluster/ may turn it off.

AUTH_MODE_SET = re.compile(r"RAY_AUTH_MODE\s*[=:]\s*[\"']?([A-Za-z]*)")


def auth_turned_off(text: str) -> list[str]:
    """What in a file's text sets Ray's auth mode to anything but `token`, or sets it in an image
    (the nodes set it, not the image)."""
    found = [m.group(0) for m in AUTH_MODE_SET.finditer(text) if m.group(1) != "token"]
    found += re.findall(r"^\s*ENV\b.*RAY_AUTH_MODE.*$", text, re.M)
    return found


def auth_settings(doc) -> list[str]:
    """The auth settings in a KubeRay manifest that the operator must own: any container env
    entry for RAY_AUTH_MODE / RAY_AUTH_TOKEN (the operator does not override one that is set),
    and any authOptions whose mode is not `token`."""
    found = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key == "env" and isinstance(value, list):
                found += [e["name"] for e in value if e.get("name", "").startswith("RAY_AUTH_")]
            elif key == "authOptions" and (value or {}).get("mode") != "token":
                found.append(f"authOptions: {value}")
            else:
                found += auth_settings(value)
    elif isinstance(doc, list):
        for item in doc:
            found += auth_settings(item)
    return found


def test_the_auth_checks_find_what_turns_auth_off():
    """The checks below can fail: they flag what cluster/ held before it was locked."""
    assert auth_turned_off(
        "RAY_AUTH_MODE=disabled ray start --head --port=6379 --dashboard-host=0.0.0.0"
    ) == ["RAY_AUTH_MODE=disabled"]
    assert auth_turned_off("env: {RAY_AUTH_MODE: 'disabled'}") == ["RAY_AUTH_MODE: 'disabled"]
    assert auth_turned_off("ENV RAY_AUTH_MODE token") == ["ENV RAY_AUTH_MODE token"]
    assert auth_turned_off("RAY_AUTH_MODE=token ray start --head") == []
    old_head = {"containers": [{"name": "ray-head", "env": [
        {"name": "RAY_AUTH_MODE", "value": "disabled"}, {"name": "OMP_NUM_THREADS", "value": "1"},
    ]}]}  # fmt: skip
    assert auth_settings(old_head) == ["RAY_AUTH_MODE"]
    assert auth_settings({"spec": {"authOptions": {"mode": "disabled"}}}) == [
        "authOptions: {'mode': 'disabled'}"
    ]
    assert auth_settings(load("kuberay/raycluster.yaml")) == []


def test_no_file_under_cluster_turns_auth_off():
    files = [f for f in sorted(CLUSTER.rglob("*")) if f.is_file()]
    names = {f.relative_to(CLUSTER).as_posix() for f in files}
    assert names >= {*LAUNCHER, *KUBERAY, "Dockerfile", "README.md"}
    for f in files:
        assert auth_turned_off(f.read_text()) == [], f
    for name in KUBERAY:
        for doc in yaml.safe_load_all((CLUSTER / name).read_text()):
            assert auth_settings(doc) == [], name


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_keeps_token_auth_on(name):
    """Every node starts Ray with RAY_AUTH_MODE=token and has the token (the one `ray up`'s
    machine made with `ray get-auth-token --generate`), every shell in the containers runs in
    token mode, and the dashboard / Jobs API listens on the head's loopback only (reached
    through `ray dashboard`'s SSH tunnel)."""
    config = load(name)
    starts = [
        c
        for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
        if "ray start" in c
    ]
    assert len(starts) == 2
    for command in starts:
        assert command.startswith("RAY_AUTH_MODE=token ray start "), command
    assert "-e RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"][TOKEN_FILE] == TOKEN_FILE
    [head_start] = [c for c in starts if "--head" in c]
    assert re.findall(r"--dashboard-host=(\S+)", head_start) == ["127.0.0.1"]
    assert "0.0.0.0" not in (CLUSTER / name).read_text()


def test_kuberay_keeps_token_auth_on():
    """authOptions mode token on the RayCluster (KubeRay >= 1.5.1 then makes the token, keeps it
    in a Secret and sets RAY_AUTH_MODE / RAY_AUTH_TOKEN in every Ray container, the autoscaler
    and the RayJob's submitter); the RayJob runs on that cluster and sets neither itself. The
    dashboard stays on the pod's address (the submitter and the operator call it through the
    head Service), which the token now guards."""
    cluster = load("kuberay/raycluster.yaml")
    assert cluster["spec"]["authOptions"] == {"mode": "token"}
    # Ray 2.52 is the first with token authentication; KubeRay refuses authOptions below it.
    assert Version(cluster["spec"]["rayVersion"]) >= Version("2.52")
    job = load("kuberay/rayjob.yaml")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert "rayClusterSpec" not in job["spec"]  # no cluster of its own, open or not
    assert auth_settings(job) == [] and auth_settings(cluster) == []
