"""OpenAI's Responses and Conversations shapes, built from overstory's turns (pure).

A response is one turn: its id names the conversation and the turn
(``resp_<conversation hex><turn hex>``), so finding it needs no lookup. Its output and
its stream events are computed from the turn's events (:class:`~overstory.TurnEvent`)
by one :class:`ResponseStream`: a reader that resumes after sequence number N replays
the turn's events through a fresh one and skips what it saw, so every reader gets the
same events with the same numbers. A conversation's items are its stored messages.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..access import CONVERSATION_ID
from ..exceptions import UsageError
from ..messages import AssistantMessage, Message, ToolCall, ToolReturn, TurnEvent, UserMessage
from ..output import check_output_type
from ..providers.base import ModelSettings
from ..providers.schema import OutputSchema

__all__ = [
    "DEFAULT_ECHO",
    "MAX_JSON_DEPTH",
    "SERVER_LABEL",
    "ParamError",
    "ResponseStream",
    "TurnOptions",
    "conversation_items",
    "conversation_of",
    "item_seq",
    "json_int",
    "new_response_id",
    "page",
    "sse",
    "too_deep",
    "tool_choice",
    "turn_options",
]


#: The deepest nesting a request body may have (OpenAI's own bodies need under 10).
MAX_JSON_DEPTH = 64


def too_deep(raw: bytes, limit: int) -> bool:
    """Whether JSON text ``raw`` nests arrays and objects deeper than ``limit`` (strings
    skipped): checked before parsing, whose recursion a hostile body would exhaust.
    Bodies with fewer brackets than ``limit`` are not scanned."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    depth, in_string, escaped = 0, False, False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


class ParamError(UsageError):
    """A request parameter the door refuses; ``param`` names it (OpenAI's ``param``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class TurnOptions:
    """What a Responses request asks of its turn beyond the text: model settings (the
    fields set) and the structured output's schema."""

    settings: dict[str, Any] | None = None
    output: OutputSchema | None = None
    instructions: str = ""

    @property
    def any(self) -> bool:
        return self.settings is not None or self.output is not None or bool(self.instructions)


#: Parameters the door handles itself (model, input, stream, background, conversation,
#: previous_response_id, store, metadata, tools) or maps to the turn (the rest).
_TAKEN = frozenset(
    {
        "model",
        "input",
        "stream",
        "background",
        "conversation",
        "previous_response_id",
        "store",
        "metadata",
        "tools",
        "instructions",
        "temperature",
        "max_output_tokens",
        "text",
        "tool_choice",
        "parallel_tool_calls",
        "include",
    }
)

#: Parameters accepted only at the value that asks for nothing the door does not do;
#: any other value is refused by name, never accepted and ignored.
_DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "top_p": (None, 1, 1.0),
    "truncation": (None, "auto"),  # the context is always fitted to the model's window
    "reasoning": (None,),
    "user": (None,),
    "stream_options": (None,),
}

#: ``include`` values: those naming what the door never makes (reasoning, hosted
#: tools' results) include nothing, as for any response without such items; the rest
#: (log probabilities) are refused.
_INCLUDE_NOTHING = frozenset(
    {
        "reasoning.encrypted_content",
        "file_search_call.results",
        "web_search_call.results",
        "web_search_call.action.sources",
        "code_interpreter_call.outputs",
        "computer_call_output.output.image_url",
        "message.input_image.image_url",
    }
)


