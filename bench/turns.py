"""Plain turns under load: overstory's hosted turns against bare async actors doing the
same durable writes, measured in one run on this machine.

ours   ``--users`` users, each sending turns back to back (``send_async`` from one
       asyncio driver) to a hosted conversation of its own: the offline model (no
       vendor), every turn storing the user's message and the answer, each a fenced,
       fsynced append (SQLite, ``synchronous=FULL``), in as many hosts as the node has
       cores.
floor  the same number of bare async Ray actors (no overstory code but its SQLite store),
       the users spread over them by a hash of their id, each turn two fenced appends
       through the same store (group commit included) and a reply of the echoed text.

Both run ``--seconds`` at a time, alternating, ``--rounds`` times each; printed: turns
per second of each, the ratio ours / floor (target >= 0.9), and errors.

Run: .venv/bin/python bench/turns.py [--users 200] [--seconds 8] [--rounds 2] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
import zlib
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray

import overstory
from overstory import Agent
from overstory._ray import quiet_worker_notices
from overstory.messages import AssistantMessage, UserMessage
from overstory.providers import OfflineModel
from overstory.store import open_store


@ray.remote(num_cpus=0)
class BareHost:
    """A bare async actor storing turns as a host does: two fenced appends per turn."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.store: Any = None
        self.seq: dict[str, int] = {}
        self.epoch: dict[str, int] = {}

    async def send(self, cid: str, turn_id: str, text: str) -> str:
        if self.store is None:
            store = open_store(self.url)
            await store.open()
            self.store = store
        if cid not in self.epoch:
            self.epoch[cid] = await self.store.acquire(cid)
            self.seq[cid] = 0
        seq, epoch = self.seq[cid], self.epoch[cid]
        await self.store.append(
            cid, UserMessage(content=text, seq=seq, turn_id=turn_id), epoch=epoch
        )
        reply = "echo: " + text
        await self.store.append(
            cid, AssistantMessage(content=reply, seq=seq + 1, turn_id=turn_id), epoch=epoch
        )
        self.seq[cid] = seq + 2
        return reply


async def run_for(send: Any, users: list[str], seconds: float) -> tuple[int, int, float]:
    """Every user sending back to back for ``seconds``: (turns, errors, wall)."""
    done = errors = 0
    stop = time.monotonic() + seconds

    async def user(u: str) -> None:
        nonlocal done, errors
        i = 0
        while time.monotonic() < stop:
            try:
                await send(u, i)
                done += 1
            except Exception:
                errors += 1
            i += 1

    start = time.monotonic()
    await asyncio.gather(*(user(u) for u in users))
    return done, errors, time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-turns-")
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    hosts = max(1, int(ray.cluster_resources().get("CPU", 1)))
    agent = Agent("turns-bench", model=OfflineModel("offline:echo"), placement="hosted")
    rt = overstory.connect(
        agent, store=f"sqlite:///{tmp}/ours.db", namespace=f"bench-turns-{uuid.uuid4().hex[:6]}"
    )
    bare = [BareHost.remote(f"sqlite:///{tmp}/floor.db") for _ in range(hosts)]
    users = [f"u{i}" for i in range(args.users)]
    report: dict[str, Any] = {"users": args.users, "hosts": hosts, "rounds": []}

    async def measure() -> None:
        convs = {u: await rt.conversation_async(u) for u in users}

        async def ours(u: str, i: int) -> None:
            await convs[u].send_async(f"message {i}")

        async def floor(u: str, i: int) -> None:
            actor = bare[zlib.crc32(u.encode()) % len(bare)]
            await actor.send.remote(f"turns-bench:{u}", f"t{i}", f"message {i}")

        await run_for(ours, users, 2.0)  # warm: every conversation active, every actor up
        await run_for(floor, users, 2.0)
        for r in range(args.rounds):
            pair = [("ours", ours), ("floor", floor)]
            for name, send in pair if r % 2 == 0 else pair[::-1]:
                done, errors, wall = await run_for(send, users, args.seconds)
                report["rounds"].append(
                    {"who": name, "turns": done, "errors": errors, "per_s": done / wall}
                )

    with quiet_worker_notices():
        asyncio.run(measure())
    rt.close()
    ray.shutdown()
    per = {
        who: statistics.mean(r["per_s"] for r in report["rounds"] if r["who"] == who)
        for who in ("ours", "floor")
    }
    report["ours_per_s"] = round(per["ours"], 1)
    report["floor_per_s"] = round(per["floor"], 1)
    report["ratio"] = round(per["ours"] / per["floor"], 3)
    report["errors"] = sum(r["errors"] for r in report["rounds"])
    if args.json:
        print(json.dumps(report))
        return
    print(f"plain turns under load: {args.users} users back to back, {hosts} hosts / actors")
    for r in report["rounds"]:
        print(
            f"  {r['who']:5}  {r['per_s']:8.1f} turns/s  ({r['turns']} turns, {r['errors']} errors)"
        )
    print(
        f"  ours {report['ours_per_s']} turns/s, floor {report['floor_per_s']} turns/s: "
        f"x{report['ratio']} (target >= 0.9), {report['errors']} errors"
    )


if __name__ == "__main__":
    main()
