"""The one module that touches Ray's private API, and Ray's blocking GCS calls made async.

Everything private of Ray's that overstory uses is wrapped here (``ray._private``, Ray
Client's gRPC protocol in ``ray.core.generated``, a handle's actor id), so an upgrade of
Ray (pinned to 2.60.x) has one place to look; an import-linter contract keeps it so. The ``*_async`` helpers run Ray's
blocking GCS queries (``ray.nodes``, ``list_named_actors``, ``get_actor``) in a thread:
an actor's event loop serves every other call meanwhile (a host holds thousands of
conversations; a supervisor watches every child).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import ray

__all__ = [
    "actor_id",
    "alive_nodes",
    "alive_nodes_async",
    "get_actor_async",
    "grpc_channel",
    "in_actor",
    "is_head",
    "named_actors_async",
    "quiet_worker_notices",
    "ray_client_ping",
    "restarts_of_this_actor",
    "serve_haproxy_ingress",
    "serve_listening",
    "token_auth_enabled",
]


def actor_id(handle: Any) -> str:
    """The hex id of the actor behind ``handle`` (the handle keeps it privately)."""
    return str(handle._actor_id.hex())


def restarts_of_this_actor() -> int:
    """How many times Ray has restarted the actor running this code (0 for its first
    process: then the GCS is not asked; 0 outside an actor, e.g. a shell built
    in-process by a test)."""
    if not ray.is_initialized():
        return 0
    context = ray.get_runtime_context()
    if context.get_actor_id() is None or not context.was_current_actor_reconstructed:
        return 0
    from ray._private import state

    return int(state.actors(context.get_actor_id())["NumRestarts"])


def is_head() -> bool:
    """Whether this process started the Ray instance it is attached to."""
    node = getattr(ray._private.worker, "_global_node", None)
    return bool(getattr(node, "head", False))


def in_actor() -> bool:
    """Whether this process is a Ray actor's worker (not a driver, not a test process
    that builds an actor's class in place)."""
    worker = ray._private.worker.global_worker
    return bool(
        ray.is_initialized()
        and worker.mode == ray._private.worker.WORKER_MODE
        and not worker.actor_id.is_nil()
    )


def serve_listening() -> tuple[str, int, str | None] | None:
    """``(host, port, certificate file)`` Ray Serve's HTTP proxies listen with in this
    cluster (the file None for plain HTTP), or None when Serve is not running (all three
    are fixed when Serve starts)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    options = client.http_config
    return str(options.host), int(options.port), options.ssl_certfile or None


def serve_haproxy_ingress() -> bool:
    """Whether Ray Serve in this cluster runs its HAProxy ingress: read where Serve's
    controller reads it, in a worker's environment (the nodes' ``ray start`` one)."""

    @ray.remote(num_cpus=0)
    def flag() -> str:
        return os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", "0")

    return bool(ray.get(flag.remote(), timeout=60) == "1")


def grpc_channel(target: str) -> Any:
    """A gRPC channel to ``target`` as Ray opens one (with its token interceptor)."""
    from ray._private.grpc_utils import init_grpc_channel

    return init_grpc_channel(target)


@contextlib.contextmanager
def ray_client_ping(target: str) -> Iterator[Callable[[float], None]]:
    """A ping of the Ray Client server at ``host:port``, in Ray Client's own (private)
    gRPC protocol: ``ClusterInfo(PING)`` on a channel opened as Ray opens one (with the
    token it would send). Call the ping with a timeout in seconds; it returns when the
    server answers and raises :class:`grpc.RpcError` with the server's status otherwise.
    The channel closes when the block ends."""
    from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc

    channel = grpc_channel(target)
    try:
        stub = ray_client_pb2_grpc.RayletDriverStub(channel)
        request = ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING)

        def ping(timeout_s: float) -> None:
            stub.ClusterInfo(request, timeout=timeout_s)

        yield ping
    finally:
        channel.close()


def token_auth_enabled() -> bool:
    """Whether this process sends Ray's auth token."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    return bool(is_token_auth_enabled())


def alive_nodes() -> list[dict[str, Any]]:
    """The cluster's alive nodes (``ray.nodes()`` entries). Blocking: drivers only."""
    return [n for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]


async def alive_nodes_async() -> list[dict[str, Any]]:
    return await asyncio.to_thread(alive_nodes)


async def named_actors_async(namespace: str, prefix: str = "") -> list[str]:
    """Names of the named actors in ``namespace`` that start with ``prefix``."""

    def names() -> list[str]:
        return [
            e["name"]
            for e in ray.util.list_named_actors(all_namespaces=True)
            if e["namespace"] == namespace and e["name"].startswith(prefix)
        ]

    return await asyncio.to_thread(names)


async def get_actor_async(name: str, namespace: str) -> Any:
    """``ray.get_actor`` off the event loop; raises ``ValueError`` when there is none."""
    return await asyncio.to_thread(ray.get_actor, name, namespace=namespace)


@contextlib.contextmanager
def quiet_worker_notices() -> Iterator[list[str]]:
    """Hold back Ray's "a worker died" notices from this driver's terminal meanwhile.

    Ray prints them from a background thread whatever ``log_to_driver`` says; a demo
    that kills processes on purpose would drown its own output. The notices are
    collected in the yielded list instead (the caller may report how many).
    """
    worker = ray._private.worker
    original = worker.print_to_stdstream
    held: list[str] = []

    def filtered(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet":
            held.extend(str(line) for line in data.get("lines", ()))
            return
        original(data, ignore_prefix)

    worker.print_to_stdstream = filtered
    try:
        yield held
    finally:
        worker.print_to_stdstream = original
