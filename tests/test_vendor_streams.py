"""Streamed answers through the official SDKs over real HTTP to the loopback servers,
which stream in the vendors' own formats (OpenAI chunks and Anthropic events as SSE,
Bedrock's Anthropic events in AWS event-stream frames).

No Ray here: the models and their policies run in-process; the provider actor's
streaming generator is tested in test_provider_pool.py.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator
from typing import Any

import pydantic
import pytest
from conftest import run_in_module_loop

from overstory.exceptions import AllModelsFailed, ModelError
from overstory.messages import ModelResponse, UserMessage
from overstory.providers import Endpoint, Model, RetryPolicy, Secret, aws_secret
from overstory.providers.anthropic import AnthropicStream
from overstory.providers.base import FallThrough, ModelRequest, StreamItem, traced_stream
from overstory.providers.breaker import BreakerModel
from overstory.providers.endpoint import BreakerPolicy, Limits
from overstory.providers.fallback import FallbackModel
from overstory.providers.lease import Gate, LeasedModel
from overstory.providers.limits import LimitedModel
from overstory.providers.openai import OpenAIStream
from overstory.providers.pool import coalesced, vendor_model
from overstory.providers.retry import RetryingModel
from overstory.telemetry.spans import ERROR_TYPE, TIME_TO_FIRST_TOKEN
from overstory.testing import (
    DEFAULT_RULES,
    AnthropicServer,
    BedrockServer,
    Fault,
    OpenAIServer,
    WireServer,
)
from overstory.testing._anthropic import _anthropic_answer, _anthropic_stream
from overstory.testing._openai import _openai_answer, _openai_stream
from overstory.tools import ToolDefinition

KEY = "sk-test-stream-0123456789"
#: A tool whose arguments carry what a cut can land inside: quotes, a backslash, an
#: accented letter and an emoji (a surrogate pair in JSON's \u escapes).
SAY = ToolDefinition(
    name="say",
    description="Say something.",
    parameters={"type": "object", "properties": {"text": {"type": "string"}}},
)
RULES = (*DEFAULT_RULES, (r"^say (?P<text>.+)$", "say"))
AWKWARD = 'He said "hi" \\ to naïve 🌍 folks'


pytestmark = pytest.mark.usefixtures("module_loop")
run = run_in_module_loop


SERVERS: dict[str, type[WireServer]] = {
    "openai": OpenAIServer,
    "anthropic": AnthropicServer,
    "bedrock": BedrockServer,
}


@pytest.fixture(scope="module", params=list(SERVERS))
def server(request: pytest.FixtureRequest) -> Iterator[WireServer]:
    with SERVERS[request.param](rules=RULES) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _clean(server: WireServer) -> Iterator[None]:
    server.reset()
    server.piece_chars, server.stream_interval_s = 4, 0.0
    return


AWS_KEY = aws_secret("AKIATESTSTREAM01234", "stream/Secret+Access0123456789abcdKEY")


def model_for(server: WireServer, name: str = "test-model") -> Model:
    if server.vendor == "bedrock":
        endpoint = Endpoint("bedrock", name, server.base_url, key=AWS_KEY, region="eu-west-3")
    else:
        endpoint = Endpoint(server.vendor, name, server.base_url, key=Secret(KEY))  # type: ignore[arg-type]
    return vendor_model(endpoint)


HISTORY = [UserMessage(content="hello there, wörld 🌍", seq=0)]


def collect(
    stream: AsyncGenerator[StreamItem, None], upto: int | None = None
) -> tuple[list[StreamItem], ModelError | None]:
    """Every item of ``stream`` (or the first ``upto``, then closed), and the error it
    ended with."""

    async def go() -> tuple[list[StreamItem], ModelError | None]:
        items: list[StreamItem] = []
        try:
            async for item in stream:
                items.append(item)
                if upto is not None and len(items) >= upto:
                    break
        except ModelError as exc:
            return items, exc
        finally:
            await stream.aclose()
        return items, None

    return run(go())


def texts(items: list[StreamItem]) -> list[str]:
    return [i for i in items if isinstance(i, str)]


# --- deltas and the assembled answer -----------------------------------------------------


@pytest.mark.parametrize("piece", [1, 2, 3, 5, 64])
def test_deltas_join_to_the_stored_answer_wherever_the_text_is_cut(
    server: WireServer, piece: int
) -> None:
    model = model_for(server)
    whole = run(model.request(ModelRequest("Be brief.", HISTORY)))
    server.piece_chars = piece
    items, error = collect(model.stream(ModelRequest("Be brief.", HISTORY)))
    assert error is None
    *deltas, last = items
    assert isinstance(last, ModelResponse)
    assert all(isinstance(d, str) and d for d in deltas)
    assert len(deltas) == -(-len(whole.content) // piece)  # one per piece, as the vendor cut
    assert "".join(texts(items)) == last.content == whole.content == "echo: hello there, wörld 🌍"
    assert last.usage == whole.usage
    assert last.usage.input_tokens > 0
    assert last.finish_reason == "stop"
    recorded = server.requests[-1]
    if server.vendor == "bedrock":  # the path says it streams; the body must not
        assert recorded.path == "/model/test-model/invoke-with-response-stream"
        assert "stream" not in recorded.body
    else:
        assert recorded.body["stream"] is True
    body = recorded.body
    if isinstance(server, OpenAIServer):  # usage is asked for, and read from the last chunk
        assert body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("piece", [1, 2, 3, 7])
def test_tool_call_arguments_cut_at_awkward_points_assemble_exactly(
    server: WireServer, piece: int
) -> None:
    server.piece_chars = piece
    history = [UserMessage(content=f"say {AWKWARD}", seq=0)]
    items, error = collect(model_for(server).stream(ModelRequest("", history, [SAY])))
    assert error is None
    assert texts(items) == []  # a tool call has no text to show
    response = items[-1]
    assert isinstance(response, ModelResponse)
    [call] = response.tool_calls
    assert (call.name, call.arguments) == ("say", {"text": AWKWARD})
    assert response.finish_reason == "tool_calls"


@pytest.mark.parametrize("vendor", ["openai", "anthropic"])
@pytest.mark.parametrize("piece", [1, 3])
def test_a_stream_that_ends_without_its_end_event_is_cut_short(vendor: str, piece: int) -> None:
    """The assemblers, fed the vendors' real events (no HTTP; OpenAI's chunks as the JSON
    its SSE carries, Anthropic's as the SDK's event objects): without OpenAI's finish
    chunk or Anthropic's message_stop, the answer is not whole."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 9}
    if vendor == "openai":
        events: list[Any] = [
            e.data for e in _openai_stream(_openai_answer(body, "m", (), 1), piece, True)
        ]
        assembler: OpenAIStream | AnthropicStream = OpenAIStream("openai:m", "m")
        cut = [e for e in events if not (e["choices"] and e["choices"][0]["finish_reason"])]
    else:
        from anthropic.types import RawMessageStreamEvent

        adapter: Any = pydantic.TypeAdapter(RawMessageStreamEvent)
        raw = [e.data for e in _anthropic_stream(_anthropic_answer(body, "m", (), 1), piece)]
        events = [adapter.validate_python(d) for d in raw if d["type"] != "ping"]
        assembler = AnthropicStream("anthropic:m", "m")
        cut = [e for e in events if e.type != "message_stop"]
    shown = "".join(assembler.feed(e) for e in cut)
    assert shown == "echo: hello"
    with pytest.raises(ModelError, match="cut short") as caught:
        assembler.response()
    assert caught.value.kind == "connection"


