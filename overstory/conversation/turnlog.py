"""A turn's event log: the turn appends, any number of readers tail it.

The turn runs in the conversation whether or not anyone reads: a reader asks for the
events after the last ``seq`` it saw (:meth:`TurnLog.wait_after`, a long poll), so a
reader that went away and comes back loses nothing and sees the same events. A
conversation keeps the logs of its recent turns (:class:`TurnLogs`: at most ``keep``,
a finished one for ``window_s``); after that, :func:`replay` rebuilds a finished turn's
events from its stored messages (one delta per model answer instead of the original
pieces).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..exceptions import (
    ConversationUnavailable,
    Passivated,
    TurnFailed,
    TurnIncomplete,
    UnknownTurn,
)
from ..jobs import is_permanent
from ..messages import (
    AssistantMessage,
    Message,
    Reply,
    ToolCall,
    ToolReturn,
    TurnEvent,
    TurnEventType,
)
from ..quota import Ticket, finish
from .turn import Emit, is_complete, reply_of

__all__ = ["Run", "TurnLog", "TurnLogs", "TurnStreams", "replay"]

#: A streamed turn to run: ``run(emit, should_stop)``.
Run = Callable[[Emit, Callable[[], bool]], Awaitable[Reply]]
AdmittedRun = Callable[[Emit, Callable[[], bool], Ticket | None], Awaitable[Reply]]


class TurnLog:
    """One turn's events in ``seq`` order, from ``first_seq`` (0 unless the turn was
    started again after its process died: then it goes on from the reader's cursor)."""

    def __init__(self, turn_id: str, first_seq: int = 0) -> None:
        self.turn_id = turn_id
        self.first_seq = first_seq
        self.events: list[TurnEvent] = []
        self.finished_at: float | None = None
        self.cancelled = False  # asked to stop: the turn stops at its next safe point
        self.first_text: int | None = None  # the seq of the first delta
        self._changed = asyncio.Event()  # set by every event
        self._urgent = asyncio.Event()  # set by the first delta and the last event

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    @property
    def last_seq(self) -> int:
        """The ``seq`` of the latest event (``first_seq - 1`` before any)."""
        return self.first_seq + len(self.events) - 1

    def emit(self, type: TurnEventType, /, **fields: Any) -> TurnEvent:
        """Append the next event (the :class:`~overstory.conversation.turn.Emit` of a turn)."""
        if self.finished:
            raise RuntimeError(f"turn {self.turn_id!r} has ended; no {type!r} event after it")
        event = TurnEvent(self.turn_id, self.first_seq + len(self.events), type, **fields)
        self.events.append(event)
        first = type == "delta" and self.first_text is None
        if first:
            self.first_text = event.seq
        if event.terminal:
            self.finished_at = time.monotonic()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()  # wake every reader waiting for news
        if first or event.terminal:  # and every reader holding a batch open: it ends it
            woken, self._urgent = self._urgent, asyncio.Event()
            woken.set()
        return event

    def after(self, seq: int) -> list[TurnEvent]:
        """The events after ``seq`` (all of them for ``seq`` < ``first_seq``)."""
        return self.events[max(0, seq + 1 - self.first_seq) :]

    async def wait_after(self, seq: int, timeout_s: float, batch_s: float = 0.0) -> list[TurnEvent]:
        """The events after ``seq``, waiting up to ``timeout_s`` for one if there are
        none yet (an empty list: nothing new within the time).

        ``batch_s`` > 0: what arrives within ``batch_s`` of the first news reaches the
        reader in one answer, except that the first text delta and the turn's end go at
        once. Time to first token is what a reader waits on, so nothing holds it back;
        before it (``started``, tool events) and after it, one answer per ``batch_s``
        instead of one per event spares every hop a call per event.

        A reader holding a batch open is woken only by what ends it early (the first
        delta, the last event), not by every event: under load a stream's pieces come
        every few milliseconds, and waking each of its readers for each of them cost
        more than forwarding them did."""
        news = self.after(seq)
        if not news and not self.finished:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            except TimeoutError:
                return []
            news = self.after(seq)
        if batch_s > 0 and news and not self.finished and not self._first_text_after(seq):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._urgent.wait(), batch_s)
            news = self.after(seq)
        return news

    def _first_text_after(self, seq: int) -> bool:
        """Whether the first text delta is among the events after ``seq``."""
        return self.first_text is not None and self.first_text > seq


