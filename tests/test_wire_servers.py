"""The loopback wire servers, driven by the official async SDKs over real HTTP.

Clients run with ``max_retries=0`` and ``_strict_response_validation=True``, so every
normal answer is also checked against the SDK's own response models.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from overstory.exceptions import ConfigError, UsageError
from overstory.testing import AnthropicServer, BedrockServer, Fault, OpenAIServer, WireServer

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
ADD_ANTHROPIC = {
    "name": "add",
    "description": "Add two integers.",
    "input_schema": ADD["function"]["parameters"],  # type: ignore[index]
}


@dataclass
class Wire:
    """A server, an SDK client for it, and the event loop every call of a module runs in."""

    server: Any
    client: Any
    loop: asyncio.Runner

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run(coro)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.Runner]:
    # One loop for the module: SDK clients (and their connection pools) are built once.
    with asyncio.Runner() as runner:
        yield runner


def openai_client(server: WireServer, **options: Any) -> Any:
    options = {"api_key": "sk-test", "max_retries": 0, "timeout": 5.0, **options}
    return openai.AsyncOpenAI(base_url=server.base_url, _strict_response_validation=True, **options)


def anthropic_client(server: WireServer, **options: Any) -> Any:
    options = {"api_key": "sk-ant-test", "max_retries": 0, "timeout": 5.0, **options}
    return anthropic.AsyncAnthropic(
        base_url=server.base_url, _strict_response_validation=True, **options
    )


@pytest.fixture(scope="module")
def _openai_wire(loop: asyncio.Runner) -> Iterator[Wire]:
    with OpenAIServer() as server:
        wire = Wire(server, openai_client(server), loop)
        yield wire
        wire.run(wire.client.close())


@pytest.fixture(scope="module")
def _anthropic_wire(loop: asyncio.Runner) -> Iterator[Wire]:
    with AnthropicServer() as server:
        wire = Wire(server, anthropic_client(server), loop)
        yield wire
        wire.run(wire.client.close())


@pytest.fixture
def oa(_openai_wire: Wire) -> Wire:
    _openai_wire.server.reset()
    return _openai_wire


@pytest.fixture
def an(_anthropic_wire: Wire) -> Wire:
    _anthropic_wire.server.reset()
    return _anthropic_wire


def ask_openai(wire: Wire, text: str = "hello", timeout: float = 5.0) -> Any:
    client = wire.client.with_options(timeout=timeout)
    return wire.run(
        client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": text}]
        )
    )


def ask_anthropic(wire: Wire, text: str = "hello", timeout: float = 5.0) -> Any:
    client = wire.client.with_options(timeout=timeout)
    return wire.run(
        client.messages.create(
            model="claude-test", max_tokens=64, messages=[{"role": "user", "content": text}]
        )
    )


def call_once(loop: asyncio.Runner, client: Any, call: Callable[[Any], Awaitable[Any]]) -> Any:
    """``call(client)`` on a client made for one test, closed afterwards."""

    async def go() -> Any:
        async with client:
            return await call(client)

    return loop.run(go())


# --- normal answers ----------------------------------------------------------------------


def test_openai_text_answer_with_usage(oa: Wire) -> None:
    answer = ask_openai(oa, "hello there")
    choice = answer.choices[0]
    assert choice.message.content == "echo: hello there"
    assert choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
    assert answer.object == "chat.completion"
    assert answer.model == "gpt-test"
    assert answer.usage.prompt_tokens == len("hello there") // 4 + 1
    assert answer.usage.completion_tokens == len("echo: hello there") // 4 + 1
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_anthropic_text_answer_with_usage(an: Wire) -> None:
    answer = ask_anthropic(an, "hello there")
    assert [(b.type, b.text) for b in answer.content] == [("text", "echo: hello there")]
    assert answer.stop_reason == "end_turn"
    assert answer.stop_sequence is None
    assert (answer.type, answer.role, answer.model) == ("message", "assistant", "claude-test")
    assert answer.usage.input_tokens == len("hello there") // 4 + 1
    assert answer.usage.output_tokens == len("echo: hello there") // 4 + 1


def test_openai_tool_call_round_trip(oa: Wire) -> None:
    create = oa.client.chat.completions.create
    messages: list[dict[str, Any]] = [{"role": "user", "content": "what is 2 + 3?"}]
    first = oa.run(create(model="gpt-test", messages=messages, tools=[ADD]))
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert (call.id, call.type, call.function.name) == ("call_1", "function", "add")
    assert json.loads(call.function.arguments) == {"a": "2", "b": "3"}
    assert first.usage.completion_tokens > 0

    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "5"},
    ]
    second = oa.run(create(model="gpt-test", messages=messages, tools=[ADD]))
    assert second.choices[0].message.content == "tool results: 5"
    assert second.choices[0].finish_reason == "stop"
    sent = oa.server.requests[1].body["messages"]
    assert sent[2] == {"role": "tool", "tool_call_id": "call_1", "content": "5"}


def test_anthropic_tool_call_round_trip(an: Wire) -> None:
    create = an.client.messages.create
    messages: list[dict[str, Any]] = [{"role": "user", "content": "how many words are in 'a b c'?"}]
    tools = [
        ADD_ANTHROPIC,
        {"name": "word_count", "input_schema": {"type": "object", "properties": {}}},
    ]
    first = an.run(create(model="claude-test", max_tokens=64, messages=messages, tools=tools))
    assert first.stop_reason == "tool_use"
    [use] = first.content
    assert (use.type, use.id, use.name, use.input) == (
        "tool_use",
        "toolu_1",
        "word_count",
        {"text": "a b c"},
    )
    messages += [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "3"}],
        },
    ]
    second = an.run(create(model="claude-test", max_tokens=64, messages=messages, tools=tools))
    assert second.content[0].text == "tool results: 3"
    assert second.stop_reason == "end_turn"


def test_rule_needs_the_tool_to_be_offered(oa: Wire, an: Wire) -> None:
    assert ask_openai(oa, "what is 2 + 3").choices[0].message.content == "echo: what is 2 + 3"
    assert ask_anthropic(an, "what is 2 + 3").content[0].text == "echo: what is 2 + 3"


def test_model_override_latency_and_custom_rules(loop: asyncio.Runner) -> None:
    rules = [(r"weather in (?P<city>\w+)", "weather")]
    tool = {"type": "function", "function": {"name": "weather", "parameters": {}}}
    with OpenAIServer(model="served-model", rules=rules, latency_s=0.2) as server:
        answer = call_once(
            loop,
            openai_client(server),
            lambda c: c.chat.completions.create(
                model="asked",
                messages=[{"role": "user", "content": "weather in Oslo"}],
                tools=[tool],
            ),
        )
        assert answer.model == "served-model"
        [call] = answer.choices[0].message.tool_calls
        assert json.loads(call.function.arguments) == {"city": "Oslo"}
        with pytest.raises(openai.APITimeoutError):
            call_once(
                loop,
                openai_client(server, timeout=0.1),
                lambda c: c.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "slow"}]
                ),
            )


# --- faults ------------------------------------------------------------------------------

OPENAI_FAULTS = [
    (Fault.rate_limited(retry_after=2), "RateLimitError", 429),
    (Fault.overloaded(), "InternalServerError", 503),
    (Fault.server_error(), "InternalServerError", 500),
    (Fault.unauthorized(), "AuthenticationError", 401),
    (Fault.bad_request("no such thing"), "BadRequestError", 400),
    (Fault.context_overflow(), "BadRequestError", 400),
    (Fault(status=418, body={"error": {"message": "teapot"}}), "APIStatusError", 418),
]
ANTHROPIC_FAULTS = [
    (Fault.rate_limited(retry_after=2), "RateLimitError", 429),
    (Fault.overloaded(retry_after=0.5), "OverloadedError", 529),
    (Fault.server_error(), "InternalServerError", 500),
    (Fault.unauthorized(), "AuthenticationError", 401),
    (Fault.bad_request("no such thing"), "BadRequestError", 400),
    (Fault.context_overflow(), "BadRequestError", 400),
    (Fault(status=503), "ServiceUnavailableError", 503),
]


@pytest.mark.parametrize(
    ("fault", "name", "status"), OPENAI_FAULTS, ids=[f.kind for f, _, _ in OPENAI_FAULTS]
)
def test_openai_fault(oa: Wire, fault: Fault, name: str, status: int) -> None:
    oa.server.script(fault)
    with pytest.raises(getattr(openai, name)) as caught:
        ask_openai(oa)
    exc = caught.value
    assert type(exc) is getattr(openai, name)
    assert exc.status_code == status
    assert exc.request_id  # x-request-id
    for key, value in fault.headers.items():
        assert exc.response.headers[key] == value
    if fault.kind == "rate_limited":
        assert exc.response.headers["retry-after"] == "2"
        assert exc.code == "rate_limit_exceeded"
    if fault.kind == "bad_request":
        assert exc.body["message"] == "no such thing"
        assert exc.type == "invalid_request_error"
    if fault.kind == "context_overflow":
        assert exc.code == "context_length_exceeded"
        assert exc.param == "messages"
        assert "maximum context length" in exc.message
    assert ask_openai(oa).choices[0].message.content == "echo: hello"  # then normal again


@pytest.mark.parametrize(
    ("fault", "name", "status"), ANTHROPIC_FAULTS, ids=[f.kind for f, _, _ in ANTHROPIC_FAULTS]
)
def test_anthropic_fault(an: Wire, fault: Fault, name: str, status: int) -> None:
    an.server.script(fault)
    with pytest.raises(getattr(anthropic, name)) as caught:
        ask_anthropic(an)
    exc = caught.value
    assert type(exc) is getattr(anthropic, name)
    assert exc.status_code == status
    assert exc.request_id  # request-id
    assert exc.body["type"] == "error"
    for key, value in fault.headers.items():
        assert exc.response.headers[key] == value
    expected_type = {
        429: "rate_limit_error",
        529: "overloaded_error",
        500: "api_error",
        503: "api_error",
        401: "authentication_error",
        400: "invalid_request_error",
    }[status]
    assert exc.type == expected_type
    if fault.kind == "overloaded":
        assert exc.response.headers["retry-after"] == "0.5"
        assert exc.api_message == "Overloaded"
    if fault.kind == "context_overflow":
        assert exc.api_message == "prompt is too long: 250000 tokens > 200000 maximum"
    assert ask_anthropic(an).content[0].text == "echo: hello"


def test_malformed_body_raises_json_decode_error(oa: Wire, an: Wire) -> None:
    # Neither SDK wraps it: the caller sees the stdlib json.JSONDecodeError (a ValueError).
    oa.server.script(Fault.malformed_body())
    an.server.script(Fault.malformed_body())
    with pytest.raises(json.JSONDecodeError):
        ask_openai(oa)
    with pytest.raises(json.JSONDecodeError):
        ask_anthropic(an)


def test_stall_times_the_client_out(oa: Wire, an: Wire) -> None:
    oa.server.script(Fault.stall(5.0))
    an.server.script(Fault.stall(5.0))
    # A timeout error is the client giving up: after the 5 s stall the server answers.
    with pytest.raises(openai.APITimeoutError):
        ask_openai(oa, timeout=0.2)
    with pytest.raises(anthropic.APITimeoutError):
        ask_anthropic(an, timeout=0.2)
    # A stall shorter than the timeout is only a slow answer; the server is not stuck.
    oa.server.script(Fault.stall(0.05))
    assert ask_openai(oa, timeout=2.0).choices[0].message.content == "echo: hello"


def test_script_order_and_fail_always(oa: Wire) -> None:
    oa.server.script(Fault.server_error(), Fault.unauthorized())
    with pytest.raises(openai.InternalServerError):
        ask_openai(oa)
    with pytest.raises(openai.AuthenticationError):
        ask_openai(oa)
    ask_openai(oa)
    oa.server.fail_always(Fault.rate_limited(retry_after=None))
    for _ in range(2):
        with pytest.raises(openai.RateLimitError) as caught:
            ask_openai(oa)
        assert "retry-after" not in caught.value.response.headers
    oa.server.fail_always(None)
    ask_openai(oa)
    oa.server.script(Fault.server_error())
    oa.server.reset()
    ask_openai(oa)
    assert len(oa.server.requests) == 1


def test_sdk_retries_honour_retry_after(an: Wire) -> None:
    an.server.script(Fault.rate_limited(retry_after=1.0), Fault.overloaded(retry_after=1.0))
    started = time.monotonic()
    answer = an.run(
        an.client.with_options(max_retries=2).messages.create(
            model="m", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
    )
    assert answer.content[0].text == "echo: hi"
    assert len(an.server.requests) == 3
    # 1 s twice, as the servers asked; the SDK's own back-off (0.5 s, 1 s, less jitter)
    # would total at most 1.5 s. A lower bound: a loaded machine cannot make it pass.
    assert time.monotonic() - started >= 1.95


# --- what the servers record ---------------------------------------------------------------


def test_requests_and_api_keys_are_recorded(oa: Wire, an: Wire) -> None:
    ask_openai(oa, "one")
    [seen] = oa.server.requests
    assert seen.path == "/v1/chat/completions"
    assert seen.api_key == "sk-test"
    assert seen.headers["authorization"] == "Bearer sk-test"
    assert seen.body == {"model": "gpt-test", "messages": [{"role": "user", "content": "one"}]}

    ask_anthropic(an, "two")
    [seen] = an.server.requests
    assert seen.path == "/v1/messages"
    assert seen.api_key == "sk-ant-test"
    assert seen.headers["anthropic-version"]
    assert seen.body["max_tokens"] == 64
    an.server.script(Fault.server_error())  # faulted requests are recorded too
    with pytest.raises(anthropic.InternalServerError):
        ask_anthropic(an, "three")
    assert [r.body["messages"][0]["content"] for r in an.server.requests] == ["two", "three"]


# --- validation: the vendor's 400s ---------------------------------------------------------


def post(wire: Wire, path: str, body: Any) -> Any:
    """Any body, through the SDK's own transport (``client.post``)."""
    return wire.run(wire.client.post(path, body=body, cast_to=object))


