"""Checks on everything that comes from outside: user ids and messages.

Each check raises a :class:`~overstory.exceptions.UsageError` subclass whose message names
the problem and shows (a prefix of) the offending value.
"""

from __future__ import annotations

import re
import unicodedata
from typing import TYPE_CHECKING

from .exceptions import InvalidMessage, InvalidUserId, UsageError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .messages import ToolDefinition, TurnRequest

__all__ = [
    "MAX_MESSAGE_CHARS",
    "MAX_USER_ID_CHARS",
    "check_client_tools",
    "validate_message",
    "validate_turn",
    "validate_user_id",
]

MAX_USER_ID_CHARS = 256
MAX_MESSAGE_CHARS = 32_000


def _show(value: str, limit: int = 40) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _control_chars(value: str, categories: tuple[str, ...], allow: str = "") -> list[str]:
    return [
        f"U+{ord(ch):04X}"
        for ch in value
        if ch not in allow and unicodedata.category(ch) in categories
    ]


#: The characters of Unicode categories Cc (controls: these two ranges, fixed by Unicode's
#: stability policy) and Cs (surrogates), but newline, carriage return and tab: what a
#: message may not hold, found by one regex search instead of a category lookup per
#: character (~0.1 ms a kilobyte; tests/test_validation.py checks it is the same rule).
MESSAGE_REFUSED = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def _checked_text(
    value: object,
    error: type[UsageError],
    name: str,
    max_chars: int,
    categories: tuple[str, ...],
    *,
    article: str = "",
    allow: str = "",
    refused: re.Pattern[str] | None = None,
) -> str:
    """``value`` if it is a non-blank string of at most ``max_chars`` characters with none
    in the Unicode ``categories`` (but those in ``allow``), else ``error`` naming it.
    ``refused``: a pattern matching exactly those characters, searched first."""
    if not isinstance(value, str):
        raise error(f"{article}{name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise error(f"{article}{name} must not be empty or blank, got {value!r}")
    if len(value) > max_chars:
        raise error(f"{name} is {len(value)} characters, the limit is {max_chars}: {_show(value)}")
    if refused is not None and refused.search(value) is None:
        return value
    bad = _control_chars(value, categories, allow)
    if bad:
        raise error(
            f"{name} contains control or invalid characters ({', '.join(bad[:5])}): {_show(value)}"
        )
    return value


def validate_user_id(user_id: object, *, max_chars: int = MAX_USER_ID_CHARS) -> str:
    """The user id itself if it can name a conversation, else :class:`InvalidUserId`."""
    user_id = _checked_text(user_id, InvalidUserId, "user id", max_chars, ("Cc", "Cf", "Cs", "Co"))
    if user_id != user_id.strip():
        raise InvalidUserId(f"user id has leading or trailing whitespace: {user_id!r}")
    return user_id


def validate_message(text: object, *, max_chars: int = MAX_MESSAGE_CHARS) -> str:
    """The message itself if it can be sent, else :class:`InvalidMessage`.

    Newlines and tabs are fine; other control characters (NUL, escape sequences) and lone
    surrogates are not. Format characters (zero-width joiners in emoji) are allowed in
    messages but not in user ids, where invisible characters would let two ids look alike.
    """
    return _checked_text(
        text,
        InvalidMessage,
        "message",
        max_chars,
        ("Cc", "Cs"),
        article="a ",
        allow="\n\r\t",
        refused=MESSAGE_REFUSED,
    )


#: A tool call's id as vendors make them (OpenAI ``call_...``, Anthropic ``toolu_...``).
_CALL_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")

#: What a client tool may be called (OpenAI's rule for function names).
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

#: The most client tools one turn may offer (OpenAI's own limit).
MAX_CLIENT_TOOLS = 128

#: The most messages one append may store (OpenAI's items.create takes 20 items; a
#: caller's history sent as a response's input may be longer).
MAX_APPENDED = 1000


def check_client_tools(tools: Sequence[ToolDefinition]) -> None:
    """:class:`InvalidMessage` unless ``tools`` can be offered for a turn: at most
    :data:`MAX_CLIENT_TOOLS`, each named by OpenAI's rule, no name twice, a
    JSON-schema object for each."""
    if len(tools) > MAX_CLIENT_TOOLS:
        raise InvalidMessage(f"at most {MAX_CLIENT_TOOLS} client tools, got {len(tools)}")
    seen: set[str] = set()
    for tool in tools:
        if not isinstance(tool.name, str) or not _TOOL_NAME.fullmatch(tool.name):
            raise InvalidMessage(
                f"a client tool's name must be 1-64 letters, digits, '_' or '-', "
                f"got {tool.name!r:.80}"
            )
        if tool.name in seen:
            raise InvalidMessage(f"client tool {tool.name!r} is given twice")
        seen.add(tool.name)
        if not isinstance(tool.parameters, dict) or not isinstance(tool.description, str):
            raise InvalidMessage(f"client tool {tool.name!r:.64}: parameters must be an object")


def validate_turn(request: TurnRequest, *, max_chars: int = MAX_MESSAGE_CHARS) -> None:
    """:class:`InvalidMessage` unless ``request`` can run: its text is a message, or —
    a turn continuing from client tools' outputs — it has no text and each output is a
    call id and a text of at most ``max_chars``; at most :data:`MAX_CLIENT_TOOLS` client
    tools, each with a JSON-schema object."""
    check_client_tools(request.tools)
    if request.hide:
        if request.text or request.tool_outputs or request.append:
            raise InvalidMessage("a turn that hides messages does nothing else")
        if len(request.hide) > MAX_APPENDED or not all(
            isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 for seq in request.hide
        ):
            raise InvalidMessage(f"hide takes up to {MAX_APPENDED} message seqs (ints >= 0)")
        return
    if request.append:
        if request.text or request.tool_outputs:
            raise InvalidMessage("a turn that appends messages has no text or tool outputs")
        if len(request.append) > MAX_APPENDED:
            raise InvalidMessage(
                f"at most {MAX_APPENDED} messages at once, got {len(request.append)}"
            )
        for message in request.append:
            if len(message.content) > max_chars:
                raise InvalidMessage(f"a message of at most {max_chars} characters")
        return
    if not request.tool_outputs:
        validate_message(request.text, max_chars=max_chars)
        return
    if request.text:
        raise InvalidMessage("a turn continuing from tool outputs has no text of its own")
    for output in request.tool_outputs:
        if not isinstance(output.call_id, str) or not _CALL_ID.fullmatch(output.call_id):
            raise InvalidMessage(f"tool output: not a call id: {output.call_id!r:.80}")
        if not isinstance(output.output, str) or len(output.output) > max_chars:
            raise InvalidMessage(
                f"tool output for {output.call_id}: a text of at most {max_chars} characters"
            )
