"""What a model call sees of a long conversation: the context policies and their summary.

A conversation's stored history only grows; a model reads a bounded window. Before each
model call the turn fits the history to the model's budget
(:class:`~overstory.providers.windows.Budget`): the instructions, the summary if the
policy keeps one, and the most recent **whole turns** that fit — a tool call is never
sent without its return (they are in one turn), and the current turn is always sent.

The policy is the agent's ``context=``:

* :class:`Trim` (the default): the oldest turns that do not fit are left out.
* :class:`Compact`: the turns left out are summarised by a model (the agent's, or a
  cheaper one named), and the summary goes with every call after the instructions. The
  summary is a durable record covering a seq range (``[0, upto)``), stored beside the
  history (:data:`~overstory.store.settings.SUMMARY`, sealed like messages), reused by
  later turns and recomputed in the background once ``every`` more messages have passed
  out of the window; the first one is written in the turn that first needs it.
* a processor ``fn(ctx, messages) -> messages`` (sync or async): it chooses what is
  sent; what it returns is still fitted to the budget (oldest turns out), so a
  processor's mistake cannot overflow the model.

The stored history is never rewritten or deleted by any of them: ``history()`` returns
every message. Pure functions here decide; the turn (:mod:`overstory.conversation`)
calls them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from .exceptions import ConfigError, DataKeyError
from .messages import AssistantMessage, Message, ToolReturn, UserMessage
from .providers import Model, ModelSpec, resolve_model
from .providers.windows import (
    Budget,
    estimate_text,
    fixed_tokens,
    learn_window,
    message_tokens,
    parse_window,
)
from .store import HistoryStore
from .store.crypto import DataKeys, is_sealed, key_id_of, register_resealer, reseal_settings
from .store.settings import SUMMARY, update

__all__ = [
    "SUMMARY_INSTRUCTIONS",
    "Compact",
    "ContextPolicy",
    "Processor",
    "Summary",
    "Trim",
    "check_policy",
    "cover",
    "cut_summary",
    "fit",
    "overflowed",
    "read_summary",
    "render",
    "summary_request",
    "with_summary",
    "write_summary",
]

#: What a user-supplied context processor is: ``fn(ctx, messages) -> messages``, sync or
#: async (``ctx`` is the turn's :class:`~overstory.context.RunContext`).
Processor: TypeAlias = Callable[[Any, list[Message]], "list[Message] | Awaitable[list[Message]]"]

SUMMARY_INSTRUCTIONS = (
    "You maintain the memory of a long conversation between a user and an assistant. "
    "Given the summary so far (if any) and the messages that followed it, write one "
    "updated summary: the facts, names, numbers, decisions, preferences and open "
    "questions a reader needs to continue the conversation. Plain prose, no preamble, "
    "at most {words} words."
)


@dataclass(frozen=True, slots=True)
class Trim:
    """Leave out the oldest turns that do not fit the model's budget (the default)."""


@dataclass(frozen=True, slots=True, init=False)
class Compact:
    """Summarise the turns that no longer fit, and send the summary with every call.

    ``model``: who writes the summary (``None``: the agent's own model; else any model
    spec, e.g. a cheaper one). ``every``: how many more messages must pass out of the
    window before the summary is recomputed (in the background; until then the older
    summary is sent, and those messages are not). ``max_words``: the length the summary
    is asked for; a longer answer is cut to ``max_words * 2`` estimated tokens' worth.
    """

    model: Model | None
    every: int
    max_words: int

    def __init__(self, model: ModelSpec | None = None, *, every: int = 20, max_words: int = 400):
        if isinstance(every, bool) or not isinstance(every, int) or not 1 <= every <= 100_000:
            raise ConfigError(f"Compact(every=...) must be an int in [1, 100000], got {every!r}")
        if (
            isinstance(max_words, bool)
            or not isinstance(max_words, int)
            or not 10 <= max_words <= 20_000
        ):
            raise ConfigError(
                f"Compact(max_words=...) must be an int in [10, 20000], got {max_words!r}"
            )
        object.__setattr__(self, "model", None if model is None else resolve_model(model))
        object.__setattr__(self, "every", every)
        object.__setattr__(self, "max_words", max_words)

    @property
    def max_chars(self) -> int:
        """The longest summary kept (characters): a model that runs on is cut here."""
        return self.max_words * 8


