"""Pure pieces the wire-format test servers share, with no I/O and no vendor shape.

:class:`Fault` (one scripted failure) and its :data:`FaultKind`, :class:`Recorded` (one
request as received), the default tool-calling ``DEFAULT_RULES`` and the helpers both
vendors' validators and answerers use: ``_Problem`` (why a request is refused),
``_match_rule``, ``_tokens``, ``_seconds`` and ``_json_type``. Import them from
:mod:`overstory.testing.servers` (or :mod:`overstory.testing`); this module only keeps
``servers.py`` short and lets ``_openai`` and ``_anthropic`` import them without a cycle.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..exceptions import ConfigError

DEFAULT_RULES: tuple[tuple[str, str], ...] = (
    (r"what is (?P<a>-?\d+) \+ (?P<b>-?\d+)", "add"),
    (r"how many words are in '(?P<text>[^']*)'", "word_count"),
)

FaultKind = Literal[
    "custom",
    "rate_limited",
    "overloaded",
    "server_error",
    "unauthorized",
    "bad_request",
    "context_overflow",
    "stall",
    "malformed",
    "stream_error",
    "stream_drop",
]

_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_Rules = Sequence[tuple[re.Pattern[str], str]]  # (compiled pattern, tool name)


def _seconds(value: float) -> str:
    """Seconds as the vendors write them in ``retry-after``: ``"2"``, or ``"0.5"``."""
    return str(int(value)) if float(value).is_integer() else str(value)


@dataclass(frozen=True)
class Fault:
    """One scripted failure; the server renders status and body in its vendor's shape.

    After sleeping ``stall_s``: a ``malformed`` fault answers 200 with a body that is not
    JSON; a fault with status 200 and no ``body`` answers normally (a slow answer);
    anything else answers ``status`` with ``body``, or with the vendor's error body for
    the status (and ``message``) when ``body`` is None. ``headers`` go on the response.

    A fault with ``after`` set strikes *inside* a streamed answer: the stream opens (200,
    its opening events) and sends ``after`` content deltas, then either an error event in
    the vendor's shape for ``status`` (``drop=False``) or nothing more, the connection
    closed without the stream's end (``drop=True``). A request that does not stream gets
    ``status`` as an ordinary fault instead.
    """

    status: int = 500
    body: Any = field(default=None, hash=False)  # JSON-able; None: the vendor's error body
    headers: Mapping[str, str] = field(default_factory=dict, hash=False)
    stall_s: float = 0.0
    malformed: bool = False
    kind: FaultKind = "custom"
    message: str | None = None
    after: int | None = None  # strike inside a stream, after this many content deltas
    drop: bool = False  # ... by closing the connection rather than with an error event

    def __post_init__(self) -> None:
        if self.after is not None and (isinstance(self.after, bool) or self.after < 0):
            raise ConfigError(f"a fault's after must be an int >= 0, got {self.after!r}")
        if self.drop and self.after is None:
            raise ConfigError("a dropping fault strikes inside a stream: give after=N")
        if not 200 <= self.status <= 599:
            raise ConfigError(f"a fault's status must be 200..599, got {self.status!r}")
        if self.stall_s < 0:
            raise ConfigError(f"a fault's stall_s must be >= 0, got {self.stall_s!r}")

    @classmethod
    def rate_limited(cls, retry_after: float | None = 1.0) -> Fault:
        """429, with ``retry-after`` (seconds) when given."""
        headers = {} if retry_after is None else {"retry-after": _seconds(retry_after)}
        return cls(status=429, headers=headers, kind="rate_limited")

    @classmethod
    def overloaded(cls, retry_after: float | None = None) -> Fault:
        """Anthropic: 529 ``overloaded_error``; OpenAI and Bedrock: 503."""
        headers = {} if retry_after is None else {"retry-after": _seconds(retry_after)}
        return cls(status=529, headers=headers, kind="overloaded")

    @classmethod
    def server_error(cls) -> Fault:
        return cls(status=500, kind="server_error")

    @classmethod
    def unauthorized(cls) -> Fault:
        return cls(status=401, kind="unauthorized")

    @classmethod
    def bad_request(cls, message: str = "invalid request") -> Fault:
        return cls(status=400, kind="bad_request", message=message)

    @classmethod
    def context_overflow(cls) -> Fault:
        """400 with the vendor's own prompt-too-long body."""
        return cls(status=400, kind="context_overflow")

    @classmethod
    def stall(cls, seconds: float) -> Fault:
        """Answer normally, ``seconds`` late: a client with a shorter timeout times out."""
        return cls(status=200, stall_s=seconds, kind="stall")

    @classmethod
    def stream_error(cls, after: int, status: int = 529) -> Fault:
        """A streamed answer that breaks after ``after`` content deltas with the vendor's
        in-stream error event for ``status`` (529: overloaded, 500: server error, ...)."""
        return cls(status=status, after=after, kind="stream_error")

    @classmethod
    def stream_drop(cls, after: int) -> Fault:
        """A streamed answer whose connection closes after ``after`` content deltas,
        without the stream's end (a proxy or the vendor dropped it)."""
        return cls(status=500, after=after, drop=True, kind="stream_drop")

    @classmethod
    def malformed_body(cls) -> Fault:
        """200 with ``content-type: application/json`` and a truncated JSON body."""
        return cls(status=200, malformed=True, kind="malformed")


