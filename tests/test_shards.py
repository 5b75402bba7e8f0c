"""The shard table: conversation id -> shard -> host, as pure values (no Ray)."""

from __future__ import annotations

import json
import pickle
from collections import Counter

import pytest

from overstory import ConfigError
from overstory.exceptions import StaleShardTable
from overstory.sharding import HOST_PREFIX, ShardTable, host_name, shard_of


def test_shard_of_is_stable_and_independent_of_the_process() -> None:
    # Fixed values: a change of hash would move every conversation to another host.
    assert shard_of("alice", 1024) == shard_of("alice", 1024)
    assert [shard_of(u, 1024) for u in ("alice", "bob", "élodie", "")] == [
        shard_of("alice", 1024),
        shard_of("bob", 1024),
        shard_of("élodie", 1024),
        shard_of("", 1024),
    ]
    assert (
        shard_of("alice", 1024)
        == int.from_bytes(__import__("hashlib").sha256(b"alice").digest()[:8], "big") % 1024
    )


def test_hosts_share_the_shards_evenly() -> None:
    table = ShardTable.build(4, shards=1024)
    load = Counter(table.host_for(f"user-{i}") for i in range(20_000))
    assert set(load) == {host_name(i) for i in range(4)}
    assert max(load.values()) / min(load.values()) < 1.15
    assert all(name.startswith(HOST_PREFIX) for name in table.hosts)


def test_owns_agrees_with_host_for() -> None:
    table = ShardTable.build(3, shards=64, version=9)
    for i in range(300):
        uid = f"u{i}"
        owner = table.host_for(uid)
        assert table.owns(owner, uid)
        assert not any(table.owns(h, uid) for h in table.hosts if h != owner)


def test_growing_the_table_moves_only_what_it_must_and_keeps_the_shard() -> None:
    small, big = ShardTable.build(2, shards=1024), ShardTable.build(4, shards=1024, version=2)
    ids = [f"user-{i}" for i in range(2000)]
    moved = sum(small.host_for(u) != big.host_for(u) for u in ids)
    assert 0.35 < moved / len(ids) < 0.65  # shard % hosts: half the shards change hosts
    assert all(shard_of(u, 1024) == shard_of(u, 1024) for u in ids)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"version": 1, "shards": 0, "hosts": ("a",)}, "shards must be an int >= 1"),
        ({"version": 1, "shards": 4, "hosts": ()}, "at least one host"),
        ({"version": 1, "shards": 1, "hosts": ("a", "b")}, "2 hosts for 1 shards"),
        ({"version": 1, "shards": 4, "hosts": ("a", "a")}, "duplicate host names"),
    ],
)
def test_bad_tables_are_refused_by_name(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ShardTable(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="number of hosts must be an int >= 1, got 0"):
        ShardTable.build(0)


def test_stale_table_error_carries_the_table_across_pickling() -> None:
    table = ShardTable.build(2, shards=16, version=5)
    err = pickle.loads(pickle.dumps(StaleShardTable(table.version, table.shards, table.hosts)))
    assert ShardTable(err.version, err.shards, err.hosts) == table


def test_tables_round_trip_through_the_store_format_and_bad_ones_are_refused() -> None:
    table = ShardTable.build(3, shards=64, version=4)
    assert ShardTable.from_json(table.to_json()) == table
    grown = table.resized(5)
    assert (grown.version, grown.shards, grown.hosts[:3]) == (5, 64, table.hosts)
    for raw in ("{", '{"version": 1}', '{"version": 1, "shards": 4, "hosts": ["x"]}'):
        with pytest.raises(ConfigError, match="stored shard table"):
            ShardTable.from_json(raw)


def test_a_smaller_table_retires_the_last_hosts_and_their_shards_go_to_the_rest() -> None:
    table = ShardTable.build(4, shards=64, version=2)
    smaller = table.resized(2)
    assert (smaller.version, smaller.hosts) == (3, table.hosts[:2])
    moved = [f"c{i}" for i in range(200) if table.host_for(f"c{i}") in table.hosts[2:]]
    assert moved  # some conversations lived on the retired hosts...
    assert {smaller.host_for(c) for c in moved} <= set(smaller.hosts)  # ...and have a home


def test_the_hosts_follow_membership_only_once_a_change_settles() -> None:
    from overstory.sharding import MembershipDamper

    damper = MembershipDamper(settle_s=30, cooldown_s=120)
    assert damper.observe(2, now=0) is None  # the baseline
    assert damper.observe(3, now=10) is None  # a node joined: not settled yet
    assert damper.observe(3, now=39) is None
    assert damper.observe(3, now=40) == 3  # held for 30 s: resize, once
    assert damper.observe(3, now=41) is None
    # A flapping node: the count never holds for 30 s, nothing moves.
    flaps = [damper.observe(4 if i % 2 else 3, now=200 + 20 * i) for i in range(10)]
    assert flaps == [None] * 10
    # A node left for good, but within the cooldown of the last resize: it waits.
    damper = MembershipDamper(settle_s=5, cooldown_s=120)
    damper.observe(2, now=0)
    assert damper.observe(1, now=1) is None
    assert damper.observe(1, now=6) == 1
    assert damper.observe(2, now=10) is None
    assert damper.observe(2, now=100) is None  # settled, but 94 s after the last resize
    assert damper.observe(2, now=126) == 2
    # A change that reverts before settling is forgotten.
    assert damper.observe(3, now=300) is None
    assert damper.observe(2, now=301) is None
    assert damper.observe(3, now=302) is None  # counts from here again
    assert damper.observe(3, now=306) is None
    assert damper.observe(3, now=307) == 3
    with pytest.raises(ConfigError):
        MembershipDamper(settle_s=-1, cooldown_s=0)


def test_a_table_remembers_the_membership_it_was_sized_for_and_old_tables_still_read() -> None:
    from overstory.sharding import MembershipDamper

    table = ShardTable.build(3, shards=64, members=3)
    assert ShardTable.from_json(table.to_json()) == table
    old = '{"version": 2, "shards": 64, "hosts": ["overstory:host:0"]}'
    assert ShardTable.from_json(old).members is None
    assert ShardTable.from_json(old).to_json() == old  # a stored table compares equal
    for bad in (0, -1, "x", True):
        raw = json.dumps(
            {"version": 1, "shards": 4, "hosts": ["overstory:host:0"]} | {"members": bad}
        )
        with pytest.raises(ConfigError, match="stored shard table"):
            ShardTable.from_json(raw)
    # A supervisor restarted after a node left sees the change against the table's
    # membership (3), not against its own first look (2), and acts on it.
    damper = MembershipDamper(settle_s=2, cooldown_s=0, baseline=table.members)
    assert damper.observe(2, now=0) is None
    assert damper.observe(2, now=2) == 2
