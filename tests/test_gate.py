"""TurnGate without Ray: one turn at a time, each caller's turns in its own order."""

from __future__ import annotations

import asyncio
import random

from overstory.conversation.gate import TurnGate


async def _run(
    gate: TurnGate,
    log: list[tuple[str, int]],
    caller: str,
    n: int,
    active: list[int],
    low: int = 0,
) -> None:
    async with gate.turn(caller, n, low):
        active.append(1)
        assert len(active) == 1, "two turns inside the gate at once"
        log.append((caller, n))
        await asyncio.sleep(0)
        active.pop()


def test_each_callers_turns_run_in_its_order_whatever_the_arrival_order() -> None:
    rng = random.Random(7)
    arrivals = [(c, n) for c in ("a", "b", "c") for n in range(20)]

    async def go() -> list[tuple[str, int]]:
        gate, log, active = TurnGate(), [], []
        order = arrivals[:]
        rng.shuffle(order)
        # every send says 0 is still in flight, as a client that sent them all at once does
        await asyncio.gather(*(_run(gate, log, c, n, active) for c, n in order))
        return log

    log = asyncio.run(go())
    assert len(log) == 60
    for caller in ("a", "b", "c"):
        assert [n for c, n in log if c == caller] == list(range(20))


def test_a_missing_number_does_not_block_later_turns_forever() -> None:
    async def go() -> list[tuple[str, int]]:
        gate, log, active = TurnGate(gap_timeout_s=0.05), [], []
        await _run(gate, log, "a", 0, active)
        await _run(gate, log, "a", 2, active, low=1)  # 1 never arrives
        await _run(gate, log, "a", 3, active, low=3)
        return log

    assert asyncio.run(go()) == [("a", 0), ("a", 2), ("a", 3)]


def test_anonymous_turns_are_still_one_at_a_time() -> None:
    async def go() -> int:
        gate, log, active = TurnGate(), [], []
        await asyncio.gather(*(_run(gate, log, None, 0, active) for _ in range(10)))  # type: ignore[arg-type]
        return len(log)

    assert asyncio.run(go()) == 10


def test_a_fresh_gate_starts_a_caller_at_its_lowest_in_flight_number() -> None:
    # after an actor restart the caller is at 5; 6 arrives first and must wait for 5
    async def go() -> list[tuple[str, int]]:
        gate, log, active = TurnGate(), [], []
        later = asyncio.ensure_future(_run(gate, log, "a", 6, active, low=5))
        await asyncio.sleep(0.01)
        assert log == []
        await _run(gate, log, "a", 5, active, low=5)
        await later
        return log

    assert asyncio.run(go()) == [("a", 5), ("a", 6)]


async def _slow(gate: TurnGate, log: list[int], n: int, low: int = 0) -> None:
    async with gate.turn("a", n, low):
        log.append(n)
        await asyncio.sleep(0.12)  # longer than two gap timeouts


def test_turns_queued_behind_slow_ones_keep_their_order_past_the_gap_timeout() -> None:
    # every number has arrived: nothing is missing, so no wait is a gap, however long
    async def go() -> list[int]:
        gate, log = TurnGate(gap_timeout_s=0.05), []
        await asyncio.gather(*(_slow(gate, log, n) for n in (0, 3, 2, 1)))
        return log

    assert asyncio.run(go()) == [0, 1, 2, 3]


def test_a_gap_among_queued_turns_lets_the_lowest_waiting_one_go() -> None:
    async def go() -> list[int]:
        gate, log = TurnGate(gap_timeout_s=0.05), []
        await asyncio.gather(*(_slow(gate, log, n) for n in (0, 4, 2, 3)))  # 1 never comes
        return log

    assert asyncio.run(go()) == [0, 2, 3, 4]
