"""Kubernetes (deploy/k8s): the manifests against the Kubernetes and KubeRay schemas,
offline, and against the code they start (no cluster, no Ray).

Core objects (the Secrets, the door's Service, every pod template) go through
kubernetes-validate's strict schemas; the RayCluster and the RayService through KubeRay's
CRD schemas (tests/data/kuberay, vendored), made strict the way ``kubectl apply``'s
default field validation is: an unknown field is an error, not silently dropped.
"""

from __future__ import annotations

import copy
import gzip
import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from overstory import ConfigError
from overstory.cli.main import APP_ENV, _door_scaling, _door_tls, _parser
from overstory.config import STORE_ENV
from overstory.exceptions import DataKeyError, StoreURLError
from overstory.gateway import application
from overstory.providers.endpoint import KEY_ENV
from overstory.runtime.cluster import HIGH_THROUGHPUT_SERVE
from overstory.store.crypto import KEY_FILE_ENV, KEYS_ENV, DataKeys
from overstory.store.url import resolve_store_url

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = Path(__file__).parent / "data" / "kuberay"
MANIFESTS = ("secret.yaml", "raycluster.yaml", "rayservice.yaml")
#: A Kubernetes KubeRay 1.5 supports, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.31.0", kubernetes_validate.latest_version())
KUBERAY_KINDS = {"RayCluster": "rayclusters", "RayService": "rayservices"}
#: Every variable a pod may be given, and who reads it.
KNOWN_ENV = {
    STORE_ENV,  # Config, connect(), overstory serve
    KEYS_ENV,  # the store's encryption at rest
    KEY_FILE_ENV,
    APP_ENV,  # overstory serve's default app
    KEY_ENV["anthropic"],
    KEY_ENV["openai"],
    *HIGH_THROUGHPUT_SERVE,  # Serve's ingress (deploy/node-profile.sh)
}


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def objects() -> Iterator[tuple[str, dict[str, Any]]]:
    for name in MANIFESTS:
        for doc in documents(name):
            yield f"{name}:{doc['kind']}/{doc['metadata']['name']}", doc


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in objects() if doc["kind"] == kind]


def cluster_specs() -> list[dict[str, Any]]:
    """The RayCluster's spec and the RayService's rayClusterConfig."""
    return [c["spec"] for c in by_kind("RayCluster")] + [
        s["spec"]["rayClusterConfig"] for s in by_kind("RayService")
    ]


def pod_templates() -> list[dict[str, Any]]:
    templates = []
    for spec in cluster_specs():
        templates.append(spec["headGroupSpec"]["template"])
        templates.extend(group["template"] for group in spec["workerGroupSpecs"])
    return templates


def containers() -> list[dict[str, Any]]:
    return [c for t in pod_templates() for c in t["spec"]["containers"]]


def head_container(spec: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    return container


def serve_config() -> dict[str, Any]:
    (service,) = by_kind("RayService")
    config: dict[str, Any] = yaml.safe_load(service["spec"]["serveConfigV2"])
    return config


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists the known ones (and does
    not keep unknown fields on purpose), as the API server's strict field validation."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


_VALIDATORS: dict[str, Any] = {}


def kuberay_errors(doc: dict[str, Any]) -> list[str]:
    plural = KUBERAY_KINDS[doc["kind"]]
    if plural not in _VALIDATORS:
        path = SCHEMAS / f"ray.io_{plural}.v1.schema.json.gz"
        schema = strict(json.loads(gzip.decompress(path.read_bytes())))
        jsonschema.Draft7Validator.check_schema(schema)
        _VALIDATORS[plural] = jsonschema.Draft7Validator(schema)
    errors = _VALIDATORS[plural].iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def core_errors(doc: dict[str, Any], version: str) -> list[str]:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [str(exc)]
    return []


def as_pod_template(template: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": "overstory"},
        "template": template,
    }


# --- the schemas ------------------------------------------------------------------------


def test_every_manifest_is_one_of_the_expected_objects() -> None:
    kinds = sorted(key.split(":")[1].split("/")[0] for key, _ in objects())
    assert kinds == ["RayCluster", "RayService", "Secret", "Secret", "Service"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_pass_kubernetes_strict_schemas(version: str) -> None:
    for key, doc in objects():
        if doc["kind"] not in KUBERAY_KINDS:
            assert core_errors(doc, version) == [], key


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_ray_pod_template_is_a_valid_pod_template(version: str) -> None:
    for template in pod_templates():
        assert core_errors(as_pod_template(template), version) == []


@pytest.mark.parametrize("kind", sorted(KUBERAY_KINDS))
def test_kuberay_objects_pass_the_crd_schemas(kind: str) -> None:
    (doc,) = by_kind(kind)
    assert doc["apiVersion"] == "ray.io/v1"
    assert kuberay_errors(doc) == []
    # the CRD schema leaves metadata to the API server: check it as any object's
    carrier = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}
    assert core_errors(carrier, KUBERNETES_VERSIONS[0]) == []
    carrier["metadata"] = {**doc["metadata"], "label": {}}  # misspelt: refused
    assert core_errors(carrier, KUBERNETES_VERSIONS[0])


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("spec.enableInTreeAutoscalling", True, "enableInTreeAutoscalling"),  # misspelt
        ("spec.workerGroupSpecs.0.replicas", "one", "'one' is not of type 'integer'"),
        ("spec.authOptions.mode", "tokens", "'tokens' is not one of"),
        ("spec.headGroupSpec.template.spec.containers.0.envFrom.0.secretRef.nme", "x", "nme"),
    ],
)
def test_the_crd_check_refuses_a_broken_raycluster(path: str, value: Any, expected: str) -> None:
    (doc,) = by_kind("RayCluster")
    broken = copy.deepcopy(doc)
    target = broken
    *steps, last = [int(s) if s.isdigit() else s for s in path.split(".")]
    for step in steps:
        target = target[step]
    target[last] = value
    errors = kuberay_errors(broken)
    assert errors, path
    assert any(expected in e for e in errors), errors


