"""overstory's metrics, recorded through ``ray.util.metrics``.

Ray exports them on each node's metrics port with a ``ray_`` prefix
(``ray_overstory_turns_total``, ...), next to Ray's own, so the Ray dashboard's Grafana
and any Prometheus scraping the cluster see them. Every metric is declared once, in
:data:`METRICS`, with its fixed tag keys.

:func:`metrics` returns the process's :class:`Metrics`. Its instruments are created on the
first record in the process that records (a conversation or provider actor, or a driver
with Ray initialized) — Ray metric objects belong to the process that made them. Without
Ray initialized every method returns at once and records nothing (and never imports Ray).

Tag values must stay bounded: agent, tool, provider, model, endpoint and supervisor names
come from configuration; outcomes, reasons and error types from fixed vocabularies. Never
tag with a user id, a conversation id or message text.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["COUNTER_FLUSH_S", "METRICS", "CircuitState", "MetricSpec", "Metrics", "metrics"]

log = logging.getLogger(__name__)

CircuitState = Literal["closed", "half_open", "open"]

#: The value ``overstory_circuit_state`` takes for each state.
CIRCUIT_STATE_VALUES: dict[CircuitState, int] = {"closed": 0, "half_open": 1, "open": 2}

_LATENCY_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0]
_WAIT_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
_MAX_TAG_CHARS = 128


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric: its Ray name (exported as ``ray_<name>``), type and tag keys."""

    name: str
    kind: Literal["counter", "histogram", "gauge"]
    description: str
    tag_keys: tuple[str, ...]
    boundaries: tuple[float, ...] = ()


#: Every metric overstory records, by the attribute :class:`Metrics` keeps it under.
METRICS: dict[str, MetricSpec] = {
    "turns": MetricSpec(
        "overstory_turns_total",
        "counter",
        "Conversation turns finished, by agent, version and outcome.",
        ("agent", "version", "outcome"),
    ),
    "turn_latency": MetricSpec(
        "overstory_turn_latency_seconds",
        "histogram",
        "Seconds from a turn's start to its reply (or failure).",
        ("agent", "version", "outcome"),
        tuple(_LATENCY_BUCKETS),
    ),
    "tokens": MetricSpec(
        "overstory_tokens_total",
        "counter",
        "Model tokens consumed, by provider, model and direction (input or output).",
        ("provider", "model", "direction"),
    ),
    "model_calls": MetricSpec(
        "overstory_model_calls_total",
        "counter",
        "Model calls made to a provider endpoint, by outcome (ok or the error type).",
        ("provider", "model", "outcome"),
    ),
    "model_latency": MetricSpec(
        "overstory_model_call_seconds",
        "histogram",
        "Seconds one model call took, retries included.",
        ("provider", "model", "outcome"),
        tuple(_LATENCY_BUCKETS),
    ),
    "time_to_first_token": MetricSpec(
        "overstory_time_to_first_token_seconds",
        "histogram",
        "Seconds from a streamed model call's start to its first text delta, by agent.",
        ("agent",),
        tuple(_LATENCY_BUCKETS),
    ),
    "tool_calls": MetricSpec(
        "overstory_tool_calls_total",
        "counter",
        "Tool calls run, by tool and outcome (ok or error).",
        ("tool", "outcome"),
    ),
    "cache": MetricSpec(
        "overstory_cache_total",
        "counter",
        "Model calls of agents with a response cache, by outcome (hit or miss).",
        ("agent", "outcome"),
    ),
    "cost": MetricSpec(
        "overstory_cost_usd_total",
        "counter",
        "Dollars spent on model calls by the price table, by the model that answered.",
        ("model",),
    ),
    "jobs": MetricSpec(
        "overstory_jobs_total",
        "counter",
        "Background job attempts ended, by outcome (succeeded, failed, cancelled, retried).",
        ("outcome",),
    ),
    "jobs_running": MetricSpec(
        "overstory_jobs_running",
        "gauge",
        "Background jobs the namespace's runner is running now.",
        (),
    ),
    "jobs_due": MetricSpec(
        "overstory_jobs_due",
        "gauge",
        "Background jobs due at the runner's last look (at most 200 counted).",
        (),
    ),
    "jobs_oldest_due": MetricSpec(
        "overstory_jobs_oldest_due_seconds",
        "gauge",
        "Seconds the oldest due background job has waited, at the runner's last look.",
        (),
    ),
    "quota_refusals": MetricSpec(
        "overstory_quota_refusals_total",
        "counter",
        "Turns or model calls a user's quota refused, by the limit that refused.",
        ("limit",),
    ),
    "store_errors": MetricSpec(
        "overstory_store_errors_total",
        "counter",
        "Store failures that reached a turn or a request, by where (turn, door, jobs).",
        ("where",),
    ),
    "quarantines": MetricSpec(
        "overstory_quarantines_total",
        "counter",
        "Conversations quarantined for crashing past their restart intensity.",
        (),
    ),
    "restarts": MetricSpec(
        "overstory_restarts_total",
        "counter",
        "Children restarted by a supervisor.",
        ("supervisor",),
    ),
    "passivations": MetricSpec(
        "overstory_passivations_total",
        "counter",
        "Conversation actors passivated, by reason (idle, evicted, ...).",
        ("reason",),
    ),
    "live_conversations": MetricSpec(
        "overstory_live_conversations",
        "gauge",
        "Live conversations, per host (hosted) or for the dedicated supervisor.",
        ("host",),
    ),
    "fallbacks": MetricSpec(
        "overstory_provider_fallbacks_total",
        "counter",
        "Times a model chain fell through from a model, by the error that caused it.",
        ("from_model", "error_type"),
    ),
    "circuit_state": MetricSpec(
        "overstory_circuit_state",
        "gauge",
        "Circuit breaker state per endpoint: 0 closed, 1 half open, 2 open.",
        ("endpoint",),
    ),
    "rate_limit_wait": MetricSpec(
        "overstory_rate_limit_wait_seconds",
        "histogram",
        "Seconds a request waited for its endpoint's rate limiter, by whether it was admitted.",
        ("endpoint", "admitted"),
        tuple(_WAIT_BUCKETS),
    ),
}