def turn_options(body: dict[str, Any]) -> TurnOptions:
    """The turn options a Responses body asks for; :class:`ParamError` naming the first
    parameter the door does not support (or a value it does not take)."""
    for key, value in body.items():
        if key in _TAKEN:
            continue
        if key not in _DEFAULT_ONLY:
            raise ParamError(key, f"unknown parameter {key!r} (not supported by this door)")
        if (
            not any(
                value == allowed and type(value) is type(allowed) for allowed in _DEFAULT_ONLY[key]
            )
            and value is not None
        ):
            raise ParamError(
                key, f"{value!r:.80} is not supported by this door (see the compatibility table)"
            )
    include = [] if body.get("include") is None else body["include"]
    if not isinstance(include, list) or not all(isinstance(i, str) for i in include):
        raise ParamError("include", "a list of strings")
    for value in include:
        if value not in _INCLUDE_NOTHING:
            raise ParamError("include", f"{value!r:.80} is not supported by this door")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise ParamError("instructions", "a string")
    if body.get("store") not in (None, True, False):
        raise ParamError("store", "a boolean")
    settings: dict[str, Any] = {}
    chosen = {
        "temperature": body.get("temperature"),
        "max_output_tokens": json_int(body.get("max_output_tokens")),
        "tool_choice": tool_choice(body.get("tool_choice")),
        "parallel_tool_calls": body.get("parallel_tool_calls"),
    }
    for key, value in chosen.items():
        if value is not None:
            try:
                ModelSettings.of({key: value})
            except UsageError as exc:
                raise ParamError(key, str(exc)) from exc
            settings[key] = value
    return TurnOptions(settings or None, text_format(body.get("text")), instructions or "")


def json_int(value: Any) -> Any:
    """A JSON number that is an integer (``854.0`` is one, as JSON Schema counts) as an
    int; anything else as it is (the setting's own check then refuses what is wrong)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


def tool_choice(value: Any, param: str = "tool_choice") -> str | None:
    """``tool_choice`` in either API's shape as a setting: a mode, or the name of the
    function to call (``{"type": "function", "name": ...}``, or Chat Completions'
    ``{"type": "function", "function": {"name": ...}}``)."""
    if value is None or value in ("auto", "none", "required"):
        return value  # type: ignore[no-any-return]
    if isinstance(value, dict) and value.get("type") == "function":
        spec = value.get("function") if "function" in value else value
        name = spec.get("name") if isinstance(spec, dict) else None
        if isinstance(name, str) and name:
            return name
    raise ParamError(param, "'auto', 'none', 'required' or {'type': 'function', 'name': NAME}")


def text_format(text: Any) -> OutputSchema | None:
    """``text.format`` as an output schema: ``text`` none, ``json_object`` any JSON
    object, ``json_schema`` its schema (by its name)."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise ParamError("text", "an object with a 'format'")
    extra = sorted(k for k, v in text.items() if k != "format" and v is not None)
    if extra:
        raise ParamError(f"text.{extra[0]}", "not supported by this door")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputSchema("json_object", {"type": "object"})
    if kind != "json_schema":
        raise ParamError("text.format.type", "one of 'text', 'json_object', 'json_schema'")
    name, schema = fmt.get("name"), fmt.get("schema")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise ParamError("text.format.name", "1-64 letters, digits, '_' or '-'")
    if not isinstance(schema, dict):
        raise ParamError("text.format.schema", "a JSON schema object")
    try:
        return check_output_type(OutputSchema(name, schema))
    except UsageError as exc:
        raise ParamError("text.format.schema", str(exc)) from exc


_RESP = re.compile(r"resp_(?P<conv>[0-9a-f]{24})(?P<turn>[0-9a-f]{16})")


def new_response_id(conversation_id: str, now: float | None = None) -> str:
    """``resp_`` + the conversation's 24 hex + the creation second (8 hex) + 8 random
    hex: every reader derives the same ``created_at`` from the id alone."""
    match = CONVERSATION_ID.fullmatch(conversation_id)
    if match is None:
        raise UsageError(f"not a conversation id: {conversation_id!r:.60}")
    second = int(time.time() if now is None else now)
    return f"resp_{match['hex']}{second:08x}{secrets.token_hex(4)}"


def conversation_of(response_id: str) -> str:
    """The conversation a response id belongs to; UsageError for a malformed id."""
    match = _RESP.fullmatch(response_id) if isinstance(response_id, str) else None
    if match is None:
        raise UsageError(f"not a response id: {str(response_id)!r:.60}")
    return f"conv_{match['conv']}"


