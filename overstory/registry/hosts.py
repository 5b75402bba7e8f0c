"""The hosted placement's registry: the host supervisor and the client's router.

The shard table lives in the store (compare-and-set, :func:`~overstory.sharding.table_key`): the
:class:`HostSupervisor` writes the first one sized for the cluster as it is
(``hosted.hosts_per_node``, or each alive node's CPU count), supervises one
:class:`~overstory.actors.host.HostActor` per entry as a permanent child, and
:meth:`HostSupervisor.resize` writes a bigger or smaller one online (asked, or by itself
when nodes join or leave: ``hosted.auto_rebalance``). Clients read the table once,
cache it with the host handles, and send straight to the host: no supervisor is on the
path of a send.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import replace
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from .._ray import alive_nodes_async, get_actor_async
from ..actors.host import HostActor
from ..app import App
from ..config import Config
from ..exceptions import ConfigError, ConversationUnavailable, StaleShardTable
from ..rollout import Deployment, read_deployment
from ..sharding import MembershipDamper, ShardTable, stored_table, table_key
from ..store import open_store
from ..supervisors import ChildSpec, SupervisorSpec, add_child
from ..supervisors.core import remove_child, replace_child
from ..supervisors.named import SUPERVISED, unwrap_task_error
from ..supervisors.tree import HOSTS, ROOT, NamedChild, Supervisor
from ..supervisors.watch import stop_child

__all__ = [
    "HOST_OPTIONS",
    "HostRouter",
    "HostSupervisor",
    "count_hosts",
    "hosts_child",
    "resize_hosts",
]

log = logging.getLogger(__name__)

_RemoteHost: Any = ray.remote(HostActor)

#: Ray options of a host: a supervised actor that serves many calls at once (one per
#: turn in flight, plus its watchers), spread over the nodes.
HOST_OPTIONS: dict[str, Any] = {
    **SUPERVISED,
    "max_concurrency": 100_000,
    "scheduling_strategy": "SPREAD",
}


async def count_hosts(config: Config) -> int:
    """Hosts for the cluster as it is now: per alive node that can hold one (it has the
    ``actor_resources``), ``hosted.hosts_per_node`` or its CPU count."""
    total = 0
    for node in await alive_nodes_async():
        resources = node.get("Resources", {})
        if any(resources.get(k, 0) < v for k, v in config.actor_resources.items()):
            continue
        cpus = int(resources.get("CPU", 1) or 1)
        total += config.hosted.hosts_per_node or max(1, cpus)
    return max(1, min(total, config.hosted.shards))


def hosts_child(namespace: str, app: App | None, config: Config) -> ChildSpec:
    """The root's ``hosts`` child: the host supervisor (it sizes the hosts itself).

    ``app`` is the local app (``connect(agent)``), ``None`` when the app is deployed:
    then each host imports it from the store's deployment record."""
    start = NamedChild(
        _RemoteHostSupervisor, HOSTS, (namespace, app, config, (ROOT, "hosts")), SUPERVISED
    )
    return ChildSpec("hosts", start=start, restart="permanent")


