"""Leased calls: the vendor call runs in the caller's process, the endpoint's limiter and
breaker stay in one place.

A streamed answer is many small pieces; carrying each one through a provider actor costs
a Ray object per piece and puts every stream of an endpoint into one process. Under a
lease the conversation's own process reads the vendor's stream, and the provider actor
only decides (once per attempt) whether the call may go out:

    host process ── admit(call, tokens) ──> ProviderActor (the Gate: breaker + limiter)
         │  <── None, or the refusal (circuit open, limiter wait over)
         │── HTTP to the vendor, its stream read here ──>
         │── release(call, tokens, error) ──>   an attempt failed (its slot freed)
         └── judge(call, error, abandoned, used) ──>  the call ended: the breaker counts
                                                      it, the last slot is freed

:class:`Gate` is the provider actor's side: the same :class:`~.breaker.BreakerModel` and
:class:`~.limits.LimitedModel` decide as for a call made inside the actor, so the limits
and the breaker hold for the cluster as before. :class:`LeasedModel` is the caller's side:
the retry loop runs there (:class:`~.retry.RetryingModel`), each attempt admitted anew.
A process gathers what its calls say to one gate in one event-loop turn into one message
(the provider actor's ``admit_many``, :meth:`Gate.settle`): a burst of streams costs a few Ray calls.

A lease lives ``ttl_s`` past its last renewal: the caller's process renews all its open
calls in one message every third of it (:meth:`Gate.renew`), so a stream may run as long
as it runs, while the leases of a process that died (SIGKILL, its node lost) are freed
by :meth:`Gate.sweep` within ``ttl_s`` of its last renewal (a half-open probe with them).
A release, renewal or judgment that arrives for a call the gate does not know (it
restarted, or the call was refused) changes nothing.
"""

from __future__ import annotations

import random
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Protocol

from ..exceptions import ModelError
from ..messages import ModelResponse
from .base import Model, ModelRequest, StreamItem
from .breaker import BreakerModel, CircuitState
from .endpoint import RetryPolicy
from .limits import LimitedModel, estimate_tokens, used_tokens
from .retry import RetryingModel

__all__ = ["LEASE_TTL_S", "Gate", "GateClient", "LeasedModel", "Note", "renew_every"]

#: A lease not renewed within this is taken for lost (its caller died) and freed
#: (:attr:`~.endpoint.Limits.lease_ttl_s` sets it per endpoint).
LEASE_TTL_S = 30.0


def renew_every(ttl_s: float) -> float:
    """How often a caller renews its open leases: a third of their ``ttl_s``, so that a
    renewal may be late (a busy loop, a slow Ray call) twice before a lease lapses."""
    return ttl_s / 3


#: Calls judged recently, remembered so an admission granted after its caller gave up
#: (cancelled while queued) is released at once instead of holding a slot.
_JUDGED_KEPT = 4096

#: The backoff jitter of every leased call's retry loop.
_JITTER = random.Random()


@dataclass
class _Lease:
    before: CircuitState
    at: float
    entry: list[float] | None = None  # the limiter's entry of the running attempt
    tokens: int = 0


class Gate:
    """An endpoint's admissions for calls made in other processes (the provider actor's
    side of a lease). ``clock`` is monotonic seconds."""

    def __init__(
        self,
        breaker: BreakerModel,
        limited: LimitedModel,
        *,
        ttl_s: float = LEASE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
        on_failure: Callable[[ModelError], None] | None = None,
    ) -> None:
        self.breaker = breaker
        self.limited = limited
        self.ttl_s = ttl_s
        self._clock = clock
        self._on_failure = on_failure
        self.leases: dict[str, _Lease] = {}
        self._judged: OrderedDict[str, None] = OrderedDict()
        self.expired = 0

    async def admit(self, call: str, tokens: int) -> ModelError | None:
        """Let one attempt of ``call`` go out: the breaker (on its first attempt), then
        the limiter (FIFO, bounded wait). ``None`` when it may; the refusal otherwise
        (returned, not raised: a Ray task error costs a traceback to build and ship)."""
        if call in self._judged:  # its caller gave up before this arrived
            return _abandoned(self.limited.name)
        lease = self.leases.get(call)
        if lease is None:
            try:
                before = self.breaker.admit()
            except ModelError as exc:  # no lease: counted here, not by a judgment
                if self._on_failure is not None:
                    self._on_failure(exc)
                return exc
            lease = self.leases[call] = _Lease(before, self._clock())
        try:
            entry = await self.limited.limiter.acquire(tokens, self.limited.name)
        except ModelError as exc:
            return exc
        if call in self._judged or self.leases.get(call) is not lease:
            # Its caller gave up while it queued (and judged it): free the slot now.
            self.limited.limiter.release(entry, 0)
            return _abandoned(self.limited.name)
        lease.entry, lease.tokens = entry, tokens
        return None

    def renew(self, calls: Sequence[str]) -> None:
        """``calls`` are still running in a live process: their leases start again."""
        now = self._clock()
        for call in calls:
            lease = self.leases.get(call)
            if lease is not None:
                lease.at = now

    def release(self, call: str, used: int, error: ModelError | None) -> None:
        """An attempt of ``call`` ended: its limiter slot is freed and its tokens
        corrected to ``used``; a 429 with ``Retry-After`` pauses every admission."""
        lease = self.leases.get(call)
        if lease is None or lease.entry is None:
            return
        entry, lease.entry = lease.entry, None
        self.limited.limiter.release(entry, used)
        if error is not None:
            self.limited.failed(error)

    def settle(self, notes: Sequence[Note]) -> None:
        """One caller's releases, renewals and judgments, gathered, in the order it made
        them."""
        for note in notes:
            if note[0] == "release":
                self.release(*note[1:])
            elif note[0] == "renew":
                self.renew(note[1])
            else:
                self.judge(*note[1:])

    def judge(
        self,
        call: str,
        error: ModelError | None,
        abandoned: bool = False,
        used: int | None = None,
    ) -> None:
        """``call`` ended: answered, failed with ``error`` (the breaker counts it by its
        kind), or ``abandoned`` by its reader (tells nothing about the endpoint). An
        attempt still admitted is released with ``used`` tokens (its estimate if ``None``):
        a call that succeeded says so once, not with a release and then a judgment."""
        self._judged[call] = None
        while len(self._judged) > _JUDGED_KEPT:
            self._judged.popitem(last=False)
        lease = self.leases.pop(call, None)
        if lease is None:
            return
        if lease.entry is not None:
            self.limited.limiter.release(lease.entry, lease.tokens if used is None else used)
        if abandoned:
            if lease.before == "half_open":  # it was the probe: another may go
                self.breaker.abandon()
            return
        if error is not None and self._on_failure is not None:
            self._on_failure(error)
        self.breaker.judge(lease.before, error)

    def sweep(self, now: float | None = None) -> int:
        """Free the leases not renewed for ``ttl_s`` (their callers died holding them);
        how many."""
        now = self._clock() if now is None else now
        stale = [call for call, lease in self.leases.items() if now - lease.at > self.ttl_s]
        for call in stale:
            self.judge(call, None, abandoned=True)
        self.expired += len(stale)
        return len(stale)