CALL = {"id": "call_9", "type": "function", "function": {"name": "add", "arguments": "{}"}}
OPENAI_INVALID = [
    ({"messages": [{"role": "user", "content": "x"}]}, "you must provide a model parameter"),
    ({"model": "m"}, "Missing required parameter: 'messages'"),
    ({"model": "m", "messages": []}, "Invalid 'messages'"),
    ({"model": "m", "messages": [{"role": "bot", "content": "x"}]}, "Invalid value: 'bot'"),
    (
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
        "Invalid type for 'stream'",
    ),
    (
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "stream_options": {"include_usage": True},
        },
        "only allowed when 'stream' is enabled",
    ),
    (
        {"model": "m", "messages": [{"role": "tool", "tool_call_id": "call_9", "content": "5"}]},
        "must be a response to a preceeding message with 'tool_calls'",
    ),
    (
        {
            "model": "m",
            "messages": [
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_8", "content": "5"},
            ],
        },
        "'tool_call_id' of 'call_8' not found",
    ),
    (
        {
            "model": "m",
            "messages": [
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "user", "content": "x"},
            ],
        },
        "did not have response messages: call_9",
    ),
    (
        {
            "model": "m",
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [{**CALL, "function": {"name": "add", "arguments": {}}}],
                },
            ],
        },
        "function.arguments': expected a string, but got an object",
    ),
    (
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"name": "a"}]},
        "Supported values are: 'function'",
    ),
]


