"""The scripted offline model: deterministic, calls tools, fails and stalls on request."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from overstory import (
    AllModelsFailed,
    ConfigError,
    FallbackModel,
    Message,
    ModelError,
    ModelRequest,
    ModelResponse,
    OfflineModel,
    Rule,
    ToolReturn,
    UserMessage,
)
from overstory.providers import resolve_model


def ask(model: OfflineModel | FallbackModel, *messages: Message) -> ModelResponse:
    return asyncio.run(model.request(ModelRequest("be brief", messages)))


def user(text: str, seq: int = 0) -> UserMessage:
    return UserMessage(content=text, seq=seq)


def test_echo_is_deterministic_and_counts_user_messages() -> None:
    model = OfflineModel()
    first = ask(model, user("hello"))
    assert first == ask(OfflineModel(), user("hello"))
    assert first.content == "echo #1: hello"
    assert ask(model, user("a"), user("b", 1)).content == "echo #2: b"
    assert first.usage.input_tokens > 0
    assert first.usage.output_tokens > 0
    assert first.model == "offline:echo"


def test_rules_turn_matches_into_tool_calls_with_named_groups() -> None:
    model = OfflineModel(rules=[Rule(r"what is (?P<a>\d+) \+ (?P<b>\d+)", "add")])
    response = ask(model, user("what is 2 + 40?", seq=6))
    assert response.content == ""
    (call,) = response.tool_calls
    assert (call.id, call.name, call.arguments) == ("call_7_0", "add", {"a": "2", "b": "40"})


def test_after_tool_returns_it_summarises_them() -> None:
    model = OfflineModel(rules=[Rule(r"add", "add")])
    ret = ToolReturn(tool_call_id="c", tool_name="add", content="42", seq=2)
    bad = ToolReturn(tool_call_id="d", tool_name="mul", content="boom", is_error=True, seq=3)
    assert ask(model, user("add"), ret, bad).content == "add returned 42; mul failed boom"


def test_tool_and_loop_directives() -> None:
    model = OfflineModel()
    (call,) = ask(model, user('!tool add {"a": 1, "b": 2}')).tool_calls
    assert (call.name, call.arguments) == ("add", {"a": 1, "b": 2})
    ret = ToolReturn(tool_call_id="c", tool_name="add", content="3", seq=1)
    assert ask(model, user("!tool add {}"), ret).content == "add returned 3"
    # !loop keeps calling the tool even after it returned
    assert ask(model, user("!loop add {}"), ret).tool_calls[0].name == "add"
    with pytest.raises(ModelError, match="not JSON"):
        ask(model, user("!tool add {nope"))


def test_fail_and_fatal_directives_raise_model_errors() -> None:
    with pytest.raises(ModelError, match="scripted fail: overloaded") as info:
        ask(OfflineModel(), user("!fail overloaded"))
    assert info.value.retryable
    assert info.value.model == "offline:echo"
    with pytest.raises(ModelError, match="scripted fatal") as info:
        ask(OfflineModel(), user("!fatal"))
    assert not info.value.retryable


def test_sleep_directive_and_latency_delay_the_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    pauses: list[float] = []  # the model's clock: what it waits
    wait = asyncio.sleep

    async def clock(delay: float, result: Any = None) -> Any:
        pauses.append(delay)
        return await wait(0, result)

    monkeypatch.setattr(asyncio, "sleep", clock)
    assert ask(OfflineModel(latency_s=0.05), user("!sleep 0.1 hi")).content == "echo #1: hi"
    assert sorted(pauses) == [0.05, 0.1]  # the directive's delay and the model's latency
    with pytest.raises(ModelError, match="needs seconds"):
        ask(OfflineModel(), user("!sleep soon hi"))


def test_fail_first_then_recovers() -> None:
    model = OfflineModel(fail_first=2)
    for _ in range(2):
        with pytest.raises(ModelError, match="scripted failure"):
            ask(model, user("hi"))
    assert ask(model, user("hi")).content == "echo #1: hi"


def test_fallback_goes_down_the_chain_and_reports_every_failure() -> None:
    chain = FallbackModel(OfflineModel("primary", fail_first=1), OfflineModel("backup"))
    assert ask(chain, user("hi")).model == "offline:backup"
    dead = FallbackModel(OfflineModel("a", fail_first=9), OfflineModel("b", fail_first=9))
    with pytest.raises(AllModelsFailed) as info:
        ask(dead, user("hi"))
    assert [f.model for f in info.value.failures] == ["offline:a", "offline:b"]
    assert "offline:a: [server_error] scripted failure 1/9" in str(info.value)


def test_resolve_model_from_strings_and_chains() -> None:
    assert resolve_model("offline:demo").name == "offline:demo"
    chain = resolve_model(["offline:a", OfflineModel("b")])
    assert isinstance(chain, FallbackModel)
    assert chain.name == "offline:a -> offline:b"


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("offline", r"must be written 'provider:model\[@base_url\]'"),
        ("nosuch:model", "unknown provider 'nosuch'"),
        ([], "at least one model"),
        (42, "a model is a Model"),
    ],
)
def test_resolve_model_errors(spec: object, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        resolve_model(spec)  # type: ignore[arg-type]


def test_bad_offline_settings() -> None:
    with pytest.raises(ConfigError, match="latency_s must be >= 0"):
        OfflineModel(latency_s=-1)
    with pytest.raises(ConfigError, match="is not a regex"):
        Rule("(unclosed", "add")
