"""The messages of a conversation, as small immutable values.

A conversation's history is a sequence of :data:`Message`: the user's messages, the
model's replies (which may ask for tool calls) and the tools' returns. Each message
carries where it sits in its conversation (``seq``, dense from 0) and the turn it belongs
to (``turn_id``); the store keys records by ``(conversation id, seq)``.

These classes are stdlib dataclasses on purpose: conversation actors build thousands of
them and pickle them across Ray, and they are the store's record format via
:func:`to_record` / :func:`from_record`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeAlias

__all__ = [
    "TERMINAL_EVENTS",
    "AssistantMessage",
    "Message",
    "MessageKind",
    "ModelResponse",
    "Reply",
    "ToolCall",
    "ToolDefinition",
    "ToolOutput",
    "ToolReturn",
    "TurnEvent",
    "TurnEventType",
    "TurnRequest",
    "Usage",
    "UserMessage",
    "from_record",
    "to_record",
]

MessageKind: TypeAlias = Literal["user", "assistant", "tool"]


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one model call (or a whole turn, when summed) consumed."""

    input_tokens: int = 0
    output_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens, self.output_tokens + other.output_tokens
        )


@dataclass(frozen=True, slots=True)
class ToolDefinition:
    """What a model is told about a tool: its name, description and JSON schema."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """The model asking for one tool to be run with ``arguments`` (a JSON object).
    ``client``: a tool the caller offered for this turn (not the agent's own), which
    the caller runs: the turn ends on it, and the caller's next turn brings its output
    (:class:`ToolOutput`)."""

    id: str
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    client: bool = False


@dataclass(frozen=True, slots=True)
class ToolOutput:
    """What the caller's run of a client tool returned, for the call ``call_id``."""

    call_id: str
    output: str
    is_error: bool = False


@dataclass(frozen=True, slots=True)
class ModelResponse:
    """What a model returns for one request; becomes an :class:`AssistantMessage`."""

    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    usage: Usage = Usage()
    model: str = ""
    finish_reason: str = "stop"


@dataclass(frozen=True, kw_only=True, slots=True)
class _Stored:
    seq: int = -1
    turn_id: str = ""
    created_at: float = field(default_factory=time.time)
    hidden: bool = False
    """Deleted by its owner (a tombstone): kept in the store for audit, never shown to
    the model or listed as an item again."""


@dataclass(frozen=True, kw_only=True, slots=True)
class UserMessage(_Stored):
    """A message from the user."""

    content: str
    kind: Literal["user"] = "user"


@dataclass(frozen=True, kw_only=True, slots=True)
class AssistantMessage(_Stored):
    """A reply from the model: text, tool calls, or both."""

    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    usage: Usage = Usage()
    model: str = ""
    incomplete: str = ""
    """Why the answer was cut short (the model failed mid-stream, or the turn was
    cancelled); empty for a whole answer. An incomplete answer ends its turn."""
    kind: Literal["assistant"] = "assistant"


@dataclass(frozen=True, kw_only=True, slots=True)
class ToolReturn(_Stored):
    """A tool's result (or its error, with ``is_error``) for the call ``tool_call_id``."""

    tool_call_id: str
    tool_name: str
    content: str
    is_error: bool = False
    kind: Literal["tool"] = "tool"


Message: TypeAlias = UserMessage | AssistantMessage | ToolReturn


def placed(message: Message, *, seq: int, turn_id: str) -> Message:
    """The same message, placed at ``seq`` of turn ``turn_id``."""
    return replace(message, seq=seq, turn_id=turn_id)


def to_record(message: Message) -> dict[str, Any]:
    """A JSON-safe dict for the store: ``seq``, ``turn_id``, ``kind``, ``created_at``, ``body``."""
    if isinstance(message, UserMessage):
        body: dict[str, Any] = {"content": message.content}
    elif isinstance(message, AssistantMessage):
        body = {
            "content": message.content,
            "tool_calls": [_call_record(c) for c in message.tool_calls],
            "usage": [message.usage.input_tokens, message.usage.output_tokens],
            "model": message.model,
        }
        if message.incomplete:
            body["incomplete"] = message.incomplete
    else:
        body = {
            "tool_call_id": message.tool_call_id,
            "tool_name": message.tool_name,
            "content": message.content,
            "is_error": message.is_error,
        }
    return {
        "seq": message.seq,
        "turn_id": message.turn_id,
        "kind": message.kind,
        "created_at": message.created_at,
        "body": json.dumps(body, ensure_ascii=False, separators=(",", ":")),
    }


def _call_record(call: ToolCall) -> dict[str, Any]:
    record: dict[str, Any] = {"id": call.id, "name": call.name, "arguments": call.arguments}
    if call.client:  # only then: records of the agent's own calls stay as they were
        record["client"] = True
    return record


def from_record(record: dict[str, Any]) -> Message:
    """Rebuild a message from :func:`to_record`'s dict (as read back from a store)."""
    body = json.loads(record["body"])
    meta: dict[str, Any] = {
        "seq": int(record["seq"]),
        "turn_id": str(record["turn_id"]),
        "created_at": float(record["created_at"]),
        "hidden": bool(record.get("hidden", False)),
    }
    kind = record["kind"]
    if kind == "user":
        return UserMessage(content=body["content"], **meta)
    if kind == "assistant":
        return AssistantMessage(
            content=body["content"],
            tool_calls=tuple(
                ToolCall(
                    id=c["id"],
                    name=c["name"],
                    arguments=c["arguments"],
                    client=bool(c.get("client", False)),
                )
                for c in body["tool_calls"]
            ),
            usage=Usage(*body["usage"]),
            model=body["model"],
            incomplete=str(body.get("incomplete", "")),
            **meta,
        )
    if kind == "tool":
        return ToolReturn(
            tool_call_id=body["tool_call_id"],
            tool_name=body["tool_name"],
            content=body["content"],
            is_error=body["is_error"],
            **meta,
        )
    raise ValueError(f"unknown message kind {kind!r} in stored record seq={record.get('seq')}")


@dataclass(frozen=True, slots=True)
class TurnRequest:
    """One turn as a caller asks for it, the same for both placements: the client makes
    it, a transport carries it, the conversation entity runs it."""

    turn_id: str
    """Idempotency key: the same id is never stored twice."""
    text: str
    """The user's message."""
    caller: str | None = None
    """The client handle that sent it: with ``n`` and ``low``, orders that handle's
    turns (:class:`~overstory.conversation.gate.TurnGate`)."""
    n: int = 0
    """This turn's number among ``caller``'s."""
    low: int | None = None
    """The lowest number ``caller`` still has in flight."""
    carrier: dict[str, str] | None = None
    """The caller's trace context (W3C): the turn's spans become its children."""
    agent_version: str | None = None
    """The agent version the caller chose for this turn (else the rollout's)."""
    model: str | None = None
    """The model the caller chose for this turn: a name in the agent's ``models``
    (else the agent's ``route``'s choice, else its own model)."""
    settings: dict[str, Any] | None = None
    """This turn's model settings (``ModelSettings`` fields), over the agent's."""
    output_type: Any = None
    """The structured output this turn's answer must be (else the agent's, if any)."""
    tools: tuple[ToolDefinition, ...] = ()
    """Client tools offered to the model beside the agent's own for this turn: a call
    to one ends the turn (:attr:`Reply.awaiting`), for the caller to run."""
    tool_outputs: tuple[ToolOutput, ...] = ()
    """The outputs of the client calls the conversation's last turn ended on: this turn
    continues from them (its ``text`` is empty)."""
    instructions: str = ""
    """This turn's own instructions, with the agent's as its ``caller_instructions``
    says (after them, instead of them, or refused)."""
    hide: tuple[int, ...] = ()
    """The ``seq`` s of stored messages to hide (tombstones: kept for audit, never
    shown again); its ``text`` is empty."""
    append: tuple[Message, ...] = ()
    """Messages to store after the history as this turn, with no model call (a
    caller's items: its own history, or a conversation's first messages); its ``text``
    is empty. Idempotent as any turn: the same ``turn_id`` is stored once."""


@dataclass(frozen=True, slots=True)
class Reply:
    """The result of one turn: the final text, every message the turn stored, its usage,
    and the agent (name and version) that answered."""

    text: str
    turn_id: str
    messages: tuple[Message, ...]
    usage: Usage
    agent: str = ""
    agent_version: str = ""
    incomplete: str = ""
    """Why the answer was cut short (see :attr:`AssistantMessage.incomplete`); empty
    when it is whole."""
    output: Any = None
    """With structured output (``output_type``): the answer, validated (``text`` is its
    JSON); else ``None``."""
    awaiting: tuple[ToolCall, ...] = ()
    """The client tools' calls the turn ended on (``TurnRequest.tools``): the caller
    runs them and continues with their outputs (``TurnRequest.tool_outputs``)."""

    def __str__(self) -> str:
        return self.text

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        """Every tool call the model made during the turn, in order."""
        return tuple(
            c for m in self.messages if isinstance(m, AssistantMessage) for c in m.tool_calls
        )


#: What happens during a turn, in the order a reader sees it: ``started``; ``delta`` (a
#: piece of the model's text); ``tool_call`` and its ``tool_result``; ``fallback`` (a
#: model of the chain failed before its first token, the next one answers);
#: ``restarted`` (the process running the turn died: text since the last stored message
#: is void, the turn goes on); and one terminal event: ``completed`` (with the
#: :class:`Reply`), ``failed`` or ``incomplete`` (with the reason).
TurnEventType: TypeAlias = Literal[
    "started",
    "delta",
    "tool_call",
    "tool_result",
    "fallback",
    "progress",
    "restarted",
    "completed",
    "failed",
    "incomplete",
]
TERMINAL_EVENTS: frozenset[str] = frozenset({"completed", "failed", "incomplete"})


@dataclass(frozen=True, slots=True)
class TurnEvent:
    """One event of a turn; ``seq`` counts from 0 within the turn, so a reader that
    saw up to ``seq`` N resumes after N."""

    turn_id: str
    seq: int
    type: TurnEventType
    text: str = ""
    """``delta``: the text; ``progress``: what a tool reported (``RunContext.report``);
    ``fallback``, ``failed``, ``incomplete``: the reason."""
    model: str = ""
    """``delta``: the model answering; ``fallback``: the model that failed."""
    tool_call: ToolCall | None = None
    """``tool_call`` and ``tool_result``: the call."""
    tool_return: ToolReturn | None = None
    """``tool_result``: what the tool returned (``is_error`` when it failed)."""
    reply: Reply | None = None
    """``completed``: the turn's reply, as ``send`` returns it."""
    retryable: bool = True
    """``failed``: whether sending the turn again may succeed (a model down or overloaded:
    yes; bad input, a model refusing the request itself: no)."""

    @property
    def terminal(self) -> bool:
        """Whether the turn ended with this event."""
        return self.type in TERMINAL_EVENTS