def test_the_crd_check_refuses_a_broken_rayservice() -> None:
    (doc,) = by_kind("RayService")
    broken = copy.deepcopy(doc)
    broken["spec"]["serveConfigV3"] = broken["spec"].pop("serveConfigV2")
    assert any("serveConfigV3" in e for e in kuberay_errors(broken))


def test_the_kubernetes_check_refuses_broken_core_objects() -> None:
    secret = copy.deepcopy(by_kind("Secret")[0])
    secret["stringdata"] = secret.pop("stringData")  # misspelt
    assert core_errors(secret, KUBERNETES_VERSIONS[0])
    (service,) = by_kind("Service")
    service = copy.deepcopy(service)
    service["spec"]["ports"][0]["port"] = "eight thousand"
    assert core_errors(service, KUBERNETES_VERSIONS[0])
    template = copy.deepcopy(pod_templates()[0])
    template["spec"]["containers"][0]["lifecycle"]["postStart"]["exec"]["cmd"] = ["true"]
    assert core_errors(as_pod_template(template), KUBERNETES_VERSIONS[0])


# --- the manifests against the code ------------------------------------------------------


def test_secrets_hold_exactly_variables_the_code_reads() -> None:
    keys = {k for s in by_kind("Secret") for k in s["stringData"]}
    assert {STORE_ENV, KEYS_ENV} <= keys
    assert keys <= KNOWN_ENV


def test_placeholders_fail_at_once_rather_than_run() -> None:
    store = next(s for s in by_kind("Secret") if STORE_ENV in s["stringData"])["stringData"]
    with pytest.raises(StoreURLError):
        resolve_store_url(store[STORE_ENV])
    with pytest.raises((DataKeyError, ConfigError)):
        DataKeys.from_environment({KEYS_ENV: store[KEYS_ENV]})


def test_every_ray_container_gets_the_secrets_and_only_known_variables() -> None:
    secrets = {s["metadata"]["name"]: s for s in by_kind("Secret")}
    for container in containers():
        names = {e["name"] for e in container["env"]}
        assert names <= KNOWN_ENV, names - KNOWN_ENV
        assert names >= {APP_ENV, *HIGH_THROUGHPUT_SERVE}
        refs = {
            r["secretRef"]["name"]: r["secretRef"].get("optional", False)
            for r in container["envFrom"]
        }
        assert set(refs) == set(secrets)
        # the store's Secret is required: without it no pod starts (not a SQLite tree)
        assert [name for name, optional in refs.items() if not optional] == ["overstory-store"]


def test_the_app_named_is_in_the_image() -> None:
    env = {e["name"]: e["value"] for e in head_container(cluster_specs()[0])["env"]}
    module = env[APP_ENV].split(":")[0]
    assert re.search(r"^COPY .* examples/apps /home/ray/overstory/app$", dockerfile(), re.M)
    assert (ROOT / "examples" / "apps" / f"{module}.py").is_file()


def test_the_head_boots_the_tree_with_a_command_the_cli_accepts() -> None:
    """raycluster.yaml's head serves the door too (`ray up`'s way); rayservice.yaml's
    leaves the door to serveConfigV2."""
    expected = {"RayCluster": ("0.0.0.0", 8000), "RayService": None}
    for doc in by_kind("RayCluster") + by_kind("RayService"):
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterConfig"]
        script = head_container(spec)["lifecycle"]["postStart"]["exec"]["command"][-1]
        (line,) = [ln.strip() for ln in script.splitlines() if "overstory serve" in ln]
        argv = line.split(">>")[0].split()[1:]
        args = _parser().parse_args(argv)
        assert args.command == "serve"
        assert args.http == expected[doc["kind"]], doc["kind"]
        _door_scaling(args)  # the checks `overstory serve` makes before deploying
        _door_tls(args)  # (plain HTTP off loopback only with --plain-http)


