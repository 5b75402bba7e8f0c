"""Rate limits per endpoint: requests per minute, tokens per minute, requests in flight.

:class:`RateLimiter` is the pure bookkeeping (time is passed in): sliding-window logs,
so *any* window of ``window_s`` seconds admits at most ``rpm`` requests and ``tpm``
tokens — not "about" that many, as a token bucket refilled per second would.
:class:`AsyncRateLimiter` queues callers in arrival order (an :class:`asyncio.Lock` is
FIFO: only the head of the queue is ever waiting for room) with a bounded wait, and
:class:`LimitedModel` is the policy wrapper. One provider actor per endpoint holds the one
limiter, so the limits hold across the cluster however many conversations call it.

A ``Retry-After`` from the provider pauses admissions for everyone (:meth:`pause`):
the provider told us the endpoint is full, so nobody should knock until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

from ..exceptions import ModelError
from ..messages import ModelResponse
from .base import Model, ModelRequest, PolicyModel, StreamItem
from .endpoint import Limits

__all__ = ["AsyncRateLimiter", "LimitedModel", "RateLimiter", "estimate_tokens", "used_tokens"]


def estimate_tokens(req: ModelRequest) -> int:
    """A request's prompt token estimate before the call: characters / 4 (+1)."""
    return (len(req.instructions) + sum(len(m.content) for m in req.messages)) // 4 + 1


class RateLimiter:
    """Sliding-window RPM/TPM logs and an in-flight count for one endpoint."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._requests: deque[float] = deque()
        # [admitted_at, tokens, in_window]: mutable, so a settled call corrects its tokens.
        self._tokens: deque[list[float]] = deque()
        self._token_sum = 0.0
        self.in_flight = 0
        self._paused_until = 0.0
        self.admitted = 0
        self.rejected = 0

    def _trim(self, now: float) -> None:
        horizon = now - self.limits.window_s
        while self._requests and self._requests[0] <= horizon:
            self._requests.popleft()
        while self._tokens and self._tokens[0][0] <= horizon:
            gone = self._tokens.popleft()
            self._token_sum -= gone[1]
            gone[2] = 0.0

    def delay(self, now: float, tokens: int) -> float:
        """Seconds until a call of ``tokens`` fits (0: now; ``inf``: when one in flight ends)."""
        self._trim(now)
        limits, wait = self.limits, max(0.0, self._paused_until - now)
        if limits.max_in_flight is not None and self.in_flight >= limits.max_in_flight:
            return math.inf
        if limits.rpm is not None and len(self._requests) >= limits.rpm:
            wait = max(
                wait, self._requests[len(self._requests) - limits.rpm] + limits.window_s - now
            )
        if limits.tpm is not None and self._token_sum + tokens > limits.tpm:
            # The earliest moment enough old entries have left the window.
            excess, freed = self._token_sum + tokens - limits.tpm, 0.0
            for at, used, _ in self._tokens:
                freed += used
                if freed >= excess:
                    wait = max(wait, at + limits.window_s - now)
                    break
        return wait

    def admit(self, now: float, tokens: int) -> list[float]:
        """Record an admission (call after ``delay`` returned 0); returns its token entry."""
        self._requests.append(now)
        entry = [now, float(tokens), 1.0]
        self._tokens.append(entry)
        self._token_sum += tokens
        self.in_flight += 1
        self.admitted += 1
        return entry

    def settle(self, entry: list[float], tokens: int) -> None:
        """The call ended: release its in-flight slot, correct its tokens to the real use."""
        self.in_flight -= 1
        if entry[2]:  # still inside the window: count what the provider says it used
            self._token_sum += tokens - entry[1]
            entry[1] = float(tokens)

    def pause(self, now: float, seconds: float) -> None:
        """Admit nothing for ``seconds`` (the provider's ``Retry-After``)."""
        self._paused_until = max(self._paused_until, now + seconds)

    def fits_ever(self, tokens: int) -> bool:
        """Whether a call of ``tokens`` can ever be admitted (not larger than the TPM)."""
        return self.limits.tpm is None or tokens <= self.limits.tpm

    def snapshot(self, now: float) -> dict[str, Any]:
        self._trim(now)
        limits = self.limits
        return {
            "rpm_limit": limits.rpm,
            "rpm_used": len(self._requests),
            "tpm_limit": limits.tpm,
            "tpm_used": int(self._token_sum),
            "in_flight": self.in_flight,
            "max_in_flight": limits.max_in_flight,
            "paused_s": round(max(0.0, self._paused_until - now), 3),
            "admitted": self.admitted,
            "rejected": self.rejected,
        }


class AsyncRateLimiter:
    """FIFO admission with a bounded wait in front of a :class:`RateLimiter`."""

    def __init__(
        self,
        limits: Limits,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_wait: Callable[[float, bool], None] | None = None,
    ) -> None:
        self.core = RateLimiter(limits)
        self._clock = clock
        self._queue = asyncio.Lock()  # FIFO: callers get room in the order they came
        self._released = asyncio.Event()
        self._on_wait = on_wait
        self.waiting = 0

    async def acquire(self, tokens: int, name: str) -> list[float]:
        """Wait (in order, at most ``max_wait_s``) for room; the entry to :meth:`release`.

        Raises ``ModelError(kind="limit_wait")`` when the call cannot be admitted in time.
        """
        core, start = self.core, self._clock()
        if not core.fits_ever(tokens):
            core.rejected += 1
            raise ModelError(
                f"request of ~{tokens} tokens exceeds the endpoint's TPM limit "
                f"{core.limits.tpm}; it can never be admitted",
                model=name,
                kind="limit_wait",
            )
        deadline = start + core.limits.max_wait_s
        self.waiting += 1
        try:
            try:
                await asyncio.wait_for(self._queue.acquire(), max(0.0, deadline - start))
            except TimeoutError as exc:
                raise self._gave_up(name, start) from exc
            try:
                while True:
                    now = self._clock()
                    wait = core.delay(now, tokens)
                    if wait <= 0:
                        entry = core.admit(now, tokens)
                        self._report(now - start, True)
                        return entry
                    if now + wait > deadline and not math.isinf(wait):
                        raise self._gave_up(name, start, wait)  # room comes too late: go now
                    if now >= deadline:
                        raise self._gave_up(name, start)
                    self._released.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._released.wait(), min(wait, deadline - now))
            finally:
                self._queue.release()
        finally:
            self.waiting -= 1

    def release(self, entry: list[float], tokens: int) -> None:
        self.core.settle(entry, tokens)
        self._released.set()

    def pause(self, seconds: float) -> None:
        self.core.pause(self._clock(), seconds)

    def _gave_up(self, name: str, start: float, needed: float | None = None) -> ModelError:
        self.core.rejected += 1
        waited = self._clock() - start
        self._report(waited, False)
        more = "" if needed is None or math.isinf(needed) else f" (room in {needed:.1f} s)"
        return ModelError(
            f"rate limit: not admitted within {self.core.limits.max_wait_s:g} s{more}",
            model=name,
            kind="limit_wait",
        )

    def _report(self, waited: float, admitted: bool) -> None:
        if self._on_wait is not None and (waited > 0 or not admitted):
            self._on_wait(waited, admitted)

    def snapshot(self) -> dict[str, Any]:
        return {**self.core.snapshot(self._clock()), "waiting": self.waiting}


