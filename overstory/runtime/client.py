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
import math
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, suppress
from typing import Any, TypeVar

import ray
from opentelemetry.trace import Span, SpanKind
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError, RayTaskError

from .. import vault as vault_ops
from ..actors.jobs import JOBS
from ..agent import Agent, Placement
from ..app import App, as_app, conversation_id
from ..audit import note
from ..exceptions import (
    ConfigError,
    ConversationUnavailable,
    Fenced,
    JobFailed,
    Passivated,
    StaleShardTable,
    UnknownTurn,
    UsageError,
)
from ..gateway.access import (
    ConversationRecord,
    create_record,
    owned_records,
    validate_metadata,
)
from ..gateway.keys import Principal
from ..jobs import (
    TERMINAL,
    JobBook,
    JobRecord,
    job_turn_id,
    new_job,
    validate_job_id,
    validate_webhook,
)
from ..messages import Message, Reply, TurnEvent
from ..providers import Secret
from ..providers import api_keys as api_key_map
from ..quota import UNSET, Quota, Unset, change_quota, report
from ..registry import Registry, actor_name
from ..rollout import (
    Deployment,
    Split,
    promote,
    read_deployment,
    read_split,
    rollback,
    rollout,
    update_split,
)
from ..store import open_store
from ..supervisors.named import unwrap_task_error
from ..telemetry import flush as flush_telemetry
from ..telemetry import inject, setup_telemetry, telemetry_env, tracer
from ..telemetry.logs import LOG_ENV
from ..usage import usage as usage_of
from ..validation import validate_message, validate_user_id
from .cluster import attach, detach
from .config import Config
from .jobwatch import JobWatcher, status_callback

__all__ = ["Conversation", "Job", "Runtime", "connect"]

T = TypeVar("T")

#: Back-off between re-sends while a host restarts in place (seconds, doubling, capped).
_BACKOFF_S = (0.05, 1.0)

#: How long one poll of a turn's event log waits for news (a long poll).
_POLL_S = 10.0


#: Conversation handles a Runtime keeps (least recently used go; a dropped one is simply
#: made again on the next ``conversation()`` call).
_MAX_CACHED_HANDLES = 10_000


#: The calls a conversation checks against a principal (the others carry none).
_CHECKED = frozenset({"send", "start_turn", "events", "cancel", "history"})


def _turn_id(turn_id: object) -> str:
    if not isinstance(turn_id, str) or not turn_id:
        raise UsageError(f"turn_id must be a non-empty string, got {turn_id!r}")
    return turn_id


