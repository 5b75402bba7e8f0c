"""Long conversations (L1-L4): what a turn costs as a conversation grows.

Hosted placement, one host, SQLite, the offline model with a context window
(``offline:long@WINDOW``, tokens). Conversations of 10, 1,000, 10,000 and 100,000
stored messages are seeded straight into the store (whole turns: a ~120-character user
message and its answer), then, for each:

L1 warm send   median of ``--sends`` sends to the live conversation
L2 cold send   the conversation passivated, then one send: activation (reading the
               history, or its tail) plus the turn, median of ``--colds``;
               ``activation`` is cold minus warm
L3 memory      the host's USS growth when that conversation activated, and the
               messages it holds in memory (``messages_held``; code that predates the
               tail holds them all)
L4 prompt      characters the model was sent on the last call (the offline model counts
               input tokens as characters / 4)

Ratios: each size against the 10-message conversation of the same run. Targets (issue
23): warm send of 100,000 <= 1.2x, cold activation <= 2x, memory independent of length
(+-20 %), prompt bounded by the window. The same script runs against an older checkout
(``PYTHONPATH=/path/to/old bench/long.py``) for the figures before: it uses only what
both have.

Run: .venv/bin/python bench/long.py [--sizes 10,1000,10000,100000] [--sends 15] [--colds 5] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import psutil
import ray

import overstory
from overstory.app import conversation_id
from overstory.messages import AssistantMessage, Message, UserMessage, to_record
from overstory.store import run_on_store

AGENT = "long"
BODY = "tell me more about the long history of this conversation, with some detail " * 2


def seed(path: str, cid: str, n: int) -> None:
    """``n`` messages of whole turns in ``cid``, written in one transaction (the store's
    own record format), so 100,000 take seconds, not an fsync each."""
    rows = []
    for seq in range(n):
        turn = f"seed-{seq // 2}"
        message: Message
        if seq % 2 == 0:
            message = UserMessage(content=f"{seq}: {BODY}", seq=seq, turn_id=turn)
        else:
            message = AssistantMessage(content=f"answer {seq}: {BODY}", seq=seq, turn_id=turn)
        record = to_record(message)
        rows.append((cid, seq, turn, record["kind"], record["created_at"], record["body"]))
    with sqlite3.connect(path) as conn:
        conn.executemany(
            "INSERT INTO messages (conversation_id, seq, turn_id, kind, created_at, body)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )


def uss(pid: int) -> int:
    return int(psutil.Process(pid).memory_full_info().uss)


def measure(rt: Any, user: str, sends: int, colds: int) -> dict[str, Any]:
    conv = rt.conversation(user)
    pid = conv.info()["pid"]  # activates it; it is passivated before each cold send
    cold_samples, grown = [], 0
    for i in range(colds):
        rt.stop_conversation(user)
        gc.collect()
        base = uss(pid)
        started = time.perf_counter()
        conv.send(f"cold {i}: {BODY}")
        cold_samples.append(time.perf_counter() - started)
        if i == 0:
            grown = uss(pid) - base  # the first activation's growth
    cold = statistics.median(cold_samples)
    warm = []
    reply = None
    for i in range(sends):
        started = time.perf_counter()
        reply = conv.send(f"warm {i}: {BODY}")
        warm.append(time.perf_counter() - started)
    info = conv.info()
    assert reply is not None
    return {
        "warm_ms": statistics.median(warm) * 1000,
        "cold_ms": cold * 1000,
        "activation_ms": (cold - statistics.median(warm)) * 1000,
        "uss_growth_kib": grown / 1024,
        "held": info.get("messages_held", info["messages"]),
        "stored": info["messages"],
        "prompt_chars": max(0, reply.usage.input_tokens - 1) * 4,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10,1000,10000,100000")
    parser.add_argument("--sends", type=int, default=15)
    parser.add_argument("--colds", type=int, default=5)
    parser.add_argument("--window", type=int, default=8000, help="the model's window, tokens")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    tmp = tempfile.mkdtemp(prefix="overstory-long-")
    path = f"{tmp}/long.db"
    url = f"sqlite:///{path}"
    run_on_store(url, lambda store: store.count())  # creates the schema
    for n in sizes:
        seed(path, conversation_id(AGENT, f"u{n}"), n)

    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    agent = overstory.Agent(AGENT, model=f"offline:long@{args.window}")
    rt = overstory.connect(
        agent, store=url, namespace=f"long-{uuid.uuid4().hex[:8]}", hosted={"hosts_per_node": 1}
    )
    try:
        rt.conversation("warmup").send("hello")  # the host and its store are up
        results = {n: measure(rt, f"u{n}", args.sends, args.colds) for n in sizes}
    finally:
        rt.close()
        ray.shutdown()

    base = results[sizes[0]]
    for n in sizes:
        r = results[n]
        r["warm_ratio"] = r["warm_ms"] / base["warm_ms"]
        r["activation_ratio"] = r["activation_ms"] / max(base["activation_ms"], 1e-3)
    if args.json:
        print(json.dumps({"window": args.window, "results": results}, indent=2))
        return
    print(f"bench/long.py — hosted, offline:long@{args.window}, SQLite, {args.sends} warm sends")
    head = [
        "stored",
        "warm ms",
        "x",
        "cold ms",
        "activ. ms",
        "x",
        "held",
        "USS +KiB",
        "prompt chars",
    ]
    print(" | ".join(head))
    for n in sizes:
        r = results[n]
        print(
            f"{n:>7,} | {r['warm_ms']:7.2f} | {r['warm_ratio']:4.2f} | {r['cold_ms']:7.1f} | "
            f"{r['activation_ms']:8.1f} | {r['activation_ratio']:5.2f} | {r['held']:>6} | "
            f"{r['uss_growth_kib']:8.0f} | {r['prompt_chars']:>10,}"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
