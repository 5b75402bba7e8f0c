"""TurnGate: one turn at a time, and each caller's turns in the order it sent them.

Ray runs an async actor's calls out of order (``allow_out_of_order_execution`` is forced
on for async actors), so a lock alone would let a caller's second message overtake its
first. Each client handle therefore numbers its sends (``caller``, ``n``) and the gate
admits a caller's turn ``n`` only after its turn ``n - 1`` has started. Turns of
different callers have no order between them and go in as they come.

Each send also carries ``low``, the lowest number the caller still has in flight: a
fresh actor (first contact, or after a restart) starts the caller at ``low``, so a
caller's turn 1 that happens to arrive before its turn 0 still waits for it. A number
that never arrives (the caller died between numbering and sending) must not block the
caller's later turns forever: after ``gap_timeout_s`` the gate admits the next anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator

__all__ = ["TurnGate"]


class TurnGate:
    """Admits one turn at a time; per caller, in ``n`` order."""

    def __init__(self, *, gap_timeout_s: float = 10.0, max_callers: int = 10_000) -> None:
        self.gap_timeout_s = gap_timeout_s
        self.max_callers = max_callers
        self._cond = asyncio.Condition()
        self._busy = False
        self._next: OrderedDict[str, int] = OrderedDict()

    def _may_enter(self, caller: str | None, n: int, low: int) -> bool:
        if self._busy:
            return False
        if caller is None:
            return True
        expected = max(self._next.get(caller, low), low)
        return n <= expected

    def _entered(self, caller: str | None, n: int) -> None:
        self._busy = True
        if caller is not None:
            self._next[caller] = max(n + 1, self._next.get(caller, 0))
            self._next.move_to_end(caller)
            while len(self._next) > self.max_callers:
                self._next.popitem(last=False)

    @contextlib.asynccontextmanager
    async def turn(
        self, caller: str | None = None, n: int = 0, low: int | None = None
    ) -> AsyncIterator[None]:
        """Hold the gate for one turn; waits for the caller's earlier turns to start."""
        floor = n if low is None else low
        async with self._cond:
            try:
                await asyncio.wait_for(
                    self._cond.wait_for(lambda: self._may_enter(caller, n, floor)),
                    timeout=self.gap_timeout_s,
                )
            except TimeoutError:
                # An earlier number never came: stop waiting for it, keep the one-at-a-time rule.
                floor = n
                if caller is not None:
                    self._next[caller] = n
                await self._cond.wait_for(lambda: self._may_enter(caller, n, floor))
            self._entered(caller, n)
        try:
            yield
        finally:
            async with self._cond:
                self._busy = False
                self._cond.notify_all()
