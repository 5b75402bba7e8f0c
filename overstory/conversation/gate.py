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
caller's later turns forever: when a turn has waited ``gap_timeout_s`` and one of the
numbers before it has still not arrived, the caller's lowest waiting turn goes next.
Turns that are merely queued behind slow ones (every earlier number has arrived) wait as
long as it takes: a model that needs a minute per turn never reorders a caller's turns.
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
        self._arrived: dict[str, set[int]] = {}  # per caller: numbers waiting to enter

    def _expected(self, caller: str, low: int) -> int:
        return max(self._next.get(caller, low), low)

    def _may_enter(self, caller: str | None, n: int, low: int) -> bool:
        if self._busy:
            return False
        if caller is None:
            return True
        return n <= self._expected(caller, low)

    def _entered(self, caller: str | None, n: int) -> None:
        self._busy = True
        if caller is not None:
            self._next[caller] = max(n + 1, self._next.get(caller, 0))
            self._next.move_to_end(caller)
            while len(self._next) > self.max_callers:
                self._next.popitem(last=False)

    def _skip_gap(self, caller: str, n: int, low: int) -> None:
        """After a wait of ``gap_timeout_s``: if a number before ``n`` never arrived, let
        the caller's lowest waiting turn go next; if all are here (queued), change nothing."""
        expected = self._expected(caller, low)
        waiting = self._arrived[caller]
        if sum(1 for k in waiting if expected <= k < n) < n - expected:
            self._next[caller] = min(waiting)
            self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def turn(
        self, caller: str | None = None, n: int = 0, low: int | None = None
    ) -> AsyncIterator[None]:
        """Hold the gate for one turn; waits for the caller's earlier turns to start."""
        floor = n if low is None else low
        async with self._cond:
            if caller is not None:
                self._arrived.setdefault(caller, set()).add(n)
            try:
                while True:
                    try:
                        await asyncio.wait_for(
                            self._cond.wait_for(lambda: self._may_enter(caller, n, floor)),
                            timeout=self.gap_timeout_s,
                        )
                        break
                    except TimeoutError:
                        if caller is not None:
                            self._skip_gap(caller, n, floor)
                self._entered(caller, n)
            finally:
                if caller is not None:
                    waiting = self._arrived[caller]
                    waiting.discard(n)
                    if not waiting:
                        del self._arrived[caller]
        try:
            yield
        finally:
            async with self._cond:
                self._busy = False
                self._cond.notify_all()
