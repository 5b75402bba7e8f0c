"""The vendor models through the official SDKs over real HTTP to loopback servers that
speak the OpenAI Chat Completions, Anthropic Messages and Bedrock runtime wire formats.

No Ray here: the models are called in-process; what the provider actor adds (breaker,
retries, limiter, one actor per endpoint) is tested in test_provider_pool.py.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from overstory import Agent
from overstory.conversation.turn import run_turn
from overstory.exceptions import ModelError
from overstory.messages import AssistantMessage, ToolReturn, UserMessage
from overstory.providers import Endpoint, Model, ModelRequest, Secret, aws_secret
from overstory.providers.pool import vendor_model
from overstory.store import open_store
from overstory.testing import AnthropicServer, BedrockServer, Fault, OpenAIServer, WireServer

KEY = "sk-test-wire-0123456789"
#: Bedrock's credentials: requests are signed with them, the server sees the key id.
AWS_KEY_ID, AWS_SECRET = "AKIATESTWIRE0123456", "wire/Secret+Access0123456789abcdefKEY"


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


SERVERS: dict[str, type[WireServer]] = {
    "openai": OpenAIServer,
    "anthropic": AnthropicServer,
    "bedrock": BedrockServer,
}


@pytest.fixture(scope="module", params=list(SERVERS))
def server(request: pytest.FixtureRequest) -> Iterator[WireServer]:
    with SERVERS[request.param]() as srv:
        yield srv


@pytest.fixture(autouse=True)
def _clean(server: WireServer) -> None:
    server.reset()


def model_for(server: WireServer, **endpoint: Any) -> Model:
    if server.vendor == "bedrock":
        key = aws_secret(AWS_KEY_ID, AWS_SECRET)
        endpoint = {"region": "us-east-1", **endpoint}
    else:
        key = Secret(KEY)
    return vendor_model(
        Endpoint(server.vendor, "test-model", server.base_url, key=key, **endpoint)  # type: ignore[arg-type]
    )


def key_sent(server: WireServer) -> str:
    """What the server sees of the key: the key, or the access key id a signature names."""
    return AWS_KEY_ID if server.vendor == "bedrock" else KEY


def ask(model: Model, text: str = "hello") -> Any:
    return asyncio.run(model.request(ModelRequest("Be brief.", [UserMessage(content=text, seq=0)])))


def test_a_text_answer_with_usage_and_the_key_sent(server: WireServer) -> None:
    response = ask(model_for(server), "hello there")
    assert response.content == "echo: hello there"
    assert response.finish_reason == "stop"
    assert response.usage.input_tokens > 0
    assert response.usage.output_tokens > 0
    assert response.model == "test-model"
    (recorded,) = server.requests
    assert recorded.api_key == key_sent(server)


def test_a_tool_round_trip_through_a_whole_turn(server: WireServer, tmp_path: Path) -> None:
    agent = Agent("calc", model=model_for(server), tools=[add])

    async def go() -> Any:
        store = open_store(f"sqlite:///{tmp_path}/t.db")
        await store.open()
        try:
            return await run_turn(agent, store, "c", [], "t1", "what is 2 + 3?")
        finally:
            await store.close()

    reply = asyncio.run(go())
    kinds = [type(m) for m in reply.messages]
    assert kinds == [UserMessage, AssistantMessage, ToolReturn, AssistantMessage]
    call = reply.messages[1].tool_calls[0]
    assert (call.name, call.arguments) == ("add", {"a": "2", "b": "3"})
    assert reply.messages[2].content == "5"
    assert reply.text == "tool results: 5"
    assert reply.usage.input_tokens > 0
    # The agent's tool schema went out in the vendor's own format.
    tools = server.requests[0].body["tools"]
    if isinstance(server, OpenAIServer):
        assert tools[0]["type"] == "function"
        assert tools[0]["function"]["parameters"]["properties"]["a"]["type"] == "integer"
    else:
        assert tools[0]["input_schema"]["properties"]["a"]["type"] == "integer"


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        (Fault.rate_limited(retry_after=2), "rate_limited"),
        (Fault.overloaded(), "overloaded"),
        (Fault.server_error(), "server_error"),
        (Fault.unauthorized(), "auth"),
        (Fault.bad_request(), "bad_request"),
        (Fault.context_overflow(), "context_overflow"),
        (Fault.malformed_body(), "malformed"),
    ],
)
def test_every_failure_becomes_its_kind(server: WireServer, fault: Fault, kind: str) -> None:
    server.script(fault)
    with pytest.raises(ModelError) as info:
        ask(model_for(server))
    assert info.value.kind == kind, info.value
    assert info.value.model.endswith(server.base_url)
    if kind == "rate_limited":
        assert info.value.retry_after == 2.0
    assert len(server.requests) == 1  # the SDK's own retries are off


def test_a_stall_is_a_timeout(server: WireServer) -> None:
    server.script(Fault.stall(3))
    with pytest.raises(ModelError) as info:
        ask(model_for(server, timeout_s=0.5))
    assert info.value.kind == "timeout"


def test_vendor_models_read_through_the_sdks_aiohttp_transport() -> None:
    """Every vendor model's SDK client sends over the SDK's own aiohttp transport (the
    other tests here then exercise it against the loopback servers): a host reads every
    vendor stream it serves, and h11's pure-Python reads cost it ~1.7x the CPU."""
    import anthropic
    import openai

    bedrock = Endpoint("bedrock", "m", "http://127.0.0.1:9", region="us-east-1")
    for endpoint, transport in (
        (Endpoint("openai", "m", "http://127.0.0.1:9/v1", key=Secret(KEY)), openai),
        (Endpoint("anthropic", "m", "http://127.0.0.1:9", key=Secret(KEY)), anthropic),
        (bedrock.with_key(aws_secret(AWS_KEY_ID, AWS_SECRET)), anthropic),
    ):
        model: Any = vendor_model(endpoint)
        assert isinstance(model._client._client, transport.DefaultAioHttpClient), endpoint.vendor
        asyncio.run(model.aclose())


def test_a_refused_connection_is_a_connection_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    bedrock = Endpoint("bedrock", "m", f"http://127.0.0.1:{port}", region="us-east-1", timeout_s=5)
    for endpoint in (
        Endpoint("openai", "m", f"http://127.0.0.1:{port}/v1", key=Secret(KEY), timeout_s=5),
        bedrock.with_key(aws_secret(AWS_KEY_ID, AWS_SECRET)),
    ):
        with pytest.raises(ModelError) as info:
            ask(vendor_model(endpoint))
        assert info.value.kind == "connection"


def test_a_provider_echoing_the_key_never_shows_it(server: WireServer) -> None:
    if isinstance(server, OpenAIServer):
        body: Any = {
            "error": {
                "message": f"Incorrect API key provided: {KEY}",
                "type": "invalid_request_error",
            }
        }
    elif isinstance(server, BedrockServer):  # AWS never echoes a secret; a proxy might
        body = {"message": f"bad credentials {AWS_KEY_ID}:{AWS_SECRET} and {AWS_SECRET}"}
    else:
        body = {"type": "error", "error": {"type": "authentication_error", "message": f"bad {KEY}"}}
    server.script(Fault(status=401, body=body))
    with pytest.raises(ModelError) as info:
        ask(model_for(server))
    assert info.value.kind == "auth"
    for secret in (KEY, AWS_SECRET):
        assert secret not in str(info.value)
    assert "****" in str(info.value)