def _version(version: object) -> dict[str, Any]:
    """The keyword a turn passes for a chosen agent version (none: the rollout's)."""
    if version is None:
        return {}
    if not isinstance(version, str) or not 0 < len(version) <= 64 or not version.isprintable():
        raise ConfigError(f"version must be an agent version's name, got {version!r}")
    return {"agent_version": version}


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

    Every call is retried under one deadline (``send_timeout_s``) when the process that
    serves the conversation dies, is restarting, passivates it or is fenced out of it:
    re-sending is safe because turns are idempotent by id.
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
        self._handle = handle  # dedicated placement; None when hosted
        self._api_keys = api_keys
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
        return self._runtime.registry.placement

    @property
    def actor_name(self) -> str:
        """The Ray actor serving it, as the Ray dashboard shows it (its host, if hosted)."""
        if self._handle is None:
            return self._runtime.registry.hosts.table.host_for(self.conversation_id)
        return actor_name(self.conversation_id)

    # --- one call, and what to do when it fails ------------------------------------------

    def _invoke(
        self, target: Any, method: str, args: tuple[Any, ...], extra: dict[str, Any]
    ) -> Any:
        """The ObjectRef of ``method`` on ``target`` (a dedicated handle, or a host route),
        with keyword arguments ``extra``. A handle acting for a principal
        (:meth:`acting_for`) passes it along."""
        extra = dict(extra)
        if self._principal is not None and method in _CHECKED:
            extra["principal"] = self._principal
        if self._handle is None:
            version, _name, host = target
            cid = self.conversation_id
            if method == "send":  # (turn_id, text, caller, n, low, carrier) + api_keys
                return host.send.remote(version, cid, *args, self._api_keys, **extra)
            if method == "start_turn":  # (turn_id, text, caller, n, low, carrier, after)
                *head, after = args
                return host.start_turn.remote(version, cid, *head, self._api_keys, after, **extra)
            if method in ("events", "cancel"):  # (turn_id, after, wait_s) / (turn_id,)
                return getattr(host, method).remote(version, cid, *args, self._api_keys, **extra)
            method = "info" if method == "ready" else method
            return getattr(host, method).remote(version, cid, self._api_keys, **extra)
        return getattr(target, method).remote(*args, **extra)

    def acting_for(self, principal: Principal | None) -> Conversation:
        """This handle for calls made on behalf of ``principal`` (the HTTP front door's
        caller): where the conversation lives, each call is checked again against the
        conversation's owner and shares (``overstory.gateway.access``). It shares this
        handle's ordering of sends; ``None``: a trusted in-cluster caller, as usual."""
        other = copy.copy(self)
        other._principal = principal
        return other

    def _failure(self, target: Any, exc: BaseException) -> tuple[BaseException, bool]:
        """``(error, retry)``: whether a re-send may succeed, and the error if not."""
        if isinstance(exc, RayTaskError):
            cause = unwrap_task_error(exc)
            if isinstance(cause, StaleShardTable):
                self._runtime.registry.hosts.update(cause)
                return cause, True
            return cause, isinstance(cause, Passivated | Fenced)
        if self._handle is None and (isinstance(exc, ActorDiedError | ConversationUnavailable)):
            # The host is gone for good, or not there: read the table again (a tree booted
            # again may have other hosts) and look the host up again.
            self._runtime.registry.hosts.refresh()
        return exc, isinstance(exc, RayActorError | ConversationUnavailable)

    def _retry_or_raise(
        self, method: str, target: Any, exc: BaseException, deadline: float
    ) -> BaseException:
        """The failure to re-send after; raises it when a re-send cannot help, or
        :class:`ConversationUnavailable` when the call's deadline has passed."""
        error, retry = self._failure(target, exc)
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

    def _target(self) -> Any:
        if self._handle is None:
            return self._runtime.registry.hosts.route(self.conversation_id)
        return self._handle

    async def _target_async(self) -> Any:
        if self._handle is None:
            return await self._runtime.registry.hosts.route_async(self.conversation_id)
        return self._handle

    def _call(self, method: str, *args: Any, **extra: Any) -> Any:
        deadline = time.monotonic() + self._runtime.config.send_timeout_s
        for attempt in itertools.count():
            target = None
            try:
                target = self._target()
                left = max(deadline - time.monotonic(), 0.001)
                return ray.get(self._invoke(target, method, args, extra), timeout=left)
            except GetTimeoutError as exc:
                raise self._late(method) from exc
            except (RayTaskError, RayActorError, ConversationUnavailable) as exc:
                error = self._retry_or_raise(method, target, exc, deadline)
            if self._handle is not None:
                with self._lock:  # the dedicated actor is gone: get (or start) it again
                    if self._handle is target:
                        self._handle = self._runtime.registry.get_or_start(
                            self.conversation_id, self._api_keys
                        )
            else:
                time.sleep(self._pause(attempt, error, deadline))
        raise AssertionError("unreachable")

    async def _call_async(self, method: str, *args: Any, **extra: Any) -> Any:
        deadline = time.monotonic() + self._runtime.config.send_timeout_s
        for attempt in itertools.count():
            target = None
            try:
                target = await self._target_async()
                left = max(deadline - time.monotonic(), 0.001)
                return await asyncio.wait_for(
                    self._invoke(target, method, args, extra), timeout=left
                )
            except TimeoutError as exc:
                raise self._late(method) from exc
            except (RayTaskError, RayActorError, ConversationUnavailable) as exc:
                error = self._retry_or_raise(method, target, exc, deadline)
            if self._handle is not None:
                if self._handle is target:
                    self._handle = await self._runtime.registry.get_or_start_async(
                        self.conversation_id, self._api_keys
                    )
            else:
                await asyncio.sleep(self._pause(attempt, error, deadline))
        raise AssertionError("unreachable")

    def _late(self, method: str) -> ConversationUnavailable:
        return ConversationUnavailable(
            f"{method} on the conversation {self.conversation_id!r} did not finish within "
            f"send_timeout_s={self._runtime.config.send_timeout_s:g} s. A send may be retried "
            "with the same turn_id: it is never stored twice."
        )

    def _gave_up(self, method: str, exc: BaseException) -> ConversationUnavailable:
        return ConversationUnavailable(
            f"{method} on the conversation {self.conversation_id!r} failed: it could not be "
            f"served within send_timeout_s={self._runtime.config.send_timeout_s:g} s "
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

    def _check(self, text: str, turn_id: str | None) -> str:
        validate_message(text, max_chars=self._runtime.config.max_message_chars)
        return turn_id or uuid.uuid4().hex

    def send(self, text: str, *, turn_id: str | None = None, version: str | None = None) -> Reply:
        """Send ``text``; returns the assistant's reply once it is stored.

        ``turn_id`` makes a retry safe: sending the same id again never stores the message
        twice. ``version`` runs this turn on that version of the agent (one the app
        serves) instead of the one the rollout gives the conversation; the next turn
        without it is the rollout's again. Raises
        :class:`~overstory.exceptions.InvalidMessage` for bad input,
        :class:`~overstory.exceptions.UnknownAgent` for a version not served and
        :class:`~overstory.exceptions.TurnFailed` when the model could not answer.
        """
        turn_id = self._check(text, turn_id)
        extra = _version(version)
        n, low = self._number()
        try:
            with self._span():
                reply: Reply = self._call(
                    "send", turn_id, text, self._caller, n, low, inject(), **extra
                )
        finally:
            self._done(n)
        return reply

    async def send_async(
        self, text: str, *, turn_id: str | None = None, version: str | None = None
    ) -> Reply:
        """Async form of :meth:`send`."""
        turn_id = self._check(text, turn_id)
        extra = _version(version)
        n, low = self._number()
        try:
            with self._span():
                reply: Reply = await self._call_async(
                    "send", turn_id, text, self._caller, n, low, inject(), **extra
                )
        finally:
            self._done(n)
        return reply

    # --- streamed turns ----------------------------------------------------------------------

    def stream(
        self, text: str, *, turn_id: str | None = None, version: str | None = None
    ) -> Iterator[TurnEvent]:
        """Send ``text`` and iterate over the turn's events as they happen (each with
        its ``seq``): ``started``, text ``delta`` s, ``tool_call`` / ``tool_result``,
        ``fallback``, and a terminal ``completed`` (with the :class:`Reply`), ``failed``
        or ``incomplete``. The deltas join to exactly the stored reply text.

        The turn runs in the conversation, not in this call: stop reading and it goes on;
        :meth:`resume` reads it again from any ``seq``. If the process running it dies,
        the turn is started again where the conversation lives next (a ``restarted``
        event: text since the last stored message is void) and the events go on.
        ``version``: as for :meth:`send`.
        """
        turn_id = self._check(text, turn_id)
        return self._stream(text, turn_id, _version(version))

    def _stream(self, text: str, turn_id: str, extra: dict[str, Any]) -> Iterator[TurnEvent]:
        n, low = self._number()  # in flight until the turn ends: later sends queue behind
        after = -1
        try:
            with self._span():
                self._call(
                    "start_turn", turn_id, text, self._caller, n, low, inject(), after, **extra
                )
            while True:
                try:
                    events, ended = self._call("events", turn_id, after, _POLL_S)
                except UnknownTurn:  # its process died before storing the message: again
                    self._call(
                        "start_turn", turn_id, text, self._caller, n, low, None, after, **extra
                    )
                    continue
                if ended:  # done before the last yield: a reader may stop at the end
                    self._done(n)
                for event in events:
                    yield event
                    after = event.seq
                if ended:
                    return
        finally:
            self._done(n)

    def cancel(self, turn_id: str) -> bool:
        """Stop streamed turn ``turn_id`` at its next safe point (between the model's
        deltas, or after a tool returns): it ends ``incomplete`` (reason
        ``"cancelled"``), what it produced stored as its answer. ``False`` when it is
        not running (finished already, or not a streamed turn)."""
        cancelled: bool = self._call("cancel", _turn_id(turn_id))
        return cancelled

    async def cancel_async(self, turn_id: str) -> bool:
        """Async form of :meth:`cancel`."""
        cancelled: bool = await self._call_async("cancel", _turn_id(turn_id))
        return cancelled

    def resume(self, turn_id: str, *, after: int = -1) -> Iterator[TurnEvent]:
        """The events of turn ``turn_id`` after ``seq`` ``after`` — of a running turn as
        they happen, of a finished one at once — the same events a reader of
        :meth:`stream` got (within ``stream_window_s`` of its end; after that, rebuilt
        from the stored messages, one delta per model answer)."""
        return self._resume(_turn_id(turn_id), _cursor(after))

    def _resume(self, turn_id: str, after: int) -> Iterator[TurnEvent]:
        while True:
            events, ended = self._call("events", turn_id, after, _POLL_S)
            for event in events:
                yield event
                after = event.seq
            if ended:
                return

    async def stream_async(
        self, text: str, *, turn_id: str | None = None, version: str | None = None
    ) -> AsyncGenerator[TurnEvent, None]:
        """Async form of :meth:`stream`."""
        turn_id = self._check(text, turn_id)
        extra = _version(version)
        n, low = self._number()
        after = -1
        try:
            with self._span():
                await self._call_async(
                    "start_turn", turn_id, text, self._caller, n, low, inject(), after, **extra
                )
            while True:
                try:
                    events, ended = await self._call_async("events", turn_id, after, _POLL_S)
                except UnknownTurn:
                    await self._call_async(
                        "start_turn", turn_id, text, self._caller, n, low, None, after, **extra
                    )
                    continue
                if ended:  # done before the last yield: a reader may stop at the end
                    self._done(n)
                for event in events:
                    yield event
                    after = event.seq
                if ended:
                    return
        finally:
            self._done(n)

    async def resume_async(
        self, turn_id: str, *, after: int = -1
    ) -> AsyncGenerator[TurnEvent, None]:
        """Async form of :meth:`resume`."""
        turn_id, after = _turn_id(turn_id), _cursor(after)
        while True:
            events, ended = await self._call_async("events", turn_id, after, _POLL_S)
            for event in events:
                yield event
                after = event.seq
            if ended:
                return

    def _span(self) -> AbstractContextManager[Span]:
        """The client's span of one send: the parent of the turn's spans in the actor."""
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
            "events", _turn_id(turn_id), _cursor(after), float(wait_s)
        )
        return found

    def history(self) -> list[Message]:
        """Every stored message of the conversation, in order."""
        messages: list[Message] = self._call("history")
        return messages

    async def history_async(self) -> list[Message]:
        """Async form of :meth:`history`."""
        messages: list[Message] = await self._call_async("history")
        return messages

    def info(self) -> dict[str, Any]:
        """The actor's pid, message count and turns served (for operators and tests)."""
        info: dict[str, Any] = self._call("ready")
        return info


