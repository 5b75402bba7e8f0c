"""Structured output (no Ray): ``output_type`` asks each vendor natively (OpenAI's
``json_schema`` response format, Anthropic's forced tool) over real HTTP to the loopback
servers, the offline model answers an instance of the schema, a mismatch is asked for
again with the validation error, and ``Reply.output`` holds the validated value."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import pydantic
import pytest

from overstory import Agent, ConfigError, ModelResponse, OfflineModel
from overstory.conversation.turn import run_turn
from overstory.exceptions import TurnFailed
from overstory.messages import AssistantMessage, TurnEventType
from overstory.providers import Endpoint, Model, ModelRequest, Secret
from overstory.providers.pool import vendor_model
from overstory.store import open_store
from overstory.testing import AnthropicServer, OpenAIServer


class Weather(pydantic.BaseModel):
    city: str
    celsius: float
    sunny: bool


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Counting(Model):
    """Counts the calls and records the output schema each was asked for."""

    def __init__(self, inner: Model) -> None:
        self.inner, self.asked = inner, []  # type: ignore[var-annotated]

    @property
    def name(self) -> str:
        return self.inner.name

    async def request(self, req: ModelRequest) -> ModelResponse:
        self.asked.append(req)
        return await self.inner.request(req)


def turn(url: str, agent: Agent, text: str, **options: Any) -> tuple[Any, Any, list[Any]]:
    events: list[tuple[TurnEventType, dict[str, Any]]] = []

    def emit(type: TurnEventType, /, **fields: Any) -> None:
        events.append((type, fields))

    async def go() -> tuple[Any, Any]:
        store = open_store(url, data_keys=None)
        await store.open()
        try:
            history = await store.load("c")
            try:
                reply: Any = await run_turn(agent, store, "c", history, "t1", text, **options)
            except TurnFailed as exc:
                reply = exc
            return reply, await store.load("c")
        finally:
            await store.close()

    streamed = options.pop("streamed", False)
    if streamed:
        options["emit"] = emit
    reply, stored = asyncio.run(go())
    return reply, stored, events


def test_output_types_are_checked() -> None:
    assert Agent("a", output_type=Weather).output.name == "Weather"  # type: ignore[union-attr]
    assert Agent("a", output_type=Point).output is not None
    with pytest.raises(ConfigError, match="JSON object"):
        Agent("a", output_type=int)
    with pytest.raises(ConfigError, match="output_retries"):
        Agent("a", output_type=Point, output_retries=-1)


def test_the_offline_model_answers_a_valid_instance(sqlite_url: str) -> None:
    model = Counting(OfflineModel())
    reply, stored, _ = turn(sqlite_url, Agent("a", model=model, output_type=Weather), "Oslo?")
    assert isinstance(reply.output, Weather)
    assert reply.output.sunny is True
    assert json.loads(reply.text) == reply.output.model_dump()  # the text is its JSON
    assert isinstance(stored[-1], AssistantMessage)
    assert stored[-1].content == reply.text  # stored as the message
    assert model.asked[0].output.schema == Weather.model_json_schema()


def test_a_mismatch_is_asked_again_with_the_error_and_nothing_extra_is_stored(
    sqlite_url: str,
) -> None:
    model = Counting(OfflineModel())
    reply, stored, _ = turn(sqlite_url, Agent("a", model=model, output_type=Point), "!malformed")
    assert reply.output == Point(1, 1)
    assert len(model.asked) == 2
    retry = model.asked[1].messages[-1]
    assert "does not match the required Point schema" in retry.content
    assert "x: Field required" in retry.content
    assert len(stored) == 2  # the user's message and the valid answer only
    assert reply.usage.output_tokens == sum(
        m.usage.output_tokens for m in stored if isinstance(m, AssistantMessage)
    )


def test_a_model_that_never_matches_fails_the_turn_after_the_retries(sqlite_url: str) -> None:
    class Stubborn(Model):
        name = "stubborn"  # type: ignore[assignment]

        async def request(self, req: ModelRequest) -> ModelResponse:
            return ModelResponse(content='{"x": "not a number"}', model="stubborn")

    agent = Agent("a", model=Stubborn(), output_type=Point, output_retries=1)
    failed, stored, _ = turn(sqlite_url, agent, "point please")
    assert isinstance(failed, TurnFailed)
    assert "not a valid Point after 2 attempt(s)" in str(failed)
    assert len(stored) == 1


def test_a_turn_may_ask_for_its_own_output_type_and_a_stream_gets_it_whole(
    sqlite_url: str,
) -> None:
    reply, _, events = turn(sqlite_url, Agent("a"), "where?", output_type=Point, streamed=True)
    assert reply.output == Point(1, 1)
    deltas = [f["text"] for t, f in events if t == "delta"]
    assert deltas == [reply.text]  # one delta, once valid


@pytest.mark.parametrize("server_type", [OpenAIServer, AnthropicServer])
def test_each_vendor_is_asked_natively_over_http(sqlite_url: str, server_type: Any) -> None:
    def add(a: int, b: int) -> int:
        """Add."""
        return a + b

    with server_type() as server:
        endpoint = Endpoint(server.vendor, "m", server.base_url, key=Secret("sk-test-0123456789"))
        agent = Agent("a", model=vendor_model(endpoint), output_type=Weather, tools=[add])
        reply, _, _ = turn(sqlite_url, agent, "weather in Bergen?")
        body = server.requests[0].body
    assert isinstance(reply.output, Weather)
    if server.vendor == "openai":
        fmt = body["response_format"]
        assert fmt["type"] == "json_schema"
        assert fmt["json_schema"]["name"] == "Weather"
        assert fmt["json_schema"]["schema"] == Weather.model_json_schema()
    else:
        assert body["tool_choice"] == {"type": "any"}  # its own tools stay callable
        assert body["tools"][-1]["name"] == "final_output"
        assert body["tools"][-1]["input_schema"] == Weather.model_json_schema()


def test_a_bare_json_schema_is_an_output_type_too(sqlite_url: str) -> None:
    """What an HTTP client's text.format gives: a named JSON schema, checked with
    jsonschema; the value is the parsed JSON."""
    from overstory.output import OutputInvalid, parse_output
    from overstory.providers.schema import OutputSchema

    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
        "required": ["name", "age"],
    }
    ranking = OutputSchema("Person", schema)
    reply, _, _ = turn(sqlite_url, Agent("a"), "who?", output_type=ranking)
    assert reply.output == {"name": json.loads(reply.text)["name"], "age": 1}
    with pytest.raises(OutputInvalid, match="age"):
        parse_output(ranking, '{"name": "x", "age": -1}')
    with pytest.raises(ConfigError, match="not a JSON schema"):
        Agent("a", output_type=OutputSchema("Bad", {"type": 12}))
