"""The spans of a real turn: run_turn with a fallback chain and two tool calls, captured
by an in-memory exporter on a provider of the test's own (no Ray, no global provider)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from overstory import (
    Agent,
    Model,
    ModelRequest,
    ModelResponse,
    OfflineModel,
    TurnFailed,
)
from overstory.conversation.turn import run_turn
from overstory.messages import ToolCall, ToolReturn, Usage
from overstory.providers import FallbackModel
from overstory.store import open_store


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def explode(reason: str) -> str:
    """Always fails."""
    raise ValueError(reason)


class TwoTools(Model):
    """Asks for two tools at once; after their returns, answers with text."""

    @property
    def name(self) -> str:
        return "scripted:two-tools"

    async def request(self, req: ModelRequest) -> ModelResponse:
        if isinstance(req.messages[-1], ToolReturn):
            return ModelResponse(content="done", usage=Usage(20, 2), model="two-tools-v1")
        calls = (
            ToolCall(id="call_a", name="add", arguments={"a": 2, "b": 3}),
            ToolCall(id="call_b", name="explode", arguments={"reason": "boom"}),
        )
        return ModelResponse(
            tool_calls=calls, usage=Usage(10, 4), model="two-tools-v1", finish_reason="tool_calls"
        )


def _turn(tmp_path: Path, agent: Agent, text: str) -> None:
    async def go() -> None:
        store = open_store(f"sqlite:///{tmp_path}/t.db")
        await store.open()
        try:
            await run_turn(agent, store, "conv-1", [], "turn-1", text)
        finally:
            await store.close()

    asyncio.run(go())


def _tree(spans: Sequence[ReadableSpan]) -> list[tuple[int, str]]:
    """(depth, name) in start order: the shape of the trace."""
    by_id = {s.context.span_id: s for s in spans}

    def depth(s: ReadableSpan) -> int:
        d = 0
        while s.parent is not None and s.parent.span_id in by_id:
            s, d = by_id[s.parent.span_id], d + 1
        return d

    return [(depth(s), s.name) for s in sorted(spans, key=lambda s: s.start_time or 0)]


def test_the_exact_span_tree_of_a_turn_with_a_fallback_and_two_tool_calls(
    tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    agent = Agent(
        "helper",
        model=FallbackModel(OfflineModel("primary", fail_first=1), TwoTools()),
        tools=[add, explode],
    )
    _turn(tmp_path, agent, "please add and explode")
    spans = exporter.get_finished_spans()
    assert _tree(spans) == [
        (0, "invoke_agent helper"),
        (1, "chat primary"),  # fails: the chain falls through
        (1, "chat two-tools"),
        (1, "execute_tool add"),
        (1, "execute_tool explode"),
        (1, "chat primary"),  # answers the tool returns
    ]
    assert len({s.context.trace_id for s in spans}) == 1
    root, failed, backup, tool_add, tool_explode, final = sorted(
        spans, key=lambda s: s.start_time or 0
    )

    assert root.kind == SpanKind.INTERNAL
    assert dict(root.attributes or {}) == {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": "helper",
        "gen_ai.agent.version": "1",
        "gen_ai.conversation.id": "conv-1",
        "gen_ai.usage.input_tokens": 10 + final_usage(final)[0],
        "gen_ai.usage.output_tokens": 4 + final_usage(final)[1],
    }
    (fallback,) = [e for e in root.events if e.name == "overstory.fallback"]
    assert dict(fallback.attributes or {}) == {
        "overstory.fallback.failed_model": "offline:primary",
        "error.type": "server_error",
        "overstory.fallback.next_model": "scripted:two-tools",
    }

    assert failed.kind == SpanKind.CLIENT
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.attributes is not None
    assert failed.attributes["error.type"] == "server_error"
    assert failed.attributes["gen_ai.provider.name"] == "offline"

    assert backup.kind == SpanKind.CLIENT
    assert dict(backup.attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "scripted",
        "gen_ai.request.model": "two-tools",
        "gen_ai.response.model": "two-tools-v1",
        "gen_ai.usage.input_tokens": 10,
        "gen_ai.usage.output_tokens": 4,
        "gen_ai.response.finish_reasons": ("tool_calls",),
    }

    assert tool_add.kind == SpanKind.INTERNAL
    assert dict(tool_add.attributes or {}) == {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": "add",
        "gen_ai.tool.call.id": "call_a",
        "gen_ai.tool.type": "function",
    }
    assert tool_add.status.status_code != StatusCode.ERROR
    assert tool_explode.attributes is not None
    assert tool_explode.attributes["error.type"] == "tool_error"
    assert tool_explode.attributes["gen_ai.tool.call.id"] == "call_b"
    assert tool_explode.status.status_code == StatusCode.ERROR
    assert "boom" not in (tool_explode.status.description or "")  # content: opt-in only

    assert final.status.status_code != StatusCode.ERROR
    # Contents are not recorded unless the user opts in.
    for span in spans:
        assert not any("messages" in k or "call.result" in k for k in span.attributes or {})


def final_usage(span: ReadableSpan) -> tuple[int, int]:
    attrs = span.attributes or {}
    return int(attrs["gen_ai.usage.input_tokens"]), int(attrs["gen_ai.usage.output_tokens"])  # type: ignore[arg-type]


def test_a_failed_turn_marks_the_agent_span(tmp_path: Path, exporter: InMemorySpanExporter) -> None:
    agent = Agent("helper", model=OfflineModel("m", fail_first=5))
    with pytest.raises(TurnFailed):
        _turn(tmp_path, agent, "hi")
    (root,) = [s for s in exporter.get_finished_spans() if s.name == "invoke_agent helper"]
    assert root.status.status_code == StatusCode.ERROR
    assert root.attributes is not None
    assert root.attributes["error.type"] == "TurnFailed"
