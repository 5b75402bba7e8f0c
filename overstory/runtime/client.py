"""The client API: :func:`connect` -> :class:`Runtime` -> :class:`Conversation`.

A :class:`Conversation` is the public handle in front of a private conversation actor.
It hides ``.remote()`` and ``ray.get``, offers sync and async forms, validates input at
the boundary, and never hands out a dead actor: when the actor has died it asks the
registry for the user's conversation again (which restarts it from the store) and
re-sends the *same* turn id, which the actor treats idempotently — a turn that had
completed returns its stored reply, an interrupted one resumes; neither is duplicated.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import AbstractContextManager, aclosing, nullcontext
from dataclasses import replace
from typing import Any, TypeVar

from opentelemetry.trace import INVALID_SPAN, Span, SpanKind
from ray.exceptions import RayActorError, RayTaskError

from ..access import (
    ConversationRecord,
    Principal,
    create_record,
    owned_records,
    validate_metadata,
)
from ..agent import Agent, Placement, is_plain_name
from ..app import App, as_app, conversation_id
from ..config import Config
from ..exceptions import (
    ConfigError,
    ConversationUnavailable,
    Fenced,
    Passivated,
    StaleShardTable,
    UnknownTurn,
    UsageError,
)
from ..messages import Message, Reply, ToolDefinition, ToolOutput, TurnEvent, TurnRequest
from ..output import check_output_type
from ..providers import ModelSettings, Secret
from ..providers import api_keys as api_key_map
from ..registry import Registry
from ..rollout import (
    Deployment,
    read_deployment,
)
from ..store import run_on_store
from ..supervisors.named import unwrap_task_error
from ..telemetry import flush as flush_telemetry
from ..telemetry import inject, recording, setup_telemetry, telemetry_env, tracer
from ..telemetry.logs import LOG_ENV
from ..usage import usage as usage_of
from ..validation import validate_turn, validate_user_id
from ..wire import events_of_wire, messages_of_wire, of_wire, reply_of_wire
from ._portal import Portal
from ._steps import Get, Lost, Sleep, Steps, Target, drive_async, drive_sync
from .cluster import attach, detach
from .jobs import Jobs
from .quotas import Quotas
from .rollouts import Rollouts
from .transport import Transport, transport_for
from .vault import Vault

__all__ = ["Conversation", "Runtime", "connect"]

T = TypeVar("T")

#: Back-off between re-sends while a host restarts in place (seconds, doubling, capped).
_BACKOFF_S = (0.05, 1.0)

#: How long one poll of a turn's event log waits for news (a long poll).
_POLL_S = 10.0


#: Conversation handles a Runtime keeps (least recently used go; a dropped one is simply
#: made again on the next ``conversation()`` call).
_MAX_CACHED_HANDLES = 10_000


#: The calls a conversation checks against a principal (the others carry none).
#: The transport calls the conversation checks a principal's access for.
_CHECKED = frozenset({"send", "start_turn", "start_and_read", "events", "cancel", "history"})
#: One call of a conversation: a :class:`Transport` method, given the transport first.
Call = Callable[..., Any]
#: What the calls that answer with values (:mod:`overstory.wire`) answer, rebuilt.
_ANSWERS: dict[Call, Callable[[Any], Any]] = {
    Transport.send: reply_of_wire,
    Transport.start_and_read: events_of_wire,
    Transport.events: events_of_wire,
    Transport.history: messages_of_wire,
}


def _turn_id(turn_id: object) -> str:
    if not isinstance(turn_id, str) or not turn_id:
        raise UsageError(f"turn_id must be a non-empty string, got {turn_id!r}")
    return turn_id


def _version(version: object) -> str | None:
    """A turn's chosen agent version, checked (``None``: the rollout's)."""
    if version is None:
        return None
    if not isinstance(version, str) or not 0 < len(version) <= 64 or not version.isprintable():
        raise ConfigError(f"version must be an agent version's name, got {version!r}")
    return version


_Options = tuple[
    str | None,
    str | None,
    dict[str, Any] | None,
    Any,
    tuple[ToolDefinition, ...],
    tuple[ToolOutput, ...],
    str,
]


def _options(
    version: object,
    model: object,
    settings: object,
    output_type: object,
    tools: Sequence[ToolDefinition] = (),
    tool_outputs: Sequence[ToolOutput] = (),
    instructions: str = "",
) -> _Options:
    """A turn's choices, checked here, before anything is sent: the agent version, the
    model's name (the agent checks it is one it allows), the model settings, the
    structured output's type, the client tools offered and the outputs continued from."""
    if not all(isinstance(t, ToolDefinition) for t in tools):
        raise UsageError("tools must be ToolDefinition objects (name, description, parameters)")
    if not all(isinstance(o, ToolOutput) for o in tool_outputs):
        raise UsageError("tool_outputs must be ToolOutput objects (call_id, output)")
    if not isinstance(instructions, str):
        raise UsageError(f"instructions must be a string, got {type(instructions).__name__}")
    if model is not None and not is_plain_name(model):
        raise UsageError(
            f"model must name one of the agent's models (1-64 letters, digits, '_', '.', "
            f"'-'), got {model!r}"
        )
    try:
        checked = ModelSettings.of(settings)  # type: ignore[arg-type]
        if output_type is not None:
            check_output_type(output_type)
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    return (
        _version(version),
        model,  # type: ignore[return-value]
        checked.as_dict() or None,
        output_type,
        tuple(tools),
        tuple(tool_outputs),
        instructions,
    )


