"""The calls' values as Ray carries them (overstory.wire), no Ray: every value comes back
equal, and the common ones are plain enough for msgpack alone (Ray pickles only what
msgpack cannot pack, which is what the layout avoids)."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from pydantic import BaseModel

from overstory.exceptions import InvalidMessage, UsageError
from overstory.messages import (
    AssistantMessage,
    Reply,
    ToolCall,
    ToolDefinition,
    ToolOutput,
    ToolReturn,
    TurnEvent,
    TurnRequest,
    Usage,
    UserMessage,
)
from overstory.wire import (
    events_of_wire,
    events_wire,
    messages_of_wire,
    messages_wire,
    of_wire,
    reply_of_wire,
    reply_wire,
    request_of_wire,
    request_wire,
)


class Answer(BaseModel):
    value: int


def plain(wire: Any) -> bool:
    """Whether msgpack packs ``wire`` with no fallback (``strict_types``: a tuple or any
    other object raises), i.e. Ray would not pickle any of it."""
    try:
        msgpack.packb(wire, strict_types=True)
    except TypeError:
        return False
    return True


CALL = ToolCall("call_1", "lookup", {"q": "ray", "n": [1, 2.5, None, True]})
CLIENT_CALL = ToolCall("call_2", "open_file", {"path": "a.txt"}, client=True)
MESSAGES = (
    UserMessage(content="hi", seq=0, turn_id="t0", created_at=1.5),
    AssistantMessage(
        content="",
        tool_calls=(CALL, CLIENT_CALL),
        usage=Usage(10, 3),
        model="offline:x",
        seq=1,
        turn_id="t0",
    ),
    ToolReturn(tool_call_id="call_1", tool_name="lookup", content="42", is_error=True, seq=2),
    AssistantMessage(content="cut", incomplete="cancelled", seq=3, turn_id="t0", hidden=True),
)


def test_a_plain_turn_request_is_plain_and_comes_back_equal() -> None:
    request = TurnRequest("t1", "hello", "caller-1", 3, 1, {"traceparent": "00-ab-cd-01"})
    wire = request_wire(request)
    assert plain(wire)
    assert request_of_wire(wire) == request
    assert wire[-1] is None  # no other field set: nothing more is sent


def test_every_field_of_a_request_comes_back_equal() -> None:
    request = TurnRequest(
        "t2",
        "",
        None,
        0,
        None,
        None,
        "v2",
        "fast",
        settings={"temperature": 0.2, "stop": ["x"]},
        output_type=Answer,
        tools=(ToolDefinition("open_file", "opens", {"type": "object"}),),
        tool_outputs=(ToolOutput("call_2", "text", is_error=True),),
        instructions="be brief",
        hide=(1, 3),
        append=MESSAGES,
    )
    back = request_of_wire(request_wire(request))
    assert back == request
    assert back.append == MESSAGES
    assert isinstance(back.append, tuple)
    # A set field equal to its default is not sent, and one that differs is (None vs {}).
    assert request_wire(TurnRequest("t", "x", settings={}))[-1] == {"settings": {}}


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (TurnRequest("t", "x"), r"a list of 9\), got TurnRequest"),
        (["t", "x"], r"a list of 9\), got list"),
        (["t", "x", None, 0, None, None, None, None, {"colour": "red"}], "must be among"),
        (["t", "x", None, 0, None, None, None, None, ["settings"]], "must be among"),
    ],
)
def test_a_request_not_laid_out_by_the_wire_is_refused_by_name(wire: Any, match: str) -> None:
    with pytest.raises(InvalidMessage, match=match):
        request_of_wire(wire)


def test_messages_of_every_kind_are_plain_and_come_back_equal() -> None:
    wire = messages_wire(MESSAGES)
    assert plain(wire)
    assert messages_of_wire(wire) == list(MESSAGES)
    with pytest.raises(ValueError, match="unknown message kind 7"):
        messages_of_wire([[7, 0, "t", 0.0, False]])


def test_a_reply_is_plain_and_comes_back_equal_its_structured_output_too() -> None:
    reply = Reply(
        text="done",
        turn_id="t0",
        messages=MESSAGES,
        usage=Usage(12, 4),
        agent="a",
        agent_version="v1",
        incomplete="",
        awaiting=(CLIENT_CALL,),
    )
    wire = reply_wire(reply)
    assert plain(wire)
    assert reply_of_wire(wire) == reply
    structured = Reply("{}", "t1", (), Usage(), output=Answer(value=3))
    back = reply_of_wire(reply_wire(structured))
    assert back == structured
    assert back.output == Answer(value=3)


def test_a_polls_events_are_plain_and_come_back_equal() -> None:
    reply = Reply("hi", "t0", MESSAGES[:1], Usage(1, 1))
    events = [
        TurnEvent("t0", 0, "started"),
        TurnEvent("t0", 1, "delta", text="h", model="offline:x"),
        TurnEvent("t0", 2, "tool_call", tool_call=CALL),
        TurnEvent("t0", 3, "tool_result", tool_call=CALL, tool_return=MESSAGES[2]),  # type: ignore[arg-type]
        TurnEvent("t0", 4, "failed", text="model down", retryable=False),
        TurnEvent("t0", 5, "completed", reply=reply),
    ]
    wire = events_wire((events, True))
    assert plain(wire)
    assert events_of_wire(wire) == (events, True)
    assert events_of_wire(events_wire(([], False))) == ([], False)


def test_an_answer_that_is_not_a_wire_is_refused_naming_the_version_mismatch() -> None:
    reply = Reply("hi", "t0", (), Usage())
    assert of_wire(reply_wire(reply), reply_of_wire, "send") == reply
    with pytest.raises(UsageError, match="send on c answered a Reply, not the list"):
        of_wire(reply, reply_of_wire, "send on c")  # an older actor's pickled Reply
