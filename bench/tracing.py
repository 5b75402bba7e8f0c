"""The cost of tracing per turn, measured in one run on this machine.

A turn with one tool call (4 messages stored in SQLite with fsync, 2 model calls, 1 tool
call: 4 spans) timed with spans off (no tracer provider: the API's no-op) and on (an SDK
tracer provider, a BatchSpanProcessor, and the OTLP/HTTP exporter sending protobuf to a
loopback receiver that decodes it). Blocks of turns alternate so drift hits both alike.
Target: on/off <= 1.1x turn latency (median).

Run: .venv/bin/python bench/tracing.py [--turns 400]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from overstory.cli.demo import demo_agent
from overstory.conversation.turn import run_turn
from overstory.store import open_store
from overstory.telemetry import use_tracer_provider

TESTS = Path(__file__).resolve().parent.parent / "tests"

#: The tests' loopback OTLP receiver, in a process of its own (decoding protobuf in this
#: one would bill the receiver's work to the traced turns).
RECEIVER = """
import sys, threading
sys.path.insert(0, sys.argv[1])
from otlp_receiver import OtlpReceiver
with OtlpReceiver() as r:
    print(r.traces_url, flush=True)
    sys.stdin.read()  # until the bench closes our stdin
    print(len(r.spans), flush=True)
"""


async def block(store: object, history: list, n: int, offset: int, latency_s: float) -> list[float]:  # type: ignore[type-arg]
    agent = demo_agent(latency_s)
    samples = []
    for i in range(n):
        start = time.perf_counter()
        await run_turn(agent, store, "bench", history, f"t{offset + i}", f"what is {i} + 1?")  # type: ignore[arg-type]
        samples.append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=400)
    args = parser.parse_args()
    receiver = subprocess.Popen(
        [sys.executable, "-c", RECEIVER, str(TESTS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert receiver.stdout is not None
    traces_url = receiver.stdout.readline().strip()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url)))

    async def go(url: str, turns: int, latency_s: float) -> tuple[list[float], list[float]]:
        store = open_store(url)
        await store.open()
        history: list = []  # type: ignore[type-arg]
        off: list[float] = []
        on: list[float] = []
        await block(store, history, 20, 0, latency_s)  # warm up
        per = 20
        for b in range(max(1, turns // (2 * per))):
            off += await block(store, history, per, 1000 + 2 * b * per, latency_s)
            with use_tracer_provider(provider):
                on += await block(store, history, per, 1000 + (2 * b + 1) * per, latency_s)
        await store.close()
        return off, on

    traced = 0
    for latency_ms, turns in ((0.0, args.turns), (20.0, max(40, args.turns // 4))):
        with tempfile.TemporaryDirectory() as tmp:
            off, on = asyncio.run(go(f"sqlite:///{tmp}/bench.db", turns, latency_ms / 1000))
        traced += len(on)
        m_off, m_on = statistics.median(off) * 1000, statistics.median(on) * 1000
        print(
            f"tracing cost per turn (1 tool call, 4 spans, model latency {latency_ms:g} ms): "
            f"off {m_off:.2f} ms, on (batching, OTLP/HTTP) {m_on:.2f} ms p50 -> "
            f"{m_on / m_off:.3f}x (target <= 1.1x); {len(on)} traced turns"
        )
    provider.force_flush()
    provider.shutdown()
    out, _ = receiver.communicate("", timeout=30)
    exported = int(out.strip().splitlines()[-1])
    print(f"the OTLP receiver decoded {exported} spans ({4 * traced} expected)")


if __name__ == "__main__":
    main()