#: What a response repeats of a request that set nothing (OpenAI's defaults).
DEFAULT_ECHO: dict[str, Any] = {
    "instructions": None,
    "metadata": {},
    "previous_response_id": None,
    "tools": [],
    "tool_choice": "auto",
    "parallel_tool_calls": True,
    "temperature": None,
    "max_output_tokens": None,
    "text": {"format": {"type": "text"}},
    "truncation": "auto",
}


class ResponseStream:
    """One response's output and stream events, fed its turn's events in order.

    :meth:`feed` returns the stream events one turn event adds (each with the next
    ``sequence_number``); :meth:`snapshot` is the response object so far (what
    ``GET /v1/responses/{id}`` answers). The mapping: ``started`` opens the response;
    text deltas grow an assistant ``message`` item (opened at its first delta, closed by
    a tool call or the end); a tool call and its result are ``function_call`` and
    ``function_call_output`` items; ``restarted`` (the process running the turn died)
    drops the open message, whose text is void; the terminal event closes the response
    ``completed``, ``incomplete``, ``cancelled`` or ``failed``.
    """

    def __init__(
        self,
        response_id: str,
        model: str,
        *,
        store: bool = True,
        echo: dict[str, Any] | None = None,
    ) -> None:
        self.id = response_id
        self.store = store  # False: a stateless response, in no conversation
        self.echo = echo or {}  # what it repeats of its request (instructions, tools...)
        self.conversation = conversation_of(response_id)
        self.model = model
        self.created_at = int(response_id[-16:-8], 16)
        self.status = "in_progress"
        self.output: list[dict[str, Any]] = []
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, str] | None = None
        self.reason = ""
        self._open: dict[str, Any] | None = None  # the message item growing now
        self._calls: dict[str, dict[str, Any]] = {}  # the agent's calls still running
        self._seq = -1
        self._messages = 0

    # -- the response object -- #

    def snapshot(self) -> dict[str, Any]:
        incomplete = {"reason": None} if self.status in ("incomplete", "cancelled") else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "model": self.model,
            "output": [dict(item) for item in self.output],
            "conversation": {"id": self.conversation} if self.store else None,
            "store": self.store,
            "usage": self.usage,
            "error": self.error,
            "incomplete_details": incomplete,
            **DEFAULT_ECHO,
            "top_p": None,
            **self.echo,
            "metadata": {
                **self.echo.get("metadata", {}),
                **({"overstory_reason": self.reason} if self.reason else {}),
            },
        }

    # -- events -- #

    def feed(self, event: TurnEvent) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        kind = event.type
        if kind == "started":
            out.append(self._event("response.created", response=self.snapshot()))
            out.append(self._event("response.in_progress", response=self.snapshot()))
        elif kind == "delta":
            if self._open is None:
                out += self._open_message()
            assert self._open is not None
            self._open["content"][0]["text"] += event.text
            out.append(
                self._event(
                    "response.output_text.delta",
                    item_id=self._open["id"],
                    output_index=self.output.index(self._open),
                    content_index=0,
                    delta=event.text,
                    logprobs=[],
                )
            )
        elif kind == "tool_call" and event.tool_call is not None:
            out += self._close_message("completed")
            call = event.tool_call
            if call.client:  # the caller runs it: the response ends on it
                out += self._whole_item(function_call(call, f"fc_{call.id}"))
            else:  # one of the agent's own, run here: an MCP call, as OpenAI shows those
                item = mcp_call(call, f"mcp_{call.id}", None)
                self.output.append(item)
                self._calls[call.id] = item
                out.append(
                    self._event(
                        "response.output_item.added",
                        output_index=len(self.output) - 1,
                        item=dict(item),
                    )
                )
        elif kind == "tool_result" and event.tool_call is not None:
            running = self._calls.pop(event.tool_call.id, None)
            if running is not None:
                item = running
                item.update(_mcp_result(event.tool_return))
                out.append(
                    self._event(
                        "response.output_item.done",
                        output_index=self.output.index(item),
                        item=dict(item),
                    )
                )
        elif kind == "restarted":
            if self._open is not None:  # its text is void: the turn runs that part again
                self.output.remove(self._open)
                self._open = None
            for item in self._calls.values():  # run again, shown again
                self.output.remove(item)
            self._calls.clear()
            out.append(self._event("response.restarted", reason=event.text))
        elif kind == "completed":
            out += self._close_message("completed")
            self.status = "completed"
            if event.reply is not None:
                usage = event.reply.usage
                self.usage = {
                    "input_tokens": usage.input_tokens,
                    "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                    "output_tokens": usage.output_tokens,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": usage.input_tokens + usage.output_tokens,
                }
            out.append(self._event("response.completed", response=self.snapshot()))
        elif kind == "incomplete":
            out += self._close_message("incomplete")
            self.status = "cancelled" if event.text == "cancelled" else "incomplete"
            self.reason = event.text
            out.append(self._event("response.incomplete", response=self.snapshot()))
        elif kind == "failed":
            out += self._close_message("incomplete")
            self.status = "failed"
            self.error = {"code": "server_error", "message": event.text}
            out.append(self._event("response.failed", response=self.snapshot()))
        return out  # fallback events are the chain's business: nothing shown

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self._seq += 1
        return {"type": kind, "sequence_number": self._seq, **fields}

    def _open_message(self) -> list[dict[str, Any]]:
        self._messages += 1
        item = {
            "type": "message",
            "id": f"msg_{self.id[5:]}_{self._messages}",
            "role": "assistant",
            "status": "in_progress",
            "content": [{"type": "output_text", "text": "", "annotations": []}],
        }
        self.output.append(item)
        self._open = item
        index = len(self.output) - 1
        part = {"type": "output_text", "text": "", "annotations": []}
        return [
            self._event("response.output_item.added", output_index=index, item=_copy(item)),
            self._event(
                "response.content_part.added",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=part,
            ),
        ]

    def _close_message(self, status: str) -> list[dict[str, Any]]:
        item, self._open = self._open, None
        if item is None:
            return []
        item["status"] = status
        index = self.output.index(item)
        part = item["content"][0]
        return [
            self._event(
                "response.output_text.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                text=part["text"],
                logprobs=[],
            ),
            self._event(
                "response.content_part.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=dict(part),
            ),
            self._event("response.output_item.done", output_index=index, item=_copy(item)),
        ]

    def _whole_item(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        self.output.append(item)
        index = len(self.output) - 1
        return [
            self._event("response.output_item.added", output_index=index, item=dict(item)),
            self._event("response.output_item.done", output_index=index, item=dict(item)),
        ]


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    return {**item, "content": [dict(p) for p in item.get("content", ())]}


def sse(event: dict[str, Any]) -> bytes:
    """One stream event as OpenAI sends it: ``event:``, ``data:``, and its sequence
    number as the SSE ``id:`` (what ``Last-Event-ID`` sends back on a reconnect)."""
    data = json.dumps(event, separators=(",", ":"))
    return f"id: {event['sequence_number']}\nevent: {event['type']}\ndata: {data}\n\n".encode()


# --- conversation items -----------------------------------------------------------------


#: The ``server_label`` of the agent's own tools' calls, shown as MCP calls.
SERVER_LABEL = "overstory"


def function_call(call: ToolCall, item_id: str) -> dict[str, Any]:
    """A client tool's call: a ``function_call`` item, for the caller to run."""
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call.id,
        "name": call.name,
        "arguments": json.dumps(call.arguments),
        "status": "completed",
    }


