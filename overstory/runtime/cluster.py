"""Attaching to Ray, or starting a local instance when there is none."""

from __future__ import annotations

import logging
import os
import time

import grpc
import ray

from ..exceptions import ClusterAuthRefused, ClusterUnavailable

__all__ = ["RAY_CLIENT_TIMEOUT_S", "attach", "check_ray_client", "detach"]

RAY_CLIENT_TIMEOUT_S = 60.0
"""How long a ``ray://`` address may take to answer before attaching gives up."""

_PING_TIMEOUT_S = 10.0


def attach(
    address: str | None,
    namespace: str,
    *,
    dashboard: bool = False,
    env_vars: dict[str, str] | None = None,
) -> bool:
    """Make sure this process is connected to Ray; ``True`` if it started a local Ray.

    Uses ``address``, else ``RAY_ADDRESS``, else an instance started with ``ray start``
    on this machine, else starts a local one (which :func:`detach` stops again) — with
    the dashboard only when ``dashboard`` is true. ``env_vars`` reach every worker of
    this job (and the actors it starts): the telemetry settings travel this way.
    A ``ray://`` address is checked first (:func:`check_ray_client`).
    """
    if ray.is_initialized():
        return False
    target = address or os.environ.get("RAY_ADDRESS") or None
    if target and target.startswith("ray://"):
        check_ray_client(target)
    ray.init(
        address=target,
        namespace=namespace,
        logging_level=logging.WARNING,
        log_to_driver=False,
        configure_logging=False,
        include_dashboard=dashboard,
        runtime_env={"env_vars": dict(env_vars)} if env_vars else None,
    )
    node = getattr(ray._private.worker, "_global_node", None)
    return bool(getattr(node, "head", False))


def check_ray_client(address: str, timeout_s: float = RAY_CLIENT_TIMEOUT_S) -> None:
    """Wait until the Ray Client server at ``ray://host:port`` answers a ping.

    Ray's own connect retries three times over about 30 s and then reports only
    "connection timeout", whether the port is closed, the server is still starting, or
    the cluster refused this client's token. This asks the same server the same
    question (``ClusterInfo(PING)``, with the token Ray itself would send) and tells
    those apart: a refused token raises :class:`ClusterAuthRefused` at once, a server
    that is still coming up is waited for, and one that never answers within
    ``timeout_s`` raises :class:`ClusterUnavailable` naming the last thing it said.
    """
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc

    target = address.removeprefix("ray://")
    deadline = time.monotonic() + timeout_s
    channel = init_grpc_channel(target)  # adds Ray's token interceptor when auth is on
    last = "no answer yet"
    try:
        stub = ray_client_pb2_grpc.RayletDriverStub(channel)
        ping = ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClusterUnavailable(
                    f"cannot attach to a running Ray cluster at {address!r}: its Ray Client "
                    f"server did not answer within {timeout_s:g} s (last: {last}); check "
                    "that the head's client port is reachable from here"
                )
            try:
                stub.ClusterInfo(ping, timeout=min(left, _PING_TIMEOUT_S))
                return
            except grpc.RpcError as exc:
                code = exc.code()
                if code in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.PERMISSION_DENIED,
                ):
                    raise ClusterAuthRefused(address, _auth_hint()) from None
                last = f"{code.name}: {exc.details()}"
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    finally:
        channel.close()


def _auth_hint() -> str:
    """What to fix on this side when the cluster refuses the client (never the token)."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    if not is_token_auth_enabled():
        return (
            "it requires a token and this client sends none: set "
            "RAY_AUTH_MODE=token, and the cluster's token in RAY_AUTH_TOKEN or "
            "~/.ray/auth_token"
        )
    return (
        "it did not accept this client's token: RAY_AUTH_TOKEN (or ~/.ray/auth_token, "
        "or RAY_AUTH_TOKEN_PATH) must hold the token the cluster was started with"
    )


def detach() -> None:
    """Disconnect; if this process started Ray, that also stops every Ray process it ran."""
    if ray.is_initialized():
        ray.shutdown()
