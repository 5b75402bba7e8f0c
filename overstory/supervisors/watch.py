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
"""

from __future__ import annotations

import asyncio
import uuid

__all__ = ["RESTARTED", "new_incarnation", "until_death", "watched_elsewhere"]

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
