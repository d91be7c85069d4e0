"""Static checks of the cluster configs in clusters/ (no Ray instance, no cloud, no network).

* Ray cluster-launcher YAMLs (clusters/*.yaml) are validated against the JSON schema shipped in
  the installed Ray wheel (ray/autoscaler/ray-schema.json) and then through Ray's own
  ``prepare_config`` + ``validate_config``, which is what ``ray up`` runs before it talks to a
  cloud.
* KubeRay manifests (clusters/kuberay/*.yaml) are checked for the fields the operator needs.
* Every docker image is a ``rayproject/ray:2.60.0*`` tag (ray-ml images are discontinued), and
  docs/clusters.md mentions every file in clusters/.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"
DOCS = REPO / "docs" / "clusters.md"

LAUNCHER_CONFIGS = sorted(CLUSTERS.glob("*.yaml"))
KUBERAY_MANIFESTS = sorted((CLUSTERS / "kuberay").glob("*.yaml"))
ALL_YAML = sorted([*CLUSTERS.rglob("*.yaml"), *CLUSTERS.rglob("*.yml")])

RAY_IMAGE_PREFIX = "rayproject/ray:2.60.0"
IMAGE_KEYS = {"image", "head_image", "worker_image"}
KUBERAY_SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode"}


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _load_one(path: Path) -> dict[str, Any]:
    docs = _load_all(path)
    assert len(docs) == 1, f"{_rel(path)}: expected one YAML document, got {len(docs)}"
    assert isinstance(docs[0], dict), f"{_rel(path)}: top level must be a mapping"
    return docs[0]


def _walk(node: Any, path: str = ""):
    """Yield (dotted_path, key, value) for every mapping entry, recursively."""
    if isinstance(node, dict):
        for key, value in node.items():
            sub = f"{path}.{key}" if path else str(key)
            yield sub, key, value
            yield from _walk(value, sub)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _walk(item, f"{path}[{i}]")


@pytest.fixture(scope="module")
def ray_schema() -> dict[str, Any]:
    # find_spec locates the installed wheel without importing ray (keeps this test fast).
    spec = importlib.util.find_spec("ray")
    if spec is None or spec.origin is None:
        pytest.skip("ray is not installed")
    schema_path = Path(spec.origin).parent / "autoscaler" / "ray-schema.json"
    assert schema_path.is_file(), f"schema missing from the Ray wheel: {schema_path}"
    return json.loads(schema_path.read_text())


def test_expected_files_exist():
    names = {_rel(p) for p in ALL_YAML}
    for required in (
        "clusters/aws-gpu.yaml",
        "clusters/gcp-gpu.yaml",
        "clusters/kuberay/raycluster.yaml",
        "clusters/kuberay/rayjob.yaml",
    ):
        assert required in names
    assert (CLUSTERS / "local.sh").is_file()


# --------------------------------------------------------------------------------------------
# Ray cluster launcher configs


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_matches_ray_schema(path: Path, ray_schema: dict[str, Any]):
    config = _load_one(path)
    validator = jsonschema.Draft7Validator(ray_schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_ray_schema_is_strict_enough_to_catch_mistakes(ray_schema: dict[str, Any]):
    # Guards against a vacuous check: typos and fractional resources must be rejected.
    config = _load_one(CLUSTERS / "aws-gpu.yaml")
    typo = copy.deepcopy(config)
    typo["idle_timeout_minute"] = 10
    fractional = copy.deepcopy(config)
    fractional["available_node_types"]["head"]["resources"] = {"CPU": 0.5}
    for bad in (typo, fractional):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, ray_schema)


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_passes_rays_own_validation(path: Path):
    # prepare_config merges the provider's defaults.yaml from the wheel; validate_config runs the
    # schema plus Ray's cross-field checks. Neither needs credentials or network (bootstrapping,
    # which does, happens later in `ray up`).
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as exc:  # pragma: no cover - private API moved
        pytest.skip(f"Ray's private config validation is not importable: {exc}")
    prepared = prepare_config(_load_one(path))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_invariants(path: Path):
    cfg = _load_one(path)
    name = _rel(path)
    node_types = cfg["available_node_types"]
    head = node_types[cfg["head_node_type"]]

    assert head["resources"].get("CPU") == 0, f"{name}: head must advertise CPU: 0"
    assert cfg.get("idle_timeout_minutes", 0) > 0, f"{name}: set idle_timeout_minutes"

    workers = {k: v for k, v in node_types.items() if k != cfg["head_node_type"]}
    gpu_types = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) > 0}
    cpu_types = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) == 0}
    assert gpu_types, f"{name}: no GPU worker type"
    assert cpu_types, f"{name}: no CPU-only worker type (Ray Data decode)"
    total_min = 0
    for key, node_type in workers.items():
        assert node_type["resources"].get("CPU", 0) > 0, f"{name}:{key}: explicit CPU resources"
        assert node_type.get("min_workers", 0) == 0, f"{name}:{key}: should scale from zero"
        assert 1 <= node_type["max_workers"] <= cfg["max_workers"], f"{name}:{key}: max_workers"
        total_min += node_type.get("min_workers", 0)
    assert total_min <= cfg["max_workers"]

    assert cfg["docker"]["image"].startswith(RAY_IMAGE_PREFIX)
    assert cfg["docker"]["image"].endswith("-gpu"), f"{name}: GPU nodes need the -gpu image"

    # The repo and the auth token reach every node through file_mounts.
    mounts = cfg["file_mounts"]
    assert "~/rayoodkd" in mounts
    assert mounts.get("~/.ray/auth_token") == "~/.ray/auth_token"

    setup = "\n".join(cfg["setup_commands"])
    assert "torch<=2.14.1" in setup and "torchvision<=0.29.1" in setup
    assert "pip install -q -e ~/rayoodkd" in setup

    # Token auth must be on for every `ray start` (workers do not infer it from the token file).
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts, f"{name}: {key} has no `ray start`"
        for cmd in starts:
            assert "RAY_AUTH_MODE=token" in cmd, f"{name}: {key}: {cmd!r}"
    assert any(
        "--autoscaling-config=~/ray_bootstrap_config.yaml" in c for c in cfg["head_start_ray_commands"]
    )
    assert any("$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])


# --------------------------------------------------------------------------------------------
# KubeRay manifests


def _check_pod_template(template: dict[str, Any], where: str) -> list[dict[str, Any]]:
    containers = template["spec"]["containers"]
    assert isinstance(containers, list) and containers, f"{where}: template.spec.containers"
    for container in containers:
        assert container.get("name") and container.get("image"), f"{where}: container name/image"
    return containers


def _check_raycluster_spec(spec: dict[str, Any], where: str) -> None:
    assert str(spec.get("rayVersion", "")).startswith("2.60"), f"{where}: rayVersion"
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: enableInTreeAutoscaling"
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: authOptions.mode"

    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), f"{where}: headGroupSpec.rayStartParams"
    assert str(head["rayStartParams"].get("num-cpus")) == "0", f"{where}: keep work off the head"
    _check_pod_template(head["template"], f"{where}.headGroupSpec")

    groups = spec["workerGroupSpecs"]
    assert isinstance(groups, list) and groups, f"{where}: workerGroupSpecs"
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names), f"{where}: duplicate groupName"
    gpu_groups = 0
    for group in groups:
        gw = f"{where}.workerGroupSpecs[{group['groupName']}]"
        assert isinstance(group["minReplicas"], int) and isinstance(group["maxReplicas"], int), gw
        assert 0 <= group["minReplicas"] <= group["maxReplicas"], f"{gw}: minReplicas <= maxReplicas"
        assert isinstance(group.get("rayStartParams", {}), dict), gw
        containers = _check_pod_template(group["template"], gw)
        gpu_limits = [c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") for c in containers]
        if "gpu" in group["groupName"].lower() or any(gpu_limits):
            gpu_groups += 1
            assert all(int(x or 0) >= 1 for x in gpu_limits), f"{gw}: GPU group needs nvidia.com/gpu limits"
            assert all(c["image"].endswith("-gpu") for c in containers), f"{gw}: use the -gpu image"
    assert gpu_groups, f"{where}: no GPU worker group"


def _kuberay_docs() -> dict[str, dict[str, Any]]:
    out = {}
    for path in KUBERAY_MANIFESTS:
        for i, doc in enumerate(_load_all(path)):
            out[f"{_rel(path)}#{i}"] = doc
    return out


def test_kuberay_manifests_have_required_fields():
    docs = _kuberay_docs()
    kinds = [d.get("kind") for d in docs.values()]
    assert "RayCluster" in kinds and "RayJob" in kinds
    for where, doc in docs.items():
        assert doc["apiVersion"] == "ray.io/v1", f"{where}: apiVersion"
        assert doc["kind"] in {"RayCluster", "RayJob", "RayService"}, f"{where}: kind"
        assert doc["metadata"]["name"], f"{where}: metadata.name"
        spec = doc["spec"]
        if doc["kind"] == "RayCluster":
            _check_raycluster_spec(spec, where)
        elif doc["kind"] == "RayJob":
            assert spec["entrypoint"].startswith("python -m rayoodkd."), f"{where}: entrypoint"
            assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), (
                f"{where}: exactly one of rayClusterSpec / clusterSelector"
            )
            if "rayClusterSpec" in spec:
                _check_raycluster_spec(spec["rayClusterSpec"], f"{where}.rayClusterSpec")
                assert spec.get("shutdownAfterJobFinishes") is True, f"{where}: shutdownAfterJobFinishes"
            runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML", "{}"))
            assert isinstance(runtime_env, dict), f"{where}: runtimeEnvYAML must be a YAML mapping"
            assert spec.get("submissionMode", "K8sJobMode") in KUBERAY_SUBMISSION_MODES
            for key in ("ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit"):
                assert isinstance(spec.get(key), int) and spec[key] >= 0, f"{where}: {key}"


def test_rayjob_entrypoint_and_runtime_env_are_consistent():
    for where, doc in _kuberay_docs().items():
        if doc.get("kind") != "RayJob":
            continue
        spec = doc["spec"]
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert "--config" in spec["entrypoint"], where
        assert "storage_path=" in spec["entrypoint"] and "tracking_uri=" in spec["entrypoint"], where
        pip = runtime_env.get("pip", {})
        packages = pip.get("packages", pip) if isinstance(pip, dict) else pip
        joined = " ".join(packages)
        assert "torch<=2.14.1" in joined and "torchvision<=0.29.1" in joined, where


# --------------------------------------------------------------------------------------------
# Images, docs, scripts


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: _rel(p))
def test_docker_images_are_pinned_ray_2_60(path: Path):
    text = path.read_text()
    assert "rayproject/ray-ml" not in text, f"{_rel(path)}: ray-ml images are discontinued"
    for doc in _load_all(path):
        for dotted, key, value in _walk(doc):
            if key in IMAGE_KEYS and isinstance(value, str):
                assert value.startswith(RAY_IMAGE_PREFIX), f"{_rel(path)}:{dotted} = {value!r}"


def test_docs_mention_every_cluster_file():
    assert DOCS.is_file(), "docs/clusters.md is missing"
    text = DOCS.read_text()
    files = [p for p in CLUSTERS.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    missing = [_rel(p) for p in files if _rel(p) not in text]
    assert not missing, f"docs/clusters.md does not mention: {missing}"


def test_local_sh_is_valid_bash():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not available")
    script = CLUSTERS / "local.sh"
    result = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    head = script.read_text().splitlines()[:40]
    assert any("set -euo pipefail" in line for line in head)
