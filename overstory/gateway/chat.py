"""OpenAI's Chat Completions shapes (pure): a request's context and options, and the
``chat.completion`` object and stream chunks built from a stateless turn; and the
context of a stateless Responses request (``store=false``), read the same way.

A Chat Completions request carries its whole conversation, and nothing is stored
(:mod:`overstory.conversation.stateless`):

- the last message must be the user's: it is the turn's text;
- the messages before it are the context;
- system and developer messages are added to the agent's instructions.

The agent's own tools run on the server. Their calls are not shown: in this API a tool
call in an answer asks the client to run it. Client-side tools (``tools``, ``tool``
messages, an assistant's ``tool_calls``) are refused by name, for now. As for
Responses, a parameter either has its effect or is refused naming it.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from ..exceptions import UsageError
from ..messages import AssistantMessage, Message, Reply, UserMessage
from ..providers.base import ModelSettings
from ..providers.schema import OutputSchema
from .wire import ParamError, text_format

__all__ = ["ChatChunks", "ChatRequest", "chat_completion", "chat_request", "responses_context"]

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
    }
)

#: Accepted only at the value that asks for nothing the door does not do anyway.
_DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "tools": (None, []),
    "tool_choice": (None, "auto", "none"),
    "parallel_tool_calls": (None, True),
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
    """What one Chat Completions request asks: the context (earlier messages), the
    user's text, system text for the instructions, and the turn's options."""

    context: list[Message]
    text: str
    system: str
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
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ParamError("stream", "a boolean")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise ParamError("stream_options", "only with stream=true, an object")
    include_usage = bool((options or {}).get("include_usage", False))
    context, text, system = _messages(body.get("messages"))
    return ChatRequest(
        context,
        text,
        system,
        stream,
        include_usage,
        _settings(body),
        _response_format(body.get("response_format")),
    )


def _messages(messages: Any) -> tuple[list[Message], str, str]:
    if not isinstance(messages, list) or not messages:
        raise ParamError("messages", "a non-empty list of messages")
    context: list[Message] = []
    system: list[str] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ParamError(where, "a message object")
        role = m.get("role")
        if m.get("tool_calls") or role in ("tool", "function"):
            raise ParamError(
                f"{where}.tool_calls" if m.get("tool_calls") else f"{where}.role",
                "client-side tools are not supported by this door yet",
            )
        text = _content(m.get("content"), where)
        if role in ("system", "developer"):
            system.append(text)
        elif role == "user":
            context.append(UserMessage(content=text, seq=len(context), turn_id=f"ctx{i}"))
        elif role == "assistant":
            turn = context[-1].turn_id if context else f"ctx{i}"
            context.append(AssistantMessage(content=text, seq=len(context), turn_id=turn))
        else:
            raise ParamError(f"{where}.role", "one of system, developer, user, assistant")
    last = context.pop() if context else None
    if not isinstance(last, UserMessage) or messages[-1].get("role") != "user":
        raise ParamError("messages", "the last message must be the user's (the turn's text)")
    return context, last.content, "\n\n".join(system)


def responses_context(items: Any) -> tuple[list[Message], str, str]:
    """A stateless Responses request's ``input`` (``store=false``): a string (the user's
    text, no context) or a list of message items (any role; content a string or
    ``input_text`` / ``output_text`` parts) whose last is the user's — as for Chat
    Completions, ``(context, text, system)``. ``function_call`` items and their
    outputs are refused by name: client-side tools are not supported yet."""
    if isinstance(items, str):
        return [], items, ""
    if not isinstance(items, list) or not items:
        raise ParamError("input", "a string or a non-empty list of items")
    messages = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ParamError(f"input[{i}]", "an item object")
        kind = item.get("type", "message")
        if kind != "message":
            raise ParamError(
                f"input[{i}].type", f"{kind!r:.40} items are not supported by this door yet"
            )
        messages.append({"role": item.get("role"), "content": item.get("content")})
    try:
        return _messages(messages)
    except ParamError as exc:
        raise ParamError(
            exc.param.replace("messages", "input"), str(exc).replace("messages", "input")
        ) from exc


def _content(content: Any, where: str) -> str:
    """A message's text: a string, or text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            p.get("text")
            for p in content
            if isinstance(p, dict) and p.get("type") in ("text", "input_text", "output_text")
        ]
        if len(texts) == len(content) and all(isinstance(t, str) for t in texts):
            return "\n".join(texts)  # type: ignore[arg-type]
        raise ParamError(f"{where}.content", "only text parts are supported by this door")
    if content is None:
        return ""
    raise ParamError(f"{where}.content", "a string or a list of text parts")


def _settings(body: dict[str, Any]) -> dict[str, Any] | None:
    settings: dict[str, Any] = {}
    cap = body.get("max_completion_tokens", body.get("max_tokens"))
    chosen = {
        "temperature": ("temperature", body.get("temperature")),
        "max_output_tokens": (
            "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens",
            cap,
        ),
        "stop": ("stop", [body["stop"]] if isinstance(body.get("stop"), str) else body.get("stop")),
        "seed": ("seed", body.get("seed")),
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
    return "length" if reply.incomplete else "stop"


def chat_completion(completion_id: str, model: str, reply: Reply, created: int) -> dict[str, Any]:
    """The ``chat.completion`` object of a finished turn."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.text, "refusal": None},
                "logprobs": None,
                "finish_reason": _finish(reply),
            }
        ],
        "usage": _usage(reply),
    }


class ChatChunks:
    """The ``chat.completion.chunk`` s of one streamed turn, as SSE ``data:`` lines."""

    def __init__(self, completion_id: str, model: str, include_usage: bool) -> None:
        self.id, self.model, self.include_usage = completion_id, model, include_usage
        self.created = int(time.time())

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

    def end(self, reply: Reply) -> bytes:
        out = self._chunk({}, _finish(reply))
        if self.include_usage:
            out += self._line({"choices": [], "usage": _usage(reply)})
        return out + b"data: [DONE]\n\n"

    @staticmethod
    def error(message: str, type_: str = "server_error", code: str | None = None) -> bytes:
        body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
        return f"data: {json.dumps(body)}\n\n".encode()
