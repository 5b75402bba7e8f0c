"""The conversation entity's guarantees, once, for both placements.

Every test runs against a host (many entities) and a dedicated conversation actor (one
entity), in-process without Ray over a real SQLite store: the same
:class:`~overstory.conversation.entity.Entity` behind two shells, called the way each
placement's transport calls it. What one placement promises, the other keeps: the turn
deadline (a hanging tool), crash → restart → quarantine, quotas, the access re-check,
resume and cancel of streamed turns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pydantic
import pytest

from overstory import Agent, ConversationQuarantined, QuotaExceeded, TurnFailed
from overstory.access import Principal, create_record
from overstory.actors.conversation import ConversationActor
from overstory.actors.host import HostActor
from overstory.app import App, conversation_id
from overstory.compaction import Compact, read_summary
from overstory.config import Config
from overstory.conversation.entity import Shell
from overstory.exceptions import NotPermitted, UnknownConversation, UsageError
from overstory.messages import Reply, TurnEvent, TurnRequest, UserMessage
from overstory.providers import OfflineModel
from overstory.sharding import ShardTable
from overstory.wire import events_of_wire, messages_of_wire, reply_of_wire, request_wire

AGENT = "entity"


async def hang() -> str:
    """A tool that never returns (until the turn's deadline cancels it)."""
    await asyncio.Event().wait()  # never set
    return "unreachable"


def cid(user: str) -> str:
    return conversation_id(AGENT, user)


class Placed:
    """Conversations of one placement, called as that placement's transport calls them.

    ``hosted``: one :class:`HostActor` holding every conversation; ``dedicated``: one
    :class:`ConversationActor` per conversation (as its supervisor would start them).
    """

    def __init__(
        self, placement: str, sqlite_url: str, agent: Agent | None = None, **settings: Any
    ) -> None:
        self.placement = placement
        self.config = Config.from_mapping({"store": sqlite_url, **settings})
        agent = agent or Agent(AGENT, model=OfflineModel("offline:entity"), tools=[hang])
        self.app = App([agent])
        self.table = ShardTable.build(1, shards=4)
        self.host = HostActor("ns", self.table.hosts[0], self.table, self.app, self.config)
        self.actors: dict[str, ConversationActor] = {}

    def shell(self, user: str) -> Shell:
        if self.placement == "hosted":
            return self.host
        if user not in self.actors:
            self.actors[user] = ConversationActor(cid(user), self.app, self.config)
        return self.actors[user]

    async def send(
        self,
        user: str,
        turn_id: str,
        text: str,
        principal: Principal | None = None,
        **options: Any,
    ) -> Reply:
        request = request_wire(TurnRequest(turn_id, text, **options))
        if self.placement == "hosted":
            v = self.table.version
            return reply_of_wire(await self.host.send(v, cid(user), request, principal=principal))
        return reply_of_wire(await self.actors_of(user).send(request, principal=principal))

    async def start_turn(self, user: str, turn_id: str, text: str) -> int:
        if self.placement == "hosted":
            return await self.host.start_turn(
                self.table.version, cid(user), request_wire(TurnRequest(turn_id, text))
            )
        return await self.actors_of(user).start_turn(request_wire(TurnRequest(turn_id, text)))

    async def events(
        self, user: str, turn_id: str, after: int = -1, wait_s: float = 5.0
    ) -> tuple[list[TurnEvent], bool]:
        if self.placement == "hosted":
            v = self.table.version
            return events_of_wire(await self.host.events(v, cid(user), turn_id, after, wait_s))
        return events_of_wire(await self.actors_of(user).events(turn_id, after, wait_s))

    async def cancel(self, user: str, turn_id: str, principal: Principal | None = None) -> bool:
        if self.placement == "hosted":
            v = self.table.version
            return await self.host.cancel(v, cid(user), turn_id, principal=principal)
        return await self.actors_of(user).cancel(turn_id, principal=principal)

    async def history(
        self,
        user: str,
        principal: Principal | None = None,
        after: int = -1,
        limit: int | None = None,
    ) -> list[Any]:
        if self.placement == "hosted":
            v = self.table.version
            page = await self.host.history(v, cid(user), after, limit, principal=principal)
        else:
            page = await self.actors_of(user).history(after, limit, principal=principal)
        return messages_of_wire(page)

    def actors_of(self, user: str) -> ConversationActor:
        shell = self.shell(user)
        assert isinstance(shell, ConversationActor)
        return shell

    def restarts(self, user: str) -> tuple[int, int]:
        supervision = self.shell(user).supervision
        return supervision.restarts, supervision.quarantines

    async def tail(self, user: str, turn_id: str, after: int = -1) -> list[TurnEvent]:
        """Every event of a streamed turn after ``after``, until it ends."""
        seen: list[TurnEvent] = []
        ended = False
        while not ended:
            events, ended = await self.events(user, turn_id, after)
            seen += events
            after = events[-1].seq if events else after
        return seen

    async def close(self) -> None:
        shells: list[Shell] = [self.host, *self.actors.values()]
        for shell in shells:
            for task in list(shell._tasks):
                task.cancel()
            await shell.services.store.close()
        if self.host._sweeper is not None:
            self.host._sweeper.cancel()


@pytest.fixture(params=["hosted", "dedicated"])
def placement(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run(
    placement: str,
    sqlite_url: str,
    body: Callable[[Placed], Awaitable[Any]],
    agent: Agent | None = None,
    **settings: Any,
) -> Any:
    async def go() -> Any:
        placed = Placed(placement, sqlite_url, agent, **settings)
        try:
            return await body(placed)
        finally:
            await placed.close()

    return asyncio.run(go())


def test_a_hanging_tool_meets_the_turn_deadline_and_the_conversation_serves_again(
    placement: str, sqlite_url: str
) -> None:
    async def body(c: Placed) -> tuple[str, tuple[int, int], list[str]]:
        with pytest.raises(TurnFailed, match=r"exceeded its deadline of 0\.5 s"):
            await c.send("u", "t1", "!tool hang {}")
        reply = await c.send("u", "t2", "still there?")
        stored = [m.turn_id for m in await c.history("u") if isinstance(m, UserMessage)]
        return reply.text, c.restarts("u"), stored

    text, restarts, stored = run(placement, sqlite_url, body, conversations={"turn_timeout_s": 0.5})
    assert text.endswith("still there?")
    assert restarts == (1, 0)  # one crash, restarted from the store
    assert stored == ["t1", "t2"]  # the interrupted turn's message was kept


def test_crashes_restart_the_conversation_then_quarantine_it_alone(
    placement: str, sqlite_url: str, recorded_metrics: Any
) -> None:
    async def body(c: Placed) -> tuple[tuple[int, int], str]:
        for i in range(2):
            with pytest.raises(TurnFailed, match="scripted crash"):
                await c.send("bad", f"t{i}", f"!crash {i}")
        with pytest.raises(ConversationQuarantined, match="'entity:bad'"):
            await c.send("bad", "t9", "hello")
        with pytest.raises(ConversationQuarantined):
            await c.history("bad")  # every call, not only sends
        counts = c.restarts("bad")
        good = await c.send("good", "t", "hello")  # the others carry on
        return counts, good.text

    counts, good = run(placement, sqlite_url, body, conversations={"max_restarts": 1})
    assert counts == (1, 1)
    assert good.endswith("hello")
    assert recorded_metrics.of("quarantines") == [(1, {})]  # what the alert counts


def test_the_quota_refuses_a_turn_before_anything_is_stored(
    placement: str, sqlite_url: str, recorded_metrics: Any
) -> None:
    async def body(c: Placed) -> list[str]:
        await c.send("q", "t1", "one")
        with pytest.raises(QuotaExceeded, match="requests_per_minute"):
            await c.send("q", "t2", "two")
        with pytest.raises(QuotaExceeded):
            await c.start_turn("q", "t3", "three")
        return [m.turn_id for m in await c.history("q") if isinstance(m, UserMessage)]

    assert run(placement, sqlite_url, body, quotas={"requests_per_minute": 1}) == ["t1"]
    refused = recorded_metrics.of("quota_refusals")
    assert refused == [(2, {"limit": "requests_per_minute"})]  # both, summed per tag set


def test_access_is_checked_again_where_the_conversation_lives(
    placement: str, sqlite_url: str
) -> None:
    async def body(c: Placed) -> list[str]:
        store = c.shell("x").services
        await c.shell("x")._open()
        record = await create_record(store.store, "alice", AGENT, {})
        assert record is not None
        user = record.id  # an HTTP conversation: its record names the owner
        alice, mallory = Principal("alice"), Principal("mallory")
        await c.send(user, "t1", "mine", principal=alice)
        with pytest.raises(UnknownConversation):
            await c.send(user, "t2", "theirs", principal=mallory)
        with pytest.raises(UnknownConversation):
            await c.history(user, principal=mallory)
        with pytest.raises(UnknownConversation):
            await c.cancel(user, "t1", principal=mallory)
        with pytest.raises((UnknownConversation, NotPermitted)):
            await c.send("alice", "t3", "not mine either", principal=mallory)
        history = await c.history(user, principal=alice)
        return [m.turn_id for m in history if isinstance(m, UserMessage)]

    assert run(placement, sqlite_url, body) == ["t1"]


def test_a_streamed_turn_resumes_from_any_cursor(placement: str, sqlite_url: str) -> None:
    async def body(c: Placed) -> tuple[list[TurnEvent], list[TurnEvent]]:
        await c.start_turn("r", "t1", "resume me")
        everything = await c.tail("r", "t1")
        rest = await c.tail("r", "t1", after=everything[0].seq)
        return everything, rest

    everything, rest = run(placement, sqlite_url, body)
    assert everything[-1].type == "completed"
    assert rest == everything[1:]
    assert "resume me" in "".join(e.text for e in everything if e.type == "delta")


def test_cancel_stops_a_streamed_turn_with_what_it_produced_stored(
    placement: str, sqlite_url: str
) -> None:
    async def body(c: Placed) -> tuple[bool, list[TurnEvent], list[str], bool]:
        await c.start_turn("k", "t1", "!sleep 0.5 one two three")
        cancelled = await c.cancel("k", "t1")  # the model is still thinking
        events = await c.tail("k", "t1")
        kinds = [m.kind for m in await c.history("k")]
        again = await c.cancel("k", "t1")  # finished: nothing to cancel
        return cancelled, events, kinds, again

    cancelled, events, kinds, again = run(placement, sqlite_url, body)
    assert cancelled
    assert (events[-1].type, events[-1].text) == ("incomplete", "cancelled")
    assert kinds == ["user", "assistant"]  # what was shown is stored, marked incomplete
    assert not again


def test_a_long_conversation_holds_a_tail_pages_its_history_and_finds_old_turns(
    placement: str, sqlite_url: str
) -> None:
    """A conversation far longer than its tail: the entity holds at most the tail, every
    call fits the window with a durable summary, history pages from the store, and a
    turn id older than the tail is replayed (send and stream) from the store."""
    agent = Agent(AGENT, model="offline:entity@500", context=Compact(every=4))

    async def body(c: Placed) -> dict[str, Any]:
        first = await c.send("long", "t0", "remember: the code is 4711")
        for n in range(1, 30):
            await c.send("long", f"t{n}", f"message {n} " + "x" * 100)
        entity = c.shell("long")._live(cid("long"))
        assert entity is not None
        again = await c.send("long", "t0", "remember: the code is 4711")
        events, ended = await c.events("long", "t1", wait_s=0)
        page = await c.history("long", after=9, limit=5)
        return {
            "info": entity.info(),
            "first": first,
            "again": again,
            "replayed": (ended, events[-1].type),
            "page": [m.seq for m in page],
            "all": len(await c.history("long")),
            "summary": await read_summary(c.shell("long").services.store, cid("long")),
        }

    out = run(placement, sqlite_url, body, agent, conversations={"tail_messages": 10})
    assert out["info"]["messages"] == 60
    assert out["info"]["messages_held"] <= 10
    assert out["again"].text == out["first"].text  # replayed from the store, not re-run
    assert out["all"] == 60  # nothing stored again, nothing compacted away
    assert out["replayed"] == (True, "completed")
    assert out["page"] == [10, 11, 12, 13, 14]
    assert out["summary"] is not None
    assert out["summary"].upto > 0


def test_activation_reads_only_the_tail_and_seqs_stay_dense(
    placement: str, sqlite_url: str
) -> None:
    async def fill(c: Placed) -> None:
        for n in range(20):
            await c.send("act", f"t{n}", f"hello {n}")

    async def reopen(c: Placed) -> tuple[int, list[int]]:
        await c.send("act", "t20", "after reopening")
        entity = c.shell("act")._live(cid("act"))
        assert entity is not None
        held = entity.info()["messages_held"]
        return held, [m.seq for m in await c.history("act", after=37)]

    run(placement, sqlite_url, fill)
    held, seqs = run(placement, sqlite_url, reopen, conversations={"tail_messages": 10})
    assert held <= 10
    assert seqs == [38, 39, 40, 41]


def test_a_turn_chooses_its_model_and_settings_in_either_placement(
    placement: str, sqlite_url: str
) -> None:
    agent = Agent(AGENT, model="offline:main", models={"fast": "offline:fast"})

    async def body(c: Placed) -> tuple[Reply, Reply, Exception, list[Any]]:
        fast = await c.send("m", "t1", "x" * 100, model="fast", settings={"max_output_tokens": 3})
        main = await c.send("m", "t2", "hello")
        try:
            await c.send("m", "t3", "hello", model="missing")
        except UsageError as exc:
            refused: Exception = exc
        return fast, main, refused, await c.history("m")

    fast, main, refused, history = run(placement, sqlite_url, body, agent)
    assert fast.messages[-1].model == "offline:fast"
    assert len(fast.text) == 12  # 3 tokens of 4 characters
    assert main.messages[-1].model == "offline:main"
    assert "allows: default, fast" in str(refused)
    assert len(history) == 4  # the refused turn stored nothing


class Answer(pydantic.BaseModel):
    city: str
    rank: int


def test_structured_output_in_either_placement(placement: str, sqlite_url: str) -> None:
    async def body(c: Placed) -> tuple[Reply, Reply, list[TurnEvent]]:
        sent = await c.send("s", "t1", "best city?", output_type=Answer)
        replayed = await c.send("s", "t1", "best city?", output_type=Answer)
        await c.start_turn("s", "t2", "and now?")
        return sent, replayed, await c.tail("s", "t2")

    agent = Agent(AGENT, output_type=None)
    sent, replayed, events = run(placement, sqlite_url, body, agent)
    assert isinstance(sent.output, Answer)
    assert replayed.output == sent.output  # a replay parses the stored answer again
    completed = events[-1].reply
    assert completed is not None
    assert completed.output is None  # that turn asked for no structure
