"""What a tool may know about the turn that called it: :class:`RunContext`.

A tool whose first parameter is annotated ``RunContext`` (pydantic-ai's convention) gets
one injected; the parameter is never part of the JSON schema the model sees::

    async def remember(ctx: RunContext, note: str) -> str:
        ctx.report(f"saving a note for {ctx.user_id}")
        ...

Plain tools keep working unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .vault import DataVault

__all__ = ["RunContext"]


@dataclass(frozen=True)
class RunContext:
    """The turn a tool runs in: whose conversation (``user_id`` — for an HTTP
    conversation, its owner), which (``conversation_id``, ``agent``, ``agent_version``,
    ``turn_id``), the agent's :class:`~overstory.vault.DataVault` as this user sees it
    (``vault``; ``vault.sync`` from a sync tool). :meth:`report` sends progress to
    whoever reads the turn's stream."""

    user_id: str
    conversation_id: str
    agent: str
    agent_version: str
    turn_id: str
    vault: DataVault | None = field(default=None, repr=False, compare=False)
    _emit: Callable[[str], object] | None = field(default=None, repr=False, compare=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False, compare=False)

    def report(self, progress: str) -> None:
        """A ``progress`` event in the turn's stream (readers of ``stream``/``resume``
        see it; a turn that is not streamed has no reader, and it goes nowhere). Safe
        from a sync tool, which runs in a worker thread."""
        if not isinstance(progress, str):
            raise TypeError(f"progress is text, got {type(progress).__name__}")
        emit, loop = self._emit, self._loop
        if emit is None or loop is None:
            return
        text = progress[:2000]
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            emit(text)
        else:
            loop.call_soon_threadsafe(emit, text)
