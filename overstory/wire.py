"""The conversation calls' values as Ray carries them: lists of plain values.

A turn's request goes from the client to a conversation's actor, and its reply, events
and messages come back, once per call: on a busy client that crossing is the cost that
bounds how many turns a second one process can send (``bench/turns.py``). Ray packs
lists, dicts, strings, numbers, booleans and ``None`` with msgpack, and pickles any other
object (a dataclass, a tuple) with its class reference: pickling a
:class:`~overstory.messages.TurnRequest` cost 17 µs where its fields as a list cost
2.5 µs, and a two-message :class:`~overstory.messages.Reply` 41 µs, paid again to
unpickle on the other side.

So the calls carry these lists instead: ``*_wire`` builds one, ``*_of_wire`` rebuilds the
value. A field that is not plain (a turn's ``output_type``, its client tools) stays an
object inside the list, which Ray pickles on its own, so every value crosses exactly as
it was; only the common fields are laid out flat. The lists are positional and private
to one version of overstory: client and actors of a cluster run the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any, TypeVar

from .exceptions import InvalidMessage, UsageError
from .messages import (
    AssistantMessage,
    Message,
    Reply,
    ToolCall,
    ToolReturn,
    TurnEvent,
    TurnRequest,
    Usage,
    UserMessage,
)

__all__ = [
    "Wire",
    "events_of_wire",
    "events_wire",
    "message_of_wire",
    "message_wire",
    "messages_of_wire",
    "messages_wire",
    "of_wire",
    "reply_of_wire",
    "reply_wire",
    "request_of_wire",
    "request_wire",
]

#: A value as a call carries it: a list of plain values (see the module).
Wire = list[Any]
T = TypeVar("T")


def of_wire(answer: Any, rebuild: Callable[[Wire], T], what: str) -> T:
    """``rebuild(answer)``, the value ``what`` (a call) answered; :class:`UsageError`
    when the answer is not a wire: the actor that gave it runs another version."""
    if not isinstance(answer, list):
        raise UsageError(
            f"{what} answered a {type(answer).__name__}, not the list overstory.wire lays "
            "out: its actors run another version of overstory (`overstory serve` with this "
            "one replaces them)"
        )
    return rebuild(answer)


# A request's fields after the first eight, sent by name only when not their default.
_REQUEST_REST = {f.name: f.default for f in fields(TurnRequest)[8:]}


def request_wire(request: TurnRequest) -> Wire:
    rest: dict[str, Any] = {}
    for name, default in _REQUEST_REST.items():
        value = getattr(request, name)
        if not (value is default or value == default):
            rest[name] = messages_wire(value) if name == "append" else value
    return [
        request.turn_id,
        request.text,
        request.caller,
        request.n,
        request.low,
        request.carrier,
        request.agent_version,
        request.model,
        rest or None,
    ]


def request_of_wire(wire: Wire) -> TurnRequest:
    """The request :func:`request_wire` laid out; :class:`InvalidMessage` for anything
    else (an actor's caller may skip the client: the entity checks the fields next)."""
    if not isinstance(wire, list) or len(wire) != 9:
        raise InvalidMessage(
            f"a turn request must come as overstory.wire lays it out (a list of 9), got "
            f"{type(wire).__name__}: is the caller running another version of overstory?"
        )
    turn_id, text, caller, n, low, carrier, agent_version, model, rest = wire
    if rest is None:
        rest = {}
    elif not isinstance(rest, dict) or not rest.keys() <= _REQUEST_REST.keys():
        raise InvalidMessage(f"a turn request's other fields must be among {sorted(_REQUEST_REST)}")
    elif "append" in rest:
        rest = {**rest, "append": tuple(messages_of_wire(rest["append"]))}
    return TurnRequest(turn_id, text, caller, n, low, carrier, agent_version, model, **rest)


def _call_wire(call: ToolCall) -> Wire:
    return [call.id, call.name, call.arguments, call.client]


def _call_of_wire(wire: Wire) -> ToolCall:
    return ToolCall(wire[0], wire[1], wire[2], wire[3])


# The kinds, first in a message's list.
_USER, _ASSISTANT, _TOOL = 0, 1, 2


def message_wire(m: Message) -> Wire:
    if isinstance(m, UserMessage):
        return [_USER, m.seq, m.turn_id, m.created_at, m.hidden, m.content]
    if isinstance(m, AssistantMessage):
        return [
            _ASSISTANT,
            m.seq,
            m.turn_id,
            m.created_at,
            m.hidden,
            m.content,
            [_call_wire(c) for c in m.tool_calls],
            m.usage.input_tokens,
            m.usage.output_tokens,
            m.model,
            m.incomplete,
        ]
    return [
        _TOOL,
        m.seq,
        m.turn_id,
        m.created_at,
        m.hidden,
        m.tool_call_id,
        m.tool_name,
        m.content,
        m.is_error,
    ]


def message_of_wire(wire: Wire) -> Message:
    kind = wire[0]
    meta: dict[str, Any] = {
        "seq": wire[1],
        "turn_id": wire[2],
        "created_at": wire[3],
        "hidden": wire[4],
    }
    if kind == _USER:
        return UserMessage(content=wire[5], **meta)
    if kind == _ASSISTANT:
        return AssistantMessage(
            content=wire[5],
            tool_calls=tuple(_call_of_wire(c) for c in wire[6]),
            usage=Usage(wire[7], wire[8]),
            model=wire[9],
            incomplete=wire[10],
            **meta,
        )
    if kind == _TOOL:
        return ToolReturn(
            tool_call_id=wire[5],
            tool_name=wire[6],
            content=wire[7],
            is_error=wire[8],
            **meta,
        )
    raise ValueError(f"unknown message kind {kind!r} on the wire")


def messages_wire(messages: Any) -> Wire:
    """``messages`` (any sequence of them) as a list of :func:`message_wire` s."""
    return [message_wire(m) for m in messages]


def messages_of_wire(wire: Wire) -> list[Message]:
    return [message_of_wire(m) for m in wire]


def reply_wire(reply: Reply) -> Wire:
    return [
        reply.text,
        reply.turn_id,
        messages_wire(reply.messages),
        reply.usage.input_tokens,
        reply.usage.output_tokens,
        reply.agent,
        reply.agent_version,
        reply.incomplete,
        reply.output,
        [_call_wire(c) for c in reply.awaiting],
    ]


def reply_of_wire(wire: Wire) -> Reply:
    text, turn_id, messages, input_tokens, output_tokens = wire[:5]
    agent, agent_version, incomplete, output, awaiting = wire[5:]
    return Reply(
        text=text,
        turn_id=turn_id,
        messages=tuple(messages_of_wire(messages)),
        usage=Usage(input_tokens, output_tokens),
        agent=agent,
        agent_version=agent_version,
        incomplete=incomplete,
        output=output,
        awaiting=tuple(_call_of_wire(c) for c in awaiting),
    )


def _event_wire(e: TurnEvent) -> Wire:
    return [
        e.turn_id,
        e.seq,
        e.type,
        e.text,
        e.model,
        None if e.tool_call is None else _call_wire(e.tool_call),
        None if e.tool_return is None else message_wire(e.tool_return),
        None if e.reply is None else reply_wire(e.reply),
        e.retryable,
    ]


def _event_of_wire(wire: Wire) -> TurnEvent:
    turn_id, seq, type_, text, model, call, returned, reply, retryable = wire
    tool_return = None if returned is None else message_of_wire(returned)
    assert tool_return is None or isinstance(tool_return, ToolReturn)
    return TurnEvent(
        turn_id,
        seq,
        type_,
        text,
        model,
        None if call is None else _call_of_wire(call),
        tool_return,
        None if reply is None else reply_of_wire(reply),
        retryable,
    )


def events_wire(answer: tuple[list[TurnEvent], bool]) -> Wire:
    """A poll's answer, ``(events, ended)``."""
    events, ended = answer
    return [[_event_wire(e) for e in events], ended]


def events_of_wire(wire: Wire) -> tuple[list[TurnEvent], bool]:
    events, ended = wire
    return [_event_of_wire(e) for e in events], ended