def _cursor(after: object) -> int:
    """A reader's cursor: the last ``seq`` it saw (-1: none)."""
    if isinstance(after, bool) or not isinstance(after, int) or after < -1:
        raise UsageError(f"after must be an int >= -1 (a seq seen), got {after!r}")
    return after


def _backoff(attempt: int) -> float:
    low, high = _BACKOFF_S
    return float(min(low * 2**attempt, high))


def _default_agent() -> Agent:
    return Agent("assistant", instructions="You are a helpful assistant.", model="offline:echo")


class Conversation:
    """One user's conversation with one agent. Get it with :meth:`Runtime.conversation`.

    Every call is retried under one deadline (``conversations.send_timeout_s``) when the
    process that serves the conversation dies, is restarting, passivates it or is fenced
    out of it: re-sending is safe because turns are idempotent by id.
    """

    def __init__(
        self,
        runtime: Runtime,
        user_id: str,
        agent: str,
        handle: Any,
        api_keys: Mapping[str, Secret] | None = None,
    ) -> None:
        self._runtime = runtime
        self.user_id = user_id
        self.agent = agent
        #: The conversation's id in the store, spans and logs (``agent:user``).
        self.conversation_id = conversation_id(agent, user_id)
        self._api_keys = api_keys
        self._portal = runtime._portal  # the sync face runs the async core there
        # How calls reach it: chosen once, by placement (handle: the dedicated actor).
        self._transport = transport_for(runtime.registry, self.conversation_id, api_keys, handle)
        self._lock = threading.Lock()
        # Numbers this handle's sends so the actor runs them in the order they were made.
        self._caller = uuid.uuid4().hex
        self._numbers = itertools.count()
        self._principal: Principal | None = None
        self._in_flight: set[int] = set()

    def __repr__(self) -> str:
        return (
            f"Conversation(user_id={self.user_id!r}, agent={self.agent!r}, "
            f"placement={self.placement!r})"
        )

    @property
    def placement(self) -> Placement:
        return self._transport.placement

    @property
    def actor_name(self) -> str:
        """The Ray actor serving it, as the Ray dashboard shows it (its host, if hosted)."""
        return self._transport.actor()

    # --- one call, and what to do when it fails ------------------------------------------

    def _invoke(self, target: Any, call: Call, args: tuple[Any, ...], extra: dict[str, Any]) -> Any:
        """The ObjectRef of ``call`` (a :class:`Transport` method) on ``target``, with
        keyword arguments ``extra``. A handle acting for a principal
        (:meth:`acting_for`) passes it along to every call that checks access."""
        if self._principal is not None and call.__name__ in _CHECKED:
            extra = {**extra, "principal": self._principal}
        # ``call`` names the interface's method; the placement's transport implements it.
        method: Call = getattr(self._transport, call.__name__)
        return method(target, *args, **extra)

    def acting_for(self, principal: Principal | None) -> Conversation:
        """This handle for calls made on behalf of ``principal`` (the HTTP front door's
        caller): where the conversation lives, each call is checked again against the
        conversation's owner and shares (``overstory.access``). It shares this
        handle's ordering of sends; ``None``: a trusted in-cluster caller, as usual."""
        other = copy.copy(self)
        other._principal = principal
        return other

    def _failure(self, exc: BaseException) -> tuple[BaseException, bool]:
        """``(error, retry)``: whether a re-send may succeed, and the error if not."""
        if isinstance(exc, RayTaskError):
            cause = unwrap_task_error(exc)
            if isinstance(cause, StaleShardTable):
                self._runtime.registry.hosts.update(cause)
                return cause, True
            return cause, isinstance(cause, Passivated | Fenced)
        return exc, isinstance(exc, RayActorError | ConversationUnavailable)

    def _retry_or_raise(self, method: str, exc: BaseException, deadline: float) -> BaseException:
        """The failure to re-send after; raises it when a re-send cannot help, or
        :class:`ConversationUnavailable` when the call's deadline has passed."""
        error, retry = self._failure(exc)
        if not retry:
            raise error from error.__cause__  # keep the cause it crossed Ray with
        if time.monotonic() >= deadline:
            raise self._gave_up(method, error)
        return error

    @staticmethod
    def _pause(attempt: int, error: BaseException, deadline: float) -> float:
        """How long to wait before re-sending to a host: at once to a newer route or a
        fresh entity; a host that died or restarts in place gets a doubling back-off."""
        if isinstance(error, StaleShardTable | Passivated | Fenced):
            return 0.0
        return min(_backoff(attempt), max(0.0, deadline - time.monotonic()))

    def _attempts(self, call: Call, args: tuple[Any, ...], extra: dict[str, Any]) -> Steps:
        """``call`` (a :class:`Transport` method) until it answers, re-sent after what a
        re-send may fix (a moved shard, a restarted or passivated conversation), within
        ``conversations.send_timeout_s``: the steps, as effects (:mod:`._steps`) that
        :meth:`_call_async` awaits and :meth:`_call` blocks on."""
        deadline = time.monotonic() + self._runtime.config.conversations.send_timeout_s
        for attempt in itertools.count():
            target = None
            try:
                target = yield Target()
                left = max(deadline - time.monotonic(), 0.001)
                answer = yield Get(self._invoke(target, call, args, extra), left)
                rebuild = _ANSWERS.get(call)
                if rebuild is None:
                    return answer
                what = f"{call.__name__} on the conversation {self.conversation_id!r}"
                return of_wire(answer, rebuild, what)
            except TimeoutError as exc:
                raise self._late(call.__name__) from exc
            except (RayTaskError, RayActorError, ConversationUnavailable) as exc:
                error = self._retry_or_raise(call.__name__, exc, deadline)
                if not (yield Lost(target, exc)):
                    yield Sleep(self._pause(attempt, error, deadline))
        raise AssertionError("unreachable")

    async def _call_async(self, call: Call, *args: Any, **extra: Any) -> Any:
        """:meth:`_attempts`, awaited (the async face, and the sync face's streams)."""
        return await drive_async(self._attempts(call, args, extra), self._transport)

    def _call(self, call: Call, *args: Any, **extra: Any) -> Any:
        """:meth:`_attempts` on the caller's thread, blocking in ``ray.get``: the sync
        face's calls cross no thread and no event loop (a target that must be looked up
        again is, on the portal's loop)."""
        return drive_sync(self._attempts(call, args, extra), self._transport, self._portal)

    def _late(self, method: str) -> ConversationUnavailable:
        limit = self._runtime.config.conversations.send_timeout_s
        return ConversationUnavailable(
            f"{method} on the conversation {self.conversation_id!r} did not finish within "
            f"conversations.send_timeout_s={limit:g} s. A send may be retried with the same "
            "turn_id: it is never stored twice."
        )

    def _gave_up(self, method: str, exc: BaseException) -> ConversationUnavailable:
        limit = self._runtime.config.conversations.send_timeout_s
        return ConversationUnavailable(
            f"{method} on the conversation {self.conversation_id!r} failed: it could not be "
            f"served within conversations.send_timeout_s={limit:g} s "
            f"(last: {type(exc).__name__}: {exc}). A send may be retried with the same "
            "turn_id: it is never stored twice."
        )

    def _number(self) -> tuple[int, int]:
        """This send's number and the lowest number of this handle still in flight."""
        with self._lock:
            n = next(self._numbers)
            self._in_flight.add(n)
            return n, min(self._in_flight)

    def _done(self, n: int) -> None:
        with self._lock:
            self._in_flight.discard(n)

    def _check(self, text: str, turn_id: str | None, options: _Options) -> str:
        """The id of the turn ``text`` would be, once :meth:`_request` has checked it."""
        return self._request(text, turn_id, options).turn_id

    def send(
        self,
        text: str,
        *,
        turn_id: str | None = None,
        version: str | None = None,
        model: str | None = None,
        settings: ModelSettings | Mapping[str, Any] | None = None,
        output_type: Any = None,
        tools: Sequence[ToolDefinition] = (),
        tool_outputs: Sequence[ToolOutput] = (),
        instructions: str = "",
    ) -> Reply:
        """Send ``text``; returns the assistant's reply once it is stored.

        ``turn_id`` makes a retry safe: sending the same id again never stores the message
        twice. ``version`` runs this turn on that version of the agent (one the app
        serves) instead of the one the rollout gives the conversation; the next turn
        without it is the rollout's again. ``model`` runs this turn on one of the
        models the agent allows by name (``Agent(models=...)``); ``settings``
        (:class:`~overstory.providers.ModelSettings` or a mapping: temperature,
        max_output_tokens, stop, seed) apply to this turn over the agent's;
        ``output_type`` (a pydantic model, dataclass or TypedDict) makes this turn's
        answer structured (``Reply.output``; :mod:`overstory.output`). ``tools``
        (:class:`~overstory.ToolDefinition` s) are offered beside the agent's own and run
        by the caller: a call to one ends the turn with it in ``Reply.awaiting``; the
        next turn sends their ``tool_outputs`` (:class:`~overstory.ToolOutput` s) and an
        empty ``text``, and goes on from them. ``instructions``: this turn's own, with the
        agent's as its ``caller_instructions`` says. Raises
        :class:`~overstory.exceptions.InvalidMessage` for bad input,
        :class:`~overstory.exceptions.UnknownAgent` for a version not served and
        :class:`~overstory.exceptions.TurnFailed` when the model could not answer.
        """
        options = _options(version, model, settings, output_type, tools, tool_outputs, instructions)
        request = self._request(text, turn_id, options)
        reply: Reply = drive_sync(self._sending(request), self._transport, self._portal)
        return reply

    async def send_async(
        self,
        text: str,
        *,
        turn_id: str | None = None,
        version: str | None = None,
        model: str | None = None,
        settings: ModelSettings | Mapping[str, Any] | None = None,
        output_type: Any = None,
        tools: Sequence[ToolDefinition] = (),
        tool_outputs: Sequence[ToolOutput] = (),
        instructions: str = "",
    ) -> Reply:
        """Async form of :meth:`send`."""
        options = _options(version, model, settings, output_type, tools, tool_outputs, instructions)
        return await self._sent(self._request(text, turn_id, options))

    def _request(self, text: str, turn_id: str | None, options: _Options) -> TurnRequest:
        """The turn to send, checked (its number and span context are set by :meth:`_sending`)."""
        request = TurnRequest(
            turn_id or uuid.uuid4().hex, text, self._caller, 0, None, None, *options
        )
        validate_turn(request, max_chars=self._runtime.config.limits.max_message_chars)
        return request

    async def _sent(self, request: TurnRequest) -> Reply:
        """Send ``request`` as this handle's next turn (numbered, in its span)."""
        reply: Reply = await drive_async(self._sending(request), self._transport)
        return reply

    def _sending(self, request: TurnRequest) -> Steps:
        n, low = self._number()
        try:
            with self._span():
                request = replace(request, n=n, low=low, carrier=inject())
                return (yield from self._attempts(Transport.send, (request,), {}))
        finally:
            self._done(n)

    def append(self, messages: Sequence[Message], *, turn_id: str | None = None) -> Reply:
        """Store ``messages`` (user and assistant messages, tool calls and their
        returns) after the history, with no model call: history a caller brings (the
        HTTP door's conversation items). ``turn_id`` makes a retry safe, as for
        :meth:`send`; the reply holds the messages as stored (their ``seq``)."""
        return self._portal.run(self.append_async(messages, turn_id=turn_id))

    async def append_async(
        self, messages: Sequence[Message], *, turn_id: str | None = None
    ) -> Reply:
        """Async form of :meth:`append`."""
        if not messages or not all(isinstance(m, Message) for m in messages):
            raise UsageError("append takes a non-empty list of messages")
        turn_id = turn_id or uuid.uuid4().hex
        request = TurnRequest(turn_id, "", self._caller, append=tuple(messages))
        validate_turn(request, max_chars=self._runtime.config.limits.max_message_chars)
        return await self._sent(request)

    def hide(self, seqs: Sequence[int]) -> Reply:
        """Delete stored messages ``seqs`` as their owner may: each becomes a
        tombstone — its record stays in the store (``hidden``, for audit), and neither
        the model nor the HTTP door's item lists see it again. Idempotent."""
        return self._portal.run(self.hide_async(seqs))

    async def hide_async(self, seqs: Sequence[int]) -> Reply:
        """Async form of :meth:`hide`."""
        request = TurnRequest(uuid.uuid4().hex, "", self._caller, hide=tuple(seqs))
        validate_turn(request, max_chars=self._runtime.config.limits.max_message_chars)
        return await self._sent(request)

    # --- streamed turns ----------------------------------------------------------------------

    def stream(
        self,
        text: str,
        *,
        turn_id: str | None = None,
        version: str | None = None,
        model: str | None = None,
        settings: ModelSettings | Mapping[str, Any] | None = None,
        output_type: Any = None,
        tools: Sequence[ToolDefinition] = (),
        tool_outputs: Sequence[ToolOutput] = (),
        instructions: str = "",
    ) -> Iterator[TurnEvent]:
        """Send ``text`` and iterate over the turn's events as they happen (each with
        its ``seq``): ``started``, text ``delta`` s, ``tool_call`` / ``tool_result``,
        ``fallback``, and a terminal ``completed`` (with the :class:`Reply`), ``failed``
        or ``incomplete``. The deltas join to exactly the stored reply text.

        The turn runs in the conversation, not in this call: stop reading and it goes on;
        :meth:`resume` reads it again from any ``seq``. If the process running it dies,
        the turn is started again where the conversation lives next (a ``restarted``
        event: text since the last stored message is void) and the events go on.
        ``version``, ``model``, ``settings``, ``tools``, ``tool_outputs``,
        ``instructions``: as for :meth:`send`.
        """
        options = _options(version, model, settings, output_type, tools, tool_outputs, instructions)
        turn_id = self._check(text, turn_id, options)  # refused here, before the first read
        return self._portal.iterate(self._stream(text, turn_id, options))

    async def stream_async(
        self,
        text: str,
        *,
        turn_id: str | None = None,
        version: str | None = None,
        model: str | None = None,
        settings: ModelSettings | Mapping[str, Any] | None = None,
        output_type: Any = None,
        tools: Sequence[ToolDefinition] = (),
        tool_outputs: Sequence[ToolOutput] = (),
        instructions: str = "",
    ) -> AsyncGenerator[TurnEvent, None]:
        """Async form of :meth:`stream`."""
        options = _options(version, model, settings, output_type, tools, tool_outputs, instructions)
        turn_id = self._check(text, turn_id, options)
        async for event in self._stream(text, turn_id, options):
            yield event

    async def stream_batches_async(
        self,
        text: str,
        *,
        turn_id: str | None = None,
        version: str | None = None,
        model: str | None = None,
        settings: ModelSettings | Mapping[str, Any] | None = None,
        output_type: Any = None,
        tools: Sequence[ToolDefinition] = (),
        tool_outputs: Sequence[ToolOutput] = (),
        instructions: str = "",
    ) -> AsyncGenerator[list[TurnEvent], None]:
        """:meth:`stream_async`, its events in the groups they arrived in (each a
        non-empty list): for a relay that forwards a group in one write instead of one
        write per event (the HTTP door does)."""
        options = _options(version, model, settings, output_type, tools, tool_outputs, instructions)
        turn_id = self._check(text, turn_id, options)
        async with aclosing(self._batches(text, turn_id, options)) as batches:
            async for batch in batches:
                yield batch

    async def _stream(
        self, text: str, turn_id: str, options: _Options
    ) -> AsyncGenerator[TurnEvent, None]:
        async with aclosing(self._batches(text, turn_id, options)) as batches:
            async for batch in batches:
                for event in batch:
                    yield event

    async def _batches(
        self, text: str, turn_id: str, options: _Options
    ) -> AsyncGenerator[list[TurnEvent], None]:
        n, low = self._number()  # in flight until the turn ends: later sends queue behind
        after = -1
        try:
            with self._span():
                request = TurnRequest(turn_id, text, self._caller, n, low, inject(), *options)
                # Started, and its first events read, in one call.
                answer: tuple[list[TurnEvent], bool] | None = await self._call_async(
                    Transport.start_and_read, request, after, _POLL_S
                )
            while True:
                if answer is None:
                    try:
                        answer = await self._call_async(Transport.events, turn_id, after, _POLL_S)
                    except UnknownTurn:  # its process died before storing the message: again
                        request = replace(request, carrier=None)
                        await self._call_async(Transport.start_turn, request, after)
                        continue
                events, ended = answer
                answer = None
                if ended:  # done before the last yield: a reader may stop at the end
                    self._done(n)
                if events:
                    after = events[-1].seq
                    yield events
                if ended:
                    return
        finally:
            self._done(n)

    def cancel(self, turn_id: str) -> bool:
        """Stop streamed turn ``turn_id`` at its next safe point (between the model's
        deltas, or after a tool returns): it ends ``incomplete`` (reason
        ``"cancelled"``), what it produced stored as its answer. ``False`` when it is
        not running (finished already, or not a streamed turn)."""
        cancelled: bool = self._call(Transport.cancel, _turn_id(turn_id))
        return cancelled

    async def cancel_async(self, turn_id: str) -> bool:
        """Async form of :meth:`cancel`."""
        cancelled: bool = await self._call_async(Transport.cancel, _turn_id(turn_id))
        return cancelled

    def resume(self, turn_id: str, *, after: int = -1) -> Iterator[TurnEvent]:
        """The events of turn ``turn_id`` after ``seq`` ``after`` — of a running turn as
        they happen, of a finished one at once — the same events a reader of
        :meth:`stream` got (within ``streams.window_s`` of its end; after that, rebuilt
        from the stored messages, one delta per model answer)."""
        turn_id, after = _turn_id(turn_id), _cursor(after)  # refused here, at the call
        return self._portal.iterate(self._resume(turn_id, after))

    async def resume_async(
        self, turn_id: str, *, after: int = -1
    ) -> AsyncGenerator[TurnEvent, None]:
        """Async form of :meth:`resume`."""
        async for event in self._resume(_turn_id(turn_id), _cursor(after)):
            yield event

    async def _resume(self, turn_id: str, after: int) -> AsyncGenerator[TurnEvent, None]:
        while True:
            events, ended = await self._call_async(Transport.events, turn_id, after, _POLL_S)
            for event in events:
                yield event
                after = event.seq
            if ended:
                return

    def _span(self) -> AbstractContextManager[Span]:
        """The client's span of one send: the parent of the turn's spans in the actor
        (none where no tracer provider is installed: :func:`~overstory.telemetry.recording`)."""
        if not recording():
            return nullcontext(INVALID_SPAN)
        return tracer().start_as_current_span(
            "overstory.send",
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.conversation.id": self.conversation_id,
                "gen_ai.agent.name": self.agent,
            },
        )

    async def events_async(
        self, turn_id: str, *, after: int = -1, wait_s: float = 0.0
    ) -> tuple[list[TurnEvent], bool]:
        """One look at turn ``turn_id``: ``(its events after seq after, whether it has
        ended)``, waiting up to ``wait_s`` for a first one (0: what is there now)."""
        if isinstance(wait_s, bool) or not isinstance(wait_s, int | float) or not 0 <= wait_s <= 60:
            raise UsageError(f"wait_s must be 0..60 seconds, got {wait_s!r}")
        found: tuple[list[TurnEvent], bool] = await self._call_async(
            Transport.events, _turn_id(turn_id), _cursor(after), float(wait_s)
        )
        return found

    def history(
        self,
        *,
        after: int = -1,
        limit: int | None = None,
        before: int | None = None,
        turn: str | None = None,
    ) -> list[Message]:
        """The conversation's stored messages in seq order: every one, or a page — the
        first ``limit`` with ``seq`` above ``after``, or with ``before``, the last
        ``limit`` below it (read from the store, however long the conversation;
        compaction never removes any) — or ``turn``'s messages. Deleted messages
        (:meth:`hide`) are among them, marked ``hidden``."""
        messages: list[Message] = self._call(
            Transport.history, *_history_args(after, limit, before, turn)
        )
        return messages

    async def history_async(
        self,
        *,
        after: int = -1,
        limit: int | None = None,
        before: int | None = None,
        turn: str | None = None,
    ) -> list[Message]:
        """Async form of :meth:`history`."""
        messages: list[Message] = await self._call_async(
            Transport.history, *_history_args(after, limit, before, turn)
        )
        return messages

    def info(self) -> dict[str, Any]:
        """The actor's pid, message count and turns served (for operators and tests)."""
        info: dict[str, Any] = self._call(Transport.info)
        return info

    async def info_async(self) -> dict[str, Any]:
        """Async form of :meth:`info`."""
        info: dict[str, Any] = await self._call_async(Transport.info)
        return info


