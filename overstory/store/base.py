"""The history store protocol: one durable record per message.

Records are keyed by ``(conversation id, seq)`` with a unique index: appending a
message whose seq is taken raises :class:`~overstory.exceptions.SequenceConflict` and
changes nothing. Stores never update or delete a message record.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from ..messages import Message

__all__ = ["HistoryStore"]


class HistoryStore(ABC):
    """Durable, append-only message history. Async; one instance per process."""

    @property
    @abstractmethod
    def url(self) -> str:
        """The store's URL with any password masked; safe for logs and errors."""

    @abstractmethod
    async def open(self) -> None:
        """Connect and create the schema/indexes. Raises ``StoreUnavailable``. Idempotent."""

    @abstractmethod
    async def append(self, conversation_id: str, message: Message) -> None:
        """Durably store ``message`` at ``message.seq``; returns once it is durable.

        Raises ``SequenceConflict`` when that seq is taken, ``StoreError`` otherwise.
        """

    @abstractmethod
    async def load(self, conversation_id: str) -> list[Message]:
        """Every stored message of the conversation, ordered by seq (empty if none)."""

    @abstractmethod
    async def count(self, conversation_id: str | None = None) -> int:
        """How many messages one conversation (or, with ``None``, the store) holds."""

    @abstractmethod
    async def conversation_ids(self) -> list[str]:
        """Ids of every conversation with at least one message, sorted."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections. Idempotent."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