class TurnLogs:
    """A conversation's recent turn logs, bounded: at most ``keep`` (the oldest
    finished go first), and a finished one only for ``window_s``."""

    __slots__ = ("_logs", "keep", "window_s")

    def __init__(self, keep: int = 8, window_s: float = 300.0) -> None:
        self.keep = keep
        self.window_s = window_s
        self._logs: OrderedDict[str, TurnLog] = OrderedDict()

    def __len__(self) -> int:
        return len(self._logs)

    def get(self, turn_id: str) -> TurnLog | None:
        self.prune()
        return self._logs.get(turn_id)

    def open(self, turn_id: str, first_seq: int = 0) -> TurnLog:
        """A new log for ``turn_id`` (replacing a finished or dead one of that id)."""
        log = TurnLog(turn_id, first_seq)
        self._logs.pop(turn_id, None)
        self._logs[turn_id] = log
        self.prune()
        return log

    def prune(self, now: float | None = None) -> None:
        """Drop finished logs past the window, then the oldest finished beyond ``keep``
        (a running turn's log is never dropped)."""
        now = time.monotonic() if now is None else now
        finished = [t for t, log in self._logs.items() if log.finished_at is not None]
        for turn_id in finished:
            done = self._logs[turn_id].finished_at
            if done is not None and now - done > self.window_s:
                del self._logs[turn_id]
        for turn_id in finished:
            if len(self._logs) <= self.keep:
                break
            self._logs.pop(turn_id, None)


def replay(turn_id: str, turn: Sequence[Message], reply: Reply) -> list[TurnEvent]:
    """A finished turn's events rebuilt from its stored messages: started, each model
    answer's text as one delta, each tool call and result, completed."""
    log = TurnLog(turn_id)
    log.emit("started")
    calls: dict[str, ToolCall] = {}
    for message in turn:
        if isinstance(message, AssistantMessage):
            if message.content:
                log.emit("delta", text=message.content)
            for call in message.tool_calls:
                calls[call.id] = call
                log.emit("tool_call", tool_call=call)
        elif isinstance(message, ToolReturn):
            log.emit("tool_result", tool_call=calls.get(message.tool_call_id), tool_return=message)
    if reply.incomplete:
        log.emit("incomplete", text=reply.incomplete, reply=reply)
    else:
        log.emit("completed", reply=reply)
    return log.events


