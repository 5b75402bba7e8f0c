"""The hosted tree follows the cluster's membership by itself: a node joins and the
hosts grow, it leaves and they shrink, while users keep talking; every acknowledged turn
is stored exactly once (a Ray cluster of its own, in a subprocess)."""

from __future__ import annotations

import pytest
from conftest import FAST_FAILURE_DETECTION, run_check

pytestmark = pytest.mark.slow


def test_hosts_follow_nodes_joining_and_leaving_and_no_turn_is_lost() -> None:
    result = run_check("membership_check.py", env=FAST_FAILURE_DETECTION)
    print(result)  # the figures the docs quote
    assert result["hosts_seen"] == [1, 2, 1]
    assert result["acknowledged"] > 100
    assert result["lost"] == 0
    assert result["duplicated"] == 0
    assert all(": after the moves" in text for text in result["after"].values())
