"""How much a model can read: context windows and the token count a call is budgeted by.

A model's window is, in this order: one a ``context_overflow`` error named for it in this
process (:func:`learn_window`), the :class:`~overstory.providers.Endpoint`'s own
``context_window``, the built-in table below (:func:`known_window`), else unknown
(``None``: nothing is trimmed until a provider refuses a prompt as too long).

Token counts are an **estimate** unless a real tokenizer is installed for the vendor
(``tiktoken`` with its encoding files, for OpenAI models): UTF-8 bytes / 3, rounded up,
plus :data:`PER_MESSAGE` tokens for each message's framing. English runs about 4
characters a token and code or other scripts rarely fewer than 3 bytes a token, so the
estimate errs high — about a third over for English — which is the safety margin: a
request fitted to the estimate fits the real count.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING

from ..messages import AssistantMessage, Message

if TYPE_CHECKING:
    from .base import ModelRequest

__all__ = [
    "KNOWN_WINDOWS",
    "PER_MESSAGE",
    "Budget",
    "estimate_text",
    "fixed_tokens",
    "known_window",
    "learn_window",
    "learned_window",
    "message_tokens",
    "parse_window",
    "request_tokens",
    "text_tokens",
]

#: Tokens each message costs beyond its text (role and framing), in the estimate.
PER_MESSAGE = 5

#: Context windows (tokens) of well-known models, by name prefix; the longest prefix that
#: matches wins (``gpt-4.1-mini`` before ``gpt-4``). Bedrock ids match after their
#: ``anthropic.`` / ``us.anthropic.`` part. An endpoint's ``context_window`` overrides it.
KNOWN_WINDOWS: dict[str, int] = {
    "gpt-5": 400_000,
    "gpt-4.1": 1_047_576,
    "gpt-4o": 128_000,
    "gpt-4-turbo": 128_000,
    "gpt-4": 8_192,
    "gpt-3.5-turbo": 16_385,
    "o1": 200_000,
    "o3": 200_000,
    "o4-mini": 200_000,
    "claude-": 200_000,
    "anthropic.claude-": 200_000,
    "llama3.1": 131_072,
    "llama3": 8_192,
    "mistral": 32_768,
    "qwen2.5": 32_768,
}


def known_window(model: str) -> int | None:
    """The built-in window of model ``model`` (a vendor's model name or Bedrock id)."""
    name = model.lower()
    for region in ("us.", "eu.", "apac.", "global."):
        if name.startswith(region + "anthropic."):
            name = name[len(region) :]
    best = max((p for p in KNOWN_WINDOWS if name.startswith(p)), key=len, default=None)
    return None if best is None else KNOWN_WINDOWS[best]


def estimate_text(text: str) -> int:
    """The estimate of ``text``'s tokens: UTF-8 bytes / 3, rounded up."""
    return math.ceil(len(text.encode("utf-8", "surrogatepass")) / 3)


@cache
def _tiktoken(model: str) -> Callable[[str], int] | None:
    """OpenAI's own tokenizer for ``model``, when ``tiktoken`` and its encoding files are
    here (it downloads them on first use; offline, without a cache, it cannot)."""
    try:
        import tiktoken  # type: ignore[import-not-found,unused-ignore]

        try:
            encoding = tiktoken.encoding_for_model(model)
        except KeyError:
            encoding = tiktoken.get_encoding("o200k_base")
        encoding.encode("warm")
    except Exception:  # not installed, or its files cannot be fetched: the estimate
        return None

    def count(text: str) -> int:
        return len(encoding.encode(text, disallowed_special=()))

    return count


def _counter(vendor: str, model: str) -> Callable[[str], int]:
    if vendor == "openai":
        return _tiktoken(model) or estimate_text
    return estimate_text


@dataclass(frozen=True, slots=True)
class Budget:
    """What one model can be sent: ``window`` tokens in all, ``reserve`` of them kept for
    its answer, counted with ``count`` (its tokenizer, else the estimate). ``model`` is
    whose budget it is (in a chain, the member with the least room)."""

    model: str
    window: int
    reserve: int = 0
    count: Callable[[str], int] = field(default=estimate_text, compare=False)

    @property
    def prompt(self) -> int:
        """Tokens the prompt may take: the window less the answer's reserve (at least
        half the window, whatever the reserve)."""
        return max(self.window - self.reserve, self.window // 2)

    @classmethod
    def of(
        cls,
        model: str,
        window: int | None,
        reserve: int = 0,
        vendor: str = "",
        vendor_model: str = "",
    ) -> Budget | None:
        """The budget of ``model`` (``None`` when its window is unknown): a window an
        overflow error named for it here wins over ``window``."""
        window = learned_window(model) or window
        if window is None:
            return None
        return cls(model, window, reserve, _counter(vendor, vendor_model))


# --- windows named by overflow errors ----------------------------------------------------

#: What vendors' "prompt too long" errors say the window is: OpenAI ("maximum context
#: length is 128000 tokens"), Anthropic ("prompt is too long: 250000 tokens > 200000
#: maximum"), and the OpenAI-compatible servers that copy either wording.
_WINDOW_IN_ERROR = (
    re.compile(r"maximum context length is (\d[\d,]*) tokens", re.I),
    re.compile(r"tokens? > (\d[\d,]*) maximum", re.I),
    re.compile(r"context (?:window|length) (?:of|is) (\d[\d,]*) tokens", re.I),
)


def parse_window(message: str) -> int | None:
    """The window a provider's overflow error names (``None``: it names none)."""
    for pattern in _WINDOW_IN_ERROR:
        found = pattern.search(message)
        if found:
            value = int(found.group(1).replace(",", ""))
            return value if 0 < value < 100_000_000 else None
    return None


_learned: dict[str, int] = {}
_learned_lock = threading.Lock()


def learn_window(model: str, window: int) -> None:
    """Remember, for this process, that ``model`` (its name, ``vendor:model[@url]``)
    refused a prompt over ``window`` tokens; a smaller window replaces a larger one."""
    with _learned_lock:
        if window > 0 and window < _learned.get(model, window + 1):
            _learned[model] = window


def learned_window(model: str) -> int | None:
    """The window an overflow error named for ``model`` in this process, if one did."""
    return _learned.get(model)


# --- counting ----------------------------------------------------------------------------


def text_tokens(text: str, vendor: str = "", model: str = "") -> int:
    """``text``'s tokens for ``vendor``'s ``model``: its real tokenizer where one is
    installed, else the estimate (:func:`estimate_text`)."""
    return _counter(vendor, model)(text)


def message_tokens(message: Message, count: Callable[[str], int] = estimate_text) -> int:
    """One message's tokens: its text, its tool calls' names and arguments, framing."""
    tokens = count(message.content) + PER_MESSAGE
    if isinstance(message, AssistantMessage):
        for call in message.tool_calls:
            tokens += count(call.name) + count(json.dumps(call.arguments)) + PER_MESSAGE
    return tokens


def request_tokens(req: ModelRequest, count: Callable[[str], int] = estimate_text) -> int:
    """Every token of ``req``'s prompt: instructions, messages and tool definitions."""
    return fixed_tokens(req.instructions, req.tools, count) + sum(
        message_tokens(m, count) for m in req.messages
    )


def fixed_tokens(
    instructions: str, tools: Iterable[object], count: Callable[[str], int] = estimate_text
) -> int:
    """The tokens of a prompt's parts that do not depend on the history."""
    tokens = count(instructions) + PER_MESSAGE if instructions else 0
    for tool in tools:
        tokens += count(json.dumps(_as_json(tool), sort_keys=True, default=str)) + PER_MESSAGE
    return tokens


def _as_json(tool: object) -> object:
    fields = getattr(tool, "__dataclass_fields__", None)
    if fields is None:
        return str(tool)
    return {name: getattr(tool, name) for name in fields}
