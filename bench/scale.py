"""Scale benchmark: hosted placement on this machine, each figure a ratio or count from one run.

S1  1000 concurrent simulated users x 2 turns, 2 s offline model: every turn completes,
    and p50 turn time vs. the p50 of 20 users in the same run. Target <= 1.25x.
S2  Density: live conversations (10 stored messages each) per GiB of host USS, from
    the host's USS before and after activating them all. Target >= 50,000 / GiB.
S3  Cold activation (first send to a conversation with 100 stored messages) vs. a warm
    send to it. Target <= 4x.
S4  SIGKILL of the host holding S2's conversations: time until the first and until all
    of them answer again — a call each (their history), then, after a second kill, a
    whole turn each (targets <= 2 s and <= 10 s); acknowledged turns lost or duplicated,
    read back from the store (target 0).
P1  Turn overhead, zero-latency model, SQLite: hosted and dedicated vs. a bare
    driver -> actor doing the same two store writes, and vs. the chain driver -> actor
    -> actor with those writes (foundation.py's two baselines), side by side. Target
    <= 1.5x for hosted. Also against a bare *async* actor storing the turn through
    overstory's store, as a host does (bench/turns.py's floor): what the kind of actor
    a host must be costs, apart from overstory's own code.

Run: .venv/bin/python bench/scale.py [--users 1000] [--live 10000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import foundation
import psutil
import ray
import turns as turns_bench
from _common import median_ms

import overstory
from overstory import Agent, OfflineModel, Runtime
from overstory._ray import quiet_worker_notices
from overstory.app import conversation_id
from overstory.cli.demo import audit
from overstory.messages import AssistantMessage, UserMessage
from overstory.store import open_store

# foundation.py's bare actors travel by value: workers cannot import the bench folder.
ray.cloudpickle.register_pickle_by_value(foundation)
ray.cloudpickle.register_pickle_by_value(turns_bench)


def agent(latency_s: float = 0.0, placement: str = "hosted") -> Agent:
    return Agent(
        "scale",
        model=OfflineModel("offline:scale", latency_s=latency_s),
        placement=placement,  # type: ignore[arg-type]
    )


def connect(url: str, latency_s: float = 0.0, placement: str = "hosted", **kw: Any) -> Runtime:
    ns = f"scale-{uuid.uuid4().hex[:6]}"
    return overstory.connect(agent(latency_s, placement), store=url, namespace=ns, **kw)


def p50(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


async def users_talk(rt: Runtime, prefix: str, users: int, turns: int) -> tuple[list[float], int]:
    """``users`` concurrent users, ``turns`` sends each; (latencies, errors)."""
    latencies: list[float] = []
    errors = 0

    async def one(i: int) -> None:
        nonlocal errors
        conv = await rt.conversation_async(f"{prefix}-{i}")
        for t in range(turns):
            started = time.perf_counter()
            try:
                await conv.send_async(f"hello {t}")
            except overstory.OverstoryError:
                errors += 1
            else:
                latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(one(i) for i in range(users)))
    return latencies, errors


def s1(url: str, users: int) -> dict[str, Any]:
    rt = connect(url, latency_s=2.0)
    small, small_errors = asyncio.run(users_talk(rt, "s1-small", 20, 2))
    started = time.perf_counter()
    big, big_errors = asyncio.run(users_talk(rt, "s1-big", users, 2))
    wall = time.perf_counter() - started
    rt.close()
    return {
        "users": users,
        "turns_completed": len(big),
        "turns_requested": users * 2,
        "errors": big_errors + small_errors,
        "p50_20_users_ms": round(p50(small), 1),
        f"p50_{users}_users_ms": round(p50(big), 1),
        f"p99_{users}_users_ms": round(sorted(big)[int(0.99 * (len(big) - 1))] * 1000, 1),
        "wall_s": round(wall, 2),
        "ratio": round(p50(big) / p50(small), 3),
        "target": "<= 1.25",
    }


async def seed_many(url: str, prefix: str, n: int, messages: int) -> None:
    """``n`` conversations of ``messages`` stored messages each (user/assistant pairs)."""
    store = open_store(url)
    await store.open()
    batch = []
    for i in range(n):
        for seq in range(messages):
            turn = f"t{seq // 2}"
            if seq % 2 == 0:
                message: Any = UserMessage(
                    content=f"question {seq // 2} of {i}", seq=seq, turn_id=turn
                )
            else:
                message = AssistantMessage(
                    content=f"answer {seq // 2} to {i}", seq=seq, turn_id=turn
                )
            batch.append(store.append(conversation_id("scale", f"{prefix}-{i}"), message))
        if len(batch) >= 20_000:
            await asyncio.gather(*batch)
            batch = []
    await asyncio.gather(*batch)
    await store.close()


async def gather_limited(coros: list[Any], limit: int) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def run(c: Any) -> Any:
        async with gate:
            return await c

    return await asyncio.gather(*(run(c) for c in coros), return_exceptions=True)


def uss(pid: int) -> int:
    return int(psutil.Process(pid).memory_full_info().uss)


def s2_s4(url: str, live: int) -> dict[str, Any]:
    rt = connect(url, hosted={"hosts_per_node": 1})
    prefix = "dense"
    asyncio.run(seed_many(url, prefix, live, 10))
    warm = rt.conversation("warm-up")
    warm.send("hello")
    pid = warm.info()["pid"]
    before = uss(pid)

    async def activate() -> list[Any]:
        convs = [await rt.conversation_async(f"{prefix}-{i}") for i in range(live)]
        return await gather_limited([c.info_async() for c in convs], 500)

    started = time.perf_counter()
    infos = asyncio.run(activate())
    activate_s = time.perf_counter() - started
    failed = [i for i in infos if isinstance(i, BaseException)]
    after = uss(pid)
    status = rt.status()
    per_conv = (after - before) / live
    density = {
        "live_conversations": status["live_conversations"],
        "activation_failures": len(failed),
        "activate_all_s": round(activate_s, 2),
        "host_uss_before_mb": round(before / 2**20, 1),
        "host_uss_after_mb": round(after / 2**20, 1),
        "bytes_per_conversation": round(per_conv),
        "conversations_per_gib_marginal": round(2**30 / per_conv),
        "conversations_per_gib_whole_host": round(live * 2**30 / after),
        "target": ">= 50,000 / GiB",
    }

    # S4: every conversation takes a turn (acknowledged), the host dies, all answer again:
    # first a call each (their history: activation from the store), then, after a second
    # kill, a whole turn each.
    async def everyone(
        tag: str, since: float | None = None, read: bool = False
    ) -> tuple[list[float], list[Any]]:
        convs = [await rt.conversation_async(f"{prefix}-{i}") for i in range(live)]
        t0 = time.perf_counter() if since is None else since
        done: list[float] = []

        async def one(c: Any) -> Any:
            if read:
                answer = await c.history_async()
            else:
                answer = await c.send_async(f"{tag} turn", turn_id=f"{tag}-{c.user_id}")
            done.append(time.perf_counter() - t0)
            return answer

        results = await gather_limited([one(c) for c in convs], 1000)
        return sorted(done), results

    _, before_kill = asyncio.run(everyone("before"))
    acked_before = sum(1 for r in before_kill if not isinstance(r, BaseException))

    def kill_and(tag: str, read: bool) -> tuple[list[float], list[Any]]:
        victim = rt.conversation("warm-up").info()["pid"]
        os.kill(victim, signal.SIGKILL)
        return asyncio.run(everyone(tag, since=time.perf_counter(), read=read))

    read_times, read_results = kill_and("read", read=True)
    turn_times, turn_results = kill_and("after", read=False)
    errors = [r for r in (*read_results, *turn_results) if isinstance(r, BaseException)]
    stored = rt.stored_histories([f"{prefix}-{i}" for i in range(live)])
    lost = duplicated = 0
    for i in range(live):
        uid = f"{prefix}-{i}"
        acked = [(f"before-{uid}", "before turn"), (f"after-{uid}", "after turn")]
        one_lost, one_dup = audit(acked, stored[uid])
        lost, duplicated = lost + one_lost, duplicated + one_dup
    recovery = {
        "live_at_kill": live,
        "acknowledged_before_kill": acked_before,
        "first_answers_after_kill_s": round(read_times[0], 2),
        "all_answer_after_kill_s": round(read_times[-1], 2),
        "first_turn_after_kill_s": round(turn_times[0], 2),
        "all_take_a_turn_after_kill_s": round(turn_times[-1], 2),
        "errors_after_kill": len(errors),
        "lost_acknowledged": lost,
        "duplicated": duplicated,
        "host_restarts": rt.status()["host_restarts"],
        "targets": "first <= 2 s, all <= 10 s, 0 lost",
    }
    rt.close()
    return {"S2": density, "S4": recovery}


def s3(url: str, samples: int) -> dict[str, Any]:
    rt = connect(url, hosted={"hosts_per_node": 1})
    asyncio.run(seed_many(url, "cold", samples, 100))
    cold, warm = [], []
    for i in range(samples):
        conv = rt.conversation(f"cold-{i}")
        t = time.perf_counter()
        conv.send("first after a while")
        cold.append(time.perf_counter() - t)
        for j in range(3):
            t = time.perf_counter()
            conv.send(f"warm {j}")
            warm.append(time.perf_counter() - t)
    rt.close()
    return {
        "cold_send_100_msgs_p50_ms": round(p50(cold), 2),
        "warm_send_p50_ms": round(p50(warm), 2),
        "ratio": round(p50(cold) / p50(warm), 3),
        "target": "<= 4",
    }


def p1(url: str, tmp: str, turns: int) -> dict[str, Any]:
    hosted = connect(url, hosted={"hosts_per_node": 1})
    dedicated = connect(url, placement="dedicated")
    ours_h, ours_d = hosted.conversation("p1-hosted"), dedicated.conversation("p1-dedicated")
    bare = foundation.BareConversation.remote(f"{tmp}/bare.db")
    echo = foundation.Echo.remote()
    chain = foundation.BareConversation.remote(f"{tmp}/chain.db", echo)
    # An async actor storing the turn as a host does (bench/turns.py's floor): two fenced,
    # group-committed appends through overstory's SQLite store, no other overstory code.
    bare_async = turns_bench.BareHost.remote(f"sqlite:///{tmp}/bare-async.db")
    ray.get([bare.pid.remote(), chain.pid.remote()])
    numbers = itertools.count()
    timed = foundation.time_turns(
        {
            "hosted": ours_h.send,
            "dedicated": ours_d.send,
            "bare": lambda t: ray.get(bare.send.remote(t)),
            "chain": lambda t: ray.get(chain.send.remote(t)),
            "bare_async": lambda t: ray.get(bare_async.send.remote("p1", f"t{next(numbers)}", t)),
        },
        turns,
    )
    for handle in (bare, echo, chain, bare_async):
        ray.kill(handle)
    hosted.close()
    dedicated.close()
    b, c, a = median_ms(timed["bare"]), median_ms(timed["chain"]), median_ms(timed["bare_async"])
    h, d = median_ms(timed["hosted"]), median_ms(timed["dedicated"])
    return {
        "hosted_p50_ms": round(h, 3),
        "dedicated_p50_ms": round(d, 3),
        "bare_same_writes_p50_ms": round(b, 3),
        "bare_chain_p50_ms": round(c, 3),
        "bare_async_same_writes_p50_ms": round(a, 3),
        "hosted_ratio": round(h / b, 3),
        "dedicated_ratio": round(d / b, 3),
        "hosted_ratio_vs_chain": round(h / c, 3),
        "hosted_ratio_vs_async": round(h / a, 3),
        "target": "<= 1.5 (hosted)",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--live", type=int, default=10_000)
    parser.add_argument("--cold", type=int, default=20)
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--only", default="S1,S2,S3,P1", help="comma-separated subset")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    only = set(args.only.split(","))
    tmp = tempfile.mkdtemp(prefix="overstory-scale-")
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    time.sleep(5)  # let Ray's prestarted workers settle (see foundation.py)
    results: dict[str, Any] = {}
    with quiet_worker_notices():  # S4 kills a host on purpose
        if "S1" in only:
            results["S1"] = s1(f"sqlite:///{tmp}/s1.db", args.users)
        if "S2" in only:
            results.update(s2_s4(f"sqlite:///{tmp}/s2.db", args.live))
        if "S3" in only:
            results["S3"] = s3(f"sqlite:///{tmp}/s3.db", args.cold)
        if "P1" in only:
            results["P1"] = p1(f"sqlite:///{tmp}/p1.db", tmp, args.turns)
    ray.shutdown()
    for name, figures in results.items():
        print(name, " ".join(f"{k}={v}" for k, v in figures.items()))
    if args.json:
        print(json.dumps(results))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