def mcp_call(call: ToolCall, item_id: str, result: ToolReturn | None) -> dict[str, Any]:
    """One of the agent's own calls, run on the server: an ``mcp_call`` item (how
    OpenAI shows a tool it ran itself; a ``function_call`` would ask the caller to run
    it), with its result once there is one."""
    item = {
        "type": "mcp_call",
        "id": item_id,
        "server_label": SERVER_LABEL,
        "name": call.name,
        "arguments": json.dumps(call.arguments),
        "output": None,
        "error": None,
        "status": "in_progress",
    }
    if result is not None:
        item.update(_mcp_result(result))
    return item


def _mcp_result(result: ToolReturn | None) -> dict[str, Any]:
    if result is None:
        return {"status": "completed", "output": ""}
    if result.is_error:
        error = {
            "type": "mcp_tool_execution_error",
            "content": [{"type": "text", "text": result.content}],
        }
        return {"status": "failed", "error": error}
    return {"status": "completed", "output": result.content}


def conversation_items(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """A conversation's stored messages as items, oldest first; ids from their ``seq``.
    A client tool's call and its output are ``function_call`` and
    ``function_call_output`` items; the agent's own call is one ``mcp_call`` item
    holding its result (its return makes no item of its own)."""
    results = {m.tool_call_id: m for m in messages if isinstance(m, ToolReturn)}
    calls = {c.id for m in messages if isinstance(m, AssistantMessage) for c in m.tool_calls}
    client: set[str] = set()
    items: list[dict[str, Any]] = []
    for m in messages:
        if m.hidden:  # deleted by its owner: kept for audit, listed no more
            continue
        if isinstance(m, UserMessage):
            items.append(_message_item(m, "user", "input_text"))
        elif isinstance(m, AssistantMessage):
            if m.content or not m.tool_calls:
                items.append(_message_item(m, "assistant", "output_text"))
            for k, c in enumerate(m.tool_calls):
                if c.client:
                    client.add(c.id)
                    items.append(function_call(c, f"item_{m.seq}_{k}"))
                else:
                    items.append(mcp_call(c, f"item_{m.seq}_{k}", results.get(c.id)))
        elif isinstance(m, ToolReturn) and (
            m.tool_call_id in client or m.tool_call_id not in calls
        ):
            items.append(
                {
                    "type": "function_call_output",
                    "id": f"item_{m.seq}",
                    "call_id": m.tool_call_id,
                    "output": m.content,
                    "status": "incomplete" if m.is_error else "completed",
                }
            )
    return items


def _message_item(m: Message, role: str, part: str) -> dict[str, Any]:
    content: dict[str, Any] = {"type": part, "text": m.content}
    if part == "output_text":
        content["annotations"] = []
    incomplete = isinstance(m, AssistantMessage) and bool(m.incomplete)
    return {
        "type": "message",
        "id": f"item_{m.seq}",
        "role": role,
        "status": "incomplete" if incomplete else "completed",
        "content": [content],
    }


_ITEM_ID = re.compile(r"^item_(\d{1,12})(?:_\d{1,6})?$")


def item_seq(item_id: str) -> int | None:
    """The ``seq`` of the message an item id names (``None``: not an item id of ours)."""
    found = _ITEM_ID.match(item_id) if isinstance(item_id, str) else None
    return None if found is None else int(found.group(1))


def items_read(after: str | None, limit: int, order: str) -> dict[str, int | None]:
    """What to read from the store for one page of items (the ``history`` arguments):
    every message yields an item but the return of one of the agent's own calls (shown
    in its call's ``mcp_call`` item), which follows its call, so twice ``limit``, plus 2,
    messages from the one the ``after`` item belongs to (forward for ``asc``, backward
    for ``desc``) hold the page and tell whether there is more. An ``after`` that names
    no item of ours is refused."""
    seq = -1
    if after is not None:
        found = _ITEM_ID.match(after)
        if found is None:
            raise UsageError(f"after: no item {after!r:.60} in this conversation")
        seq = int(found.group(1))
    if order == "asc":
        return {
            "after": seq - 1 if after is not None else -1,
            "limit": 2 * limit + 2,
            "before": None,
        }
    return {"after": -1, "limit": 2 * limit + 2, "before": seq + 1 if after is not None else 2**62}


def page(
    items: list[dict[str, Any]], *, after: str | None, limit: int, order: str
) -> dict[str, Any]:
    """One page of ``items`` (oldest first) as OpenAI lists them: ``order`` ``asc`` or
    ``desc``, the ``limit`` items after the one whose id is ``after``."""
    ordered = items if order == "asc" else list(reversed(items))
    start = 0
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise UsageError(f"after: no item {after!r:.60} in this conversation")
        start = ids.index(after) + 1
    data = ordered[start : start + limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": start + limit < len(ordered),
    }
