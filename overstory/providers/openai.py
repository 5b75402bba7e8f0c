"""OpenAI Chat Completions, and every server that speaks it (vLLM, Ollama, LM Studio,
llama.cpp server) through the official ``openai`` async SDK.

Imported only inside provider actors: conversation actors never load a vendor SDK.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from types import ModuleType
from typing import Any, ClassVar

import openai

from ..messages import AssistantMessage, Message, ModelResponse, ToolReturn, Usage, UserMessage
from ..tools import ToolDefinition
from ._wire import SDKModel, tool_call
from .endpoint import Endpoint

__all__ = ["OpenAIModel"]


class OpenAIModel(SDKModel):
    """One OpenAI-format endpoint."""

    sdk: ClassVar[ModuleType] = openai
    answer_shape = "a chat completion"

    def _make_client(self, endpoint: Endpoint, key: str) -> Any:
        return openai.AsyncOpenAI(
            api_key=key, base_url=endpoint.base_url, max_retries=0, timeout=endpoint.timeout_s
        )

    async def _send(
        self,
        instructions: str,
        messages: Sequence[Message],
        tools: Sequence[ToolDefinition],
    ) -> Any:
        kwargs: dict[str, Any] = {
            "model": self.endpoint.model,
            "messages": to_openai_messages(instructions, messages),
        }
        if tools:
            kwargs["tools"] = [to_openai_tool(t) for t in tools]
        # OpenAI's own API wants max_completion_tokens; compatible servers know max_tokens.
        limit = "max_tokens" if self.endpoint.base_url else "max_completion_tokens"
        kwargs[limit] = self.endpoint.max_tokens
        return await self._client.chat.completions.create(**kwargs)

    def _read(self, completion: Any) -> ModelResponse:
        choice = completion.choices[0]
        message = choice.message
        calls = tuple(
            tool_call(self.name, c.id, c.function.name, c.function.arguments)
            for c in (message.tool_calls or ())
        )
        usage = completion.usage
        return ModelResponse(
            content=message.content or "",
            tool_calls=calls,
            usage=Usage(
                int(usage.prompt_tokens) if usage else 0,
                int(usage.completion_tokens) if usage else 0,
            ),
            model=str(completion.model or self.endpoint.model),
            finish_reason=str(choice.finish_reason or ("tool_calls" if calls else "stop")),
        )


def to_openai_tool(tool: ToolDefinition) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.parameters,
        },
    }


def to_openai_messages(instructions: str, messages: Sequence[Message]) -> list[dict[str, Any]]:
    """The history in Chat Completions form (system, user, assistant + tool_calls, tool)."""
    out: list[dict[str, Any]] = []
    if instructions:
        out.append({"role": "system", "content": instructions})
    for m in messages:
        if isinstance(m, UserMessage):
            out.append({"role": "user", "content": m.content})
        elif isinstance(m, AssistantMessage):
            entry: dict[str, Any] = {"role": "assistant", "content": m.content or None}
            if m.tool_calls:
                entry["tool_calls"] = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
                    }
                    for c in m.tool_calls
                ]
            elif not m.content:
                entry["content"] = ""
            out.append(entry)
        elif isinstance(m, ToolReturn):
            out.append({"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content})
    return out
