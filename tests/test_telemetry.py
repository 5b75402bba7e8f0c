"""Telemetry: span names, kinds and attributes; context propagation; export set-up; metrics.

Span tests use an in-memory exporter on a local provider (never the global one, which
would leak into other tests); the export tests install the global provider in a
subprocess and prove real OTLP/HTTP export to a loopback receiver that decodes the
protobuf payloads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from conftest import RecordedMetrics
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from otlp_receiver import OtlpReceiver, Span

from overstory.exceptions import ConfigError, ModelError
from overstory.messages import (
    AssistantMessage,
    Message,
    ModelResponse,
    ToolCall,
    ToolReturn,
    UserMessage,
)
from overstory.telemetry import (
    CAPTURE_CONTENT_ENV,
    METRICS,
    Metrics,
    attached,
    capture_content,
    chat_span,
    execute_tool_span,
    inject,
    invoke_agent_span,
    mark_error,
    plan_telemetry,
    record_chat_content,
    record_chat_response,
    record_fallback,
    record_retry,
    record_tool_content,
    set_turn_usage,
    setup_telemetry,
    telemetry_env,
    use_tracer_provider,
)
from overstory.telemetry.setup import _exporter

ROOT = Path(__file__).resolve().parent.parent


def _one(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    spans = [s for s in exporter.get_finished_spans() if s.name == name]
    assert len(spans) == 1, [s.name for s in exporter.get_finished_spans()]
    return spans[0]


# --- span names, kinds, attributes -------------------------------------------------------


def test_a_turn_with_a_model_call_and_a_tool_call(exporter: InMemorySpanExporter) -> None:
    with invoke_agent_span("support", "conv-1") as turn:
        with chat_span("openai", "gpt-4.1-mini", "api.openai.com", 443) as chat:
            record_retry(chat, attempt=1, error_type="rate_limited", delay_s=0.5)
            record_fallback(
                chat, failed_model="gpt-4.1-mini", error_type="timeout", next_model="claude-x"
            )
            record_chat_response(
                chat,
                response_model="gpt-4.1-mini-2025-04-14",
                input_tokens=12,
                output_tokens=5,
                finish_reasons=["tool_calls"],
                response_id="resp-1",
            )
        with execute_tool_span("get_weather", "call-1"):
            pass
        set_turn_usage(turn, 30, 9)

    agent = _one(exporter, "invoke_agent support")
    chat_s = _one(exporter, "chat gpt-4.1-mini")
    tool = _one(exporter, "execute_tool get_weather")

    assert agent.kind is SpanKind.INTERNAL
    assert dict(agent.attributes or {}) == {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": "support",
        "gen_ai.conversation.id": "conv-1",
        "gen_ai.usage.input_tokens": 30,
        "gen_ai.usage.output_tokens": 9,
    }
    assert agent.status.status_code is StatusCode.UNSET

    assert chat_s.kind is SpanKind.CLIENT
    assert dict(chat_s.attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4.1-mini",
        "server.address": "api.openai.com",
        "server.port": 443,
        "gen_ai.response.model": "gpt-4.1-mini-2025-04-14",
        "gen_ai.response.id": "resp-1",
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 5,
        "gen_ai.response.finish_reasons": ("tool_calls",),
    }
    events = [(e.name, dict(e.attributes or {})) for e in chat_s.events]
    assert events == [
        (
            "overstory.retry",
            {
                "overstory.retry.attempt": 1,
                "error.type": "rate_limited",
                "overstory.retry.delay_s": 0.5,
            },
        ),
        (
            "overstory.fallback",
            {
                "overstory.fallback.failed_model": "gpt-4.1-mini",
                "error.type": "timeout",
                "overstory.fallback.next_model": "claude-x",
            },
        ),
    ]

    assert tool.kind is SpanKind.INTERNAL
    assert dict(tool.attributes or {}) == {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": "get_weather",
        "gen_ai.tool.call.id": "call-1",
        "gen_ai.tool.type": "function",
    }

    # one trace, the turn the parent of both
    assert agent.parent is None
    for child in (chat_s, tool):
        assert child.context is not None
        assert agent.context is not None
        assert child.context.trace_id == agent.context.trace_id
        assert child.parent is not None
        assert child.parent.span_id == agent.context.span_id


def test_chat_span_without_server_and_exhausted_fallback(exporter: InMemorySpanExporter) -> None:
    with chat_span("anthropic", "claude-x") as span:
        record_fallback(span, failed_model="claude-x", error_type="auth", next_model=None)
    chat = _one(exporter, "chat claude-x")
    attributes = dict(chat.attributes or {})
    assert "server.address" not in attributes
    assert "server.port" not in attributes
    assert [dict(e.attributes or {}) for e in chat.events] == [
        {"overstory.fallback.failed_model": "claude-x", "error.type": "auth"}
    ]


def test_a_failing_model_call_records_the_error_kind_and_reraises(
    exporter: InMemorySpanExporter,
) -> None:
    with pytest.raises(ModelError), chat_span("openai", "m"):
        raise ModelError("slow down", model="m", kind="rate_limited")
    chat = _one(exporter, "chat m")
    assert chat.status.status_code is StatusCode.ERROR
    assert "slow down" in (chat.status.description or "")
    assert (chat.attributes or {})["error.type"] == "rate_limited"
    assert [e.name for e in chat.events] == ["exception"]


@pytest.mark.parametrize(
    ("helper", "name"),
    [
        (lambda: invoke_agent_span("a", "c"), "invoke_agent a"),
        (lambda: execute_tool_span("t", "id-1"), "execute_tool t"),
    ],
)
def test_other_spans_name_the_exception_class(
    exporter: InMemorySpanExporter, helper: object, name: str
) -> None:
    with pytest.raises(KeyError), helper():  # type: ignore[operator]
        raise KeyError("x")
    span = _one(exporter, name)
    assert (span.attributes or {})["error.type"] == "KeyError"
    assert span.status.status_code is StatusCode.ERROR


def test_mark_error_for_a_failure_returned_as_a_value(exporter: InMemorySpanExporter) -> None:
    with execute_tool_span("lookup", "call-9") as span:
        mark_error(span, "ToolError", "no such city")
    tool = _one(exporter, "execute_tool lookup")
    assert (tool.attributes or {})["error.type"] == "ToolError"
    assert tool.status.status_code is StatusCode.ERROR
    assert tool.status.description == "no such city"


# --- content capture ---------------------------------------------------------------------

_HISTORY: list[Message] = [
    UserMessage(content="weather in Paris?"),
    AssistantMessage(tool_calls=(ToolCall("c1", "get_weather", {"city": "Paris"}),)),
    ToolReturn(tool_call_id="c1", tool_name="get_weather", content="sunny"),
]


def _record_contents() -> None:
    with chat_span("openai", "m") as chat:
        record_chat_content(
            chat,
            messages=_HISTORY,
            response=ModelResponse(content="It is sunny.", finish_reason="stop"),
            instructions="be brief",
        )
    with execute_tool_span("get_weather", "c1") as tool:
        record_tool_content(tool, arguments={"city": "Paris"}, result="sunny")


def test_contents_are_not_recorded_by_default(
    exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(CAPTURE_CONTENT_ENV, raising=False)
    assert not capture_content()
    _record_contents()
    for span in exporter.get_finished_spans():
        attributes = dict(span.attributes or {})
        assert not [k for k in attributes if "messages" in k or "instructions" in k], span.name
        assert "gen_ai.tool.call.arguments" not in attributes
        assert "gen_ai.tool.call.result" not in attributes
        assert "Paris" not in repr(attributes)


def test_contents_are_recorded_when_the_user_opts_in(
    exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CAPTURE_CONTENT_ENV, "true")
    assert capture_content()
    _record_contents()
    chat = dict(_one(exporter, "chat m").attributes or {})
    assert json.loads(str(chat["gen_ai.system_instructions"])) == [
        {"type": "text", "content": "be brief"}
    ]
    assert json.loads(str(chat["gen_ai.input.messages"])) == [
        {"role": "user", "parts": [{"type": "text", "content": "weather in Paris?"}]},
        {
            "role": "assistant",
            "parts": [
                {
                    "type": "tool_call",
                    "id": "c1",
                    "name": "get_weather",
                    "arguments": {"city": "Paris"},
                }
            ],
        },
        {
            "role": "tool",
            "parts": [{"type": "tool_call_response", "id": "c1", "response": "sunny"}],
        },
    ]
    assert json.loads(str(chat["gen_ai.output.messages"])) == [
        {
            "role": "assistant",
            "parts": [{"type": "text", "content": "It is sunny."}],
            "finish_reason": "stop",
        }
    ]
    tool = dict(_one(exporter, "execute_tool get_weather").attributes or {})
    assert json.loads(str(tool["gen_ai.tool.call.arguments"])) == {"city": "Paris"}
    assert tool["gen_ai.tool.call.result"] == "sunny"


# --- context across a boundary -----------------------------------------------------------


def test_inject_is_empty_without_a_span() -> None:
    token = otel_context.attach(otel_context.Context())
    try:
        assert inject() == {}
    finally:
        otel_context.detach(token)


def test_inject_then_attached_elsewhere_keeps_the_parent(exporter: InMemorySpanExporter) -> None:
    from overstory.telemetry import tracer

    with tracer().start_as_current_span("client send") as client:
        carrier = inject()
    assert set(carrier) >= {"traceparent"}

    # The "actor": another thread, so it starts from an empty context.
    def actor() -> None:
        assert not trace.get_current_span().get_span_context().is_valid
        with attached(carrier), invoke_agent_span("a", "c"):
            pass
        assert not trace.get_current_span().get_span_context().is_valid  # detached again

    thread = threading.Thread(target=actor)
    thread.start()
    thread.join()

    agent = _one(exporter, "invoke_agent a")
    assert agent.parent is not None
    assert agent.parent.span_id == client.get_span_context().span_id
    assert agent.parent.is_remote
    assert agent.context is not None
    assert agent.context.trace_id == client.get_span_context().trace_id


@pytest.mark.parametrize("carrier", [None, {}])
def test_attached_without_a_carrier_changes_nothing(
    exporter: InMemorySpanExporter, carrier: dict[str, str] | None
) -> None:
    before = otel_context.get_current()
    with attached(carrier):
        assert otel_context.get_current() == before
        with invoke_agent_span("a", "c"):
            pass
    assert _one(exporter, "invoke_agent a").parent is None


def _fresh_python(code: str) -> None:
    """Run ``code`` in a new interpreter (no global provider, no Ray from other tests)."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow  # starts a Python process
