"""What a request sends as its context, read into overstory's messages (pure).

Both OpenAI APIs let the caller send a conversation: Chat Completions as ``messages``
(``system``, ``developer``, ``user``, ``assistant`` with ``tool_calls``, ``tool``),
Responses as ``input`` items (``message`` of any role, ``function_call``,
``function_call_output``, and ``mcp_call`` — how the door shows the agent's own tool
calls, run on the server). :class:`Reader` reads either into one :class:`Context`:

- the messages before the turn (system and developer text goes to the instructions);
- what the turn starts from: the last user message's text, or — when the caller ends
  with the outputs of client tools' calls — those outputs (:class:`~overstory.ToolOutput`),
  the turn continuing from them.

And :func:`client_tools` reads a request's ``tools`` (``function`` tools, in either API's
shape) into :class:`~overstory.ToolDefinition` s. Everything refused names its parameter
(:class:`~.wire.ParamError`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ..messages import (
    AssistantMessage,
    Message,
    ToolCall,
    ToolDefinition,
    ToolOutput,
    ToolReturn,
    UserMessage,
)
from ..validation import MAX_CLIENT_TOOLS
from .wire import ParamError

__all__ = [
    "Context",
    "Reader",
    "chat_context",
    "client_tools",
    "conversation_messages",
    "input_context",
    "read_items",
]

#: A chat message's fields; those ``_ECHOED`` come back in an assistant message a client
#: sends back (the door never sets them) and are taken empty only.
_CHAT_FIELDS = frozenset(
    {"role", "content", "tool_calls", "tool_call_id", "refusal", "annotations", "audio", "name"}
)
_ECHOED = frozenset({"refusal", "annotations", "audio", "name"})

#: A function tool's fields (``strict``: the vendor's schema enforcement; the model is
#: given the schema either way).
_TOOL_FIELDS = frozenset({"type", "name", "description", "parameters", "strict"})


@dataclass(frozen=True)
class Context:
    """A request's context: ``messages`` before the turn, and what the turn starts
    from — ``text`` (a user message) or ``outputs`` (client tools' outputs; ``text``
    is then empty) — and ``system`` text for the instructions."""

    messages: list[Message]
    text: str
    outputs: tuple[ToolOutput, ...] = ()
    system: str = ""


@dataclass
class Reader:
    """Builds a context one entry at a time, each named by ``where`` (its parameter
    path) in errors. ``client``: the names of the request's client tools — a call to
    one is marked ``client`` (what a turn continuing from its output needs)."""

    client: frozenset[str] = frozenset()
    messages: list[Message] = field(default_factory=list)
    system: list[str] = field(default_factory=list)
    _calls: dict[str, ToolCall] = field(default_factory=dict)

    def _place(self, message: Message) -> None:
        turn = f"ctx{len(self.messages)}"
        if not isinstance(message, UserMessage) and self.messages:
            turn = self.messages[-1].turn_id  # a turn runs from its user message
        self.messages.append(dataclasses.replace(message, seq=len(self.messages), turn_id=turn))

    def user(self, text: str) -> None:
        self._place(UserMessage(content=text))

    def assistant(self, text: str) -> None:
        self._place(AssistantMessage(content=text))

    def call(self, where: str, call_id: Any, name: Any, arguments: Any) -> None:
        """A tool call (of the last assistant answer, when nothing came after it)."""
        if not isinstance(call_id, str) or not call_id or len(call_id) > 128:
            raise ParamError(f"{where}.call_id", "a call id of 1-128 characters")
        if not isinstance(name, str) or not name:
            raise ParamError(f"{where}.name", "the name of the tool called")
        if call_id in self._calls:
            raise ParamError(f"{where}.call_id", f"call {call_id!r:.60} is given twice")
        parsed = _arguments(where, arguments)
        call = ToolCall(call_id, name, parsed, client=name in self.client)
        self._calls[call_id] = call
        last = self.messages[-1] if self.messages else None
        if isinstance(last, AssistantMessage) and not last.incomplete:
            self.messages[-1] = dataclasses.replace(last, tool_calls=(*last.tool_calls, call))
        else:
            self._place(AssistantMessage(tool_calls=(call,)))

    def result(self, where: str, call_id: Any, output: Any, is_error: bool = False) -> None:
        """A tool's output, for a call given before it."""
        call = self._calls.get(call_id) if isinstance(call_id, str) else None
        if call is None:
            raise ParamError(
                f"{where}.call_id", f"no tool call {str(call_id)!r:.60} comes before this output"
            )
        self._place(
            ToolReturn(
                tool_call_id=call.id,
                tool_name=call.name,
                content=_text(output, f"{where}.output"),
                is_error=is_error,
            )
        )

    def context(self, param: str) -> Context:
        """The context read: the last entry must be a user message, or the outputs of
        the last answer's calls (which are client tools' calls)."""
        messages, system = self.messages, "\n\n".join(self.system)
        if not messages:
            raise ParamError(param, "no user message to answer")
        last = messages[-1]
        if isinstance(last, UserMessage):
            return Context(messages[:-1], last.content, (), system)
        start = len(messages)
        while start > 0 and isinstance(messages[start - 1], ToolReturn):
            start -= 1
        answered = messages[start - 1] if start > 0 else None
        if start == len(messages) or not isinstance(answered, AssistantMessage):
            raise ParamError(param, "the last entry must be a user message or tool outputs")
        unknown = [c.name for c in answered.tool_calls if not c.client]
        if unknown:
            raise ParamError(
                param,
                f"tool outputs continue a turn only for the request's own tools; "
                f"{unknown[0]!r:.60} is not one of them (send it in tools)",
            )
        outputs = tuple(
            ToolOutput(m.tool_call_id, m.content, m.is_error)
            for m in messages[start:]
            if isinstance(m, ToolReturn)
        )
        return Context(messages[:start], "", outputs, system)