#: What ``Agent(context=...)`` takes.
ContextPolicy: TypeAlias = Trim | Compact | Processor


def check_policy(policy: object) -> ContextPolicy:
    """``policy`` if it is one (:data:`ContextPolicy`), else a :class:`ConfigError`."""
    if isinstance(policy, Trim | Compact) or callable(policy):
        return policy  # type: ignore[return-value]
    raise ConfigError(
        f"context must be Trim(), Compact(...) or a function (ctx, messages) -> messages, "
        f"got {policy!r}"
    )


# --- the fit ------------------------------------------------------------------------------


def fit(
    messages: Sequence[Message],
    room: int,
    count: Callable[[str], int] = estimate_text,
    keep_from: int | None = None,
) -> int:
    """The index of the first message to send: the most recent whole turns of
    ``messages`` (a window starts only at a user message, so a tool call is never
    separated from its return) whose tokens fit ``room``. Everything from ``keep_from``
    (the current turn's start; default: the last user message) is always sent, even
    when it alone is over ``room`` — a turn is never cut; the provider then says it does
    not fit. Walks back from the end: its cost is the window's, not the history's."""
    if keep_from is None:
        keep_from = next(
            (i for i in range(len(messages) - 1, -1, -1) if isinstance(messages[i], UserMessage)),
            0,
        )
    used = sum(message_tokens(m, count) for m in messages[keep_from:])
    first, cost = keep_from, 0
    for i in range(keep_from - 1, -1, -1):
        cost += message_tokens(messages[i], count)
        if isinstance(messages[i], UserMessage):
            if used + cost > room:
                break
            used, cost, first = used + cost, 0, i
    return first


def cover(
    messages: Sequence[Message], room: int, count: Callable[[str], int] = estimate_text
) -> int:
    """The index of the first message of the shortest suffix of ``messages`` whose tokens
    reach ``room`` (0 when all of them do not): what a conversation must hold in memory
    for a call to fill a window of ``room`` tokens."""
    tokens = 0
    for i in range(len(messages) - 1, -1, -1):
        tokens += message_tokens(messages[i], count)
        if tokens >= room:
            return i
    return 0


