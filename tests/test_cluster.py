"""cluster/: the AWS launcher config and image (checked offline), and the local multi-node cluster."""

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"


def _pin(name: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (dep,) = [d for d in deps if re.match(rf"{re.escape(name)}(\[|=)", d)]
    return dep.split("==")[1]


RAY_VERSION = _pin("ray")  # 2.60.0
PY_TAG = "py311"  # requires-python = ">=3.11,<3.12"


def _pip_installs_project(line: str) -> bool:
    """A `pip install` that installs this project (which carries the pins), nothing unpinned."""
    args = line.split("pip install", 1)[1].split("&&")[0].split()
    targets = [a for a in args if not a.startswith("-")]
    return targets == ["."]


def test_python_tag_matches_pyproject():
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"] == ">=3.11,<3.12"


def test_aws_config_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    # prepare_config only merges Ray's defaults.yaml (no AWS call); validate_config checks the schema.
    config = prepare_config(raw)
    validate_config(config)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # drivers only, never training
    gpu = types["gpu_worker"]
    assert gpu["resources"]["GPU"] == 1 and gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    for t in types.values():
        assert set(t["node_config"]["IamInstanceProfile"]) == {"Name"}


def test_aws_config_pins_our_image_and_no_secrets():
    raw = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    docker = raw["docker"]
    assert docker["container_name"]
    for key in ("image", "head_image", "worker_image"):
        if key in docker:
            assert f"ray{RAY_VERSION}" in docker[key] and PY_TAG in docker[key], docker[key]
    assert docker["worker_image"].endswith("-gpu")
    commands = [c for k, v in raw.items() if k.endswith("_commands") for c in v]
    for c in commands:
        if "pip install" in c:
            assert _pip_installs_project(c), c
    text = (CLUSTER / "aws.yaml").read_text()
    assert not re.search(r"AWS_SECRET|AWS_ACCESS|SESSION_TOKEN|AKIA[0-9A-Z]{16}", text)


def test_dockerfile_base_pins_and_user():
    text = (CLUSTER / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    (arg,) = [ln for ln in lines if ln.startswith("ARG RAY_IMAGE=")]
    # Ray's plain image for both flavours: torch's own CUDA wheels, not a base image's toolkit.
    assert arg == f"ARG RAY_IMAGE=rayproject/ray:{RAY_VERSION}-{PY_TAG}"
    assert "FROM ${RAY_IMAGE}" in lines
    # Besides the project, only the CPU flavour's torch (tests/test_k8s.py checks that line).
    installs = [ln for ln in lines if "pip install" in ln and "torch==" not in ln]
    assert installs and all(_pip_installs_project(ln) for ln in installs)
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith("0:")
    assert not re.search(r"AWS_SECRET|AWS_ACCESS|SESSION_TOKEN|AKIA[0-9A-Z]{16}", text)
    # Only these enter the image (no root .dockerignore): never .venv, .git or run outputs.
    copied = {p for ln in lines if ln.startswith("COPY") for p in ln.split()[1:-1] if not p.startswith("--")}
    assert copied == {"pyproject.toml", "README.md", "vits_ray/", "jobs/"}
    for p in copied:
        assert (ROOT / p).exists()


# Runs in a subprocess: this pytest process may already hold the session's in-process cluster
# (the ray_local fixture), and one process can only ray.init() once.
_PROBE = """
import json, sys, ray
ray.init(address=sys.argv[1], configure_logging=False, log_to_driver=False)
alive = [n for n in ray.nodes() if n["Alive"]]
worker = [n["NodeID"] for n in alive if "node_w1" in n["Resources"]]

@ray.remote(num_cpus=1, resources={"node_w1": 0.01})
def where():
    return ray.get_runtime_context().get_node_id()

print(json.dumps({"alive": len(alive), "worker": worker, "ran_on": ray.get(where.remote(), timeout=30)}))
"""


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_local_multinode_cluster(tmp_path, ray_local):
    """ray_local: this session's in-process cluster, which starting and stopping ours must not touch."""
    import psutil
    import ray

    sys.path.insert(0, str(CLUSTER))
    try:
        import local
    finally:
        sys.path.remove(str(CLUSTER))

    run = [sys.executable, str(CLUSTER / "local.py")]
    state = tmp_path / "c"
    # Ray processes on the machine before: another cluster's (this session's ray.init()) must survive.
    before = {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] in ("raylet", "gcs_server")}
    try:
        subprocess.run([*run, "start", "--workers", "1", "--dir", str(state)], check=True, timeout=60,
                       capture_output=True)
        info = json.loads((state / "cluster.json").read_text())
        assert Path(info["token_path"]).stat().st_mode & 0o077 == 0
        ours = local._cluster_procs(info)
        assert {p.name() for p in ours} >= {"gcs_server", "raylet"} and not {p.pid for p in ours} & before
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=info["token_path"],
                   RAY_enable_metrics_collection="0")
        out = subprocess.run([sys.executable, "-c", _PROBE, info["address"]], env=env, check=True,
                             capture_output=True, text=True, timeout=60).stdout
        probe = json.loads(out.strip().splitlines()[-1])
        assert probe["alive"] == 2
        assert probe["worker"] == [probe["ran_on"]]
    finally:
        subprocess.run([*run, "stop", "--dir", str(state)], timeout=30)
    assert not (state / "cluster.json").exists()
    assert not [p for p in ours if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not Path(info["temp_dir"]).exists()
    still = {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] in ("raylet", "gcs_server")}
    assert before <= still  # nobody else's Ray was stopped
    assert ray.get(ray.remote(lambda: 7).remote(), timeout=30) == 7  # and the session's still works
