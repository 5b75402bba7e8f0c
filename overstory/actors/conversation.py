"""ConversationActor: one user's conversation as a named, detached Ray actor.

A thin shell around :func:`~overstory.actors.turn.run_turn`. When it activates it takes a
new epoch from the store (fencing out any older incarnation still running) and loads the
history, so a restarted or re-activated actor rebuilds itself. Turns run one at a time
through a :class:`~overstory.actors.gate.TurnGate`, each caller's in the order it sent
them; history reads are answered at any time.

Lifecycle (virtual actor): after ``idle_timeout_s`` without a turn the actor asks its
supervisor to passivate it; the supervisor calls :meth:`passivate` (which waits for a
running turn to finish and then refuses new ones with
:class:`~overstory.exceptions.Passivated`) and kills it. Everything is already stored,
so nothing is lost. Users never see this class; they hold a
:class:`~overstory.runtime.client.Conversation`.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from ..access import Need, Principal, RecordCache, check_access, user_of
from ..app import App
from ..exceptions import Fenced, Passivated, SequenceConflict
from ..messages import Message, Reply, TurnEvent
from ..providers import Secret
from ..providers.pool import provider_namespace
from ..quota import Quota, QuotaBook, Ticket, finish
from ..store import HistoryStore, open_store
from ..supervisors.watch import RESTARTED, new_incarnation, watched_elsewhere
from ..telemetry import attached, setup_telemetry
from ..telemetry import flush as flush_telemetry
from ..validation import MAX_MESSAGE_CHARS, validate_message
from .gate import TurnGate
from .serving import Binding, Serving
from .turn import Emit, run_turn
from .turnlog import TurnStreams

__all__ = ["ConversationActor"]


class ConversationActor:
    """Holds one conversation's history (the Ray actor class is built by the supervisor)."""

    def __init__(
        self,
        conversation_id: str,
        app: App | None,
        store_url: str,
        max_message_chars: int = MAX_MESSAGE_CHARS,
        idle_timeout_s: float | None = None,
        supervisor: Any = None,
        namespace: str = "overstory",
        api_keys: Mapping[str, Secret] | None = None,
        rollout_refresh_s: float = 5.0,
        stream_keep_turns: int = 8,
        stream_window_s: float = 300.0,
        quota: Quota | None = None,
        turn_timeout_s: float = 300.0,
        quota_output_tokens: int = 1024,
        prices: Mapping[str, Mapping[str, float]] | None = None,
    ) -> None:
        self.conversation_id = conversation_id
        # The app's namespace (the actor's, not its job's): provider actors live there.
        self.namespace = namespace
        self.api_keys = api_keys
        self.max_message_chars = max_message_chars
        self.idle_timeout_s = idle_timeout_s
        self._supervisor = supervisor
        self.incarnation = new_incarnation()  # a new one each time Ray restarts this actor
        setup_telemetry()  # exports spans when the OTEL_* variables reached this process
        self._store: HistoryStore = open_store(store_url)
        self._records = RecordCache()  # HTTP conversations' records, for check_access
        # The deployed app (this process imports it) or the local one; its version per turn.
        self.serving = Serving(namespace, self._store, app, rollout_refresh_s)
        self.binding = Binding.of(conversation_id, api_keys)
        self.prices = dict(prices or {})
        self.quotas = QuotaBook(
            self._store,
            namespace,
            quota or Quota(),
            turn_timeout_s=turn_timeout_s,
            output_tokens=quota_output_tokens,
        )
        self._history: list[Message] = []
        self._epoch = 0
        self._loaded = False
        self._load_lock = asyncio.Lock()
        self._gate = TurnGate()
        self._streams = TurnStreams(stream_keep_turns, stream_window_s)
        self._started_at = time.time()
        self._last_active = time.monotonic()
        self._last_active_at = time.time()  # comparable across actors (LRU eviction)
        self._turns = 0
        self._in_turn = 0
        self._closing = False
        self._stopped: asyncio.Event | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._asking: asyncio.Task[None] | None = None

    async def _admit(self, user: str, turn_id: str, text: str) -> Ticket | None:
        """``user``'s quota admits turn ``turn_id`` (``None``: no limit applies)."""
        instructions = self.serving.app.get(self.binding.agent).instructions
        return await self.quotas.admit_turn(
            user, self.conversation_id, turn_id, text, self._history, instructions
        )

    async def _check(self, principal: Principal | None, need: Need) -> None:
        """A call made for an HTTP caller: may they (``check_access``)?"""
        if principal is not None:
            await self._load()
            await check_access(self._store, self.conversation_id, principal, need, self._records)

    async def _load(self) -> None:
        if self._loaded:
            return
        async with self._load_lock:
            if not self._loaded:
                await self._store.open()
                (await self.serving.load()).check(self.binding.agent)
                self._epoch = await self._store.acquire(self.conversation_id)
                self._history = await self._store.load(self.conversation_id)
                self._loaded = True
                self._arm_idle_timer()

    def _arm_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self.idle_timeout_s is not None and self._supervisor is not None:
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(self.idle_timeout_s, self._on_idle)

    def _on_idle(self) -> None:
        if self._in_turn or self._closing:
            return
        self._asking = asyncio.get_running_loop().create_task(self._ask_to_passivate())

    async def _ask_to_passivate(self) -> None:
        """Ask, don't act: the supervisor owns the lifecycle and may have raced a new send.

        On success the supervisor kills this process before the answer arrives. A refusal
        or a supervisor that is restarting (it has not adopted this actor yet, or the ask
        was lost with its old process) arms the timer again, so an idle conversation is
        passivated in the end; a turn that is running re-arms it when it ends.
        """
        try:
            passivated = await self._supervisor.passivate.remote(self.conversation_id, "idle")
        except (RayActorError, RayTaskError):
            passivated = False
        if not passivated and not self._closing and not self._in_turn:
            self._arm_idle_timer()

    async def ready(self) -> dict[str, Any]:
        """Loads the history if needed; returns when the actor can serve (activation)."""
        if self._closing:
            raise Passivated(f"conversation {self.conversation_id!r} is passivating")
        await self._load()
        return self.info()

    def info(self) -> dict[str, Any]:
        return {
            "conversation_id": self.conversation_id,
            "pid": os.getpid(),
            "incarnation": self.incarnation,
            "node_id": ray.get_runtime_context().get_node_id(),
            "epoch": self._epoch,
            "messages": len(self._history),
            "turns_served": self._turns,
            "started_at": self._started_at,
            "idle_s": time.monotonic() - self._last_active,
            "last_active_at": self._last_active_at,
            "busy": self._in_turn > 0,
            "agent": self.binding.agent,
            "agent_version": self.binding.version,
            "placement": "dedicated",
            # Vendor SDKs belong in provider actors; this shows none leaked in here.
            "vendor_sdks": sorted(m for m in ("anthropic", "openai") if m in sys.modules),
        }

    def own_keys(self) -> Mapping[str, Secret] | None:
        """The user's own vendor keys this actor was started with (its supervisor keeps
        them for restarts)."""
        return self.api_keys

    async def send(
        self,
        turn_id: str,
        text: str,
        caller: str | None = None,
        n: int = 0,
        low: int | None = None,
        carrier: dict[str, str] | None = None,
        emit: Emit | None = None,
        should_stop: Callable[[], bool] | None = None,
        *,
        principal: Principal | None = None,
        agent_version: str | None = None,
        admitted: bool = False,
        ticket: Ticket | None = None,
    ) -> Reply:
        """Run turn ``turn_id``; ``caller``/``n``/``low`` order one client's sends (TurnGate).

        ``carrier`` is the client's trace context: the turn's spans become its children.
        ``emit`` (in-process only) streams the turn into its event log. ``principal``:
        the HTTP caller, checked here again (``check_access``). ``agent_version``: the
        version the caller chose for this turn (else the rollout's). The user's quota
        admits the turn first; ``admitted`` and ``ticket`` (in-process only):
        :meth:`start_turn` did.
        """
        await self._check(principal, "write")
        validate_message(text, max_chars=self.max_message_chars)
        if self._closing:
            raise Passivated(f"conversation {self.conversation_id!r} is passivating")
        self._in_turn += 1
        try:
            await self._load()
            # Whose conversation: the quota's user, the cache's scope, the user a tool is told.
            user = await user_of(self._store, self.conversation_id, self._records)
            if not admitted:
                ticket = await self._admit(user, turn_id, text)
            async with self._gate.turn(caller, n, low):
                if self._closing:
                    raise Passivated(f"conversation {self.conversation_id!r} is passivating")
                try:
                    with attached(carrier), provider_namespace(self.namespace):
                        agent = await self.serving.agent_for(
                            self.conversation_id,
                            self.binding,
                            bool(self._history),
                            agent_version,
                        )
                        return await run_turn(
                            agent,
                            self._store,
                            self.conversation_id,
                            self._history,
                            turn_id,
                            text,
                            epoch=self._epoch,
                            emit=emit,
                            should_stop=should_stop,
                            ticket=ticket,
                            owner=user,
                            prices=self.prices,
                        )
                except SequenceConflict:
                    # Someone else wrote this conversation: our copy is stale. Reload so
                    # the next turn starts from what is stored, and let the caller know.
                    self._history = await self._store.load(self.conversation_id)
                    raise
                except Fenced:
                    # A newer incarnation took the conversation over: this one is a zombie
                    # and must not serve again. It ends its own process (a crash, as far as
                    # Ray and the supervisor are concerned) right after answering, so the
                    # caller re-resolves the conversation and re-sends its turn.
                    self._closing = True
                    asyncio.get_running_loop().call_later(0.2, os._exit, 70)
                    raise
                finally:
                    self._turns += 1
        finally:
            if ticket is not None and not admitted:  # start_turn's run() finishes its own
                await finish(ticket)
            self._in_turn -= 1
            self._last_active = time.monotonic()
            self._last_active_at = time.time()
            if not self._closing:
                self._arm_idle_timer()

    # --- streamed turns (see HostActor.start_turn / events) ------------------------------

    async def start_turn(
        self,
        turn_id: str,
        text: str,
        caller: str | None = None,
        n: int = 0,
        low: int | None = None,
        carrier: dict[str, str] | None = None,
        after: int = -1,
        *,
        principal: Principal | None = None,
        agent_version: str | None = None,
    ) -> int:
        """Start turn ``turn_id`` running into its event log; returns the log's first
        ``seq`` at once. Idempotent while the log is here."""
        await self._check(principal, "write")
        validate_message(text, max_chars=self.max_message_chars)
        if self._closing:
            raise Passivated(f"conversation {self.conversation_id!r} is passivating")
        await self._load()

        def run(
            emit: Emit, should_stop: Callable[[], bool], ticket: Ticket | None
        ) -> Awaitable[Reply]:
            return self.send(
                turn_id,
                text,
                caller,
                n,
                low,
                carrier,
                emit,
                should_stop,
                agent_version=agent_version,
                admitted=True,
                ticket=ticket,
            )

        async def admit() -> Ticket | None:  # the quota refuses before the turn starts
            user = await user_of(self._store, self.conversation_id, self._records)
            return await self._admit(user, turn_id, text)

        return await self._streams.start_admitted(turn_id, after, run, self._history, admit)

    async def cancel(self, turn_id: str, *, principal: Principal | None = None) -> bool:
        """Ask streamed turn ``turn_id`` to stop at its next safe point (see
        ``HostActor.cancel``)."""
        await self._check(principal, "write")
        return self._streams.cancel(turn_id)

    async def events(
        self,
        turn_id: str,
        after: int = -1,
        wait_s: float = 10.0,
        *,
        principal: Principal | None = None,
    ) -> tuple[list[TurnEvent], bool]:
        """``(events after after, ended)`` of turn ``turn_id`` (a long poll)."""
        await self._check(principal, "read")
        await self._load()

        def restart(text: str) -> Awaitable[int]:
            return self.start_turn(turn_id, text, after=after)

        binding = self.binding
        return await self._streams.events(
            self.conversation_id,
            turn_id,
            after,
            wait_s,
            self._history,
            (binding.agent, binding.version or ""),
            restart,
        )

    def forget_splits(self) -> bool:
        """A rollout command changed a split: read it again before the next turn."""
        self.serving.forget_splits()
        return True

    async def history(self, *, principal: Principal | None = None) -> list[Message]:
        """The stored messages; during a turn, those of the turn stored so far."""
        await self._check(principal, "read")
        await self._load()
        return list(self._history)

    async def passivate(self) -> bool:
        """Stop taking turns once the running one (if any) ends; ``False`` if busy again.

        Called by the supervisor before it kills this actor. A turn that is already
        waiting is let through first: passivation never strands a caller.
        """
        if self._in_turn:
            return False
        self._closing = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        await self._store.close()
        flush_telemetry(2.0)  # the supervisor kills this process next
        if self._stopped is not None:
            self._stopped.set()
        return True

    async def watch(self, incarnation: str | None = None) -> str:
        """Pending until this actor passivates ("passivated"); fails promptly if it dies.

        The supervisor keeps one such call in flight per child: that is how it notices
        a death within about a second, without polling. ``incarnation`` is the process
        the supervisor means; if this is another one, a restart was missed ("restarted",
        at once: :mod:`overstory.supervisors.watch`).
        """
        if watched_elsewhere(incarnation, self.incarnation):
            return RESTARTED
        if self._stopped is None:
            self._stopped = asyncio.Event()
        if self._closing:
            return "passivated"
        await self._stopped.wait()
        return "passivated"
