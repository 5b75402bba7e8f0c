"""Streaming benchmark (T1): time to first token through overstory vs. the SDK directly.

One OpenAI-format loopback server in a process of its own (``python -m
overstory.testing.servers``) answers every streamed request after ``--server-ttft``
seconds, then one 4-character piece every ``--interval`` seconds. Two readers of it:

direct    the official ``openai`` async SDK in this process, ``stream=True``: seconds
          from the call to the first content delta (the baseline).
overstory ``conv.stream_async(text)`` of a hosted conversation (warmed by one turn):
          seconds from the call to the first ``delta`` event, through the host, the
          turn, the provider actor's streaming generator and the SDK inside it.

At 1 stream (``--samples`` in a row) and at ``--concurrent`` streams at once (each of
``--concurrent`` users streaming one turn, ``--rounds`` times). Printed: p50/p99 of
each, the ratio of the p50s and the added milliseconds.

Run: .venv/bin/python bench/streaming.py [--samples 40] [--concurrent 200] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import openai

import overstory
from overstory import Agent, Runtime
from overstory._ray import quiet_worker_notices
from overstory.providers import Endpoint, Secret

KEY = "sk-bench-stream-000000000001"
TEXT = "tell me something in a few words please"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(ttft: float, interval: float) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "overstory.testing.servers",
            "openai",
            "--port",
            str(port),
            "--latency",
            str(ttft),
            "--stream-interval",
            str(interval),
        ],
        stdout=subprocess.PIPE,
    )
    assert server.stdout is not None
    server.stdout.readline()  # "openai wire format at ..." once it listens
    return server, f"http://127.0.0.1:{port}/v1"


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def direct_ttft(client: openai.AsyncOpenAI) -> float:
    started = time.perf_counter()
    stream = await client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": TEXT}],
        stream=True,
        stream_options={"include_usage": True},
    )
    first = 0.0
    async for chunk in stream:
        if not first and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
    return first


def overstory_ttft(rt: Runtime) -> Callable[[str], Awaitable[float]]:
    async def one(user: str) -> float:
        conv = await rt.conversation_async(user)
        started = time.perf_counter()
        first = 0.0
        async for event in conv.stream_async(TEXT):
            if not first and event.type == "delta":
                first = time.perf_counter() - started
            if event.type in ("failed", "incomplete"):
                raise RuntimeError(f"turn ended {event.type}: {event.text}")
        return first

    return one


async def series(one: Callable[[str], Awaitable[float]], users: list[str]) -> list[float]:
    return [await one(u) for u in users]


async def together(one: Callable[[str], Awaitable[float]], users: list[str]) -> list[float]:
    return list(await asyncio.gather(*(one(u) for u in users)))


def row(name: str, direct: list[float], through: list[float]) -> dict[str, Any]:
    d50, o50 = pct(direct, 0.5), pct(through, 0.5)
    d99, o99 = pct(direct, 0.99), pct(through, 0.99)
    return {
        "case": name,
        "direct_p50_ms": round(d50, 1),
        "direct_p99_ms": round(d99, 1),
        "overstory_p50_ms": round(o50, 1),
        "overstory_p99_ms": round(o99, 1),
        "ratio_p50": round(o50 / d50, 2),
        "added_p50_ms": round(o50 - d50, 1),
        "added_p99_ms": round(o99 - d99, 1),
        "samples": len(through),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--concurrent", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--server-ttft", type=float, default=0.2)
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    quiet_worker_notices()
    server, url = start_server(args.server_ttft, args.interval)
    tmp = tempfile.mkdtemp(prefix="bench-stream-")
    rows: list[dict[str, Any]] = []
    try:
        agent = Agent(
            "stream-bench",
            model=Endpoint("openai", "m", url, key=Secret(KEY)),
            placement="hosted",
        )
        rt = overstory.connect(
            agent, store=f"sqlite:///{tmp}/history.db", namespace=f"bench-t1-{uuid.uuid4().hex[:6]}"
        )
        client = openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0)

        async def run() -> None:
            n, c = args.samples, args.concurrent
            users = [f"u{i}" for i in range(max(n, c))]
            # Warm: every conversation active, the provider actor and both clients connected.
            await together(lambda u: rt.conversation(u).send_async("warm up"), users)  # type: ignore[arg-type,return-value]
            await series(lambda _: direct_ttft(client), users[:5])

            direct = await series(lambda _: direct_ttft(client), users[:n])
            through = await series(overstory_ttft(rt), users[:n])
            rows.append(row("1 stream", direct, through))

            direct, through = [], []
            for _ in range(args.rounds):
                direct += await together(lambda _: direct_ttft(client), users[:c])
                through += await together(overstory_ttft(rt), users[:c])
            rows.append(row(f"{c} streams", direct, through))

        asyncio.run(run())
        rt.close()
    finally:
        server.terminate()
        server.wait()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"T1 time to first token: server TTFT {args.server_ttft * 1000:.0f} ms, "
        f"then a piece every {args.interval * 1000:.0f} ms"
    )
    for r in rows:
        print(
            f"  {r['case']:>12}: direct p50 {r['direct_p50_ms']} / p99 {r['direct_p99_ms']} ms; "
            f"overstory p50 {r['overstory_p50_ms']} / p99 {r['overstory_p99_ms']} ms; "
            f"x{r['ratio_p50']} (+{r['added_p50_ms']} ms p50, +{r['added_p99_ms']} ms p99)"
        )


if __name__ == "__main__":
    main()
