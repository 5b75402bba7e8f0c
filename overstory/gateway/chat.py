"""OpenAI's Chat Completions shapes (pure): a request's context and options, and the
``chat.completion`` object and stream chunks built from a stateless turn.

A Chat Completions request carries its whole conversation, and nothing is stored
(:mod:`overstory.conversation.stateless`); its ``messages`` are read by
:func:`~.items.chat_context`:

- the last message is the user's (the turn's text), or ``tool`` messages answering the
  last assistant message's calls (the turn continues from those outputs);
- the messages before it are the context;
- system and developer messages are added to the agent's instructions.

The agent's own tools run on the server and their calls are not shown: in this API a
tool call in an answer asks the client to run it. The request's ``tools`` (client
tools) are offered beside the agent's; a call to one ends the completion with
``finish_reason: "tool_calls"``. As for Responses, a parameter either has its effect
or is refused naming it.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from ..exceptions import UsageError
from ..messages import Reply, ToolCall, ToolDefinition
from ..providers.base import ModelSettings
from ..providers.schema import OutputSchema
from .items import Context, chat_context, client_tools
from .wire import ParamError, json_int, text_format, tool_choice

__all__ = ["ChatChunks", "ChatRequest", "chat_completion", "chat_request"]

_TAKEN = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "temperature",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "seed",
        "response_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
    }
)

#: Accepted only at the value that asks for nothing the door does not do anyway.
_DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "logprobs": (None, False),
    "top_logprobs": (None,),
    "top_p": (None, 1, 1.0),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "store": (None, False),  # a stateless completion is never stored
    "metadata": (None, {}),
    "modalities": (None, ["text"]),
    "service_tier": (None, "auto", "default"),
    "user": (None,),
}


@dataclass(frozen=True)
class ChatRequest:
    """What one Chat Completions request asks: its context (earlier messages, and the
    user's text or the tool outputs the turn continues from), the client tools, and
    the turn's options."""

    context: Context
    tools: tuple[ToolDefinition, ...]
    stream: bool
    include_usage: bool
    settings: dict[str, Any] | None
    output: OutputSchema | None


def chat_request(body: dict[str, Any]) -> ChatRequest:
    """The request ``body`` asks for; :class:`~.wire.ParamError` naming the first
    parameter (or message) the door does not take."""
    for key, value in body.items():
        if key in _TAKEN:
            continue
        if key not in _DEFAULT_ONLY:
            raise ParamError(key, f"unknown parameter {key!r} (not supported by this door)")
        allowed = _DEFAULT_ONLY[key]
        if value is not None and not any(value == a and type(value) is type(a) for a in allowed):
            raise ParamError(key, f"{value!r:.80} is not supported by this door")
    stream = False if body.get("stream") is None else body["stream"]
    if not isinstance(stream, bool):
        raise ParamError("stream", "a boolean")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise ParamError("stream_options", "only with stream=true, an object")
    include_usage = bool((options or {}).get("include_usage", False))
    tools = client_tools(body.get("tools"))
    context = chat_context(body.get("messages"), frozenset(t.name for t in tools))
    return ChatRequest(
        context,
        tools,
        stream,
        include_usage,
        _settings(body),
        _response_format(body.get("response_format")),
    )


def _settings(body: dict[str, Any]) -> dict[str, Any] | None:
    settings: dict[str, Any] = {}
    cap = json_int(body.get("max_completion_tokens", body.get("max_tokens")))
    chosen = {
        "temperature": ("temperature", body.get("temperature")),
        "max_output_tokens": (
            "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens",
            cap,
        ),
        "stop": ("stop", [body["stop"]] if isinstance(body.get("stop"), str) else body.get("stop")),
        "seed": ("seed", json_int(body.get("seed"))),
        "tool_choice": ("tool_choice", tool_choice(body.get("tool_choice"))),
        "parallel_tool_calls": ("parallel_tool_calls", body.get("parallel_tool_calls")),
    }
    for name, (param, value) in chosen.items():
        if value is None:
            continue
        try:
            ModelSettings.of({name: value})
        except UsageError as exc:
            raise ParamError(param, str(exc)) from exc
        settings[name] = value
    return settings or None


def _response_format(fmt: Any) -> OutputSchema | None:
    """``response_format`` as an output schema (the shapes of the Responses API's
    ``text.format``, wrapped as Chat Completions wraps them)."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise ParamError("response_format", "an object")
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise ParamError("response_format.json_schema", "an object with a name and a schema")
        fmt = {"type": "json_schema", **spec}
    try:
        return text_format({"format": fmt})
    except ParamError as exc:
        raise ParamError(exc.param.replace("text.format", "response_format"), str(exc)) from exc


def new_completion_id() -> str:
    return f"chatcmpl-{secrets.token_hex(12)}"


def _usage(reply: Reply) -> dict[str, int]:
    used = reply.usage
    return {
        "prompt_tokens": used.input_tokens,
        "completion_tokens": used.output_tokens,
        "total_tokens": used.input_tokens + used.output_tokens,
    }


def _finish(reply: Reply) -> str:
    if reply.awaiting:
        return "tool_calls"
    return "length" if reply.incomplete else "stop"


def _call(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    shaped: dict[str, Any] = {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
    }
    return shaped if index is None else {"index": index, **shaped}


def chat_completion(completion_id: str, model: str, reply: Reply, created: int) -> dict[str, Any]:
    """The ``chat.completion`` object of a finished turn (its client tools' calls as
    ``tool_calls``)."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": reply.text if reply.text or not reply.awaiting else None,
        "refusal": None,
    }
    if reply.awaiting:
        message["tool_calls"] = [_call(c) for c in reply.awaiting]
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": _finish(reply)}
        ],
        "usage": _usage(reply),
    }


class ChatChunks:
    """The ``chat.completion.chunk`` s of one streamed turn, as SSE ``data:`` lines."""

    def __init__(self, completion_id: str, model: str, include_usage: bool) -> None:
        self.id, self.model, self.include_usage = completion_id, model, include_usage
        self.created = int(time.time())
        self.calls = 0

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return self._line({"choices": [choice]})

    def _line(self, fields: dict[str, Any]) -> bytes:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            **fields,
        }
        if self.include_usage and "usage" not in body:
            body["usage"] = None
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n".encode()

    def start(self) -> bytes:
        return self._chunk({"role": "assistant", "content": ""})

    def delta(self, text: str) -> bytes:
        return self._chunk({"content": text})

    def tool_call(self, call: ToolCall) -> bytes:
        """A client tool's call, whole, as the next ``tool_calls`` index."""
        self.calls += 1
        return self._chunk({"tool_calls": [_call(call, self.calls - 1)]})

    def end(self, reply: Reply) -> bytes:
        out = self._chunk({}, _finish(reply))
        if self.include_usage:
            out += self._line({"choices": [], "usage": _usage(reply)})
        return out + b"data: [DONE]\n\n"

    @staticmethod
    def error(message: str, type_: str = "server_error", code: str | None = None) -> bytes:
        body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
        return f"data: {json.dumps(body)}\n\n".encode()
