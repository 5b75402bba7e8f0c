"""Encryption at rest: what sealing costs a turn's store time (issue 14, target ≤ 5 %).

A turn's store work as a host does it: append the user's message, the model's tool call,
the tool's return and the answer (each durable before the next, as ``run_turn`` writes
them), then load the conversation's history again (an activation). The same turns, in
alternating rounds, against two SQLite files — one without data keys, one with —
so both see the same disk and the same machine noise. Bodies are ~1 KB of text.

Printed: per-turn p50 of each, the ratio and the added microseconds; and sealing plus
opening one body alone (no store), per KB.

Run: .venv/bin/python bench/encryption.py [--turns 300] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import tempfile
import time
from typing import Any

from overstory.messages import AssistantMessage, Message, ToolCall, ToolReturn, Usage, UserMessage
from overstory.store import HistoryStore, open_store
from overstory.store.crypto import DataKeys

TEXT = ("The quick brown fox jumps over the lazy dog. " * 23)[:1000]


def turn(seq: int) -> list[Message]:
    call = ToolCall(id=f"c{seq}", name="lookup", arguments={"q": TEXT[:200]})
    return [
        UserMessage(content=TEXT, seq=seq, turn_id=f"t{seq}"),
        AssistantMessage(content="", tool_calls=(call,), seq=seq + 1, turn_id=f"t{seq}"),
        ToolReturn(
            tool_call_id=f"c{seq}", tool_name="lookup", content=TEXT, seq=seq + 2, turn_id=f"t{seq}"
        ),
        AssistantMessage(content=TEXT, usage=Usage(10, 20), seq=seq + 3, turn_id=f"t{seq}"),
    ]


async def timed_turns(store: HistoryStore, round_: int, turns: int) -> list[float]:
    samples = []
    for i in range(turns):
        cid = f"bench:r{round_}-u{i}"
        start = time.perf_counter()
        for message in turn(0):
            await store.append(cid, message)
        await store.load(cid)
        samples.append(time.perf_counter() - start)
    return samples


async def run(turns: int, rounds: int) -> dict[str, Any]:
    directory = tempfile.mkdtemp(prefix="ovs-bench-enc-")
    keys = DataKeys.parse(f"bench:{base64.b64encode(os.urandom(32)).decode()}")
    plain = open_store(f"sqlite:///{directory}/plain.db", data_keys=None)
    sealed = open_store(f"sqlite:///{directory}/sealed.db", data_keys=keys)
    await plain.open()
    await sealed.open()
    off: list[float] = []
    on: list[float] = []
    await timed_turns(plain, -1, 20)  # warm both
    await timed_turns(sealed, -1, 20)
    for r in range(rounds):
        first, second = (plain, sealed) if r % 2 == 0 else (sealed, plain)
        a = await timed_turns(first, r, turns)
        b = await timed_turns(second, r, turns)
        (off, on)[first is sealed].extend(a)
        (off, on)[second is sealed].extend(b)
    await plain.close()
    await sealed.close()

    body = json.dumps({"content": TEXT})
    n = 5000
    start = time.perf_counter()
    for i in range(n):
        keys.open(keys.seal(body, "bench:x", i), "bench:x", i)
    per_kb_us = (time.perf_counter() - start) / n / (len(body) / 1024) * 1e6

    off50, on50 = statistics.median(off) * 1e6, statistics.median(on) * 1e6
    return {
        "turns": len(off),
        "plain_turn_p50_us": round(off50, 1),
        "sealed_turn_p50_us": round(on50, 1),
        "ratio": round(on50 / off50, 3),
        "added_us": round(on50 - off50, 1),
        "seal_and_open_per_kb_us": round(per_kb_us, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(run(args.turns, args.rounds))
    if args.json:
        print(json.dumps(result))
        return
    print("Encryption at rest: a turn's store time (4 appends of ~1 KB bodies + a history load)")
    print(
        f"  {result['turns']} turns each: in the clear p50 {result['plain_turn_p50_us']} µs, "
        f"sealed p50 {result['sealed_turn_p50_us']} µs: x{result['ratio']} "
        f"(+{result['added_us']} µs; target ≤ 1.05)"
    )
    print(f"  sealing and opening one body: {result['seal_and_open_per_kb_us']} µs per KB")


if __name__ == "__main__":
    main()
