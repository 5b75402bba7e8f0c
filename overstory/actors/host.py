"""HostActor: many conversations as entities inside one async Ray actor (hosted placement).

A host (``overstory:host:<i>``, named, detached, restarted in place by Ray) serves the
shards the :class:`~overstory.sharding.ShardTable` gives it. Each conversation is
an :class:`~overstory.conversation.entity.Entity` — its history, its epoch, its turn
gate — activated on its first call by loading the history from the store (milliseconds;
no process starts) and passivated when idle or when the host is over its cap (least
recently used first). The host is a shell: what a conversation does and guarantees is
the entity's (:mod:`overstory.conversation`), the same as in a dedicated actor; the host
owns routing (shard table), activation, passivation and transport.

Per conversation:

* one live entity per conversation cluster-wide: activation takes a new epoch from the
  store and every append carries it, so an entity left behind (its host lost the shard,
  or a zombie of a restarted host) is fenced and dropped, never written through;
* turns of one conversation run one at a time, each caller's in order (its own
  :class:`~overstory.conversation.gate.TurnGate`, made only while turns are in flight);
* every message is stored before the turn goes on (:func:`~overstory.conversation.turn.run_turn`),
  turn ids are idempotent, so a client re-sends a turn a host crash interrupted.

Isolation: a turn past its deadline, or an exception that escapes the turn machinery,
*crashes its entity only*: the host's
:class:`~overstory.conversation.supervision.EntitySupervision` restarts it from the
store, and quarantines a conversation that exceeds its restart intensity. The host and
every other conversation carry on.

One store client per host, shared by all its conversations; one sweeper task per host
does idle passivation (no timer per conversation).

Requests, replies, events and history pages cross Ray as :mod:`overstory.wire` lays
them out (lists msgpack packs, instead of pickled dataclasses): the entry points below
take a ``wire`` and answer one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import ray

from .._ray import in_actor
from ..access import Principal
from ..app import App
from ..config import Config
from ..conversation.entity import Entity, Shell
from ..conversation.serving import Binding
from ..exceptions import StaleShardTable
from ..memory import QuietTrim, trim
from ..providers import Secret
from ..providers.pool import call_vendors_here
from ..sharding import ShardTable, stored_table
from ..supervisors.watch import until_death
from ..telemetry import metrics
from ..wire import Wire, events_wire, messages_wire, reply_wire, request_of_wire

__all__ = ["HostActor", "process_memory"]

log = logging.getLogger(__name__)


def process_memory() -> dict[str, int]:
    """This process's memory in bytes: ``uss`` (what it alone holds) and ``rss``."""
    try:
        import psutil

        info = psutil.Process().memory_full_info()
        return {"uss": int(info.uss), "rss": int(info.rss)}
    except Exception:  # psutil missing, or /proc not readable: report what we can
        import resource

        return {"uss": 0, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


class HostActor(Shell):
    """Hosts conversation entities (the Ray actor class is built in :mod:`..registry`)."""

    def __init__(
        self, namespace: str, name: str, table: ShardTable, app: App | None, config: Config
    ) -> None:
        super().__init__(namespace, app, config)
        self.name = name
        self.table = table
        self._entities: OrderedDict[str, Entity] = OrderedDict()  # least recent first
        self.counters = {
            "activations": 0,
            "passivations": 0,
            "evictions": 0,
            "fenced": 0,
        }
        self._started_at = time.time()
        self._sweeper: asyncio.Task[None] | None = None
        self._reported_at = 0.0
        self._quiet = QuietTrim()
        self._emptied_at = 0.0  # when the sweep last passivated (its memory freed)
        if in_actor():
            # Many conversations share this process: its vendor calls are made here,
            # under leases from the provider actors, one SDK client per endpoint for all.
            call_vendors_here()

    # --- supervision protocol (the host supervisor watches hosts) -------------------------

    async def ready(self) -> dict[str, Any]:
        self._start_sweeper()
        return await self.status()

    async def watch(self, incarnation: str | None = None) -> str:
        return await until_death(incarnation, self.incarnation)

    async def status(self) -> dict[str, Any]:
        busy = sum(1 for e in self._entities.values() if e.in_turn)
        # psutil reads /proc (smaps for USS: milliseconds on a big heap): off the loop.
        memory = await asyncio.to_thread(process_memory)
        return {
            "host": self.name,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "incarnation": self.incarnation,
            "started_at": self._started_at,
            "live": len(self._entities),
            "busy": busy,
            "memory": memory,
            "shard_table_version": self.table.version,
            **self.counters,
            "restarts": self.supervision.restarts,
            "quarantined": self.supervision.quarantines,
        }

    async def models(self) -> list[dict[str, Any]]:
        """Every agent version's model chain (:func:`~overstory.providers.pool.chain_rows`),
        each endpoint once."""
        await self._open()
        models: list[dict[str, Any]] = (await self.serving.load()).describe()["models"]
        return models

    async def app(self, whole: bool = False) -> Any:
        """The app this host serves (:meth:`~overstory.app.App.describe`); ``whole``:
        the :class:`~overstory.app.App` itself (for a process that runs its agents
        without a conversation: the door's stateless turns)."""
        await self._open()
        app = await self.serving.load()
        if whole:
            return app
        return {**app.describe(), "deployment": self.serving.deployment}

    def forget_splits(self) -> bool:
        """A rollout command changed a split: read it again before the next turn."""
        self.serving.forget_splits()
        return True

    def store_url(self) -> str:
        """The store this host writes to (unmasked: operators' probes open it)."""
        return self.config.store

    # --- conversations: routed here, then the entity (:mod:`overstory.conversation`) ------

    async def send(
        self,
        version: int,
        conversation_id: str,
        wire: Wire,
        *,
        api_keys: Mapping[str, Secret] | None = None,
        principal: Principal | None = None,
    ) -> Wire:
        """Run a turn of ``conversation_id``
        (:meth:`~overstory.conversation.entity.Entity.send`)."""
        await self._route(version, conversation_id)
        request = request_of_wire(wire)
        entity = await self.enter(conversation_id, principal, "write", api_keys, request)
        return reply_wire(await entity.send(request))

    async def start_turn(
        self,
        version: int,
        conversation_id: str,
        wire: Wire,
        after: int = -1,
        *,
        api_keys: Mapping[str, Secret] | None = None,
        principal: Principal | None = None,
    ) -> int:
        """Start a streamed turn of ``conversation_id``
        (:meth:`~overstory.conversation.entity.Entity.start_turn`)."""
        await self._route(version, conversation_id)
        request = request_of_wire(wire)
        entity = await self.enter(conversation_id, principal, "write", api_keys, request)
        return await entity.start_turn(request, after)

    async def start_and_read(
        self,
        version: int,
        conversation_id: str,
        wire: Wire,
        after: int = -1,
        wait_s: float = 10.0,
        *,
        api_keys: Mapping[str, Secret] | None = None,
        principal: Principal | None = None,
    ) -> Wire:
        """Start a streamed turn and return its first events
        (:meth:`~overstory.conversation.entity.Entity.start_and_read`)."""
        await self._route(version, conversation_id)
        request = request_of_wire(wire)
        entity = await self.enter(conversation_id, principal, "write", api_keys, request)
        return events_wire(await entity.start_and_read(request, after, wait_s))

    async def cancel(
        self,
        version: int,
        conversation_id: str,
        turn_id: str,
        *,
        api_keys: Mapping[str, Secret] | None = None,
        principal: Principal | None = None,
    ) -> bool:
        """Cancel streamed turn ``turn_id`` (:meth:`~overstory.conversation.entity.Shell.cancel_turn`);
        ``False`` when it is not running here."""
        await self._route(version, conversation_id)
        return await self.cancel_turn(conversation_id, turn_id, principal)

    async def events(
        self,
        version: int,
        conversation_id: str,
        turn_id: str,
        after: int = -1,
        wait_s: float = 10.0,
        *,
        api_keys: Mapping[str, Secret] | None = None,
        principal: Principal | None = None,
    ) -> Wire:
        """``(events, ended)`` of turn ``turn_id`` after ``after`` (a long poll:
        :meth:`~overstory.conversation.entity.Entity.events`)."""
        await self._route(version, conversation_id)
        entity = await self.enter(conversation_id, principal, "read", api_keys)
        return events_wire(await entity.events(turn_id, after, wait_s))

    async def history(
        self,
        version: int,
        conversation_id: str,
        after: int = -1,
        limit: int | None = None,
        before: int | None = None,
        turn: str | None = None,
        *,
        api_keys: Mapping[str, Secret] | None = None,
        principal: Principal | None = None,
    ) -> Wire:
        """A page of the stored messages (during a turn, those of the turn stored so
        far): :meth:`Entity.history_page`."""
        await self._route(version, conversation_id)
        entity = await self.enter(conversation_id, principal, "read", api_keys)
        return messages_wire(await entity.history_page(after, limit, before, turn))

    async def info(
        self,
        version: int,
        conversation_id: str,
        *,
        api_keys: Mapping[str, Secret] | None = None,
    ) -> dict[str, Any]:
        """One conversation's entity (activated if needed) and this host's process."""
        await self._route(version, conversation_id)
        entity = await self.enter(conversation_id, None, "read", api_keys, touch=False)
        return {
            **entity.info(),
            "placement": "hosted",
            "host": self.name,
            "pid": os.getpid(),
            "incarnation": self.incarnation,
            "node_id": ray.get_runtime_context().get_node_id(),
            # The vendor SDKs this process loaded (a host calls vendors itself).
            "vendor_sdks": sorted(m for m in ("anthropic", "openai") if m in sys.modules),
        }

    async def passivate(self, version: int, conversation_id: str, reason: str = "stopped") -> bool:
        """Passivate one conversation now; ``False`` when it is not live or mid-turn."""
        await self._route(version, conversation_id)
        entity = self._entities.get(conversation_id)
        if entity is None or entity.in_turn:
            return False
        self._remove(entity, reason)
        return True

    def live(self) -> list[str]:
        """Ids of the conversations live here (for operators and tests)."""
        return list(self._entities)

    # --- the shell: routing, activation, passivation ----------------------------------------

    async def _route(self, version: int, conversation_id: str) -> None:
        """Refuse a request routed with another table, or for a shard this host does not
        serve. A request routed with a *newer* table than this host knows (it restarted
        with the table it was created with) makes it read the stored one first."""
        if version > self.table.version:
            await self.adopt_table()
        table = self.table
        if version != table.version or not table.owns(self.name, conversation_id):
            raise StaleShardTable(table.version, table.shards, table.hosts)

    async def _opened(self) -> None:
        await self._read_table()  # this process may have been made long ago

    async def _read_table(self) -> bool:
        """Take the stored shard table if it is newer; shed what this host lost."""
        stored = await stored_table(self.services.store, self.namespace)
        if stored is None or stored.version <= self.table.version:
            return False
        self.table = stored
        for entity in [e for e in self._entities.values() if not e.in_turn]:
            if not stored.owns(self.name, entity.conversation_id):
                self._remove(entity, "moved")
        return True

    async def adopt_table(self) -> int:
        """Read the stored shard table (the host supervisor grew it); returns its version."""
        await self._open()
        await self._read_table()
        return self.table.version

    def _live(self, conversation_id: str) -> Entity | None:
        return self._entities.get(conversation_id)

    def _prepare(self, conversation_id: str, api_keys: Mapping[str, Secret] | None) -> Binding:
        self._start_sweeper()
        return Binding.of(conversation_id, api_keys)

    def _activated(self, entity: Entity) -> None:
        self._entities[entity.conversation_id] = entity
        self.counters["activations"] += 1
        self._evict_over_cap()
        self._report()

    def touched(self, entity: Entity) -> None:
        """Used just now: most recently used, so the sweeper and the LRU cap see it last
        (the sweeper stops at the first entity that is not idle long enough)."""
        entity.touch()
        if self._entities.get(entity.conversation_id) is entity:
            self._entities.move_to_end(entity.conversation_id)

    def turn_ended(self, entity: Entity) -> None:
        if (
            not entity.in_turn
            and self._entities.get(entity.conversation_id) is entity
            and not self.table.owns(self.name, entity.conversation_id)
        ):
            self._remove(entity, "moved")  # its shard moved while the turn ran

    def fenced(self, entity: Entity) -> None:
        """Another entity took the conversation over (this host lost the shard, or this
        is a zombie): drop this one; the caller re-resolves and re-sends."""
        log.warning(
            "conversation %r fenced on host %s: a newer incarnation serves it; this one "
            "never writes again",
            entity.conversation_id,
            self.name,
        )
        self.counters["fenced"] += 1
        self._drop(entity)

    def _remove(self, entity: Entity, reason: str) -> None:
        """Passivate: forget the entity (everything it holds is stored)."""
        self._drop(entity)
        self.counters["passivations"] += 1
        if reason == "evicted":
            self.counters["evictions"] += 1
        metrics().passivation(reason)
        self._report()

    def _drop(self, entity: Entity) -> None:
        entity.closing = True  # queued turns get Passivated: their clients re-send
        if self._entities.get(entity.conversation_id) is entity:
            del self._entities[entity.conversation_id]

    def _evict_over_cap(self) -> None:
        """Over ``hosted.max_live_per_host``: passivate the least recently used idle entities."""
        over = len(self._entities) - self.config.hosted.max_live_per_host
        if over <= 0:
            return
        # Least recent first, and stop once enough are found: a host at its cap pays for
        # the few it evicts, not for a scan of every live conversation.
        idle = (e for e in self._entities.values() if not e.in_turn)
        for entity in list(itertools.islice(idle, over)):
            self._remove(entity, "evicted")

    def _start_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        """The host's upkeep, on one timer: passivate entities idle for
        ``conversations.idle_timeout_s``, drop finished turns' events past
        ``streams.window_s``, give a burst's freed memory back once it is over."""
        idle_s = self.config.conversations.idle_timeout_s
        every = min(idle_s or 120.0, self.config.streams.window_s) / 4
        while True:
            await asyncio.sleep(min(max(every, 0.05), 30.0))
            try:
                self._sweep_once(idle_s)
            except Exception:  # a sweep must never end the sweeper: log, go on
                log.exception("idle sweep of host %s failed", self.name)

    def _sweep_once(self, idle_s: float | None) -> None:
        """One sweep: the least recently used come first, so passivation stops at the
        first one used within ``idle_s`` (one in a long turn is skipped, not passivated;
        ``None``: none is)."""
        now = time.monotonic()
        expired = []
        if idle_s is not None:
            cutoff = now - idle_s
            for entity in self._entities.values():
                if entity.last_active > cutoff:
                    break
                if not entity.in_turn:
                    expired.append(entity)
        for entity in expired:
            self._remove(entity, "idle")
        for entity in self._entities.values():  # a finished turn's events leave on time,
            if entity.streams is not None:  # not at the conversation's next turn
                entity.streams.logs.prune(now)
        self._report(force=True)
        self.supervision.prune()
        if expired:
            self._emptied_at = now
        newest = next(reversed(self._entities.values()), None)
        last_active = max(newest.last_active if newest else 0.0, self._emptied_at)
        if self._quiet.due(last_active, now):  # a burst's freed memory back to the OS
            given = trim()
            if given:
                log.info("host %s gave back %.1f MB after a busy spell", self.name, given / 2**20)

    def _report(self, force: bool = False) -> None:
        """The live gauge, at most once a second (an activation burst would otherwise
        pay a metric record per conversation); the sweeper forces it on each tick."""
        now = time.monotonic()
        if force or now - self._reported_at >= 1.0:
            self._reported_at = now
            metrics().live_conversations(len(self._entities), self.name)