# --- faults inside the stream ----------------------------------------------------------------


@pytest.mark.parametrize(("status", "kind"), [(500, "server_error"), (429, "rate_limited")])
def test_an_error_event_before_the_first_delta_shows_no_text(
    server: WireServer, status: int, kind: str
) -> None:
    server.script(Fault.stream_error(after=0, status=status))
    items, error = collect(model_for(server).stream(ModelRequest("", HISTORY)))
    assert items == []
    assert error is not None
    assert error.kind == kind
    assert "mid-stream" in str(error)
    assert KEY not in str(error)


@pytest.mark.parametrize("after", [1, 2, 3])
@pytest.mark.parametrize("drop", [False, True])
def test_a_break_after_n_deltas_keeps_exactly_those_n(
    server: WireServer, after: int, drop: bool
) -> None:
    server.piece_chars = 3
    fault = Fault.stream_drop(after) if drop else Fault.stream_error(after, status=529)
    server.script(fault)
    items, error = collect(model_for(server).stream(ModelRequest("", HISTORY)))
    full = "echo: hello there, wörld 🌍"
    assert items == [full[i : i + 3] for i in range(0, 3 * after, 3)]
    assert error is not None
    if drop:
        assert error.kind == "connection"
    else:  # Anthropic's 529 is overloaded_error (Bedrock's serviceUnavailableException);
        # OpenAI has no 529 and says server_error
        assert error.kind == (
            "overloaded" if isinstance(server, AnthropicServer) else "server_error"
        )


