"""How a supervisor watches a child: one pending ``watch`` call, tied to an incarnation.

A pending ``watch`` call fails promptly when the child's process dies and returns when
the child exits normally, so a supervisor notices a death without polling. That leaves
one gap: a crash *between* the supervisor learning that the child serves (its ``ready``
answer) and its next ``watch`` call. Ray holds that call for the restarted process,
which would take it like any other, and the crash would never be counted against the
restart intensity.

So every process of a watched actor draws an incarnation (Ray runs ``__init__`` again
on each restart), reports it from ``ready``, and the supervisor passes the one it knows
to ``watch``: a process that is not that incarnation answers :data:`RESTARTED` at once.

Stopping a child on purpose is OTP's ``shutdown`` with a timeout (:func:`stop_child`):
the supervisor asks the child to ``drain`` — export what it buffers, such as its spans
(:func:`overstory.telemetry.flush_async`) — waits at most the timeout, then kills it;
a hung child is killed all the same, and a child without ``drain`` at once.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

__all__ = [
    "DRAIN_TIMEOUT_S",
    "RESTARTED",
    "new_incarnation",
    "stop_child",
    "until_death",
    "watched_elsewhere",
]

log = logging.getLogger(__name__)

#: How long a child being stopped may take to drain before it is killed (seconds).
DRAIN_TIMEOUT_S = 2.0
#: Beyond the drain's own timeout, for the call to reach the child and come back.
_CALL_SLACK_S = 1.0

#: What ``watch`` answers when the process asked about is gone: a restart was missed.
RESTARTED = "restarted"


def new_incarnation() -> str:
    """A fresh incarnation id for this process of an actor."""
    return uuid.uuid4().hex[:16]


def watched_elsewhere(expected: str | None, mine: str) -> bool:
    """Whether a ``watch(expected)`` call reached another incarnation than it was meant for
    (``None``: the caller knows no incarnation and only waits)."""
    return expected is not None and expected != mine


async def until_death(expected: str | None, mine: str) -> str:
    """``watch`` of an actor that never exits normally (a supervisor, a host): answers
    :data:`RESTARTED` at once for another incarnation, else stays pending — only the
    process's death ends the call, and the watcher sees that as a failure."""
    if watched_elsewhere(expected, mine):
        return RESTARTED
    await asyncio.get_running_loop().create_future()  # nothing resolves it
    return "shutdown"


async def stop_child(handle: Any, timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
    """Stop a child on purpose: ask it to ``drain(timeout_s)`` (if its class has that
    method), wait at most ``timeout_s`` and a little, then ``ray.kill`` it without
    restart. Returns whether it drained; a child that hangs, died already or has no
    ``drain`` is killed all the same (``ray.kill`` runs no exit handler in it)."""
    drained = False
    try:
        drain = handle.drain
    except AttributeError:  # its class has no drain: nothing to export
        drain = None
    if drain is not None:
        try:
            await asyncio.wait_for(drain.remote(timeout_s), timeout_s + _CALL_SLACK_S)
            drained = True
        except TimeoutError:
            log.warning("a child did not drain within %g s; killing it", timeout_s)
        except (RayActorError, RayTaskError) as exc:  # dead already, or its drain failed
            log.info("draining a child failed (%s: %s); killing it", type(exc).__name__, exc)
    ray.kill(handle, no_restart=True)
    return drained
