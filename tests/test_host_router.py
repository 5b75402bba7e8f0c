"""What a client caches to reach conversations, no Ray: the shard table and host handles
(HostRouter: the calls that failed on one host's handle drop the cache once, and one
reader refills it for all of them) and what the tree serves (an agent known from it is
named without a call)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from overstory import Config
from overstory.exceptions import UnknownAgent
from overstory.registry import Registry
from overstory.registry.hosts import HostRouter
from overstory.sharding import ShardTable

TABLE = ShardTable.build(2, shards=16)


class Counted(HostRouter):
    """A router whose reads of the table and lookups of hosts are counted, not asked of
    Ray; each read takes a while, as a call to the host supervisor does."""

    def __init__(self) -> None:
        super().__init__("ns", timeout_s=1.0)
        self.reads = 0
        self.lookups = 0
        self._count = threading.Lock()

    def _read_table(self) -> ShardTable:
        with self._count:
            self.reads += 1
        time.sleep(0.05)
        return TABLE

    def _lookup(self, name: str) -> Any:
        with self._count:
            self.lookups += 1
        return object()  # a fresh handle object each lookup, as ray.get_actor gives


def test_calls_that_failed_on_one_handle_drop_the_cache_once_and_one_read_refills_it() -> None:
    router = Counted()
    _, _, handle = router.route("conv-1")
    assert router.reads == 1
    # 100 calls routed to that handle fail together (the host died for good).
    for _ in range(100):
        router.refresh(handle)
    assert router._table is None  # dropped by the first
    with ThreadPoolExecutor(16) as pool:  # then they are all routed again at once
        routes = list(pool.map(router.route, ["conv-1"] * 100))
    assert router.reads == 2  # one read for all of them, not one each
    assert len({id(h) for _, _, h in routes}) == 1
    # A call that failed on the old handle after the cache was refilled drops nothing.
    router.refresh(handle)
    assert router._table is TABLE
    # One that failed on the current handle does; so does a refresh naming none.
    router.refresh(routes[0][2])
    assert router._table is None
    router.route("conv-1")
    router.refresh()
    assert router._table is None


def test_the_agent_is_named_without_a_call_once_what_the_tree_serves_is_cached() -> None:
    registry = Registry(
        config=Config.from_mapping({"store": "sqlite:///x.db"}),
        app=None,
        placement="hosted",
        job_turns=None,  # type: ignore[arg-type]
    )
    asked: list[bool] = []

    def ask_app(whole: bool) -> dict[str, object]:
        asked.append(whole)
        return {"default": "support", "agents": {"support": ["1"], "sales": ["1"]}}

    registry._ask_app = ask_app  # type: ignore[method-assign]
    assert registry.known_agent(None) is None  # nothing cached: the caller must ask
    assert registry.agent_name(None) == "support"
    assert asked == [False]
    assert registry.known_agent(None) == "support"
    assert registry.known_agent("sales") == "sales"
    assert registry.known_agent("billing") is None  # not cached as served: ask again
    with pytest.raises(UnknownAgent, match="billing"):
        registry.agent_name("billing")
    assert asked == [False, False]  # asked once more, in case of a redeploy
