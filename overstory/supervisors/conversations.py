"""ConversationSupervisor: a dynamic supervisor (one_for_one, transient children) that
is also the registry's single source of truth for which conversations are live.

* ``start_child(user_id)`` gets or starts the user's conversation actor. Calls for one
  user are serialised here, so concurrent activations from many drivers yield one actor.
* Each child has one pending ``watch`` call: it returns when the child passivates (a
  normal exit: transient, not restarted) and fails within about a second when the child
  dies (a crash). Ray restarts a crashed child in place (``ActorUnavailableError``: same
  name, same handles) and the supervisor waits for it to serve again; a child killed for
  good (``ActorDiedError``) is started again by the supervisor. Either way the restart
  counts against the restart intensity; exceeding it shuts every child down in reverse
  start order and escalates: this supervisor exits and its parent decides.
* Lifecycle: a child idle for ``conversations.idle_timeout_s`` asks to be passivated; with
  ``dedicated.max_live_per_node`` set, activating one more conversation on a full node passivates
  the least recently used idle ones there. Passivation waits for a running turn.

Which children to restart and when to give up are the pure functions of
:mod:`overstory.supervisors.core`; this class only does the I/O around them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

from .._ray import actor_id, alive_nodes_async, get_actor_async, named_actors_async
from ..actors.conversation import ConversationActor
from ..actors.names import NAME_PREFIX, actor_name
from ..app import App, load_app
from ..config import Config
from ..conversation.serving import Binding
from ..exceptions import ConfigError, OverstoryError, Passivated, UnknownAgent
from ..providers import Secret
from ..rollout import Deployment, read_deployment
from ..store import open_store
from ..telemetry import metrics
from .core import Shutdown, SupervisorState, add_child, on_exit, remove_child
from .locks import KeyedLocks
from .named import SUPERVISED, get_or_create, unwrap_task_error
from .spec import ChildSpec, SupervisorSpec
from .tree import ROOT
from .watch import RESTARTED, new_incarnation, until_death

__all__ = ["ConversationSupervisor"]

log = logging.getLogger(__name__)

_RemoteConversation: Any = ray.remote(ConversationActor)


@dataclass
class _Child:
    user_id: str
    handle: Any
    node_id: str
    started_at: float
    pid: int = 0
    api_keys: Mapping[str, Secret] | None = None  # the user's own vendor keys
    incarnation: str | None = None  # the process last seen serving (watch.py)
    restarts: int = 0  # Ray's count of its restarts in place, as last seen
    watcher: asyncio.Task[None] | None = None
    stopping: bool = False


class ConversationSupervisor:
    """Starts, watches, restarts and passivates conversation actors."""

    def __init__(
        self,
        namespace: str,
        app: App | None,
        config: Config,
    ) -> None:
        self.namespace = namespace
        self.app = app  # the local app; a deployed one each conversation actor imports
        # What the app is, from the deployment record (this process never imports a
        # deployed app: it may not even have its working dir) or the local app.
        self._store = open_store(config.store)
        self._store_open = False
        self._deployment: Deployment | None = None
        self._described: dict[str, Any] | None = None
        self.config = config  # passed whole to every conversation actor it starts
        self._children: dict[str, _Child] = {}
        self._locks = KeyedLocks()  # per user, only while in use
        # What the OTP core knows: one transient child per live conversation, and the
        # restart window. Every restart decision below is core.on_exit's.
        self._state = SupervisorState(
            SupervisorSpec(
                "one_for_one",
                config.supervision.restart_intensity,
                config.supervision.restart_period_s,
            ),
            (),
        )
        self.counters = {"activations": 0, "passivations": 0, "restarts": 0, "evictions": 0}
        self._adopted = False
        self.incarnation = new_incarnation()
        # Activations in flight at once: creating a Ray actor is CPU-bound (~1 s here),
        # and a burst of hundreds at once starves every one of them past its deadline.
        self._spawning = asyncio.Semaphore(4)
        self._in_flight = 0
        self._room = asyncio.Event()

    # --- supervision protocol (used by the root supervisor) ---------------------------

    async def ready(self) -> dict[str, Any]:
        if not self._adopted:
            self._adopted = True
            await self._adopt_orphans()
        return self.status()

    async def watch(self, incarnation: str | None = None) -> str:
        return await until_death(incarnation, self.incarnation)

    def status(self) -> dict[str, Any]:
        per_node: defaultdict[str, int] = defaultdict(int)
        for child in self._children.values():
            per_node[child.node_id] += 1
        return {
            "live": len(self._children),
            "per_node": dict(per_node),
            **self.counters,
            "incarnation": self.incarnation,
        }

    async def app_info(self, whole: bool = False) -> Any:
        """The app the conversations serve (:meth:`~overstory.app.App.describe`), read
        once from the deployment record (or the local app) and again on redeploy;
        ``whole``: the :class:`~overstory.app.App` itself."""
        if whole:
            await self.app_info()
            if self._deployment is not None:
                return load_app(self._deployment.source)
            return self.app
        if self._described is None:
            if not self._store_open:
                await self._store.open()
                self._store_open = True
            self._deployment = await read_deployment(self._store, self.namespace)
            if self._deployment is not None:
                record = self._deployment
                self._described = {**record.app, "deployment": record.generation}
            elif self.app is not None:
                self._described = {**self.app.describe(), "deployment": 0}
            else:
                raise ConfigError(
                    f"no app is deployed in namespace {self.namespace!r}: "
                    "run `overstory serve MODULE:ATTR`"
                )
        return self._described

    async def models(self) -> list[dict[str, Any]]:
        """Every agent version's model chain (:func:`~overstory.providers.pool.chain_rows`),
        each endpoint once."""
        models: list[dict[str, Any]] = (await self.app_info())["models"]
        return models

    def children(self) -> list[dict[str, Any]]:
        return [
            {"user_id": c.user_id, "node_id": c.node_id, "pid": c.pid, "started_at": c.started_at}
            for c in self._children.values()
        ]

    # --- registry ---------------------------------------------------------------------

    async def start_child(
        self,
        user_id: str,
        api_keys: Mapping[str, Secret] | None = None,
    ) -> Any:
        """The live actor of conversation ``user_id``, started (and its history loaded)
        if needed.

        ``api_keys`` make it call vendors with the user's own keys; they hold for the
        life of the actor (restarts included) and are ignored when it is already live.
        A conversation with an agent the app does not serve is refused
        (:class:`~overstory.exceptions.UnknownAgent`) before any actor starts.
        """
        served = list((await self.app_info())["agents"])
        agent = Binding.of(user_id).agent
        if agent not in served:
            raise UnknownAgent(agent, served)
        async with self._locks(user_id):
            child = self._children.get(user_id)
            if child is not None and not await self._serving(child):
                # Dying or fenced out: forget this incarnation; get_or_create below waits
                # (with backoff) for the name to serve again or to be free.
                self._forget(user_id)
                child = None
            if child is None:
                await self._make_room()
                self._in_flight += 1
                try:
                    async with self._spawning:
                        child = await self._spawn(user_id, api_keys)
                finally:
                    self._in_flight -= 1
            handle = child.handle
        if self.config.dedicated.max_live_per_node is not None:
            await self._enforce_cap(child.node_id, keep=user_id)
        return handle

    async def _serving(self, child: _Child) -> bool:
        """Whether ``child`` takes turns (waits for an in-place restart to finish)."""
        if child.stopping:
            return False
        try:
            await child.handle.ready.remote()
        except (RayActorError, RayTaskError):
            return False
        return True

    async def _spawn(self, user_id: str, api_keys: Mapping[str, Secret] | None) -> _Child:
        options = {**SUPERVISED, "max_restarts": self.config.dedicated.actor_max_restarts}
        if self.config.actor_resources:
            options["resources"] = dict(self.config.actor_resources)
        record = self._deployment
        if record is not None and record.working_dir:
            options["runtime_env"] = {"working_dir": record.working_dir}
        me = ray.get_runtime_context().current_actor
        handle, info = await get_or_create(
            _RemoteConversation,
            actor_name(user_id),
            self.namespace,
            (user_id, self.app, self.config, me, api_keys),
            options,
            timeout_s=self.config.conversations.activation_timeout_s,
        )
        child = self._record(user_id, handle, info, api_keys)
        self.counters["activations"] += 1
        metrics().live_conversations(len(self._children))
        return child

    async def _adopt_orphans(self) -> None:
        """After a restart of this supervisor: watch the conversations still running.

        All of them are asked at once: a restart must not take as long as the sum of every
        orphan's answer (an orphan that is itself restarting can take seconds).
        """
        names = await named_actors_async(self.namespace, NAME_PREFIX)
        await asyncio.gather(*(self._adopt(name) for name in names))

    async def _adopt(self, name: str) -> None:
        try:
            handle = await get_actor_async(name, self.namespace)
        except ValueError:
            return  # gone meanwhile
        try:
            # Its info, and the user's own keys it holds: a restart of the conversation
            # must keep them.
            calls: list[Any] = [handle.ready.remote(), handle.own_keys.remote()]
            info, api_keys = await asyncio.wait_for(
                asyncio.gather(*calls), timeout=self.config.conversations.activation_timeout_s
            )
        except RayTaskError as exc:
            if isinstance(unwrap_task_error(exc), Passivated):
                # This supervisor died between passivating it and killing it: finish the
                # job (its history is stored), or it would hold the user's name forever.
                ray.kill(handle, no_restart=True)
            return
        except (RayActorError, TimeoutError):
            return  # dead, or not answering: a later start_child takes it from there
        user_id = info["conversation_id"]
        async with self._locks(user_id):  # start_child may be starting or adopting it too
            if user_id not in self._children:
                self._record(user_id, handle, info, api_keys)

    def _record(
        self,
        user_id: str,
        handle: Any,
        info: dict[str, Any],
        api_keys: Mapping[str, Secret] | None,
    ) -> _Child:
        """Make a serving actor (its ``ready`` answer: ``info``) a watched child."""
        child = _Child(
            user_id,
            handle,
            info["node_id"],
            time.time(),
            info["pid"],
            api_keys,
            info["incarnation"],
            int(info.get("restarts", 0)),
        )
        self._children[user_id] = child
        if all(c.id != user_id for c in self._state.children):
            self._state = add_child(self._state, ChildSpec(user_id, restart="transient"))
        child.watcher = asyncio.get_running_loop().create_task(self._watch(child))
        return child

    # --- watching and restarting ----------------------------------------------------------

    async def _watch(self, child: _Child) -> None:
        """Count ``child``'s crashes against the restart intensity until it ends.

        A crash is seen as the pending ``watch`` call failing or answering that a new
        process serves; how many crashes that was is Ray's own restart count (the new
        process reports it), so crashes in a row faster than this supervisor looks —
        one while it still waits for the last restart — each count."""
        while self._children.get(child.user_id) is child:
            try:
                if await child.handle.watch.remote(child.incarnation) != RESTARTED:
                    return  # passivated: a normal exit of a transient child, not restarted
                died: RayActorError | None = None  # crashed and restarted before this call
            except RayTaskError:
                return
            except RayActorError as exc:
                died = exc
            if child.stopping or self._children.get(child.user_id) is not child:
                return  # stopped on purpose, or another incarnation is watched now
            if not self._restart_allowed(child.user_id):  # the crash just seen
                await self._escalate()
                return
            if isinstance(died, ActorDiedError):
                await self._restart_dead(child)  # dead for good: start it again, same name
                return
            # Ray restarts it in place: wait until it serves again, keep watching.
            info = await self._served_again(child)
            if child.stopping or self._children.get(child.user_id) is not child:
                return  # passivated or replaced meanwhile: no longer this watcher's
            if info is None:
                await self._restart_dead(child)
                return
            if not await self._crashed(child.user_id, int(info["restarts"]) - child.restarts - 1):
                return  # restarts beyond the crash counted above, each one a crash too
            child.pid, child.incarnation = info["pid"], info["incarnation"]
            child.restarts = int(info["restarts"])

    async def _served_again(self, child: _Child) -> dict[str, Any] | None:
        """``child``'s ``ready`` answer once Ray has restarted it in place; ``None`` when
        it is dead for good, its start fails, or it is not back within the activation
        timeout."""
        deadline = time.monotonic() + self.config.conversations.activation_timeout_s
        pause = 0.05
        while True:
            try:
                info: dict[str, Any] = await child.handle.ready.remote()
                return info
            except (ActorDiedError, RayTaskError):
                return None
            except RayActorError:  # unavailable while Ray restarts it: ask again
                if time.monotonic() + pause > deadline:
                    return None
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)

    async def _crashed(self, user_id: str, crashes: int) -> bool:
        """Count ``crashes`` more crashes of ``user_id``; ``False`` once one is too many
        (this supervisor has then escalated)."""
        for _ in range(crashes):
            if not self._restart_allowed(user_id):
                await self._escalate()
                return False
        return True

    def _restart_allowed(self, user_id: str) -> bool:
        """The child crashed: ask the core. ``False``: intensity exceeded, give up."""
        if all(c.id != user_id for c in self._state.children):
            return False  # the supervisor is already giving up (its children are gone)
        self.counters["restarts"] += 1
        metrics().restart("conversations")
        self._state, decision = on_exit(self._state, user_id, "crash", time.monotonic())
        return not isinstance(decision, Shutdown)

    def _forget(self, user_id: str) -> None:
        """The child is gone and not restarted (passivated, or its restart failed)."""
        self._children.pop(user_id, None)
        if any(c.id == user_id for c in self._state.children):
            self._state = remove_child(self._state, user_id)

    async def _restart_dead(self, child: _Child) -> None:
        """Start ``child`` again under its name (waiting, if Ray is restarting it in
        place, until it serves). If the actor serving then is the same one, every
        restart Ray made of it beyond the crash already counted is a crash too."""
        async with self._locks(child.user_id):
            if self._children.get(child.user_id) is not child:
                return
            del self._children[child.user_id]
            try:
                again = await self._spawn(child.user_id, child.api_keys)
            except (OverstoryError, RayActorError) as exc:
                # Not fatal: the next start_child for this user tries again, from the store.
                self._forget(child.user_id)
                log.warning("restart of conversation %r failed: %s", child.user_id, exc)
                return
        if actor_id(again.handle) == actor_id(child.handle):
            await self._crashed(child.user_id, again.restarts - child.restarts - 1)

    async def _escalate(self) -> None:
        """Too many restarts: shut every child down (reverse start order) and exit. The
        children are killed at once, not drained: this subtree is failing, and its
        parent must hear of it without waiting on children that may be restarting."""
        for child in sorted(self._children.values(), key=lambda c: c.started_at, reverse=True):
            child.stopping = True
            ray.kill(child.handle, no_restart=True)
        self._children.clear()
        # Escalate: ask the parent to take this supervisor down for good. Its pending
        # watch call on us then fails, and the parent's own policy decides what next.
        try:
            root = await get_actor_async(ROOT, self.namespace)
        except ValueError:  # no parent: stop on our own
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
            return
        await root.escalated.remote("conversations")

    # --- passivation ------------------------------------------------------------------

    async def forget_splits(self) -> int:
        """Tell every live conversation a rollout split changed; returns how many heard."""
        calls = [c.handle.forget_splits.remote() for c in list(self._children.values())]
        heard = await asyncio.gather(*calls, return_exceptions=True)
        return sum(1 for h in heard if h is True)

    async def redeploy(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """A new app was deployed: read it, and passivate every live conversation so each
        starts again on the new code at its next call (a busy one once its turn ends,
        tried until ``timeout_s``). Returns how many were passivated and left."""
        self._described = None
        await self.app_info()
        deadline = time.monotonic() + timeout_s
        passivated = 0
        while self._children and time.monotonic() < deadline:
            results = await asyncio.gather(
                *(self.passivate(uid, "redeployed") for uid in list(self._children))
            )
            passivated += sum(results)
            if self._children:
                await asyncio.sleep(0.2)
        return {"passivated": passivated, "left": len(self._children)}

    async def passivate(self, user_id: str, reason: str = "idle") -> bool:
        """Passivate ``user_id``'s conversation unless a turn is running or waiting."""
        if user_id not in self._children:
            # An orphan this supervisor did not adopt when it restarted (it did not answer
            # in time) asks to passivate: adopt it now, then treat it like any child.
            await self._adopt(actor_name(user_id))
        async with self._locks(user_id):
            child = self._children.get(user_id)
            if child is None or child.stopping:
                return False
            try:
                if not await child.handle.passivate.remote():
                    return False
            except (RayActorError, RayTaskError):
                return False  # it died meanwhile; the watcher deals with that
            child.stopping = True
            ray.kill(child.handle, no_restart=True)
            if child.watcher is not None:
                # The pending watch call fails within ~30 ms of the kill: the name is free.
                await asyncio.wait({child.watcher}, timeout=10)
            self._forget(user_id)
            self._room.set()
            self.counters["passivations"] += 1
            metrics().passivation(reason)
            metrics().live_conversations(len(self._children))
            if reason == "evicted":
                self.counters["evictions"] += 1
            return True

    async def _make_room(self) -> None:
        """With a cap, wait until one more conversation fits, evicting idle ones to make room.

        The per-node cap can only be checked after Ray has placed an actor; before that,
        the cluster-wide room is ``dedicated.max_live_per_node`` times the number of alive nodes.
        While every live conversation is in a turn nothing can be evicted: wait for one
        to end (re-checked on every removal, and every half second).
        """
        cap = self.config.dedicated.max_live_per_node
        if cap is None:
            return
        room = cap * max(1, len(await alive_nodes_async()))
        while len(self._children) + self._in_flight >= room:
            if not await self._evict_one():
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), timeout=0.5)

    async def _evict_one(self, node_id: str | None = None, keep: str = "") -> bool:
        """Passivate the least recently used idle conversation (on ``node_id`` if given)."""
        candidates = [
            c
            for c in self._children.values()
            if c.user_id != keep and not c.stopping and (node_id is None or c.node_id == node_id)
        ]
        infos = await asyncio.gather(
            *(c.handle.ready.remote() for c in candidates), return_exceptions=True
        )
        # By when each was last active (wall clock: the answers come at different moments,
        # so "idle for N s" measured by each actor would skew the order under load).
        idle = sorted(
            (info["last_active_at"], c.user_id)
            for c, info in zip(candidates, infos, strict=True)
            if isinstance(info, dict) and not info["busy"]
        )
        for _, user_id in idle:
            if await self.passivate(user_id, "evicted"):
                return True
        return False

    async def _enforce_cap(self, node_id: str, keep: str) -> None:
        """After a placement: passivate LRU idle conversations on a node over its cap."""
        cap = self.config.dedicated.max_live_per_node
        assert cap is not None
        while sum(1 for c in self._children.values() if c.node_id == node_id) > cap:
            if not await self._evict_one(node_id, keep):
                return  # all busy: the cap is soft until one of them goes idle
