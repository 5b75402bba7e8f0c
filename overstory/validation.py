"""Checks on everything that comes from outside: user ids and messages.

Each check raises a :class:`~overstory.exceptions.UsageError` subclass whose message names
the problem and shows (a prefix of) the offending value.
"""

from __future__ import annotations

import unicodedata

from .exceptions import InvalidMessage, InvalidUserId

__all__ = ["MAX_MESSAGE_CHARS", "MAX_USER_ID_CHARS", "validate_message", "validate_user_id"]

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


def validate_user_id(user_id: object, *, max_chars: int = MAX_USER_ID_CHARS) -> str:
    """The user id itself if it can name a conversation, else :class:`InvalidUserId`."""
    if not isinstance(user_id, str):
        raise InvalidUserId(f"user id must be a string, got {type(user_id).__name__}")
    if not user_id.strip():
        raise InvalidUserId(f"user id must not be empty or blank, got {user_id!r}")
    if len(user_id) > max_chars:
        raise InvalidUserId(
            f"user id is {len(user_id)} characters, the limit is {max_chars}: {_show(user_id)}"
        )
    bad = _control_chars(user_id, ("Cc", "Cf", "Cs", "Co"))
    if bad:
        raise InvalidUserId(
            f"user id contains control or invalid characters ({', '.join(bad[:5])}): "
            f"{_show(user_id)}"
        )
    if user_id != user_id.strip():
        raise InvalidUserId(f"user id has leading or trailing whitespace: {user_id!r}")
    return user_id


def validate_message(text: object, *, max_chars: int = MAX_MESSAGE_CHARS) -> str:
    """The message itself if it can be sent, else :class:`InvalidMessage`.

    Newlines and tabs are fine; other control characters (NUL, escape sequences) and lone
    surrogates are not. Format characters (zero-width joiners in emoji) are allowed in
    messages but not in user ids, where invisible characters would let two ids look alike.
    """
    if not isinstance(text, str):
        raise InvalidMessage(f"a message must be a string, got {type(text).__name__}")
    if not text.strip():
        raise InvalidMessage(f"a message must not be empty or blank, got {text!r}")
    if len(text) > max_chars:
        raise InvalidMessage(
            f"message is {len(text)} characters, the limit is {max_chars}: {_show(text)}"
        )
    bad = _control_chars(text, ("Cc", "Cs"), allow="\n\r\t")
    if bad:
        raise InvalidMessage(
            f"message contains control or invalid characters ({', '.join(bad[:5])}): {_show(text)}"
        )
    return text
