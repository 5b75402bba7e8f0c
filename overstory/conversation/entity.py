"""The conversation entity: one conversation's state and behaviour, written once.

Both placements run this code. A host actor holds thousands of :class:`Entity` objects,
a dedicated conversation actor holds one; either is a :class:`Shell` that owns only
activation, passivation and transport (the Orleans grain and its silo, the Akka entity
and its shard region). What a conversation guarantees lives here, the same for both:

* **the call filters**, in this order, before any state is touched
  (:meth:`Shell.enter`): quarantine, access (``principal`` is the HTTP caller, checked
  here again, where the conversation lives), the message's validation, activation;
* **activation** (:func:`activate`): the app must serve the agent, a new epoch is taken
  from the store (fencing out any older incarnation) and the history loaded;
* **admission**: the user's quota admits a turn before it is stored
  (:class:`~overstory.quota.QuotaBook`);
* **order**: turns run one at a time, each caller's in the order it sent them (a
  :class:`~overstory.conversation.gate.TurnGate`, made only while turns are in flight);
* **the turn** (:func:`~overstory.conversation.turn.run_turn`) under its deadline
  (``conversations.turn_timeout_s``); streamed turns run into event logs readers tail and resume
  (:class:`~overstory.conversation.turnlog.TurnStreams`) and can be cancelled;
* **crash accounting**: a turn past its deadline, or an exception escaping the turn
  machinery, crashes *this entity only*: :meth:`Shell.crashed` drops it, and the shell's
  :class:`~overstory.conversation.supervision.EntitySupervision` restarts it from the
  store or quarantines the conversation. A turn fenced out by a newer incarnation is
  handed to :meth:`Shell.fenced`, which each placement answers its own way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..access import Need, Principal, RecordCache, check_access, user_of
from ..app import App
from ..compaction import cover, fit
from ..config import Config
from ..exceptions import Fenced, Passivated, SequenceConflict, TurnFailed, UsageError
from ..messages import Message, Reply, TurnEvent, TurnRequest
from ..providers import ModelSettings, Secret
from ..providers.pool import provider_namespace
from ..quota import QuotaBook, Ticket, finish
from ..store import HistoryStore, open_store
from ..supervisors.watch import DRAIN_TIMEOUT_S, new_incarnation
from ..telemetry import attached, flush_async, metrics, setup_telemetry
from ..validation import validate_turn
from .gate import TurnGate
from .serving import Binding, Serving
from .supervision import EntitySupervision
from .turn import Emit, append_messages, hide_messages, restarted, run_turn
from .turnlog import TurnStreams
from .window import TAIL_PAGE, Memory, read_tail

__all__ = ["Entity", "Services", "Shell", "activate"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Services:
    """What every conversation of one process shares: the store client (one per
    process, never one per conversation), the served app, the quota book, the
    conversation-record cache of the access filter, and the settings."""

    namespace: str
    config: Config
    store: HistoryStore
    serving: Serving
    quotas: QuotaBook
    records: RecordCache

    @classmethod
    def of(cls, namespace: str, app: App | None, config: Config) -> Services:
        """The services of a process serving ``app`` (``None``: the deployed one, which
        this process imports from the store's record) with ``config``."""
        store = open_store(config.store)
        quotas = QuotaBook(
            store,
            namespace,
            config.quotas.quota(),
            turn_timeout_s=config.conversations.turn_timeout_s,
            output_tokens=config.quotas.output_tokens,
        )
        serving = Serving(namespace, store, app, config.rollouts.refresh_s)
        return cls(namespace, config, store, serving, quotas, RecordCache())


async def activate(shell: Shell, conversation_id: str, binding: Binding) -> Entity:
    """Load conversation ``conversation_id`` into a new entity of ``shell``.

    The app must serve its agent (else :class:`~overstory.exceptions.UnknownAgent`,
    before anything is read or written); the entity takes a new epoch from the store,
    so every older incarnation is fenced out of its appends, then reads the tail of
    the history — what its models' windows can hold, at most
    ``conversations.tail_messages`` — not all of it (:func:`~.window.read_tail`).
    """
    services = shell.services
    (await services.serving.load()).check(binding.agent)
    epoch = await services.store.acquire(conversation_id)
    room = services.serving.app.get(binding.agent).context_tokens()
    cap = services.config.conversations.tail_messages
    history = await read_tail(services.store, conversation_id, cap, room)
    return Entity(shell, conversation_id, binding, history, epoch, room)


class Entity:
    """One live conversation. Small on purpose: a host holds thousands."""

    __slots__ = (
        "binding",
        "closing",
        "conversation_id",
        "epoch",
        "gate",
        "history",
        "in_turn",
        "last_active",
        "last_active_at",
        "memory",
        "shell",
        "streams",
        "turns",
    )

    def __init__(
        self,
        shell: Shell,
        conversation_id: str,
        binding: Binding,
        history: list[Message],
        epoch: int,
        room: int | None = None,
    ) -> None:
        self.shell = shell
        self.conversation_id = conversation_id
        self.binding = binding
        self.history = history
        self.epoch = epoch
        self.gate: TurnGate | None = None  # only while turns are in flight
        self.streams: TurnStreams | None = None  # only once a turn has been streamed
        self.memory = Memory(shell.spawn, room)  # what model calls see: window, summary
        self.in_turn = 0
        self.closing = False  # passivated, crashed or fenced: queued turns get Passivated
        self.turns = 0
        self.last_active = time.monotonic()
        self.last_active_at = time.time()  # comparable across processes (LRU eviction)

    def info(self) -> dict[str, Any]:
        return {
            "conversation_id": self.conversation_id,
            "epoch": self.epoch,
            "messages": self.history[-1].seq + 1 if self.history else 0,
            "messages_held": len(self.history),
            "turns_served": self.turns,
            "idle_s": time.monotonic() - self.last_active,
            "last_active_at": self.last_active_at,
            "busy": self.in_turn > 0,
            "agent": self.binding.agent,
            "agent_version": self.binding.version,
        }

    def touch(self) -> None:
        self.last_active = time.monotonic()
        self.last_active_at = time.time()

    def _trim(self) -> None:
        """Keep only the tail in memory (in place: turn logs hold this list): at most
        ``conversations.tail_messages``, and no more than covers what the models can
        read (a page of slack, so it is not cut after every turn)."""
        history = self.history
        over = len(history) - self.shell.services.config.conversations.tail_messages
        if over > 0:
            del history[:over]
        room = self.memory.room
        if room is not None and len(history) > 2 * TAIL_PAGE:
            first = cover(history, room)
            if first > TAIL_PAGE:
                del history[:first]

    async def history_page(
        self,
        after: int = -1,
        limit: int | None = None,
        before: int | None = None,
        turn: str | None = None,
    ) -> list[Message]:
        """Stored messages with seq above ``after`` (the first ``limit`` of them) or,
        with ``before``, below it (the last ``limit`` of them), in seq order: read from
        the store (everything a turn stored so far is there), not the tail held here.
        ``turn``: that turn's messages only."""
        if turn is not None:
            return await self._stored_turn(turn)
        store = self.shell.services.store
        if before is not None:
            return await store.load_last(self.conversation_id, limit or 2**31, before=before)
        return await store.load(self.conversation_id, after=after, limit=limit)

    async def _stored_turn(self, turn_id: str) -> list[Message]:
        """Turn ``turn_id``'s messages: from the tail held here, else (a turn older than
        the tail) from the store, by its index."""
        held = [m for m in self.history if m.turn_id == turn_id]
        if held or not self.history or self.history[0].seq == 0:
            return held
        return await self.shell.services.store.load_turn(self.conversation_id, turn_id)

    def _refuse_if_closing(self) -> None:
        if self.closing:
            raise Passivated(f"conversation {self.conversation_id!r} is passivating")

    # --- turns ----------------------------------------------------------------------------

    async def send(
        self,
        request: TurnRequest,
        *,
        emit: Emit | None = None,
        should_stop: Callable[[], bool] | None = None,
        admitted: bool = False,
        ticket: Ticket | None = None,
    ) -> Reply:
        """Run the turn ``request`` asks for, in its caller's order
        (:class:`~overstory.conversation.gate.TurnGate`). ``emit`` and ``should_stop``
        stream the turn into its event log. The user's quota admits the turn first
        (``QuotaExceeded``, nothing stored); ``admitted`` and ``ticket``:
        :meth:`start_turn` did."""
        self._refuse_if_closing()
        services = self.shell.services
        # Whose conversation: the quota's user, the cache's scope, the user a tool is told.
        user = await user_of(services.store, self.conversation_id, services.records)
        if not admitted and not (request.append or request.hide):  # no model call: no quota
            ticket = await self._admit(user, request)
        self.in_turn += 1
        try:
            if self.gate is None:
                self.gate = TurnGate()
            async with self.gate.turn(request.caller, request.n, request.low):
                self._refuse_if_closing()
                return await self._turn(request, emit, should_stop, ticket, user)
        finally:
            if ticket is not None and not admitted:  # start_turn's run() finishes its own
                await finish(ticket)
            self.in_turn -= 1
            if not self.in_turn:
                self.gate = None  # a fresh gate orders by each caller's ``low``: no loss
                self._trim()
            self.shell.touched(self)
            self.shell.turn_ended(self)

    async def _admit(self, user: str, request: TurnRequest) -> Ticket | None:
        """``user``'s quota admits ``request``'s turn (``None``: no limit applies),
        reserving its first call: the input its context policy will send (not all the
        history) and the most its answer may take."""
        services = self.shell.services
        if not (await services.quotas.quota(user)).limited:
            return None  # no limit applies: nothing below is needed (the quota is cached)
        agent = services.serving.app.get(self.binding.agent)
        settings = None if request.settings is None else ModelSettings.of(request.settings)
        try:
            cap = agent.output_cap(settings, request.model)
        except UsageError:
            cap = None  # the turn refuses the name itself, before storing anything
        budget = agent.model.budget()
        history = self.history
        if budget is not None:
            history = history[fit(history, budget.prompt, budget.count, len(history)) :]
        return await services.quotas.admit_turn(
            user,
            self.conversation_id,
            request.turn_id,
            request.text,
            history,
            agent.instructions,
            cap,
        )

    async def _turn(
        self,
        request: TurnRequest,
        emit: Emit | None,
        should_stop: Callable[[], bool] | None,
        ticket: Ticket | None,
        owner: str,
    ) -> Reply:
        """One turn under the deadline; what escapes the turn machinery crashes the entity."""
        services = self.shell.services
        cid, turn_id = self.conversation_id, request.turn_id
        timeout_s = services.config.conversations.turn_timeout_s
        try:
            # asyncio.timeout, not wait_for: no extra task per turn on the process's loop.
            async with asyncio.timeout(timeout_s):
                with attached(request.carrier), provider_namespace(services.namespace):
                    if request.hide:  # tombstones: no agent, no model call
                        return await hide_messages(
                            services.store,
                            cid,
                            self.history,
                            turn_id,
                            request.hide,
                            epoch=self.epoch,
                        )
                    if request.append:  # the caller's messages: no agent, no model call
                        return await append_messages(
                            services.store,
                            cid,
                            self.history,
                            turn_id,
                            request.append,
                            epoch=self.epoch,
                        )
                    agent = await services.serving.agent_for(
                        cid, self.binding, bool(self.history), request.agent_version
                    )
                    return await run_turn(
                        agent,
                        services.store,
                        cid,
                        self.history,
                        turn_id,
                        request.text,
                        epoch=self.epoch,
                        emit=emit,
                        should_stop=should_stop,
                        ticket=ticket,
                        owner=owner,
                        prices=services.config.usage.prices,
                        memory=self.memory,
                        model=request.model,
                        settings=request.settings,
                        output_type=request.output_type,
                        client_tools=request.tools,
                        tool_outputs=request.tool_outputs,
                        instructions=request.instructions,
                    )
        except (TurnFailed, UsageError):
            raise  # the turn's own outcome (or the caller's mistake): the entity is fine
        except Fenced:
            # A newer incarnation took the conversation over: this entity must never
            # write again. Not a crash of ours; the placement decides what follows.
            self.closing = True
            self.shell.fenced(self)
            raise
        except SequenceConflict:
            # Someone else wrote this conversation: our copy is stale. Reload it in
            # place (turn logs hold this list) and let the caller re-send.
            cap = services.config.conversations.tail_messages
            self.history[:] = await read_tail(services.store, cid, cap, self.memory.room)
            raise
        except TimeoutError as exc:
            reason = f"the turn exceeded its deadline of {timeout_s:g} s"
            self.shell.crashed(self, reason)
            raise TurnFailed(cid, turn_id, reason) from exc
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"[:300]
            self.shell.crashed(self, reason)
            raise TurnFailed(cid, turn_id, f"the conversation crashed ({reason})", exc) from exc
        finally:
            self.turns += 1

    # --- streamed turns: the turn runs here, readers tail its log -----------------------

    def turn_streams(self) -> TurnStreams:
        """This conversation's streamed turns, made on first use."""
        if self.streams is None:
            config = self.shell.services.config
            self.streams = TurnStreams(
                config.streams.keep_turns, config.streams.window_s, config.streams.batch_s
            )
        return self.streams

    async def start_turn(self, request: TurnRequest, after: int = -1) -> int:
        """Start the turn ``request`` asks for, running into its event log, and return
        at once (the log's first ``seq``); readers tail it with :meth:`events`.
        Idempotent: a turn whose log is here is not started again. ``after`` is the
        reader's cursor when it starts a turn again whose process died: the log goes on
        from there, with a ``restarted`` event. The quota refuses before the turn starts."""
        self._refuse_if_closing()

        def run(
            emit: Emit, should_stop: Callable[[], bool], ticket: Ticket | None
        ) -> Awaitable[Reply]:
            return self.send(
                request, emit=emit, should_stop=should_stop, admitted=True, ticket=ticket
            )

        async def admit() -> Ticket | None:
            services = self.shell.services
            user = await user_of(services.store, self.conversation_id, services.records)
            return await self._admit(user, request)

        streams = self.turn_streams()
        return await streams.start_admitted(request.turn_id, after, run, self.history, admit)

    async def start_and_read(
        self, request: TurnRequest, after: int = -1, wait_s: float = 10.0
    ) -> tuple[list[TurnEvent], bool]:
        """:meth:`start_turn`, then :meth:`events` after ``after``: a streamed turn's
        start and its first events in one call where a reader would make two."""
        await self.start_turn(request, after)
        return await self.events(request.turn_id, after, wait_s)

    def cancel(self, turn_id: str) -> bool:
        """Ask streamed turn ``turn_id`` to stop at its next safe point (between deltas,
        after a tool returns); it ends ``incomplete`` with what it produced stored.
        ``False`` when it is not running here (finished, or never streamed)."""
        return self.streams is not None and self.streams.cancel(turn_id)

    async def events(
        self, turn_id: str, after: int = -1, wait_s: float = 10.0
    ) -> tuple[list[TurnEvent], bool]:
        """``(events, ended)``: the events of turn ``turn_id`` after ``seq`` ``after``,
        waiting up to ``wait_s`` for one (a long poll; none: nothing new yet), and
        whether the turn has ended with them. A turn whose log is gone is replayed from
        the store when it is complete, and started again (from its stored message, after
        a ``restarted`` event) when its process died mid-turn."""

        def restart(first: Sequence[Message]) -> Awaitable[int]:
            return self.start_turn(restarted(turn_id, first), after)

        binding = self.binding
        streams = self.turn_streams()
        history: list[Message] = self.history
        if streams.logs.get(turn_id) is None and not any(m.turn_id == turn_id for m in history):
            history = await self._stored_turn(turn_id)  # older than the tail held here
        return await streams.events(
            self.conversation_id,
            turn_id,
            after,
            wait_s,
            history,
            (binding.agent, binding.version or ""),
            restart,
        )


class Shell(ABC):
    """A process serving conversation entities: a host (many) or a dedicated actor (one).

    Subclasses own where entities live (:meth:`_activated`, :meth:`_live`,
    :meth:`_drop`), passivation and transport; the calls below — opening the store and
    activation included — are what every placement does, written once.
    """

    def __init__(self, namespace: str, app: App | None, config: Config) -> None:
        """What every placement's process holds: its incarnation (new each time Ray
        restarts it), telemetry (spans export when the ``OTEL_*`` variables reached
        this process), one store client, app, quota book and record cache for all its
        conversations, and crash accounting."""
        self.namespace = namespace
        self.config = config
        self.incarnation = new_incarnation()
        setup_telemetry()
        self.services = Services.of(namespace, app, config)
        self.serving = self.services.serving
        self.supervision = EntitySupervision(config.conversations)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._activating: dict[str, asyncio.Future[Entity]] = {}  # id -> its activation
        self._store_open = False
        self._store_lock = asyncio.Lock()

    # --- what a placement provides ------------------------------------------------------

    async def _open(self) -> None:
        """Open the process's store client on first use (idempotent), then
        :meth:`_opened`."""
        if not self._store_open:
            async with self._store_lock:
                if not self._store_open:
                    await self.services.store.open()
                    self._store_open = True
                    await self._opened()

    async def _opened(self) -> None:  # noqa: B027 (a hook: most placements read nothing)
        """The store client was just opened: what a placement reads first."""

    def _prepare(self, conversation_id: str, api_keys: Mapping[str, Secret] | None) -> Binding:
        """Before an activation: the binding the new entity gets (the agent it serves,
        the user's ``api_keys``). A placement that may not activate now raises here."""
        return Binding.of(conversation_id, api_keys)

    @abstractmethod
    def _activated(self, entity: Entity) -> None:
        """A new entity was activated: hold it, so the next call finds it live."""

    @abstractmethod
    def _live(self, conversation_id: str) -> Entity | None:
        """The live entity of ``conversation_id``, if any (never activates)."""

    @abstractmethod
    def _drop(self, entity: Entity) -> None:
        """Forget ``entity`` (crashed or fenced): the next call activates a new one."""

    @abstractmethod
    def fenced(self, entity: Entity) -> None:
        """``entity`` was fenced out by a newer incarnation of its conversation."""

    @abstractmethod
    def turn_ended(self, entity: Entity) -> None:
        """A turn of ``entity`` ended (its idle clock starts again)."""

    # --- the call filters, then the entity --------------------------------------------

    async def enter(
        self,
        conversation_id: str,
        principal: Principal | None,
        need: Need,
        api_keys: Mapping[str, Secret] | None = None,
        request: TurnRequest | None = None,
        *,
        touch: bool = True,
    ) -> Entity:
        """The entity a call for ``conversation_id`` goes to, once the filters let it
        through: not quarantined, ``principal`` (an HTTP caller) may ``need`` it, and
        ``request`` (a turn) is valid — all before anything is activated or stored.
        ``touch``: the call counts as use (idle passivation and the LRU cap see it)."""
        self.supervision.check(conversation_id)
        await self._authorize(conversation_id, principal, need)
        if request is not None:
            validate_turn(request, max_chars=self.services.config.limits.max_message_chars)
        entity = await self._activate(conversation_id, api_keys)
        if touch:
            self.touched(entity)
        return entity

    async def _activate(
        self,
        conversation_id: str,
        api_keys: Mapping[str, Secret] | None = None,
        binding: Binding | None = None,
    ) -> Entity:
        """The live entity of ``conversation_id``, else one activated from the store
        (:func:`activate`); concurrent calls for one conversation share one activation.
        ``api_keys`` bind for the life of the entity; a restart passes the crashed
        entity's ``binding``, so they survive it."""
        entity = self._live(conversation_id)
        if entity is not None and not entity.closing:
            return entity
        pending = self._activating.get(conversation_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Entity] = asyncio.get_running_loop().create_future()
        self._activating[conversation_id] = future
        try:
            bound = binding or self._prepare(conversation_id, api_keys)
            await self._open()
            entity = await activate(self, conversation_id, bound)
            self._activated(entity)
            future.set_result(entity)
            return entity
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        finally:
            del self._activating[conversation_id]

    async def _authorize(
        self, conversation_id: str, principal: Principal | None, need: Need
    ) -> None:
        """The access filter: may ``principal`` (an HTTP caller; ``None``: a trusted
        driver) ``need`` this conversation? Checked where the conversation lives."""
        await self._open()
        if principal is not None:
            services = self.services
            await check_access(services.store, conversation_id, principal, need, services.records)

    async def cancel_turn(
        self, conversation_id: str, turn_id: str, principal: Principal | None = None
    ) -> bool:
        """Cancel streamed turn ``turn_id`` of ``conversation_id``
        (:meth:`Entity.cancel`); ``False`` when it is not running here. Never activates."""
        await self._authorize(conversation_id, principal, "write")
        entity = self._live(conversation_id)
        return entity is not None and entity.cancel(turn_id)

    def touched(self, entity: Entity) -> None:
        """``entity`` was used just now (a placement may also reorder its LRU)."""
        entity.touch()

    def crashed(self, entity: Entity, reason: str) -> None:
        """``entity`` crashed: drop it; the core decides restart (now, from the store,
        so queued callers find it serving) or quarantine."""
        entity.closing = True
        self._drop(entity)
        cid = entity.conversation_id
        if self.supervision.crashed(cid, reason):
            metrics().restart("entities")
            self.spawn(self._activate(cid, binding=entity.binding))
        else:
            metrics().quarantine()
            log.warning("conversation %r quarantined: %s", cid, reason)

    async def drain(self, timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
        """Before this process is stopped or replaced on purpose
        (:func:`~overstory.supervisors.watch.stop_child`): export the spans it still
        buffers, off the event loop, for at most ``timeout_s``. Everything else it holds
        is stored already."""
        return await flush_async(timeout_s)

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` in the background, referenced until it ends; its failure is
        logged (a failed restart leaves the next call to activate, and to report)."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.info("background work of a conversation failed: %r", task.exception())
