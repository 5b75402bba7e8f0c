"""Anthropic Messages API through the official ``anthropic`` async SDK.

Imported only inside provider actors: conversation actors never load a vendor SDK.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anthropic

from ..exceptions import ModelError
from ..messages import AssistantMessage, Message, ModelResponse, ToolReturn, Usage, UserMessage
from ..tools import ToolDefinition
from ._wire import http_error, scrubbed, tool_call
from .base import Model
from .endpoint import Endpoint

__all__ = ["AnthropicModel"]

#: The Messages API normalises stop reasons; the rest of overstory speaks OpenAI's words.
_FINISH = {"end_turn": "stop", "tool_use": "tool_calls", "max_tokens": "length"}


class AnthropicModel(Model):
    """One Anthropic endpoint. Its SDK client never retries: the retry loop is ours."""

    def __init__(self, endpoint: Endpoint) -> None:
        endpoint = endpoint.resolved()
        assert endpoint.key is not None
        self.endpoint = endpoint
        self._client = anthropic.AsyncAnthropic(
            api_key=endpoint.key.value,
            base_url=endpoint.base_url,
            max_retries=0,
            timeout=endpoint.timeout_s,
        )

    @property
    def name(self) -> str:
        return self.endpoint.name

    async def request(
        self,
        instructions: str,
        messages: Sequence[Message],
        tools: Sequence[ToolDefinition],
    ) -> ModelResponse:
        try:
            return await self._request(instructions, messages, tools)
        except ModelError as exc:
            assert self.endpoint.key is not None
            raise scrubbed(exc, self.endpoint.key.value) from None

    async def _request(
        self,
        instructions: str,
        messages: Sequence[Message],
        tools: Sequence[ToolDefinition],
    ) -> ModelResponse:
        kwargs: dict[str, Any] = {
            "model": self.endpoint.model,
            "max_tokens": self.endpoint.max_tokens,
            "messages": to_anthropic_messages(messages),
        }
        if instructions:
            kwargs["system"] = instructions
        if tools:
            kwargs["tools"] = [
                {"name": t.name, "description": t.description, "input_schema": t.parameters}
                for t in tools
            ]
        try:
            reply = await self._client.messages.create(**kwargs)
        except anthropic.APIStatusError as exc:
            raise http_error(
                self.name, exc.status_code, exc.response.headers, exc.message
            ) from None
        except anthropic.APITimeoutError:
            raise ModelError(
                f"no answer within {self.endpoint.timeout_s:g} s", model=self.name, kind="timeout"
            ) from None
        except anthropic.APIConnectionError as exc:
            raise ModelError(
                f"connection failed: {exc}", model=self.name, kind="connection"
            ) from None
        except (anthropic.AnthropicError, ValueError, TypeError) as exc:
            raise ModelError(
                f"unreadable answer: {type(exc).__name__}: {exc}", model=self.name, kind="malformed"
            ) from None
        return self._response(reply)

    def _response(self, reply: Any) -> ModelResponse:
        try:
            texts: list[str] = []
            calls = []
            for block in reply.content:
                if block.type == "text":
                    texts.append(block.text)
                elif block.type == "tool_use":
                    calls.append(tool_call(self.name, block.id, block.name, block.input))
            stop = str(reply.stop_reason or ("tool_use" if calls else "end_turn"))
            return ModelResponse(
                content="".join(texts),
                tool_calls=tuple(calls),
                usage=Usage(int(reply.usage.input_tokens), int(reply.usage.output_tokens)),
                model=str(reply.model or self.endpoint.model),
                finish_reason=_FINISH.get(stop, stop),
            )
        except ModelError:
            raise
        except (AttributeError, TypeError, ValueError) as exc:
            raise ModelError(
                f"answer is not a Messages API message: {type(exc).__name__}: {exc}",
                model=self.name,
                kind="malformed",
            ) from None


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
