"""ConversationActor: one user's conversation as a named, detached Ray actor.

A thin shell around :func:`~overstory.actors.turn.run_turn`: it loads the history from the
store when it starts (so a new incarnation rebuilds itself), runs turns one at a time
through a :class:`~overstory.actors.gate.TurnGate` (each caller's in the order it sent
them), and answers history reads at any time. Users never see this class; they hold a
:class:`~overstory.runtime.client.Conversation`.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from ..agent import Agent
from ..exceptions import SequenceConflict
from ..messages import Message, Reply
from ..store import HistoryStore, open_store
from ..validation import MAX_MESSAGE_CHARS, validate_message
from .gate import TurnGate
from .turn import run_turn

__all__ = ["ConversationActor"]


class ConversationActor:
    """Holds one conversation's history; the Ray actor class is built by ``remote_class``."""

    def __init__(
        self,
        conversation_id: str,
        agent: Agent,
        store_url: str,
        max_message_chars: int = MAX_MESSAGE_CHARS,
    ) -> None:
        self.conversation_id = conversation_id
        self.agent = agent
        self.max_message_chars = max_message_chars
        self._store: HistoryStore = open_store(store_url)
        self._history: list[Message] = []
        self._loaded = False
        self._load_lock = asyncio.Lock()
        self._gate = TurnGate()
        self._started_at = time.time()
        self._turns = 0

    async def _load(self) -> None:
        if self._loaded:
            return
        async with self._load_lock:
            if not self._loaded:
                await self._store.open()
                self._history = await self._store.load(self.conversation_id)
                self._loaded = True

    async def ready(self) -> dict[str, Any]:
        """Loads the history if needed; returns when the actor can serve (activation)."""
        await self._load()
        return self.info()

    def info(self) -> dict[str, Any]:
        return {
            "conversation_id": self.conversation_id,
            "pid": os.getpid(),
            "messages": len(self._history),
            "turns_served": self._turns,
            "started_at": self._started_at,
            "agent": self.agent.name,
        }

    async def send(self, turn_id: str, text: str, caller: str | None = None, n: int = 0) -> Reply:
        """Run turn ``turn_id``; ``caller``/``n`` order one client's sends (see TurnGate)."""
        validate_message(text, max_chars=self.max_message_chars)
        await self._load()
        async with self._gate.turn(caller, n):
            try:
                return await run_turn(
                    self.agent, self._store, self.conversation_id, self._history, turn_id, text
                )
            except SequenceConflict:
                # Someone else wrote this conversation: our copy is stale. Reload so the
                # next turn starts from what is stored, and let the caller know.
                self._history = await self._store.load(self.conversation_id)
                raise
            finally:
                self._turns += 1

    async def history(self) -> list[Message]:
        """The stored messages; during a turn, those of the turn stored so far."""
        await self._load()
        return list(self._history)
