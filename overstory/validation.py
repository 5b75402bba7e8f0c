"""Checks on everything that comes from outside: user ids and messages.

Each check raises a :class:`~overstory.exceptions.UsageError` subclass whose message names
the problem and shows (a prefix of) the offending value.
"""

from __future__ import annotations

import unicodedata

from .exceptions import InvalidMessage, InvalidUserId, UsageError

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


def _checked_text(
    value: object,
    error: type[UsageError],
    name: str,
    max_chars: int,
    categories: tuple[str, ...],
    *,
    article: str = "",
    allow: str = "",
) -> str:
    """``value`` if it is a non-blank string of at most ``max_chars`` characters with none
    in the Unicode ``categories`` (but those in ``allow``), else ``error`` naming it."""
    if not isinstance(value, str):
        raise error(f"{article}{name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise error(f"{article}{name} must not be empty or blank, got {value!r}")
    if len(value) > max_chars:
        raise error(f"{name} is {len(value)} characters, the limit is {max_chars}: {_show(value)}")
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
        text, InvalidMessage, "message", max_chars, ("Cc", "Cs"), article="a ", allow="\n\r\t"
    )