def test_the_helpers_never_install_a_global_provider() -> None:
    _fresh_python(
        """
        from opentelemetry import trace
        from overstory.telemetry import invoke_agent_span, chat_span, execute_tool_span
        assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
        with invoke_agent_span("a", "c") as span, chat_span("p", "m"), execute_tool_span("t", "1"):
            assert not span.is_recording()
        assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
        """
    )


# --- setup from OTEL_* -------------------------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"OTEL_TRACES_EXPORTER": "none"},
        {"OTEL_TRACES_EXPORTER": " "},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"},
    ],
)
def test_nothing_is_installed_unless_asked(env: dict[str, str]) -> None:
    assert plan_telemetry(env=env) is None
    assert setup_telemetry(env=env) is False


@pytest.mark.parametrize(
    ("env", "named"),
    [
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_PROTOCOL='http/json'",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "udp"},
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL='udp'",
        ),
        ({"OTEL_TRACES_EXPORTER": "otlp,zipkin"}, "OTEL_TRACES_EXPORTER='otlp,zipkin'"),
    ],
)
def test_bad_values_name_the_variable_and_value(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("/", ".")):
        setup_telemetry(env=env)


def test_plan_follows_the_endpoint_rules() -> None:
    base = {
        "OTEL_TRACES_EXPORTER": "otlp, console",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/",
    }
    plan = plan_telemetry(env=base)
    assert plan is not None
    assert plan.exporters == ("otlp", "console")
    assert plan.protocol == "http/protobuf"
    assert plan.endpoint == "http://c:4318/v1/traces"  # the base URL gains the signal path
    assert plan.service_name == "overstory"

    signal = {**base, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:9/custom"}
    assert plan_telemetry(env=signal).endpoint == "http://t:9/custom"  # type: ignore[union-attr]

    grpc = {**base, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_SERVICE_NAME": "svc"}
    plan = plan_telemetry("ignored", env=grpc)
    assert plan is not None
    assert (plan.protocol, plan.endpoint, plan.service_name) == ("grpc", "http://c:4318/", "svc")

    secret = {**base, "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20s3cret"}
    plan = plan_telemetry(env=secret)
    assert plan is not None
    assert plan.headers
    assert "s3cret" not in repr(plan)


def test_grpc_exporter_is_built_from_the_plan() -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    plan = plan_telemetry(
        env={
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1",
            "OTEL_EXPORTER_OTLP_HEADERS": "k=v",
        }
    )
    assert plan is not None
    exporter = _exporter("otlp", plan)
    try:
        assert isinstance(exporter, OTLPSpanExporter)
    finally:
        exporter.shutdown()


def test_telemetry_env_forwards_only_otel_variables() -> None:
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
        CAPTURE_CONTENT_ENV: "true",
        "OPENAI_API_KEY": "sk-no",
        "PATH": "/bin",
        "XOTEL_Y": "no",
    }
    assert telemetry_env(env) == {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
        CAPTURE_CONTENT_ENV: "true",
    }


# --- real export, in a subprocess (the global provider never enters this process) -------

_EXPORTING_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from opentelemetry import trace
    from overstory.exceptions import ModelError
    from overstory.telemetry import (
        attached, chat_span, execute_tool_span, flush, invoke_agent_span,
        record_chat_response, set_turn_usage, setup_telemetry, shutdown_telemetry,
    )

    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert setup_telemetry("overstory-test") is True
    assert setup_telemetry("overstory-test") is True  # idempotent
    with attached(json.loads(sys.argv[1])):
        with invoke_agent_span("support", "conv-1") as turn:
            try:
                with chat_span("openai", "m1", "127.0.0.1", 8000):
                    raise ModelError("down", model="m1", kind="server_error")
            except ModelError:
                pass
            with chat_span("openai", "m2") as chat:
                record_chat_response(chat, response_model="m2", input_tokens=3,
                                     output_tokens=4, finish_reasons=["stop"])
            with execute_tool_span("lookup", "call-1"):
                pass
            set_turn_usage(turn, 3, 4)
    flush()
    shutdown_telemetry()
    """
)


def _run_exporting_script(env_vars: dict[str, str], carrier: dict[str, str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(env_vars)
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", _EXPORTING_SCRIPT, json.dumps(carrier)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def _client_span() -> tuple[dict[str, str], str, str]:
    """A carrier from a span of this process, as a client would pass to an actor."""
    provider = TracerProvider()
    with (
        use_tracer_provider(provider),
        provider.get_tracer("t").start_as_current_span("client send") as span,
    ):
        carrier = inject()
    ctx = span.get_span_context()
    return carrier, f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


@pytest.mark.slow  # starts a Python process
@pytest.mark.parametrize(
    "variables",
    [
        pytest.param({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, id="base-endpoint"),
        pytest.param(
            {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "{traces_url}",
                "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
            },
            id="traces-endpoint-gzip",
        ),
        pytest.param({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, id="grpc"),
        pytest.param(
            {
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "{traces_url}",
            },
            id="grpc-traces-endpoint",
        ),
    ],
)
def test_setup_exports_spans_a_real_receiver_decodes(variables: dict[str, str]) -> None:
    carrier, trace_id, client_span_id = _client_span()
    protocol = "grpc" if variables.get("OTEL_EXPORTER_OTLP_PROTOCOL") == "grpc" else "http/protobuf"
    with OtlpReceiver(protocol) as receiver:
        env = {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        env.update({k: v.format(traces_url=receiver.traces_url) for k, v in variables.items()})
        _run_exporting_script(env, carrier)

        def complete(spans: list[Span]) -> bool:
            return len({s.name for s in spans}) >= 4

        spans = {s.name: s for s in receiver.wait_for(complete, timeout_s=30)}
        expected_encoding = variables.get("OTEL_EXPORTER_OTLP_COMPRESSION", "")
        assert receiver.encodings == {expected_encoding}

    agent = spans["invoke_agent support"]
    failed, chat, tool = spans["chat m1"], spans["chat m2"], spans["execute_tool lookup"]
    assert {s.service_name for s in spans.values()} == {"overstory-test"}
    assert {s.trace_id for s in spans.values()} == {trace_id}  # the client's trace
    assert agent.parent_span_id == client_span_id  # across the process boundary
    assert {s.parent_span_id for s in (failed, chat, tool)} == {agent.span_id}

    assert agent.kind == "INTERNAL"
    assert tool.kind == "INTERNAL"
    assert chat.kind == "CLIENT"
    assert agent.attributes["gen_ai.operation.name"] == "invoke_agent"
    assert agent.attributes["gen_ai.conversation.id"] == "conv-1"
    assert agent.attributes["gen_ai.usage.output_tokens"] == 4
    assert chat.attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert tool.attributes["gen_ai.tool.call.id"] == "call-1"

    assert failed.status == "ERROR"
    assert failed.attributes["error.type"] == "server_error"
    assert failed.attributes["server.address"] == "127.0.0.1"
    assert failed.attributes["server.port"] == 8000
    assert [e.name for e in failed.events] == ["exception"]
    assert failed.events[0].attributes["exception.type"].endswith("ModelError")


# --- metrics -----------------------------------------------------------------------------


def test_metric_specs_are_valid_prometheus_names_with_tuple_tag_keys() -> None:
    import re

    names = [spec.name for spec in METRICS.values()]
    assert len(set(names)) == len(names)
    for spec in METRICS.values():
        assert re.fullmatch(r"overstory_[a-z_]+", spec.name), spec.name
        assert isinstance(spec.tag_keys, tuple)
        assert (spec.kind == "histogram") == bool(spec.boundaries)
        assert list(spec.boundaries) == sorted(spec.boundaries)
        if spec.kind == "counter":
            assert spec.name.endswith("_total")


def _record_everything(m: Metrics) -> None:
    m.turn("support", "ok", 1.5)
    m.tokens("openai", "m", 10, 0)  # 0 is skipped: Ray's counters refuse it
    m.model_call("openai", "m", "ok", 0.7)
    m.tool_call("lookup", "error")
    m.restart("root")
    m.passivation("idle")
    m.live_conversations(3)
    m.fallback("m", "timeout")
    m.circuit_state("openai:m", "half_open")
    m.rate_limit_wait("openai:m", 0.2, admitted=True)


@pytest.mark.slow  # starts a Python process
def test_metrics_are_no_ops_without_ray() -> None:
    _fresh_python(
        """
        import sys
        sys.path.insert(0, "tests")
        from overstory.telemetry import Metrics
        from test_telemetry import _record_everything
        m = Metrics()
        _record_everything(m)
        assert m._instruments is None  # nothing was created, nothing recorded
        import ray
        assert not ray.is_initialized()  # and recording did not start Ray either
        """
    )


def test_metrics_validate_their_vocabularies() -> None:
    m = Metrics()
    with pytest.raises(ValueError, match="'maybe'"):
        m.tool_call("t", "maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'ajar'"):
        m.circuit_state("e", "ajar")  # type: ignore[arg-type]


@pytest.mark.ray
def test_metrics_record_through_ray(ray_cluster: str) -> None:
    m = Metrics()
    _record_everything(m)
    assert m._instruments is not None
    assert set(m._instruments) == set(METRICS)


# --- a stopped child exports its spans first ------------------------------------------------

_KILLED_SCRIPT = textwrap.dedent(
    """
    import asyncio, os, sys
    from opentelemetry import trace
    from overstory.telemetry import flush_async, setup_telemetry

    assert setup_telemetry("overstory-killed") is True
    with trace.get_tracer("t").start_as_current_span(sys.argv[1]):
        pass

    async def stopping() -> None:
        ticks = 0

        async def tick() -> None:  # the loop keeps serving while the spans go out
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        if sys.argv[2] == "flush":
            assert await flush_async(10.0) is True
            assert ticks > 0
        ticker.cancel()

    asyncio.run(stopping())
    os._exit(0)  # as ray.kill ends a process: no exit handler runs
    """
)


@pytest.mark.parametrize("flushed", [True, False], ids=["flush_async", "killed-unflushed"])
def test_flush_async_exports_what_a_killed_process_would_lose(flushed: bool) -> None:
    with OtlpReceiver() as receiver:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update(
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_BSP_SCHEDULE_DELAY": "600000",  # nothing leaves on its own schedule
                "PYTHONPATH": str(ROOT),
            }
        )
        done = subprocess.run(
            [sys.executable, "-c", _KILLED_SCRIPT, "last words", "flush" if flushed else "-"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        # The process is gone: whatever the receiver holds now is all it will get.
        assert [s.name for s in receiver.spans] == (["last words"] if flushed else [])


class _Buffering:
    """An actor whose spans wait in a batch processor (for ten minutes, as configured)."""

    def __init__(self) -> None:
        from overstory.telemetry import setup_telemetry

        assert setup_telemetry("overstory-drain-test")

    def span(self, name: str) -> int:
        with trace.get_tracer("drain-test").start_as_current_span(name):
            pass
        return os.getpid()


class _Draining(_Buffering):
    async def drain(self, timeout_s: float) -> bool:
        from overstory.telemetry import flush_async

        return await flush_async(timeout_s)


class _Hung(_Buffering):
    async def drain(self, timeout_s: float) -> bool:
        import asyncio

        await asyncio.Event().wait()  # never set: a host whose loop is stuck
        return True


@pytest.mark.ray
def test_a_stopped_child_exports_its_spans_first_and_a_hung_one_is_killed(
    ray_cluster: str,
) -> None:
    import asyncio

    import ray
    from ray.exceptions import RayActorError

    from overstory.supervisors.watch import stop_child

    with OtlpReceiver() as receiver:
        env = {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "600000",  # nothing leaves on its own schedule
            # A runtime_env of its own: the worker imports these classes from this file.
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        }
        options: dict[str, object] = {"num_cpus": 0, "runtime_env": {"env_vars": env}}
        draining = ray.remote(_Draining).options(**options).remote()
        plain = ray.remote(_Buffering).options(**options).remote()  # no drain method
        hung = ray.remote(_Hung).options(**options).remote()
        ray.get(
            [
                draining.span.remote("kept"),
                plain.span.remote("lost with its process"),
                hung.span.remote("lost with the hung one"),
            ],
            timeout=120,
        )
        assert asyncio.run(stop_child(draining, 10.0)) is True
        assert asyncio.run(stop_child(plain, 10.0)) is False
        assert asyncio.run(stop_child(hung, 0.5)) is False  # killed all the same
        names = {s.name for s in receiver.wait_for(lambda s: bool(s), timeout_s=30)}
        for handle in (draining, plain, hung):
            with pytest.raises(RayActorError):
                ray.get(handle.span.remote("after"), timeout=60)
        # Every process is dead: what the receiver holds now is all it will ever get.
        assert {s.name for s in receiver.spans} == names == {"kept"}


def test_counter_increments_are_summed_per_tag_set_and_flushed_once(
    recorded_metrics: RecordedMetrics,
) -> None:
    """A host records four counter increments a turn: they are summed in the process and
    reach Ray's counters in one ``inc`` per tag set per flush, not one each."""
    from overstory.telemetry.metrics import metrics

    m = metrics()
    for _ in range(100):
        m.turn("agent", "ok", 0.01)
        m.tokens("openai", "gpt", 3, 5)
    m.turn("agent", "error", 0.02)
    turns = recorded_metrics.of("turns")
    assert turns == [
        (100, {"agent": "agent", "version": "1", "outcome": "ok"}),
        (1, {"agent": "agent", "version": "1", "outcome": "error"}),
    ]
    assert sorted(v for v, _ in recorded_metrics.of("tokens")) == [300, 500]
    assert len(recorded_metrics.of("turn_latency")) == 101  # histograms: each observation
    assert recorded_metrics.of("turns") == turns  # handed over once: a flush adds nothing
