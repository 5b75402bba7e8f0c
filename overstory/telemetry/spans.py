"""Spans named and shaped by the OpenTelemetry GenAI semantic conventions.

Three spans describe a conversation's work; each helper is a context manager that starts
the span as the current one, and on an exception records it, sets ``error.type`` and an
ERROR status, and re-raises:

=========================  ========  ====================================================
span                       kind      attributes
=========================  ========  ====================================================
``invoke_agent {agent}``   INTERNAL  ``gen_ai.operation.name=invoke_agent``,
                                     ``gen_ai.agent.name``, ``gen_ai.conversation.id``,
                                     ``gen_ai.usage.input_tokens`` / ``output_tokens``
                                     (the turn's total, :func:`set_turn_usage`)
``chat {model}``           CLIENT    ``gen_ai.operation.name=chat``,
                                     ``gen_ai.provider.name``, ``gen_ai.request.model``,
                                     ``server.address``, ``server.port``, then
                                     (:func:`record_chat_response`)
                                     ``gen_ai.response.model``, ``gen_ai.response.id``,
                                     ``gen_ai.usage.input_tokens`` / ``output_tokens``,
                                     ``gen_ai.response.finish_reasons``
``execute_tool {tool}``    INTERNAL  ``gen_ai.operation.name=execute_tool``,
                                     ``gen_ai.tool.name``, ``gen_ai.tool.call.id``,
                                     ``gen_ai.tool.type=function``
=========================  ========  ====================================================

Retries and fallbacks inside one ``chat`` span are span events. The ``gen_ai.*``
namespace belongs to the semantic conventions, which define no such events, so they
carry overstory's own names:

- ``overstory.retry``: ``overstory.retry.attempt`` (1 = the first retry),
  ``error.type`` (why the previous attempt failed), ``overstory.retry.delay_s``;
- ``overstory.fallback``: ``overstory.fallback.failed_model``, ``error.type``,
  ``overstory.fallback.next_model`` (absent when the chain is exhausted).

Message contents are recorded only when the user opts in with the GenAI convention's
variable ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``
(:func:`capture_content`): then :func:`record_chat_content` sets ``gen_ai.input.messages``,
``gen_ai.output.messages`` and ``gen_ai.system_instructions`` (JSON, in the conventions'
parts format) and :func:`record_tool_content` sets ``gen_ai.tool.call.arguments`` and
``gen_ai.tool.call.result``. Otherwise both do nothing.

Spans go to whatever tracer provider is global — the API's no-op one unless the runtime
was asked to set telemetry up (:mod:`overstory.telemetry.setup`). :func:`use_tracer_provider`
points the helpers at another provider (tests, or an application that keeps its own).

Across the Ray boundary context travels explicitly: the caller passes :func:`inject`'s
W3C carrier as an argument of the actor call, and the actor runs the call inside
:func:`attached`, so the client's span is the parent of the actor's spans.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import metadata
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ..messages import AssistantMessage, Message, ModelResponse, ToolReturn, UserMessage

__all__ = [
    "CAPTURE_CONTENT_ENV",
    "attached",
    "capture_content",
    "chat_span",
    "error_type",
    "execute_tool_span",
    "inject",
    "invoke_agent_span",
    "mark_error",
    "record_chat_content",
    "record_chat_response",
    "record_fallback",
    "record_first_token",
    "record_retry",
    "record_tool_content",
    "recording",
    "set_turn_usage",
    "tracer",
    "use_tracer_provider",
]

#: The GenAI convention's opt-in for recording message contents.
CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"

_SCOPE = "overstory"
try:
    _VERSION: str | None = metadata.version("overstory")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    _VERSION = None

# Attribute keys (semantic conventions, GenAI and general).
OPERATION = "gen_ai.operation.name"
AGENT_NAME = "gen_ai.agent.name"
AGENT_VERSION = "gen_ai.agent.version"
CONVERSATION_ID = "gen_ai.conversation.id"
PROVIDER = "gen_ai.provider.name"
REQUEST_MODEL = "gen_ai.request.model"
RESPONSE_MODEL = "gen_ai.response.model"
RESPONSE_ID = "gen_ai.response.id"
FINISH_REASONS = "gen_ai.response.finish_reasons"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
TOOL_NAME = "gen_ai.tool.name"
TOOL_CALL_ID = "gen_ai.tool.call.id"
TOOL_TYPE = "gen_ai.tool.type"
TOOL_ARGUMENTS = "gen_ai.tool.call.arguments"
TOOL_RESULT = "gen_ai.tool.call.result"
INPUT_MESSAGES = "gen_ai.input.messages"
OUTPUT_MESSAGES = "gen_ai.output.messages"
SYSTEM_INSTRUCTIONS = "gen_ai.system_instructions"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
ERROR_TYPE = "error.type"

# overstory's own span events (the conventions define none for retries and fallbacks).
RETRY_EVENT = "overstory.retry"
RETRY_ATTEMPT = "overstory.retry.attempt"
RETRY_DELAY = "overstory.retry.delay_s"
FALLBACK_EVENT = "overstory.fallback"
FALLBACK_FAILED_MODEL = "overstory.fallback.failed_model"
FALLBACK_NEXT_MODEL = "overstory.fallback.next_model"
#: On a streamed ``chat`` span: seconds from the request to its first text delta.
TIME_TO_FIRST_TOKEN = "overstory.time_to_first_token_s"

# The carrier holds W3C trace context and baggage whatever OTEL_PROPAGATORS says: it only
# travels between overstory's own client and actors, so both ends must agree on it.
_PROPAGATOR = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])

_override: TracerProvider | None = None
_override_tracer: trace.Tracer | None = None
_global_tracer: trace.Tracer | None = None


# --- the tracer ------------------------------------------------------------------------


def tracer() -> trace.Tracer:
    """overstory's tracer, from the provider set by :func:`use_tracer_provider` if any,
    else from the global provider (no-op until someone installs one; the tracer follows a
    provider installed later)."""
    global _global_tracer
    if _override is not None:
        assert _override_tracer is not None
        return _override_tracer
    if _global_tracer is None:
        _global_tracer = trace.get_tracer(_SCOPE, _VERSION)
    return _global_tracer


@contextmanager
def use_tracer_provider(provider: TracerProvider | None) -> Iterator[None]:
    """Send this module's spans to ``provider`` instead of the global one, for the block.

    For tests and for applications that keep a provider of their own without making it
    global. Process-wide, not per task: do not nest it in concurrent code.
    """
    global _override, _override_tracer
    previous = _override, _override_tracer
    _override = provider
    _override_tracer = None if provider is None else provider.get_tracer(_SCOPE, _VERSION)
    try:
        yield
    finally:
        _override, _override_tracer = previous


def capture_content() -> bool:
    """Whether the user opted in to recording message contents on spans."""
    return os.environ.get(CAPTURE_CONTENT_ENV, "").strip().lower() == "true"


# --- errors ----------------------------------------------------------------------------


def error_type(exc: BaseException) -> str:
    """The ``error.type`` of an exception: a :class:`~overstory.exceptions.ModelError`'s
    ``kind`` (``rate_limited``, ``timeout``, ...), else the exception's class name."""
    kind = getattr(exc, "kind", None)
    if isinstance(kind, str) and kind:
        return kind
    if isinstance(exc, GeneratorExit | asyncio.CancelledError):
        return "cancelled"  # a reader stopped a stream, or a turn was cancelled
    return type(exc).__qualname__


