"""Anthropic Messages API through the official ``anthropic`` async SDK.

Imported where vendor calls are made (hosts, the door's replicas, provider actors); a
dedicated conversation actor never loads it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Sequence
from types import ModuleType
from typing import Any, ClassVar

import anthropic

from ..exceptions import ModelError
from ..messages import AssistantMessage, Message, ModelResponse, ToolReturn, Usage, UserMessage
from ._wire import Assembler, SDKModel, aiohttp_client, tool_call
from .base import ModelRequest
from .endpoint import Endpoint
from .schema import OUTPUT_TOOL

__all__ = ["AnthropicModel", "AnthropicStream"]

#: The Messages API normalises stop reasons; the rest of overstory speaks OpenAI's words.
_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "tool_use": "tool_calls",
    "max_tokens": "length",
}


class AnthropicModel(SDKModel):
    """One Anthropic endpoint."""

    sdk: ClassVar[ModuleType] = anthropic
    answer_shape = "a Messages API message"

    def _make_client(self, endpoint: Endpoint, key: str) -> Any:
        return anthropic.AsyncAnthropic(
            api_key=key,
            base_url=endpoint.base_url,
            max_retries=0,
            timeout=endpoint.timeout_s,
            http_client=aiohttp_client(anthropic),
        )

    def _create(self, **arguments: Any) -> Awaitable[Any]:
        return self._client.messages.create(**arguments)  # type: ignore[no-any-return]

    def _assembler(self) -> Assembler:
        return AnthropicStream(self.name, self.endpoint.model)

    def _arguments(self, req: ModelRequest) -> dict[str, Any]:
        settings = req.settings
        if settings.seed is not None:
            raise ModelError(
                f"{self.name} takes no seed (Anthropic's API has none): leave seed unset "
                "for this model",
                model=self.name,
                kind="bad_request",
            )
        kwargs: dict[str, Any] = {
            "model": self.endpoint.model,
            "max_tokens": settings.max_output_tokens or self.endpoint.max_tokens,
            "messages": to_anthropic_messages(req.messages),
        }
        if settings.temperature is not None:
            # The SDK's create() no longer names temperature; the API still takes it.
            kwargs["extra_body"] = {"temperature": settings.temperature}
        if settings.stop:
            kwargs["stop_sequences"] = list(settings.stop)
        if req.instructions:
            kwargs["system"] = req.instructions
        tools = [
            {"name": t.name, "description": t.description, "input_schema": t.parameters}
            for t in req.tools
        ]
        if req.output is not None:
            # Structured output: the answer is the input of a tool the model must call
            # (when the agent has tools of its own, any tool: its own first, if it needs).
            tools.append(
                {
                    "name": OUTPUT_TOOL,
                    "description": f"Give the final answer as a {req.output.name}.",
                    "input_schema": req.output.schema,
                }
            )
            kwargs["tool_choice"] = (
                {"type": "any"} if req.tools else {"type": "tool", "name": OUTPUT_TOOL}
            )
        if req.tools and "tool_choice" not in kwargs:
            choice = _tool_choice(settings.tool_choice, settings.parallel_tool_calls)
            if choice is not None:
                kwargs["tool_choice"] = choice
        if tools:
            kwargs["tools"] = tools
        return kwargs

    def _read(self, reply: Any) -> ModelResponse:
        texts: list[str] = []
        calls = []
        for block in reply.content:
            if block.type == "text":
                texts.append(block.text)
            elif block.type == "tool_use" and block.name == OUTPUT_TOOL:
                texts.append(json.dumps(block.input))  # the structured answer, as its JSON
            elif block.type == "tool_use":
                calls.append(tool_call(self.name, block.id, block.name, block.input))
        stop = str(reply.stop_reason or ("tool_use" if calls else "end_turn"))
        if stop == "tool_use" and not calls:
            stop = "end_turn"
        return ModelResponse(
            content="".join(texts),
            tool_calls=tuple(calls),
            usage=Usage(int(reply.usage.input_tokens), int(reply.usage.output_tokens)),
            model=str(reply.model or self.endpoint.model),
            finish_reason=_FINISH.get(stop, stop),
        )


class AnthropicStream:
    """One streamed message, assembled from its events.

    ``message_start`` gives the model and the input usage; each content block opens with
    ``content_block_start`` (a text block, or a ``tool_use`` with its id and name), grows
    by deltas (``text_delta``, or the input's JSON text as ``input_json_delta`` pieces cut
    anywhere) and closes; ``message_delta`` gives the stop reason and the output usage;
    ``message_stop`` ends it. Thinking blocks are skipped. A stream without
    ``message_stop`` was cut short.
    """

    def __init__(self, name: str, model: str) -> None:
        self.name = name
        self.model = model
        self.text: list[str] = []
        self.blocks: dict[int, list[Any]] = {}  # index -> [id, name, input JSON pieces]
        self.input_tokens = 0
        self.output_tokens = 0
        self.stop: str | None = None
        self.ended = False

    def feed(self, event: Any) -> str:
        kind = event.type
        if kind == "message_start":
            message = event.message
            self.model = str(message.model or self.model)
            self.input_tokens = int(message.usage.input_tokens or 0)
            self.output_tokens = int(message.usage.output_tokens or 0)
        elif kind == "content_block_start":
            block = event.content_block
            if block.type == "tool_use":
                self.blocks[int(event.index)] = [block.id, block.name, []]
        elif kind == "content_block_delta":
            delta = event.delta
            if delta.type == "text_delta" and delta.text:
                self.text.append(delta.text)
                return str(delta.text)
            if delta.type == "input_json_delta" and int(event.index) in self.blocks:
                self.blocks[int(event.index)][2].append(delta.partial_json)
        elif kind == "message_delta":
            self.stop = event.delta.stop_reason or self.stop
            if event.usage is not None and event.usage.output_tokens is not None:
                self.output_tokens = int(event.usage.output_tokens)
        elif kind == "message_stop":
            self.ended = True
        return ""

    def response(self) -> ModelResponse:
        if not self.ended:
            raise ModelError(
                "the stream ended without message_stop (cut short)",
                model=self.name,
                kind="connection",
            )
        calls = tuple(
            tool_call(self.name, call_id, name, "".join(raw))
            for _, (call_id, name, raw) in sorted(self.blocks.items())
        )
        stop = str(self.stop or ("tool_use" if calls else "end_turn"))
        return ModelResponse(
            content="".join(self.text),
            tool_calls=calls,
            usage=Usage(self.input_tokens, self.output_tokens),
            model=self.model,
            finish_reason=_FINISH.get(stop, stop),
        )


def to_anthropic_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """The history as alternating user/assistant turns of content blocks.

    Tool returns travel as ``tool_result`` blocks in a user turn; consecutive messages of
    the same role are merged into one turn, as the API requires.
    """
    out: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})

    for m in messages:
        if isinstance(m, UserMessage):
            add("user", [{"type": "text", "text": m.content}])
        elif isinstance(m, ToolReturn):
            add(
                "user",
                [
                    {
                        "type": "tool_result",
                        "tool_use_id": m.tool_call_id,
                        "content": m.content,
                        "is_error": m.is_error,
                    }
                ],
            )
        elif isinstance(m, AssistantMessage):
            blocks: list[dict[str, Any]] = []
            if m.content:
                blocks.append({"type": "text", "text": m.content})
            blocks.extend(
                {"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments}
                for c in m.tool_calls
            )
            # The API refuses empty turns and empty text blocks.
            add("assistant", blocks or [{"type": "text", "text": "(no answer)"}])
    return out


def _tool_choice(choice: str | None, parallel: bool | None) -> dict[str, Any] | None:
    """OpenAI's ``tool_choice`` and ``parallel_tool_calls`` in Anthropic's words."""
    if choice is None and parallel is None:
        return None
    kinds = {"auto": "auto", "none": "none", "required": "any"}
    shaped: dict[str, Any] = (
        {"type": kinds.get(choice or "auto")}
        if (choice or "auto") in kinds
        else {"type": "tool", "name": choice}
    )
    if parallel is False and shaped["type"] != "none":
        shaped["disable_parallel_tool_use"] = True
    return shaped
