"""What one event-loop turn asks goes as one call (overstory.batching), and the door's
rate windows and limits that use it (no Ray)."""

from __future__ import annotations

import asyncio

import pytest

from overstory.batching import TurnBatch
from overstory.exceptions import ConfigError
from overstory.gateway.app import DoorLimits
from overstory.gateway.rates import LocalRates, RatesActor


def test_questions_asked_in_one_loop_turn_go_as_one_call_and_each_gets_its_answer() -> None:
    sent: list[list[int]] = []

    async def send(questions: list[int]) -> list[int]:
        sent.append(list(questions))
        await asyncio.sleep(0)
        return [q * 10 for q in questions]

    async def go() -> tuple[list[int], int]:
        batch: TurnBatch[int, int] = TurnBatch(send)
        first = await asyncio.gather(*(batch.ask(i) for i in range(5)))
        later = await batch.ask(7)
        return list(first), later

    first, later = asyncio.run(go())
    assert first == [0, 10, 20, 30, 40]
    assert later == 70
    assert sent == [[0, 1, 2, 3, 4], [7]]


def test_a_failed_send_fails_every_asker_of_its_batch_and_a_cancelled_asker_is_not_sent() -> None:
    sent: list[list[str]] = []

    async def send(questions: list[str]) -> list[str]:
        sent.append(list(questions))
        if "boom" in questions:
            raise ConnectionError("actor gone")
        return questions[:1]  # too few answers for more than one question

    async def go() -> list[object]:
        batch: TurnBatch[str, str] = TurnBatch(send)
        failed = await asyncio.gather(batch.ask("a"), batch.ask("boom"), return_exceptions=True)
        short = await asyncio.gather(batch.ask("x"), batch.ask("y"), return_exceptions=True)
        gone = asyncio.ensure_future(batch.ask("cancelled"))
        kept = asyncio.ensure_future(batch.ask("kept"))
        await asyncio.sleep(0)  # both asked; the batch leaves on the next turn
        gone.cancel()
        return [*failed, *short, await kept]

    results = asyncio.run(go())
    assert [type(r).__name__ for r in results[:4]] == ["ConnectionError"] * 2 + ["RuntimeError"] * 2
    assert "2 questions sent, 1 answers" in str(results[2])
    assert results[4] == "kept"
    assert sent[-1] == ["kept"]  # the cancelled question never left


def test_the_rate_actor_counts_every_replica_in_one_window_per_limit() -> None:
    actor = RatesActor.__ray_actor_class__()  # type: ignore[attr-defined]
    answers = actor.admit_many("r1", 3, 60.0, ["k", "k"]) + actor.admit_many(
        "r2", 3, 60.0, ["k", "k"]
    )
    assert answers[:3] == [None, None, None]
    assert answers[3] is not None
    assert 59 < answers[3] <= 60  # room when the first request leaves the window
    assert actor.admit_many("r2", 10, 60.0, ["k"]) == [None]  # another limit, its own window
    assert actor.status() == {"keys": 2, "requests_by_replica": {"r1": 2, "r2": 3}}


def test_local_rates_and_the_door_limits_refuse_nonsense_by_name() -> None:
    rates = LocalRates(2, window_s=30)
    assert asyncio.run(rates.admit("k")) is None
    assert asyncio.run(rates.admit("k")) is None
    assert asyncio.run(rates.admit("k")) == pytest.approx(30, abs=1)
    assert DoorLimits(rate_window_s=5).rate_window_s == 5
    for bad, name in (
        ({"requests_per_minute": 0}, "requests_per_minute"),
        ({"max_body_bytes": -1}, "max_body_bytes"),
        ({"rate_window_s": 0}, "rate_window_s"),
        ({"body_timeout_s": 0}, "body_timeout_s"),
    ):
        with pytest.raises(ConfigError, match=name):
            DoorLimits(**bad)  # type: ignore[arg-type]
