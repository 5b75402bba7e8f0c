"""Installing a global tracer provider from the standard ``OTEL_*`` variables — on request.

overstory's library code only ever asks the OpenTelemetry API for a tracer, so by default
its spans go nowhere (or to a provider the application installed). The runtime calls
:func:`setup_telemetry` when it is asked to set telemetry up — the CLI does when
``OTEL_TRACES_EXPORTER`` is set — and the conversation and provider actors call it too,
with the variables :func:`telemetry_env` forwarded to them, so their spans reach the same
exporter.

The variables read here:

===========================================  ==============================================
``OTEL_SDK_DISABLED``                        ``true``: install nothing
``OTEL_TRACES_EXPORTER``                     comma list of ``otlp``, ``console``, ``none``;
                                             unset or ``none``: install nothing
``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL``,      ``http/protobuf`` (default) or ``grpc``
``OTEL_EXPORTER_OTLP_PROTOCOL``
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``       used as given (for HTTP, the full URL with its
                                             path, e.g. ``http://host:4318/v1/traces``)
``OTEL_EXPORTER_OTLP_ENDPOINT``              a base URL: HTTP appends ``/v1/traces``; gRPC
                                             uses it as given (``http://`` = insecure)
``OTEL_EXPORTER_OTLP_(TRACES_)HEADERS``      ``key=value,...`` (URL-encoded values)
``OTEL_SERVICE_NAME``                        the resource's ``service.name``
===========================================  ==============================================

Those are read from the ``env`` mapping given (``os.environ`` by default). The exporters and
the SDK read the rest themselves from ``os.environ``: TLS files, timeouts, compression
(``OTEL_EXPORTER_OTLP_*``), batching (``OTEL_BSP_*``), ``OTEL_RESOURCE_ATTRIBUTES``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from ..exceptions import ConfigError
from .logs import LOG_ENV, setup_logging
from .metrics import metrics

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = [
    "TelemetryPlan",
    "flush",
    "flush_async",
    "plan_telemetry",
    "setup_telemetry",
    "shutdown_telemetry",
    "telemetry_env",
]

_log = logging.getLogger(__name__)

Exporter = Literal["otlp", "console"]
Protocol = Literal["http/protobuf", "grpc"]

#: Each accepted ``OTEL_TRACES_EXPORTER`` name and the exporter it means (``none``: none).
_EXPORTERS: dict[str, Exporter | None] = {"otlp": "otlp", "console": "console", "none": None}
_PROTOCOLS: dict[str, Protocol] = {"http/protobuf": "http/protobuf", "grpc": "grpc"}
_HTTP_TRACES_PATH = "v1/traces"
_FORWARDED_PREFIX = "OTEL_"  # covers the content opt-in, spans.CAPTURE_CONTENT_ENV

_lock = threading.Lock()
_provider: TracerProvider | None = None
_shut_down = False


@dataclass(frozen=True, slots=True)
class TelemetryPlan:
    """What :func:`setup_telemetry` installs, decided from the variables alone."""

    exporters: tuple[Exporter, ...]
    protocol: Protocol
    service_name: str
    endpoint: str | None = None
    headers: str | None = field(default=None, repr=False)  # may hold credentials


def plan_telemetry(
    service_name: str = "overstory", *, env: Mapping[str, str] | None = None
) -> TelemetryPlan | None:
    """Decide from the ``OTEL_*`` variables what to install; ``None``: nothing.

    Raises :class:`~overstory.exceptions.ConfigError` naming the variable and its value
    when one is not valid.
    """
    env = os.environ if env is None else env
    if _flag(env, "OTEL_SDK_DISABLED"):
        return None
    raw = env.get("OTEL_TRACES_EXPORTER", "").strip()
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    exporters: list[Exporter] = []
    for name in names:
        if name not in _EXPORTERS:
            raise ConfigError(
                f"OTEL_TRACES_EXPORTER={raw!r}: unknown exporter {name!r} "
                f"(expected a comma list of {', '.join(sorted(_EXPORTERS))})"
            )
        exporter = _EXPORTERS[name]
        if exporter is not None and exporter not in exporters:
            exporters.append(exporter)
    if not exporters:
        return None

    variable = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
    raw = env.get(variable, "").strip()
    if not raw:
        variable = "OTEL_EXPORTER_OTLP_PROTOCOL"
        raw = env.get(variable, "").strip() or "http/protobuf"
    if raw not in _PROTOCOLS:
        raise ConfigError(
            f"{variable}={raw!r}: overstory exports traces with 'http/protobuf' or 'grpc'"
        )
    protocol = _PROTOCOLS[raw]

    endpoint = _endpoint(env, protocol)
    headers = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or env.get("OTEL_EXPORTER_OTLP_HEADERS")
    ) or None
    service = env.get("OTEL_SERVICE_NAME", "").strip() or service_name
    return TelemetryPlan(tuple(exporters), protocol, service, endpoint, headers)


def setup_telemetry(
    service_name: str = "overstory", *, env: Mapping[str, str] | None = None
) -> bool:
    """Install a global tracer provider exporting as the ``OTEL_*`` variables say.

    Returns whether spans are now exported: ``False`` (and nothing installed) when
    ``OTEL_TRACES_EXPORTER`` is unset or ``none``, or ``OTEL_SDK_DISABLED=true``. Once a
    provider is installed, later calls return ``True`` without installing another; when
    some other global SDK provider is already in place, overstory's spans go to it and
    nothing is installed. Raises :class:`~overstory.exceptions.ConfigError` for a bad
    value, naming the variable and the value.
    """
    global _provider
    with contextlib.suppress(ConfigError):  # a bad OVERSTORY_LOG: the CLI reports it
        setup_logging(env)
    plan = plan_telemetry(service_name, env=env)
    if plan is None:
        return False
    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    with _lock:
        if _provider is not None:
            return True
        if _shut_down:
            _log.warning("telemetry was shut down in this process; not installing it again")
            return False
        if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            _log.info("a global tracer provider is already installed; overstory uses it")
            return True
        exporters = [_exporter(name, plan) for name in plan.exporters]
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: plan.service_name}))
        for exporter in exporters:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        _provider = provider
    _log.info("telemetry set up: %r", plan)
    return True


def telemetry_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The telemetry variables to forward to Ray workers (``runtime_env`` ``env_vars``).

    Every ``OTEL_*`` variable (the content-capture opt-in is one of them) and
    ``OVERSTORY_LOG``, nothing else.
    They include ``OTEL_EXPORTER_OTLP_*HEADERS``, which may hold a collector's credentials:
    like every ``runtime_env`` value they are visible to whoever can read the cluster's
    job and actor metadata.
    """
    env = os.environ if env is None else env
    return {k: v for k, v in env.items() if k.startswith(_FORWARDED_PREFIX) or k == LOG_ENV}


