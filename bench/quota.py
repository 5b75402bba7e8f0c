"""Quotas: what a user's quota costs a turn (issue 14).

The turn as a host runs it (``run_turn``: the user's message stored, the scripted offline
model answering at once, the answer stored), in one process on SQLite, for users without
a quota and for users with one (tokens per day, turns per minute and at once): the
admission before the turn, the commit of the call's usage and the turn's finish — three
compare-and-set writes of the user's ledger in the store. Alternating rounds, the same
store, so both see the same disk and noise.

Printed: per-turn p50 of each, the ratio and the added milliseconds.

Run: .venv/bin/python bench/quota.py [--turns 300] [--rounds 4] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from typing import Any

from overstory import Agent, OfflineModel
from overstory.conversation.turn import run_turn
from overstory.messages import Message
from overstory.quota import Quota, QuotaBook, call_texts, finish
from overstory.store import HistoryStore, open_store


async def turns(
    store: HistoryStore, book: QuotaBook | None, agent: Agent, tag: str, n: int
) -> list[float]:
    samples = []
    for i in range(n):
        cid, user = f"bench:{tag}-{i}", f"{tag}-{i % 10}"  # ten users share ledgers
        history: list[Message] = []
        start = time.perf_counter()
        ticket = None
        if book is not None:
            texts = [*call_texts(agent.instructions, history), "hello there"]
            ticket = await book.admit(user, cid, "t1", texts, True)
        try:
            await run_turn(agent, store, cid, history, "t1", "hello there", ticket=ticket)
        finally:
            if ticket is not None:
                await finish(ticket)
        samples.append(time.perf_counter() - start)
    return samples


async def run(n: int, rounds: int) -> dict[str, Any]:
    directory = tempfile.mkdtemp(prefix="ovs-bench-quota-")
    store = open_store(f"sqlite:///{directory}/quota.db", data_keys=None)
    await store.open()
    agent = Agent("bench", model=OfflineModel("bench"))
    quota = Quota(tokens_per_day=10**12, requests_per_minute=10**9, concurrent_turns=10**6)
    book = QuotaBook(store, "bench", quota, turn_timeout_s=300, output_tokens=1024)
    await turns(store, None, agent, "warm-a", 20)
    await turns(store, book, agent, "warm-b", 20)
    off: list[float] = []
    on: list[float] = []
    for r in range(rounds):
        if r % 2 == 0:
            off += await turns(store, None, agent, f"off{r}", n)
            on += await turns(store, book, agent, f"on{r}", n)
        else:
            on += await turns(store, book, agent, f"on{r}", n)
            off += await turns(store, None, agent, f"off{r}", n)
    await store.close()
    off50, on50 = statistics.median(off) * 1000, statistics.median(on) * 1000
    return {
        "turns": len(off),
        "without_quota_p50_ms": round(off50, 3),
        "with_quota_p50_ms": round(on50, 3),
        "ratio": round(on50 / off50, 2),
        "added_ms": round(on50 - off50, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(run(args.turns, args.rounds))
    if args.json:
        print(json.dumps(result))
        return
    print("Quotas: a turn (offline model, SQLite) for users without and with a quota")
    print(
        f"  {result['turns']} turns each: without p50 {result['without_quota_p50_ms']} ms, "
        f"with p50 {result['with_quota_p50_ms']} ms: x{result['ratio']} "
        f"(+{result['added_ms']} ms: three ledger writes)"
    )


if __name__ == "__main__":
    main()
