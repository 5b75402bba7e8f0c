"""A vendor stream's CPU in the process reading it: the SDK's default HTTP transport
(httpx over h11) against its aiohttp transport (``DefaultAioHttpClient``, what
overstory's vendor models use: ``overstory.providers._wire.aiohttp_client``).

One loopback OpenAI-format server in a process of its own answers every streamed chat
completion at once, a piece every ``--interval``; this process reads ``--responses``
of them, ``--concurrent`` at a time, through the OpenAI SDK's own POST (as
``OpenAIModel`` does), with one transport and then the other, ``--rounds`` times
alternating. Printed: this process's CPU per streamed response with each, and the ratio.

Run: .venv/bin/python bench/vendor_http.py [--responses 600] [--concurrent 200] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import time
from typing import Any

import openai
from streaming import start_server

BODY = {
    "model": "m",
    "messages": [{"role": "user", "content": "tell me something in a few words please"}],
    "stream": True,
    "stream_options": {"include_usage": True},
}


def cpu_s() -> float:
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime


async def read_all(client: openai.AsyncOpenAI, responses: int, concurrent: int) -> int:
    """Read ``responses`` streamed answers, ``concurrent`` at a time; the chunks read."""
    gate = asyncio.Semaphore(concurrent)
    chunks = 0

    async def one() -> None:
        nonlocal chunks
        async with gate:
            stream: Any = await client.post(
                "/chat/completions",
                cast_to=object,
                body=BODY,
                stream=True,
                stream_cls=openai.AsyncStream[object],
            )
            async for _ in stream:
                chunks += 1

    await asyncio.gather(*(one() for _ in range(responses)))
    return chunks


async def run(url: str, responses: int, concurrent: int, rounds: int) -> dict[str, Any]:
    per: dict[str, list[float]] = {"httpx": [], "aiohttp": []}
    chunks = 0
    for r in range(rounds):
        order = ["httpx", "aiohttp"] if r % 2 == 0 else ["aiohttp", "httpx"]
        for kind in order:
            http = openai.DefaultAioHttpClient() if kind == "aiohttp" else None
            client = openai.AsyncOpenAI(
                api_key="sk-bench-vendor-http-01", base_url=url, max_retries=0, http_client=http
            )
            await read_all(client, 50, 50)  # warm: connections open
            before = cpu_s()
            chunks = await read_all(client, responses, concurrent)
            per[kind].append((cpu_s() - before) / responses * 1000)
            await client.close()
    httpx_ms, aiohttp_ms = statistics.median(per["httpx"]), statistics.median(per["aiohttp"])
    return {
        "responses": responses,
        "concurrent": concurrent,
        "chunks_per_response": chunks // responses,
        "httpx_cpu_ms_per_response": [round(x, 2) for x in per["httpx"]],
        "aiohttp_cpu_ms_per_response": [round(x, 2) for x in per["aiohttp"]],
        "ratio": round(aiohttp_ms / httpx_ms, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--responses", type=int, default=600)
    parser.add_argument("--concurrent", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--interval", type=float, default=0.002)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    server, url = start_server(0.0, args.interval)
    try:
        started = time.monotonic()
        report = asyncio.run(run(url, args.responses, args.concurrent, args.rounds))
        report["wall_s"] = round(time.monotonic() - started, 1)
    finally:
        server.terminate()
    if args.json:
        print(json.dumps(report))
        return
    print(
        f"a vendor stream's CPU in its reader: {args.responses} streamed answers of "
        f"{report['chunks_per_response']} chunks, {args.concurrent} at a time"
    )
    print(f"  SDK default transport (httpx/h11): {report['httpx_cpu_ms_per_response']} ms each")
    print(f"  SDK aiohttp transport:             {report['aiohttp_cpu_ms_per_response']} ms each")
    print(f"  aiohttp / httpx (medians): x{report['ratio']}")


if __name__ == "__main__":
    main()