class LimitedModel(PolicyModel):
    """Calls ``model`` once the endpoint's limiter admits the call."""

    def __init__(
        self,
        model: Model,
        limits: Limits,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_wait: Callable[[float, bool], None] | None = None,
    ) -> None:
        super().__init__(model)
        self.limiter = AsyncRateLimiter(limits, clock=clock, on_wait=on_wait)

    async def request(self, req: ModelRequest) -> ModelResponse:
        estimate = estimate_tokens(req)
        entry = await self.limiter.acquire(estimate, self.name)
        used = estimate
        try:
            response = await self.model.request(req)
            used = used_tokens(response)
            return response
        except ModelError as exc:
            self.failed(exc)
            raise
        finally:
            self.limiter.release(entry, used)

    async def stream(self, req: ModelRequest) -> AsyncGenerator[StreamItem, None]:
        """Admitted as :meth:`request` is; the admission is settled when the stream ends,
        fails or is closed by its reader (a cancelled turn frees its slot at once)."""
        estimate = estimate_tokens(req)
        entry = await self.limiter.acquire(estimate, self.name)
        used = estimate
        try:
            async with aclosing(self.model.stream(req)) as items:
                async for item in items:
                    if isinstance(item, ModelResponse):
                        used = used_tokens(item)
                    yield item
        except ModelError as exc:
            self.failed(exc)
            raise
        finally:
            self.limiter.release(entry, used)

    def failed(self, error: ModelError) -> None:
        """An admitted call failed: a 429 with ``Retry-After`` pauses every admission."""
        if error.kind == "rate_limited" and error.retry_after:
            self.limiter.pause(error.retry_after)


def used_tokens(response: ModelResponse) -> int:
    """What a call used against the TPM: its prompt and answer tokens."""
    return response.usage.input_tokens + response.usage.output_tokens