def mark_error(span: Span, error_type: str, message: str = "") -> None:
    """Mark ``span`` failed for a failure reported as a value rather than raised (a tool
    that returned an error result)."""
    span.set_attribute(ERROR_TYPE, error_type)
    span.set_status(Status(StatusCode.ERROR, message or None))


def recording() -> bool:
    """Whether spans go anywhere: a tracer provider was installed (globally, or for this
    module by :func:`use_tracer_provider`). Until one is, every span would be the API's
    no-op one, and the helpers skip making it (~5-20 µs each on a turn's path); the
    context a caller attached (:func:`attached`) is still the current one, so what is
    called from here carries the same trace on."""
    return _override is not None or not isinstance(
        trace.get_tracer_provider(), trace.ProxyTracerProvider
    )


@contextmanager
def _span(name: str, kind: SpanKind, attributes: dict[str, Any]) -> Iterator[Span]:
    # Attributes are given at start so samplers see them; errors are recorded here rather
    # than by the SDK so that ``error.type`` is set with the same rule everywhere.
    if not recording():
        yield trace.INVALID_SPAN
        return
    with tracer().start_as_current_span(
        name,
        kind=kind,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except BaseException as exc:
            span.record_exception(exc)
            mark_error(span, error_type(exc), f"{type(exc).__qualname__}: {exc}")
            raise


# --- invoke_agent ----------------------------------------------------------------------


@contextmanager
def invoke_agent_span(
    agent_name: str, conversation_id: str, agent_version: str | None = None
) -> Iterator[Span]:
    """The ``invoke_agent {agent_name}`` span around one conversation turn."""
    attributes: dict[str, Any] = {
        OPERATION: "invoke_agent",
        AGENT_NAME: agent_name,
        CONVERSATION_ID: conversation_id,
    }
    if agent_version is not None:
        attributes[AGENT_VERSION] = agent_version
    with _span(f"invoke_agent {agent_name}", SpanKind.INTERNAL, attributes) as span:
        yield span


def set_turn_usage(span: Span, input_tokens: int, output_tokens: int) -> None:
    """Record a turn's total token usage on its ``invoke_agent`` span."""
    span.set_attribute(INPUT_TOKENS, input_tokens)
    span.set_attribute(OUTPUT_TOKENS, output_tokens)


# --- chat ------------------------------------------------------------------------------


@contextmanager
def chat_span(
    provider: str,
    request_model: str,
    server_address: str | None = None,
    server_port: int | None = None,
) -> Iterator[Span]:
    """The ``chat {request_model}`` CLIENT span around one model call (its retries and
    fallbacks included, as events)."""
    attributes: dict[str, Any] = {
        OPERATION: "chat",
        PROVIDER: provider,
        REQUEST_MODEL: request_model,
    }
    if server_address:
        attributes[SERVER_ADDRESS] = server_address
    if server_port is not None:
        attributes[SERVER_PORT] = server_port
    with _span(f"chat {request_model}", SpanKind.CLIENT, attributes) as span:
        yield span


def record_chat_response(
    span: Span,
    *,
    response_model: str,
    input_tokens: int,
    output_tokens: int,
    finish_reasons: Sequence[str],
    response_id: str | None = None,
) -> None:
    """Record what the model answered (never its text: see :func:`record_chat_content`)."""
    if response_model:
        span.set_attribute(RESPONSE_MODEL, response_model)
    if response_id:
        span.set_attribute(RESPONSE_ID, response_id)
    span.set_attribute(INPUT_TOKENS, input_tokens)
    span.set_attribute(OUTPUT_TOKENS, output_tokens)
    span.set_attribute(FINISH_REASONS, list(finish_reasons))


def record_first_token(span: Span, seconds: float) -> None:
    """A streamed model call's time to its first text delta, on its ``chat`` span."""
    span.set_attribute(TIME_TO_FIRST_TOKEN, float(seconds))


def record_retry(span: Span, *, attempt: int, error_type: str, delay_s: float) -> None:
    """An ``overstory.retry`` event: attempt ``attempt`` (1 = first retry) follows a
    failure of ``error_type`` after waiting ``delay_s`` seconds."""
    span.add_event(
        RETRY_EVENT,
        {RETRY_ATTEMPT: attempt, ERROR_TYPE: error_type, RETRY_DELAY: float(delay_s)},
    )


def record_fallback(
    span: Span, *, failed_model: str, error_type: str, next_model: str | None
) -> None:
    """An ``overstory.fallback`` event: ``failed_model`` failed with ``error_type`` and the
    chain moves on to ``next_model`` (``None``: the chain is exhausted)."""
    attributes: dict[str, Any] = {FALLBACK_FAILED_MODEL: failed_model, ERROR_TYPE: error_type}
    if next_model is not None:
        attributes[FALLBACK_NEXT_MODEL] = next_model
    span.add_event(FALLBACK_EVENT, attributes)


def record_chat_content(
    span: Span,
    *,
    messages: Sequence[Message] = (),
    response: ModelResponse | None = None,
    instructions: str | None = None,
) -> None:
    """With content capture on, record the request's messages, the instructions and the
    response in the conventions' JSON parts format; otherwise do nothing."""
    if not capture_content():
        return
    if instructions:
        span.set_attribute(SYSTEM_INSTRUCTIONS, _dumps([{"type": "text", "content": instructions}]))
    if messages:
        span.set_attribute(INPUT_MESSAGES, _dumps([_message_json(m) for m in messages]))
    if response is not None:
        out = _assistant_json(response.content, response.tool_calls)
        out["finish_reason"] = response.finish_reason
        span.set_attribute(OUTPUT_MESSAGES, _dumps([out]))


def _message_json(message: Message) -> dict[str, Any]:
    if isinstance(message, UserMessage):
        return {"role": "user", "parts": [{"type": "text", "content": message.content}]}
    if isinstance(message, AssistantMessage):
        return _assistant_json(message.content, message.tool_calls)
    if isinstance(message, ToolReturn):
        part = {"type": "tool_call_response", "id": message.tool_call_id}
        return {"role": "tool", "parts": [{**part, "response": message.content}]}
    raise TypeError(f"not a message: {message!r}")


def _assistant_json(content: str, tool_calls: Sequence[Any]) -> dict[str, Any]:
    parts: list[dict[str, Any]] = []
    if content:
        parts.append({"type": "text", "content": content})
    for call in tool_calls:
        parts.append(
            {"type": "tool_call", "id": call.id, "name": call.name, "arguments": call.arguments}
        )
    return {"role": "assistant", "parts": parts}


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


# --- execute_tool ----------------------------------------------------------------------


@contextmanager
def execute_tool_span(tool_name: str, call_id: str) -> Iterator[Span]:
    """The ``execute_tool {tool_name}`` span around one tool call."""
    attributes: dict[str, Any] = {
        OPERATION: "execute_tool",
        TOOL_NAME: tool_name,
        TOOL_CALL_ID: call_id,
        TOOL_TYPE: "function",
    }
    with _span(f"execute_tool {tool_name}", SpanKind.INTERNAL, attributes) as span:
        yield span


def record_tool_content(
    span: Span, *, arguments: Mapping[str, Any] | None = None, result: str | None = None
) -> None:
    """With content capture on, record a tool call's arguments and result; otherwise do
    nothing."""
    if not capture_content():
        return
    if arguments is not None:
        span.set_attribute(TOOL_ARGUMENTS, _dumps(dict(arguments)))
    if result is not None:
        span.set_attribute(TOOL_RESULT, result)


# --- context across the Ray boundary ---------------------------------------------------


def inject() -> dict[str, str]:
    """The current context as a W3C carrier (``traceparent``, ``tracestate``,
    ``baggage``) to pass as an actor call's argument; ``{}`` with no span and no baggage."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier


@contextmanager
def attached(carrier: Mapping[str, str] | None) -> Iterator[None]:
    """Make the carrier's context current for the block, so spans started in it are
    children of the caller's span. Nothing happens for ``None`` or ``{}``."""
    if not carrier:
        yield
        return
    token = otel_context.attach(_PROPAGATOR.extract(carrier))
    try:
        yield
    finally:
        otel_context.detach(token)
