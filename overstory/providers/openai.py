"""OpenAI Chat Completions, and every server that speaks it (vLLM, Ollama, LM Studio,
llama.cpp server) through the official ``openai`` async SDK.

Imported where vendor calls are made: in host actors (under the provider actors' leases)
and in provider actors; a dedicated conversation actor never loads it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Sequence
from types import ModuleType
from typing import Any, ClassVar

import openai

from ..exceptions import ModelError
from ..messages import AssistantMessage, Message, ModelResponse, ToolReturn, Usage, UserMessage
from ..tools import ToolDefinition
from ._wire import Assembler, SDKModel, aiohttp_client, tool_call
from .base import ModelRequest
from .endpoint import Endpoint

__all__ = ["OpenAIModel", "OpenAIStream"]


class OpenAIModel(SDKModel):
    """One OpenAI-format endpoint."""

    sdk: ClassVar[ModuleType] = openai
    answer_shape = "a chat completion"

    def _make_client(self, endpoint: Endpoint, key: str) -> Any:
        return openai.AsyncOpenAI(
            api_key=key,
            base_url=endpoint.base_url,
            max_retries=0,
            timeout=endpoint.timeout_s,
            http_client=aiohttp_client(openai),
        )

    stream_arguments: ClassVar[dict[str, Any]] = {
        "stream": True,
        "stream_options": {"include_usage": True},  # the usage comes in the last chunk
    }

    def _create(self, **arguments: Any) -> Awaitable[Any]:
        """The SDK's own POST (its HTTP client, auth, errors and SSE decoding) with the
        body as this module built it, answered as plain JSON: ``chat.completions.create``
        would walk the body through its typed transforms and build a pydantic model per
        chunk, a third of a host's CPU per streamed answer under load, for values this
        module reads as JSON anyway."""
        stream = bool(arguments.get("stream"))
        return self._client.post(  # type: ignore[no-any-return]
            "/chat/completions",
            cast_to=object,
            body=arguments,
            stream=stream,
            stream_cls=openai.AsyncStream[object] if stream else None,
        )

    def _assembler(self) -> Assembler:
        return OpenAIStream(self.name, self.endpoint.model)

    def _arguments(self, req: ModelRequest) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self.endpoint.model,
            "messages": to_openai_messages(req.instructions, req.messages),
        }
        if req.tools:
            kwargs["tools"] = [to_openai_tool(t) for t in req.tools]
        # OpenAI's own API wants max_completion_tokens; compatible servers know max_tokens.
        limit = "max_tokens" if self.endpoint.base_url else "max_completion_tokens"
        settings = req.settings
        kwargs[limit] = settings.max_output_tokens or self.endpoint.max_tokens
        if settings.temperature is not None:
            kwargs["temperature"] = settings.temperature
        if settings.stop:
            kwargs["stop"] = list(settings.stop)
        if settings.seed is not None:
            kwargs["seed"] = settings.seed
        if req.tools and settings.tool_choice is not None:
            choice = settings.tool_choice
            kwargs["tool_choice"] = (
                choice
                if choice in ("auto", "none", "required")
                else {"type": "function", "function": {"name": choice}}
            )
        if req.tools and settings.parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = settings.parallel_tool_calls
        if req.output is not None:
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": req.output.name, "schema": req.output.schema},
            }
        return kwargs

    def _read(self, completion: Any) -> ModelResponse:
        choice = completion["choices"][0]
        message = choice["message"]
        calls = tuple(
            tool_call(self.name, c["id"], c["function"]["name"], c["function"]["arguments"])
            for c in (message.get("tool_calls") or ())
        )
        usage = completion.get("usage")
        return ModelResponse(
            content=_text(message.get("content")),
            tool_calls=calls,
            usage=Usage(
                int(usage["prompt_tokens"]) if usage else 0,
                int(usage["completion_tokens"]) if usage else 0,
            ),
            model=str(completion.get("model") or self.endpoint.model),
            finish_reason=str(choice.get("finish_reason") or ("tool_calls" if calls else "stop")),
        )


def _text(content: Any) -> str:
    """A message's or a delta's ``content``: text, or nothing."""
    if content is None:
        return ""
    if not isinstance(content, str):
        raise TypeError(f"content is {type(content).__name__}, not text")
    return content


class OpenAIStream:
    """One streamed chat completion, assembled from its ``chat.completion.chunk`` s.

    Text deltas are passed on as they come. A tool call arrives as pieces keyed by its
    ``index``: the first carries its id and name, every one a piece of the arguments'
    JSON text, cut anywhere. Usage comes in the last chunk (``include_usage``). A stream
    that ends without a finish reason was cut short, whatever the transport said.
    """

    def __init__(self, name: str, model: str) -> None:
        self.name = name
        self.model = model
        self.text: list[str] = []
        self.calls: dict[int, list[Any]] = {}  # index -> [id, name, argument pieces]
        self.finish: str | None = None
        self.usage = Usage()

    def feed(self, chunk: Any) -> str:
        """Take one chunk (its JSON); the text it adds."""
        if chunk.get("model"):
            self.model = str(chunk["model"])
        usage = chunk.get("usage")
        if usage is not None:
            self.usage = Usage(
                int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
            )
        text = ""
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if delta is not None:
                text = _text(delta.get("content"))
                for call in delta.get("tool_calls") or ():
                    entry = self.calls.setdefault(int(call.get("index", 0)), [None, None, []])
                    entry[0] = entry[0] or call.get("id")
                    fn = call.get("function")
                    if fn is not None:
                        entry[1] = entry[1] or fn.get("name")
                        if fn.get("arguments"):
                            entry[2].append(str(fn["arguments"]))
            if choice.get("finish_reason"):
                self.finish = str(choice["finish_reason"])
        if text:
            self.text.append(text)
        return text

    def response(self) -> ModelResponse:
        if self.finish is None:
            raise ModelError(
                "the stream ended without a finish reason (cut short)",
                model=self.name,
                kind="connection",
            )
        calls = tuple(
            tool_call(self.name, call_id, name, "".join(pieces))
            for _, (call_id, name, pieces) in sorted(self.calls.items())
        )
        return ModelResponse(
            content="".join(self.text),
            tool_calls=calls,
            usage=self.usage,
            model=self.model,
            finish_reason=self.finish,
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
