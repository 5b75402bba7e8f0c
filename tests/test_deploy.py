"""Deployment: the cluster configs against Ray's own schema, OVERSTORY_STORE, and the
operator commands (serve / status / health) against the session's Ray.

The end-to-end `ray up` on loopback is scripts/e2e_ray_up.sh (run by .ci/run).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import kill_namespace

from overstory import ClusterUnavailable, Config
from overstory.cli import deploy
from overstory.runtime import ops

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "cluster.yaml", *sorted((ROOT / "deploy").glob("*.yaml"))]
CLI = [sys.executable, "-m", "overstory.cli"]


def load(path: Path) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    return config


# --- the cluster configs (no Ray needed) -------------------------------------------------


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_passes_rays_own_schema(path: Path) -> None:
    import json

    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(load(path), schema)  # as written
    validate_config(prepare_config(load(path)))  # as `ray up` fills it out and checks it


def test_there_is_a_cloud_example() -> None:
    assert any(load(p)["provider"]["type"] == "aws" for p in CONFIGS)


def test_cluster_yaml_is_a_local_provider_config_ray_can_prepare() -> None:
    from ray.autoscaler._private.local.config import prepare_local

    config = load(ROOT / "cluster.yaml")
    assert config["provider"]["type"] == "local"
    prepared, _ = prepare_local(config)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_the_fields_to_edit_are_marked() -> None:
    text = (ROOT / "cluster.yaml").read_text()
    edited = [line.split(":")[0].strip() for line in text.splitlines() if "# EDIT" in line]
    assert edited == ["head_ip", "worker_ips", "ssh_user", "ssh_private_key", "~/overstory/app"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_no_secret_or_store_url_is_written_in_the_yaml(path: Path) -> None:
    text = path.read_text()
    for needle in ("mongodb://", "sqlite:///", "OVERSTORY_STORE=", "API_KEY=", "sk-"):
        assert needle not in text, needle
    mounts = load(path)["file_mounts"]
    # secrets travel as files from outside the repository, written by deploy/prepare
    assert mounts["~/overstory/cluster.env"] == "~/.overstory/cluster.env"
    assert mounts["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert mounts["~/overstory/dist"] == "./dist"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_nodes_install_the_shipped_wheel_and_start_with_token_auth(path: Path) -> None:
    config = load(path)
    setup = " ; ".join(config["setup_commands"])
    assert "pip install" in setup
    assert "~/overstory/dist/overstory-*.whl" in setup
    head = config["head_start_ray_commands"]
    workers = config["worker_start_ray_commands"]
    # login shells on the nodes do not see the venv: absolute paths
    for command in head + workers:
        assert "~/overstory/venv/bin/" in command, command
    # the environment (store, keys, RAY_AUTH_MODE=token) is loaded before Ray starts
    for command in head[1:] + workers[1:]:
        assert command.startswith(". ~/overstory/profile.sh && "), command
    profile = (ROOT / "deploy" / "node-profile.sh").read_text()
    assert "export RAY_AUTH_MODE=token" in profile
    # gRPC's fork handlers crash the per-client server Ray Client's proxy forks
    assert "export GRPC_ENABLE_FORK_SUPPORT=0" in profile
    # the tree booted on the head, and the HTTP front door beside it
    assert head[-1].endswith("overstory serve --address auto --http 0.0.0.0:8000 --plain-http")
    # ... serving $OVERSTORY_APP (cluster.env), imported from the mounted app directory
    assert "~/overstory/app" in config["file_mounts"]
    assert 'PYTHONPATH="$HOME/overstory/app' in profile
    prepare = (ROOT / "deploy" / "prepare").read_text()
    assert "OVERSTORY_APP" in prepare


def test_the_aws_example_runs_the_same_commands_as_cluster_yaml() -> None:
    local = load(ROOT / "cluster.yaml")
    aws = load(ROOT / "deploy" / "aws.yaml")
    for key in ("file_mounts", "setup_commands", "head_start_ray_commands"):
        assert aws[key] == local[key], key


# --- OVERSTORY_STORE ---------------------------------------------------------------------


def test_store_comes_from_the_environment_when_not_given(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OVERSTORY_STORE", "mongodb://db.internal:27017/prod")
    assert Config.from_mapping({}).store == "mongodb://db.internal:27017/prod"
    assert Config().store == "mongodb://db.internal:27017/prod"
    explicit = f"sqlite:///{tmp_path}/x.db"
    assert Config.from_mapping({"store": explicit}).store == explicit
    monkeypatch.delenv("OVERSTORY_STORE")
    assert Config.from_mapping({}).store.endswith("/overstory.db")


def test_a_bad_store_in_the_environment_is_rejected_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OVERSTORY_STORE", "postgres://nope")
    with pytest.raises(ValueError, match="postgres://nope"):
        Config.from_mapping({})


# --- serve / status / health against the session's Ray -----------------------------------


@pytest.fixture(scope="module")
def served(ray_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One served tree for the module's tests (booting one takes seconds): only
    ``test_status_reports_every_section`` talks to a conversation, so its counts hold."""
    namespace = f"t-served-{uuid.uuid4().hex[:8]}"
    store = f"sqlite:///{tmp_path_factory.mktemp('served')}/history.db"
    config = Config.from_mapping({"namespace": namespace, "store": store})
    try:
        yield config, deploy.serve(config)
    finally:
        kill_namespace(namespace)