@pytest.mark.parametrize(("body", "message"), OPENAI_INVALID)
def test_openai_refuses_what_openai_refuses(oa: Wire, body: Any, message: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        post(oa, "/chat/completions", body)
    assert message in caught.value.message
    assert caught.value.type == "invalid_request_error"


USE = {"type": "tool_use", "id": "toolu_9", "name": "add", "input": {}}
RESULT = {"type": "tool_result", "tool_use_id": "toolu_9", "content": "5"}
ANTHROPIC_INVALID = [
    ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens: Field required"),
    ({"max_tokens": 5, "messages": []}, "model: Field required"),
    ({"model": "m", "max_tokens": 5, "messages": []}, "at least one message"),
    (
        {"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
        'Unexpected role "system"',
    ),
    (
        {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [RESULT]}]},
        "unexpected `tool_use_id` found in `tool_result` blocks: toolu_9",
    ),
    (
        {
            "model": "m",
            "max_tokens": 5,
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": [USE]},
                {"role": "user", "content": "y"},
            ],
        },
        "messages.1: `tool_use` ids were found without `tool_result` blocks immediately after",
    ),
    (
        {
            "model": "m",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": [{"type": "txt"}]}],
        },
        "Input tag 'txt'",
    ),
    (
        {
            "model": "m",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"name": "add"}],
        },
        "tools.0.custom.input_schema: Field required",
    ),
    (
        {
            "model": "m",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "x"}],
            "stream": 1,
        },
        "stream: Input should be a valid boolean",
    ),
]