def overflowed(model: str, message: str, sent: int) -> int:
    """The window to remember for ``model`` after it refused a prompt we counted at
    ``sent`` tokens as too long with ``message``: the window the error names, or three
    quarters of what was sent when that is less (the vendor counts more than our
    estimate did); half of what was sent when the error names none. Remembered for the
    endpoint in this process (:func:`~overstory.providers.windows.learn_window`);
    returned."""
    named = parse_window(message)
    window = max(1, sent // 2) if named is None else min(named, max(1, (sent * 3) // 4))
    learn_window(model, window)
    return window


# --- the summary --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Summary:
    """The summary of a conversation's messages with seq in ``[0, upto)``, by ``model``."""

    upto: int
    text: str
    model: str = ""
    at: float = 0.0


def with_summary(instructions: str, summary: Summary | None) -> str:
    """The instructions a call is sent: the agent's, then the summary, if any."""
    if summary is None or not summary.text:
        return instructions
    head = f"{instructions}\n\n" if instructions else ""
    return (
        f"{head}Summary of the earlier part of this conversation (messages before "
        f"#{summary.upto}, which are not repeated here):\n{summary.text}"
    )


def render(messages: Sequence[Message]) -> str:
    """``messages`` as a transcript, one per paragraph: what a summariser reads."""
    lines = []
    for m in messages:
        if isinstance(m, UserMessage):
            lines.append(f"user: {m.content}")
        elif isinstance(m, AssistantMessage):
            if m.content:
                lines.append(f"assistant: {m.content}")
            for call in m.tool_calls:
                lines.append(f"assistant called {call.name}({json.dumps(call.arguments)})")
        elif isinstance(m, ToolReturn):
            verb = "failed" if m.is_error else "returned"
            lines.append(f"{m.tool_name} {verb}: {m.content}")
    return "\n\n".join(lines)


def summary_request(
    previous: Summary | None,
    messages: Sequence[Message],
    policy: Compact,
    budget: Budget | None,
) -> tuple[str, list[Message]]:
    """The instructions and the one user message that ask for a new summary of
    ``previous`` and the ``messages`` after it; the oldest of those are left out when
    the transcript would not fit the summariser's ``budget``."""
    instructions = SUMMARY_INSTRUCTIONS.format(words=policy.max_words)
    head = f"Summary so far:\n{previous.text}\n\n" if previous and previous.text else ""
    parts = messages
    if budget is not None:
        room = budget.prompt - fixed_tokens(instructions, (), budget.count) - budget.count(head)
        first = fit(parts, room, budget.count, keep_from=len(parts))
        parts = parts[first:]
    body = f"{head}Messages that followed:\n\n{render(parts)}"
    return instructions, [UserMessage(content=body, seq=0, turn_id="summary")]


def cut_summary(text: str, policy: Compact) -> str:
    """A summary within the policy's bound (a model that ran on is cut)."""
    text = text.strip()
    return text if len(text) <= policy.max_chars else text[: policy.max_chars].rstrip() + " …"


# --- the record ---------------------------------------------------------------------------


def _aad(conversation_id: str) -> str:
    return f"summary\0{conversation_id}"


def encode(summary: Summary, conversation_id: str, keys: DataKeys | None) -> str:
    text = summary.text if keys is None else keys.seal(summary.text, _aad(conversation_id), 0)
    return json.dumps(
        {"upto": summary.upto, "text": text, "model": summary.model, "at": summary.at},
        sort_keys=True,
    )


def decode(raw: str, conversation_id: str, keys: DataKeys | None) -> Summary:
    record = json.loads(raw)
    text = str(record["text"])
    if is_sealed(text):
        if keys is None:
            raise DataKeyError(
                f"the summary of {conversation_id!r} is encrypted (data key "
                f"{key_id_of(text)!r}) and no data key is configured"
            )
        text = keys.open(text, _aad(conversation_id), 0)
    return Summary(int(record["upto"]), text, str(record.get("model", "")), float(record["at"]))


async def read_summary(store: HistoryStore, conversation_id: str) -> Summary | None:
    """The stored summary of ``conversation_id`` (``None``: none yet)."""
    raw = await store.get_setting(SUMMARY.key(conversation_id))
    return None if raw is None else decode(raw, conversation_id, store.data_keys)


async def write_summary(store: HistoryStore, conversation_id: str, summary: Summary) -> Summary:
    """Store ``summary`` unless one covering as much or more is stored already (two
    incarnations may race: the wider summary wins). Returns the stored one."""
    kept = summary

    def newer(raw: str | None) -> str | None:
        nonlocal kept
        if raw is not None:
            stored = decode(raw, conversation_id, store.data_keys)
            if stored.upto >= summary.upto:
                kept = stored
                return None
        kept = summary
        return encode(summary, conversation_id, store.data_keys)

    await update(store, SUMMARY.key(conversation_id), newer)
    return kept


def summary_now(upto: int, text: str, model: str) -> Summary:
    return Summary(upto, text, model, time.time())


async def reseal_summaries(store: HistoryStore, keys: DataKeys, batch: int) -> dict[str, int]:
    """Seal every summary under the primary data key (``keys rotate-data``)."""
    prefix = SUMMARY.prefix()

    def resealed(key: str, raw: str | None) -> str | None:
        if raw is None or key_id_of(json.loads(raw)["text"]) == keys.primary:
            return None
        cid = key[len(prefix) :]
        return encode(decode(raw, cid, keys), cid, keys)

    return await reseal_settings(store, prefix, batch, resealed)


register_resealer("summaries", reseal_summaries)
