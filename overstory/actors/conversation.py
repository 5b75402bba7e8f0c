"""ConversationActor: one user's conversation as a named, detached Ray actor (dedicated
placement).

A shell around one :class:`~overstory.conversation.entity.Entity`: what the conversation
does and guarantees — access, quota, order, the turn under its deadline, streamed turns,
crash → restart → quarantine — is the entity's, the same as in a host
(:mod:`overstory.conversation`). This actor owns activation, passivation and transport:
when it activates it takes a new epoch from the store (fencing out any older
incarnation) and loads the history, so a restarted or re-activated actor rebuilds
itself. A crash of the entity (a turn past its deadline, an exception escaping the turn)
reloads it from the store in this same process; a process that dies is restarted by Ray
and watched by the :class:`~overstory.supervisors.conversations.ConversationSupervisor`.

Lifecycle (virtual actor): after ``conversations.idle_timeout_s`` without a turn the actor asks its
supervisor to passivate it; the supervisor calls :meth:`passivate` (refused while a turn
is running or waiting; afterwards new turns get
:class:`~overstory.exceptions.Passivated`) and kills it. Everything is already stored,
so nothing is lost. Users never see this class; they hold a
:class:`~overstory.runtime.client.Conversation`.

Requests, replies, events and history pages cross Ray as :mod:`overstory.wire` lays
them out (lists msgpack packs, instead of pickled dataclasses): the entry points below
take a ``wire`` and answer one.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from .._ray import restarts_of_this_actor
from ..access import Principal
from ..app import App
from ..config import Config
from ..conversation.entity import Entity, Shell
from ..conversation.serving import Binding
from ..exceptions import Passivated
from ..providers import Secret
from ..supervisors.watch import RESTARTED, watched_elsewhere
from ..wire import Wire, events_wire, messages_wire, reply_wire, request_of_wire

__all__ = ["ConversationActor"]


class ConversationActor(Shell):
    """Holds one conversation (the Ray actor class is built by the supervisor)."""

    def __init__(
        self,
        conversation_id: str,
        app: App | None,
        config: Config,
        supervisor: Any = None,
        api_keys: Mapping[str, Secret] | None = None,
    ) -> None:
        # The app's namespace (the actor's, not its job's): provider actors live there.
        super().__init__(config.namespace, app, config)
        self.conversation_id = conversation_id
        self.api_keys = api_keys
        self._supervisor = supervisor
        # Ray's own count of this actor's restarts in place: how its supervisor counts
        # crashes it may not have seen one by one.
        self.restarts = restarts_of_this_actor()
        self._binding = Binding.of(conversation_id, api_keys)  # survives entity restarts
        self._entity: Entity | None = None
        self._started_at = time.time()
        self._pending = 0  # send / start_turn calls in progress (passivation waits)
        self._closing = False
        self._stopped: asyncio.Event | None = None
        self._idle_timer: asyncio.TimerHandle | None = None

    # --- the shell ------------------------------------------------------------------------

    def _live(self, conversation_id: str) -> Entity | None:
        entity = self._entity
        return entity if entity is not None and not entity.closing else None

    def _prepare(self, conversation_id: str, api_keys: Mapping[str, Secret] | None) -> Binding:
        """The user's keys were bound when this actor started (``api_keys`` is ignored)."""
        if self._closing:
            raise Passivated(f"conversation {self.conversation_id!r} is passivating")
        return self._binding

    def _activated(self, entity: Entity) -> None:
        self._entity = entity
        self._arm_idle_timer()

    def _drop(self, entity: Entity) -> None:
        if self._entity is entity:
            self._entity = None

    def fenced(self, entity: Entity) -> None:
        """A newer incarnation took the conversation over: this process is a zombie and
        must not serve again. It ends itself (a crash, as far as Ray and the supervisor
        are concerned) right after answering, so the caller re-resolves the
        conversation and re-sends its turn."""
        self._closing = True
        self._drop(entity)
        asyncio.get_running_loop().call_later(0.2, os._exit, 70)

    def turn_ended(self, entity: Entity) -> None:
        if not self._closing:
            self._arm_idle_timer()

    def _busy(self) -> bool:
        entity = self._entity
        return self._pending > 0 or (entity is not None and entity.in_turn > 0)

    # --- idle passivation -----------------------------------------------------------------

    def _arm_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self.config.conversations.idle_timeout_s is not None and self._supervisor is not None:
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(
                self.config.conversations.idle_timeout_s, self._on_idle
            )

    def _on_idle(self) -> None:
        if self._busy() or self._closing:
            return
        self.spawn(self._ask_to_passivate())

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
        if not passivated and not self._closing and not self._busy():
            self._arm_idle_timer()

    # --- the conversation -------------------------------------------------------------------

    async def ready(self) -> dict[str, Any]:
        """Loads the history if needed; returns when the actor can serve (activation)."""
        await self._activate(self.conversation_id)
        return self.info()

    def info(self) -> dict[str, Any]:
        entity = self._entity
        return {
            "conversation_id": self.conversation_id,
            "epoch": 0,
            "messages": 0,
            "turns_served": 0,
            "idle_s": 0.0,
            "last_active_at": self._started_at,
            "busy": self._busy(),
            "agent": self._binding.agent,
            "agent_version": self._binding.version,
            **(entity.info() if entity is not None else {}),
            "pid": os.getpid(),
            "incarnation": self.incarnation,
            "restarts": self.restarts,
            "node_id": ray.get_runtime_context().get_node_id(),
            "started_at": self._started_at,
            "placement": "dedicated",
            # The vendor SDKs this process loaded: none (its calls go to provider actors).
            "vendor_sdks": sorted(m for m in ("anthropic", "openai") if m in sys.modules),
        }

    def own_keys(self) -> Mapping[str, Secret] | None:
        """The user's own vendor keys this actor was started with (its supervisor keeps
        them for restarts)."""
        return self.api_keys

    async def send(self, wire: Wire, *, principal: Principal | None = None) -> Wire:
        """Run a turn (:meth:`~overstory.conversation.entity.Entity.send`)."""
        self._pending += 1
        try:
            request = request_of_wire(wire)
            entity = await self.enter(self.conversation_id, principal, "write", request=request)
            return reply_wire(await entity.send(request))
        finally:
            self._pending -= 1

    async def start_turn(
        self, wire: Wire, after: int = -1, *, principal: Principal | None = None
    ) -> int:
        """Start a streamed turn (:meth:`~overstory.conversation.entity.Entity.start_turn`)."""
        self._pending += 1
        try:
            request = request_of_wire(wire)
            entity = await self.enter(self.conversation_id, principal, "write", request=request)
            return await entity.start_turn(request, after)
        finally:
            self._pending -= 1

    async def start_and_read(
        self,
        wire: Wire,
        after: int = -1,
        wait_s: float = 10.0,
        *,
        principal: Principal | None = None,
    ) -> Wire:
        """Start a streamed turn and return its first events
        (:meth:`~overstory.conversation.entity.Entity.start_and_read`)."""
        self._pending += 1
        try:
            request = request_of_wire(wire)
            entity = await self.enter(self.conversation_id, principal, "write", request=request)
            return events_wire(await entity.start_and_read(request, after, wait_s))
        finally:
            self._pending -= 1

    async def cancel(self, turn_id: str, *, principal: Principal | None = None) -> bool:
        """Cancel streamed turn ``turn_id`` (:meth:`~overstory.conversation.entity.Shell.cancel_turn`)."""
        return await self.cancel_turn(self.conversation_id, turn_id, principal)

    async def events(
        self,
        turn_id: str,
        after: int = -1,
        wait_s: float = 10.0,
        *,
        principal: Principal | None = None,
    ) -> Wire:
        """``(events after after, ended)`` of turn ``turn_id`` (a long poll:
        :meth:`~overstory.conversation.entity.Entity.events`)."""
        entity = await self.enter(self.conversation_id, principal, "read")
        return events_wire(await entity.events(turn_id, after, wait_s))

    def forget_splits(self) -> bool:
        """A rollout command changed a split: read it again before the next turn."""
        self.serving.forget_splits()
        return True

    async def history(
        self,
        after: int = -1,
        limit: int | None = None,
        before: int | None = None,
        turn: str | None = None,
        *,
        principal: Principal | None = None,
    ) -> Wire:
        """A page of the stored messages (during a turn, those of the turn stored so
        far): :meth:`Entity.history_page`."""
        entity = await self.enter(self.conversation_id, principal, "read")
        return messages_wire(await entity.history_page(after, limit, before, turn))

    async def passivate(self) -> bool:
        """Stop taking turns; ``False`` while a turn is running or waiting.

        Called by the supervisor before it kills this actor: passivation never strands
        a caller.
        """
        if self._busy():
            return False
        self._closing = True
        if self._entity is not None:
            self._entity.closing = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        await self.services.store.close()
        await self.drain()  # the supervisor kills this process next: export its spans
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
