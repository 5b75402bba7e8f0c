"""Run as a script by test_multinode.py: a 3-node Ray cluster on this machine.

Conversations (dedicated actors, or the hosts that hold them) need the custom resource
``conversations`` that only the two worker nodes have. The node hosting a conversation is removed; the conversation must answer from the
other node with its history intact. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

import ray
from ray.cluster_utils import Cluster

import overstory
from overstory.runtime.demo import demo_agent


def main(placement: str) -> None:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    workers = [cluster.add_node(num_cpus=1, resources={"conversations": 10}) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    store = f"sqlite:///{tempfile.mkdtemp(prefix='ovs-multi-')}/history.db"
    rt = overstory.connect(
        demo_agent(placement=placement),  # type: ignore[arg-type]
        store=store,
        namespace="multinode",
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
    result = {
        "moved": after["node_id"] != before["node_id"],
        "placement": after.get("placement", "dedicated"),
        "reply": reply.text,
        "recovery_s": round(time.monotonic() - started, 2),
        "history": [m.content for m in conv.history() if m.kind == "user"],
    }
    rt.close()
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "dedicated"))
