"""The one retry loop: retry the same endpoint when the taxonomy says it may help.

The vendor SDKs are built with ``max_retries=0``, so this is the only place a request is
repeated. Server errors, timeouts, dropped connections and malformed answers are retried
with exponential backoff and full jitter; a 429 or 529 waits for the provider's
``Retry-After`` when that is short, and otherwise gives up at once so the fallback chain
can try the next model. Authentication failures, bad requests and context overflows are
never retried.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing

from ..exceptions import ModelError
from ..messages import ModelResponse
from .base import Model, ModelRequest, PolicyModel, StreamItem
from .endpoint import RetryPolicy
from .taxonomy import policy

__all__ = ["RetryingModel", "backoff_s"]


def backoff_s(
    config: RetryPolicy, attempt: int, error: ModelError, rng: random.Random
) -> float | None:
    """The delay before attempt ``attempt + 1`` after ``error``, or ``None``: do not retry.

    ``attempt`` counts from 1 (the call that just failed).
    """
    rule = policy(error.kind)
    if not rule.retry or attempt >= config.attempts:
        return None
    if rule.wait_for_retry_after and error.retry_after is not None:
        if error.retry_after > config.max_retry_after_s:
            return None  # the provider wants a long pause: fall through instead
        return error.retry_after
    if error.kind == "rate_limited":
        return None  # a 429 without Retry-After: another model is the better bet
    ceiling = min(config.max_backoff_s, config.base_s * 2 ** (attempt - 1))
    return rng.uniform(0, ceiling)


class RetryingModel(PolicyModel):
    """Retries ``model`` per :func:`backoff_s`; ``on_retry(attempt, error, delay)`` reports."""

    def __init__(
        self,
        model: Model,
        config: RetryPolicy,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        on_retry: Callable[[int, ModelError, float], None] | None = None,
    ) -> None:
        super().__init__(model)
        self.config = config
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._on_retry = on_retry
        self.retries = 0

    async def request(self, req: ModelRequest) -> ModelResponse:
        attempt = 1
        while True:
            try:
                return await self.model.request(req)
            except ModelError as exc:
                await self._before_retry(attempt, exc)
                attempt += 1

    async def stream(self, req: ModelRequest) -> AsyncGenerator[StreamItem, None]:
        """Retried as :meth:`request` is, but only while nothing was shown: a stream that
        fails after its first delta is never started again (that would repeat text)."""
        attempt = 1
        while True:
            shown = False
            try:
                async with aclosing(self.model.stream(req)) as items:
                    async for item in items:
                        shown = shown or isinstance(item, str)
                        yield item
                return
            except ModelError as exc:
                if shown:
                    raise
                await self._before_retry(attempt, exc)
                attempt += 1

    async def _before_retry(self, attempt: int, error: ModelError) -> None:
        """Wait before attempt ``attempt + 1``, or re-raise ``error``: no retry helps."""
        delay = backoff_s(self.config, attempt, error, self._rng)
        if delay is None:
            raise error
        self.retries += 1
        if self._on_retry is not None:
            self._on_retry(attempt, error, delay)
        await self._sleep(delay)
