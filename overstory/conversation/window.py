"""The request each model call of a turn sends: the agent's context policy, applied.

:class:`Memory` is one conversation's context state — its summary, read from the store
on first need, and the background compaction in flight — held by the entity in either
placement. :meth:`Memory.request` builds a call's
:class:`~overstory.providers.ModelRequest` from the history with the pure rules of
:mod:`overstory.compaction`; :meth:`Memory.overflowed` is what a turn does when a
provider still refuses the prompt as too long.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from ..agent import Agent
from ..compaction import (
    Compact,
    Summary,
    Trim,
    cut_summary,
    fit,
    overflowed,
    read_summary,
    summary_now,
    summary_request,
    with_summary,
    write_summary,
)
from ..context import RunContext
from ..exceptions import AllModelsFailed, ModelError
from ..messages import AssistantMessage, Message, ToolCall, ToolReturn, UserMessage
from ..providers import Model, ModelRequest
from ..providers.windows import (
    Budget,
    estimate_text,
    fixed_tokens,
    message_tokens,
    parse_window,
    request_tokens,
)
from ..store import HistoryStore

__all__ = ["NO_OUTPUT", "Memory", "answered", "is_overflow", "read_tail"]

log = logging.getLogger(__name__)

#: The most messages one compaction reads (the newest of those its summary lags behind:
#: a policy switched on for a conversation already long summarises its recent part).
MAX_COMPACT_READ = 2000

Spawn = Callable[[Coroutine[Any, Any, Any]], None]


#: Messages read per page when a conversation's tail is read from the store.
TAIL_PAGE = 64


async def read_tail(
    store: HistoryStore, conversation_id: str, cap: int, room: int | None
) -> list[Message]:
    """The tail a live conversation holds: its last messages, page by page from the
    end, until they reach ``room`` tokens (what its models can read; ``None``:
    unknown) or ``cap`` messages — a short conversation in one read."""
    if room is None:
        return await store.load_last(conversation_id, cap)
    held: list[Message] = []
    tokens, before = 0, None
    while len(held) < cap:
        want = min(TAIL_PAGE, cap - len(held))
        batch = await store.load_last(conversation_id, want, before=before)
        held[:0] = batch
        tokens += sum(message_tokens(m) for m in batch)
        if len(batch) < want or tokens >= room:
            break
        before = batch[0].seq
    return held


def is_overflow(exc: ModelError) -> bool:
    """Whether ``exc`` (or, for a chain, any of its failures) says the prompt is too long."""
    if isinstance(exc, AllModelsFailed):
        return any(f.kind == "context_overflow" for f in exc.failures)
    return exc.kind == "context_overflow"


class Memory:
    """One conversation's context state (small: a host holds thousands).

    ``spawn`` runs background work in the entity's process (a background compaction);
    ``None`` runs it inline (tests of the turn alone)."""

    __slots__ = ("_loaded", "cap", "compacting", "room", "spawn", "summary")

    def __init__(self, spawn: Spawn | None = None, room: int | None = None) -> None:
        self.spawn = spawn
        self.room = room  # prompt tokens its models can read: what the tail must cover
        self.summary: Summary | None = None
        self._loaded = False
        self.compacting = False
        self.cap: int | None = None  # the prompt cap after an overflow, for this turn

    async def _summary(self, store: HistoryStore, conversation_id: str) -> Summary | None:
        if not self._loaded:
            self.summary = await read_summary(store, conversation_id)
            self._loaded = True
        return self.summary

    async def request(
        self,
        agent: Agent,
        store: HistoryStore,
        conversation_id: str,
        history: Sequence[Message],
        turn_start: int,
        context: RunContext,
    ) -> ModelRequest:
        """What the next model call of the turn starting at ``history[turn_start]``
        sends under ``agent.context``. A :class:`~overstory.compaction.Compact` policy
        that has dropped turns and has no summary yet writes the first one now (the
        turn does not fit without it); later ones are recomputed in the background."""
        policy = agent.context
        messages: Sequence[Message] = history
        keep_from: int | None = turn_start
        if not isinstance(policy, Trim | Compact):
            messages = await _processed(policy, context, list(history))
            keep_from = None  # the processor's own last user message starts the turn
        budget = agent.model.budget()
        room = None if budget is None else budget.prompt
        if self.cap is not None:
            room = self.cap if room is None else min(room, self.cap)
        if room is None:
            return _asked(agent, agent.instructions, messages)
        count = budget.count if budget is not None else estimate_text
        room -= fixed_tokens(agent.instructions, agent.tool_definitions, count)
        if not isinstance(policy, Compact):
            first = fit(messages, room, count, keep_from)
            return _asked(agent, agent.instructions, messages[first:])
        summary = await self._summary(store, conversation_id)
        first = self._fit_after(summary, messages, room, count, keep_from)
        # Everything before the first message sent is out of the window: the part the
        # tail no longer holds as well as the part the fit left out.
        upto = messages[first].seq if first < len(messages) else _next_seq(messages)
        covered = 0 if summary is None else summary.upto
        if summary is None and upto > 0:
            summary = await self._compact(agent, policy, store, conversation_id, upto, messages)
            first = self._fit_after(summary, messages, room, count, keep_from)
        elif upto - covered >= policy.every and not self.compacting:
            work = self._compact(agent, policy, store, conversation_id, upto, messages)
            if self.spawn is None:
                await work
            else:
                self.compacting = True
                self.spawn(work)
        instructions = with_summary(agent.instructions, summary)
        return _asked(agent, instructions, messages[first:])

    @staticmethod
    def _fit_after(
        summary: Summary | None,
        messages: Sequence[Message],
        room: int,
        count: Callable[[str], int],
        keep_from: int | None,
    ) -> int:
        """:func:`~overstory.compaction.fit` with the summary's room taken, never
        starting before the summary's end (what it covers is not sent twice)."""
        if summary is None:
            return fit(messages, room, count, keep_from)
        room -= count(with_summary("", summary))
        first = fit(messages, room, count, keep_from)
        after = next((i for i, m in enumerate(messages) if m.seq >= summary.upto), len(messages))
        limit = len(messages) if keep_from is None else keep_from
        return max(first, min(after, limit))

    async def _compact(
        self,
        agent: Agent,
        policy: Compact,
        store: HistoryStore,
        conversation_id: str,
        upto: int,
        held: Sequence[Message],
    ) -> Summary | None:
        """Summarise the summary so far and the messages after it up to seq ``upto``
        (those ``held`` in memory, the older ones read from the store — at most
        :data:`MAX_COMPACT_READ` of them), store the new summary and keep it."""
        try:
            previous = self.summary
            if previous is not None and previous.upto >= upto:
                return previous
            start = max(0 if previous is None else previous.upto, upto - MAX_COMPACT_READ)
            new = [m for m in held if start <= m.seq < upto]
            end = new[0].seq if new else upto
            if end > start:  # older than the tail held here
                new = await store.load(conversation_id, after=start - 1, limit=end - start) + new
            model: Model = policy.model or agent.model
            instructions, ask = summary_request(previous, new, policy, model.budget())
            answer = await model.call(ModelRequest(instructions, ask))
            text = cut_summary(answer.content, policy)
            stored = await write_summary(
                store, conversation_id, summary_now(upto, text, answer.model or model.name)
            )
            self.summary = stored
            return stored
        except ModelError as exc:  # the turn goes on without it (trimmed); tried again later
            log.warning("compacting %r failed: %s", conversation_id, exc)
            return self.summary
        finally:
            self.compacting = False

    def overflowed(self, exc: ModelError, sent: ModelRequest, budget: Budget | None) -> bool:
        """A provider refused ``sent`` as too long: remember a window for each model
        that refused (the one its error names, else half of what was sent) and cap the
        turn's next request to fit it (:meth:`request`). Whether an error named one."""
        count = budget.count if budget is not None else estimate_text
        tokens = request_tokens(sent, count)
        failures = exc.failures if isinstance(exc, AllModelsFailed) else [exc]
        refused = [f for f in failures if f.kind == "context_overflow" and f.model]
        windows = [overflowed(f.model, str(f), tokens) for f in refused]
        self.cap = min(windows, default=max(1, tokens // 2))
        return any(parse_window(str(f)) is not None for f in refused)


def _asked(agent: Agent, instructions: str, messages: Sequence[Message]) -> ModelRequest:
    """The request of one of ``agent``'s calls: its tools, settings and output schema."""
    return ModelRequest(
        instructions,
        answered(messages),
        agent.tool_definitions,
        agent.model_settings,
        agent.output,
    )


#: What the model is shown for a client tool's call the caller never returned.
NO_OUTPUT = "no output: the caller went on without returning this call's result"


def answered(messages: Sequence[Message]) -> Sequence[Message]:
    """``messages`` as the model is shown them: without those their owner deleted
    (``hidden``; a hidden call's return goes with it), and with a result for every tool
    call — a client tool's call that the caller left unanswered (it sent a new message
    instead), or whose return was deleted, is shown with an error return,
    :data:`NO_OUTPUT`: vendors refuse a call without one. Nothing is stored."""
    out: list[Message] = []
    pending: list[ToolCall] = []
    gone: set[str] = set()  # the ids of hidden calls
    for m in messages:
        if m.hidden or (isinstance(m, ToolReturn) and m.tool_call_id in gone):
            if isinstance(m, AssistantMessage):
                gone.update(c.id for c in m.tool_calls)
            continue
        if pending and not isinstance(m, ToolReturn):
            out += [
                ToolReturn(
                    tool_call_id=c.id,
                    tool_name=c.name,
                    content=NO_OUTPUT,
                    is_error=True,
                    seq=m.seq,
                    turn_id=m.turn_id,
                )
                for c in pending
            ]
            pending = []
        if isinstance(m, AssistantMessage):
            pending = list(m.tool_calls)
        elif isinstance(m, ToolReturn):
            pending = [c for c in pending if c.id != m.tool_call_id]
        out.append(m)
    if pending and messages and messages[-1].hidden:  # the calls' returns were the last
        out += [
            ToolReturn(tool_call_id=c.id, tool_name=c.name, content=NO_OUTPUT, is_error=True)
            for c in pending
        ]
    return messages if len(out) == len(messages) else out


def _next_seq(messages: Sequence[Message]) -> int:
    return messages[-1].seq + 1 if messages else 0


async def _processed(processor: Any, context: RunContext, messages: list[Message]) -> list[Message]:
    """A user processor's messages, checked: a list of messages ending in a turn."""
    name = getattr(processor, "__name__", repr(processor))
    result = processor(context, messages)
    if inspect.isawaitable(result):
        result = await result
    if not isinstance(result, list | tuple) or not all(isinstance(m, Message) for m in result):
        raise TypeError(
            f"context processor {name} must return a list of messages, got {type(result).__name__}"
        )
    if not any(isinstance(m, UserMessage) for m in result):
        raise TypeError(f"context processor {name} returned no user message to answer")
    return list(result)
