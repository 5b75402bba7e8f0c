"""The response cache (no Ray): whole turns through the official OpenAI SDK to the
loopback server, which counts what actually reached the provider."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from pathlib import Path
from typing import Any

import pytest

from overstory import Agent
from overstory.cache import sweep
from overstory.conversation.turn import run_turn
from overstory.messages import AssistantMessage, Message, Reply
from overstory.providers import Endpoint, Secret
from overstory.providers.pool import vendor_model
from overstory.store import HistoryStore, open_store
from overstory.store.crypto import DataKeys
from overstory.testing import DEFAULT_RULES, OpenAIServer


def lookup(city: str) -> str:
    """Look a city up."""
    return f"{city}: sunny"


RULES = (*DEFAULT_RULES, (r"weather in (?P<city>\w+)", "lookup"))


@pytest.fixture(scope="module")
def server() -> Any:
    with OpenAIServer(rules=RULES, piece_chars=2) as srv:
        yield srv


def agent(server: OpenAIServer, **options: Any) -> Agent:
    model = vendor_model(Endpoint("openai", "gpt-test", server.base_url, key=Secret("sk-test")))
    return Agent(options.pop("name", "cached"), model=model, tools=[lookup], **options)


class Turns:
    """Turns on one store, each conversation's history kept, as a host keeps them."""

    def __init__(self, store: HistoryStore) -> None:
        self.store = store
        self.histories: dict[str, list[Message]] = {}

    async def turn(
        self, a: Agent, owner: str, cid: str, text: str, *, streamed: bool = False
    ) -> tuple[Reply, list[str]]:
        history = self.histories.setdefault(cid, [])
        deltas: list[str] = []

        def emit(kind: str, /, **fields: Any) -> None:
            if kind == "delta":
                deltas.append(fields["text"])

        turn_id = f"t{len(history)}"
        options: dict[str, Any] = {"emit": emit} if streamed else {}
        reply = await run_turn(a, self.store, cid, history, turn_id, text, owner=owner, **options)
        return reply, deltas


def run(url: str, body: Any, keys: DataKeys | None = None) -> Any:
    async def go() -> Any:
        store = open_store(url, data_keys=keys)
        await store.open()
        try:
            return await body(Turns(store))
        finally:
            await store.close()

    return asyncio.run(go())


def test_one_owner_hits_another_owner_never_and_what_changes_the_answer_misses(
    server: OpenAIServer, sqlite_url: str
) -> None:
    server.reset()
    cached = agent(server, cache_ttl_s=60)

    async def body(t: Turns) -> list[Any]:
        first, _ = await t.turn(cached, "alice", "cached:conv_a1", "hello there")
        n1 = len(server.requests)
        again, _ = await t.turn(cached, "alice", "cached:conv_a2", "hello there")  # alice again
        n2 = len(server.requests)
        bobs, _ = await t.turn(cached, "bob", "cached:conv_b1", "hello there")  # same prompt
        n3 = len(server.requests)
        v2 = agent(server, cache_ttl_s=60, version="2")
        other, _ = await t.turn(v2, "alice", "cached:conv_a3", "hello there")
        n4 = len(server.requests)
        told = agent(server, cache_ttl_s=60, instructions="be brief")
        await t.turn(told, "alice", "cached:conv_a4", "hello there")
        n5 = len(server.requests)
        return [first, again, bobs, other, (n1, n2, n3, n4, n5)]

    first, again, bobs, other, counts = run(sqlite_url, body)
    assert counts == (1, 1, 2, 3, 4)  # only alice's repeat was answered from the cache
    assert again.text == first.text == bobs.text == other.text == "echo: hello there"
    assert first.usage.input_tokens > 0
    assert (again.usage.input_tokens, again.usage.output_tokens) == (0, 0)  # nothing spent


