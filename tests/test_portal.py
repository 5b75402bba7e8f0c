"""The client's sync face (overstory.runtime._portal), without Ray: what a sync call
hands to the portal's loop comes back — its result, its error, the caller's context —
and a stream the caller stops reading is closed on that loop."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncGenerator, Iterator

import pytest

from overstory.runtime._portal import Portal

CALLER = contextvars.ContextVar("caller", default="nobody")


@pytest.fixture
def portal() -> Iterator[Portal]:
    p = Portal("test-portal")
    yield p
    p.close()


def test_a_call_returns_its_result_from_the_portals_thread(portal: Portal) -> None:
    async def where() -> str:
        return threading.current_thread().name

    assert portal.run(where()) == "test-portal"
    assert portal.run(where()) == "test-portal"  # one loop, reused


def test_the_callers_context_travels_with_the_call(portal: Portal) -> None:
    async def who() -> str:
        return CALLER.get()

    token = CALLER.set("alice")
    try:
        assert portal.run(who()) == "alice"
    finally:
        CALLER.reset(token)
    assert portal.run(who()) == "nobody"


def test_an_error_reaches_the_caller_with_its_cause(portal: Portal) -> None:
    async def fail() -> None:
        try:
            raise KeyError("inner")
        except KeyError as exc:
            raise ValueError("outer") from exc

    with pytest.raises(ValueError, match="outer") as info:
        portal.run(fail())
    assert isinstance(info.value.__cause__, KeyError)


def test_a_stream_left_unfinished_is_closed_on_the_loop(portal: Portal) -> None:
    closed: list[str] = []

    async def numbers() -> AsyncGenerator[int, None]:
        try:
            for i in range(100):
                yield i
        finally:
            closed.append(threading.current_thread().name)

    stream = portal.iterate(numbers())
    assert [next(stream), next(stream), next(stream)] == [0, 1, 2]
    stream.close()  # the caller stops reading
    assert closed == ["test-portal"]
    assert list(portal.iterate(numbers())) == list(range(100))


def test_a_sync_call_from_the_portals_own_loop_is_refused(portal: Portal) -> None:
    async def nested() -> str:
        async def inner() -> str:
            return "never"

        try:
            return portal.run(inner())
        except RuntimeError as exc:
            return str(exc)

    assert "await its async form" in portal.run(nested())


def test_close_stops_the_thread_and_a_later_call_starts_another(portal: Portal) -> None:
    async def thread() -> threading.Thread:
        return threading.current_thread()

    first = portal.run(thread())
    portal.close()
    first.join(timeout=5)
    assert not first.is_alive()
    second = portal.run(thread())
    assert second is not first
    assert second.is_alive()


def test_the_loop_keeps_serving_other_calls_while_one_waits(portal: Portal) -> None:
    gate = threading.Event()

    async def slow() -> str:
        await asyncio.to_thread(gate.wait, 10)
        return "slow"

    async def fast() -> str:
        return "fast"

    result: list[str] = []
    waiter = threading.Thread(target=lambda: result.append(portal.run(slow())))
    waiter.start()
    assert portal.run(fast()) == "fast"  # not stuck behind slow()
    gate.set()
    waiter.join(timeout=10)
    assert result == ["slow"]
