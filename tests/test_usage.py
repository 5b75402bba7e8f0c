"""Usage and cost: the pure count, prices, the store, the command, and a real tree whose
sums match its stored messages."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import kill_namespace

import overstory
from overstory import Agent, ConfigError, OfflineModel, Runtime
from overstory.access import create_record
from overstory.cli.demo import add
from overstory.conversation.turn import _record_cost
from overstory.messages import AssistantMessage, Message, ToolCall, ToolReturn, Usage, UserMessage
from overstory.providers.offline import Rule
from overstory.store import open_store
from overstory.usage import cost_of, price_for, summarize, usage, validate_prices

PRICES = {
    "gpt-4.1-mini": {"input": 0.4, "output": 1.6},
    "anthropic:claude-sonnet-4-5": {"input": 3.0, "output": 15.0},
    "offline:q": {"input": 1.0, "output": 2.0},
}


def _turn(
    model: str, seq: int, tokens: tuple[int, int], at: float, tools: int = 0
) -> list[Message]:
    calls = tuple(ToolCall(f"c{i}", "add", {"a": 1, "b": 2}) for i in range(tools))
    out: list[Message] = [UserMessage(content="q", seq=seq, turn_id=f"t{seq}", created_at=at)]
    out.append(
        AssistantMessage(
            content="a",
            tool_calls=calls,
            usage=Usage(*tokens),
            model=model,
            seq=seq + 1,
            turn_id=f"t{seq}",
            created_at=at,
        )
    )
    out += [
        ToolReturn(
            tool_call_id=c.id,
            tool_name="add",
            content="3",
            seq=seq + 2,
            turn_id=f"t{seq}",
            created_at=at,
        )
        for c in calls
    ]
    return out


def test_prices_match_dated_and_prefixed_names_and_are_validated() -> None:
    assert price_for("gpt-4.1-mini-2025-04-14", PRICES) == PRICES["gpt-4.1-mini"]
    assert price_for("claude-sonnet-4-5-20250929", PRICES) == PRICES["anthropic:claude-sonnet-4-5"]
    assert price_for("offline:q", PRICES) == PRICES["offline:q"]
    assert price_for("llama-3", PRICES) is None
    assert cost_of("gpt-4.1-mini", 1_000_000, 500_000, PRICES) == pytest.approx(0.4 + 0.8)
    for bad, problem in (
        ({"m": {"input": 1}}, "exactly 'input' and 'output'"),
        ({"m": {"input": -1, "output": 1}}, ">= 0"),
        ({"m": 3}, "needs"),
        ([1], "a table"),
    ):
        with pytest.raises(ConfigError, match=problem):
            validate_prices(bad)
    with pytest.raises(ConfigError, match="prices"):
        overstory.Config.from_mapping({"usage": {"prices": {"m": {"input": "cheap", "output": 1}}}})


def test_summarize_counts_turns_tools_tokens_and_cost_per_model_and_user() -> None:
    alice = _turn("gpt-4.1-mini-2025-04-14", 0, (1000, 500), 100.0, tools=2) + _turn(
        "llama-3", 3, (10, 20), 200.0
    )
    bob = _turn("claude-sonnet-4-5-20250929", 0, (2000, 100), 300.0)
    counted = summarize([("alice", alice), ("bob", bob)], PRICES)
    assert (counted["turns"], counted["tool_calls"]) == (3, 2)
    assert (counted["input_tokens"], counted["output_tokens"]) == (3010, 620)
    expected = (1000 * 0.4 + 500 * 1.6 + 2000 * 3.0 + 100 * 15.0) / 1e6
    assert counted["cost_usd"] == pytest.approx(expected)
    assert counted["unpriced"] == 30
    assert counted["models"]["llama-3"]["priced"] is False
    assert counted["users"]["bob"]["cost_usd"] == pytest.approx((2000 * 3.0 + 100 * 15.0) / 1e6)
    later = summarize([("alice", alice), ("bob", bob)], PRICES, since=150.0)
    assert (later["turns"], later["input_tokens"]) == (2, 2010)


def test_the_store_is_counted_per_user_with_their_http_conversations(
    sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def body() -> None:
        store = open_store(sqlite_url)
        await store.open()
        record = await create_record(store, "alice", "helper", {})
        assert record is not None
        for cid, turn in (
            ("helper:alice", _turn("gpt-4.1-mini", 0, (100, 10), 1.0)),
            (f"helper:{record.id}", _turn("gpt-4.1-mini", 0, (200, 20), 1.0, tools=1)),
            ("helper:bob", _turn("gpt-4.1-mini", 0, (400, 40), 1.0)),
        ):
            for m in turn:
                await store.append(cid, m)
        mine = await usage(store, PRICES, user="alice")
        everyone = await usage(store, PRICES)
        await store.close()
        assert (mine["turns"], mine["tool_calls"], mine["input_tokens"]) == (2, 1, 300)
        assert set(mine["users"]) == {"alice"}
        assert (everyone["turns"], everyone["input_tokens"]) == (3, 700)

    asyncio.run(body())
    from overstory.cli.main import main

    config = tmp_path / "overstory.toml"
    config.write_text(
        f'store = "{sqlite_url}"\n[usage.prices]\n"gpt-4.1-mini" = {{ input = 0.4, output = 1.6 }}\n'
    )
    assert main(["usage", "--user", "alice", "--json", "--config", str(config)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["cost_usd"] == pytest.approx((300 * 0.4 + 30 * 1.6) / 1e6)
    assert main(["usage", "--config", str(config)]) == 0
    assert "3 turn(s)" in capsys.readouterr().out


def test_a_turns_cost_is_an_attribute_of_its_span() -> None:
    from opentelemetry.sdk.trace import TracerProvider

    span = TracerProvider().get_tracer("t").start_span("invoke_agent")
    _record_cost(span, _turn("gpt-4.1-mini", 0, (1_000_000, 0), 1.0), PRICES)
    span.end()
    assert span.attributes is not None
    assert span.attributes["overstory.cost_usd"] == pytest.approx(0.4)


@pytest.fixture
def rt(ray_cluster: str, namespace: str, sqlite_url: str) -> Iterator[Runtime]:
    rules = [Rule(r"what is (?P<a>-?\d+) \+ (?P<b>-?\d+)", "add")]
    agent = Agent("q", model=OfflineModel("q", rules=rules), tools=[add])
    runtime = overstory.connect(
        agent,
        store=sqlite_url,
        namespace=namespace,
        usage={"prices": {"offline:q": {"input": 1, "output": 2}}},
    )
    yield runtime
    runtime.close()
    kill_namespace(namespace)


@pytest.mark.ray
def test_a_trees_usage_sums_match_its_stored_messages(rt: Runtime) -> None:
    for user in ("u1", "u2"):
        conv = rt.conversation(user)
        conv.send("hello")
        conv.send("what is 2 + 3?")
    extra = rt.new_conversation("u1", agent="q")
    extra.send("what is 4 + 4?")
    stored = [
        m
        for m in rt.conversation("u1").history() + extra.history()
        if isinstance(m, AssistantMessage)
    ]
    counted = rt.usage("u1")
    assert counted["turns"] == 3
    assert counted["tool_calls"] == 2
    assert counted["input_tokens"] == sum(m.usage.input_tokens for m in stored)
    assert counted["output_tokens"] == sum(m.usage.output_tokens for m in stored)
    assert counted["cost_usd"] == pytest.approx(
        sum(m.usage.input_tokens * 1 + m.usage.output_tokens * 2 for m in stored) / 1e6
    )
    assert rt.usage()["turns"] == 5
