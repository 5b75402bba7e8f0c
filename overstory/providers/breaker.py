"""Circuit breaker: stop calling an endpoint that keeps failing, probe it again later.

:class:`CircuitBreaker` is the pure state machine (time is passed in);
:class:`BreakerModel` is the policy wrapper a provider actor puts around its model.

    closed --K counted failures within window_s--> open
    open --cooldown_s elapsed--> half_open (one probe call let through)
    half_open --probe succeeds--> closed
    half_open --probe fails--> open (cooldown again)
    any --auth failure--> open for auth_cooldown_s ("unhealthy")

While open, a call fails at once with ``kind="circuit_open"``: no request is sent, and
the fallback chain moves on without waiting.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any, Literal

from ..exceptions import ModelError
from ..messages import ModelResponse
from .base import Model, ModelRequest, PolicyModel, StreamItem
from .endpoint import BreakerPolicy
from .taxonomy import policy

__all__ = ["BreakerModel", "CircuitBreaker", "CircuitState"]

CircuitState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """The breaker's state for one endpoint. Every method takes ``now`` (monotonic s)."""

    def __init__(self, config: BreakerPolicy) -> None:
        self.config = config
        self._state: CircuitState = "closed"
        self._failures: list[float] = []
        self._opened_at = 0.0
        self._cooldown = config.cooldown_s
        self._probing = False
        self.reason = ""
        self.opened = 0  # how many times it opened (for status and tests)

    def state(self, now: float) -> CircuitState:
        if self._state == "open" and now - self._opened_at >= self._cooldown:
            return "half_open"
        return self._state

    def allow(self, now: float) -> bool:
        """Whether a call may go out now; in half-open, only one probe at a time."""
        state = self.state(now)
        if state == "closed":
            return True
        if state == "open" or self._probing:
            return False
        self._state, self._probing = "half_open", True
        return True

    def retry_in(self, now: float) -> float:
        """Seconds until the next probe may go out (0 when calls are allowed)."""
        if self._state != "open":
            return 0.0
        return max(0.0, self._opened_at + self._cooldown - now)

    def success(self, now: float) -> None:
        self._state, self._probing, self.reason = "closed", False, ""
        self._failures.clear()

    def failure(self, now: float, reason: str = "") -> None:
        """A counted failure: opens after K of them within the window (or the probe's)."""
        if self._probing or self._state == "half_open":
            self._open(now, self.config.cooldown_s, reason or "half-open probe failed")
            return
        window = self.config.window_s
        self._failures = [t for t in self._failures if now - t < window]
        self._failures.append(now)
        if len(self._failures) >= self.config.failures:
            self._open(now, self.config.cooldown_s, reason or f"{len(self._failures)} failures")

    def trip(self, now: float, reason: str) -> None:
        """Open at once for the long (authentication) cooldown: the endpoint is unhealthy."""
        self._open(now, self.config.auth_cooldown_s, reason)

    def abandon_probe(self) -> None:
        """The probe ended without telling anything about the endpoint (e.g. a 400)."""
        self._probing = False

    def _open(self, now: float, cooldown: float, reason: str) -> None:
        self._state, self._probing = "open", False
        self._opened_at, self._cooldown, self.reason = now, cooldown, reason
        self._failures.clear()
        self.opened += 1

    def snapshot(self, now: float) -> dict[str, Any]:
        return {
            "state": self.state(now),
            "reason": self.reason,
            "recent_failures": len([t for t in self._failures if now - t < self.config.window_s]),
            "retry_in_s": round(self.retry_in(now), 3),
            "opened": self.opened,
        }


class BreakerModel(PolicyModel):
    """Calls ``model`` through a :class:`CircuitBreaker`; refuses at once while open."""

    def __init__(
        self,
        model: Model,
        config: BreakerPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[CircuitState], None] | None = None,
    ) -> None:
        super().__init__(model)
        self.breaker = CircuitBreaker(config)
        self._clock = clock
        self._on_change = on_change

    async def request(self, req: ModelRequest) -> ModelResponse:
        before = self.admit()
        try:
            response = await self.model.request(req)
        except ModelError as exc:
            self.judge(before, exc)
            raise
        except BaseException:
            self.abandon()  # cancelled: the probe tells nothing
            raise
        self.judge(before, None)
        return response

    async def stream(self, req: ModelRequest) -> AsyncGenerator[StreamItem, None]:
        """Admitted as :meth:`request` is; the stream's end decides: its answer is a
        success, a failure (before or after the first delta) counts by its kind, and a
        reader closing it early tells nothing about the endpoint."""
        before = self.admit()
        try:
            async with aclosing(self.model.stream(req)) as items:
                async for item in items:
                    yield item
        except ModelError as exc:
            self.judge(before, exc)
            raise
        except BaseException:
            self.abandon()
            raise
        self.judge(before, None)

    def admit(self) -> CircuitState:
        """The state before the call; raises ``circuit_open`` when no call may go out.
        Every admitted call is then judged (:meth:`judge`) or abandoned (:meth:`abandon`):
        here around the wrapped model, or by a provider actor for a call made elsewhere
        under its lease."""
        breaker, now = self.breaker, self._clock()
        before = breaker.state(now)
        if not breaker.allow(now):
            raise ModelError(
                f"circuit open ({breaker.reason}); next probe in {breaker.retry_in(now):.1f} s",
                model=self.name,
                kind="circuit_open",
                retry_after=breaker.retry_in(now),
            )
        return before

    def judge(self, before: CircuitState, error: ModelError | None) -> None:
        """An admitted call ended: answered (``error`` is ``None``) or failed with
        ``error``, counted by its kind (:mod:`.taxonomy`)."""
        breaker = self.breaker
        if error is None:
            breaker.success(self._clock())
        else:
            rule = policy(error.kind)
            if rule.trip:
                breaker.trip(self._clock(), f"{error.kind}: {error}")
            elif rule.breaker:
                breaker.failure(self._clock(), f"{error.kind}: {error}")
            else:
                breaker.abandon_probe()
        self._changed(before)

    def abandon(self) -> None:
        """An admitted call ended telling nothing about the endpoint (its reader went away)."""
        self.breaker.abandon_probe()

    def _changed(self, before: CircuitState) -> None:
        after = self.breaker.state(self._clock())
        if after != before and self._on_change is not None:
            self._on_change(after)
