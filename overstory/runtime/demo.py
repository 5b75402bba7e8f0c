"""The demo: N simulated users talking to their conversations at once, offline.

The demo's agent has two tools, and the offline model's rules turn some of the users'
questions into tool calls, so every demo run exercises tools end to end. The summary's
``messages_stored`` is read back from the store, not counted in memory.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, TextIO

from ..agent import Agent
from ..exceptions import OverstoryError
from ..providers import OfflineModel, Rule
from .client import Runtime

__all__ = ["DemoResult", "add", "demo_agent", "run_demo", "word_count"]


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def word_count(text: str) -> int:
    """Count the words in a text."""
    return len(text.split())


def demo_agent(latency_s: float = 0.0) -> Agent:
    """A small agent whose offline model calls its tools on arithmetic and counting."""
    return Agent(
        "demo-assistant",
        instructions="Answer briefly. Use the tools for arithmetic and counting.",
        model=OfflineModel(
            "demo",
            latency_s=latency_s,
            rules=[
                Rule(r"what is (?P<a>-?\d+) \+ (?P<b>-?\d+)", "add"),
                Rule(r"how many words are in '(?P<text>[^']*)'", "word_count"),
            ],
        ),
        tools=[add, word_count],
    )


def user_message(user: int, turn: int) -> str:
    """The deterministic message simulated user ``user`` sends on ``turn``."""
    kind = (user + turn) % 3
    if kind == 0:
        return f"what is {user * 7 + turn} + {turn * 3}?"
    if kind == 1:
        return f"how many words are in 'user {user} says hello on turn {turn}'?"
    return f"tell me something about the number {user * 100 + turn}"


@dataclass
class DemoResult:
    users: int
    turns_requested: int
    turns_completed: int = 0
    errors: int = 0
    tool_calls: int = 0
    messages_stored: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)
        return {
            "users": self.users,
            "turns_requested": self.turns_requested,
            "turns_completed": self.turns_completed,
            "errors": self.errors,
            "tool_calls": self.tool_calls,
            "messages_stored": self.messages_stored,
            "p50_turn_ms": round(statistics.median(lat), 2) if lat else None,
            "p99_turn_ms": round(_quantile(lat, 0.99), 2) if lat else None,
            "wall_s": round(self.wall_s, 2),
            "error_samples": self.error_samples,
        }


def _quantile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


class _Progress:
    def __init__(self, total: int, out: TextIO) -> None:
        self.total, self.done, self.out = total, 0, out
        self.enabled = out.isatty()

    def tick(self) -> None:
        self.done += 1
        if self.enabled:
            filled = int(30 * self.done / max(self.total, 1))
            self.out.write(
                f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} turns"
            )
            self.out.flush()

    def close(self) -> None:
        if self.enabled:
            self.out.write("\n")
        else:
            self.out.write(f"{self.done}/{self.total} turns done\n")
        self.out.flush()


async def _simulate(
    runtime: Runtime, user_id: str, index: int, turns: int, result: DemoResult, bar: _Progress
) -> None:
    try:
        conv = await runtime.conversation_async(user_id)
    except OverstoryError as exc:
        result.errors += turns
        result.error_samples.append(f"{user_id}: {exc}"[:300])
        return
    for turn in range(turns):
        started = time.perf_counter()
        try:
            reply = await conv.send_async(user_message(index, turn))
        except OverstoryError as exc:
            result.errors += 1
            if len(result.error_samples) < 5:
                result.error_samples.append(f"{user_id} turn {turn}: {exc}"[:300])
        else:
            result.latencies_ms.append((time.perf_counter() - started) * 1000)
            result.turns_completed += 1
            result.tool_calls += len(reply.tool_calls)
        bar.tick()


def run_demo(
    runtime: Runtime, *, users: int, turns: int, progress: TextIO = sys.stderr
) -> DemoResult:
    """Run the simulated users against ``runtime``; stops the demo's actors afterwards."""
    run_id = uuid.uuid4().hex[:8]
    user_ids = [f"demo-{run_id}-user-{i}" for i in range(users)]
    result = DemoResult(users=users, turns_requested=users * turns)
    bar = _Progress(users * turns, progress)

    async def main() -> None:
        await asyncio.gather(
            *(_simulate(runtime, uid, i, turns, result, bar) for i, uid in enumerate(user_ids))
        )

    started = time.perf_counter()
    try:
        asyncio.run(main())
    finally:
        bar.close()
        result.wall_s = time.perf_counter() - started
        for uid in user_ids:
            runtime.stop_conversation(uid)
    result.messages_stored = sum(runtime.stored_counts(user_ids).values())
    return result
