"""The front door's Ray Serve deployment: the FastAPI app of :mod:`.app` as an ingress.

``overstory serve MODULE:ATTR --http HOST:PORT`` deploys it beside the tree. One
replica by default: each open stream is a coroutine tailing a turn, not a thread, so one
replica holds thousands; ``max_ongoing_requests`` is raised far above Serve's default of
5 because an open stream holds its slot for the whole turn.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve

from .._ray import serve_haproxy_ingress, serve_listening
from ..exceptions import ConfigError
from .app import DoorLimits, Gateway, app, install
from .rates import ClusterRates
from .tokens import JwtSettings

__all__ = ["GATEWAY_APP", "GatewayDeployment", "Tls", "autoscaling_config", "serve_http"]

#: The Serve application's name (``serve status`` shows it).
GATEWAY_APP = "overstory-gateway"
MAX_ONGOING_REQUESTS = 10_000


@serve.deployment(
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
    ray_actor_options={"num_cpus": 0},
    health_check_period_s=10,
)
@serve.ingress(app)
class GatewayDeployment:
    """One replica: a runtime client attached to the tree in ``namespace``."""

    def __init__(
        self,
        namespace: str,
        store: str,
        limits: dict[str, Any] | None = None,
        jwt: JwtSettings | None = None,
        shared_rates: bool = True,
    ) -> None:
        from ..providers.pool import call_vendors_here
        from ..runtime.client import connect

        # Stateless turns (chat completions) run here, for many users: their vendor
        # calls are made here too, under leases, as a host makes its conversations'.
        call_vendors_here()
        runtime = connect(namespace=namespace, store=store)
        door = DoorLimits(**(limits or {}))
        # The per-key windows: the cluster's rates actor when replicas may be several;
        # a lone replica's own windows are the cluster's, without a Ray call per batch.
        rates = (
            ClusterRates(namespace, door.requests_per_minute, door.rate_window_s)
            if shared_rates
            else None
        )
        install(Gateway(runtime, door, jwt, rates))


#: What an autoscaled door aims at per replica when not told: open requests (an open
#: stream counts for its whole turn) a replica serves without falling behind on 2 cores.
DEFAULT_TARGET_ONGOING = 500


def autoscaling_config(
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    target_ongoing_requests: int | None = None,
) -> dict[str, Any]:
    """Ray Serve's ``autoscaling_config`` for the door: between ``min_replicas``
    (default 1) and ``max_replicas`` (default ``min_replicas``, at least 2), aiming at
    ``target_ongoing_requests`` open requests per replica (default 500)."""
    low = 1 if min_replicas is None else min_replicas
    high = max(low, 2) if max_replicas is None else max_replicas
    target = DEFAULT_TARGET_ONGOING if target_ongoing_requests is None else target_ongoing_requests
    if low < 1:
        raise ConfigError(f"min_replicas must be >= 1 (the door must answer), got {low}")
    if high < low:
        raise ConfigError(f"max_replicas ({high}) is below min_replicas ({low})")
    if not 0 < target <= MAX_ONGOING_REQUESTS:
        raise ConfigError(
            f"target_ongoing_requests must be in 1..{MAX_ONGOING_REQUESTS}, got {target}"
        )
    return {
        "min_replicas": low,
        "initial_replicas": low,
        "max_replicas": high,
        "target_ongoing_requests": target,
    }


@dataclass(frozen=True)
class Tls:
    """The door's TLS certificate chain and private key (PEM files). Serve's proxies
    read them on every node that runs one, so the paths must hold there too."""

    cert: str
    key: str

    def check(self) -> None:
        """Refuse (ConfigError naming the file) a file that is missing or unreadable, or
        a certificate and key that do not load as a pair, before anything is deployed."""
        for what, path in (("certificate", self.cert), ("key", self.key)):
            if not Path(path).is_file():
                raise ConfigError(f"TLS {what} file {path!r} does not exist")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(
                f"TLS certificate {self.cert!r} and key {self.key!r} do not load as a PEM "
                f"certificate chain and its private key: {e}"
            ) from None


def serve_http(
    namespace: str,
    store: str,
    host: str,
    port: int,
    *,
    replicas: int = 1,
    autoscaling: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    jwt: JwtSettings | None = None,
    tls: Tls | None = None,
) -> str:
    """Deploy (or update) the front door; returns its base URL. ``replicas`` is a fixed
    count; ``autoscaling`` (:func:`autoscaling_config`) lets Serve choose instead;
    ``tls`` serves HTTPS.

    Ray Serve's HTTP address and certificate are the cluster's, fixed when Serve first
    starts: if it runs already otherwise, this refuses (ConfigError naming it) rather
    than deploy somewhere other than asked. Serve's HAProxy ingress cannot terminate TLS
    (Ray 2.60): HTTPS needs the Python proxy ingress, and is refused by name without it.
    """
    if tls is not None:
        tls.check()
        if serve_haproxy_ingress():
            raise ConfigError(
                "TLS at the door needs Ray Serve's Python proxy ingress; this cluster runs "
                "the HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1), which cannot terminate "
                "TLS: start the cluster with OVERSTORY_SERVE_INGRESS=proxy, or terminate TLS "
                "in a load balancer in front of the door and serve it with --plain-http"
            )
    cert = None if tls is None else tls.cert
    running = serve_listening()
    if running is not None and running != (host, port, cert):
        listening = "HTTPS" if running[2] else "plain HTTP"
        raise ConfigError(
            f"Ray Serve already serves {listening} on {running[0]}:{running[1]} in this "
            f"cluster{f' with {running[2]!r}' if running[2] else ''} (fixed when it starts), "
            f"not {'HTTPS' if tls else 'plain HTTP'} on {host}:{port}: ask for that, or stop "
            "it first (serve shutdown)"
        )
    options: dict[str, Any] = {"host": host, "port": port}
    if tls is not None:
        options.update(ssl_certfile=tls.cert, ssl_keyfile=tls.key)
    serve.start(http_options=options)
    deployment: Any = GatewayDeployment
    if autoscaling is not None:
        deployment = deployment.options(autoscaling_config=autoscaling)
    else:
        deployment = deployment.options(num_replicas=replicas)
    serve.run(
        # One replica, for good: its own windows are the cluster's (a redeploy's old and
        # new replica overlap for seconds, each counting on its own meanwhile).
        deployment.bind(namespace, store, limits, jwt, autoscaling is not None or replicas > 1),
        name=GATEWAY_APP,
        route_prefix="/",
        blocking=False,
    )
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}"