class HostSupervisor(Supervisor):
    """The :class:`Supervisor` shell whose permanent children are the hosts of a table.

    The shard table lives in the store (compare-and-set), not in this actor: when this
    process (re)starts it reads the table — or, on the namespace's first boot, writes one
    sized for the cluster as it is — and supervises one host per entry. :meth:`resize`
    writes a bigger or smaller table, starts the new hosts or retires the last ones, and
    tells the hosts, which shed the shards they lost; clients learn it from the first
    host they reach. With ``hosted.auto_rebalance`` it follows the alive nodes itself.
    """

    def __init__(
        self, namespace: str, app: App | None, config: Config, parent: tuple[str, str]
    ) -> None:
        spec = SupervisorSpec(
            "one_for_one", config.supervision.restart_intensity, config.supervision.restart_period_s
        )
        super().__init__(namespace, spec, parent)
        self.app = app
        self.config = config
        self.deployment: Deployment | None = None
        self._store = open_store(config.store)
        self._table_lock = asyncio.Lock()
        self._follower: asyncio.Task[None] | None = None

    def _host_spec(self, name: str, table: ShardTable) -> ChildSpec:
        options = dict(HOST_OPTIONS)
        if self.config.actor_resources:
            options["resources"] = dict(self.config.actor_resources)
        if self.deployment is not None and self.deployment.working_dir:
            options["runtime_env"] = {"working_dir": self.deployment.working_dir}
        # A deployed app is not passed at all: each host imports it from the record.
        app = None if self.deployment is not None else self.app
        args = (self.namespace, name, table, app, self.config)
        return ChildSpec(name, start=NamedChild(_RemoteHost, name, args, options))

    def _adopt(self, table: ShardTable) -> None:
        self.meta = {"shard_table": table, "placement": "hosted"}
        hosts = tuple(self._host_spec(name, table) for name in table.hosts)
        self.spec = replace(self.spec, children=hosts)

    async def ready(self) -> dict[str, Any]:
        async with self._table_lock:
            if "shard_table" not in self.meta:
                await self._store.open()
                self.deployment = await read_deployment(self._store, self.namespace)
                key = table_key(self.namespace)
                table = await stored_table(self._store, self.namespace)
                if table is None:
                    members = await count_hosts(self.config)
                    first = ShardTable.build(
                        members, shards=self.config.hosted.shards, members=members
                    )
                    await self._store.put_setting(key, first.to_json(), expected=None)
                    table = await stored_table(self._store, self.namespace)  # ours or a rival's
                    assert table is not None
                self._adopt(table)
                if self.config.hosted.auto_rebalance and self._follower is None:
                    self._follower = asyncio.get_running_loop().create_task(
                        self._follow_membership()
                    )
        return await super().ready()

    async def resize(self, hosts: int | None = None) -> dict[str, Any]:
        """Serve the namespace with ``hosts`` hosts (default: as many as the cluster holds
        now, see :func:`count_hosts`), more or fewer than today. Returns the table.

        Growing starts the new hosts; every old host then sheds the shards it lost.
        Shrinking retires the last hosts: the rest take their shards, the retired ones
        shed everything, may finish their running turns for ``hosted.retire_grace_s``,
        and are stopped for good. Either way a moved conversation re-activates from the
        store on its new host, and its old entity is fenced (it can never write again);
        clients learn the new table from the first host they reach."""
        await self.ready()
        async with self._table_lock:
            current: ShardTable = self.meta["shard_table"]
            members = await count_hosts(self.config)
            want = hosts if hosts is not None else members
            want = max(1, min(want, current.shards))
            if want != len(current.hosts):
                resized = current.resized(want, members=members)
                key = table_key(self.namespace)
                if not await self._store.put_setting(
                    key, resized.to_json(), expected=current.to_json()
                ):
                    raise ConversationUnavailable(
                        f"the shard table of {self.namespace!r} changed while resizing it; "
                        "ask again"
                    )
                log.info(
                    "shard table of %r: %d hosts -> %d (version %d)",
                    self.namespace,
                    len(current.hosts),
                    want,
                    resized.version,
                )
                self._adopt(resized)
                async with self._lock:
                    assert self._state is not None
                    for child in self.spec.children:
                        if all(c.id != child.id for c in self._state.children):
                            self._state = add_child(self._state, child)
                            await self._start(child)
                # Every host of either table reads the new one: the old shed what they
                # lost, the kept take what they gained (clients learn on their own).
                for name in current.hosts:
                    handle = self._handles.get(name)
                    if handle is not None:
                        with contextlib.suppress(RayActorError, RayTaskError):
                            await handle.adopt_table.remote()
                await self._retire(current.hosts[want:])
            table: ShardTable = self.meta["shard_table"]
            return {"version": table.version, "shards": table.shards, "hosts": list(table.hosts)}

    async def _retire(self, names: tuple[str, ...]) -> None:
        """Stop hosts the table no longer names, for good: first let the turns they
        run end (at most ``hosted.retire_grace_s``; a turn cut short resumes from the
        store where its caller re-sends), then drain and kill them without restart."""
        if not names:
            return
        deadline = time.monotonic() + self.config.hosted.retire_grace_s
        for name in names:
            handle = self._handles.get(name)
            while handle is not None and time.monotonic() < deadline:
                try:
                    if (await handle.status.remote())["busy"] == 0:
                        break
                except (RayActorError, RayTaskError):
                    break
                await asyncio.sleep(0.2)
        async with self._lock:
            assert self._state is not None
            stopping = []
            for name in names:
                self._stopping.add(name)
                if any(c.id == name for c in self._state.children):
                    self._state = remove_child(self._state, name)
                self._watchers.pop(name, None)
                handle = self._handles.pop(name, None)
                self._watching.pop(name, None)
                if handle is not None:
                    stopping.append(stop_child(handle))
            await asyncio.gather(*stopping)

    async def _follow_membership(self) -> None:
        """``hosted.auto_rebalance``: look at the alive nodes every
        ``rebalance_poll_s``; when the host count they hold changes and the change
        settles (:class:`~overstory.sharding.MembershipDamper`), resize to it."""
        hosted = self.config.hosted
        table: ShardTable = self.meta["shard_table"]
        damper = MembershipDamper(
            hosted.rebalance_settle_s,
            hosted.rebalance_cooldown_s,
            baseline=table.members if table.members is not None else len(table.hosts),
        )
        while True:
            try:
                target = damper.observe(await count_hosts(self.config), time.monotonic())
                if target is not None:
                    await self.resize(target)
            except Exception as exc:  # the store or the GCS away: look again later
                log.warning("following the membership failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(hosted.rebalance_poll_s)

    async def redeploy(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """A new app was deployed: replace the hosts one at a time, each a fresh process
        that imports the new code (and gets the new working dir). Conversations of a
        host being replaced re-activate from the store on their next call (callers
        re-send, with back-off, under their deadline); none is lost."""
        await self.ready()
        async with self._table_lock:
            self.deployment = await read_deployment(self._store, self.namespace)
            self._adopt(self.meta["shard_table"])
            replaced = []
            for child in self.spec.children:
                async with self._lock:
                    assert self._state is not None
                    # A later restart of this host must start the new code too.
                    self._state = replace_child(self._state, child)
                    self._stopping.add(child.id)
                    handle = self._handles.pop(child.id, None)
                    watcher = self._watchers.pop(child.id, None)
                    if handle is not None:  # its last spans exported first (bounded)
                        await stop_child(handle)
                    if watcher is not None:  # it returns once the old process is gone
                        await asyncio.wait({watcher}, timeout=timeout_s)
                    await self._name_free(child.start.name, timeout_s)
                    await self._start(child)
                replaced.append(child.id)
        return {"replaced": replaced, "deployment": self.deployment and self.deployment.generation}

    async def _name_free(self, name: str, timeout_s: float) -> None:
        """Wait until a killed host's name is released (a new one can take it)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            try:
                await get_actor_async(name, self.namespace)
            except ValueError:
                return
            await asyncio.sleep(0.05)

    async def forget_splits(self) -> int:
        """Tell every host a rollout split changed; returns how many heard it."""
        heard = 0
        for handle in list(self._handles.values()):
            with contextlib.suppress(RayActorError, RayTaskError):
                heard += bool(await handle.forget_splits.remote())
        return heard


_RemoteHostSupervisor: Any = ray.remote(HostSupervisor)


def resize_hosts(namespace: str, hosts: int | None, timeout_s: float) -> dict[str, Any]:
    """Ask the running host supervisor of ``namespace`` to resize (driver side, blocking)."""
    if hosts is not None and (isinstance(hosts, bool) or not isinstance(hosts, int) or hosts < 1):
        raise ConfigError(f"hosts must be an int >= 1, got {hosts!r}")
    try:
        supervisor = ray.get_actor(HOSTS, namespace=namespace)
        table: Any = ray.get(supervisor.resize.remote(hosts), timeout=timeout_s)
    except ValueError as exc:
        raise ConversationUnavailable(
            f"no host supervisor in namespace {namespace!r}: is a hosted tree running there?"
        ) from exc
    except (RayActorError, GetTimeoutError) as exc:
        raise ConversationUnavailable(
            f"the host supervisor of {namespace!r} did not answer: {type(exc).__name__}"
        ) from exc
    except RayTaskError as exc:
        raise unwrap_task_error(exc) from exc
    return table


class HostRouter:
    """A client's cache of the shard table and of host handles (thread-safe)."""

    def __init__(self, namespace: str, timeout_s: float) -> None:
        self.namespace = namespace
        self.timeout_s = timeout_s
        self._table: ShardTable | None = None
        self._handles: dict[str, Any] = {}
        self._lock = threading.Lock()
        # One reader at a time: after a host dies, thousands of calls find the table
        # gone at once, and the first to read it answers them all.
        self._reading = threading.Lock()

    @property
    def table(self) -> ShardTable:
        table = self._table
        if table is None:
            with self._reading:
                table = self._table
                if table is None:
                    table = self._table = self._read_table()
        return table

    def _read_table(self) -> ShardTable:
        try:
            supervisor = ray.get_actor(HOSTS, namespace=self.namespace)
            status: Any = ray.get(supervisor.status.remote(), timeout=self.timeout_s)
        except (ValueError, RayActorError, RayTaskError, GetTimeoutError) as exc:
            raise ConversationUnavailable(
                f"the host supervisor of namespace {self.namespace!r} does not answer: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        table: ShardTable | None = status["meta"].get("shard_table")
        if table is None:  # it restarted and has not read the table from the store yet
            raise ConversationUnavailable(
                f"the host supervisor of namespace {self.namespace!r} is starting: "
                "its shard table is not loaded yet"
            )
        return table

    def route(self, conversation_id: str) -> tuple[int, str, Any]:
        """``(table version, host name, host handle)`` for ``conversation_id``."""
        table = self.table
        name = table.host_for(conversation_id)
        return table.version, name, self.route_host(name)

    def _lookup(self, name: str) -> Any:
        try:
            return ray.get_actor(name, namespace=self.namespace)
        except ValueError as exc:
            # Between a host's death for good and its supervisor starting it again.
            raise ConversationUnavailable(
                f"host {name!r} is not running in namespace {self.namespace!r}"
            ) from exc

    def route_host(self, name: str) -> Any:
        """Host ``name``'s handle (looked up where not cached)."""
        handle = self._handles.get(name)
        if handle is None:
            with self._lock:
                handle = self._handles.get(name)
                if handle is None:
                    handle = self._handles[name] = self._lookup(name)
        return handle

    def update(self, stale: StaleShardTable) -> None:
        """A host refused our route: take its table. A host that sees a newer version
        than its own reads the stored table first, so its answer is the store's table
        even when ours is "newer" (a tree booted afresh on another store, say)."""
        with self._lock:
            self._table = ShardTable(stale.version, stale.shards, stale.hosts)
            self._handles = {n: h for n, h in self._handles.items() if n in stale.hosts}

    def forget(self, name: str) -> None:
        """A host died for good: look its name up again next time."""
        with self._lock:
            self._handles.pop(name, None)

    def refresh(self, failed: Any = None) -> None:
        """Read the table again from the host supervisor (a host died for good, or is
        not there: a tree booted again may have other hosts). ``failed``: the host
        handle a call failed on; the table is dropped only while that handle is still
        the one held, so the calls that failed together drop it once, not once each
        (each drop costs a read of the table and a lookup of every host)."""
        with self._lock:
            if failed is not None and not any(h is failed for h in self._handles.values()):
                return  # dropped already since that call was routed
            self._table = None
            self._handles.clear()

    async def route_async(self, conversation_id: str) -> tuple[int, str, Any]:
        """:meth:`route` off the event loop when it has to ask the GCS."""
        table = self._table
        if table is not None:
            name = table.host_for(conversation_id)
            handle = self._handles.get(name)
            if handle is not None:
                return table.version, name, handle
        return await asyncio.to_thread(self.route, conversation_id)