@pytest.mark.parametrize(("body", "message"), ANTHROPIC_INVALID)
def test_anthropic_refuses_what_anthropic_refuses(an: Wire, body: Any, message: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        post(an, "/v1/messages", body)
    assert message in caught.value.api_message
    assert caught.value.type == "invalid_request_error"


def test_unknown_path_is_a_vendor_shaped_404(oa: Wire, an: Wire) -> None:
    with pytest.raises(openai.NotFoundError):
        post(oa, "/embeddings", {})
    with pytest.raises(anthropic.NotFoundError) as caught:
        post(an, "/v1/complete", {})
    assert caught.value.type == "not_found_error"


def test_bedrock_answers_on_its_paths_with_its_headers_and_framing(loop: asyncio.Runner) -> None:
    with BedrockServer() as server:
        client = anthropic.AsyncAnthropicBedrock(
            aws_access_key="AKIAWIRETEST0123456",
            aws_secret_key="wire+secret/0123456789",
            aws_region="us-east-1",
            base_url=server.base_url,
            max_retries=0,
        )

        # The version Bedrock documents (the SDK would send the Messages API's own).
        request: Any = {
            "model": "m:0",
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "hi"}],
            "extra_body": {"anthropic_version": "bedrock-2023-05-31"},
        }

        async def go() -> tuple[Any, Any, Any]:
            async with client:
                raw = await client.messages.with_raw_response.create(**request)
                plain = (raw.headers, await raw.parse())
                async with client.messages.with_streaming_response.create(
                    **request, stream=True
                ) as streamed:
                    frames = await streamed.http_response.aread()
                    content_type = streamed.http_response.headers["content-type"]
                try:
                    await client.post("/model/m/converse", body={}, cast_to=object)
                except anthropic.NotFoundError as exc:
                    return plain, (content_type, frames), exc
                raise AssertionError("an unknown path was answered")

        plain, (content_type, frames), missing = loop.run(go())
    headers, message = plain
    assert headers["x-amzn-requestid"] == "req_1"
    assert message.content[0].text == "echo: hi"
    assert content_type == "application/vnd.amazon.eventstream"
    assert b":event-type" in frames
    assert b"chunk" in frames
    assert b"event: " not in frames  # not server-sent events
    assert missing.response.headers["x-amzn-errortype"].startswith("ResourceNotFoundException:")
    assert missing.body == {"message": "Not found: /model/m/converse"}


