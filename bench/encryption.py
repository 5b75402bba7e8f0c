"""Encryption at rest: what sealing costs a turn's store time (issue 14, target ≤ 5 %).

A turn's store work as a host does it: append the user's message, the model's tool call,
the tool's return and the answer (each durable before the next, as ``run_turn`` writes
them), then load the conversation's history again (an activation). The same turns
against two SQLite files — one without data keys, one with — *turn by turn*: a plain
turn and a sealed turn, then a sealed and a plain one, and so on (the order within each
pair alternates, so neither always runs first, after the other's fsync). Bodies are
~1 KB of text.

Why turn by turn (it was rounds of 300 turns): on a shared machine a burst of other
work lasts tens to hundreds of milliseconds, so it fell on one side's round and moved
that side's median — runs of the same code gave 1.03x to 1.52x. Interleaved, both sides
sample the same moments; nothing is dropped or retried, and the figure is still each
side's p50 over every turn. ``paired_added_us`` is the median of (sealed - plain) over
adjacent pairs, the difference with the shared noise taken out.

Printed: per-turn p50 of each, the ratio and the added microseconds; and sealing plus
opening one body alone (no store), per KB: as message bodies are stored (``enc2``,
bytes) and as text (``enc1``, base64: what vault documents and job texts use).

Run: .venv/bin/python bench/encryption.py [--turns 3000] [--json]
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
from collections.abc import Callable
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


async def one_turn(store: HistoryStore, cid: str) -> float:
    start = time.perf_counter()
    for message in turn(0):
        await store.append(cid, message)
    await store.load(cid)
    return time.perf_counter() - start


def per_kb_us(seal: Callable[[str, str, int], str | bytes], keys: DataKeys, n: int = 5000) -> float:
    """Sealing and opening one ~1 KB body, in µs per KB of body."""
    body = json.dumps({"content": TEXT})
    start = time.perf_counter()
    for i in range(n):
        keys.open(seal(body, "bench:x", i), "bench:x", i)
    return (time.perf_counter() - start) / n / (len(body) / 1024) * 1e6


async def run(turns: int) -> dict[str, Any]:
    directory = tempfile.mkdtemp(prefix="ovs-bench-enc-")
    keys = DataKeys.parse(f"bench:{base64.b64encode(os.urandom(32)).decode()}")
    plain = open_store(f"sqlite:///{directory}/plain.db", data_keys=None)
    sealed = open_store(f"sqlite:///{directory}/sealed.db", data_keys=keys)
    await plain.open()
    await sealed.open()
    for i in range(20):  # warm both
        await one_turn(plain, f"bench:warm-{i}")
        await one_turn(sealed, f"bench:warm-{i}")
    off: list[float] = []
    on: list[float] = []
    for i in range(turns):
        cid = f"bench:u{i}"
        if i % 2 == 0:
            off.append(await one_turn(plain, cid))
            on.append(await one_turn(sealed, cid))
        else:
            on.append(await one_turn(sealed, cid))
            off.append(await one_turn(plain, cid))
    await plain.close()
    await sealed.close()

    off50, on50 = statistics.median(off) * 1e6, statistics.median(on) * 1e6
    return {
        "turns": len(off),
        "plain_turn_p50_us": round(off50, 1),
        "sealed_turn_p50_us": round(on50, 1),
        "ratio": round(on50 / off50, 3),
        "added_us": round(on50 - off50, 1),
        "paired_added_us": round(
            statistics.median(b - a for a, b in zip(off, on, strict=True)) * 1e6, 1
        ),
        "seal_and_open_per_kb_us": round(per_kb_us(keys.seal_bytes, keys), 2),
        "seal_and_open_text_per_kb_us": round(per_kb_us(keys.seal, keys), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=3000, help="turns on each side")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(run(args.turns))
    if args.json:
        print(json.dumps(result))
        return
    print("Encryption at rest: a turn's store time (4 appends of ~1 KB bodies + a history load)")
    print(
        f"  {result['turns']} turns each: in the clear p50 {result['plain_turn_p50_us']} µs, "
        f"sealed p50 {result['sealed_turn_p50_us']} µs: x{result['ratio']} "
        f"(+{result['added_us']} µs, +{result['paired_added_us']} µs by pairs; target ≤ 1.05)"
    )
    print(
        f"  sealing and opening one body: {result['seal_and_open_per_kb_us']} µs per KB "
        f"(as text, base64: {result['seal_and_open_text_per_kb_us']} µs)"
    )


if __name__ == "__main__":
    main()
