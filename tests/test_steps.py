"""The client's call steps and their two drivers (overstory.runtime._steps), no Ray: the
same steps, run by the async and the sync driver, see the same outcomes and errors."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from overstory.exceptions import ConversationUnavailable
from overstory.runtime._portal import Portal
from overstory.runtime._steps import Lost, Sleep, Steps, Target, drive_async, drive_sync


class Flaky:
    """A transport whose first target lookup fails, as a host between lives does."""

    def __init__(self) -> None:
        self.looked_up = 0
        self.losses: list[str] = []
        self.threads: set[str] = set()

    def _lookup(self) -> str:
        self.threads.add(threading.current_thread().name)
        self.looked_up += 1
        if self.looked_up == 1:
            raise ConversationUnavailable("host h0 is not running")
        return f"h{self.looked_up}"

    async def target(self) -> str:
        return self._lookup()

    def target_now(self) -> str:
        return self._lookup()

    async def lost(self, target: Any, exc: BaseException) -> bool:
        self.losses.append(f"{target}: {exc}")
        return False


def steps(log: list[str]) -> Steps:
    for attempt in range(3):
        try:
            target = yield Target()
            log.append(f"attempt {attempt} reached {target}")
            return f"answered by {target}"
        except ConversationUnavailable as exc:
            log.append(f"attempt {attempt} failed: {exc}")
            if not (yield Lost(None, exc)):
                yield Sleep(0.001)
        finally:
            log.append(f"attempt {attempt} ends")
    raise AssertionError("unreachable")


def test_both_drivers_run_the_same_steps_to_the_same_end() -> None:
    portal = Portal()
    runs: dict[str, tuple[Any, list[str], Flaky]] = {}
    for name in ("async", "sync"):
        log: list[str] = []
        flaky = Flaky()
        if name == "async":
            result = asyncio.run(drive_async(steps(log), flaky))  # type: ignore[arg-type]
        else:
            result = drive_sync(steps(log), flaky, portal)  # type: ignore[arg-type]
        runs[name] = (result, log, flaky)
    (a_result, a_log, a_flaky), (s_result, s_log, s_flaky) = runs["async"], runs["sync"]
    assert a_result == s_result == "answered by h2"
    assert (
        a_log
        == s_log
        == [
            "attempt 0 failed: host h0 is not running",
            "attempt 0 ends",
            "attempt 1 reached h2",
            "attempt 1 ends",
        ]
    )
    assert a_flaky.losses == s_flaky.losses == ["None: host h0 is not running"]
    # The sync driver looked the target up on the calling thread, not the portal's.
    assert s_flaky.threads == {threading.current_thread().name}
    portal.close()


def test_an_error_the_steps_do_not_handle_ends_them_and_reaches_the_caller() -> None:
    def failing(log: list[str]) -> Steps:
        try:
            yield Target()
        finally:
            log.append("closed")

    class Down(Flaky):
        def _lookup(self) -> str:
            raise ValueError("no table")

    async_log: list[str] = []
    with pytest.raises(ValueError, match="no table"):
        asyncio.run(drive_async(failing(async_log), Down()))  # type: ignore[arg-type]
    sync_log: list[str] = []
    with pytest.raises(ValueError, match="no table"):
        drive_sync(failing(sync_log), Down(), Portal())  # type: ignore[arg-type]
    assert async_log == sync_log == ["closed"]


def test_a_sync_call_from_the_portals_own_thread_is_refused() -> None:
    portal = Portal()

    async def inside() -> None:
        drive_sync(steps([]), Flaky(), portal)  # type: ignore[arg-type]

    with pytest.raises(RuntimeError, match="await its async form"):
        portal.run(inside())
    portal.close()
