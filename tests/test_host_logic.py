"""The host's entity logic, run in-process without Ray: LRU order, idle sweeps, shard
moves and per-conversation supervision are plain asyncio over a real SQLite store."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from overstory import Agent
from overstory.actors.host import HostActor
from overstory.app import App, conversation_id
from overstory.config import Config
from overstory.memory import QuietTrim
from overstory.messages import TurnRequest
from overstory.providers import OfflineModel
from overstory.sharding import ShardTable, table_key
from overstory.wire import events_of_wire, request_wire


def cid(user: str) -> str:
    """The conversation id of ``user`` with the agent these hosts serve."""
    return conversation_id("logic", user)


def _host(sqlite_url: str, **settings: Any) -> HostActor:
    table = ShardTable.build(1, shards=16)
    config = Config.from_mapping({"store": sqlite_url, **settings})
    agent = Agent("logic", model=OfflineModel("offline:logic"))
    return HostActor("ns", table.hosts[0], table, App([agent]), config)


async def until(condition: Callable[[], bool], what: str, within_s: float = 10.0) -> None:
    """Wait (on the host's own loop) until ``condition()``; fail naming ``what`` after
    ``within_s`` seconds. The host signals no event when its sweeper passivates."""
    try:
        async with asyncio.timeout(within_s):
            while not condition():  # noqa: ASYNC110 - nothing to wait on but the state
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {within_s:g} s waiting for {what}") from None


def run(host: HostActor, body: Callable[[HostActor], Awaitable[Any]]) -> Any:
    async def go() -> Any:
        try:
            return await body(host)
        finally:
            if host._sweeper is not None:
                host._sweeper.cancel()
            await host.services.store.close()

    return asyncio.run(go())


def test_the_cap_evicts_the_least_recently_used_and_a_read_counts_as_use(
    sqlite_url: str,
) -> None:
    async def body(host: HostActor) -> list[str]:
        v = host.table.version
        for user in ("a", "b", "c"):
            await host.send(v, cid(user), request_wire(TurnRequest(f"t-{user}", "hello")))
        await host.history(v, cid("a"))  # a is now the most recently used
        await host.send(
            v, cid("d"), request_wire(TurnRequest("t-d", "hello"))
        )  # over the cap of 3: b goes
        return host.live()

    assert run(_host(sqlite_url, hosted={"max_live_per_host": 3}), body) == [cid(u) for u in "cad"]


def test_the_sweeper_passivates_idle_conversations_and_keeps_busy_ones(sqlite_url: str) -> None:
    async def body(host: HostActor) -> tuple[list[str], list[str], int]:
        v = host.table.version
        await host.send(v, cid("idle"), request_wire(TurnRequest("t1", "hello")))
        busy = asyncio.create_task(
            host.send(v, cid("busy"), request_wire(TurnRequest("t2", "!sleep 1.0 still talking")))
        )
        await until(lambda: cid("idle") not in host.live(), "the idle one to be passivated")
        during = host.live()
        assert not busy.done()  # still in its turn when the sweeper passed
        await busy
        await until(lambda: not host.live(), "the other one to be passivated once idle")
        return during, host.live(), host.counters["passivations"]

    host = _host(sqlite_url, conversations={"idle_timeout_s": 0.2})
    host._quiet = QuietTrim(quiet_s=0.1)
    during, after, passivated = run(host, body)
    assert during == [cid("busy")]  # the idle one went; the one in a turn stayed
    assert after == []
    assert passivated == 2
    assert host._quiet.trims >= 1  # the burst's memory was given back once it was over


def test_a_grown_table_makes_the_host_shed_what_moved(sqlite_url: str) -> None:
    async def body(host: HostActor) -> tuple[list[str], list[str], Any]:
        v = host.table.version
        users = [cid(f"u{i}") for i in range(12)]
        for user in users:
            await host.send(v, user, request_wire(TurnRequest("t", "hello")))
        bigger = host.table.resized(2)
        await host.services.store.put_setting(table_key("ns"), bigger.to_json(), expected=None)
        version = await host.adopt_table()
        kept = host.live()
        try:
            await host.send(v, users[0], request_wire(TurnRequest("t2", "old route")))
        except Exception as exc:  # the old version is refused, with the new table
            return kept, [u for u in users if bigger.owns(host.name, u)], (version, exc)
        raise AssertionError("an old route was served")

    kept, owned, (version, refused) = run(_host(sqlite_url), body)
    assert kept == owned
    assert 0 < len(kept) < 12
    assert version == 2
    assert type(refused).__name__ == "StaleShardTable"
    assert refused.version == 2


def test_the_sweep_drops_a_finished_turns_events_after_the_window_without_a_new_turn(
    sqlite_url: str,
) -> None:
    """A conversation that streamed a turn and then fell silent (but is not yet idle long
    enough to be passivated) gives its turn's events back after ``streams.window_s``:
    the sweep prunes them, not the conversation's next turn."""

    async def body(host: HostActor) -> tuple[int, int]:
        v = host.table.version
        events, ended = events_of_wire(
            await host.start_and_read(v, cid("quiet"), request_wire(TurnRequest("t1", "hello")))
        )
        while not ended:
            more, ended = events_of_wire(await host.events(v, cid("quiet"), "t1", events[-1].seq))
            events += more
        (entity,) = host._entities.values()
        assert entity.streams is not None
        kept = len(entity.streams.logs)
        await until(lambda: len(entity.streams.logs) == 0, "the sweep to drop the turn's log")
        return kept, len(host.live())

    kept, live = run(
        _host(sqlite_url, conversations={"idle_timeout_s": 60}, streams={"window_s": 0.2}),
        body,
    )
    assert kept == 1
    assert live == 1  # still live: its events went, the conversation stayed
