"""Conversation id -> shard -> host: the hosted placement's routing, as pure values.

A conversation id hashes to one of a fixed number of shards (sha256, so every process
and every Python agrees); a small, versioned :class:`ShardTable` maps shards to host
actors. Clients cache the table and send straight to the host; a host checks that a
request was routed with the table it serves (:meth:`ShardTable.owns`) and answers a
stale one with :class:`~overstory.exceptions.StaleShardTable` carrying the current
table, so a client never needs a round trip to a supervisor per conversation.

The shard count is fixed for the life of a namespace (it is part of every id's
address); the number of hosts is not: a table with more hosts reassigns shards
(``shard % len(hosts)``), and the moved conversations re-activate from the store on
their new host. Their old entities are fenced by epoch (see
:meth:`overstory.store.HistoryStore.acquire`) and never write again.

The table and where it is stored (:func:`table_key`, :func:`stored_table`) sit below the
actors: the host checks its routing against the table, the registry writes and reads
it, and neither imports the other for it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from .exceptions import ConfigError
from .store import HistoryStore
from .store.settings import SHARD_TABLE

__all__ = [
    "DEFAULT_SHARDS",
    "HOST_PREFIX",
    "MembershipDamper",
    "ShardTable",
    "host_name",
    "shard_of",
    "stored_table",
    "table_key",
]

#: Shards per namespace: many more than hosts, so a new host takes a fair share.
DEFAULT_SHARDS = 1024
HOST_PREFIX = "overstory:host:"


def host_name(index: int) -> str:
    """The Ray actor name of host ``index`` (as the Ray dashboard shows it)."""
    return f"{HOST_PREFIX}{index}"


def shard_of(conversation_id: str, shards: int) -> int:
    """The shard of ``conversation_id``: stable across processes, machines and restarts."""
    digest = hashlib.sha256(conversation_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % shards


@dataclass(frozen=True, slots=True)
class ShardTable:
    """Which host serves which shard; ``version`` grows whenever the hosts change."""

    version: int
    shards: int
    hosts: tuple[str, ...]
    #: The host count the alive nodes held when this table was written (what automatic
    #: rebalancing compares the membership with, across supervisor restarts); None in a
    #: table written before it was kept.
    members: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.shards, bool) or not isinstance(self.shards, int) or self.shards < 1:
            raise ConfigError(f"shards must be an int >= 1, got {self.shards!r}")
        if not self.hosts:
            raise ConfigError("a shard table needs at least one host")
        if len(self.hosts) > self.shards:
            raise ConfigError(
                f"{len(self.hosts)} hosts for {self.shards} shards: some hosts would serve none"
            )
        if len(set(self.hosts)) != len(self.hosts):
            raise ConfigError(f"duplicate host names in shard table: {self.hosts!r}")

    @classmethod
    def build(
        cls,
        hosts: int,
        *,
        shards: int = DEFAULT_SHARDS,
        version: int = 1,
        members: int | None = None,
    ) -> ShardTable:
        """A table over hosts ``0 .. hosts-1``, named by :func:`host_name`."""
        if isinstance(hosts, bool) or not isinstance(hosts, int) or hosts < 1:
            raise ConfigError(f"the number of hosts must be an int >= 1, got {hosts!r}")
        return cls(version, shards, tuple(host_name(i) for i in range(hosts)), members)

    def resized(self, hosts: int, *, members: int | None = None) -> ShardTable:
        """This table with ``hosts`` hosts, more or fewer (the first ones keep their
        names; a smaller table retires the last ones), one version later. Shards move to
        ``shard % hosts``; their state stays in the store."""
        return ShardTable.build(
            hosts, shards=self.shards, version=self.version + 1, members=members
        )

    def to_json(self) -> str:
        data: dict[str, object] = {"version": self.version, "shards": self.shards}
        data["hosts"] = self.hosts
        if self.members is not None:
            data["members"] = self.members
        return json.dumps(data)

    @classmethod
    def from_json(cls, raw: str) -> ShardTable:
        """A table read back from the store, validated like any outside input."""
        try:
            data = json.loads(raw)
            members = data.get("members")
            if members is not None and (isinstance(members, bool) or int(members) < 1):
                raise ValueError(f"members must be an int >= 1, got {members!r}")
            table = cls(
                int(data["version"]),
                int(data["shards"]),
                tuple(data["hosts"]),
                None if members is None else int(members),
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ConfigError(f"stored shard table is not valid: {raw[:200]!r} ({exc})") from exc
        if not all(isinstance(h, str) and h.startswith(HOST_PREFIX) for h in table.hosts):
            raise ConfigError(f"stored shard table names hosts that are not hosts: {table.hosts!r}")
        return table

    def host_of_shard(self, shard: int) -> str:
        return self.hosts[shard % len(self.hosts)]

    def host_for(self, conversation_id: str) -> str:
        """The host that serves ``conversation_id`` under this table."""
        return self.host_of_shard(shard_of(conversation_id, self.shards))

    def owns(self, host: str, conversation_id: str) -> bool:
        """Whether ``host`` serves ``conversation_id`` under this table."""
        return self.host_for(conversation_id) == host


class MembershipDamper:
    """When the hosts should follow the cluster's membership, with hysteresis.

    :meth:`observe` is given the host count the cluster holds now (from the alive
    nodes) at each look. The baseline is what the table was sized for (or the first
    look). A different count is acted on
    only once it has held for ``settle_s`` (a node that flaps never settles, so nothing
    moves), and never sooner than ``cooldown_s`` after the last resize; then
    :meth:`observe` returns it, once. A count that goes back to the settled one before
    it settles is forgotten. Manual resizes are not undone: only a change of membership
    moves the hosts.
    """

    def __init__(self, settle_s: float, cooldown_s: float, baseline: int | None = None) -> None:
        if settle_s < 0 or cooldown_s < 0:
            raise ConfigError("settle_s and cooldown_s must be >= 0")
        self.settle_s, self.cooldown_s = settle_s, cooldown_s
        #: The count the hosts follow now: ``baseline`` (what the stored table was sized
        #: for, so a change that happened while no supervisor looked is still acted on),
        #: else the first look.
        self.settled: int | None = baseline
        self.pending: int | None = None
        self._since = 0.0
        self._resized_at = float("-inf")

    def observe(self, hosts: int, now: float) -> int | None:
        """The count to resize to now, or None."""
        if self.settled is None:
            self.settled = hosts
        if hosts == self.settled:
            self.pending = None
            return None
        if hosts != self.pending:
            self.pending, self._since = hosts, now
        if now - self._since < self.settle_s or now - self._resized_at < self.cooldown_s:
            return None
        self.settled, self.pending, self._resized_at = hosts, None, now
        return hosts


def table_key(namespace: str) -> str:
    """Where a namespace's shard table is kept in the store."""
    return SHARD_TABLE.key(namespace)


async def stored_table(store: HistoryStore, namespace: str) -> ShardTable | None:
    """The namespace's stored shard table (None: no host supervisor has written one)."""
    raw = await store.get_setting(table_key(namespace))
    return None if raw is None else ShardTable.from_json(raw)
