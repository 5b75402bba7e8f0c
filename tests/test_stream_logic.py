"""Streamed turns as plain logic, without Ray: the event log, replay, the offline model's
stream, the chain's fall-through rule, and a host (in-process, real SQLite) running a
streamed turn that readers tail, resume, and see started again after its log is gone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import pytest

from overstory import Agent, AllModelsFailed, ModelError, UnknownTurn
from overstory.actors.host import HostActor
from overstory.app import App, conversation_id
from overstory.config import Config
from overstory.conversation.turnlog import TurnLog, TurnLogs, TurnStreams, replay
from overstory.exceptions import InvalidMessage, Passivated, TurnIncomplete
from overstory.messages import (
    AssistantMessage,
    Message,
    ModelResponse,
    TurnEvent,
    TurnRequest,
    UserMessage,
)
from overstory.providers import FallbackModel, Model, OfflineModel, Rule
from overstory.providers.base import FallThrough, ModelRequest, StreamItem
from overstory.sharding import ShardTable
from overstory.wire import events_of_wire, request_wire

CID = conversation_id("s", "u")


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


async def ended(streams: TurnStreams, turn_id: str) -> TurnLog:
    """Turn ``turn_id``'s log once it has ended (a terminal event), waiting on the log's
    own wake-ups; fails the test after 5 s."""
    log = streams.logs.get(turn_id)
    assert log is not None
    async with asyncio.timeout(5):
        while not log.finished:
            await log.wait_after(log.last_seq, timeout_s=5)
    return log


# --- the log ------------------------------------------------------------------------------


def test_a_log_numbers_events_wakes_readers_and_ends_at_a_terminal_event() -> None:
    async def go() -> tuple[Any, ...]:
        log = TurnLog("t")
        log.emit("started")
        waiting = asyncio.create_task(log.wait_after(0, timeout_s=5))
        await asyncio.sleep(0)  # one step: the reader is now waiting
        log.emit("delta", text="hi")
        woken = await waiting
        nothing = await log.wait_after(1, timeout_s=0.05)
        log.emit("completed")
        with pytest.raises(RuntimeError, match="has ended"):
            log.emit("delta", text="late")
        return woken, nothing, log.after(-1), await log.wait_after(2, timeout_s=5)

    woken, nothing, everything, after_end = asyncio.run(go())
    assert [(e.seq, e.type, e.text) for e in woken] == [(1, "delta", "hi")]
    assert nothing == []
    assert [e.seq for e in everything] == [0, 1, 2]
    assert after_end == []  # finished: no waiting
    restarted = TurnLog("t", first_seq=7)
    restarted.emit("restarted")
    assert [e.seq for e in restarted.after(3)] == [7]
    assert restarted.after(7) == []


def test_logs_are_bounded_by_count_and_window_and_never_drop_a_running_turn() -> None:
    logs = TurnLogs(keep=2, window_s=10.0)
    running = logs.open("running")
    for i in range(3):
        logs.open(f"done-{i}").emit("completed")
    assert logs.get("running") is running
    assert len(logs) == 2  # the oldest finished went first
    assert logs.get("done-0") is None
    logs.prune(now=time.monotonic() + 11)
    assert [t for t in ("running", "done-1", "done-2") if logs.get(t)] == ["running"]


def test_a_restart_that_lands_elsewhere_sends_the_reader_to_ask_again() -> None:
    """A reader's poll finds the turn unfinished and its log gone; the restart it asks
    for lands on another incarnation of the entity (passivated meanwhile) or finds the
    turn ended: the reader is told to ask again, where the log or the stored turn is."""
    streams = TurnStreams()
    history = [UserMessage(content="hello", seq=0, turn_id="t1")]
    restarted: list[str] = []

    async def elsewhere(turn: Sequence[Message]) -> int:
        restarted.append(turn[0].content)  # started on a fresh entity: this one has no log
        return 0

    async def go() -> None:
        await streams.events("a:u", "t1", -1, 0.0, history, ("a", "1"), elsewhere)

    with pytest.raises(Passivated, match="ask again"):
        asyncio.run(go())
    assert restarted == ["hello"]


def test_a_failed_turn_started_again_runs_again_and_a_finished_one_is_joined() -> None:
    """Starting a turn whose run failed runs it again (as sending it again does): its
    log is replaced, seqs continued past the failure, and the quota is asked again. A
    running or completed run is joined, not run twice. A failure says whether another
    attempt may help."""
    streams = TurnStreams()
    history = [UserMessage(content="hello", seq=0, turn_id="t1")]
    runs: list[int] = []

    async def go() -> list[TurnEvent]:
        async def failing(emit: Any, should_stop: Any) -> Any:
            runs.append(1)
            raise TurnFailedError

        async def answering(emit: Any, should_stop: Any) -> Any:
            runs.append(2)
            emit("delta", text="hi")
            return None

        assert streams.start("t1", -1, failing, history) == 0
        first = await ended(streams, "t1")
        assert [e.type for e in first.events] == ["started", "failed"]
        assert first.events[-1].retryable is False  # bad input: another attempt won't help
        assert streams.will_run("t1", history)
        assert streams.start("t1", -1, answering, history) == 2  # after the failed 0..1
        assert not streams.will_run("t1", history)  # running: joined
        assert streams.start("t1", -1, failing, history) == 2
        log = await ended(streams, "t1")
        assert streams.start("t1", -1, failing, history) == 2  # completed: joined
        return log.events

    events = asyncio.run(go())
    assert [(e.seq, e.type) for e in events] == [(2, "started"), (3, "delta"), (4, "completed")]
    assert runs == [1, 2]


def test_a_reader_past_the_replays_numbering_still_gets_the_outcome() -> None:
    """The process running a turn died after storing its answer and before a reader saw
    the end; the reader's cursor (30, from the lost log) is past the replay's numbering
    (0..2): it gets the terminal event, numbered after its cursor, with the reply."""
    streams = TurnStreams()
    history: list[Message] = [
        UserMessage(content="hello", seq=0, turn_id="t1"),
        AssistantMessage(content="hi there", seq=1, turn_id="t1"),
    ]

    async def never(text: str) -> int:
        raise AssertionError("a stored turn is not started again")

    async def go(after: int) -> tuple[list[TurnEvent], bool]:
        return await streams.events("a:u", "t1", after, 0.0, history, ("a", "1"), never)

    events, ended = asyncio.run(go(30))
    assert ended
    assert [(e.seq, e.type) for e in events] == [(31, "completed")]
    assert events[0].reply is not None
    assert events[0].reply.text == "hi there"
    events, _ = asyncio.run(go(0))  # a cursor within the replay: the rest of it, as before
    assert [(e.seq, e.type) for e in events] == [(1, "delta"), (2, "completed")]


class TurnFailedError(InvalidMessage):
    pass


def test_replay_rebuilds_a_finished_turn_from_its_messages(sqlite_url: str) -> None:
    agent = Agent(
        "s",
        model=OfflineModel("s", rules=(Rule(r"add (?P<a>\d+) (?P<b>\d+)", "add"),)),
        tools=[add],
    )
    live, stored, reply = _run_on_a_host(agent, "add 2 3", sqlite_url)
    events = replay("t1", stored, reply)
    # the same events, but the model's answer as one delta instead of word by word
    assert [e.type for e in events] == ["started", "tool_call", "tool_result", "delta", "completed"]
    assert [e.tool_call for e in events[1:3]] == [e.tool_call for e in live[1:3]]
    assert events[2].tool_return == live[2].tool_return
    assert "".join(e.text for e in events if e.type == "delta") == reply.text
    assert events[-1].reply == live[-1].reply


# --- models ---------------------------------------------------------------------------------


def _collect(model: Model, text: str) -> list[StreamItem]:
    async def go() -> list[StreamItem]:
        history: list[Message] = [UserMessage(content=text, seq=0, turn_id="t")]
        return [item async for item in model.stream(ModelRequest("", history))]

    return asyncio.run(go())


def test_the_offline_model_streams_word_by_word_with_its_latency_spread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pauses: list[float] = []  # the model's clock: what it waits, not how long the run took
    wait = asyncio.sleep

    async def clock(delay: float, result: Any = None) -> Any:
        pauses.append(delay)
        return await wait(0, result)

    monkeypatch.setattr(asyncio, "sleep", clock)
    items = _collect(OfflineModel("w", latency_s=0.3), "one  two\nthree ")
    *deltas, response = items
    assert isinstance(response, ModelResponse)
    assert deltas == ["echo ", "#1: ", "one  ", "two\n", "three "]
    assert "".join(str(d) for d in deltas) == response.content
    # the latency, once, spread evenly over the words
    assert pauses == pytest.approx([0.3 / len(deltas)] * len(deltas))


class _CutShort(Model):
    """A model whose stream breaks after ``after`` deltas (a connection dropped mid-answer)."""

    def __init__(self, after: int) -> None:
        self.after = after

    @property
    def name(self) -> str:
        return "test:cut-short"

    async def request(self, req: ModelRequest) -> ModelResponse:
        raise ModelError("request is not used", model=self.name)

    async def stream(self, req: ModelRequest) -> AsyncGenerator[StreamItem, None]:
        for i in range(self.after):
            yield f"part{i} "
        raise ModelError("connection reset mid-stream", model=self.name)


def test_a_chain_falls_through_only_before_the_first_delta() -> None:
    before = _collect(FallbackModel(_CutShort(0), OfflineModel("b")), "hi")
    assert isinstance(before[0], FallThrough)
    assert before[0].model == "test:cut-short"
    assert "".join(x for x in before if isinstance(x, str)) == "echo #1: hi"  # nothing of the first
    with pytest.raises(ModelError, match="connection reset mid-stream"):
        _collect(FallbackModel(_CutShort(2), OfflineModel("b")), "hi")  # never a second answer
    with pytest.raises(AllModelsFailed):
        _collect(FallbackModel(_CutShort(0), _CutShort(0)), "hi")


# --- a host running streamed turns (in-process, real SQLite) -------------------------------


def _host(agent: Agent, url: str) -> HostActor:
    table = ShardTable.build(1, shards=16)
    return HostActor("ns", table.hosts[0], table, App([agent]), Config.from_mapping({"store": url}))


async def _events(
    host: HostActor, v: int, turn_id: str, after: int, wait_s: float
) -> tuple[list[TurnEvent], bool]:
    return events_of_wire(await host.events(v, CID, turn_id, after, wait_s))


def _run_on_a_host(agent: Agent, text: str, url: str) -> tuple[list[TurnEvent], list[Message], Any]:
    """One streamed turn on an in-process host: every event a reader sees, what is
    stored, and the reply."""
    host = _host(agent, url)

    async def go() -> tuple[list[TurnEvent], list[Message], Any]:
        try:
            v = host.table.version
            await host.start_turn(v, CID, request_wire(TurnRequest("t1", text)))
            events: list[TurnEvent] = []
            after = -1
            while not events or not events[-1].terminal:
                batch, _ = await _events(host, v, "t1", after, 5.0)
                events += batch
                after = events[-1].seq if events else after
            stored = await host.services.store.load(CID)
            return events, stored, events[-1].reply
        finally:
            await host.services.store.close()

    return asyncio.run(go())


def test_a_streamed_turn_runs_on_the_host_and_its_deltas_join_to_the_stored_reply(
    sqlite_url: str,
) -> None:
    agent = Agent(
        "s",
        model=OfflineModel("s", latency_s=0.1, rules=(Rule(r"add (?P<a>\d+) (?P<b>\d+)", "add"),)),
        tools=[add],
    )
    events, stored, reply = _run_on_a_host(agent, "add 2 3", sqlite_url)
    assert [e.type for e in events] == ["started", "tool_call", "tool_result"] + ["delta"] * 3 + [
        "completed"
    ]
    assert [e.seq for e in events] == list(range(len(events)))
    assert events[1].tool_call is not None
    assert events[1].tool_call.name == "add"
    assert events[2].tool_return is not None
    assert events[2].tool_return.content == "5"
    assert "".join(e.text for e in events if e.type == "delta") == reply.text == stored[-1].content
    assert [m.kind for m in stored] == ["user", "assistant", "tool", "assistant"]


def test_readers_resume_anywhere_and_a_turn_whose_log_is_gone_is_replayed_or_restarted(
    sqlite_url: str,
) -> None:
    agent = Agent("s", model=OfflineModel("s", latency_s=0.05))
    host = _host(agent, sqlite_url)

    async def go() -> dict[str, Any]:
        v = host.table.version
        try:
            await host.start_turn(v, CID, request_wire(TurnRequest("t1", "one two three")))
            first = []
            after = -1
            while not first or not first[-1].terminal:
                first += (await _events(host, v, "t1", after, 5.0))[0]
                after = first[-1].seq
            # every resume position sees exactly the rest of what the first reader saw
            resumed = {n: await _events(host, v, "t1", n, 5.0) for n in range(-1, len(first))}
            # the log is gone (passivated): a finished turn is replayed from the store,
            # also when a reader streams the same turn id again (the model is not asked)
            await host.passivate(v, CID)
            replayed, ended = await _events(host, v, "t1", -1, 5.0)
            assert ended
            await host.passivate(v, CID)
            asked = agent.model.requests  # type: ignore[attr-defined]
            assert (
                await host.start_turn(v, CID, request_wire(TurnRequest("t1", "one two three"))) == 0
            )
            again_events, _ = await _events(host, v, "t1", -1, 5.0)
            assert again_events == replayed
            assert agent.model.requests == asked  # type: ignore[attr-defined]
            # a turn whose process died after storing the user message: started again
            await host.passivate(v, CID)
            await host._open()
            epoch = await host.services.store.acquire(CID)
            await host.services.store.append(
                CID, UserMessage(content="four five", seq=2, turn_id="t2"), epoch=epoch
            )
            again: list[TurnEvent] = []
            after = 3  # the reader had seen up to seq 3 before the crash
            while not again or not again[-1].terminal:
                again += (await _events(host, v, "t2", after, 5.0))[0]
                after = again[-1].seq
            with pytest.raises(UnknownTurn, match="has no turn 'nope'"):
                await _events(host, v, "nope", -1, 1.0)
            stored = await host.services.store.load(CID)
            return {
                "first": first,
                "resumed": resumed,
                "replayed": replayed,
                "again": again,
                "stored": stored,
            }
        finally:
            await host.services.store.close()

    got = asyncio.run(go())
    first = got["first"]
    for n, (events, ended) in got["resumed"].items():
        assert events == first[n + 1 :], n
        assert ended, n  # a reader past the last event is told the turn ended
    replayed = got["replayed"]
    assert [e.type for e in replayed] == ["started", "delta", "completed"]
    assert replayed[1].text == first[-1].reply.text
    again = got["again"]
    assert again[0].type == "restarted"
    assert again[0].seq == 4  # it goes on from the reader's cursor
    assert again[-1].type == "completed"
    assert "".join(e.text for e in again if e.type == "delta") == "echo #2: four five"
    assert [m.turn_id for m in got["stored"]].count("t2") == 2  # stored once: user + reply


def test_a_model_failing_after_its_first_token_ends_the_turn_incomplete_and_stored_as_such(
    sqlite_url: str,
) -> None:
    agent = Agent("s", model=FallbackModel(_CutShort(2), OfflineModel("backup")))
    host = _host(agent, sqlite_url)

    async def go() -> tuple[Any, ...]:
        v = host.table.version
        try:
            await host.start_turn(v, CID, request_wire(TurnRequest("t1", "hello")))
            events = []
            after = -1
            while not events or not events[-1].terminal:
                events += (await _events(host, v, "t1", after, 5.0))[0]
                after = events[-1].seq
            stored = await host.services.store.load(CID)
            with pytest.raises(TurnIncomplete, match="failed mid-answer") as again:
                await host.send(
                    v, CID, request_wire(TurnRequest("t1", "hello"))
                )  # a re-send: the same outcome
            await host.passivate(v, CID)
            replayed, _ = await _events(host, v, "t1", -1, 5.0)
            return events, stored, again.value, replayed
        finally:
            await host.services.store.close()

    events, stored, again, replayed = asyncio.run(go())
    assert [e.type for e in events] == ["started", "delta", "delta", "incomplete"]
    final = events[-1]
    assert "the model failed mid-answer" in final.text
    assert "connection reset mid-stream" in final.text
    assert final.reply is not None
    assert final.reply.text == "part0 part1 "  # what was shown, and nothing of the backup
    assert [m.kind for m in stored] == ["user", "assistant"]
    assert stored[-1].content == "part0 part1 "
    assert stored[-1].incomplete.startswith("the model failed mid-answer (")  # read back
    assert again.reply.text == "part0 part1 "
    assert [e.type for e in replayed] == ["started", "delta", "incomplete"]


def test_cancel_stops_a_turn_at_the_next_delta_and_stores_what_was_shown(
    sqlite_url: str,
) -> None:
    agent = Agent("s", model=OfflineModel("slow", latency_s=2.0))
    host = _host(agent, sqlite_url)
    words = " ".join(f"w{i}" for i in range(40))

    async def go() -> tuple[Any, ...]:
        v = host.table.version
        try:
            await host.start_turn(v, CID, request_wire(TurnRequest("t1", words)))
            seen: list[TurnEvent] = []
            while sum(e.type == "delta" for e in seen) < 3:
                seen += (await _events(host, v, "t1", seen[-1].seq if seen else -1, 5.0))[0]
            assert await host.cancel(v, CID, "t1")
            events = seen
            while not events[-1].terminal:
                events += (await _events(host, v, "t1", events[-1].seq, 5.0))[0]
            assert not await host.cancel(v, CID, "t1")  # ended: nothing to cancel
            return events, await host.services.store.load(CID)
        finally:
            await host.services.store.close()

    events, stored = asyncio.run(go())
    assert events[-1].type == "incomplete"
    assert events[-1].text == "cancelled"
    shown = "".join(e.text for e in events if e.type == "delta")
    assert 3 <= len(shown.split()) < 42  # stopped before the 2 s answer's 42 words ended
    assert stored[-1].content == shown
    assert stored[-1].incomplete == "cancelled"


def test_bad_turn_ids_and_cursors_are_refused_naming_them() -> None:
    from overstory import UsageError
    from overstory.runtime.client import _cursor, _turn_id

    assert (_turn_id("t1"), _cursor(-1), _cursor(7)) == ("t1", -1, 7)
    for bad in ("", None, 3):
        with pytest.raises(UsageError, match="turn_id must be a non-empty string"):
            _turn_id(bad)
    for bad_cursor in (-2, True, "3", 1.5):
        with pytest.raises(UsageError, match="after must be an int >= -1"):
            _cursor(bad_cursor)


def test_a_reader_holding_a_batch_open_is_not_woken_by_each_event() -> None:
    """Under load a stream's pieces come every few milliseconds: its readers sleep out
    the window (woken only by the first delta or the end), not once per piece."""

    async def go() -> None:
        log = TurnLog("t")
        log.emit("started")
        log.emit("delta", text="a")
        batched = asyncio.ensure_future(log.wait_after(1, 5.0, batch_s=0.2))

        async def settle() -> None:  # a woken reader runs, and waits again, meanwhile
            for _ in range(5):
                await asyncio.sleep(0)

        await settle()
        for i in range(50):
            log.emit("delta", text=str(i))
            await settle()
            # Nothing waits on "any event" any more: only on what ends the window.
            assert not log._changed._waiters  # type: ignore[attr-defined]
            assert len(log._urgent._waiters) == 1  # type: ignore[attr-defined]
        assert not batched.done()
        assert len(await batched) == 50

    asyncio.run(go())


def test_a_batch_window_never_holds_back_the_first_delta_or_the_end() -> None:
    async def go() -> None:
        log = TurnLog("t")
        log.emit("started")
        # Before any text, news waits for the rest of the window: started and the tool
        # events travel together ...
        early = asyncio.ensure_future(log.wait_after(-1, 5.0, batch_s=0.2))
        await asyncio.sleep(0.01)
        assert not early.done()
        log.emit("tool_call")
        await asyncio.sleep(0.01)
        assert not early.done()
        # ... until the first delta: it goes at once, however long the window.
        log.emit("delta", text="a")
        first = await asyncio.wait_for(early, 0.1)
        assert [e.type for e in first] == ["started", "tool_call", "delta"]

        batched = asyncio.ensure_future(log.wait_after(2, 5.0, batch_s=0.2))
        await asyncio.sleep(0)
        log.emit("delta", text="b")
        await asyncio.sleep(0.01)
        assert not batched.done()  # after it: held for what comes within the window
        log.emit("delta", text="c")
        assert [e.text for e in await batched] == ["b", "c"]

        # The turn's end closes the window at once.
        ending = asyncio.ensure_future(log.wait_after(4, 5.0, batch_s=10.0))
        await asyncio.sleep(0)
        log.emit("delta", text="d")
        log.emit("completed")
        assert [e.type for e in await asyncio.wait_for(ending, 1.0)] == ["delta", "completed"]

        # Without a window every event is its own answer.
        plain = TurnLog("p")
        plain.emit("started")
        plain.emit("delta", text="x")
        after = asyncio.ensure_future(plain.wait_after(1, 5.0))
        await asyncio.sleep(0)
        plain.emit("delta", text="y")
        assert [e.text for e in await asyncio.wait_for(after, 1.0)] == ["y"]

    asyncio.run(go())