def test_a_stream_fault_on_a_request_that_does_not_stream_is_its_status(
    server: WireServer,
) -> None:
    server.script(Fault.stream_error(after=2, status=500))
    with pytest.raises(ModelError) as caught:
        run(model_for(server).request(ModelRequest("", HISTORY)))
    assert caught.value.status == 500


# --- the policies around a stream ----------------------------------------------------------


FAST = RetryPolicy(attempts=3, base_s=0.001, max_backoff_s=0.002)


def test_a_stream_is_retried_only_before_its_first_delta(server: WireServer) -> None:
    retrying = RetryingModel(model_for(server), FAST)
    server.script(Fault.stream_error(after=0, status=500))
    items, error = collect(retrying.stream(ModelRequest("", HISTORY)))
    assert error is None
    assert retrying.retries == 1
    assert len(server.requests) == 2
    assert "".join(texts(items)) == "echo: hello there, wörld 🌍"  # nothing of the failed try

    server.reset()
    server.script(Fault.stream_error(after=2, status=500))
    items, error = collect(retrying.stream(ModelRequest("", HISTORY)))
    assert error is not None
    assert error.kind == "server_error"
    assert len(texts(items)) == 2
    assert retrying.retries == 1
    assert len(server.requests) == 1


def test_a_reader_closing_a_stream_frees_its_limiter_slot_and_tells_the_breaker_nothing(
    server: WireServer,
) -> None:
    server.stream_interval_s = 0.02
    limited = LimitedModel(model_for(server), Limits(max_in_flight=1))
    breaker = BreakerModel(limited, BreakerPolicy(failures=1, window_s=60, cooldown_s=60))
    items, error = collect(breaker.stream(ModelRequest("", HISTORY)), upto=2)
    assert error is None
    assert len(items) == 2
    assert limited.limiter.core.in_flight == 0  # released at once, not at GC
    assert breaker.breaker.snapshot(0.0)["recent_failures"] == 0
    # With max_in_flight=1, a leaked slot would make this wait and fail (limit_wait).
    items, error = collect(breaker.stream(ModelRequest("", HISTORY)))
    assert error is None
    assert isinstance(items[-1], ModelResponse)


def test_a_failure_after_the_first_delta_counts_against_the_endpoint(server: WireServer) -> None:
    breaker = BreakerModel(model_for(server), BreakerPolicy(failures=1, window_s=60, cooldown_s=60))
    server.script(Fault.stream_drop(after=1))
    _, error = collect(breaker.stream(ModelRequest("", HISTORY)))
    assert error is not None
    assert error.kind == "connection"
    items, error = collect(breaker.stream(ModelRequest("", HISTORY)))
    assert items == []
    assert error is not None
    assert error.kind == "circuit_open"


@pytest.fixture(scope="module")
def backup() -> Iterator[AnthropicServer]:
    with AnthropicServer(rules=RULES) as srv:
        yield srv


def test_fallback_falls_through_before_the_first_delta_and_never_after(
    server: WireServer, backup: AnthropicServer
) -> None:
    backup.reset()
    chain = FallbackModel(model_for(server, "primary"), model_for(backup, "backup"))
    server.script(Fault.stream_error(after=0, status=500))
    items, error = collect(chain.stream(ModelRequest("", HISTORY)))
    assert error is None
    [fell] = [i for i in items if isinstance(i, FallThrough)]
    assert fell.model.startswith(f"{server.vendor}:primary@")
    assert fell.error.kind == "server_error"
    assert items.index(fell) == 0  # before any text: nothing of the primary was shown
    answer = items[-1]
    assert isinstance(answer, ModelResponse)
    assert answer.model == "backup"
    assert "".join(texts(items)) == answer.content

    backup.reset()
    server.script(Fault.stream_error(after=2, status=500))
    items, error = collect(chain.stream(ModelRequest("", HISTORY)))
    assert isinstance(error, ModelError)
    assert not isinstance(error, AllModelsFailed)
    assert len(texts(items)) == 2
    assert not any(isinstance(i, FallThrough) for i in items)
    assert backup.requests == []  # no second answer appended to a partial one


# --- telemetry ---------------------------------------------------------------------------------