@dataclass(frozen=True)
class Recorded:
    """One request as the server received it."""

    path: str
    headers: Mapping[str, str]  # lower-cased names
    body: Any  # the parsed JSON, or the raw text when it was not JSON
    api_key: str  # "" when none was sent
    at: float = field(default_factory=time.time)  # wall-clock arrival time
    raw: bytes = field(default=b"", repr=False)  # the body's bytes (what a signature covers)


@dataclass(frozen=True)
class _Problem:
    """Why a request is refused: the message, and (OpenAI only) ``param`` and ``code``."""

    message: str
    param: str | None = None
    code: str | None = None
    status: int = 400


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)


@dataclass(frozen=True, slots=True)
class _Event:
    """One server-sent event of a streamed answer: its ``event:`` name (None: a bare
    ``data:`` line, OpenAI's style), its JSON data, and whether it carries content (text
    or tool-call arguments: what a mid-stream fault counts)."""

    name: str | None
    data: Any
    content: bool = False

    def encode(self) -> bytes:
        head = f"event: {self.name}\n" if self.name else ""
        data = self.data if isinstance(self.data, str) else json.dumps(self.data)
        return f"{head}data: {data}\n\n".encode()


def _pieces(text: str, size: int) -> list[str]:
    """``text`` cut every ``size`` characters (at any point: inside a word, an escape or
    a multi-byte character's neighbours), as streaming vendors cut it."""
    return [text[i : i + size] for i in range(0, len(text), size)]


def _text_chars(value: Any) -> int:
    """The characters of every string value in a JSON value (keys not counted)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_chars(v) for v in value.values())
    if isinstance(value, list):
        return sum(_text_chars(v) for v in value)
    return 0


def _prompt_tokens(body: Any) -> int:
    """A request's prompt tokens as the loopback servers count them: the characters of
    its messages, system prompt and tools / 4, plus 3 per message."""
    if not isinstance(body, dict):
        return 0
    messages = body.get("messages")
    n = len(messages) if isinstance(messages, list) else 0
    chars = sum(_text_chars(body.get(k)) for k in ("messages", "system", "tools"))
    return chars // 4 + 3 * n


def _shaped(text: str, stops: Any, max_tokens: Any) -> tuple[str, str | None, str | None]:
    """``text`` ended before the first of ``stops`` (reason ``"stop"``, with the one
    matched) and cut to ``max_tokens`` (4 characters each; reason ``"length"``), as
    the vendors' ``stop`` / ``stop_sequences`` and ``max_tokens`` shape an answer."""
    reason, matched = None, None
    for stop in [stops] if isinstance(stops, str) else list(stops or ()):
        at = text.find(stop) if isinstance(stop, str) and stop else -1
        if at >= 0:
            text, reason, matched = text[:at], "stop", stop
    if isinstance(max_tokens, int) and len(text) > max_tokens * 4:
        text, reason, matched = text[: max_tokens * 4], "length", None
    return text, reason, matched


def _tokens(chars: int) -> int:
    return chars // 4 + 1


def _match_rule(
    text: str, rules: _Rules, offered: Iterable[str]
) -> tuple[str, dict[str, Any]] | None:
    """The first rule whose pattern matches ``text`` and whose tool was offered."""
    names = set(offered)
    for pattern, tool in rules:
        match = pattern.search(text)
        if match is not None and tool in names:
            return tool, dict(match.groupdict())
    return None