def _history_args(
    after: int, limit: int | None, before: int | None, turn: str | None
) -> tuple[int, int | None, int | None, str | None]:
    """:meth:`Conversation.history`'s arguments, checked, as the transport takes them."""
    if turn is not None:
        if not isinstance(turn, str) or not turn or len(turn) > 256:
            raise UsageError(f"turn must be a turn id, got {turn!r:.80}")
        if (after, limit, before) != (-1, None, None):
            raise UsageError("give turn alone: a turn's messages are read whole")
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 100_000
    ):
        raise UsageError(f"limit must be an int in [1, 100000] or None, got {limit!r}")
    if before is not None:
        if isinstance(before, bool) or not isinstance(before, int) or before < 0:
            raise UsageError(f"before must be an int >= 0 (a seq) or None, got {before!r}")
        if after != -1:
            raise UsageError("give after or before, not both")
    return _cursor(after), limit, before, turn


class Runtime:
    """A connection to overstory on a Ray cluster. Get one with :func:`connect`.

    ``app`` is the local app this driver serves (``connect(agent)``), ``None`` when it
    talks to a deployed one (``connect()`` against ``overstory serve MODULE:ATTR``).
    """

    def __init__(
        self,
        config: Config,
        app: App | None,
        *,
        started_ray: bool,
        placement: Placement | None = None,
        adopt: bool = False,
    ) -> None:
        self.config = config
        self.app = app
        self.started_ray = started_ray
        self.registry = Registry(
            config=config, app=app, placement=placement, adopt=adopt, job_turns=ClientTurns
        )
        # Handles by conversation id, least recently used first: a long-lived driver (a
        # web server) sees users come and go, so the cache is bounded.
        self._conversations: OrderedDict[str, Conversation] = OrderedDict()
        self._lock = threading.Lock()
        # The sync methods run their async forms on this loop (one thread, made on use).
        self._portal = Portal()
        #: Background jobs (:class:`~overstory.runtime.jobs.Jobs`).
        self.jobs = Jobs(self)
        #: Per-user quotas (:class:`~overstory.runtime.quotas.Quotas`).
        self.quotas = Quotas(self)
        #: Agent versions' rollouts (:class:`~overstory.runtime.rollouts.Rollouts`).
        self.rollouts = Rollouts(self)
        #: The DataVault, for operators (:class:`~overstory.runtime.vault.Vault`).
        self.vault = Vault(self)

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the app --------------------------------------------------------------------------

    def served(self) -> dict[str, Any]:
        """What the tree serves: ``{"default", "agents": {name: [versions]}, "source",
        "placement", "deployment"}`` (:meth:`~overstory.app.App.describe`)."""
        return dict(self.registry.served(refresh=True))

    def _cid(self, user_id: str, agent: str | None) -> tuple[str, str]:
        """``(agent name, conversation id)`` of ``user_id``'s conversation with ``agent``
        (default: the app's first agent); :class:`~overstory.exceptions.UnknownAgent`
        when the tree does not serve it."""
        validate_user_id(user_id, max_chars=self.config.limits.max_user_id_chars)
        if agent is not None and not isinstance(agent, str):
            raise ConfigError(f"agent must be an agent's name (a string), got {agent!r}")
        name = self.registry.agent_name(agent)
        return name, conversation_id(name, user_id)

    # --- conversations ----------------------------------------------------------------------

    def conversation(
        self,
        user_id: str,
        *,
        agent: str | None = None,
        api_keys: Mapping[str, str] | None = None,
    ) -> Conversation:
        """Get-or-start ``user_id``'s conversation with agent ``agent`` (by name; default:
        the app's first agent). Each (agent, user) pair is its own history.

        ``api_keys`` (``{"openai": "sk-...", "anthropic": "..."}``) make this user's
        conversation call those vendors with the user's own keys (bring-your-own-key),
        through provider actors of their own. Keys bind when the conversation starts;
        to change them, :meth:`stop_conversation` first.
        """
        return self._portal.run(self.conversation_async(user_id, agent=agent, api_keys=api_keys))

    async def conversation_async(
        self,
        user_id: str,
        *,
        agent: str | None = None,
        api_keys: Mapping[str, str] | None = None,
    ) -> Conversation:
        """Async form of :meth:`conversation`."""
        if self.registry.known_agent(agent) is not None:  # no call to make: on the loop
            name, cid = self._cid(user_id, agent)
        else:  # the app's agents are read from the tree: a blocking call, off the loop
            name, cid = await asyncio.to_thread(self._cid, user_id, agent)
        keys = api_key_map(api_keys) if api_keys else None
        with self._lock:
            conv = self._conversations.get(cid)
        if conv is not None and conv._api_keys == keys:
            return self._remember(conv)  # most recently used now
        handle = await self.registry.placed.handle(self.registry, cid, keys)
        return self._remember(Conversation(self, user_id, name, handle, keys))

    def _remember(self, conv: Conversation) -> Conversation:
        with self._lock:
            self._conversations[conv.conversation_id] = conv
            self._conversations.move_to_end(conv.conversation_id)
            while len(self._conversations) > _MAX_CACHED_HANDLES:
                self._conversations.popitem(last=False)
        return conv

    def stop_conversation(self, user_id: str, *, agent: str | None = None) -> bool:
        """Passivate ``user_id``'s conversation now (history stays stored; the next call
        re-activates it). ``False`` when it was not live or is in the middle of a turn.
        """
        _name, cid = self._cid(user_id, agent)
        return self.registry.passivate(cid, "stopped")

    def status(self) -> dict[str, Any]:
        """Live conversations (total and per node) and activation/passivation/restart counts."""
        return self.registry.status()

    def rebalance(self, hosts: int | None = None) -> dict[str, Any]:
        """Hosted placement: serve with ``hosts`` hosts (default: as many as the cluster
        holds now — ``hosted.hosts_per_node`` or each node's CPUs), more or fewer, online.
        Moved conversations re-activate from the store on their new host; nothing is
        copied or lost; retired hosts finish their turns (``hosted.retire_grace_s``) and
        stop. Returns the shard table (``version``, ``shards``, ``hosts``). With
        ``hosted.auto_rebalance`` the tree also does this by itself when nodes join or
        leave; a count given here holds until the membership next changes."""
        return self.registry.rebalance(hosts)

    def usage(self, user_id: str | None = None, *, since: float | None = None) -> dict[str, Any]:
        """Turns, tool calls, tokens and cost — in total, per model and per user — read
        from the stored history (``user_id``: only theirs, their HTTP conversations
        included; ``since``: messages from that epoch second), priced by ``usage.prices`` in
        the config (:mod:`overstory.usage`)."""
        if user_id is not None:
            validate_user_id(user_id, max_chars=self.config.limits.max_user_id_chars)
        prices = self.config.usage.prices
        counted: dict[str, Any] = run_on_store(
            self.config.store, lambda st: usage_of(st, prices, user=user_id, since=since)
        )
        return counted

    # --- the store, read directly -----------------------------------------------------------

    def new_conversation(
        self,
        user_id: str,
        *,
        agent: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Conversation:
        """Start another conversation of ``user_id``'s with ``agent``, beside their default
        one (:meth:`conversation`): a user owns any number. It is the same kind of
        conversation the HTTP API makes (``POST /v1/conversations`` with that user's key
        lists and reaches it); its handle's ``user_id`` is its ``conv_...`` id, by which
        ``conversation(conv_id, agent=...)`` reaches it again. ``metadata``: up to 16
        string pairs, as OpenAI's."""
        validate_user_id(user_id, max_chars=self.config.limits.max_user_id_chars)
        name, _ = self._cid(user_id, agent)
        meta = validate_metadata(None if metadata is None else dict(metadata))

        async def make(store: Any) -> ConversationRecord | None:
            return await create_record(store, user_id, name, meta)

        record: ConversationRecord | None = run_on_store(self.config.store, make)
        if record is None:  # a fresh 96-bit id taken: practically never
            raise ConversationUnavailable("a new conversation id collided; try again")
        return self.conversation(record.id, agent=name)

    def conversations(self, user_id: str) -> list[dict[str, Any]]:
        """``user_id``'s conversations made by :meth:`new_conversation` or over HTTP,
        oldest first: ``{"id", "object", "created_at", "metadata", "agent"}`` each (their
        default conversation, :meth:`conversation`, is not among them)."""
        validate_user_id(user_id, max_chars=self.config.limits.max_user_id_chars)

        async def listed(store: Any) -> list[ConversationRecord]:
            return await owned_records(store, user_id)

        records: list[ConversationRecord] = run_on_store(self.config.store, listed)
        return [{**r.public(), "agent": r.agent} for r in records]

    def count_stored(self, user_id: str | None = None, *, agent: str | None = None) -> int:
        """Messages stored for ``user_id``'s conversation with ``agent`` (default agent),
        or with ``user_id=None`` in the whole store, read back from the store itself."""
        cid = None if user_id is None else self._cid(user_id, agent)[1]
        count: int = run_on_store(self.config.store, lambda s: s.count(cid))
        return count

    def stored_histories(
        self, user_ids: list[str], *, agent: str | None = None
    ) -> dict[str, list[Message]]:
        """Each user's messages with ``agent``, read straight from the store over one
        connection."""
        cids = {uid: self._cid(uid, agent)[1] for uid in user_ids}

        async def load(store: Any) -> dict[str, list[Message]]:
            return {uid: await store.load(cid) for uid, cid in cids.items()}

        result: dict[str, list[Message]] = run_on_store(self.config.store, load)
        return result

    def stored_history(self, user_id: str, *, agent: str | None = None) -> list[Message]:
        """``user_id``'s messages with ``agent`` read straight from the store (no actor)."""
        cid = self._cid(user_id, agent)[1]
        messages: list[Message] = run_on_store(self.config.store, lambda s: s.load(cid))
        return messages

    def close(self) -> None:
        """Forget cached handles; stop Ray if :func:`connect` started it (actors included).

        Spans this process still buffers are exported first (when telemetry is set up).
        Pending ``on_done`` callbacks are dropped (their jobs still run).
        """
        self.jobs.close()
        self._conversations.clear()
        self._portal.close()
        flush_telemetry()
        if self.started_ray:
            detach()
            self.started_ray = False


class ClientTurns:
    """How the job runner runs a job's turn (:class:`overstory.actors.jobs.JobTurns`): a
    client of its own, in the runner's process, attached to the running tree, streaming
    the turn as any driver does. The registry hands this class to the runner when it
    boots the tree; the runner makes one on its first job."""

    def __init__(self, config: Config, placement: Placement) -> None:
        self._runtime = Runtime(config, None, started_ray=False, placement=placement, adopt=True)

    async def stream(
        self, user: str, agent: str, text: str, *, turn_id: str, version: str | None
    ) -> AsyncIterator[TurnEvent]:
        conv = await self._runtime.conversation_async(user, agent=agent)
        async for event in conv.stream_async(text, turn_id=turn_id, version=version):
            yield event


def connect(
    agent: Agent | App | list[Agent] | tuple[Agent, ...] | None = None,
    *,
    config: Config | None = None,
    dashboard: bool = False,
    telemetry: bool = False,
    **settings: Any,
) -> Runtime:
    """Attach to Ray (starting a local instance if none is found) and return a Runtime.

    Without ``agent``, talk to whatever the namespace serves: the app deployed with
    ``overstory serve MODULE:ATTR`` (the tree is booted from its record if it is not
    running), else a default echo agent. With ``agent`` (an :class:`Agent`, a list of
    agents or an :class:`~overstory.app.App`), serve it from this driver — for local use
    and tests; a namespace with a deployed app refuses it rather than have a client
    replace the deployed agents.

    ``settings`` are :class:`Config` keys (``store="sqlite:///chat.db"``,
    ``namespace=...``, ``ray_address=...``; a group as a table of the keys it changes,
    ``jobs={"concurrency": 8}``, or as its model); unknown keys raise ``ConfigError``. The store
    is opened once here, so a wrong or unreachable store fails now, not on first use.

    ``telemetry=True`` sets OpenTelemetry up from the standard ``OTEL_*`` variables (in
    this process, and — by forwarding them — in the actors this job starts); without it
    overstory installs nothing global and its spans go to whatever provider you set.
    """
    if config is None:
        config = Config.from_mapping(settings, source="connect() arguments")
    elif settings:
        config = config.merged(settings, source="connect() arguments")
    app = None if agent is None else as_app(agent)
    namespace = config.namespace
    deployed: Deployment | None = run_on_store(
        config.store, lambda s: read_deployment(s, namespace)
    )
    if app is not None and deployed is not None:
        raise ConfigError(
            f"namespace {namespace!r} serves the deployed app {deployed.source!r} "
            f"(agents: {', '.join(deployed.app.get('agents', {}))}); a client cannot replace "
            "it: connect() without an agent and pick one by name, or use another namespace"
        )
    placement: Placement | None = None
    if deployed is not None:
        placement = deployed.app.get("placement", "hosted")
    elif app is None:
        app = App((_default_agent(),))
    env_vars: dict[str, str] = {}
    if telemetry and setup_telemetry():
        env_vars = telemetry_env()
    elif os.environ.get(LOG_ENV):
        env_vars = {LOG_ENV: os.environ[LOG_ENV]}  # JSON log lines in the tree's actors too
    started = attach(config.ray_address, config.namespace, dashboard=dashboard, env_vars=env_vars)
    runtime = Runtime(config, app, started_ray=started, placement=placement, adopt=agent is None)
    try:
        runtime.registry.boot()  # boot the supervision tree, or attach to it
    except BaseException:
        runtime.close()
        raise
    return runtime
