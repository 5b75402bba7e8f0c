"""Long conversations (no Ray): what a model call sees under each context policy, the
durable summary, and recovery from a provider's context overflow — through the turn's
own code (``run_turn``) against real stores and, for the vendors, the official SDKs over
real HTTP to the loopback servers."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from overstory import Agent, ConfigError, Model, ModelRequest, ModelResponse, OfflineModel
from overstory.compaction import Compact, Summary, Trim, fit, read_summary, with_summary
from overstory.context import RunContext
from overstory.conversation.turn import run_turn
from overstory.conversation.window import Memory
from overstory.exceptions import ModelError, TurnFailed
from overstory.messages import AssistantMessage, Message, ToolCall, ToolReturn, UserMessage
from overstory.providers import Endpoint, Secret, resolve_model
from overstory.providers.pool import RemoteModel, vendor_model
from overstory.providers.windows import (
    estimate_text,
    known_window,
    learned_window,
    parse_window,
    request_tokens,
)
from overstory.store import HistoryStore, open_store
from overstory.store.crypto import DataKeys, is_sealed
from overstory.store.settings import SUMMARY
from overstory.testing import AnthropicServer, OpenAIServer, WireServer
from overstory.testing._common import _prompt_tokens

# --- pure rules ---------------------------------------------------------------------------


def _turn(seq: int, n: int, size: int = 40, tools: bool = False) -> list[Message]:
    """Turn ``t{n}`` from ``seq``: a user message, (a tool call and its return), a reply."""
    tid = f"t{n}"
    out: list[Message] = [UserMessage(content="u" * size, seq=seq, turn_id=tid)]
    if tools:
        call = ToolCall(id=f"c{n}", name="add", arguments={"a": 1, "b": 2})
        out.append(AssistantMessage(tool_calls=(call,), seq=seq + 1, turn_id=tid))
        out.append(
            ToolReturn(tool_call_id=f"c{n}", tool_name="add", content="3", seq=seq + 2, turn_id=tid)
        )
    out.append(AssistantMessage(content="a" * size, seq=seq + len(out), turn_id=tid))
    return out


def _history(turns: int, **kw: Any) -> list[Message]:
    out: list[Message] = []
    for n in range(turns):
        out += _turn(len(out), n, tools=n % 2 == 1, **kw)
    return out


def test_fit_keeps_the_newest_whole_turns_that_fit() -> None:
    history = _history(10)
    tokens = [sum(estimate_text(m.content) + 5 for m in history[i:]) for i in range(len(history))]
    room = tokens[len(history) - 9]  # exactly the last 9 messages' worth, mid-turn
    first = fit(history, room)
    assert isinstance(history[first], UserMessage)  # a window starts where a turn does
    assert sum(estimate_text(m.content) + 5 for m in history[first:]) <= room
    # it is the earliest such start: one more turn would not fit
    earlier = max(i for i in range(first) if isinstance(history[i], UserMessage))
    assert tokens[earlier] > room


def test_fit_never_separates_a_tool_call_from_its_return() -> None:
    history = _history(12)
    for room in range(0, 600, 7):
        first = fit(history, room)
        kept = history[first:]
        calls = {c.id for m in kept if isinstance(m, AssistantMessage) for c in m.tool_calls}
        returns = {m.tool_call_id for m in kept if isinstance(m, ToolReturn)}
        assert calls == returns
        assert isinstance(kept[0], UserMessage)


def test_fit_always_keeps_the_current_turn_even_over_the_room() -> None:
    before = _history(3)
    history = before + _turn(len(before), 9, size=4000)
    assert fit(history, 10) == len(before)
    assert fit(history, 10, keep_from=3) == 3  # a caller-named start is kept too


def test_the_window_table_and_errors_name_windows() -> None:
    assert known_window("gpt-4.1-mini") == 1_047_576
    assert known_window("gpt-4o-2024-08-06") == 128_000
    assert known_window("us.anthropic.claude-sonnet-4-5-v1:0") == 200_000
    assert known_window("my-own-model") is None
    assert (
        parse_window(
            "HTTP 400: This model's maximum context length is 8192 tokens. However, your "
            "messages resulted in 9000 tokens."
        )
        == 8192
    )
    assert parse_window("HTTP 400: prompt is too long: 250000 tokens > 200000 maximum") == 200000
    assert parse_window("Input is too long for requested model.") is None


def test_a_models_budget_comes_from_its_endpoint_the_table_or_its_errors() -> None:
    key = Secret("sk-x")
    table = RemoteModel(Endpoint("openai", "gpt-4o", key=key, max_tokens=2000)).budget()
    assert table is not None
    assert (table.window, table.reserve, table.prompt) == (
        128_000,
        2000,
        126_000,
    )
    own = RemoteModel(Endpoint("openai", "mine", key=key, context_window=9000)).budget()
    assert own is not None
    assert own.window == 9000
    assert RemoteModel(Endpoint("openai", "unknown-model", key=key)).budget() is None
    chain = resolve_model(["offline:a@3000", "offline:b@1000", "offline:c"])
    budget = chain.budget()
    assert budget is not None
    assert (budget.model, budget.window) == ("offline:b", 1000)
    with pytest.raises(ConfigError, match="context_window"):
        Endpoint("openai", "mine", key=key, max_tokens=4000, context_window=4000)
    with pytest.raises(ConfigError, match="context_window"):
        OfflineModel(context_window=0)


def test_agent_context_is_validated() -> None:
    assert isinstance(Agent("a").context, Trim)
    with pytest.raises(ConfigError, match="context must be"):
        Agent("a", context="compact")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="every"):
        Compact(every=0)
    with pytest.raises(ConfigError, match="max_words"):
        Compact(max_words=5)


# --- through the turn -------------------------------------------------------------------


class Recorder(Model):
    """Records every request; ``budget`` as the inner model's unless ``hide`` (a model
    whose window no table knows)."""

    def __init__(self, inner: Model, hide: bool = False) -> None:
        self.inner, self.hide = inner, hide
        self.requests: list[ModelRequest] = []
        self.refused: list[ModelRequest] = []  # context_overflow answers

    @property
    def name(self) -> str:
        return self.inner.name

    def budget(self) -> Any:
        return super().budget() if self.hide else self.inner.budget()

    async def request(self, req: ModelRequest) -> ModelResponse:
        self.requests.append(req)
        try:
            return await self.inner.request(req)
        except ModelError as exc:
            if exc.kind == "context_overflow":
                self.refused.append(req)
            raise


def run(
    url: str,
    agent: Agent,
    texts: list[str],
    cid: str = "c",
    memory: Memory | None = None,
    check: Callable[[HistoryStore], Awaitable[Any]] | None = None,
    keys: DataKeys | None = None,
) -> tuple[list[Any], list[Message], Any]:
    async def go() -> tuple[list[Any], list[Message], Any]:
        store = open_store(url, data_keys=keys)
        await store.open()
        try:
            hist = await store.load(cid)
            out: list[Any] = []
            for i, text in enumerate(texts):
                try:
                    out.append(
                        await run_turn(
                            agent, store, cid, hist, f"t{len(hist)}-{i}", text, memory=memory
                        )
                    )
                except TurnFailed as exc:
                    out.append(exc)
            checked = await check(store) if check else None
            return out, await store.load(cid), checked
        finally:
            await store.close()

    return asyncio.run(go())


WINDOW = 600  # offline tokens: characters / 4 + 3 per message


def test_trim_keeps_a_long_conversation_answering_within_the_window(sqlite_url: str) -> None:
    model = Recorder(OfflineModel("w", context_window=WINDOW))
    agent = Agent("a", model=model, instructions="Be brief.")
    texts = [f"message {i} " + "x" * 120 for i in range(60)]
    replies, stored, _ = run(sqlite_url, agent, texts)
    assert all(not isinstance(r, Exception) for r in replies), replies[-1]
    assert len(stored) == 120  # nothing stored is dropped: history() has every message
    sent = [len(r.messages) for r in model.requests]
    assert max(sent) < 20
    assert sent[-1] == sent[-10]
    for req in model.requests:
        assert request_tokens(req) <= WINDOW
        assert isinstance(req.messages[0], UserMessage)
    # the current message is always the last one sent
    assert model.requests[-1].messages[-1].content == texts[-1]


def test_without_a_window_everything_is_sent_as_before(sqlite_url: str) -> None:
    model = Recorder(OfflineModel("nowindow"))
    _replies, _stored, _ = run(sqlite_url, Agent("a", model=model), ["one", "two", "three"])
    assert [len(r.messages) for r in model.requests] == [1, 3, 5]


def test_an_overflow_from_a_model_no_table_knows_is_recovered_and_remembered(
    sqlite_url: str,
) -> None:
    inner = OfflineModel("unknown-window", context_window=WINDOW)
    model = Recorder(inner, hide=True)  # nobody knows the window until it is refused
    agent = Agent("a", model=model)
    texts = [f"message {i} " + "y" * 120 for i in range(40)]
    replies, stored, _ = run(sqlite_url, agent, texts)
    assert all(not isinstance(r, Exception) for r in replies), replies
    assert learned_window("offline:unknown-window") == WINDOW  # the error named it
    # the refused request was sent again, fitted, in the same turn: one retry only
    assert len(model.refused) == 1
    assert (
        model.requests[model.requests.index(model.refused[0]) + 1].messages[-1]
        == (model.refused[0].messages[-1])
    )
    assert len(stored) == 80


def test_a_turn_that_cannot_fit_fails_after_one_retry(sqlite_url: str) -> None:
    model = Recorder(OfflineModel("tiny", context_window=50), hide=True)
    replies, stored, _ = run(sqlite_url, Agent("a", model=model), ["z" * 400])
    assert isinstance(replies[0], TurnFailed)
    assert "maximum context length" in str(replies[0])
    assert len(model.refused) == 2
    assert len(stored) == 1


def test_compact_writes_a_durable_summary_and_sends_it(store_url: str) -> None:
    summariser = Recorder(OfflineModel("summariser"))
    model = Recorder(OfflineModel("w", context_window=WINDOW))
    agent = Agent("a", model=model, context=Compact(summariser, every=4, max_words=40))
    texts = [f"fact {i}: the code is {i * 7}. " + "x" * 100 for i in range(30)]
    replies, stored, summary = run(
        store_url, agent, texts, check=lambda store: read_summary(store, "c")
    )
    assert all(not isinstance(r, Exception) for r in replies), replies
    assert len(stored) == 60  # compaction never rewrites or deletes the history
    assert isinstance(summary, Summary)
    assert 0 < summary.upto < 60
    assert len(summary.text) <= 40 * 8 + 2  # a model that runs on is cut to the bound
    assert summariser.requests, "the named model wrote the summaries"
    # the first summary covered the turns the first trimmed call left out; later ones
    # were recomputed as more passed out of the window, each covering more
    asked = [r.messages[0].content for r in summariser.requests]
    assert "fact 0" in asked[0]
    assert len(summariser.requests) >= 2
    last = model.requests[-1]
    assert "Summary of the earlier part" in last.instructions
    assert last.messages[0].seq >= summary.upto - 2 * agent.context.every  # type: ignore[union-attr]
    assert all(request_tokens(r) <= WINDOW for r in model.requests)


def test_a_summary_is_reused_by_a_new_incarnation_and_sealed_at_rest(sqlite_url: str) -> None:
    keys = DataKeys.parse("k1:" + base64.b64encode(os.urandom(32)).decode())
    model = Recorder(OfflineModel("w", context_window=WINDOW))
    agent = Agent("a", model=model, context=Compact(every=1000))
    texts = ["secret sauce is " + "x" * 150 for _ in range(12)]

    async def raw(store: HistoryStore) -> str | None:
        return await store.get_setting(SUMMARY.key("c"))

    run(sqlite_url, agent, texts, check=raw, keys=keys)
    before = len(model.requests)
    # a new incarnation (a new Memory) reads the stored summary instead of writing one
    _, _, stored = run(sqlite_url, agent, ["one more"], memory=Memory(), check=raw, keys=keys)
    assert stored is not None
    assert "secret sauce" not in stored
    assert is_sealed(json.loads(stored)["text"])
    latest = model.requests[-1]
    assert "Summary of the earlier part" in latest.instructions
    assert len(model.requests) == before + 1  # no summariser call on the way


def test_a_processor_chooses_what_is_sent_and_is_still_fitted(sqlite_url: str) -> None:
    seen: list[int] = []

    def only_users(ctx: RunContext, messages: list[Message]) -> list[Message]:
        seen.append(len(messages))
        assert ctx.conversation_id == "c"
        return [m for m in messages if isinstance(m, UserMessage)]

    async def broken(ctx: RunContext, messages: list[Message]) -> Any:
        return "not messages"

    model = Recorder(OfflineModel("w", context_window=WINDOW))
    replies, _, _ = run(
        sqlite_url, Agent("a", model=model, context=only_users), ["x" * 150 for _ in range(20)]
    )
    assert all(not isinstance(r, Exception) for r in replies)
    assert seen == list(range(1, 40, 2))  # the processor saw the whole history each time
    assert all(isinstance(m, UserMessage) for r in model.requests for m in r.messages)
    assert all(request_tokens(r) <= WINDOW for r in model.requests)
    replies, _, _ = run(sqlite_url, Agent("a", model=model, context=broken), ["hi"], cid="d")
    assert isinstance(replies[0], TurnFailed)
    assert "context processor broken" in str(replies[0])
    assert "list of messages" in str(replies[0])


def test_with_summary_puts_the_summary_after_the_instructions() -> None:
    assert with_summary("Be kind.", None) == "Be kind."
    text = with_summary("Be kind.", Summary(12, "They like tea."))
    assert text.startswith("Be kind.\n\n")
    assert "before #12" in text
    assert text.endswith("tea.")


# --- the vendors' own overflow errors, over real HTTP ---------------------------------


@pytest.mark.parametrize("server_type", [OpenAIServer, AnthropicServer])
def test_a_vendor_overflow_is_recovered_with_the_window_its_error_names(
    sqlite_url: str, server_type: type[WireServer]
) -> None:
    with server_type(context_window=700) as server:
        endpoint = Endpoint(
            server.vendor,  # type: ignore[arg-type]
            f"model-{server.vendor}-w",
            server.base_url,
            key=Secret("sk-test-0123456789"),
            max_tokens=100,
        )
        model = Recorder(vendor_model(endpoint), hide=True)
        agent = Agent("a", model=model)
        texts = [f"turn {i} " + "q" * 200 for i in range(20)]
        replies, stored, _ = run(sqlite_url, agent, texts)
        assert all(not isinstance(r, Exception) for r in replies), replies
        assert learned_window(endpoint.name) == 700
        refused = [r for r in server.requests if _prompt_tokens(r.body) > 700]
        assert len(refused) == 1  # refused once, with its window: never again after
        assert len(stored) == 40


def test_a_vendor_overflow_error_is_a_context_overflow(sqlite_url: str) -> None:
    async def go(server: WireServer) -> ModelError:
        endpoint = Endpoint("openai", "m", server.base_url, key=Secret("sk-test-0123456789"))
        model = vendor_model(endpoint)
        big = [UserMessage(content="x" * 2000, seq=0, turn_id="t")]
        with pytest.raises(ModelError) as info:
            await model.call(ModelRequest("", big))
        return info.value

    with OpenAIServer(context_window=100) as server:
        exc = asyncio.run(go(server))
    assert exc.kind == "context_overflow"
    assert parse_window(str(exc)) == 100


def test_bedrock_names_no_window_and_the_turn_still_fits_by_halving(sqlite_url: str) -> None:
    from overstory.providers import aws_secret
    from overstory.testing import BedrockServer

    with BedrockServer(context_window=400) as server:
        endpoint = Endpoint(
            "bedrock",
            "anthropic.custom-model-v1:0",  # no table knows it
            server.base_url,
            key=aws_secret("AKIATESTWIRE0123456", "wire/Secret+Access0123456789abcdefKEY"),
            region="us-east-1",
            max_tokens=50,
        )
        model = Recorder(vendor_model(endpoint), hide=True)
        texts = [f"turn {i} " + "b" * 300 for i in range(12)]
        replies, stored, _ = run(sqlite_url, Agent("a", model=model), texts)
    assert all(not isinstance(r, Exception) for r in replies), replies
    assert len(stored) == 24
    window = learned_window(endpoint.name)
    assert window is not None
    assert window <= 400 * 2  # halved from what was sent until it fit


def test_a_streamed_turn_on_a_chain_recovers_when_every_member_overflows(
    sqlite_url: str,
) -> None:
    first = Recorder(OfflineModel("chain-a", context_window=500), hide=True)
    second = Recorder(OfflineModel("chain-b", context_window=300), hide=True)
    agent = Agent("a", model=[first, second])
    events: list[str] = []

    async def go() -> list[Any]:
        store = open_store(sqlite_url, data_keys=None)
        await store.open()
        try:
            history: list[Message] = []
            out = []
            for i in range(15):
                out.append(
                    await run_turn(
                        agent,
                        store,
                        "c",
                        history,
                        f"s{i}",
                        f"stream {i} " + "s" * 150,
                        emit=lambda type, **fields: events.append(type),
                    )
                )
            return out
        finally:
            await store.close()

    replies = asyncio.run(go())
    assert all(r.text.startswith("echo") for r in replies)
    assert learned_window("offline:chain-a") == 500
    assert learned_window("offline:chain-b") == 300
    assert "fallback" in events  # the first member's refusal fell through, visibly
    # fitted to the chain's least room from then on: the first member answers again
    assert all(request_tokens(r) <= 300 for r in first.requests[-3:])