# --- configuration and lifecycle -----------------------------------------------------------


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ConfigError, match="status"):
        Fault(status=99)
    with pytest.raises(ConfigError, match="stall_s"):
        Fault.stall(-1)
    with pytest.raises(ConfigError, match=r"'\('"):
        OpenAIServer(rules=[("(", "add")])
    with pytest.raises(ConfigError, match="latency_s"):
        AnthropicServer(latency_s=-1)
    with pytest.raises(UsageError, match="base class"):
        WireServer()
    with pytest.raises(UsageError, match="no port"):
        _ = OpenAIServer().base_url


def test_restart_keeps_the_port(loop: asyncio.Runner) -> None:
    server = AnthropicServer().start()
    port = server.port
    with pytest.raises(UsageError, match="already running"):
        server.start()
    server.stop()
    server.stop()  # idempotent
    with server:
        assert server.port == port
        answer = call_once(
            loop,
            anthropic_client(server),
            lambda c: c.messages.create(
                model="m", max_tokens=8, messages=[{"role": "user", "content": "again"}]
            ),
        )
        assert answer.content[0].text == "echo: again"


@pytest.mark.slow  # starts a Python process
def test_cli_serves_until_interrupted(loop: asyncio.Runner) -> None:
    # A RuntimeWarning (e.g. runpy's "found in sys.modules") would fail the run.
    env = {**os.environ, "PYTHONWARNINGS": "error::RuntimeWarning"}
    command = [sys.executable, "-m", "overstory.testing.servers", "anthropic", "--port", "0"]
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    ) as proc:
        assert proc.stdout is not None
        assert proc.stderr is not None
        try:
            ready, _, _ = select.select([proc.stdout], [], [], 30.0)  # waits for the banner
            assert ready, "the CLI printed nothing in 30 s"
            line = proc.stdout.readline()
            assert line.startswith("anthropic wire format at http://127.0.0.1:"), line
            client = anthropic.AsyncAnthropic(base_url=line.split()[4], api_key="k", max_retries=0)
            answer = call_once(
                loop,
                client,
                lambda c: c.messages.create(
                    model="m", max_tokens=8, messages=[{"role": "user", "content": "cli"}]
                ),
            )
            assert answer.content[0].text == "echo: cli"
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 0  # generous: CI runs this on 2 busy cores
            assert "Warning" not in proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
