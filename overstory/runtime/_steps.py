"""A client call written once, as steps, run by either of two drivers.

A call's logic (resolve the target, call it, decide on a failure whether and when to
call again) is a generator that *yields* what it needs done (:class:`Target`,
:class:`Get`, :class:`Lost`, :class:`Sleep`) and is sent the outcome, or has the error
thrown in at the yield. :func:`drive_async` awaits each effect on the running event loop
(the async face, the door). :func:`drive_sync` does each on the caller's thread:
``ray.get`` blocks in Ray's C++ core instead of crossing to the portal's event loop and
back, which cost a synchronous ``send`` ~0.3 ms (``bench/scale.py`` P1); only the rare
:class:`Lost` (forget a dead target, maybe start it again) runs on the portal.

The steps decide; the drivers only perform, so both faces keep one behaviour.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray

if TYPE_CHECKING:
    from ._portal import Portal
    from .transport import Transport

__all__ = ["Get", "Lost", "Sleep", "Steps", "Target", "drive_async", "drive_sync"]


@dataclass(frozen=True, slots=True)
class Target:
    """The transport's target for the next call (a host route, the dedicated actor)."""


@dataclass(frozen=True, slots=True)
class Get:
    """The value of ``ref`` (a Ray ``ObjectRef``) within ``timeout_s``; ``TimeoutError``
    after it."""

    ref: Any
    timeout_s: float


@dataclass(frozen=True, slots=True)
class Lost:
    """A call to ``target`` failed with ``error``: the transport forgets what is stale;
    ``True`` when the next target is ready at once (:meth:`Transport.lost`)."""

    target: Any
    error: BaseException


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


Effect = Target | Get | Lost | Sleep
#: A call's steps: effects out, their outcomes in, the call's value at the end.
Steps = Generator[Effect, Any, Any]


async def drive_async(steps: Steps, transport: Transport) -> Any:
    """Run ``steps`` on the running event loop."""
    outcome: Any = None
    error: BaseException | None = None
    while True:
        try:
            effect = steps.send(outcome) if error is None else steps.throw(error)
        except StopIteration as stop:
            return stop.value
        outcome, error = None, None
        try:
            if isinstance(effect, Get):  # asyncio.timeout: no task of its own, as wait_for's
                async with asyncio.timeout(effect.timeout_s):
                    outcome = await effect.ref
            elif isinstance(effect, Target):
                outcome = await transport.target()
            elif isinstance(effect, Lost):
                outcome = await transport.lost(effect.target, effect.error)
            else:
                await asyncio.sleep(effect.seconds)
        except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
            steps.close()  # the caller stopped waiting: end the steps (their finally runs)
            raise
        except BaseException as exc:  # into the steps at their yield: they decide
            error = exc


def drive_sync(steps: Steps, transport: Transport, portal: Portal) -> Any:
    """Run ``steps`` on the calling thread (a thread that runs no event loop of the
    client's: not the portal's own)."""
    portal.refuse_own_thread()
    outcome: Any = None
    error: BaseException | None = None
    while True:
        try:
            effect = steps.send(outcome) if error is None else steps.throw(error)
        except StopIteration as stop:
            return stop.value
        outcome, error = None, None
        try:
            if isinstance(effect, Get):  # past the timeout: GetTimeoutError, a TimeoutError
                outcome = ray.get(effect.ref, timeout=effect.timeout_s)
            elif isinstance(effect, Target):
                outcome = transport.target_now()
            elif isinstance(effect, Lost):
                outcome = portal.run(transport.lost(effect.target, effect.error))
            else:
                time.sleep(effect.seconds)
        except (KeyboardInterrupt, SystemExit):
            steps.close()
            raise
        except BaseException as exc:
            error = exc
