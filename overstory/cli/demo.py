"""The demo: N simulated users talking to their conversations at once, offline.

The demo's agent has two tools, and the offline model's rules turn some of the users'
questions into tool calls, so every demo run exercises tools end to end. The summary's
``messages_stored`` is read back from the store, not counted in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from .._ray import quiet_worker_notices
from ..agent import Agent, Placement
from ..context import RunContext
from ..exceptions import ConfigError, OverstoryError, TurnFailed
from ..messages import AssistantMessage, Message, Reply, UserMessage
from ..providers import Endpoint, Model, OfflineModel, Rule, parse_model, resolve_model
from ..runtime.client import Conversation, Runtime

__all__ = ["DemoResult", "add", "demo_agent", "run_demo", "word_count"]

#: The summary keeps this many error messages: a run of 1000 users must not print 1000.
MAX_ERROR_SAMPLES = 5


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def word_count(text: str) -> int:
    """Count the words in a text."""
    return len(text.split())


async def remember_number(ctx: RunContext, n: int) -> str:
    """Remember a number the user mentioned, and say how many they have mentioned."""
    assert ctx.vault is not None
    await ctx.vault.store("numbers", {"n": n}, key=str(n))  # by value: a replay is harmless
    known = await ctx.vault.query("numbers", limit=1000)
    return f"noted {n}; {ctx.user_id} has mentioned {len(known)} number(s)"


#: The offline model's rules for the demo: arithmetic and counting become tool calls, and
#: a number mentioned goes to the user's DataVault (a tool using its RunContext).
DEMO_RULES = (
    Rule(r"what is (?P<a>-?\d+) \+ (?P<b>-?\d+)", "add"),
    Rule(r"how many words are in '(?P<text>[^']*)'", "word_count"),
    Rule(r"tell me something about the number (?P<n>\d+)", "remember_number"),
)


def demo_agent(
    latency_s: float = 0.0, models: Sequence[str] = (), placement: Placement = "hosted"
) -> Agent:
    """The demo's agent: its tools, and ``models`` (``provider:model[@url]``, in fallback
    order) or by default the offline model whose rules call the tools; its
    conversations live as ``placement`` says.

    ``offline:NAME`` entries get the demo's rules and ``latency_s``. A vendor endpoint
    needs its key in the environment (checked here, before anything starts).
    """
    chain: list[Model] = []
    for spec in models or ("offline:demo",):
        vendor, name, base_url = parse_model(spec)
        if vendor == "offline":
            if base_url is not None:
                raise ConfigError(f"the offline model takes no base URL: {spec!r}")
            chain.append(OfflineModel(name, latency_s=latency_s, rules=DEMO_RULES))
        else:
            endpoint = Endpoint(vendor, name, base_url).resolved()  # type: ignore[arg-type]
            chain.append(resolve_model(endpoint))
    return Agent(
        "demo-assistant",
        instructions="Answer briefly. Use the tools for arithmetic, counting and remembering numbers.",
        model=chain,
        tools=[add, word_count, remember_number],
        placement=placement,
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
    ttft_ms: list[float] = field(default_factory=list)  # streamed turns: first delta
    error_samples: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    acknowledged: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    kills: int = 0
    restarts: int = 0
    activations: int = 0
    passivations: int = 0
    lost_messages: int = 0
    duplicate_messages: int = 0
    worker_notices: int = 0

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)
        ttft = sorted(self.ttft_ms)
        return {
            "users": self.users,
            "turns_requested": self.turns_requested,
            "turns_completed": self.turns_completed,
            "errors": self.errors,
            "tool_calls": self.tool_calls,
            "messages_stored": self.messages_stored,
            "p50_turn_ms": round(statistics.median(lat), 2) if lat else None,
            "p99_turn_ms": round(_quantile(lat, 0.99), 2) if lat else None,
            "p50_ttft_ms": round(statistics.median(ttft), 2) if ttft else None,
            "p99_ttft_ms": round(_quantile(ttft, 0.99), 2) if ttft else None,
            "wall_s": round(self.wall_s, 2),
            "kills": self.kills,
            "restarts": self.restarts,
            "activations": self.activations,
            "passivations": self.passivations,
            "lost_messages": self.lost_messages,
            "duplicate_messages": self.duplicate_messages,
            "ray_worker_notices_held": self.worker_notices,
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
        if len(result.error_samples) < MAX_ERROR_SAMPLES:
            result.error_samples.append(f"{user_id}: {exc}"[:300])
        return
    acked = result.acknowledged.setdefault(user_id, [])
    for turn in range(turns):
        started = time.perf_counter()
        turn_id = f"{user_id}-turn-{turn}"
        text = user_message(index, turn)
        try:
            if conv.placement == "hosted":
                reply = await _streamed_turn(conv, text, turn_id, started, result)
            else:
                reply = await conv.send_async(text, turn_id=turn_id)
        except OverstoryError as exc:
            result.errors += 1
            if len(result.error_samples) < MAX_ERROR_SAMPLES:
                result.error_samples.append(f"{user_id} turn {turn}: {exc}"[:300])
        else:
            result.latencies_ms.append((time.perf_counter() - started) * 1000)
            result.turns_completed += 1
            result.tool_calls += len(reply.tool_calls)
            acked.append((turn_id, text))
        bar.tick()


async def _streamed_turn(
    conv: Conversation, text: str, turn_id: str, started: float, result: DemoResult
) -> Reply:
    """One turn read as a stream (hosted placement): its time to first delta recorded,
    its reply returned; a turn that ends ``failed`` raises like ``send`` would."""
    first: float | None = None
    async with contextlib.aclosing(conv.stream_async(text, turn_id=turn_id)) as events:
        async for event in events:
            if event.type == "delta" and first is None:
                first = time.perf_counter()
                result.ttft_ms.append((first - started) * 1000)
            elif event.type == "completed" and event.reply is not None:
                return event.reply
            elif event.terminal:
                raise TurnFailed(conv.conversation_id, turn_id, event.text or event.type)
    raise TurnFailed(conv.conversation_id, turn_id, "the stream ended without an outcome")


def audit(acked: list[tuple[str, str]], stored: list[Message]) -> tuple[int, int]:
    """(lost, duplicated) acknowledged turns, judged from what the store holds.

    Lost: an acknowledged turn whose user message or final reply is not stored.
    Duplicated: a turn whose user message is stored more than once.
    """
    users: dict[str, int] = {}
    finished: set[str] = set()
    for m in stored:
        if isinstance(m, UserMessage):
            users[m.turn_id] = users.get(m.turn_id, 0) + 1
        elif isinstance(m, AssistantMessage) and not m.tool_calls:
            finished.add(m.turn_id)
    lost = sum(1 for turn_id, _ in acked if turn_id not in users or turn_id not in finished)
    duplicated = sum(1 for n in users.values() if n > 1)
    return lost, duplicated


async def _chaos(runtime: Runtime, rate: float, result: DemoResult, stop: asyncio.Event) -> None:
    """Kill a random process serving conversations ``rate`` times a second: a host
    (hosted placement) or a conversation actor (dedicated)."""
    rng = random.Random(1234)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=rng.expovariate(rate))
            return
        except TimeoutError:
            pass
        try:
            pids = await asyncio.to_thread(_serving_pids, runtime)
        except Exception:  # a supervisor or host is restarting: skip this tick
            continue
        if pids:
            try:
                os.kill(rng.choice(pids), signal.SIGKILL)
                result.kills += 1
            except ProcessLookupError:
                pass


def _settled(runtime: Runtime, quiet_s: float = 1.0, limit_s: float = 6.0) -> dict[str, Any]:
    """The runtime's status once its restart count stopped moving for ``quiet_s`` (at
    most ``limit_s``): a process the monkey killed just before the run ended is noticed
    by its supervisor a moment later, and the summary should count its restart."""
    deadline = time.monotonic() + limit_s
    status = runtime.status()
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        again = runtime.status()
        if again["restarts"] != status["restarts"]:
            since = time.monotonic()
        status = again
        if time.monotonic() - since >= quiet_s and status["restarts"]:
            break
    return status


def _serving_pids(runtime: Runtime) -> list[int]:
    """The processes that serve conversations now."""
    return runtime.registry.serving_pids()


def run_demo(
    runtime: Runtime,
    *,
    users: int,
    turns: int,
    chaos: float = 0.0,
    progress: TextIO = sys.stderr,
) -> DemoResult:
    """Run the simulated users against ``runtime``; stops the demo's actors afterwards.

    With ``chaos`` > 0, conversation actor processes are SIGKILLed at random at that
    rate per second while the users talk (this needs the actors on this machine).
    """
    run_id = uuid.uuid4().hex[:8]
    user_ids = [f"demo-{run_id}-user-{i}" for i in range(users)]
    result = DemoResult(users=users, turns_requested=users * turns)
    bar = _Progress(users * turns, progress)

    async def main() -> None:
        stop = asyncio.Event()
        monkey = asyncio.create_task(_chaos(runtime, chaos, result, stop)) if chaos > 0 else None
        try:
            await asyncio.gather(
                *(_simulate(runtime, uid, i, turns, result, bar) for i, uid in enumerate(user_ids))
            )
        finally:
            stop.set()
            if monkey is not None:
                await monkey

    started = time.perf_counter()
    try:
        # Chaos kills processes on purpose: Ray's notice of each would flood the terminal.
        with quiet_worker_notices() as notices:
            asyncio.run(main())
        result.worker_notices = len(notices)
    finally:
        bar.close()
        result.wall_s = time.perf_counter() - started
        status = _settled(runtime) if result.kills else runtime.status()
        result.restarts = status["restarts"]
        result.activations = status["activations"]
        for uid in user_ids:
            with contextlib.suppress(OverstoryError):  # a host killed last by the monkey
                runtime.stop_conversation(uid)
        result.passivations = runtime.status()["passivations"]
    stored = runtime.stored_histories(user_ids)  # one read serves the count and the audit
    result.messages_stored = sum(len(messages) for messages in stored.values())
    for uid in user_ids:
        lost, duplicated = audit(result.acknowledged.get(uid, []), stored[uid])
        result.lost_messages += lost
        result.duplicate_messages += duplicated
    return result