def flush(timeout_s: float = 5.0) -> bool:
    """Export the spans still buffered by the provider :func:`setup_telemetry` installed
    (call it before an actor exits on purpose); nothing without one. Blocks up to
    ``timeout_s``: on an event loop, use :func:`flush_async`. Returns whether all were
    exported in time (``True`` with nothing installed)."""
    metrics().flush()  # the counters summed in this process, to Ray's
    provider = _provider
    if provider is None:
        return True
    return bool(provider.force_flush(timeout_millis=max(0, int(timeout_s * 1000))))


async def flush_async(timeout_s: float = 2.0) -> bool:
    """:func:`flush` off the event loop, waiting at most ``timeout_s``: what an actor
    does before it is stopped or replaced (spans in the batch processor's buffer die
    with a killed process; ``ray.kill`` runs no exit handler). The loop keeps serving
    meanwhile, and an exporter that hangs past ``timeout_s`` is left to finish in its
    thread: the caller is not held. Returns whether all were exported in time.

    The counter increments this process has summed reach Ray's counters here too; Ray's
    own reporting has no flush: its core worker reports on its own interval, so a process
    killed within one loses that interval's increments.
    """
    metrics().flush()
    if _provider is None:
        return True
    try:
        return await asyncio.wait_for(asyncio.to_thread(flush, timeout_s), timeout_s)
    except TimeoutError:
        _log.warning("telemetry: spans not exported within %g s of a stop", timeout_s)
        return False


def shutdown_telemetry() -> None:
    """Flush and stop the installed provider. Final for the process: OpenTelemetry allows
    one global provider per process, so :func:`setup_telemetry` will not install again."""
    global _provider, _shut_down
    with _lock:
        provider, _provider = _provider, None
        if provider is None:
            return
        _shut_down = True
    provider.shutdown()


# --- helpers ---------------------------------------------------------------------------


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() == "true"


def _endpoint(env: Mapping[str, str], protocol: Protocol) -> str | None:
    """The traces endpoint by the spec's rules, or ``None`` for the exporter's default."""
    signal = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if signal:
        return signal
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if not base:
        return None
    if protocol == "grpc":
        return base
    return f"{base.removesuffix('/')}/{_HTTP_TRACES_PATH}"


def _exporter(name: Exporter, plan: TelemetryPlan) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    from opentelemetry.util.re import parse_env_headers

    headers = dict(parse_env_headers(plan.headers, liberal=True)) if plan.headers else None
    if plan.protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcExporter,
            )
        except ImportError as exc:
            raise ConfigError(
                "the OTLP protocol 'grpc' needs the package opentelemetry-exporter-otlp-proto-grpc"
            ) from exc
        return GrpcExporter(endpoint=plan.endpoint, headers=headers)
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )
    except ImportError as exc:
        raise ConfigError(
            "OTEL_TRACES_EXPORTER='otlp' over http/protobuf needs the package "
            "opentelemetry-exporter-otlp-proto-http"
        ) from exc
    return HttpExporter(endpoint=plan.endpoint, headers=headers)
