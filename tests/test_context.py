"""RunContext for tools (no Ray): injected, never in the schema, progress in the stream."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from overstory import Agent, OfflineModel, RunContext, ToolDefinitionError
from overstory.conversation.turn import run_turn
from overstory.gateway.wire import ResponseStream
from overstory.messages import Message, ToolCall, TurnEvent
from overstory.providers.offline import Rule
from overstory.store import open_store
from overstory.tools import Tool

SEEN: list[tuple[str, str, str, str, str, bool]] = []


def slow_sum(ctx: RunContext, a: int, b: int) -> int:
    """Add two numbers, slowly (a sync tool: it runs in a worker thread)."""
    ctx.report(f"adding {a} and {b}")
    on_loop_thread = threading.current_thread() is threading.main_thread()
    SEEN.append(
        (
            ctx.user_id,
            ctx.conversation_id,
            ctx.agent,
            ctx.agent_version,
            ctx.turn_id,
            on_loop_thread,
        )
    )
    ctx.report("done")
    return a + b


async def note(ctx: RunContext, text: str) -> str:
    """Keep a note (an async tool)."""
    ctx.report("noted")
    return f"noted for {ctx.user_id}: {text}"


def test_the_context_is_injected_and_never_shown_to_the_model() -> None:
    tool = Tool(slow_sum)
    assert tool.takes_context
    assert set(tool.definition.parameters["properties"]) == {"a", "b"}
    assert tool.definition.parameters["required"] == ["a", "b"]
    assert not Tool(lambda_free).takes_context
    returned = asyncio.run(tool.run(ToolCall("c1", "slow_sum", {"a": 1, "b": 2})))
    assert returned.is_error
    assert "needs a RunContext" in returned.content
    # the model cannot pass a context of its own
    ctx = RunContext("u", "a:u", "a", "1", "t")
    forged = asyncio.run(tool.run(ToolCall("c2", "slow_sum", {"ctx": {}, "a": 1, "b": 2}), ctx))
    assert forged.is_error
    with pytest.raises(ToolDefinitionError, match="RunContext must be the first parameter"):
        Tool(context_second)


def lambda_free(a: int) -> int:
    """A plain tool."""
    return a


def context_second(a: int, ctx: RunContext) -> int:
    """Wrong: the context is not first."""
    return a


def test_a_streamed_turn_carries_the_tools_progress_and_the_context_names_the_turn(
    tmp_path: Path,
) -> None:
    SEEN.clear()
    rules = [
        Rule(r"what is (?P<a>\d+) \+ (?P<b>\d+)", "slow_sum"),
        Rule(r"note (?P<text>.+)", "note"),
    ]
    agent = Agent(
        "helper", model=OfflineModel("h", rules=rules), tools=[slow_sum, note], version="3"
    )

    async def body() -> list[tuple[str, str]]:
        store = open_store(f"sqlite:///{tmp_path}/h.db", data_keys=None)
        await store.open()
        events: list[tuple[str, str]] = []

        def emit(kind: str, /, **fields: Any) -> None:
            events.append((kind, str(fields.get("text", ""))))

        history: list[Message] = []
        await run_turn(
            agent,
            store,
            "helper:conv_0123456789abcdef01234567",
            history,
            "t1",
            "what is 2 + 3",
            emit=emit,
            owner="alice",
        )
        await run_turn(agent, store, "helper:bob", history[:0], "t2", "note milk", emit=emit)
        await store.close()
        return events

    events = asyncio.run(body())
    kinds = [k for k, _ in events]
    first_result = kinds.index("tool_result")
    assert [t for k, t in events[:first_result] if k == "progress"] == ["adding 2 and 3", "done"]
    assert ("progress", "noted") in events
    assert SEEN == [("alice", "helper:conv_0123456789abcdef01234567", "helper", "3", "t1", False)]
    # the HTTP door's stream has no such event: a progress event is skipped there
    from overstory.access import new_conversation_id
    from overstory.gateway.wire import new_response_id

    reader = ResponseStream(new_response_id(new_conversation_id()), "helper")
    assert reader.feed(TurnEvent("t1", 0, "progress", text="adding")) == []
