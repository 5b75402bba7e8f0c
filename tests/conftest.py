"""Shared fixtures: one Ray instance per session, one MongoDB-wire server per session.

Ray starts once (``include_dashboard=False``, token auth disabled — for tests only).
MongoDB: ``MONGO_URI`` when set, else a ``secantusdb`` server (a test dependency that
speaks the MongoDB wire protocol) started on a free loopback port and stopped at the end.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Before anything imports ray: the tests' Ray instance runs without token auth.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# Encryption at rest is on for the whole session: every store opened here, in Ray's
# workers (they inherit this environment) and in subprocess drivers seals message bodies
# with this session's key. The e2e and the demo run without one (in the clear), and
# tests/test_encryption.py chooses keys per store explicitly.
if not os.environ.get("OVERSTORY_DATA_KEYS") and not os.environ.get("OVERSTORY_DATA_KEY_FILE"):
    _keys = Path(tempfile.mkdtemp(prefix="ovs-data-keys-")) / "data.keys"
    _keys.write_text(f"session:{base64.b64encode(os.urandom(32)).decode()}\n")
    os.environ["OVERSTORY_DATA_KEY_FILE"] = str(_keys)

# Webhooks of background jobs are signed in this session (tests/test_jobs.py checks it).
WEBHOOK_SECRET = os.environ.setdefault("OVERSTORY_WEBHOOK_SECRET", "test-webhook-secret-2c1e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark by what a test uses (directly or through another fixture), whether or not its
    module says so: ``ray`` for the session's Ray (``ray_cluster``), ``mongodb`` for the
    MongoDB-wire server (``mongo_server``, or ``store_url``'s ``mongodb`` case: a process
    started for the session). The fast
    subset (``./scripts/test-fast``) leaves both out, so it never starts either."""
    for item in items:
        used = getattr(item, "fixturenames", ())
        if "ray_cluster" in used:
            item.add_marker(pytest.mark.ray)
        callspec = getattr(item, "callspec", None)
        by_param = callspec is not None and callspec.params.get("store_url") == "mongodb"
        if "mongo_server" in used or by_param:  # store_url asks for it only when it runs
            item.add_marker(pytest.mark.mongodb)

    # Longest first: modules with slow tests, then those on Ray, then the pure ones, so
    # that with two workers (``-n 2 --dist loadfile --no-loadscope-reorder``, which keeps
    # this order) the short modules fill the gaps at the end instead of one long module
    # running alone. A stable sort: the order within a module, and among modules of one
    # kind, stays as collected.
    def module(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0]

    rank: dict[str, int] = {}
    for item in items:
        here = 0 if item.get_closest_marker("slow") else 1 if item.get_closest_marker("ray") else 2
        rank[module(item)] = min(here, rank.get(module(item), 2))
    items.sort(key=lambda item: rank[module(item)])


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Block until ``predicate()`` is true; fail the test, naming ``what``, if it is not
    within ``timeout`` seconds. For conditions nothing signals (another process's state):
    waiting on an event or a future is better where there is one."""
    import time

    deadline = time.monotonic() + timeout
    pause = 0.01
    while not predicate():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A MongoDB URI (without database): ``MONGO_URI`` or a fresh secantusdb server."""
    from pymongo import MongoClient

    uri = os.environ.get("MONGO_URI")
    proc = None
    if not uri:
        port = _free_port()
        exe = Path(sys.executable).parent / "secantusd-py"
        if not exe.exists():
            pytest.fail(f"secantusdb is not installed ({exe}); pip install -e '.[test]'")
        log = open(tmp_path_factory.mktemp("mongo") / "secantusd.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            [
                str(exe),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--storage-path",
                str(tmp_path_factory.mktemp("mongo-data")),
                "--log-level",
                "WARNING",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        uri = f"mongodb://127.0.0.1:{port}"
    # Server selection blocks until the server answers or 30 s pass: no polling loop.
    client: MongoClient[dict[str, object]] = MongoClient(uri, serverSelectionTimeoutMS=30_000)
    try:
        client.admin.command("ping")
    finally:
        client.close()
    yield uri.rstrip("/")
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def mongo_url(mongo_server: str) -> str:
    """A MongoDB store URL with a database of its own for this test."""
    return f"{mongo_server}/t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/history.db"


@pytest.fixture(params=["sqlite", "mongodb"])
def store_url(request: pytest.FixtureRequest) -> str:
    """A store URL of each kind, for tests every store must pass."""
    url: str = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "mongo_url")
    return url


_MODULE_LOOPS: list[Any] = []


@pytest.fixture(scope="module")
def module_loop() -> Iterator[None]:
    """One event loop for a whole module (``pytestmark = usefixtures("module_loop")``):
    a model's SDK client keeps its connections in a pool bound to the loop it first ran
    in. :func:`run_in_module_loop` runs a coroutine on it."""
    import asyncio

    with asyncio.Runner() as runner:
        _MODULE_LOOPS.append(runner)
        yield
        _MODULE_LOOPS.remove(runner)


def run_in_module_loop(coro: Any) -> Any:
    return _MODULE_LOOPS[-1].run(coro)


def on_store(url: str, body: Any, keys: Any = "environment", *, raw: bool = False) -> Any:
    """``await body(store)`` on a store opened for it (``keys``: its data keys; by
    default the environment's; ``raw``: opened as backup and restore open it, with no
    key), closed after."""
    import asyncio

    from overstory.store import open_store

    async def go() -> Any:
        store = open_store(url, data_keys=keys, raw=raw)
        await store.open()
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(go())


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """The session's Ray instance; yields its GCS address for subprocess drivers."""
    import ray

    from overstory.runtime.cluster import serve_ingress_env

    # The door's ingress as a Ray started by overstory has it (HAProxy when installed).
    # A replica that stops waits Serve's draining period for load balancers to notice
    # (30 s); here nothing but the test is routed to it.
    os.environ.update(serve_ingress_env())
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    ray.init(
        include_dashboard=False,
        num_cpus=2,
        namespace="overstory-tests",
        logging_level="WARNING",
        log_to_driver=False,
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture
def namespace() -> str:
    """A Ray namespace of its own for each test, so tests never share actors."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def driver_env(ray_cluster: str) -> dict[str, str]:
    """Environment for a subprocess driver attached to the session's Ray."""
    env = dict(os.environ)
    env["RAY_ADDRESS"] = ray_cluster
    env["RAY_AUTH_MODE"] = "disabled"
    return env


def wait_dead(handle: Any, timeout_s: float = 30.0) -> None:
    """Block until ``handle``'s actor is dead: ``ray.kill`` lands asynchronously, and a
    call made just after it may still be served."""
    import time

    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(handle.__ray_ready__.remote(), timeout=max(0.1, deadline - time.monotonic()))
        except RayActorError:
            return
        except GetTimeoutError:
            break
        time.sleep(0.05)
    raise TimeoutError(f"actor {handle} still alive {timeout_s} s after it was killed")


def kill_namespace(namespace: str, timeout_s: float = 30.0) -> None:
    """Detached actors outlive tests: kill every named actor in ``namespace``.

    Supervisors first, and dead before their children go: a live supervisor would start a
    killed child again, and those restarts would load the tests that follow.
    """
    import time

    import ray

    from overstory.supervisors.tree import CONVERSATIONS, HOSTS, ROOT

    for name in (ROOT, HOSTS, CONVERSATIONS):
        try:
            handle = ray.get_actor(name, namespace=namespace)
        except ValueError:
            continue
        ray.kill(handle, no_restart=True)
        wait_dead(handle, timeout_s)
    deadline = time.monotonic() + timeout_s
    while True:
        names = [
            e["name"]
            for e in ray.util.list_named_actors(all_namespaces=True)
            if e["namespace"] == namespace
        ]
        if not names or time.monotonic() > deadline:
            return
        for name in names:
            with contextlib.suppress(ValueError):  # already gone
                ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        time.sleep(0.2)


@pytest.fixture
def exporter() -> Iterator[Any]:
    """Spans of the test, from a tracer provider of its own (the global one is untouched)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from overstory.telemetry import use_tracer_provider

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with use_tracer_provider(provider):
        yield memory
    provider.shutdown()


class RecordedMetrics:
    """What this process recorded through ``overstory.telemetry.metrics()`` (as Ray's
    instruments would have been given it): ``(metric key, value, tags)``."""

    def __init__(self) -> None:
        self.records: list[tuple[str, float, dict[str, str]]] = []

    def of(self, key: str) -> list[tuple[float, dict[str, str]]]:
        """What ``key`` recorded (counter increments summed per tag set: the process
        hands them over in one ``inc`` each, flushed here first)."""
        from overstory.telemetry.metrics import metrics

        metrics().flush()
        return [(v, t) for k, v, t in self.records if k == key]


@pytest.fixture
def recorded_metrics(monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordedMetrics]:
    """Metrics recorded in this process without Ray: each instrument is a recorder.
    Counter increments an earlier test left summed (not yet flushed) go where they were
    meant to first, and this test's go to its recorder before the next test."""
    import importlib

    module = importlib.import_module("overstory.telemetry.metrics")
    module._metrics.flush()

    recorded = RecordedMetrics()

    class Instrument:
        def __init__(self, key: str) -> None:
            self.key = key

        def _record(self, value: float, tags: dict[str, str]) -> None:
            recorded.records.append((self.key, value, dict(tags)))

        inc = observe = set = _record

    instruments = {key: Instrument(key) for key in module.METRICS}
    monkeypatch.setattr(module._metrics, "_get", lambda: instruments)
    yield recorded
    module._metrics.flush()


#: Ray declares a node dead after about 3 missed health checks a second apart (its
#: defaults take about 15 s more: a test that loses a node would only be slower).
FAST_FAILURE_DETECTION = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def run_check(
    script: str,
    *args: str,
    env: dict[str, str] | None = None,
    without: str | None = None,
    prefix: tuple[str, ...] = (),
    timeout: float = 400,
) -> dict[str, Any]:
    """Run ``tests/<script>`` (a driver with a Ray cluster of its own: no RAY_ADDRESS,
    its own temp dir, token auth off, none of the variables starting with ``without``,
    plus ``env``) under ``prefix`` (e.g. ``ip netns exec NS``); fail showing its stderr
    unless it exits 0; its result, the last stdout line that is a JSON object."""
    import json
    import subprocess
    import sys

    environ = {
        k: v
        for k, v in os.environ.items()
        if k != "RAY_ADDRESS" and not (without and k.startswith(without))
    }
    environ["RAY_AUTH_MODE"] = "disabled"
    environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ovs-", dir="/tmp")
    environ.update(env or {})
    path = Path(__file__).with_name(script)
    proc = subprocess.run(
        [*prefix, sys.executable, str(path), *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    # The result is the last line that is a JSON object: Ray's log monitor may still
    # stream another process's output (a cut-off node's raylet exiting) after it.
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    raise AssertionError(f"{script} printed no JSON result: {proc.stdout[-3000:]}")
