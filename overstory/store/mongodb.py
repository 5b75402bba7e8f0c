"""MongoDB history store through PyMongo's async API (``pymongo.AsyncMongoClient``).

Motor, the older async driver, reached end of life on 2026-05-14; PyMongo Async is its
official successor. One document per message in the ``messages`` collection, with a
unique index on ``(conversation_id, seq)`` — never one growing document per
conversation, which would hit MongoDB's 16 MB document limit. Writes use majority write
concern with journaling, so a message is durable when :meth:`append` returns.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from pymongo import ASCENDING, AsyncMongoClient, WriteConcern
from pymongo.errors import DuplicateKeyError, PyMongoError

from ..exceptions import SequenceConflict, StoreError, StoreUnavailable
from ..messages import Message, from_record, to_record
from .base import HistoryStore
from .url import redact_url

__all__ = ["MongoStore"]

DEFAULT_DATABASE = "overstory"


class MongoStore(HistoryStore):
    """History in a MongoDB database (``mongodb://host:port/dbname``)."""

    def __init__(self, url: str, *, timeout_s: float = 5.0) -> None:
        self._url = url
        self._timeout_ms = int(timeout_s * 1000)
        self.database = urlsplit(url).path.lstrip("/") or DEFAULT_DATABASE
        self._client: AsyncMongoClient[dict[str, Any]] | None = None

    @property
    def url(self) -> str:
        return redact_url(self._url)

    @property
    def _messages(self) -> Any:
        if self._client is None:
            raise StoreError(f"store {self.url} is not open; call open() first")
        return self._client[self.database].get_collection(
            "messages", write_concern=WriteConcern(w="majority", j=True)
        )

    async def open(self) -> None:
        if self._client is not None:
            return
        try:
            client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
                self._url,
                serverSelectionTimeoutMS=self._timeout_ms,
                connectTimeoutMS=self._timeout_ms,
                retryWrites=True,
            )
        except (PyMongoError, ValueError, TypeError) as exc:
            raise StoreUnavailable(f"cannot use MongoDB store {self.url}: {exc}") from exc
        try:
            await client.admin.command("ping")
            await client[self.database]["messages"].create_index(
                [("conversation_id", ASCENDING), ("seq", ASCENDING)],
                unique=True,
                name="conversation_seq_unique",
            )
        except PyMongoError as exc:
            await client.close()
            raise StoreUnavailable(
                f"cannot reach MongoDB store {self.url}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:300]}"
            ) from exc
        self._client = client

    async def append(self, conversation_id: str, message: Message) -> None:
        doc = {"conversation_id": conversation_id, **to_record(message)}
        try:
            await self._messages.insert_one(doc)
        except DuplicateKeyError as exc:
            raise SequenceConflict(conversation_id, message.seq) from exc
        except PyMongoError as exc:
            raise StoreError(
                f"cannot store message seq={message.seq} in {self.url}: {exc}"
            ) from exc

    async def load(self, conversation_id: str) -> list[Message]:
        try:
            cursor = self._messages.find(
                {"conversation_id": conversation_id}, {"_id": 0, "conversation_id": 0}
            ).sort("seq", ASCENDING)
            return [from_record(doc) async for doc in cursor]
        except PyMongoError as exc:
            raise StoreError(f"cannot read history from {self.url}: {exc}") from exc

    async def count(self, conversation_id: str | None = None) -> int:
        query = {} if conversation_id is None else {"conversation_id": conversation_id}
        try:
            return int(await self._messages.count_documents(query))
        except PyMongoError as exc:
            raise StoreError(f"cannot count messages in {self.url}: {exc}") from exc

    async def conversation_ids(self) -> list[str]:
        try:
            ids = await self._messages.distinct("conversation_id")
        except PyMongoError as exc:
            raise StoreError(f"cannot list conversations in {self.url}: {exc}") from exc
        return sorted(str(i) for i in ids)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()
