"""Per-turn model choice and model settings (no Ray): a turn names one of the agent's
models or the agent's route chooses; temperature, max output tokens, stop sequences and
seed reach the vendors' SDKs over real HTTP to the loopback servers, shape the offline
model's answer, and cap what a quota reserves for an answer."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from overstory import Agent, ConfigError, QuotaExceeded, UsageError
from overstory.context import RunContext
from overstory.conversation.turn import run_turn
from overstory.exceptions import TurnFailed
from overstory.messages import AssistantMessage, Reply
from overstory.providers import Endpoint, ModelSettings, Secret
from overstory.providers.pool import vendor_model
from overstory.quota import Quota, QuotaBook
from overstory.store import open_store
from overstory.testing import AnthropicServer, OpenAIServer


def turns(url: str, agent: Agent, *sends: tuple[str, dict[str, Any]]) -> tuple[list[Any], int]:
    """Run each ``(text, options)`` as a new turn of conversation 'c'; replies or errors,
    and how many messages were stored."""

    async def go() -> tuple[list[Any], int]:
        store = open_store(url, data_keys=None)
        await store.open()
        try:
            history = await store.load("c")
            out: list[Any] = []
            for i, (text, options) in enumerate(sends):
                try:
                    out.append(await run_turn(agent, store, "c", history, f"t{i}", text, **options))
                except (TurnFailed, UsageError) as exc:
                    out.append(exc)
            return out, await store.count("c")
        finally:
            await store.close()

    return asyncio.run(go())


def models_of(reply: Reply) -> list[str]:
    return [m.model for m in reply.messages if isinstance(m, AssistantMessage)]


def test_model_settings_are_validated_by_name() -> None:
    assert ModelSettings.of({"temperature": 0.2}).temperature == 0.2
    with pytest.raises(ConfigError, match=r"unknown model setting.*'top_k'"):
        ModelSettings.of({"top_k": 3})
    with pytest.raises(ConfigError, match="temperature"):
        ModelSettings(temperature=3)
    with pytest.raises(ConfigError, match="stop"):
        ModelSettings(stop="END")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_output_tokens"):
        ModelSettings(max_output_tokens=0)
    merged = ModelSettings(temperature=0.1).over(ModelSettings(temperature=1.0, seed=7))
    assert (merged.temperature, merged.seed) == (0.1, 7)
    with pytest.raises(ConfigError, match="not 'default'"):
        Agent("a", models={"default": "offline:x"})


def test_a_turn_runs_on_the_model_it_names_and_an_unknown_name_stores_nothing(
    sqlite_url: str,
) -> None:
    agent = Agent("a", model="offline:main", models={"fast": "offline:fast"})
    (fast, main, unknown), stored = turns(
        sqlite_url, agent, ("hi", {"model": "fast"}), ("hi", {}), ("hi", {"model": "huge"})
    )
    assert models_of(fast) == ["offline:fast"]
    assert models_of(main) == ["offline:main"]
    assert isinstance(unknown, UsageError)
    assert "allows: default, fast" in str(unknown)
    assert stored == 4  # the refused turn stored nothing


def test_the_route_chooses_each_turns_model_and_a_bad_route_fails_the_turn(
    sqlite_url: str,
) -> None:
    seen: list[str] = []

    async def by_length(ctx: RunContext, text: str) -> str | None:
        seen.append(ctx.turn_id)
        return "deep" if len(text) > 20 else None

    agent = Agent("a", model="offline:quick", models={"deep": "offline:deep"}, route=by_length)
    (short, long, named), _ = turns(
        sqlite_url,
        agent,
        ("hello", {}),
        ("please think about this long question", {}),
        ("please think about this long question", {"model": "default"}),
    )
    assert models_of(short) == ["offline:quick"]
    assert models_of(long) == ["offline:deep"]
    assert models_of(named) == ["offline:quick"]  # a caller's choice wins over the route
    assert seen == ["t0", "t1"]

    bad = Agent("b", models={"deep": "offline:deep"}, route=lambda ctx, text: "nope")
    (failed,), stored = turns(sqlite_url.replace("history", "bad"), bad, ("hi", {}))
    assert isinstance(failed, TurnFailed)
    assert "route failed" in str(failed)
    assert "nope" in str(failed)
    assert stored == 1  # the user's message is kept, as for any failed turn


def test_settings_shape_the_offline_models_answer(sqlite_url: str) -> None:
    agent = Agent("a", model_settings={"stop": ["STOP"]})
    (stopped, capped), _ = turns(
        sqlite_url,
        agent,
        ("say this STOP and not this", {}),
        ("x" * 400, {"settings": {"max_output_tokens": 10}}),
    )
    assert stopped.text == "echo #1: say this "
    assert len(capped.text) == 40
    assert capped.usage.output_tokens <= 10


@pytest.mark.parametrize("server_type", [OpenAIServer, AnthropicServer])
def test_settings_reach_the_vendor_over_http(sqlite_url: str, server_type: Any) -> None:
    with server_type() as server:
        endpoint = Endpoint(
            server.vendor, "m", server.base_url, key=Secret("sk-test-0123456789"), max_tokens=500
        )
        agent = Agent(
            "a", model=vendor_model(endpoint), model_settings={"temperature": 0.5, "stop": ["END"]}
        )
        settings = {"max_output_tokens": 6, "temperature": 0.25}
        (default, turn), _ = turns(
            sqlite_url, agent, ("before END after", {}), ("y" * 200, {"settings": settings})
        )
        first, second = (r.body for r in server.requests)
    cap = "max_tokens"
    stop = "stop" if server.vendor == "openai" else "stop_sequences"
    assert (first["temperature"], first[stop], first[cap]) == (0.5, ["END"], 500)
    assert (second["temperature"], second[cap]) == (0.25, 6)  # the turn's, over the agent's
    assert default.text == "echo: before "
    assert len(turn.text) == 24  # cut at 6 tokens by the vendor
    assert turn.usage.output_tokens <= 6


def test_seed_reaches_openai_and_is_refused_by_name_for_anthropic(sqlite_url: str) -> None:
    with OpenAIServer() as openai, AnthropicServer() as anthropic:
        key = Secret("sk-test-0123456789")
        oa = Agent("o", model=vendor_model(Endpoint("openai", "m", openai.base_url, key=key)))
        an = Agent("n", model=vendor_model(Endpoint("anthropic", "m", anthropic.base_url, key=key)))
        (ok,), _ = turns(sqlite_url, oa, ("hi", {"settings": {"seed": 42}}))
        (refused,), _ = turns(
            sqlite_url.replace("history", "an"), an, ("hi", {"settings": {"seed": 42}})
        )
        assert openai.requests[0].body["seed"] == 42
        assert not anthropic.requests  # refused before it was sent
    assert isinstance(ok, Reply)
    assert isinstance(refused, TurnFailed)
    assert "takes no seed" in str(refused)


def test_a_quota_reserves_the_answers_cap(tmp_path: Path) -> None:
    """The reservation is the input's estimate plus ``max_output_tokens``: a cap the
    day's remaining tokens cannot cover is refused up front, a small one admitted."""

    async def go() -> tuple[Any, Any]:
        store = open_store(f"sqlite:///{tmp_path}/q.db", data_keys=None)
        await store.open()
        book = QuotaBook(store, "ns", Quota(tokens_per_day=100), turn_timeout_s=60, output_tokens=1)
        try:
            try:
                await book.admit_turn("u", "c", "t1", "hi", [], "", 500)
                big: Any = None
            except QuotaExceeded as exc:
                big = exc
            small = await book.admit_turn("u", "c", "t2", "hi", [], "", 20)
            return big, small
        finally:
            await store.close()

    big, small = asyncio.run(go())
    assert isinstance(big, QuotaExceeded)
    assert big.limit == "tokens_per_day"
    assert small is not None
