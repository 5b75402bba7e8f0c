"""Telemetry: GenAI-convention spans, opt-in export setup, and Ray metrics.

- :mod:`.spans` — ``invoke_agent``, ``chat`` and ``execute_tool`` spans, their attributes
  and events, and W3C context propagation across actor calls;
- :mod:`.setup` — a global tracer provider from the ``OTEL_*`` variables, installed only
  when the runtime is asked to (library code never installs one);
- :mod:`.metrics` — counters, histograms and gauges through ``ray.util.metrics``.
"""

from .metrics import METRICS, CircuitState, Metrics, MetricSpec, metrics
from .setup import (
    TelemetryPlan,
    flush,
    flush_async,
    plan_telemetry,
    setup_telemetry,
    shutdown_telemetry,
    telemetry_env,
)
from .spans import (
    CAPTURE_CONTENT_ENV,
    attached,
    capture_content,
    chat_span,
    error_type,
    execute_tool_span,
    inject,
    invoke_agent_span,
    mark_error,
    record_chat_content,
    record_chat_response,
    record_fallback,
    record_first_token,
    record_retry,
    record_tool_content,
    set_turn_usage,
    tracer,
    use_tracer_provider,
)

__all__ = [
    "CAPTURE_CONTENT_ENV",
    "METRICS",
    "CircuitState",
    "MetricSpec",
    "Metrics",
    "TelemetryPlan",
    "attached",
    "capture_content",
    "chat_span",
    "error_type",
    "execute_tool_span",
    "flush",
    "flush_async",
    "inject",
    "invoke_agent_span",
    "mark_error",
    "metrics",
    "plan_telemetry",
    "record_chat_content",
    "record_chat_response",
    "record_fallback",
    "record_first_token",
    "record_retry",
    "record_tool_content",
    "set_turn_usage",
    "setup_telemetry",
    "shutdown_telemetry",
    "telemetry_env",
    "tracer",
    "use_tracer_provider",
]
