"""``check_ray_client``: what a ``ray://`` address says before Ray's own connect runs.

The server here is a real gRPC server implementing Ray Client's ``RayletDriver`` service
(Ray's own generated stubs), scripted to answer the ping as a starting, refusing or
healthy Ray Client server does. The deployed cluster's real server, with token auth on,
is exercised by ``scripts/e2e_ray_up.sh``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc

from overstory import ClusterAuthRefused, ClusterUnavailable
from overstory.runtime.cluster import check_ray_client

Answer = Callable[[Any], None]  # raises via context.abort, or returns to answer


class ScriptedDriver(ray_client_pb2_grpc.RayletDriverServicer):  # type: ignore[misc]
    """Answers each ``ClusterInfo`` with the next scripted behaviour (the last repeats)."""

    def __init__(self, script: list[str]) -> None:
        self.script = script
        self.calls: list[tuple[int, dict[str, str]]] = []

    def ClusterInfo(self, request: Any, context: Any) -> Any:
        metadata = {key: value for key, value in context.invocation_metadata()}
        self.calls.append((request.type, metadata))
        step = self.script[min(len(self.calls), len(self.script)) - 1]
        if step == "starting":
            context.abort(grpc.StatusCode.UNAVAILABLE, "server starting")
        if step == "refuse":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "Invalid or missing token")
        # with "token", only what Ray's interceptor sends for the right one passes
        if step == "token" and metadata.get("authorization") != "Bearer the-cluster-token":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "Invalid or missing token")
        return ray_client_pb2.ClusterInfoResponse(json="{}")


@pytest.fixture
def serve() -> Iterator[Callable[[list[str]], tuple[str, ScriptedDriver]]]:
    servers: list[grpc.Server] = []

    def start(script: list[str]) -> tuple[str, ScriptedDriver]:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        driver = ScriptedDriver(script)
        ray_client_pb2_grpc.add_RayletDriverServicer_to_server(driver, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"ray://127.0.0.1:{port}", driver

    yield start
    for server in servers:
        server.stop(grace=None)


def test_a_healthy_server_is_pinged_once(serve: Any) -> None:
    address, driver = serve(["ok"])
    check_ray_client(address, timeout_s=10)
    assert [kind for kind, _ in driver.calls] == [ray_client_pb2.ClusterInfoType.PING]


def test_a_server_still_starting_is_waited_for(serve: Any) -> None:
    address, driver = serve(["starting", "starting", "ok"])
    check_ray_client(address, timeout_s=30)
    assert len(driver.calls) == 3


def test_a_refused_client_fails_at_once_saying_what_to_set(serve: Any) -> None:
    address, driver = serve(["refuse"])
    with pytest.raises(ClusterAuthRefused) as caught:
        check_ray_client(address, timeout_s=60)
    assert len(driver.calls) == 1  # asked once, not until the timeout: refusing is an answer
    assert address in str(caught.value)
    # the tests' Ray runs without token auth, so this client sends none: say so
    assert "RAY_AUTH_MODE=token" in str(caught.value)
    assert isinstance(caught.value, ClusterUnavailable)


def test_a_server_that_never_answers_names_what_it_last_said(serve: Any) -> None:
    address, driver = serve(["starting"])
    with pytest.raises(ClusterUnavailable) as caught:
        check_ray_client(address, timeout_s=2.5)
    assert not isinstance(caught.value, ClusterAuthRefused)
    assert "did not answer within 2.5 s" in str(caught.value)
    assert "UNAVAILABLE: server starting" in str(caught.value)
    assert len(driver.calls) >= 2


def test_nothing_listening_is_unavailable() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens
    with pytest.raises(ClusterUnavailable, match=r"did not answer within 1\.5 s"):
        check_ray_client(f"ray://127.0.0.1:{port}", timeout_s=1.5)


_CHECK = """
import sys
from overstory import ClusterAuthRefused
from overstory.runtime.cluster import check_ray_client
try:
    check_ray_client(sys.argv[1], timeout_s=20)
except ClusterAuthRefused as exc:
    print("refused:", exc)
    sys.exit(3)
print("answered")
"""


@pytest.mark.slow  # starts a Python process
@pytest.mark.parametrize(
    ("token", "expected"),
    [("the-cluster-token", "answered"), ("a-wrong-token", "refused:")],
)
def test_with_token_auth_the_ping_carries_rays_token(serve: Any, token: str, expected: str) -> None:
    """The ping goes through Ray's own interceptor, so it sends what ``ray.init`` would."""
    address, driver = serve(["token"])
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK, address],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.startswith(expected), proc.stdout + proc.stderr
    assert proc.returncode == (0 if expected == "answered" else 3)
    assert len(driver.calls) == 1
    assert driver.calls[0][1]["authorization"] == f"Bearer {token}"
    # what the client is told names what to set, never the token itself
    assert token not in proc.stdout


class FailingDataStreamer(ray_client_pb2_grpc.RayletDataStreamerServicer):  # type: ignore[misc]
    """Answers every client's first data request as a proxy whose server start failed.

    Ray's proxy closes the stream right after that answer, and the client then raises
    either the answer (``ConnectionAbortedError``) or, when the close wins the race,
    "already disconnected" (``ConnectionError``); ``close=False`` keeps the stream open
    so the answer always arrives.
    """

    def __init__(self, close: bool) -> None:
        self.close = close
        self.inits = 0

    def Datapath(self, request_iterator: Any, context: Any) -> Any:
        init = next(request_iterator)
        self.inits += 1
        yield ray_client_pb2.DataResponse(
            req_id=init.req_id,
            init=ray_client_pb2.InitResponse(
                ok=False, msg="RuntimeError: Starting Ray client server failed."
            ),
        )
        if not self.close:
            for _ in request_iterator:  # until the client hangs up
                pass


_ATTACH = """
import sys
from overstory import ClusterUnavailable
from overstory.runtime.cluster import init_ray
try:
    init_ray(sys.argv[1], namespace="t")
except ClusterUnavailable as exc:
    print("unavailable:", exc)
    sys.exit(3)
"""


@pytest.mark.slow  # starts a Python process
@pytest.mark.parametrize("close", [True, False], ids=["as-ray-closes", "answer-arrives"])
def test_a_failed_client_server_start_is_retried_then_named(close: bool) -> None:
    """Ray's own client gives up on the first "Initialization failure from server"."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    ray_client_pb2_grpc.add_RayletDriverServicer_to_server(ScriptedDriver(["ok"]), server)
    streamer = FailingDataStreamer(close)
    ray_client_pb2_grpc.add_RayletDataStreamerServicer_to_server(streamer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _ATTACH, f"ray://127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        server.stop(grace=None)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "failed to start a server for this client 3 times" in proc.stdout
    if not close:
        assert "Starting Ray client server failed" in proc.stdout  # the server's reason
    assert streamer.inits == 3
    assert proc.stderr.count("trying again") == 2  # the retries are logged


@pytest.mark.slow  # starts a Python process
def test_importing_overstory_loads_no_grpc() -> None:
    """Conversation actors import the package; gRPC's bindings cost each ~2 MB (P4)."""
    code = "import sys, overstory, overstory.actors.conversation; print('grpc' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False", proc.stdout + proc.stderr
