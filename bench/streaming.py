"""Streaming benchmark (T1, T2): time to first token through overstory vs. the SDK directly.

One OpenAI-format loopback server in a process of its own (``python -m
overstory.testing.servers``) answers every streamed request after ``--server-ttft``
seconds, then one 4-character piece every ``--interval`` seconds. Two readers of it:

direct    the official ``openai`` async SDK in this process, ``stream=True``: seconds
          from the call to the first content delta (the baseline).
overstory ``conv.stream_async(text)`` of a hosted conversation (warmed by one turn):
          seconds from the call to the first ``delta`` event, through the host, the
          turn, the provider actor's streaming generator and the SDK inside it.

gateway   T2: the official SDK's ``responses.create(stream=True)`` against the HTTP front
          door (Ray Serve, FastAPI) in front of the same hosted conversations: seconds
          to the first ``response.output_text.delta``.

At 1 stream (``--samples`` in a row) and at ``--concurrent`` streams at once (each of
``--concurrent`` users streaming one turn, ``--rounds`` times). Printed: p50/p99 of
each, the ratio of the p50s and the added milliseconds (the gateway against the Python
path).

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
from ray import serve

import overstory
from overstory import Agent, Runtime
from overstory._ray import quiet_worker_notices
from overstory.gateway.keys import create_key
from overstory.gateway.serve import serve_http
from overstory.providers import Endpoint, Secret
from overstory.store import run_on_store

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


def gateway_ttft(
    clients: dict[str, openai.AsyncOpenAI], conversations: dict[str, str]
) -> Callable[[str], Awaitable[float]]:
    async def one(user: str) -> float:
        started = time.perf_counter()
        first = 0.0
        stream = await clients[user].responses.create(
            model="stream-bench", conversation=conversations[user], input=TEXT, stream=True
        )
        async for event in stream:
            if not first and event.type == "response.output_text.delta":
                first = time.perf_counter() - started
            if event.type in ("response.failed", "response.incomplete"):
                raise RuntimeError(f"response ended {event.type}")
        return first

    return one


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


async def wait_up(url: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            reader, writer = await asyncio.open_connection(*url[7:].split(":"))
            writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
            answer = await reader.read()
            writer.close()
            if b" 200 " in answer.split(b"\r\n", 1)[0] + b" ":
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the front door did not come up")
        await asyncio.sleep(0.5)


async def series(one: Callable[[str], Awaitable[float]], users: list[str]) -> list[float]:
    return [await one(u) for u in users]


async def together(one: Callable[[str], Awaitable[float]], users: list[str]) -> list[float]:
    return list(await asyncio.gather(*(one(u) for u in users)))


def row(name: str, direct: list[float], through: list[float], door: list[float]) -> dict[str, Any]:
    d50, o50, g50 = pct(direct, 0.5), pct(through, 0.5), pct(door, 0.5)
    d99, o99, g99 = pct(direct, 0.99), pct(through, 0.99), pct(door, 0.99)
    return {
        "case": name,
        "direct_p50_ms": round(d50, 1),
        "direct_p99_ms": round(d99, 1),
        "overstory_p50_ms": round(o50, 1),
        "overstory_p99_ms": round(o99, 1),
        "ratio_p50": round(o50 / d50, 2),
        "added_p50_ms": round(o50 - d50, 1),
        "added_p99_ms": round(o99 - d99, 1),
        "gateway_p50_ms": round(g50, 1),
        "gateway_p99_ms": round(g99, 1),
        "gateway_added_p50_ms": round(g50 - o50, 1),
        "gateway_added_p99_ms": round(g99 - o99, 1),
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
        door_url = serve_http(rt.config.namespace, rt.config.store, "127.0.0.1", free_port())

        async def run() -> None:
            n, c = args.samples, args.concurrent
            users = [f"u{i}" for i in range(max(n, c))]
            await wait_up(door_url)
            # Each user has a key of their own (the door counts requests per key).
            doors = {
                u: openai.AsyncOpenAI(
                    base_url=f"{door_url}/v1",
                    api_key=run_on_store(rt.config.store, lambda s, u=u: create_key(s, u))[0],
                    max_retries=0,
                    timeout=120,
                )
                for u in users
            }
            made = await together(lambda u: doors[u].conversations.create(), users)  # type: ignore[arg-type,return-value]
            conversations = {u: conv.id for u, conv in zip(users, made, strict=True)}  # type: ignore[attr-defined]
            # Warm: every conversation active, the provider actor and the clients connected.
            await together(lambda u: rt.conversation(u).send_async("warm up"), users)  # type: ignore[arg-type,return-value]
            await together(
                lambda u: doors[u].responses.create(  # type: ignore[arg-type,return-value]
                    model="stream-bench", conversation=conversations[u], input="warm up"
                ),
                users,
            )
            await series(lambda _: direct_ttft(client), users[:5])
            gateway = gateway_ttft(doors, conversations)

            direct = await series(lambda _: direct_ttft(client), users[:n])
            through = await series(overstory_ttft(rt), users[:n])
            at_door = await series(gateway, users[:n])
            rows.append(row("1 stream", direct, through, at_door))

            direct, through, at_door = [], [], []
            for _ in range(args.rounds):
                direct += await together(lambda _: direct_ttft(client), users[:c])
                through += await together(overstory_ttft(rt), users[:c])
                at_door += await together(gateway, users[:c])
            rows.append(row(f"{c} streams", direct, through, at_door))

        asyncio.run(run())
        serve.shutdown()
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
        print(
            f"  {'':>12}  gateway p50 {r['gateway_p50_ms']} / p99 {r['gateway_p99_ms']} ms: "
            f"+{r['gateway_added_p50_ms']} ms p50, +{r['gateway_added_p99_ms']} ms p99 "
            "over the Python path"
        )


if __name__ == "__main__":
    main()