def _ray_initialized() -> bool:
    # A process that never imported Ray cannot have initialized it: don't import it here.
    ray = sys.modules.get("ray")
    return ray is not None and bool(ray.is_initialized())


def _tag(value: str) -> str:
    value = str(value)
    return value[:_MAX_TAG_CHARS] if value else "unknown"


#: How long counter increments are summed in the process before they reach Ray's
#: counters (one ``inc`` per metric and tag set per interval): a Ray ``inc`` costs tens
#: of microseconds of a host's loop, four of them a turn; Ray reports every 10 s anyway.
COUNTER_FLUSH_S = 1.0

_Pending = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Metrics:
    """Records overstory's metrics in this process; see :data:`METRICS` for each one.

    Counter increments are summed here and handed to Ray's counters every
    :data:`COUNTER_FLUSH_S` by a daemon thread (and by :meth:`flush`, which a process
    stopping on purpose calls); histograms and gauges are recorded at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._instruments: dict[str, Any] | None = None
        self._pending: _Pending = {}
        self._flusher: threading.Thread | None = None

    def _get(self) -> dict[str, Any] | None:
        if not _ray_initialized():
            return None
        instruments = self._instruments
        if instruments is None:
            with self._lock:
                if self._instruments is None:
                    self._instruments = _create()
                instruments = self._instruments
        return instruments

    def _inc(self, key: str, value: float, tags: dict[str, str]) -> None:
        if value <= 0:  # Ray's counters refuse 0 and negatives
            return
        if self._get() is None:
            return
        at = (key, tuple(sorted(tags.items())))
        with self._lock:
            self._pending[at] = self._pending.get(at, 0.0) + value
            if self._flusher is None:
                self._flusher = threading.Thread(
                    target=self._flush_forever, name="overstory-metrics", daemon=True
                )
                self._flusher.start()

    def _flush_forever(self) -> None:
        while True:
            time.sleep(COUNTER_FLUSH_S)
            try:
                self.flush()
            except Exception:  # a metric must never end the flusher: drop, go on
                log.exception("metrics: counter increments could not be recorded")

    def flush(self) -> None:
        """Hand the counter increments summed so far to Ray's counters."""
        with self._lock:
            pending, self._pending = self._pending, {}
        instruments = self._get() if pending else None
        if instruments is not None:
            for (key, tags), value in pending.items():
                instruments[key].inc(value, tags=dict(tags))

    def _observe(self, key: str, value: float, tags: dict[str, str]) -> None:
        instruments = self._get()
        if instruments is not None:
            instruments[key].observe(max(0.0, float(value)), tags=tags)

    def _set(self, key: str, value: float, tags: dict[str, str]) -> None:
        instruments = self._get()
        if instruments is not None:
            instruments[key].set(value, tags=tags)

    # --- turns and model calls ---------------------------------------------------------

    def turn(self, agent: str, outcome: str, seconds: float, version: str = "1") -> None:
        """A finished turn: ``outcome`` is ``ok`` or why it failed (a fixed vocabulary)."""
        tags = {"agent": _tag(agent), "version": _tag(version), "outcome": _tag(outcome)}
        self._inc("turns", 1, tags)
        self._observe("turn_latency", seconds, tags)

    def tokens(self, provider: str, model: str, input_tokens: int, output_tokens: int) -> None:
        """Tokens one model call consumed."""
        base = {"provider": _tag(provider), "model": _tag(model)}
        self._inc("tokens", input_tokens, {**base, "direction": "input"})
        self._inc("tokens", output_tokens, {**base, "direction": "output"})

    def model_call(self, provider: str, model: str, outcome: str, seconds: float) -> None:
        """One model call to an endpoint: ``outcome`` is ``ok`` or the error type."""
        tags = {"provider": _tag(provider), "model": _tag(model), "outcome": _tag(outcome)}
        self._inc("model_calls", 1, tags)
        self._observe("model_latency", seconds, tags)

    def time_to_first_token(self, agent: str, seconds: float) -> None:
        """A streamed model call's first text delta arrived ``seconds`` after it began."""
        self._observe("time_to_first_token", seconds, {"agent": _tag(agent)})

    def tool_call(self, tool: str, outcome: Literal["ok", "error"]) -> None:
        """One tool call; failures are the ``error`` outcome."""
        if outcome not in ("ok", "error"):
            raise ValueError(f"tool call outcome must be 'ok' or 'error', not {outcome!r}")
        self._inc("tool_calls", 1, {"tool": _tag(tool), "outcome": outcome})

    def cost(self, model: str, dollars: float) -> None:
        """An answer's cost by the configured price table."""
        self._inc("cost", dollars, {"model": _tag(model)})

    def cache(self, agent: str, outcome: Literal["hit", "miss"]) -> None:
        """A model call of an agent with a response cache: answered from it, or not."""
        self._inc("cache", 1, {"agent": _tag(agent), "outcome": outcome})

    # --- background jobs -----------------------------------------------------------------

    def job(self, outcome: str) -> None:
        """A job's attempt ended: ``succeeded``, ``failed``, ``cancelled`` or ``retried``."""
        self._inc("jobs", 1, {"outcome": _tag(outcome)})

    def jobs_running(self, n: int) -> None:
        self._set("jobs_running", n, {})

    def jobs_due(self, n: int) -> None:
        self._set("jobs_due", n, {})

    def jobs_oldest_due(self, seconds: float) -> None:
        self._set("jobs_oldest_due", max(0.0, seconds), {})

    # --- refusals and failures -----------------------------------------------------------

    def quota_refusal(self, limit: str) -> None:
        """A user's quota refused a turn or a call: ``limit`` names which one."""
        self._inc("quota_refusals", 1, {"limit": _tag(limit)})

    def store_error(self, where: Literal["turn", "door", "jobs"]) -> None:
        """A store failure reached a turn, a request at the door, or the job runner."""
        self._inc("store_errors", 1, {"where": where})

    def quarantine(self) -> None:
        """A conversation crashed past its restart intensity and is refused for now."""
        self._inc("quarantines", 1, {})

    # --- lifecycle ---------------------------------------------------------------------

    def restart(self, supervisor: str) -> None:
        """A supervisor restarted one of its children."""
        self._inc("restarts", 1, {"supervisor": _tag(supervisor)})

    def passivation(self, reason: str) -> None:
        """A conversation actor passivated (``idle``, ``evicted``, ...)."""
        self._inc("passivations", 1, {"reason": _tag(reason)})

    def live_conversations(self, n: int, host: str = "dedicated") -> None:
        """How many conversations ``host`` holds live (``dedicated``: the conversation
        supervisor's actors). Ray keeps a gauge's last value per reporting process."""
        self._set("live_conversations", n, {"host": _tag(host)})

    # --- provider policies -------------------------------------------------------------

    def fallback(self, from_model: str, error_type: str) -> None:
        """A model chain fell through from ``from_model`` after ``error_type``."""
        self._inc("fallbacks", 1, {"from_model": _tag(from_model), "error_type": _tag(error_type)})

    def circuit_state(self, endpoint: str, state: CircuitState) -> None:
        """An endpoint's circuit breaker is now ``state`` (0 closed, 1 half open, 2 open)."""
        value = CIRCUIT_STATE_VALUES.get(state)
        if value is None:
            raise ValueError(
                f"circuit state must be one of {', '.join(CIRCUIT_STATE_VALUES)}, not {state!r}"
            )
        self._set("circuit_state", value, {"endpoint": _tag(endpoint)})

    def rate_limit_wait(self, endpoint: str, seconds: float, admitted: bool) -> None:
        """A request waited ``seconds`` for the endpoint's limiter and was (not) admitted."""
        tags = {"endpoint": _tag(endpoint), "admitted": "true" if admitted else "false"}
        self._observe("rate_limit_wait", seconds, tags)


def _create() -> dict[str, Any]:
    from ray.util.metrics import Counter, Gauge, Histogram

    instruments: dict[str, Any] = {}
    for key, spec in METRICS.items():
        if spec.kind == "counter":
            instruments[key] = Counter(spec.name, spec.description, tag_keys=spec.tag_keys)
        elif spec.kind == "histogram":
            instruments[key] = Histogram(
                spec.name,
                spec.description,
                boundaries=list(spec.boundaries),
                tag_keys=spec.tag_keys,
            )
        else:
            instruments[key] = Gauge(spec.name, spec.description, tag_keys=spec.tag_keys)
    return instruments


_metrics = Metrics()


def metrics() -> Metrics:
    """The process's :class:`Metrics`."""
    return _metrics