class Job:
    """A background job (:meth:`Runtime.submit`): its ``id``, its status, its result."""

    def __init__(self, runtime: Runtime, job_id: str, user_id: str, agent: str) -> None:
        self._runtime = runtime
        self.id, self.user_id, self.agent = job_id, user_id, agent

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, user_id={self.user_id!r}, agent={self.agent!r})"

    @property
    def turn_id(self) -> str:
        """The turn it runs in the user's conversation (stored once, however often run)."""
        return job_turn_id(self.id)

    def status(self) -> dict[str, Any]:
        """:meth:`Runtime.job` of this job."""
        return self._runtime.job(self.id)

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Its status once it has ended (succeeded, failed or cancelled); ``TimeoutError``
        if it has not within ``timeout`` seconds (``None``: no limit)."""
        if timeout is not None and (isinstance(timeout, bool) or not timeout >= 0):
            raise UsageError(f"timeout must be seconds >= 0 or None, got {timeout!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.05
        while True:
            status = self.status()
            if status["state"] in TERMINAL:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"job {self.id} is still {status['state']} after {timeout:g} s "
                    f"(attempts: {status['attempts']})"
                )
            left = math.inf if deadline is None else deadline - time.monotonic()
            time.sleep(max(0.0, min(pause, left)))
            pause = min(pause * 2, 1.0)

    def result(self, timeout: float | None = None) -> str:
        """The answer's text once the job has succeeded; :class:`JobFailed` when it
        failed or was cancelled; ``TimeoutError`` after ``timeout`` seconds."""
        status = self.wait(timeout)
        if status["state"] != "succeeded":
            raise JobFailed(status)
        return str(status["reply"])

    def cancel(self) -> dict[str, Any]:
        """:meth:`Runtime.cancel_job` of this job."""
        return self._runtime.cancel_job(self.id)


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
        self.registry = Registry(config=config, app=app, placement=placement, adopt=adopt)
        # Handles by conversation id, least recently used first: a long-lived driver (a
        # web server) sees users come and go, so the cache is bounded.
        self._conversations: OrderedDict[str, Conversation] = OrderedDict()
        self._lock = threading.Lock()
        # One thread and one store connection for every submit(on_done=...), started on
        # the first and ended when none is pending or on close().
        self._job_watcher = JobWatcher(config.store, config.namespace)

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
        validate_user_id(user_id, max_chars=self.config.max_user_id_chars)
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
        name, cid = self._cid(user_id, agent)
        keys = api_key_map(api_keys) if api_keys else None
        with self._lock:
            conv = self._conversations.get(cid)
        if conv is not None and conv._api_keys == keys:
            return self._remember(conv)  # most recently used now
        handle = None
        if self.registry.placement == "dedicated":
            handle = self.registry.get_or_start(cid, keys)
        return self._remember(Conversation(self, user_id, name, handle, keys))

    async def conversation_async(
        self,
        user_id: str,
        *,
        agent: str | None = None,
        api_keys: Mapping[str, str] | None = None,
    ) -> Conversation:
        """Async form of :meth:`conversation`."""
        name, cid = await asyncio.to_thread(self._cid, user_id, agent)
        keys = api_key_map(api_keys) if api_keys else None
        conv = self._conversations.get(cid)
        if conv is not None and conv._api_keys == keys:
            return self._remember(conv)  # most recently used now
        handle = None
        if self.registry.placement == "dedicated":
            handle = await self.registry.get_or_start_async(cid, keys)
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
        """Hosted placement: grow to ``hosts`` hosts (default: as many as the cluster holds
        now — ``hosts_per_node`` or each node's CPUs), online. Moved conversations
        re-activate from the store on their new host; nothing is copied or lost. Returns
        the shard table (``version``, ``shards``, ``hosts``). Never shrinks."""
        return self.registry.rebalance(hosts)

    # --- versions -------------------------------------------------------------------------

    def _versions(self, agent: str) -> list[str]:
        name = self.registry.agent_name(agent)
        return list(self.registry.served()["agents"][name])

    def _change_split(self, agent: str, change: Callable[[Split], Split]) -> dict[str, Any]:
        versions = self._versions(agent)

        async def go(store: Any) -> Split:
            split = await update_split(store, self.config.namespace, agent, versions, change)
            await note(
                store,
                who="operator",
                action="rollout.changed",
                target=f"{self.config.namespace}/{agent}",
                outcome="ok",
                detail={
                    "live": split.live,
                    "canary": split.canary,
                    "percent": split.percent,
                    "generation": split.generation,
                },
            )
            return split

        split: Split = _run_store(self.config.store, go)
        self.registry.splits_changed()
        return split.describe()

    def split(self, agent: str) -> dict[str, Any]:
        """Agent ``agent``'s rollout split: ``live``, ``previous``, ``canary``, ``percent``,
        ``generation`` and the share of new conversations each version gets."""
        versions = self._versions(agent)
        split: Split = _run_store(
            self.config.store,
            lambda s: read_split(s, self.config.namespace, agent, versions),
        )
        return split.describe()

    def rollout(self, agent: str, version: str, percent: float) -> dict[str, Any]:
        """``percent`` % of *new* conversations of ``agent`` get ``version``; every
        conversation keeps the version it started with while the rollout runs (also
        across passivation and restarts). Idempotent; returns the split."""
        versions = self._versions(agent)
        return self._change_split(agent, lambda s: rollout(s, version, percent, versions))

    def promote(self, agent: str, version: str) -> dict[str, Any]:
        """``version`` is live for everyone: existing conversations move to it at their
        next turn (a blue-green switch). Idempotent; returns the split."""
        versions = self._versions(agent)
        return self._change_split(agent, lambda s: promote(s, version, versions))

    def rollback(self, agent: str) -> dict[str, Any]:
        """Back to the previously promoted version, for everyone, at their next turn.
        Idempotent; returns the split."""
        return self._change_split(agent, rollback)

    # --- quotas -----------------------------------------------------------------------------

    def set_quota(
        self,
        user_id: str,
        *,
        tokens_per_day: int | Unset | None = UNSET,
        requests_per_minute: int | Unset | None = UNSET,
        concurrent_turns: int | Unset | None = UNSET,
    ) -> dict[str, Any]:
        """Set ``user_id``'s own quota (:mod:`overstory.quota`): the limits given change
        (``None``: no limit of that kind), the others keep their current value (the
        configured default, for a user without a quota of their own). It holds across
        every conversation of the user, on every host and node, within 5 s (hosts read a
        user's quota again after that). Returns :meth:`quota`."""
        validate_user_id(user_id, max_chars=self.config.max_user_id_chars)
        changes = {
            name: value
            for name, value in (
                ("tokens_per_day", tokens_per_day),
                ("requests_per_minute", requests_per_minute),
                ("concurrent_turns", concurrent_turns),
            )
            if not isinstance(value, Unset)
        }
        namespace, default = self.config.namespace, self.default_quota()
        _run_store(
            self.config.store, lambda st: change_quota(st, namespace, user_id, default, changes)
        )
        return self.quota(user_id)

    def default_quota(self) -> Quota:
        """The quota of users without one of their own (``quota_*`` in the config)."""
        return self.config.default_quota()

    def quota(self, user_id: str) -> dict[str, Any]:
        """``user_id``'s quota and where they stand: ``{"user", "quota", "own" (whether
        it is theirs or the default), "usage": {"day", "tokens", "reserved_tokens",
        "running_turns", "turns_last_minute"}}``."""
        validate_user_id(user_id, max_chars=self.config.max_user_id_chars)
        namespace, default = self.config.namespace, self.default_quota()
        result: dict[str, Any] = _run_store(
            self.config.store, lambda st: report(st, namespace, user_id, default)
        )
        return result

    def usage(self, user_id: str | None = None, *, since: float | None = None) -> dict[str, Any]:
        """Turns, tool calls, tokens and cost — in total, per model and per user — read
        from the stored history (``user_id``: only theirs, their HTTP conversations
        included; ``since``: messages from that epoch second), priced by ``prices`` in
        the config (:mod:`overstory.usage`)."""
        if user_id is not None:
            validate_user_id(user_id, max_chars=self.config.max_user_id_chars)
        prices = self.config.prices
        counted: dict[str, Any] = _run_store(
            self.config.store, lambda st: usage_of(st, prices, user=user_id, since=since)
        )
        return counted

    # --- background jobs ---------------------------------------------------------------------

    def submit(
        self,
        user_id: str,
        text: str,
        *,
        agent: str | None = None,
        max_attempts: int = 3,
        delay_s: float = 0.0,
        webhook: str | None = None,
        on_done: Callable[[dict[str, Any]], None] | None = None,
    ) -> Job:
        """Queue ``text`` as a turn of ``user_id``'s conversation with ``agent`` and return
        at once (:mod:`overstory.jobs`). The job is in the store before this returns: it
        runs even if this process, a host or the runner dies, at least once and stored
        once (every attempt is the same turn), retried with backoff up to
        ``max_attempts`` while its failures are not permanent. ``delay_s`` schedules
        it that many seconds from now (Oban's ``schedule_in``).

        When it ends, ``webhook`` (an http(s) URL) gets its status as a JSON ``POST``
        (signed when ``OVERSTORY_WEBHOOK_SECRET`` is set in the cluster), and
        ``on_done(status)`` is called in this process (if it still runs and this runtime
        is not closed) by the runtime's one job watcher thread
        (:mod:`overstory.runtime.jobwatch`); a job gone from the store before it was
        seen ending gets a ``failed`` status naming the
        :class:`~overstory.exceptions.UnknownJob`.
        """
        name, _ = self._cid(user_id, agent)
        validate_message(text, max_chars=self.config.max_message_chars)
        hook = validate_webhook(webhook)
        if on_done is not None and not callable(on_done):
            raise ConfigError(f"on_done must be callable, got {on_done!r}")
        job = new_job(
            user_id,
            name,
            text,
            max_attempts=max_attempts,
            webhook=hook,
            now=time.time(),
            delay_s=delay_s,
        )
        namespace = self.config.namespace
        _run_store(self.config.store, lambda st: JobBook(st, namespace).add(job))
        self.poke_jobs()
        handle = Job(self, job.id, user_id, name)
        if on_done is not None:
            self._job_watcher.watch(job.id, status_callback(job, on_done))
        return handle

    def poke_jobs(self) -> None:
        """Wake the job runner (it would look within ``jobs_poll_s`` anyway)."""
        with suppress(ValueError, RayActorError):
            ray.get_actor(JOBS, namespace=self.config.namespace).poke.remote()

    def job(self, job_id: str) -> dict[str, Any]:
        """Job ``job_id``'s status: ``state`` (queued, running, succeeded, failed,
        cancelled), ``attempts``, ``reply`` (its answer's text), ``error`` (its last
        failure), times, ``turn_id`` …; :class:`~overstory.exceptions.UnknownJob` if
        there is none (jobs are kept ``jobs_keep_s`` after they end)."""
        namespace = self.config.namespace
        job_id = validate_job_id(job_id)
        record: JobRecord = _run_store(
            self.config.store, lambda st: JobBook(st, namespace).status(job_id)
        )
        return record.public()

    def jobs(
        self, user_id: str | None = None, *, state: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Jobs, newest first: ``user_id``'s, or everyone's; in ``state`` or any."""
        if user_id is not None:
            validate_user_id(user_id, max_chars=self.config.max_user_id_chars)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise UsageError(f"limit must be an int 1..10000, got {limit!r}")
        namespace = self.config.namespace
        records: list[JobRecord] = _run_store(
            self.config.store,
            lambda st: JobBook(st, namespace).listing(user=user_id, state=state, limit=limit),
        )
        return [r.public() for r in records]

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued job (also one waiting to be retried); its status after. A job
        running an attempt is not interrupted: :class:`~overstory.exceptions.UsageError`
        says so (as it does for one that has ended)."""
        namespace = self.config.namespace
        job_id = validate_job_id(job_id)

        async def go(store: Any) -> JobRecord:
            job, cancelled = await JobBook(store, namespace).cancel(job_id, time.time())
            if not cancelled:
                raise UsageError(f"job {job_id} is {job.state}: only a queued job is cancelled")
            return job

        record: JobRecord = _run_store(self.config.store, go)
        return record.public()

    # --- the DataVault, for operators ----------------------------------------------------------

    def vault_list(self, agent: str, user_id: str | None = None) -> list[dict[str, Any]]:
        """``agent``'s vault collections with their document counts: ``user_id``'s, or
        (``None``) every owner's (owner ``""``: the shared collections)."""
        if user_id:
            validate_user_id(user_id, max_chars=self.config.max_user_id_chars)
        listed: list[dict[str, Any]] = _run_store(
            self.config.store, lambda st: vault_ops.listing(st, agent, user_id)
        )
        return listed

    def vault_get(
        self, agent: str, collection: str, key: str, user_id: str = ""
    ) -> dict[str, Any] | None:
        """One document of ``user_id``'s (``""``: a shared collection)."""
        got: dict[str, Any] | None = _run_store(
            self.config.store, lambda st: vault_ops.fetch(st, agent, user_id, collection, key)
        )
        return got

    def vault_clear(
        self, agent: str, collection: str, key: str | None = None, user_id: str = ""
    ) -> int:
        """Delete one document of ``user_id``'s (``""``: shared) or the whole collection."""
        gone: int = _run_store(
            self.config.store, lambda st: vault_ops.clear(st, agent, user_id, collection, key)
        )
        return gone

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
        validate_user_id(user_id, max_chars=self.config.max_user_id_chars)
        name, _ = self._cid(user_id, agent)
        meta = validate_metadata(None if metadata is None else dict(metadata))

        async def make(store: Any) -> ConversationRecord | None:
            return await create_record(store, user_id, name, meta)

        record: ConversationRecord | None = _run_store(self.config.store, make)
        if record is None:  # a fresh 96-bit id taken: practically never
            raise ConversationUnavailable("a new conversation id collided; try again")
        return self.conversation(record.id, agent=name)

    def conversations(self, user_id: str) -> list[dict[str, Any]]:
        """``user_id``'s conversations made by :meth:`new_conversation` or over HTTP,
        oldest first: ``{"id", "object", "created_at", "metadata", "agent"}`` each (their
        default conversation, :meth:`conversation`, is not among them)."""
        validate_user_id(user_id, max_chars=self.config.max_user_id_chars)

        async def listed(store: Any) -> list[ConversationRecord]:
            return await owned_records(store, user_id)

        records: list[ConversationRecord] = _run_store(self.config.store, listed)
        return [{**r.public(), "agent": r.agent} for r in records]

    def count_stored(self, user_id: str | None = None, *, agent: str | None = None) -> int:
        """Messages stored for ``user_id``'s conversation with ``agent`` (default agent),
        or with ``user_id=None`` in the whole store, read back from the store itself."""
        cid = None if user_id is None else self._cid(user_id, agent)[1]
        count: int = _run_store(self.config.store, lambda s: s.count(cid))
        return count

    def stored_histories(
        self, user_ids: list[str], *, agent: str | None = None
    ) -> dict[str, list[Message]]:
        """Each user's messages with ``agent``, read straight from the store over one
        connection."""
        cids = {uid: self._cid(uid, agent)[1] for uid in user_ids}

        async def load(store: Any) -> dict[str, list[Message]]:
            return {uid: await store.load(cid) for uid, cid in cids.items()}

        result: dict[str, list[Message]] = _run_store(self.config.store, load)
        return result

    def stored_history(self, user_id: str, *, agent: str | None = None) -> list[Message]:
        """``user_id``'s messages with ``agent`` read straight from the store (no actor)."""
        cid = self._cid(user_id, agent)[1]
        messages: list[Message] = _run_store(self.config.store, lambda s: s.load(cid))
        return messages

    def close(self) -> None:
        """Forget cached handles; stop Ray if :func:`connect` started it (actors included).

        Spans this process still buffers are exported first (when telemetry is set up).
        Pending ``on_done`` callbacks are dropped (their jobs still run).
        """
        self._job_watcher.close()
        self._conversations.clear()
        flush_telemetry()
        if self.started_ray:
            detach()
            self.started_ray = False


def _run_store(url: str, fn: Callable[[Any], Any]) -> Any:
    """Run one store operation from sync code (in a thread when a loop is running)."""

    async def go() -> Any:
        store = open_store(url)
        await store.open()
        try:
            return await fn(store)
        finally:
            await store.close()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(go())
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, go()).result()


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
    ``namespace=...``, ``ray_address=...``); unknown keys raise ``ConfigError``. The store
    is opened once here, so a wrong or unreachable store fails now, not on first use.

    ``telemetry=True`` sets OpenTelemetry up from the standard ``OTEL_*`` variables (in
    this process, and — by forwarding them — in the actors this job starts); without it
    overstory installs nothing global and its spans go to whatever provider you set.
    """
    if config is None:
        config = Config.from_mapping(settings, source="connect() arguments")
    elif settings:
        config = Config.from_mapping(
            {**config.model_dump(), **settings}, source="connect() arguments"
        )
    app = None if agent is None else as_app(agent)
    namespace = config.namespace
    deployed: Deployment | None = _run_store(config.store, lambda s: read_deployment(s, namespace))
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
