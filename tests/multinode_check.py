"""Run as a script by test_multinode.py: a 3-node Ray cluster on this machine, booted once
for both placements.

Conversations (dedicated actors, or the hosts that hold them) need the custom resource
``conversations`` that only the worker nodes have. For each placement in turn (a tree of
its own), the node hosting a conversation is removed and a fresh worker added in its place;
the conversation must answer from another node with its history intact. Prints one JSON
line: a result per placement.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from typing import Any

import ray
from ray.cluster_utils import Cluster

import overstory
from overstory.runtime.demo import demo_agent

PLACEMENTS = ("hosted", "dedicated")


def survive(cluster: Cluster, workers: list[Any], placement: str) -> dict[str, Any]:
    """Remove the node serving a ``placement`` conversation (from ``workers``, replaced
    there by a new one); what the conversation did after."""
    store = f"sqlite:///{tempfile.mkdtemp(prefix='ovs-multi-')}/history.db"
    rt = overstory.connect(
        demo_agent(placement=placement),  # type: ignore[arg-type]
        store=store,
        namespace=f"multinode-{placement}",
        actor_resources={"conversations": 1},
    )
    conv = rt.conversation("nina")
    conv.send("before the node goes")
    before = conv.info()
    victim = next(w for w in workers if w.node_id == before["node_id"])
    started = time.monotonic()
    cluster.remove_node(victim)
    reply = conv.send("after the node went")
    after = conv.info()
    workers.remove(victim)
    workers.append(cluster.add_node(num_cpus=1, resources={"conversations": 10}))
    cluster.wait_for_nodes()
    result = {
        "moved": after["node_id"] != before["node_id"],
        "placement": after.get("placement", "dedicated"),
        "reply": reply.text,
        "recovery_s": round(time.monotonic() - started, 2),
        "history": [m.content for m in conv.history() if m.kind == "user"],
    }
    rt.close()
    return result


def main(placements: list[str]) -> None:
    unknown = sorted(set(placements) - set(PLACEMENTS))
    if unknown:
        raise SystemExit(f"unknown placement(s) {unknown}; expected some of {PLACEMENTS}")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    workers = [cluster.add_node(num_cpus=1, resources={"conversations": 10}) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    results = {placement: survive(cluster, workers, placement) for placement in placements}
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:] or list(PLACEMENTS))
