"""Foundation benchmark: overstory vs. bare Ray on this machine, measured in one run.

P1  median turn latency (offline model, zero latency, SQLite) vs. bare Ray doing the
    same store writes: (a) the same shape as overstory today, driver -> actor -> back;
    (b) the chain driver -> actor -> actor -> back. Target <= 1.5x.
P3  cold activation of a conversation with 100 stored messages vs. creating a bare
    named actor and waiting for its first reply. Target <= 1.2x.
P4  USS of a live conversation actor vs. a bare actor. Target <= 1.1x.

Run: .venv/bin/python bench/foundation.py [--turns 300] [--activations 7]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
import uuid
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import psutil
import ray
from _common import median_ms, seed

import overstory
from overstory.app import conversation_id


def _sqlite(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS m (c TEXT, seq INTEGER, body TEXT, PRIMARY KEY (c, seq))"
        " WITHOUT ROWID"
    )
    return conn


@ray.remote
class Echo:
    def reply(self, text: str) -> str:
        return "echo: " + text


@ray.remote
class BareConversation:
    """What overstory's turn does, hand-written: store the message, answer, store the answer."""

    def __init__(self, path: str, echo: Any = None) -> None:
        self.conn = _sqlite(path)
        self.seq = 0
        self.echo = echo

    def send(self, text: str) -> str:
        self.conn.execute("INSERT INTO m VALUES (?, ?, ?)", ("bare", self.seq, text))
        reply = ray.get(self.echo.reply.remote(text)) if self.echo else "echo: " + text
        self.conn.execute("INSERT INTO m VALUES (?, ?, ?)", ("bare", self.seq + 1, reply))
        self.seq += 2
        return reply

    def pid(self) -> int:
        return os.getpid()


@ray.remote
class Bare:
    def pid(self) -> int:
        return os.getpid()


def time_turns(sends: dict[str, Any], turns: int) -> dict[str, list[float]]:
    """Time each ``send`` ``turns`` times, interleaved so that drift in the machine's
    speed (fsync times vary by 2x here from minute to minute) hits every contender alike."""
    for i in range(20):  # warm-up
        for send in sends.values():
            send(f"warm {i}")
    out: dict[str, list[float]] = {name: [] for name in sends}
    for i in range(turns):
        for name, send in sends.items():
            t = time.perf_counter()
            send(f"message {i}")
            out[name].append(time.perf_counter() - t)
    return out


def uss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_full_info().uss) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--activations", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="overstory-bench-")
    url = f"sqlite:///{tmp}/bench.db"
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    # Ray starts its prestarted workers in the background right after init; measuring
    # during that burst adds noise to every figure, so let it settle first.
    time.sleep(5)
    ns = f"bench-{uuid.uuid4().hex[:6]}"
    # Dedicated placement: these figures compare one conversation actor with one bare
    # actor (bench/scale.py measures the hosted placement, the default).
    bench_agent = overstory.Agent("bench", model="offline:echo", placement="dedicated")
    rt = overstory.connect(bench_agent, store=url, namespace=ns)
    results: dict[str, Any] = {}

    # P1 -----------------------------------------------------------------------------
    conv = rt.conversation("p1-user")
    bare_same = BareConversation.remote(f"{tmp}/bare1.db")
    echo = Echo.remote()
    bare_chain = BareConversation.remote(f"{tmp}/bare2.db", echo)
    ray.get([bare_same.pid.remote(), bare_chain.pid.remote()])
    timed = time_turns(
        {
            "ours": conv.send,
            "same": lambda t: ray.get(bare_same.send.remote(t)),
            "chain": lambda t: ray.get(bare_chain.send.remote(t)),
        },
        args.turns,
    )
    ours, same, chain = timed["ours"], timed["same"], timed["chain"]
    results["P1"] = {
        "overstory_p50_ms": round(median_ms(ours), 3),
        "bare_same_shape_p50_ms": round(median_ms(same), 3),
        "bare_chain_p50_ms": round(median_ms(chain), 3),
        "ratio_vs_same_shape": round(median_ms(ours) / median_ms(same), 3),
        "ratio_vs_chain": round(median_ms(ours) / median_ms(chain), 3),
        "target": "<= 1.5",
    }

    # P4 (uses the live actors of P1) --------------------------------------------------
    bare = Bare.remote()
    bare_pid = ray.get(bare.pid.remote())
    ours_pid = conv.info()["pid"]
    results["P4"] = {
        "conversation_uss_mb": round(uss_mb(ours_pid), 1),
        "bare_actor_uss_mb": round(uss_mb(bare_pid), 1),
        "ratio": round(uss_mb(ours_pid) / uss_mb(bare_pid), 3),
        "vendor_sdks_in_actor": sorted(
            m for m in ("anthropic", "openai", "httpx") if m in conv_modules(conv)
        ),
        "target": "<= 1.1",
    }
    for h in (bare_same, bare_chain, echo, bare):
        ray.kill(h)
    rt.stop_conversation("p1-user")

    # P3 -----------------------------------------------------------------------------
    cold, plain = [], []
    for i in range(args.activations):
        user = f"p3-user-{i}"
        seed(url, conversation_id("bench", user), 100)
        t = time.perf_counter()
        c = rt.conversation(user)
        cold.append(time.perf_counter() - t)
        assert c.info()["messages"] == 100
        rt.stop_conversation(user)
        t = time.perf_counter()
        b = Bare.options(name=f"bare-{i}", namespace=ns).remote()
        ray.get(b.pid.remote())
        plain.append(time.perf_counter() - t)
        ray.kill(b)
    results["P3"] = {
        "conversation_100_msgs_p50_ms": round(median_ms(cold), 1),
        "bare_named_actor_p50_ms": round(median_ms(plain), 1),
        "ratio": round(median_ms(cold) / median_ms(plain), 3),
        "target": "<= 1.2",
    }

    rt.close()
    ray.shutdown()
    for name, figures in results.items():
        print(name, " ".join(f"{k}={v}" for k, v in figures.items()))
    if args.json:
        print(json.dumps(results))


def conv_modules(conv: Any) -> set[str]:
    """Top-level modules imported in the conversation actor's process."""
    handle = ray.get_actor(conv.actor_name, namespace=conv._runtime.config.namespace)
    return set(
        ray.get(
            handle.__ray_call__.remote(lambda self: sorted({m.split(".")[0] for m in sys.modules}))
        )
    )


if __name__ == "__main__":
    main()
