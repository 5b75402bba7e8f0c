"""HostActor: many conversations as entities inside one async Ray actor (hosted placement).

A host (``overstory:host:<i>``, named, detached, restarted in place by Ray) serves the
shards the :class:`~overstory.registry.shards.ShardTable` gives it. Each conversation is
an :class:`_Entity` — its history, its epoch, its turn gate — activated on its first
call by loading the history from the store (milliseconds; no process starts) and
passivated when idle or when the host is over its cap (least recently used first).

The guarantees are those of a dedicated conversation actor, per conversation:

* one live entity per conversation cluster-wide: activation takes a new epoch from the
  store and every append carries it, so an entity left behind (its host lost the shard,
  or a zombie of a restarted host) is fenced and dropped, never written through;
* turns of one conversation run one at a time, each caller's in order (its own
  :class:`~overstory.actors.gate.TurnGate`, made only while turns are in flight);
* every message is stored before the turn goes on (:func:`~overstory.actors.turn.run_turn`),
  turn ids are idempotent, so a client re-sends a turn a host crash interrupted.

Isolation: a turn runs under a deadline (``turn_timeout_s``); sync tools run in threads
(:class:`~overstory.tools.Tool`). A turn past its deadline, or an exception that escapes
the turn machinery, *crashes its entity only*: the host's per-conversation supervision
(the pure OTP core, :func:`~overstory.supervisors.core.on_exit`, one transient child per
conversation) restarts it from the store, and a conversation that exceeds its restart
intensity is quarantined for ``quarantine_s`` — callers get
:class:`~overstory.exceptions.ConversationQuarantined` naming it. The host and every
other conversation carry on.

One store client per host, shared by all its conversations; one sweeper task per host
does idle passivation (no timer per conversation).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import ray

from ..access import Need, Principal, RecordCache, check_access, user_of
from ..app import App
from ..config import Config
from ..exceptions import (
    ConversationQuarantined,
    Fenced,
    Passivated,
    SequenceConflict,
    StaleShardTable,
    TurnFailed,
    UsageError,
)
from ..messages import Message, Reply, TurnEvent
from ..providers import Secret
from ..providers.pool import provider_namespace
from ..quota import QuotaBook, Ticket, finish
from ..sharding import ShardTable, stored_table
from ..store import HistoryStore, open_store
from ..supervisors.core import Restart, SupervisorState, initial_state, on_exit
from ..supervisors.spec import ChildSpec, SupervisorSpec
from ..supervisors.watch import new_incarnation, until_death
from ..telemetry import attached, metrics, setup_telemetry
from ..validation import validate_message
from .gate import TurnGate
from .serving import Binding, Serving
from .turn import Emit, run_turn
from .turnlog import TurnStreams

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


class _Entity:
    """One live conversation inside a host. Small on purpose: a host holds thousands."""

    __slots__ = (
        "binding",
        "closing",
        "conversation_id",
        "epoch",
        "gate",
        "history",
        "in_turn",
        "last_active",
        "streams",
        "turns",
    )

    def __init__(
        self, conversation_id: str, binding: Binding, history: list[Message], epoch: int
    ) -> None:
        self.conversation_id = conversation_id
        self.binding = binding
        self.history = history
        self.epoch = epoch
        self.gate: TurnGate | None = None  # only while turns are in flight
        self.streams: TurnStreams | None = None  # only once a turn has been streamed
        self.in_turn = 0
        self.closing = False
        self.turns = 0
        self.last_active = time.monotonic()

    def info(self) -> dict[str, Any]:
        return {
            "conversation_id": self.conversation_id,
            "epoch": self.epoch,
            "messages": len(self.history),
            "turns_served": self.turns,
            "idle_s": time.monotonic() - self.last_active,
            "busy": self.in_turn > 0,
            "agent": self.binding.agent,
            "agent_version": self.binding.version,
        }


class HostActor:
    """Hosts conversation entities (the Ray actor class is built in :mod:`..registry`)."""

    def __init__(
        self, namespace: str, name: str, table: ShardTable, app: App | None, config: Config
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.table = table
        self.config = config
        self.incarnation = new_incarnation()
        setup_telemetry()
        self._store: HistoryStore = open_store(config.store)
        self._records = RecordCache()  # HTTP conversations' records, for check_access
        # The deployed app (imported here from the store's record) or the local one.
        self.serving = Serving(namespace, self._store, app, config.rollout_refresh_s)
        self.quotas = QuotaBook(
            self._store,
            namespace,
            config.default_quota(),
            turn_timeout_s=config.turn_timeout_s,
            output_tokens=config.quota_output_tokens,
        )
        self._store_open = False
        self._store_lock = asyncio.Lock()
        self._entities: OrderedDict[str, _Entity] = OrderedDict()  # least recent first
        self._activating: dict[str, asyncio.Future[_Entity]] = {}
        self._crashes: dict[str, SupervisorState] = {}  # conversations with recent crashes
        self._quarantined: dict[str, ConversationQuarantined] = {}
        self._entity_spec = SupervisorSpec(
            "one_for_one", config.entity_max_restarts, config.entity_restart_period_s
        )
        self.counters = {
            "activations": 0,
            "passivations": 0,
            "evictions": 0,
            "restarts": 0,
            "quarantined": 0,
            "fenced": 0,
        }
        self._started_at = time.time()
        self._sweeper: asyncio.Task[None] | None = None
        self._reported_at = 0.0

    # --- supervision protocol (the host supervisor watches hosts) -------------------------

    async def ready(self) -> dict[str, Any]:
        self._start_sweeper()
        return self.status()

    async def watch(self, incarnation: str | None = None) -> str:
        return await until_death(incarnation, self.incarnation)

    def status(self) -> dict[str, Any]:
        busy = sum(1 for e in self._entities.values() if e.in_turn)
        return {
            "host": self.name,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "incarnation": self.incarnation,
            "started_at": self._started_at,
            "live": len(self._entities),
            "busy": busy,
            "memory": process_memory(),
            "shard_table_version": self.table.version,
            **self.counters,
        }

    async def models(self) -> list[dict[str, Any]]:
        """Every agent version's model chain (:func:`~overstory.providers.pool.chain_rows`),
        each endpoint once."""
        await self._open_store()
        models: list[dict[str, Any]] = (await self.serving.load()).describe()["models"]
        return models

    async def app(self) -> dict[str, Any]:
        """The app this host serves (:meth:`~overstory.app.App.describe`)."""
        await self._open_store()
        app = await self.serving.load()
        return {**app.describe(), "deployment": self.serving.deployment}

    def forget_splits(self) -> bool:
        """A rollout command changed a split: read it again before the next turn."""
        self.serving.forget_splits()
        return True

    def store_url(self) -> str:
        """The store this host writes to (unmasked: operators' probes open it)."""
        return self.config.store

    # --- conversations ----------------------------------------------------------------------

    async def send(
        self,
        version: int,
        conversation_id: str,
        turn_id: str,
        text: str,
        caller: str | None = None,
        n: int = 0,
        low: int | None = None,
        carrier: dict[str, str] | None = None,
        api_keys: Mapping[str, Secret] | None = None,
        emit: Emit | None = None,
        should_stop: Callable[[], bool] | None = None,
        *,
        principal: Principal | None = None,
        agent_version: str | None = None,
        admitted: bool = False,
        ticket: Ticket | None = None,
    ) -> Reply:
        """Run turn ``turn_id`` of ``conversation_id`` (see ``ConversationActor.send``);
        ``emit`` and ``should_stop`` (in-process only) stream it into its event log.
        ``principal``: the HTTP caller, checked here again (``check_access``).
        ``agent_version``: the version the caller chose for this turn (else the
        rollout's, see ``choose_version``). The user's quota admits the turn first
        (``QuotaExceeded``, nothing stored); ``admitted`` and ``ticket`` (in-process
        only): :meth:`start_turn` did."""
        await self._route(version, conversation_id)
        await self._check(conversation_id, principal, "write")
        validate_message(text, max_chars=self.config.max_message_chars)
        entity = await self._activate(conversation_id, api_keys=api_keys)
        # Whose conversation: the quota's user, the cache's scope, the user a tool is told.
        user = await user_of(self._store, conversation_id, self._records)
        if not admitted:
            ticket = await self._admit(entity, user, turn_id, text)
        entity.in_turn += 1
        try:
            if entity.gate is None:
                entity.gate = TurnGate()
            async with entity.gate.turn(caller, n, low):
                if entity.closing:
                    raise Passivated(f"conversation {conversation_id!r} is passivating")
                return await self._turn(
                    entity, turn_id, text, carrier, emit, should_stop, agent_version, ticket, user
                )
        finally:
            if ticket is not None and not admitted:  # start_turn's run() finishes its own
                await finish(ticket)
            entity.in_turn -= 1
            if not entity.in_turn:
                entity.gate = None  # a fresh gate orders by each caller's ``low``: no loss
            self._touch(entity)
            if (
                not entity.in_turn
                and self._entities.get(conversation_id) is entity
                and not self.table.owns(self.name, conversation_id)
            ):
                self._remove(entity, "moved")  # its shard moved while the turn ran

    async def _turn(
        self,
        entity: _Entity,
        turn_id: str,
        text: str,
        carrier: dict[str, str] | None,
        emit: Emit | None = None,
        should_stop: Callable[[], bool] | None = None,
        agent_version: str | None = None,
        ticket: Ticket | None = None,
        owner: str | None = None,
    ) -> Reply:
        """One turn under the deadline; what escapes the turn machinery crashes the entity."""
        cid = entity.conversation_id
        try:
            # asyncio.timeout, not wait_for: no extra task per turn on the host's loop.
            async with asyncio.timeout(self.config.turn_timeout_s):
                with attached(carrier), provider_namespace(self.namespace):
                    agent = await self.serving.agent_for(
                        cid, entity.binding, bool(entity.history), agent_version
                    )
                    return await run_turn(
                        agent,
                        self._store,
                        cid,
                        entity.history,
                        turn_id,
                        text,
                        epoch=entity.epoch,
                        emit=emit,
                        should_stop=should_stop,
                        ticket=ticket,
                        owner=owner,
                        prices=self.config.prices,
                    )
        except (TurnFailed, UsageError):
            raise  # the turn's own outcome (or the caller's mistake): the entity is fine
        except Fenced:
            # Another entity took the conversation over (this host lost the shard, or this
            # is a zombie): this one must never write again. Not a crash of ours.
            self.counters["fenced"] += 1
            self._drop(entity)
            raise
        except SequenceConflict:
            entity.history[:] = await self._store.load(cid)
            raise
        except TimeoutError:
            reason = f"the turn exceeded its deadline of {self.config.turn_timeout_s:g} s"
            self._crash(entity, reason)
            raise TurnFailed(cid, turn_id, reason) from None
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"[:300]
            self._crash(entity, reason)
            raise TurnFailed(cid, turn_id, f"the conversation crashed ({reason})", exc) from exc
        finally:
            entity.turns += 1

    # --- streamed turns: the turn runs here, readers tail its log -----------------------

    async def start_turn(
        self,
        version: int,
        conversation_id: str,
        turn_id: str,
        text: str,
        caller: str | None = None,
        n: int = 0,
        low: int | None = None,
        carrier: dict[str, str] | None = None,
        api_keys: Mapping[str, Secret] | None = None,
        after: int = -1,
        *,
        principal: Principal | None = None,
        agent_version: str | None = None,
    ) -> int:
        """Start turn ``turn_id`` running into its event log and return at once (the
        log's first ``seq``); readers tail it with :meth:`events`. Idempotent: a turn
        whose log is here is not started again. ``after`` is the reader's cursor when
        it starts a turn again whose process died: the log goes on from there, with a
        ``restarted`` event."""
        await self._route(version, conversation_id)
        await self._check(conversation_id, principal, "write")
        validate_message(text, max_chars=self.config.max_message_chars)
        entity = await self._activate(conversation_id, api_keys=api_keys)

        def run(
            emit: Emit, should_stop: Callable[[], bool], ticket: Ticket | None
        ) -> Awaitable[Reply]:
            return self.send(
                version,
                conversation_id,
                turn_id,
                text,
                caller,
                n,
                low,
                carrier,
                api_keys,
                emit,
                should_stop,
                agent_version=agent_version,
                admitted=True,
                ticket=ticket,
            )

        async def admit() -> Ticket | None:  # the quota refuses before the turn starts
            user = await user_of(self._store, conversation_id, self._records)
            return await self._admit(entity, user, turn_id, text)

        return await self._streams(entity).start_admitted(
            turn_id, after, run, entity.history, admit
        )

    def _streams(self, entity: _Entity) -> TurnStreams:
        """The entity's streamed turns, made on first use."""
        if entity.streams is None:
            entity.streams = TurnStreams(self.config.stream_keep_turns, self.config.stream_window_s)
        return entity.streams

    async def cancel(
        self,
        version: int,
        conversation_id: str,
        turn_id: str,
        api_keys: Mapping[str, Secret] | None = None,
        *,
        principal: Principal | None = None,
    ) -> bool:
        """Ask streamed turn ``turn_id`` to stop at its next safe point (between deltas,
        after a tool returns); it ends ``incomplete`` with what it produced stored.
        ``False`` when it is not running here (finished, or never streamed)."""
        await self._route(version, conversation_id)
        await self._check(conversation_id, principal, "write")
        entity = self._entities.get(conversation_id)
        if entity is None or entity.streams is None:
            return False
        return entity.streams.cancel(turn_id)

    async def events(
        self,
        version: int,
        conversation_id: str,
        turn_id: str,
        after: int = -1,
        wait_s: float = 10.0,
        api_keys: Mapping[str, Secret] | None = None,
        *,
        principal: Principal | None = None,
    ) -> tuple[list[TurnEvent], bool]:
        """``(events, ended)``: the events of turn ``turn_id`` after ``seq`` ``after``,
        waiting up to ``wait_s`` for one (a long poll; none: nothing new yet), and
        whether the turn has ended with them (a reader past its last event stops). A
        turn whose log is gone is replayed from the store when it is complete, and
        started again (from its stored message, after a ``restarted`` event) when its
        process died mid-turn."""
        await self._route(version, conversation_id)
        await self._check(conversation_id, principal, "read")
        entity = await self._activate(conversation_id, api_keys=api_keys)
        self._touch(entity)
        streams = self._streams(entity)

        def restart(text: str) -> Awaitable[int]:
            return self.start_turn(
                version, conversation_id, turn_id, text, api_keys=api_keys, after=after
            )

        binding = entity.binding
        return await streams.events(
            conversation_id,
            turn_id,
            after,
            wait_s,
            entity.history,
            (binding.agent, binding.version or ""),
            restart,
        )

    async def history(
        self,
        version: int,
        conversation_id: str,
        api_keys: Mapping[str, Secret] | None = None,
        *,
        principal: Principal | None = None,
    ) -> list[Message]:
        """The stored messages; during a turn, those of the turn stored so far."""
        await self._route(version, conversation_id)
        await self._check(conversation_id, principal, "read")
        entity = await self._activate(conversation_id, api_keys=api_keys)
        self._touch(entity)
        return list(entity.history)

    async def info(
        self,
        version: int,
        conversation_id: str,
        api_keys: Mapping[str, Secret] | None = None,
    ) -> dict[str, Any]:
        """One conversation's entity (activated if needed) and this host's process."""
        await self._route(version, conversation_id)
        entity = await self._activate(conversation_id, api_keys=api_keys)
        return {
            **entity.info(),
            "placement": "hosted",
            "host": self.name,
            "pid": os.getpid(),
            "incarnation": self.incarnation,
            "node_id": ray.get_runtime_context().get_node_id(),
            # Vendor SDKs belong in provider actors; this shows none leaked in here.
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

    # --- activation, passivation -------------------------------------------------------------

    async def _route(self, version: int, conversation_id: str) -> None:
        """Refuse a request routed with another table, or for a shard this host does not
        serve. A request routed with a *newer* table than this host knows (it restarted
        with the table it was created with) makes it read the stored one first."""
        if version > self.table.version:
            await self.adopt_table()
        table = self.table
        if version != table.version or not table.owns(self.name, conversation_id):
            raise StaleShardTable(table.version, table.shards, table.hosts)
        quarantine = self._quarantined.get(conversation_id)
        if quarantine is not None:
            if time.time() < quarantine.until:
                raise quarantine
            del self._quarantined[conversation_id]

    async def _admit(self, entity: _Entity, user: str, turn_id: str, text: str) -> Ticket | None:
        """``user``'s quota admits turn ``turn_id`` (``None``: no limit applies)."""
        instructions = self.serving.app.get(entity.binding.agent).instructions
        return await self.quotas.admit_turn(
            user, entity.conversation_id, turn_id, text, entity.history, instructions
        )

    async def _check(self, conversation_id: str, principal: Principal | None, need: Need) -> None:
        """A call made for an HTTP caller: may they (``check_access``)?"""
        if principal is not None:
            await self._open_store()
            await check_access(self._store, conversation_id, principal, need, self._records)

    async def _open_store(self) -> None:
        if not self._store_open:
            async with self._store_lock:
                if not self._store_open:
                    await self._store.open()
                    self._store_open = True
                    await self._read_table()  # this process may have been made long ago

    async def _read_table(self) -> bool:
        """Take the stored shard table if it is newer; shed what this host lost."""
        stored = await stored_table(self._store, self.namespace)
        if stored is None or stored.version <= self.table.version:
            return False
        self.table = stored
        for entity in [e for e in self._entities.values() if not e.in_turn]:
            if not stored.owns(self.name, entity.conversation_id):
                self._remove(entity, "moved")
        return True

    async def adopt_table(self) -> int:
        """Read the stored shard table (the host supervisor grew it); returns its version."""
        await self._open_store()
        await self._read_table()
        return self.table.version

    async def _activate(
        self,
        conversation_id: str,
        *,
        api_keys: Mapping[str, Secret] | None = None,
        binding: Binding | None = None,
    ) -> _Entity:
        """The live entity of ``conversation_id``, loaded from the store if needed.

        Concurrent calls for one conversation share one activation. ``api_keys`` bind
        for the life of the entity (as for a dedicated actor); a restart passes the
        crashed entity's ``binding`` so they survive it. A conversation with an agent
        the app does not serve is refused (:class:`~overstory.exceptions.UnknownAgent`)
        before anything is read or written.
        """
        entity = self._entities.get(conversation_id)
        if entity is not None and not entity.closing:
            return entity
        pending = self._activating.get(conversation_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[_Entity] = asyncio.get_running_loop().create_future()
        self._activating[conversation_id] = future
        try:
            self._start_sweeper()
            await self._open_store()
            app = await self.serving.load()
            if binding is None:
                binding = Binding.of(conversation_id, api_keys)
            app.check(binding.agent)
            epoch = await self._store.acquire(conversation_id)
            history = await self._store.load(conversation_id)
            entity = _Entity(conversation_id, binding, history, epoch)
            self._entities[conversation_id] = entity
            self.counters["activations"] += 1
            self._evict_over_cap()
            self._report()
            future.set_result(entity)
            return entity
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        finally:
            del self._activating[conversation_id]

    def _touch(self, entity: _Entity) -> None:
        """Used just now: most recently used, so the sweeper and the LRU cap see it last
        (the sweeper stops at the first entity that is not idle long enough)."""
        entity.last_active = time.monotonic()
        if self._entities.get(entity.conversation_id) is entity:
            self._entities.move_to_end(entity.conversation_id)

    def _remove(self, entity: _Entity, reason: str) -> None:
        """Passivate: forget the entity (everything it holds is stored)."""
        self._drop(entity)
        self.counters["passivations"] += 1
        if reason == "evicted":
            self.counters["evictions"] += 1
        metrics().passivation(reason)
        self._report()

    def _drop(self, entity: _Entity) -> None:
        entity.closing = True  # queued turns get Passivated: their clients re-send
        if self._entities.get(entity.conversation_id) is entity:
            del self._entities[entity.conversation_id]

    def _evict_over_cap(self) -> None:
        """Over ``max_live_per_host``: passivate the least recently used idle entities."""
        over = len(self._entities) - self.config.max_live_per_host
        if over <= 0:
            return
        # Least recent first, and stop once enough are found: a host at its cap pays for
        # the few it evicts, not for a scan of every live conversation.
        idle = (e for e in self._entities.values() if not e.in_turn)
        for entity in list(itertools.islice(idle, over)):
            self._remove(entity, "evicted")

    def _start_sweeper(self) -> None:
        if self._sweeper is None and self.config.idle_timeout_s is not None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        """Passivate entities idle for ``idle_timeout_s`` (least recent first: stop early)."""
        timeout = self.config.idle_timeout_s
        assert timeout is not None
        while True:
            await asyncio.sleep(min(max(timeout / 4, 0.05), 30.0))
            try:
                self._sweep_once(timeout)
            except Exception:  # a sweep must never end the sweeper: log, go on
                log.exception("idle sweep of host %s failed", self.name)

    def _sweep_once(self, timeout: float) -> None:
        """One sweep: the least recently used come first, so it stops at the first one
        used within ``timeout`` (one in a long turn is skipped, not passivated)."""
        cutoff = time.monotonic() - timeout
        expired = []
        for entity in self._entities.values():
            if entity.last_active > cutoff:
                break
            if not entity.in_turn:
                expired.append(entity)
        for entity in expired:
            self._remove(entity, "idle")
        self._report(force=True)
        self._prune_crashes(time.monotonic())

    def _report(self, force: bool = False) -> None:
        """The live gauge, at most once a second (an activation burst would otherwise
        pay a metric record per conversation); the sweeper forces it on each tick."""
        now = time.monotonic()
        if force or now - self._reported_at >= 1.0:
            self._reported_at = now
            metrics().live_conversations(len(self._entities), self.name)

    # --- per-conversation supervision ------------------------------------------------------

    def _crash(self, entity: _Entity, reason: str) -> None:
        """The entity crashed: the core decides restart (from the store) or quarantine."""
        cid = entity.conversation_id
        self._drop(entity)
        now = time.monotonic()
        state = self._crashes.get(cid)
        if state is None:
            spec = SupervisorSpec(
                self._entity_spec.strategy,
                self._entity_spec.max_restarts,
                self._entity_spec.period_s,
                (ChildSpec(cid, restart="transient"),),
            )
            state = initial_state(spec)
        state, decision = on_exit(state, cid, "crash", now)
        self._prune_crashes(now)
        if isinstance(decision, Restart):
            self._crashes[cid] = state
            self.counters["restarts"] += 1
            metrics().restart("entities")
            # Restart = activate again from the store, now: queued callers find it serving.
            restart = self._activate(cid, binding=entity.binding)
            task = asyncio.get_running_loop().create_task(restart)
            task.add_done_callback(_ignore_failure)
            return
        # Restart intensity exceeded: this conversation, not the host, gives up.
        self._crashes.pop(cid, None)
        self.counters["quarantined"] += 1
        self._quarantined[cid] = ConversationQuarantined(
            cid, len(state.restarts), time.time() + self.config.quarantine_s, reason
        )

    def _prune_crashes(self, now: float) -> None:
        """Forget crash windows that have expired: per-conversation state must not grow."""
        period = self._entity_spec.period_s
        expired = [c for c, s in self._crashes.items() if now - s.restarts[-1] >= period]
        for cid in expired:
            del self._crashes[cid]
        wall = time.time()
        for cid in [c for c, q in self._quarantined.items() if q.until <= wall]:
            del self._quarantined[cid]


def _ignore_failure(task: asyncio.Task[Any]) -> None:
    """A background restart that fails leaves the next call to activate (and to report)."""
    if not task.cancelled():
        task.exception()
