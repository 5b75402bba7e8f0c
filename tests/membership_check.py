"""Run as a script by test_membership.py: a Ray cluster on this machine whose nodes come
and go while users keep talking. The hosted tree follows the membership by itself
(``hosted.auto_rebalance``): a node joins, the hosts grow; it leaves, they shrink. Prints
one JSON line: the host counts seen, how long each move took, and every turn accounted
for (acknowledged, stored, lost, duplicated)."""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any

import ray
from ray.cluster_utils import Cluster

import overstory
from overstory.cli.demo import demo_agent
from overstory.supervisors.tree import HOSTS

NAMESPACE = "membership"


def hosts() -> list[str]:
    supervisor = ray.get_actor(HOSTS, namespace=NAMESPACE)
    status: dict[str, Any] = ray.get(supervisor.status.remote(), timeout=30)
    table = status["meta"].get("shard_table")  # None: a restarted supervisor not ready yet
    return [] if table is None else list(table.hosts)


def _hosts_or_none() -> list[str] | None:
    try:  # the host supervisor may be restarting (its node went)
        return hosts()
    except (ray.exceptions.RayError, ValueError):
        return None


def until(count: int, timeout_s: float) -> float:
    started = time.monotonic()
    while len(_hosts_or_none() or ()) != count:
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"hosts stayed {hosts()}, not {count}")
        time.sleep(0.25)
    return round(time.monotonic() - started, 2)


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    store = f"sqlite:///{tempfile.mkdtemp(prefix='ovs-members-')}/history.db"
    rt = overstory.connect(
        demo_agent(),
        store=store,
        namespace=NAMESPACE,
        hosted={
            "hosts_per_node": 1,
            "rebalance_poll_s": 0.5,
            "rebalance_settle_s": 2.0,
            "rebalance_cooldown_s": 0.0,
            "retire_grace_s": 10.0,
        },
    )
    users = [f"member-{i}" for i in range(12)]
    acked: dict[str, list[str]] = {u: [] for u in users}
    errors: list[str] = []
    stop = threading.Event()

    def talk(user: str) -> None:
        conv = rt.conversation(user)
        n = 0
        while not stop.is_set():
            text = f"{user} turn {n}"
            try:
                conv.send(text)
                acked[user].append(text)
            except Exception as exc:  # counted: an unacknowledged turn is not a loss
                errors.append(f"{type(exc).__name__}: {str(exc)[:120]}")
            n += 1
            time.sleep(0.05)

    seen = [len(hosts())]
    threads = [threading.Thread(target=talk, args=(u,), daemon=True) for u in users]
    for t in threads:
        t.start()
    time.sleep(2)
    worker = cluster.add_node(num_cpus=1)
    grow_s = until(2, 90)
    seen.append(len(hosts()))
    time.sleep(2)
    cluster.remove_node(worker)
    shrink_s = until(1, 120)
    seen.append(len(hosts()))
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    after = {u: rt.conversation(u).send("after the moves").text for u in users[:3]}
    lost = duplicated = stored_total = 0
    for user in users:
        stored = [m.content for m in rt.stored_history(user) if m.kind == "user"]
        counts = Counter(stored)
        stored_total += len(stored)
        lost += sum(1 for text in acked[user] if counts[text] == 0)
        duplicated += sum(n - 1 for n in counts.values() if n > 1)
    print(
        json.dumps(
            {
                "hosts_seen": seen,
                "grow_s": grow_s,
                "shrink_s": shrink_s,
                "acknowledged": sum(len(a) for a in acked.values()),
                "stored": stored_total,
                "lost": lost,
                "duplicated": duplicated,
                "errors": len(errors),
                "error_samples": errors[:3],
                "after": after,
            }
        )
    )
    rt.close()
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
