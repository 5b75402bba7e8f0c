"""The pure logic of a turn (no Ray): store-before-proceed, tools, limits, idempotency."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from overstory import (
    Agent,
    AssistantMessage,
    InvalidMessage,
    Message,
    Model,
    ModelError,
    ModelRequest,
    ModelResponse,
    OfflineModel,
    Rule,
    ToolCall,
    ToolReturn,
    TurnFailed,
    UserMessage,
)
from overstory.conversation.turn import run_turn
from overstory.store import HistoryStore, open_store


def add(a: int, b: int) -> int:
    """Add."""
    return a + b


def explode(reason: str) -> str:
    """Fail."""
    raise ValueError(reason)


class StoreSpy(Model):
    """Records how many messages were durably stored each time the model was called."""

    def __init__(self, store: HistoryStore, inner: Model) -> None:
        self.store, self.inner, self.stored_at_call = store, inner, []

    @property
    def name(self) -> str:
        return "spy:" + self.inner.name

    async def request(self, req: ModelRequest) -> ModelResponse:
        self.stored_at_call.append((len(req.messages), await self.store.count("c")))
        return await self.inner.request(req)


def turn(
    url: str, agent: Agent, *sends: tuple[str, str], history: list[Message] | None = None
) -> Any:
    """Run ``sends`` (turn id, text) in order on conversation 'c'; returns replies/errors."""

    async def go() -> tuple[list[Any], list[Message], list[Message]]:
        store = open_store(url)
        await store.open()
        hist = history if history is not None else await store.load("c")
        out: list[Any] = []
        try:
            for turn_id, text in sends:
                try:
                    out.append(await run_turn(agent, store, "c", hist, turn_id, text))
                except (TurnFailed, InvalidMessage) as exc:
                    out.append(exc)
            return out, hist, await store.load("c")
        finally:
            await store.close()

    return asyncio.run(go())


def test_every_message_is_stored_before_the_next_step(sqlite_url: str) -> None:
    store = open_store(sqlite_url)
    spy = StoreSpy(store, OfflineModel(rules=[Rule(r"sum (?P<a>\d+) (?P<b>\d+)", "add")]))
    agent = Agent("a", model=spy, tools=[add])

    async def go() -> Any:
        await store.open()
        try:
            return await run_turn(agent, store, "c", [], "t1", "sum 2 3")
        finally:
            await store.close()

    reply = asyncio.run(go())
    # call 1 sees [user] with 1 stored; call 2 sees [user, assistant, tool] with 3 stored
    assert spy.stored_at_call == [(1, 1), (3, 3)]
    assert reply.text == "add returned 5"
    assert [m.kind for m in reply.messages] == ["user", "assistant", "tool", "assistant"]
    assert [m.seq for m in reply.messages] == [0, 1, 2, 3]
    assert reply.tool_calls[0].arguments == {"a": "2", "b": "3"}
    assert reply.usage.input_tokens == sum(
        m.usage.input_tokens for m in reply.messages if isinstance(m, AssistantMessage)
    )


def test_history_in_memory_equals_history_in_store(sqlite_url: str) -> None:
    agent = Agent("a", tools=[add])
    _, memory, stored = turn(sqlite_url, agent, ("t1", "hi"), ("t2", '!tool add {"a":1,"b":1}'))
    assert memory == stored
    assert [m.seq for m in stored] == list(range(len(stored)))


def test_a_failing_tool_and_bad_arguments_do_not_end_the_turn(sqlite_url: str) -> None:
    agent = Agent("a", tools=[add, explode])
    out, _, stored = turn(
        sqlite_url,
        agent,
        ("t1", '!tool explode {"reason": "no disk"}'),
        ("t2", '!tool add {"a": "x"}'),
        ("t3", "still there?"),
    )
    assert out[0].text == "explode failed tool 'explode' raised ValueError: no disk"
    assert "invalid arguments for tool 'add'" in out[1].text
    assert out[2].text == "echo #3: still there?"
    errors = [m for m in stored if isinstance(m, ToolReturn) and m.is_error]
    assert len(errors) == 2


def test_round_trip_limit_fails_the_turn_but_keeps_what_was_stored(sqlite_url: str) -> None:
    agent = Agent("a", tools=[add], max_round_trips=3)
    out, _, stored = turn(sqlite_url, agent, ("t1", '!loop add {"a":1,"b":2}'), ("t2", "next"))
    failed = out[0]
    assert isinstance(failed, TurnFailed)
    assert "all 3 round trips" in str(failed)
    assert failed.turn_id == "t1"
    assert sum(isinstance(m, AssistantMessage) for m in stored if m.turn_id == "t1") == 3
    assert isinstance(stored[0], UserMessage)
    assert out[1].text == "echo #2: next"  # the conversation goes on


def test_model_error_fails_the_turn_with_the_user_message_stored(sqlite_url: str) -> None:
    out, _, stored = turn(sqlite_url, Agent("a"), ("t1", "!fail upstream down"))
    assert isinstance(out[0], TurnFailed)
    assert "scripted fail: upstream down" in str(out[0])
    assert isinstance(out[0].__cause__, ModelError)
    assert [m.kind for m in stored] == ["user"]


def test_sending_a_completed_turn_again_replays_it_without_storing_twice(sqlite_url: str) -> None:
    agent = Agent("a", tools=[add])
    out, _, stored = turn(
        sqlite_url, agent, ("t1", '!tool add {"a":2,"b":2}'), ("t1", '!tool add {"a":2,"b":2}')
    )
    assert out[0] == out[1]
    assert len(stored) == 4


def test_an_interrupted_turn_resumes_from_its_last_stored_message(sqlite_url: str) -> None:
    # The actor died after storing the user message and the tool call, before the tool ran.
    agent = Agent("a", tools=[add])
    seeded = [
        UserMessage(content='!tool add {"a":20,"b":22}', seq=0, turn_id="t1"),
        AssistantMessage(
            tool_calls=(ToolCall(id="k", name="add", arguments={"a": 20, "b": 22}),),
            seq=1,
            turn_id="t1",
        ),
    ]

    async def seed() -> None:
        store = open_store(sqlite_url)
        await store.open()
        for m in seeded:
            await store.append("c", m)
        await store.close()

    asyncio.run(seed())
    out, _, stored = turn(sqlite_url, agent, ("t1", '!tool add {"a":20,"b":22}'))
    assert out[0].text == "add returned 42"
    assert [m.kind for m in stored] == ["user", "assistant", "tool", "assistant"]
    assert sum(isinstance(m, UserMessage) for m in stored) == 1


def test_reusing_a_turn_id_for_another_message_is_refused(sqlite_url: str) -> None:
    out, _, stored = turn(sqlite_url, Agent("a"), ("t1", "hello"), ("t1", "something else"))
    assert isinstance(out[1], InvalidMessage)
    assert "already used for a different message" in str(out[1])
    assert len(stored) == 2


def test_an_interrupted_turn_overtaken_by_later_turns_is_failed_not_reordered(
    sqlite_url: str,
) -> None:
    out, _, stored = turn(
        sqlite_url, Agent("a"), ("t1", "!fail x"), ("t2", "later"), ("t1", "!fail x")
    )
    assert isinstance(out[2], TurnFailed)
    assert "later turns have run" in str(out[2])
    assert len(stored) == 3


@pytest.mark.parametrize("n", [1, 5])
def test_seq_is_dense_across_turns(sqlite_url: str, n: int) -> None:
    sends = [(f"t{i}", f"message {i}") for i in range(n)]
    _, _, stored = turn(sqlite_url, Agent("a"), *sends)
    assert [m.seq for m in stored] == list(range(2 * n))


def test_a_store_failure_is_the_turns_outcome_and_counted_but_a_fence_is_not(
    sqlite_url: str, recorded_metrics: Any
) -> None:
    """The alert on store errors reads what the turn records: the store failing, not
    the store refusing a write by design (a fenced zombie)."""
    from overstory.exceptions import Fenced, StoreError

    agent = Agent("a", model=OfflineModel("m"))

    async def go(failure: Exception) -> None:
        store = open_store(sqlite_url)
        await store.open()
        epoch = await store.acquire("c")

        async def failing(*_: Any, **__: Any) -> None:
            raise failure

        store.append = failing  # type: ignore[method-assign]
        try:
            with pytest.raises(type(failure)):
                await run_turn(agent, store, "c", [], "t1", "hi", epoch=epoch)
        finally:
            await store.close()

    asyncio.run(go(StoreError("disk full")))
    asyncio.run(go(Fenced("c", 1, 2)))
    outcomes = [tags["outcome"] for _, tags in recorded_metrics.of("turns")]
    assert outcomes == ["store_error", "error"]
    assert recorded_metrics.of("store_errors") == [(1, {"where": "turn"})]