def _arguments(where: str, raw: Any) -> dict[str, Any]:
    """A call's arguments: a JSON object, as its text (OpenAI's wire form)."""
    if isinstance(raw, dict):
        return raw
    try:
        parsed = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise ParamError(f"{where}.arguments", "a JSON object's text")
    return parsed


def _text(content: Any, where: str) -> str:
    """A message's (or an output's) text: a string, or text parts joined."""
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
        raise ParamError(where, "only text parts are supported by this door")
    if content is None:
        return ""
    raise ParamError(where, "a string or a list of text parts")


def _message(reader: Reader, where: str, role: Any, content: Any) -> None:
    text = _text(content, f"{where}.content")
    if role in ("system", "developer"):
        reader.system.append(text)
    elif role == "user":
        reader.user(text)
    elif role == "assistant":
        reader.assistant(text)
    else:
        raise ParamError(f"{where}.role", "one of system, developer, user, assistant")


def chat_context(messages: Any, client: frozenset[str] = frozenset()) -> Context:
    """A Chat Completions request's ``messages`` as a context."""
    if not isinstance(messages, list) or not messages:
        raise ParamError("messages", "a non-empty list of messages")
    reader = Reader(client)
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ParamError(where, "a message object")
        for key, value in m.items():
            if key not in _CHAT_FIELDS or (key in _ECHOED and value not in (None, [])):
                raise ParamError(f"{where}.{key}", "not supported by this door")
        role = m.get("role")
        if role == "tool":
            reader.result(where, m.get("tool_call_id"), m.get("content"))
            continue
        if role == "function":
            raise ParamError(f"{where}.role", "'function' messages are deprecated: use 'tool'")
        calls = m.get("tool_calls") or []
        if calls and role != "assistant":
            raise ParamError(f"{where}.tool_calls", "only an assistant message makes tool calls")
        if not isinstance(calls, list):
            raise ParamError(f"{where}.tool_calls", "a list of tool calls")
        _message(reader, where, role, m.get("content"))
        for k, c in enumerate(calls):
            at = f"{where}.tool_calls[{k}]"
            function = c.get("function") if isinstance(c, dict) else None
            if not isinstance(function, dict) or c.get("type", "function") != "function":
                raise ParamError(at, "a function tool call")
            reader.call(at, c.get("id"), function.get("name"), function.get("arguments"))
    return reader.context("messages")


