"""The hosted placement's registry: the host supervisor's spec and the client's router.

The driver that boots the tree decides how many hosts there are (``hosts_per_node``, or
each alive node's CPU count) and builds the :class:`~.shards.ShardTable`; the host
supervisor (a :class:`~overstory.supervisors.tree.Supervisor`) keeps it and starts one
:class:`~overstory.actors.host.HostActor` per entry as a permanent child. Clients read
the table once, cache it with the host handles, and send straight to the host: the
supervisor is not on the path of a send.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import ray

from .._ray import alive_nodes
from ..actors.host import HostActor
from ..agent import Agent
from ..exceptions import ConversationUnavailable, StaleShardTable
from ..runtime.config import Config
from ..supervisors import ChildSpec, SupervisorSpec
from ..supervisors.named import SUPERVISED
from ..supervisors.tree import HOSTS, ROOT, NamedChild, Supervisor
from .shards import ShardTable

__all__ = ["HOST_OPTIONS", "HostRouter", "count_hosts", "hosts_child"]

_RemoteHost: Any = ray.remote(HostActor)
_RemoteSupervisor: Any = ray.remote(Supervisor)

#: Ray options of a host: a supervised actor that serves many calls at once (one per
#: turn in flight, plus its watchers), spread over the nodes.
HOST_OPTIONS: dict[str, Any] = {
    **SUPERVISED,
    "max_concurrency": 100_000,
    "scheduling_strategy": "SPREAD",
}


def count_hosts(config: Config) -> int:
    """Hosts for the cluster as it is now: per alive node that can hold one (it has the
    ``actor_resources``), ``hosts_per_node`` or its CPU count."""
    total = 0
    for node in alive_nodes():
        resources = node.get("Resources", {})
        if any(resources.get(k, 0) < v for k, v in config.actor_resources.items()):
            continue
        cpus = int(resources.get("CPU", 1) or 1)
        total += config.hosts_per_node or max(1, cpus)
    return max(1, min(total, config.shards))


def hosts_child(namespace: str, agent: Agent, config: Config) -> ChildSpec:
    """The root's ``hosts`` child: a supervisor of one permanent child per host."""
    table = ShardTable.build(count_hosts(config), shards=config.shards, version=_version())
    options = dict(HOST_OPTIONS)
    if config.actor_resources:
        options["resources"] = dict(config.actor_resources)
    hosts = tuple(
        ChildSpec(
            name,
            start=NamedChild(_RemoteHost, name, (namespace, name, table, agent, config), options),
            restart="permanent",
        )
        for name in table.hosts
    )
    spec = SupervisorSpec("one_for_one", config.restart_intensity, config.restart_period_s, hosts)
    start = NamedChild(
        _RemoteSupervisor,
        HOSTS,
        (namespace, spec, (ROOT, "hosts"), {"shard_table": table, "placement": "hosted"}),
        SUPERVISED,
    )
    return ChildSpec("hosts", start=start, restart="permanent")


def _version() -> int:
    """A table version that a tree booted later always beats (milliseconds since 1970)."""
    return int(time.time() * 1000)


class HostRouter:
    """A client's cache of the shard table and of host handles (thread-safe)."""

    def __init__(self, namespace: str, timeout_s: float) -> None:
        self.namespace = namespace
        self.timeout_s = timeout_s
        self._table: ShardTable | None = None
        self._handles: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def table(self) -> ShardTable:
        if self._table is None:
            self._table = self._read_table()
        return self._table

    def _read_table(self) -> ShardTable:
        try:
            supervisor = ray.get_actor(HOSTS, namespace=self.namespace)
            status: Any = ray.get(supervisor.status.remote(), timeout=self.timeout_s)
        except Exception as exc:
            raise ConversationUnavailable(
                f"the host supervisor of namespace {self.namespace!r} does not answer: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        table: ShardTable = status["meta"]["shard_table"]
        return table

    def route(self, conversation_id: str) -> tuple[int, str, Any]:
        """``(table version, host name, host handle)`` for ``conversation_id``."""
        table = self.table
        name = table.host_for(conversation_id)
        handle = self._handles.get(name)
        if handle is None:
            with self._lock:
                handle = self._handles.get(name)
                if handle is None:
                    handle = self._lookup(name)
                    self._handles[name] = handle
        return table.version, name, handle

    def _lookup(self, name: str) -> Any:
        try:
            return ray.get_actor(name, namespace=self.namespace)
        except ValueError:
            # Between a host's death for good and its supervisor starting it again.
            raise ConversationUnavailable(
                f"host {name!r} is not running in namespace {self.namespace!r}"
            ) from None

    def handles(self) -> dict[str, Any]:
        """Every host's handle, by name (looked up where not cached)."""
        return {name: self.route_host(name) for name in self.table.hosts}

    def route_host(self, name: str) -> Any:
        handle = self._handles.get(name)
        if handle is None:
            handle = self._handles[name] = self._lookup(name)
        return handle

    def update(self, stale: StaleShardTable) -> None:
        """A host answered with a newer table: use it (handles stay valid by name)."""
        with self._lock:
            if self._table is None or stale.version >= self._table.version:
                self._table = ShardTable(stale.version, stale.shards, stale.hosts)

    def forget(self, name: str) -> None:
        """A host died for good: look its name up again next time."""
        with self._lock:
            self._handles.pop(name, None)

    def refresh(self) -> None:
        """Read the table again from the host supervisor (a host died for good, or is
        not there: a tree booted again may have other hosts)."""
        with self._lock:
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