def test_a_streamed_chat_span_records_its_time_to_first_token(
    server: WireServer, exporter: Any
) -> None:
    server.latency_s = 0.05
    try:
        model = model_for(server)
        items, error = collect(
            traced_stream(model.stream, "v", "test-model", ModelRequest("", HISTORY))
        )
        assert error is None
        assert isinstance(items[-1], ModelResponse)
        [span] = [s for s in exporter.get_finished_spans() if s.name == "chat test-model"]
        assert span.attributes is not None
        assert 0.05 <= span.attributes[TIME_TO_FIRST_TOKEN] < 5
        assert span.attributes["gen_ai.usage.output_tokens"] > 0

        exporter.clear()
        collect(traced_stream(model.stream, "v", "test-model", ModelRequest("", HISTORY)), upto=1)
        [span] = exporter.get_finished_spans()
        assert span.attributes is not None
        assert span.attributes[ERROR_TYPE] == "cancelled"
    finally:
        server.latency_s = 0.0


def test_coalesced_joins_only_consecutive_text() -> None:
    answer = ModelResponse(content="abc")
    error = ModelError("x", kind="server_error")
    assert coalesced([]) == []
    assert coalesced(["a", "b", "c", answer]) == ["abc", answer]
    assert coalesced(["a", error]) == ["a", error]
    assert coalesced([answer, "a", "b"]) == [answer, "ab"]


# --- leased calls: the vendor read here, admitted by a gate (the provider actor's side) ----


class InProcessGate:
    """The provider actor's :class:`Gate` called in this process (over Ray in a host)."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    async def admit(self, call: str, tokens: int) -> ModelError | None:
        return await self.gate.admit(call, tokens)

    def release(self, call: str, used: int, error: ModelError | None) -> None:
        self.gate.release(call, used, error)

    def judge(self, call: str, error: ModelError | None, abandoned: bool, used: int | None) -> None:
        self.gate.judge(call, error, abandoned, used)


def leased(
    server: WireServer, limits: Limits | None = None, failures: int = 1
) -> tuple[LeasedModel, Gate]:
    model = model_for(server)
    limited = LimitedModel(model, limits or Limits())
    breaker = BreakerModel(limited, BreakerPolicy(failures=failures, window_s=60, cooldown_s=60))
    gate = Gate(breaker, limited)
    return LeasedModel(model, InProcessGate(gate), FAST), gate


def test_a_leased_stream_is_retried_before_its_first_delta_each_attempt_admitted(
    server: WireServer,
) -> None:
    model, gate = leased(server, failures=2)
    server.script(Fault.stream_error(after=0, status=500))
    items, error = collect(model.stream(ModelRequest("", HISTORY)))
    assert error is None
    assert "".join(texts(items)) == "echo: hello there, wörld 🌍"
    assert len(server.requests) == 2
    limiter = gate.limited.limiter.core
    assert limiter.admitted == 2  # one admission per attempt
    assert limiter.in_flight == 0
    assert gate.leases == {}
    assert gate.breaker.breaker.snapshot(0.0)["recent_failures"] == 0  # the call succeeded


def test_a_reader_closing_a_leased_stream_frees_its_slot_and_tells_the_breaker_nothing(
    server: WireServer,
) -> None:
    server.stream_interval_s = 0.02
    model, gate = leased(server, Limits(max_in_flight=1))
    items, error = collect(model.stream(ModelRequest("", HISTORY)), upto=2)
    assert error is None
    assert len(items) == 2
    assert gate.limited.limiter.core.in_flight == 0
    assert gate.leases == {}
    assert gate.breaker.breaker.snapshot(0.0)["recent_failures"] == 0
    items, error = collect(model.stream(ModelRequest("", HISTORY)))  # a leaked slot would wait
    assert error is None
    assert isinstance(items[-1], ModelResponse)


def test_a_leased_failure_after_the_first_delta_opens_the_gates_breaker(server: WireServer) -> None:
    model, gate = leased(server)
    server.script(Fault.stream_drop(after=1))
    _, error = collect(model.stream(ModelRequest("", HISTORY)))
    assert error is not None
    assert error.kind == "connection"
    sent = len(server.requests)
    items, error = collect(model.stream(ModelRequest("", HISTORY)))
    assert items == []
    assert error is not None
    assert error.kind == "circuit_open"
    assert len(server.requests) == sent  # refused by the gate: nothing went out
    assert gate.limited.limiter.core.in_flight == 0