@pytest.mark.ray
def test_serve_twice_boots_one_tree(served: Any) -> None:
    config, first = served
    assert first["booted"] is True
    second = deploy.serve(config)
    assert second["booted"] is False
    assert second["root_actor_id"] == first["root_actor_id"]
    assert second["store"] == config.store


@pytest.mark.ray
def test_status_reports_every_section(served: Any) -> None:
    config, _ = served
    runtime = __import__("overstory").connect(config=config)
    runtime.conversation("alice").send("hi")
    report = ops.status(ops.Probe(config.namespace))
    assert list(report) == ["cluster", "tree", "apps", "conversations", "store", "providers"]
    assert report["apps"]["default"] == "assistant"  # serve's default echo agent
    assert report["apps"]["agents"][0]["versions"] == ["1"]
    assert report["apps"]["agents"][0]["split"]["live"] == "1"
    assert report["providers"] == {
        "chain": [{"model": "offline:echo", "state": "in-process"}],
        "other_endpoints": [],
    }
    assert report["cluster"]["nodes_alive"] >= 1
    assert report["tree"]["root"]["alive"] is True
    assert report["tree"]["placement"] == "hosted"  # the default agent's placement
    assert report["tree"]["hosts_supervisor"]["alive"] is True
    assert report["conversations"]["live"] == 1
    hosts = report["conversations"]["hosts"]
    assert sum(h["live"] for h in hosts) == 1
    assert all(h["host"].startswith("overstory:host:") and h["memory_uss_mb"] > 0 for h in hosts)
    json.dumps(report)  # what `overstory status --json` prints
    assert sum(report["conversations"]["per_node"].values()) == 1
    assert report["conversations"]["activations"] == 1
    for counter in ("passivations", "restarts", "evictions"):
        assert report["conversations"][counter] == 0
    assert report["store"] == {"url": config.store, "reachable": True}
    assert ops.health(ops.Probe(config.namespace)) == []


@pytest.mark.ray
def test_status_is_extended_by_adding_a_section(served: Any) -> None:
    config, _ = served
    sections = [*ops.SECTIONS, ("extra", lambda probe: {"endpoints": 0})]
    report = ops.status(ops.Probe(config.namespace), sections)
    assert report["extra"] == {"endpoints": 0}


@pytest.mark.ray
def test_health_names_what_is_down(ray_cluster: str, namespace: str) -> None:
    found = ops.health(ops.Probe(namespace, fallback_store="sqlite:////nonexistent/dir/x.db"))
    assert any(p.startswith("root supervisor is not running") for p in found)
    assert any(p.startswith("conversation supervisor is not running") for p in found)
    assert any("sqlite:////nonexistent/dir/x.db does not answer" in p for p in found)


@pytest.mark.ray
def test_cli_health_and_status_against_a_served_tree(
    served: Any, driver_env: dict[str, str]
) -> None:
    config, _ = served
    args = ["--namespace", config.namespace]
    ok = subprocess.run([*CLI, "health", *args], env=driver_env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("healthy")
    status = subprocess.run(
        [*CLI, "status", "--json", *args], env=driver_env, capture_output=True, text=True
    )
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout.strip().splitlines()[-1])
    assert report["tree"]["root"]["alive"] is True
    assert report["store"]["reachable"] is True
    env = {**driver_env, "OVERSTORY_STORE": config.store}  # the store serve opens
    serve = subprocess.run([*CLI, "serve", *args], env=env, capture_output=True, text=True)
    assert serve.returncode == 0, serve.stderr
    assert "already running" in serve.stdout
    hosts = len(report["conversations"]["hosts"])
    grown = subprocess.run(
        [*CLI, "rebalance", "--hosts", str(hosts + 1), "--json", *args],
        env=driver_env,
        capture_output=True,
        text=True,
    )
    assert grown.returncode == 0, grown.stderr
    table = json.loads(grown.stdout.strip().splitlines()[-1])
    assert len(table["hosts"]) == hosts + 1
    assert table["hosts"][-1] == f"overstory:host:{hosts}"

    kill_namespace(config.namespace)
    bad = subprocess.run([*CLI, "health", *args], env=driver_env, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "unhealthy: root supervisor is not running" in bad.stdout


@pytest.mark.slow  # starts a Python process
@pytest.mark.parametrize("command", ["health", "status", "serve", "rebalance"])
def test_operator_commands_never_start_ray(command: str) -> None:
    # An address where nothing listens ("auto" would find any Ray running on this machine).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ovs-", dir="/tmp")  # no Ray lives here
    proc = subprocess.run(
        [*CLI, command, "--address", address], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert f"cannot attach to a running Ray cluster at {address!r}" in proc.stdout + proc.stderr
    assert not list(Path(env["RAY_TMPDIR"]).iterdir())  # no session directory was made


def test_cluster_unavailable_is_a_runtime_failure() -> None:
    assert issubclass(ClusterUnavailable, RuntimeError)