def test_tool_calls_are_cached_only_when_asked_and_entries_expire(
    server: OpenAIServer, sqlite_url: str
) -> None:
    server.reset()

    async def body(t: Turns) -> list[int]:
        plain = agent(server, cache_ttl_s=60)
        await t.turn(plain, "carol", "cached:c1", "weather in Oslo")
        await t.turn(plain, "carol", "cached:c2", "weather in Oslo")
        n_plain = len(server.requests)  # the tool-calling answer is asked both times
        tools = agent(server, name="tooled", cache_ttl_s=0.3, cache_tool_calls=True)
        await t.turn(tools, "carol", "tooled:c3", "weather in Oslo")
        n1 = len(server.requests)
        await t.turn(tools, "carol", "tooled:c4", "weather in Oslo")
        n2 = len(server.requests)  # both of its calls answered from the cache
        await asyncio.sleep(0.4)
        await t.turn(tools, "carol", "tooled:c5", "weather in Oslo")
        n3 = len(server.requests)
        swept = await sweep(t.store, now=time.time() + 1)
        return [n_plain, n1, n2, n3, swept]

    n_plain, n1, n2, n3, swept = run(sqlite_url, body)
    assert n_plain == 3  # c1: the tool call and the answer; c2: the tool call again
    assert n2 == n1  # cached, tool call included
    assert n3 == n2 + 2  # expired: asked again
    assert swept == 2  # the tooled agent's two entries; the 60 s one stays


def test_a_streamed_hit_reads_like_a_stream_and_cached_text_is_sealed_at_rest(
    server: OpenAIServer, sqlite_url: str
) -> None:
    server.reset()
    keys = DataKeys.parse(f"k:{base64.b64encode(os.urandom(32)).decode()}")
    cached = agent(server, cache_ttl_s=60)

    async def body(t: Turns) -> tuple[Reply, list[str], Reply, list[str]]:
        first, d1 = await t.turn(cached, "dora", "cached:d1", "a rare canary phrase", streamed=True)
        hit, d2 = await t.turn(cached, "dora", "cached:d2", "a rare canary phrase", streamed=True)
        return first, d1, hit, d2

    first, d1, hit, d2 = run(sqlite_url, body, keys)
    assert len(server.requests) == 1
    assert "".join(d1) == first.text == "".join(d2) == hit.text
    raw = Path(sqlite_url.removeprefix("sqlite:///")).read_bytes()
    wal = Path(sqlite_url.removeprefix("sqlite:///") + "-wal")
    assert b"canary phrase" not in raw + (wal.read_bytes() if wal.exists() else b"")


def test_with_redaction_the_cache_holds_placeholders_and_each_conversation_its_own_values(
    server: OpenAIServer, sqlite_url: str
) -> None:
    server.reset()
    both = agent(server, cache_ttl_s=60, redact_pii=True)

    async def body(t: Turns) -> tuple[Reply, Reply]:
        one, _ = await t.turn(both, "erin", "cached:e1", "mail ann@example.com please")
        two, _ = await t.turn(both, "erin", "cached:e2", "mail bob@example.org please")
        return one, two

    one, two = run(sqlite_url, body)
    assert len(server.requests) == 1  # the same redacted call: a hit for the second
    assert one.text == "echo: mail ann@example.com please"
    assert two.text == "echo: mail bob@example.org please"
    stored = [m for m in one.messages if isinstance(m, AssistantMessage)]
    assert stored[0].content == one.text


def test_an_entry_sealed_with_a_key_since_rotated_out_is_a_miss_not_an_error(
    server: OpenAIServer, sqlite_url: str
) -> None:
    from overstory.store.crypto import reseal

    server.reset()
    k1 = f"k1:{base64.b64encode(os.urandom(32)).decode()}"
    k2 = f"k2:{base64.b64encode(os.urandom(32)).decode()}"

    async def first(t: Turns) -> None:  # an agent per run: its SDK client is per loop
        await t.turn(agent(server, cache_ttl_s=60), "fay", "cached:f1", "remember this")

    async def rotate(t: Turns) -> None:
        await reseal(t.store)

    async def again(t: Turns) -> tuple[Reply, int]:
        reply, _ = await t.turn(agent(server, cache_ttl_s=60), "fay", "cached:f2", "remember this")
        return reply, await sweep(t.store, now=0.0)

    run(sqlite_url, first, DataKeys.parse(k1))
    run(sqlite_url, rotate, DataKeys.parse(f"{k2},{k1}"))
    reply, swept = run(sqlite_url, again, DataKeys.parse(k2))
    assert reply.text == "echo: remember this"
    assert len(server.requests) == 2  # the old entry could not be read: asked again
    assert swept == 0  # the entry written again under k2 is fresh
