"""Client tools (pure, no Ray): a turn offers a caller's tools beside the agent's own,
ends on the model's call to one, and the caller's next turn continues from its output."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from overstory import (
    Agent,
    AssistantMessage,
    InvalidMessage,
    Model,
    ModelRequest,
    ModelResponse,
    OfflineModel,
    ToolCall,
    ToolDefinition,
    ToolOutput,
    ToolReturn,
    UsageError,
    UserMessage,
)
from overstory.conversation.turn import awaiting, is_complete, restarted, run_turn
from overstory.conversation.window import NO_OUTPUT, answered
from overstory.messages import from_record, to_record
from overstory.store import open_store

WEATHER = ToolDefinition(
    "weather",
    "The weather in a city.",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
ASK = '!tool weather {"city": "Paris"}'


def add(a: int, b: int) -> int:
    """Add."""
    return a + b


class Both(Model):
    """Answers its first call with a call to the agent's ``add`` and the client's
    ``weather`` at once; then summarises what came back. Records what it was sent."""

    def __init__(self) -> None:
        self.sent: list[ModelRequest] = []

    @property
    def name(self) -> str:
        return "both"

    async def request(self, req: ModelRequest) -> ModelResponse:
        self.sent.append(req)
        if isinstance(req.messages[-1], UserMessage):
            calls = (
                ToolCall("c_add", "add", {"a": 2, "b": 3}),
                ToolCall("c_weather", "weather", {"city": "Oslo"}),
            )
            return ModelResponse(tool_calls=calls, finish_reason="tool_calls")
        results = [m.content for m in req.messages if isinstance(m, ToolReturn)]
        return ModelResponse(content="got " + ", ".join(results))


def run(
    url: str, agent: Agent, *turns: tuple[str, str, dict[str, Any]]
) -> tuple[list[Any], list[Any]]:
    """Run ``turns`` (turn id, text, run_turn keywords) on conversation 'c' in order;
    returns each reply or error, and what the store holds after."""

    async def go() -> tuple[list[Any], list[Any]]:
        store = open_store(url)
        await store.open()
        try:
            history = await store.load("c")
            out: list[Any] = []
            for turn_id, text, options in turns:
                try:
                    out.append(await run_turn(agent, store, "c", history, turn_id, text, **options))
                except (InvalidMessage, UsageError) as exc:
                    out.append(exc)
            return out, await store.load("c")
        finally:
            await store.close()

    return asyncio.run(go())


def test_a_call_to_a_client_tool_ends_the_turn_and_its_output_continues_it(
    sqlite_url: str,
) -> None:
    agent = Agent("a", model=OfflineModel())
    first, second = run(
        sqlite_url,
        agent,
        ("t1", ASK, {"client_tools": [WEATHER]}),
        ("t2", "", {"client_tools": [WEATHER], "tool_outputs": [ToolOutput("call_1_0", "sunny")]}),
    )[0]
    (call,) = first.awaiting
    assert (call.id, call.name, call.arguments, call.client) == (
        "call_1_0",
        "weather",
        {"city": "Paris"},
        True,
    )
    assert first.text == ""
    assert second.text == "weather returned sunny"
    assert second.awaiting == ()
    assert [type(m).__name__ for m in second.messages] == ["ToolReturn", "AssistantMessage"]


def test_the_stored_turns_say_what_awaits_and_survive_the_store(sqlite_url: str) -> None:
    agent = Agent("a", model=OfflineModel())
    _, stored = run(sqlite_url, agent, ("t1", ASK, {"client_tools": [WEATHER]}))
    assert [m.kind for m in stored] == ["user", "assistant"]
    assert stored[1].tool_calls[0].client  # the mark survives the store's round trip
    assert is_complete(stored)
    assert awaiting(stored) == stored[1].tool_calls
    again = from_record(to_record(stored[1]))
    assert again == stored[1]
    # The agent's own calls keep their record as it was (no "client" key).
    plain = AssistantMessage(tool_calls=(ToolCall("x", "add", {}),), seq=0, turn_id="t")
    assert "client" not in json.loads(to_record(plain)["body"])["tool_calls"][0]


def test_retries_of_both_turns_are_replays_and_a_different_output_is_refused(
    sqlite_url: str,
) -> None:
    agent = Agent("a", model=OfflineModel())
    sunny = {"client_tools": [WEATHER], "tool_outputs": [ToolOutput("call_1_0", "sunny")]}
    rainy = {"client_tools": [WEATHER], "tool_outputs": [ToolOutput("call_1_0", "rainy")]}
    out, stored = run(
        sqlite_url,
        agent,
        ("t1", ASK, {"client_tools": [WEATHER]}),
        ("t2", "", sunny),
        ("t1", ASK, {"client_tools": [WEATHER]}),
        ("t2", "", sunny),
        ("t2", "", rainy),
    )
    assert out[2].awaiting == out[0].awaiting
    assert out[3].text == out[1].text == "weather returned sunny"
    assert isinstance(out[4], InvalidMessage)
    assert "already used" in str(out[4])
    assert len(stored) == 4  # user, call, output, answer: nothing twice


@pytest.mark.parametrize(
    ("outputs", "error"),
    [
        ([ToolOutput("call_9_9", "x")], "no such call awaits"),
        ([ToolOutput("call_1_0", "x"), ToolOutput("call_1_0", "y")], "given twice"),
    ],
)
def test_outputs_for_calls_not_awaited_are_refused_and_nothing_is_stored(
    sqlite_url: str, outputs: list[ToolOutput], error: str
) -> None:
    agent = Agent("a", model=OfflineModel())
    out, stored = run(
        sqlite_url,
        agent,
        ("t1", ASK, {"client_tools": [WEATHER]}),
        ("t2", "", {"client_tools": [WEATHER], "tool_outputs": outputs}),
    )
    assert isinstance(out[1], InvalidMessage)
    assert error in str(out[1])
    assert len(stored) == 2


def test_outputs_when_nothing_awaits_are_refused(sqlite_url: str) -> None:
    agent = Agent("a", model=OfflineModel())
    out, stored = run(
        sqlite_url, agent, ("t1", "hi", {}), ("t2", "", {"tool_outputs": [ToolOutput("c", "x")]})
    )
    assert isinstance(out[1], InvalidMessage)
    assert "no client tool call awaits" in str(out[1])
    assert len(stored) == 2


def test_the_agents_own_call_runs_first_then_the_turn_waits(sqlite_url: str) -> None:
    model = Both()
    agent = Agent("a", model=model, tools=[add])
    out, stored = run(
        sqlite_url,
        agent,
        ("t1", "go", {"client_tools": [WEATHER]}),
        ("t2", "", {"client_tools": [WEATHER], "tool_outputs": [ToolOutput("c_weather", "snow")]}),
    )
    assert [c.name for c in out[0].awaiting] == ["weather"]
    assert [m.kind for m in stored[:3]] == ["user", "assistant", "tool"]  # add ran here
    assert stored[2].content == "5"
    assert out[1].text == "got 5, snow"  # the model saw both results, in order
    assert len(model.sent) == 2


def test_a_missing_output_is_refused(sqlite_url: str) -> None:
    model = Both()
    two = ToolDefinition("add2", "", {"type": "object"})
    agent = Agent("a", model=model)
    out, _ = run(
        sqlite_url,
        agent,
        ("t1", "go", {"client_tools": [WEATHER, ToolDefinition("add", "", {"type": "object"})]}),
        ("t2", "", {"client_tools": [WEATHER, two], "tool_outputs": [ToolOutput("c_add", "5")]}),
    )
    assert isinstance(out[1], InvalidMessage)
    assert "no output given" in str(out[1])


def test_a_client_tool_may_not_shadow_the_agents_own_or_come_twice(sqlite_url: str) -> None:
    agent = Agent("a", model=OfflineModel(), tools=[add])
    shadow = ToolDefinition("add", "", {"type": "object"})
    out, stored = run(
        sqlite_url,
        agent,
        ("t1", "hi", {"client_tools": [shadow]}),
        ("t2", "hi", {"client_tools": [WEATHER, WEATHER]}),
        ("t3", "hi", {"client_tools": [ToolDefinition("bad name", "", {})]}),
    )
    assert "has a tool of that name" in str(out[0])
    assert "given twice" in str(out[1])
    assert "1-64 letters" in str(out[2])
    assert stored == []


def test_a_call_left_unanswered_is_shown_to_the_model_as_an_error(sqlite_url: str) -> None:
    model = Both()
    agent = Agent("a", model=model, tools=[add])
    run(sqlite_url, agent, ("t1", "go", {"client_tools": [WEATHER]}), ("t2", "go on", {}))
    sent = model.sent[1].messages  # t2's first call
    shown = [m for m in sent if isinstance(m, ToolReturn)]
    assert [(m.tool_call_id, m.is_error) for m in shown] == [("c_add", False), ("c_weather", True)]
    assert shown[1].content == NO_OUTPUT
    assert sent[-1] == UserMessage(
        content="go on", seq=sent[-1].seq, turn_id="t2", created_at=sent[-1].created_at
    )


def test_answered_leaves_a_whole_history_as_it_is() -> None:
    messages = [
        UserMessage(content="q", seq=0),
        AssistantMessage(tool_calls=(ToolCall("x", "add", {}),), seq=1),
        ToolReturn(tool_call_id="x", tool_name="add", content="1", seq=2),
        AssistantMessage(content="a", seq=3),
    ]
    assert answered(messages) is messages


def test_a_streamed_turn_shows_the_client_call_and_ends(sqlite_url: str) -> None:
    events: list[tuple[str, Any]] = []

    async def go() -> Any:
        store = open_store(sqlite_url)
        await store.open()
        try:
            agent = Agent("a", model=OfflineModel())
            return await run_turn(
                agent,
                store,
                "c",
                [],
                "t1",
                ASK,
                emit=lambda kind, **f: events.append((kind, f.get("tool_call"))),
                client_tools=[WEATHER],
            )
        finally:
            await store.close()

    reply = asyncio.run(go())
    assert [(k, c.name) for k, c in events if k == "tool_call"] == [("tool_call", "weather")]
    assert reply.awaiting[0].name == "weather"


def test_a_continued_turn_restarts_from_its_outputs() -> None:
    turn = [
        ToolReturn(tool_call_id="c1", tool_name="w", content="sunny", seq=2, turn_id="t2"),
        AssistantMessage(content="x", seq=3, turn_id="t2"),
    ]
    request = restarted("t2", turn)
    assert (request.text, request.tool_outputs) == ("", (ToolOutput("c1", "sunny"),))
    assert restarted("t1", [UserMessage(content="hi", turn_id="t1")]).text == "hi"


def test_tool_choice_forces_the_first_call_only_so_the_turn_ends(sqlite_url: str) -> None:
    agent = Agent("a", model=OfflineModel(), tools=[add])
    out, _stored = run(
        sqlite_url,
        agent,
        ("t1", "Paris", {"client_tools": [WEATHER], "settings": {"tool_choice": "weather"}}),
        ("t2", "go", {"settings": {"tool_choice": "required"}}),
    )
    assert out[0].awaiting[0].arguments == {"city": "echo #1: Paris"}  # from its answer
    # The agent's own tool, forced: it runs, and the next call may answer in text.
    assert [m.kind for m in out[1].messages] == ["user", "assistant", "tool", "assistant"]
    assert out[1].text.startswith("add returned")


def test_tool_choice_none_answers_without_tools(sqlite_url: str) -> None:
    agent = Agent("a", model=OfflineModel())
    out, _ = run(
        sqlite_url,
        agent,
        ("t1", ASK, {"client_tools": [WEATHER], "settings": {"tool_choice": "none"}}),
    )
    assert out[0].awaiting == ()
    assert out[0].text.startswith("echo #1: !tool weather")


def test_tool_choice_naming_no_offered_tool_is_refused_before_storing(sqlite_url: str) -> None:
    agent = Agent("a", model=OfflineModel())
    out, stored = run(sqlite_url, agent, ("t1", "hi", {"settings": {"tool_choice": "nope"}}))
    assert isinstance(out[0], UsageError)
    assert "no such tool is offered" in str(out[0])
    assert stored == []