def input_context(
    items: Any, client: frozenset[str] = frozenset(), *, stored: bool = False
) -> Context:
    """A Responses request's ``input`` as a context: a string (the user's text), or a
    list of items. ``stored``: the response goes into a conversation, whose calls an
    input of ``function_call_output`` items alone answers (the turn continues)."""
    if isinstance(items, str):
        return Context([], items)
    if not isinstance(items, list) or not items:
        raise ParamError("input", "a string or a non-empty list of items")
    if stored and all(
        isinstance(i, dict) and i.get("type") == "function_call_output" for i in items
    ):
        outputs = []
        for i, item in enumerate(items):
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise ParamError(f"input[{i}].call_id", "the id of the call answered")
            outputs.append(ToolOutput(call_id, _text(item.get("output"), f"input[{i}].output")))
        return Context([], "", tuple(outputs))
    reader = Reader(client)
    read_items(reader, items, "input")
    return reader.context("input")


def conversation_messages(items: Any, limit: int = 20) -> list[Message]:
    """The ``items`` a caller adds to a conversation (at most ``limit``), as messages
    to store; system and developer messages are refused (instructions are given per
    response)."""
    if not isinstance(items, list) or not 1 <= len(items) <= limit:
        raise ParamError("items", f"a list of 1 to {limit} items")
    reader = Reader()
    read_items(reader, items, "items")
    if reader.system:
        raise ParamError("items", "system and developer messages are not stored: send instructions")
    return reader.messages


def read_items(reader: Reader, items: list[Any], param: str) -> None:
    """Read Responses items (``param[i]`` in errors) into ``reader``."""
    for i, item in enumerate(items):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise ParamError(where, "an item object")
        kind = item.get("type") or "message"
        if kind == "message":
            _message(reader, where, item.get("role"), item.get("content"))
        elif kind == "function_call":
            reader.call(where, item.get("call_id"), item.get("name"), item.get("arguments"))
        elif kind == "function_call_output":
            reader.result(where, item.get("call_id"), item.get("output"))
        elif kind == "mcp_call":  # one of the agent's own calls, as the door showed it
            reader.call(where, item.get("id"), item.get("name"), item.get("arguments"))
            error = item.get("error")
            shown = item.get("output") if error is None else json.dumps(error)
            reader.result(where, item.get("id"), shown or "", is_error=error is not None)
        else:
            raise ParamError(f"{where}.type", f"{kind!r:.40} items are not supported by this door")


def client_tools(tools: Any) -> tuple[ToolDefinition, ...]:
    """A request's ``tools``: ``function`` tools in Chat Completions' shape
    (``{"type": "function", "function": {...}}``) or the Responses API's (the fields at
    the top). Other kinds (hosted tools: web search, files...) are refused by name."""
    if tools is None:
        return ()
    if not isinstance(tools, list) or len(tools) > MAX_CLIENT_TOOLS:
        raise ParamError("tools", f"a list of at most {MAX_CLIENT_TOOLS} tools")
    out: list[ToolDefinition] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise ParamError(
                f"{where}.type", f"only function tools are supported by this door, not {kind!r:.40}"
            )
        spec = tool.get("function", tool)
        if not isinstance(spec, dict):
            raise ParamError(f"{where}.function", "an object with a name and parameters")
        outer = set(tool) - ({"type", "function"} if "function" in tool else _TOOL_FIELDS)
        inner = set(spec) - _TOOL_FIELDS if "function" in tool else set()
        for extra in sorted(outer | inner):
            raise ParamError(f"{where}.{extra}", "not a field of a function tool")
        if spec.get("strict") is not None and not isinstance(spec.get("strict"), bool):
            raise ParamError(f"{where}.strict", "a boolean")
        name, description = spec.get("name"), spec.get("description")
        description = "" if description is None else description
        parameters = spec.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(name, str) or not name:
            raise ParamError(f"{where}.name", "the tool's name")
        if not isinstance(description, str):
            raise ParamError(f"{where}.description", "a string")
        if not isinstance(parameters, dict):
            raise ParamError(f"{where}.parameters", "a JSON schema object")
        out.append(ToolDefinition(name, description, parameters))
    return tuple(out)


def names(tools: tuple[ToolDefinition, ...]) -> frozenset[str]:
    return frozenset(t.name for t in tools)