def _abandoned(model: str) -> ModelError:
    return ModelError("the call was abandoned while it queued", model=model, kind="limit_wait")


#: A release, a renewal or a judgment, as :meth:`Gate.settle` takes them.
Note = tuple[Any, ...]


class GateClient(Protocol):
    """How a caller reaches its endpoint's :class:`Gate` (a provider actor, over Ray)."""

    def admit(self, call: str, tokens: int) -> Awaitable[ModelError | None]: ...

    def release(self, call: str, used: int, error: ModelError | None) -> None: ...

    def judge(
        self, call: str, error: ModelError | None, abandoned: bool, used: int | None
    ) -> None: ...


class LeasedModel(Model):
    """``vendor`` called in this process under leases from ``gate``: the retry loop here,
    every attempt admitted by the gate, the call judged by it when it ends."""

    def __init__(
        self,
        vendor: Model,
        gate: GateClient,
        retry: RetryPolicy,
        *,
        on_retry: Callable[[int, ModelError, float], None] | None = None,
    ) -> None:
        self.vendor = vendor
        self.gate = gate
        self.retry = retry
        self.on_retry = on_retry

    @property
    def name(self) -> str:
        return self.vendor.name

    def _attempts(self, call: str) -> RetryingModel:
        return RetryingModel(
            _Attempts(self.vendor, self.gate, call),
            self.retry,
            rng=_JITTER,  # one for the process: a fresh Random per call reads os.urandom
            on_retry=self.on_retry,
        )

    async def request(self, req: ModelRequest) -> ModelResponse:
        call, error, done, used = uuid.uuid4().hex, None, False, None
        try:
            response = await self._attempts(call).request(req)
            done, used = True, used_tokens(response)
            return response
        except ModelError as exc:
            error, done = exc, True
            raise
        finally:
            self.gate.judge(call, error, not done, used)

    async def stream(self, req: ModelRequest) -> AsyncGenerator[StreamItem, None]:
        call, error, done, used = uuid.uuid4().hex, None, False, None
        try:
            async with aclosing(self._attempts(call).stream(req)) as items:
                async for item in items:
                    if isinstance(item, ModelResponse):
                        used = used_tokens(item)
                    yield item
            done = True
        except ModelError as exc:
            error, done = exc, True
            raise
        finally:
            self.gate.judge(call, error, not done, used)


class _Attempts(Model):
    """One attempt of a leased call: admitted, then sent. A failed attempt is released
    at once (the next may need the slot); the one that answered, or that its reader
    left, is released by the call's judgment."""

    def __init__(self, vendor: Model, gate: GateClient, call: str) -> None:
        self.vendor = vendor
        self.gate = gate
        self.call_id = call

    @property
    def name(self) -> str:
        return self.vendor.name

    async def request(self, req: ModelRequest) -> ModelResponse:
        tokens = estimate_tokens(req)
        refused = await self.gate.admit(self.call_id, tokens)
        if refused is not None:
            raise refused
        try:
            return await self.vendor.request(req)
        except ModelError as exc:
            self.gate.release(self.call_id, tokens, exc)
            raise

    async def stream(self, req: ModelRequest) -> AsyncGenerator[StreamItem, None]:
        tokens = estimate_tokens(req)
        refused = await self.gate.admit(self.call_id, tokens)
        if refused is not None:
            raise refused
        try:
            async with aclosing(self.vendor.stream(req)) as items:
                async for item in items:
                    yield item
        except ModelError as exc:
            self.gate.release(self.call_id, tokens, exc)
            raise