def test_the_door_service_reaches_the_heads_serve_port() -> None:
    (service,) = by_kind("Service")
    (cluster,) = by_kind("RayCluster")
    assert service["spec"]["selector"] == {
        "ray.io/cluster": cluster["metadata"]["name"],
        "ray.io/node-type": "head",
    }
    ports = {p["name"]: p["containerPort"] for p in head_container(cluster["spec"])["ports"]}
    (port,) = service["spec"]["ports"]
    assert ports[port["targetPort"]] == port["port"] == 8000


# --- the RayService's Serve application ---------------------------------------------------


def test_serve_config_passes_rays_own_schema_and_names_the_doors_deployment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(serve_config())
    (app,) = config.applications
    assert app.import_path == "overstory.gateway.application:build"
    module, attr = app.import_path.split(":")
    builder = getattr(__import__(module, fromlist=[attr]), attr)
    assert builder is application.build
    monkeypatch.setenv(STORE_ENV, "mongodb://db.internal:27017/overstory")
    bound = call_user_app_builder_with_args_if_necessary(builder, app.args)  # as Serve does
    deployment = bound._bound_deployment
    assert [d.name for d in app.deployments] == [deployment.name]
    namespace, store, limits, jwt = deployment.init_args
    assert (namespace, store, limits, jwt) == (
        "overstory",
        "mongodb://db.internal:27017/overstory",
        None,
        None,
    )
    assert config.http_options.port == 8000


def test_door_args_are_checked_before_anything_deploys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STORE_ENV, raising=False)
    with pytest.raises(ConfigError, match=STORE_ENV):
        application.build({})
    store = {"store": "mongodb://db.internal:27017/overstory"}
    with pytest.raises(ConfigError, match="nmespace"):
        application.build({**store, "nmespace": "x"})
    with pytest.raises(ConfigError, match="namespace"):
        application.build({**store, "namespace": "not a namespace!"})
    with pytest.raises(ConfigError, match="requests_per_minit"):
        application.build({**store, "limits": {"requests_per_minit": 5}})
    with pytest.raises(ConfigError, match="JWKS"):
        application.build({**store, "jwt": {"issuer": "i", "audience": "a", "jwks_url": "ftp://x"}})


def test_door_args_reach_the_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STORE_ENV, "mongodb://from-env:27017/overstory")
    jwt = {"issuer": "i", "audience": "a", "jwks_url": "https://i/jwks", "algorithms": ["ES256"]}
    app = application.build({"namespace": "prod", "limits": {"requests_per_minute": 5}, "jwt": jwt})
    namespace, store, limits, settings = app._bound_deployment.init_args
    assert (namespace, store) == ("prod", "mongodb://from-env:27017/overstory")
    assert limits["requests_per_minute"] == 5
    assert settings.algorithms == ("ES256",)


# --- the image -----------------------------------------------------------------------------


def dockerfile() -> str:
    return (K8S / "Dockerfile").read_text()


def test_image_ray_version_is_the_pinned_one_everywhere() -> None:
    (base,) = re.findall(r"^FROM (\S+)$", dockerfile(), re.M)
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)", base)
    assert match, base
    version, minor = match[1], int(match[2])
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (pin,) = [Requirement(r) for r in pyproject["project"]["dependencies"] if r.startswith("ray[")]
    assert Version(version) in pin.specifier
    assert version == ray.__version__  # the Ray the suite runs
    assert (
        Version(f"3.{minor}")
        in Requirement(f"python{pyproject['project']['requires-python']}").specifier
    )
    assert {spec["rayVersion"] for spec in cluster_specs()} == {version}


def test_every_ray_container_runs_one_image() -> None:
    assert len({c["image"] for c in containers()}) == 1


def test_the_image_copies_only_what_its_context_keeps() -> None:
    ignore = (K8S / "Dockerfile.dockerignore").read_text().splitlines()
    kept = {line[1:] for line in ignore if line.startswith("!")}
    copied = set()
    for line in dockerfile().splitlines():
        if line.startswith("COPY "):
            copied.update(p for p in line.split()[1:-1] if not p.startswith("--"))
    assert copied == kept
    assert all((ROOT / path).exists() for path in copied)
    # gRPC's fork handlers off on every node (docs/operations/deploy.md), as node-profile.sh
    assert "GRPC_ENABLE_FORK_SUPPORT=0" in dockerfile()
    assert "export GRPC_ENABLE_FORK_SUPPORT=0" in (ROOT / "deploy" / "node-profile.sh").read_text()
