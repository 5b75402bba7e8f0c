"""The supervision tree: one detached, named root supervisor per app namespace.

    root (one_for_one, permanent children)              Supervisor
    ├── hosts (hosted placement)                        Supervisor: one_for_one, permanent
    │   ├── overstory:host:0                            HostActor: conversation entities,
    │   └── overstory:host:1 ...                          each supervised inside its host
    ├── conversations (dedicated placement)             ConversationSupervisor: dynamic,
    │                                                     one_for_one, transient children
    └── jobs                                            JobRunner: background jobs

:class:`Supervisor` is the one shell for named, static children (the root and the host
supervisor are two instances of it): it asks :func:`~overstory.supervisors.core.on_exit`
what to do with each exit and carries the decision out; when the core says give up, it
terminates its children and escalates to its parent (or, for the root, stops the tree).

Provider actors (one per endpoint, :mod:`overstory.providers.pool`) live beside the
tree, not in it: Ray restarts them in place and any caller starts one that is gone for
good by name, so no supervisor has to know every user's own endpoints.

:func:`boot` gets or creates the root by name — booting twice attaches to the running
tree, never a second one — and the root gets or creates its children the same way, so
after a restart of any of them the running actors are adopted, not duplicated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import ray
from ray.exceptions import RayActorError, RayTaskError

from .._ray import get_actor_async
from .core import Remove, Restart, Shutdown, SupervisorState, initial_state, on_exit
from .named import SUPERVISED, get_or_create, get_or_create_sync
from .spec import ChildSpec, ExitReason, SupervisorSpec
from .watch import RESTARTED, new_incarnation, stop_child, until_death

__all__ = [
    "CONVERSATIONS",
    "HOSTS",
    "ROOT",
    "NamedChild",
    "RootSupervisor",
    "Supervisor",
    "boot",
    "is_running",
    "running_placement",
]

ROOT = "overstory.root"
CONVERSATIONS = "overstory.conversations"
HOSTS = "overstory.hosts"

#: How long the root waits for a (re)started child to serve before counting a failure.
START_TIMEOUT_S = 60.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NamedChild:
    """How the root starts a child: a Ray actor class, its name, args and options."""

    remote_cls: Any
    name: str
    args: tuple[Any, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)


class Supervisor:
    """Thin shell around :mod:`overstory.supervisors.core` for named, static children.

    ``parent`` is ``(parent actor name, this supervisor's child id there)``: where to
    escalate when the restart intensity is exceeded (``None``: this is the root).
    ``meta`` is returned by :meth:`status` (the host supervisor carries the shard table).
    """

    def __init__(
        self,
        namespace: str,
        spec: SupervisorSpec,
        parent: tuple[str, str] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.namespace = namespace
        self.spec = spec
        self.parent = parent
        self.meta = dict(meta or {})
        self._state: SupervisorState | None = None
        self._handles: dict[str, Any] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._watching: dict[str, str | None] = {}  # child id -> incarnation watched
        self._stopping: set[str] = set()
        self._lock = asyncio.Lock()
        self.restarts = 0
        self.incarnation = new_incarnation()

    async def ready(self) -> dict[str, Any]:
        async with self._lock:
            if self._state is None:
                self._state = initial_state(self.spec)
                for child in self._state.children:
                    await self._start(child)
        return self.status()

    def status(self) -> dict[str, Any]:
        children = [c.id for c in self._state.children] if self._state else []
        return {
            "pid": os.getpid(),
            "children": children,
            "restarts": self.restarts,
            "incarnation": self.incarnation,
            "watching": dict(self._watching),
            "meta": self.meta,
        }

    async def escalated(self, child_id: str) -> None:
        """A child supervisor gave up (its restart intensity was exceeded): take it down.

        Its pending watch call then fails and this supervisor's policy handles the exit.
        """
        handle = self._handles.get(child_id)
        if handle is not None:
            ray.kill(handle, no_restart=True)

    async def watch(self, incarnation: str | None = None) -> str:
        return await until_death(incarnation, self.incarnation)

    async def _start(self, child: ChildSpec) -> None:
        """Start ``child``, or attach to it: Ray may be restarting it in place, and a
        call made while it restarts can fail (``ActorUnavailableError``); get-or-create
        retries until it serves or the deadline passes."""
        named: NamedChild = child.start
        handle, info = await get_or_create(
            named.remote_cls,
            named.name,
            self.namespace,
            named.args,
            named.options,
            timeout_s=START_TIMEOUT_S,
            attempts=64,
        )
        self._handles[child.id] = handle
        self._stopping.discard(child.id)
        incarnation = info.get("incarnation") if isinstance(info, dict) else None
        self._watching[child.id] = incarnation
        self._watchers[child.id] = asyncio.get_running_loop().create_task(
            self._watch(child.id, handle, incarnation)
        )

    async def _watch(self, child_id: str, handle: Any, incarnation: str | None) -> None:
        reason: ExitReason = "normal"
        try:
            if await handle.watch.remote(incarnation) == RESTARTED:
                reason = "crash"  # it crashed (and Ray restarted it) before this call
        except (RayActorError, RayTaskError):
            # died, or its watch itself failed: either way never leave a child unwatched
            reason = "crash"
        if child_id in self._stopping:
            return  # taken down on purpose
        await self._on_exit(child_id, reason)

    async def _on_exit(self, child_id: str, reason: ExitReason) -> None:
        """Apply the restart policy to ``child_id``'s exit and carry the decision out.

        A child that cannot be started again counts as another crash (as in OTP), so a
        child that never comes back ends in escalation, not in a silently unwatched tree.
        """
        failed: str | None = None
        async with self._lock:
            assert self._state is not None
            self._state, decision = on_exit(self._state, child_id, reason, time.monotonic())
            if isinstance(decision, Remove):
                self._handles.pop(child_id, None)
                return
            self.restarts += 1
            stopped = []
            for other in decision.terminate:
                self._stopping.add(other)
                handle = self._handles.pop(other, None)  # None: its own start had failed
                if handle is not None:
                    stopped.append(stop_child(handle))  # drained (spans exported), killed
            await asyncio.gather(*stopped)
            if isinstance(decision, Shutdown):
                await self._give_up()
                return
            assert isinstance(decision, Restart)
            specs = {c.id: c for c in self._state.children}
            for started in decision.start:
                try:
                    await self._start(specs[started])
                except Exception as exc:  # any failure to start is the child's crash
                    log.error("restart of %r failed: %s: %s", started, type(exc).__name__, exc)
                    await self._kill_by_name(specs[started].start.name)
                    failed = started
                    break
        if failed is not None:
            await self._on_exit(failed, "crash")

    async def _give_up(self) -> None:
        """The children are down: escalate to the parent, which takes this supervisor down
        and applies its own policy; the root has none, so the tree stops and the next
        :func:`boot` starts a fresh one."""
        if self.parent is not None:
            name, child_id = self.parent
            try:
                parent = await get_actor_async(name, self.namespace)
                await parent.escalated.remote(child_id)
                return
            except (ValueError, RayActorError, RayTaskError) as exc:
                log.error("cannot escalate to %r: %s; stopping", name, exc)
        ray.get_runtime_context().current_actor.__ray_terminate__.remote()

    async def _kill_by_name(self, name: str) -> None:
        """End a child that failed to start, so the next attempt starts a fresh one."""
        with contextlib.suppress(ValueError):  # no such actor (any more)
            ray.kill(await get_actor_async(name, self.namespace), no_restart=True)


#: The root was the only instance before the host supervisor; the old name stays valid.
RootSupervisor = Supervisor

_RemoteRoot: Any = ray.remote(Supervisor)


def is_running(name: str, namespace: str) -> bool:
    """Whether a named actor ``name`` exists in ``namespace`` (driver side, blocking)."""
    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    return True


def running_placement(namespace: str) -> Literal["hosted", "dedicated"] | None:
    """The placement of the tree running in ``namespace``, from the supervisor of its
    conversations (``None``: no tree, or one still booting)."""
    if is_running(HOSTS, namespace):
        return "hosted"
    if is_running(CONVERSATIONS, namespace):
        return "dedicated"
    return None


def boot(namespace: str, spec: SupervisorSpec, *, timeout_s: float = 60.0) -> Any:
    """The running tree's root in ``namespace``, started (with its children) if absent."""
    root, _ = get_or_create_sync(
        _RemoteRoot,
        ROOT,
        namespace,
        (namespace, spec),
        SUPERVISED,
        timeout_s=timeout_s,
    )
    return root
