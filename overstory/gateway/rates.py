"""The door's per-key request rate, counted once for the whole cluster.

Every replica of the door counts a key's requests in the same window: one small actor
per namespace (``<namespace>:door-rates``, detached, restarted by Ray when it dies)
holds the windows (:class:`RequestRate`), and each replica asks it, one call per
event-loop turn for every request that arrived in it (:class:`~overstory.batching.TurnBatch`).
So two replicas behind a balancer refuse a key at the same count one would.

When the actor cannot be asked (dying, restarting, its node gone), a replica counts on
its own window for that batch: the door keeps answering, and for those moments each
replica admits up to the limit by itself. A restarted actor starts with empty windows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import ray

from ..batching import TurnBatch

__all__ = ["ClusterRates", "LocalRates", "Rates", "RatesActor", "RequestRate"]

log = logging.getLogger(__name__)

#: How long a replica waits for the rates actor before counting a batch on its own.
ASK_TIMEOUT_S = 2.0


class RequestRate:
    """At most ``limit`` requests per key in any ``window_s`` (a sliding window of
    timestamps per key; keys idle for a window are forgotten, so memory follows the
    active keys, not every key ever seen)."""

    def __init__(
        self, limit: int, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit, self.window_s, self._clock = limit, window_s, clock
        self._seen: dict[str, deque[float]] = {}
        self._sweep_at = clock() + window_s

    def admit(self, key: str) -> float | None:
        """None: admitted (and counted); else the seconds until room for one more."""
        now = self._clock()
        if now >= self._sweep_at:
            horizon = now - self.window_s
            self._seen = {k: w for k, w in self._seen.items() if w and w[-1] > horizon}
            self._sweep_at = now + self.window_s
        window = self._seen.setdefault(key, deque())
        while window and window[0] <= now - self.window_s:
            window.popleft()
        if len(window) >= self.limit:
            return window[0] + self.window_s - now
        window.append(now)
        return None

    def __len__(self) -> int:
        return len(self._seen)


class Rates(Protocol):
    """Where a replica counts a key's request: None when admitted, else the seconds
    until the key has room again."""

    async def admit(self, key: str) -> float | None: ...


class LocalRates:
    """This process's own windows: the door outside Ray (tests, one process)."""

    def __init__(self, limit: int, window_s: float = 60.0) -> None:
        self.rate = RequestRate(limit, window_s)

    async def admit(self, key: str) -> float | None:
        return self.rate.admit(key)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class RatesActor:
    """The windows of every replica's keys, one :class:`RequestRate` per (limit,
    window) a replica asks with (replicas of two door versions may differ while one
    rolls out). Counts who asked, for :meth:`status`."""

    def __init__(self) -> None:
        self._rates: dict[tuple[int, float], RequestRate] = {}
        self._asked: dict[str, int] = {}

    def admit_many(
        self, replica: str, limit: int, window_s: float, keys: list[str]
    ) -> list[float | None]:
        rate = self._rates.get((limit, window_s))
        if rate is None:
            rate = self._rates[limit, window_s] = RequestRate(limit, window_s)
        self._asked[replica] = self._asked.get(replica, 0) + len(keys)
        return [rate.admit(key) for key in keys]

    def status(self) -> dict[str, Any]:
        return {
            "keys": sum(len(r) for r in self._rates.values()),
            "requests_by_replica": dict(self._asked),
        }


def rates_actor(namespace: str) -> Any:
    """The namespace's rates actor, made by the first replica that asks for it."""
    return RatesActor.options(  # type: ignore[attr-defined]
        name=f"{namespace}:door-rates",
        namespace=namespace,
        get_if_exists=True,
        lifetime="detached",
    ).remote()


class ClusterRates:
    """A replica's view of the namespace's :class:`RatesActor`; when the actor cannot
    be asked, its own :class:`RequestRate` counts that batch (and a warning says so,
    at most once a minute)."""

    def __init__(self, namespace: str, limit: int, window_s: float = 60.0) -> None:
        self.namespace, self.limit, self.window_s = namespace, limit, window_s
        self._replica: str | None = None  # this process's actor id, known once in Ray
        self._handle: Any = None
        self._local = RequestRate(limit, window_s)
        self._batch: TurnBatch[str, float | None] = TurnBatch(self._send)
        self._warned = -1e9

    async def admit(self, key: str) -> float | None:
        return await self._batch.ask(key)

    async def _send(self, keys: list[str]) -> list[float | None]:
        try:
            if self._handle is None:
                self._replica = ray.get_runtime_context().get_actor_id() or "driver"
                self._handle = rates_actor(self.namespace)
            asked = self._handle.admit_many.remote(self._replica, self.limit, self.window_s, keys)
            answers: list[float | None] = await asyncio.wait_for(asked, ASK_TIMEOUT_S)
            return answers
        except Exception as exc:
            self._handle = None  # looked up again (restarted, or made anew) next time
            now = time.monotonic()
            if now - self._warned > 60:
                self._warned = now
                log.warning(
                    "door rate actor unavailable (%s: %s): counting per replica meanwhile",
                    type(exc).__name__,
                    exc,
                )
            return [self._local.admit(key) for key in keys]