class TurnStreams:
    """The streamed turns of one conversation — the part a host's entity and a
    dedicated conversation actor share: start a turn running into its log, and answer
    a reader from the log, from the store (a finished turn whose log is gone), or by
    starting the turn again (its process died mid-turn)."""

    __slots__ = ("_tasks", "batch_s", "logs")

    def __init__(self, keep: int = 8, window_s: float = 300.0, batch_s: float = 0.0) -> None:
        self.logs = TurnLogs(keep, window_s)
        self.batch_s = batch_s  # see TurnLog.wait_after
        self._tasks: set[asyncio.Task[None]] = set()

    def _served(self, turn_id: str) -> TurnLog | None:
        """The log a start of ``turn_id`` joins: one running, or one that ended other
        than ``failed`` (a failed turn is not over: starting it again runs it again, as
        sending it again does)."""
        log = self.logs.get(turn_id)
        if log is None or (log.finished and log.events[-1].type == "failed"):
            return None
        return log

    def will_run(self, turn_id: str, history: Sequence[Message] = ()) -> bool:
        """Whether :meth:`start` would run the turn now (no log for it here to join,
        and it has not ended in ``history``): what a quota admits before it does."""
        if self._served(turn_id) is not None:
            return False
        return not is_complete([m for m in history if m.turn_id == turn_id])

    def start(self, turn_id: str, after: int, run: Run, history: Sequence[Message] = ()) -> int:
        """Run ``run(emit, should_stop)`` (the turn) into a new log unless one for
        ``turn_id`` is here to join (:meth:`_served`), or the turn has ended already in
        ``history`` (a reader then gets it replayed from the store); returns the log's
        first ``seq``. ``after`` >= 0: a reader's cursor when the turn is started again
        after its process died (a ``restarted`` event). A failed run's log is replaced,
        its seqs continued."""
        log = self._served(turn_id)
        if log is not None:
            return log.first_seq
        if is_complete([m for m in history if m.turn_id == turn_id]):
            return 0
        failed = self.logs.get(turn_id)
        first = after + 1 if failed is None else max(after, failed.last_seq) + 1
        log = self.logs.open(turn_id, first_seq=first)
        log.emit("restarted" if after >= 0 else "started")
        task = asyncio.get_running_loop().create_task(_run_logged(run, log))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return log.first_seq

    async def start_admitted(
        self,
        turn_id: str,
        after: int,
        run: AdmittedRun,
        history: Sequence[Message],
        admit: Callable[[], Awaitable[Ticket | None]],
    ) -> int:
        """:meth:`start`, the turn admitted first by its user's quota (``admit``; a
        refusal raises here, before anything runs) when it is going to run. Its
        ``run(emit, should_stop, ticket)`` frees what the ticket holds however it ends,
        even before its first step; a ticket whose turn another start won is freed
        at once."""
        ticket = None
        if self.will_run(turn_id, history):
            ticket = await admit()
            if ticket is not None and not self.will_run(turn_id, history):
                await finish(ticket)  # another start of it won meanwhile
                ticket = None

        async def admitted(emit: Emit, should_stop: Callable[[], bool]) -> Reply:
            try:
                return await run(emit, should_stop, ticket)
            finally:
                if ticket is not None:
                    await finish(ticket)

        return self.start(turn_id, after, admitted, history)

    def cancel(self, turn_id: str) -> bool:
        """Ask turn ``turn_id`` to stop at its next safe point (it then ends
        ``incomplete``, what it produced stored); ``False`` when it is not running here."""
        log = self.logs.get(turn_id)
        if log is None or log.finished:
            return False
        log.cancelled = True
        return True

    async def events(
        self,
        conversation_id: str,
        turn_id: str,
        after: int,
        wait_s: float,
        history: Sequence[Message],
        agent: tuple[str, str],
        restart: Callable[[Sequence[Message]], Awaitable[object]],
    ) -> tuple[list[TurnEvent], bool]:
        """``(events after after, ended)`` (see ``HostActor.events``). ``agent`` is
        ``(name, version)`` for a replayed reply; ``restart(turn)`` starts the turn
        again from its stored messages (its user message, or the tool outputs it
        continued from)."""
        log = self.logs.get(turn_id)
        if log is None:
            turn = [m for m in history if m.turn_id == turn_id]
            if not turn or isinstance(turn[0], AssistantMessage):
                raise UnknownTurn(conversation_id, turn_id)
            if is_complete(turn):
                replayed = replay(turn_id, turn, reply_of(turn_id, turn, *agent))
                later = [e for e in replayed if e.seq > after]
                if not later:
                    # A cursor from a log that is gone (its process died after the turn
                    # was stored) can lie past the replay's numbering: the reader still
                    # gets the outcome, numbered after what it saw.
                    later = [dataclasses.replace(replayed[-1], seq=after + 1)]
                return later, True
            await restart(turn)
            log = self.logs.get(turn_id)
            if log is None:
                # The restart landed elsewhere: the entity was passivated (or replaced)
                # while it started, or the turn ended meanwhile. The reader asks again
                # and finds the log, or the finished turn in the store.
                raise Passivated(
                    f"conversation {conversation_id!r} changed while turn {turn_id!r} "
                    "restarted; ask again"
                )
        events = await log.wait_after(after, min(max(wait_s, 0.0), 60.0), self.batch_s)
        return events, log.finished and (not events or events[-1].seq == log.last_seq)


async def _run_logged(run: Run, log: TurnLog) -> None:
    """A streamed turn, whoever reads it; its outcome is the log's last event."""
    try:
        reply = await run(log.emit, lambda: log.cancelled)
    except TurnIncomplete as exc:
        log.emit("incomplete", text=exc.reason, reply=exc.reply)
    except TurnFailed as exc:
        log.emit("failed", text=exc.reason, retryable=not is_permanent(exc))
    except ConversationUnavailable:
        # Passivated, fenced, moved: the conversation (and this log) is gone from this
        # process; a reader's next poll finds the turn unfinished in the store and
        # starts it again where the conversation lives now.
        return
    except Exception as exc:  # the caller's mistake (a reused turn id), or a crash
        log.emit(
            "failed", text=f"{type(exc).__name__}: {exc}"[:500], retryable=not is_permanent(exc)
        )
    else:
        log.emit("completed", reply=reply)
