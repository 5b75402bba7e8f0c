"""MongoDB history store through PyMongo's async API (``pymongo.AsyncMongoClient``).

Motor, the older async driver, reached end of life on 2026-05-14; PyMongo Async is its
official successor. One document per message in the ``messages`` collection, with a
unique index on ``(conversation_id, seq)`` — never one growing document per
conversation, which would hit MongoDB's 16 MB document limit. Writes use majority write
concern with journaling, so a message is durable when :meth:`append` returns. A sealed
message body (``enc2``, :mod:`.crypto`) is BSON binary data, read back as ``bytes``.

Fencing keeps one document per conversation in ``conversations`` holding its epoch. A
fenced append runs in a transaction that first updates that document *conditioned on
the epoch* and then inserts the message: a concurrent takeover (``$inc`` of the epoch)
write-conflicts with it, so a zombie's write either lands before the takeover or not at
all. Transactions need a replica set or a sharded cluster (every production deployment
and Atlas); on a standalone server the check and the insert are two steps and a write
racing a takeover by milliseconds can still land — :attr:`MongoStore.atomic_fencing`
says which one you have.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, ReturnDocument, WriteConcern
from pymongo.errors import DuplicateKeyError, OperationFailure, PyMongoError

from ..exceptions import Fenced, SequenceConflict, StoreError, StoreUnavailable
from ..messages import Message
from .base import HistoryStore
from .records import Consistency, Record, RecordKind, StoreSnapshot
from .url import redact_url

__all__ = ["MongoStore"]


def _epoch(moment: datetime) -> float:
    """A stored datetime (naive ones are UTC, as PyMongo returns them) as epoch seconds."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


DEFAULT_DATABASE = "overstory"

#: Each record kind's collection and sort order (the order of .records).
_COLLECTIONS: dict[RecordKind, tuple[str, list[tuple[str, int]]]] = {
    "setting": ("settings", [("_id", ASCENDING)]),
    "message": ("messages", [("conversation_id", ASCENDING), ("seq", ASCENDING)]),
    "vault": (
        "vault",
        [("agent", ASCENDING), ("owner", ASCENDING), ("collection", ASCENDING), ("key", ASCENDING)],
    ),
    "conversation": ("conversations", [("_id", ASCENDING)]),
}


def _body(stored: object) -> str | bytes:
    """A stored message body as read: JSON or ``enc1`` text, or ``enc2`` bytes (BSON
    binary, which PyMongo reads back as ``bytes``)."""
    return stored if isinstance(stored, bytes) else str(stored)


def _record(kind: RecordKind, d: dict[str, Any]) -> Record:
    """A stored document in the shape of :mod:`.records`."""
    if kind == "setting":
        return {"key": str(d["_id"]), "value": str(d["value"])}
    if kind == "message":
        return {
            "conversation_id": str(d["conversation_id"]),
            "seq": int(d["seq"]),
            "turn_id": str(d["turn_id"]),
            "kind": str(d["kind"]),
            "created_at": float(d["created_at"]),
            "body": _body(d["body"]),
            "hidden": bool(d.get("hidden", False)),
        }
    if kind == "vault":
        expires = d.get("expires_at")
        return {
            "agent": str(d["agent"]),
            "owner": str(d["owner"]),
            "collection": str(d["collection"]),
            "key": str(d["key"]),
            "document": str(d["document"]),
            "expires_at": None if expires is None else _epoch(expires),
        }
    return {"conversation_id": str(d["_id"]), "epoch": int(d["epoch"])}


def _document(kind: RecordKind, record: Record) -> dict[str, Any]:
    """A record of :mod:`.records` as the document this store keeps for it."""
    if kind == "setting":
        return {"_id": record["key"], "value": record["value"]}
    if kind == "message":
        doc = {k: v for k, v in record.items() if k != "hidden"}
        return {**doc, "hidden": True} if record["hidden"] else doc  # as append/hide write it
    if kind == "vault":
        expires = record["expires_at"]
        return {
            **record,
            "expires_at": None if expires is None else datetime.fromtimestamp(expires, UTC),
        }
    return {"_id": record["conversation_id"], "epoch": record["epoch"]}


class _Snapshot(StoreSnapshot):
    """The store read through one snapshot session when the server offers one (a replica
    set: every read at one cluster time), plain reads otherwise; either way each
    conversation's messages are read up to a bound taken first (see :meth:`records`)."""

    def __init__(self, store: MongoStore, session: Any, consistency: Consistency) -> None:
        self._store, self._session, self.consistency = store, session, consistency

    async def _bounds(self) -> dict[str, int]:
        """Each conversation's highest seq, now (after the settings were read)."""
        pipeline = [{"$group": {"_id": "$conversation_id", "last": {"$max": "$seq"}}}]
        cursor = await self._store._messages.aggregate(pipeline, session=self._session)
        return {str(d["_id"]): int(d["last"]) async for d in cursor}

    async def records(self, kind: RecordKind) -> AsyncIterator[Record]:
        name, order = _COLLECTIONS[kind]
        try:
            # A conversation's messages are appended one at a time in seq order (each
            # durable before the next is written) and never deleted: all those up to the
            # highest seq seen at one instant exist, and reading up to it gives the
            # prefix the conversation had then, whatever is appended meanwhile.
            bounds = await self._bounds() if kind == "message" else {}
            cursor = self._store._collection(name).find({}, session=self._session).sort(order)
            async for d in cursor:
                record = _record(kind, d)
                if kind == "message" and record["seq"] > bounds.get(record["conversation_id"], -1):
                    continue  # appended after the bounds were taken
                yield record
        except PyMongoError as exc:
            raise StoreError(f"cannot read {name} from {self._store.url}: {exc}") from exc


class MongoStore(HistoryStore):
    """History in a MongoDB database (``mongodb://host:port/dbname``)."""

    def __init__(self, url: str, *, timeout_s: float = 5.0) -> None:
        self._url = url
        self._timeout_ms = int(timeout_s * 1000)
        self.database = urlsplit(url).path.lstrip("/") or DEFAULT_DATABASE
        self._client: AsyncMongoClient[dict[str, Any]] | None = None
        self.atomic_fencing = False

    @property
    def url(self) -> str:
        return redact_url(self._url)

    def _collection(self, name: str) -> Any:
        if self._client is None:
            raise StoreError(f"store {self.url} is not open; call open() first")
        return self._client[self.database].get_collection(
            name, write_concern=WriteConcern(w="majority", j=True)
        )

    @property
    def _messages(self) -> Any:
        return self._collection("messages")

    @property
    def _conversations(self) -> Any:
        return self._collection("conversations")

    @property
    def _settings(self) -> Any:
        return self._collection("settings")

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
            hello = await client.admin.command("hello")
            self.atomic_fencing = bool(hello.get("setName") or hello.get("msg") == "isdbgrid")
            await client[self.database]["messages"].create_index(
                [("conversation_id", ASCENDING), ("seq", ASCENDING)],
                unique=True,
                name="conversation_seq_unique",
            )
            await client[self.database]["messages"].create_index(
                [("conversation_id", ASCENDING), ("turn_id", ASCENDING)], name="conversation_turn"
            )
            vault = client[self.database]["vault"]
            await vault.create_index(
                [
                    ("agent", ASCENDING),
                    ("owner", ASCENDING),
                    ("collection", ASCENDING),
                    ("key", ASCENDING),
                ],
                unique=True,
                name="vault_document_unique",
            )
            # MongoDB drops expired documents itself (reads filter them until it does).
            await vault.create_index("expires_at", expireAfterSeconds=0, name="vault_ttl")
        except PyMongoError as exc:
            await client.close()
            raise StoreUnavailable(
                f"cannot reach MongoDB store {self.url}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:300]}"
            ) from exc
        self._client = client
        try:
            await self._verify_data_keys()
        except BaseException:
            await self.close()
            raise

    async def acquire(self, conversation_id: str) -> int:
        try:
            doc = await self._conversations.find_one_and_update(
                {"_id": conversation_id},
                {"$inc": {"epoch": 1}},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
        except PyMongoError as exc:
            raise StoreError(f"cannot take over conversation in {self.url}: {exc}") from exc
        return int(doc["epoch"])

    async def _fence(self, conversation_id: str, epoch: int, session: Any = None) -> None:
        claimed = await self._conversations.find_one_and_update(
            {"_id": conversation_id, "epoch": epoch},
            {"$set": {"written_at": epoch}},
            session=session,
        )
        if claimed is None:
            doc = await self._conversations.find_one({"_id": conversation_id}, session=session)
            raise Fenced(conversation_id, epoch, int(doc["epoch"]) if doc else 0)

    async def append(
        self, conversation_id: str, message: Message, *, epoch: int | None = None
    ) -> None:
        doc = {"conversation_id": conversation_id, **self._to_record(conversation_id, message)}
        try:
            if epoch is None:
                await self._messages.insert_one(doc)
            elif not self.atomic_fencing:
                await self._fence(conversation_id, epoch)
                await self._messages.insert_one(doc)
            else:
                assert self._client is not None

                async def fenced_insert(session: Any) -> None:
                    await self._fence(conversation_id, epoch, session)
                    await self._messages.insert_one(doc, session=session)

                # with_transaction retries a write conflict with a concurrent takeover;
                # the retry then sees the new epoch and raises Fenced.
                async with self._client.start_session() as session:
                    await session.with_transaction(fenced_insert)
        except DuplicateKeyError as exc:
            raise SequenceConflict(conversation_id, message.seq) from exc
        except PyMongoError as exc:
            raise StoreError(
                f"cannot store message seq={message.seq} in {self.url}: {exc}"
            ) from exc

    async def get_setting(self, key: str) -> str | None:
        try:
            doc = await self._settings.find_one({"_id": key})
        except PyMongoError as exc:
            raise StoreError(f"cannot read setting {key!r} from {self.url}: {exc}") from exc
        return None if doc is None else str(doc["value"])

    async def _put_setting(self, key: str, value: str, *, expected: str | None) -> bool:
        try:
            if expected is None:
                try:
                    await self._settings.insert_one({"_id": key, "value": value})
                except DuplicateKeyError:
                    return False
                return True
            result = await self._settings.update_one(
                {"_id": key, "value": expected}, {"$set": {"value": value}}
            )
        except PyMongoError as exc:
            raise StoreError(f"cannot store setting {key!r} in {self.url}: {exc}") from exc
        return bool(result.matched_count == 1)

    async def _delete_setting(self, key: str, *, expected: str) -> bool:
        try:
            result = await self._settings.delete_one({"_id": key, "value": expected})
        except PyMongoError as exc:
            raise StoreError(f"cannot delete setting {key!r} in {self.url}: {exc}") from exc
        return bool(result.deleted_count == 1)

    async def settings(
        self, prefix: str, *, after: str = "", limit: int = 100
    ) -> list[tuple[str, str]]:
        # A range on _id, not a regex: prefixes may hold regex characters.
        query = {"_id": {"$gt": after, "$gte": prefix}}
        try:
            cursor = self._settings.find(query).sort("_id", 1).limit(limit)
            docs = await cursor.to_list()
        except PyMongoError as exc:
            raise StoreError(f"cannot list settings from {self.url}: {exc}") from exc
        pairs = [(str(d["_id"]), str(d["value"])) for d in docs]
        return [(k, v) for k, v in pairs if k.startswith(prefix)]  # contiguous: a prefix ends

    @property
    def _vault(self) -> Any:
        return self._collection("vault")

    @staticmethod
    def _live(query: dict[str, Any]) -> dict[str, Any]:
        now = datetime.now(UTC)
        return {**query, "$or": [{"expires_at": None}, {"expires_at": {"$gt": now}}]}

    async def vault_put(
        self,
        space: tuple[str, str],
        collection: str,
        key: str,
        document: str,
        expires_at: float | None,
    ) -> None:
        expires = None if expires_at is None else datetime.fromtimestamp(expires_at, UTC)
        where = {"agent": space[0], "owner": space[1], "collection": collection, "key": key}
        try:
            await self._vault.update_one(
                where, {"$set": {"document": document, "expires_at": expires}}, upsert=True
            )
        except DuplicateKeyError:  # two upserts raced: the other inserted, ours updates
            await self._vault.update_one(
                where, {"$set": {"document": document, "expires_at": expires}}
            )
        except PyMongoError as exc:
            raise StoreError(f"cannot store a vault document in {self.url}: {exc}") from exc

    async def vault_replace(
        self, space: tuple[str, str], collection: str, key: str, old: str, new: str
    ) -> bool:
        where = {
            "agent": space[0],
            "owner": space[1],
            "collection": collection,
            "key": key,
            "document": old,
        }
        try:
            result = await self._vault.update_one(where, {"$set": {"document": new}})
        except PyMongoError as exc:
            raise StoreError(f"cannot rewrite a vault document in {self.url}: {exc}") from exc
        return bool(result.matched_count == 1)

    async def vault_document(self, space: tuple[str, str], collection: str, key: str) -> str | None:
        where = {"agent": space[0], "owner": space[1], "collection": collection, "key": key}
        try:
            doc = await self._vault.find_one(where)
        except PyMongoError as exc:
            raise StoreError(f"cannot read the vault in {self.url}: {exc}") from exc
        return None if doc is None else str(doc["document"])

    async def vault_get(self, space: tuple[str, str], collection: str, key: str) -> str | None:
        where = {"agent": space[0], "owner": space[1], "collection": collection, "key": key}
        try:
            doc = await self._vault.find_one(self._live(where))
        except PyMongoError as exc:
            raise StoreError(f"cannot read the vault in {self.url}: {exc}") from exc
        return None if doc is None else str(doc["document"])

    async def vault_delete(self, space: tuple[str, str], collection: str, key: str | None) -> int:
        where: dict[str, Any] = {"agent": space[0], "owner": space[1], "collection": collection}
        if key is not None:
            where["key"] = key
        try:
            result = await self._vault.delete_many(where)
        except PyMongoError as exc:
            raise StoreError(f"cannot delete from the vault in {self.url}: {exc}") from exc
        return int(result.deleted_count)

    async def vault_scan(
        self, space: tuple[str, str], collection: str, *, after: str = "", limit: int = 100
    ) -> list[tuple[str, str]]:
        where = {
            "agent": space[0],
            "owner": space[1],
            "collection": collection,
            "key": {"$gt": after},
        }
        try:
            cursor = self._vault.find(self._live(where)).sort("key", ASCENDING).limit(limit)
            return [(str(d["key"]), str(d["document"])) async for d in cursor]
        except PyMongoError as exc:
            raise StoreError(f"cannot read the vault in {self.url}: {exc}") from exc

    async def vault_rows(
        self, after: tuple[str, str, str, str] | None = None, limit: int = 500
    ) -> list[tuple[str, str, str, str, str, float | None]]:
        query: dict[str, Any] = {}
        if after is not None:
            a, o, c, k = after
            query = {
                "$or": [
                    {"agent": {"$gt": a}},
                    {"agent": a, "owner": {"$gt": o}},
                    {"agent": a, "owner": o, "collection": {"$gt": c}},
                    {"agent": a, "owner": o, "collection": c, "key": {"$gt": k}},
                ]
            }
        order = [
            ("agent", ASCENDING),
            ("owner", ASCENDING),
            ("collection", ASCENDING),
            ("key", ASCENDING),
        ]
        try:
            cursor = self._vault.find(query).sort(order).limit(limit)
            return [
                (
                    str(d["agent"]),
                    str(d["owner"]),
                    str(d["collection"]),
                    str(d["key"]),
                    str(d["document"]),
                    None if d.get("expires_at") is None else _epoch(d["expires_at"]),
                )
                async for d in cursor
            ]
        except PyMongoError as exc:
            raise StoreError(f"cannot read the vault in {self.url}: {exc}") from exc

    async def vault_collections(self, agent: str, owner: str | None) -> list[tuple[str, str, int]]:
        where: dict[str, Any] = {"agent": agent}
        if owner is not None:
            where["owner"] = owner
        counts: dict[tuple[str, str], int] = {}
        try:
            async for d in self._vault.find(self._live(where), {"owner": 1, "collection": 1}):
                pair = (str(d["owner"]), str(d["collection"]))
                counts[pair] = counts.get(pair, 0) + 1
        except PyMongoError as exc:
            raise StoreError(f"cannot read the vault in {self.url}: {exc}") from exc
        return [(o, c, n) for (o, c), n in sorted(counts.items())]

    async def load(
        self, conversation_id: str, *, after: int = -1, limit: int | None = None
    ) -> list[Message]:
        query = {"conversation_id": conversation_id, "seq": {"$gt": after}}
        return await self._find(conversation_id, query, ASCENDING, limit)

    async def load_last(
        self, conversation_id: str, n: int, *, before: int | None = None
    ) -> list[Message]:
        query: dict[str, Any] = {"conversation_id": conversation_id}
        if before is not None:
            query["seq"] = {"$lt": before}
        found = await self._find(conversation_id, query, DESCENDING, n)
        return found[::-1]

    async def load_turn(self, conversation_id: str, turn_id: str) -> list[Message]:
        query = {"conversation_id": conversation_id, "turn_id": turn_id}
        return await self._find(conversation_id, query, ASCENDING, None)

    async def _find(
        self, conversation_id: str, query: dict[str, Any], order: int, limit: int | None
    ) -> list[Message]:
        if limit is not None and limit <= 0:
            return []
        try:
            cursor = self._messages.find(query, {"_id": 0, "conversation_id": 0}).sort("seq", order)
            if limit is not None:
                cursor = cursor.limit(limit)
            docs = [doc async for doc in cursor]
        except PyMongoError as exc:
            raise StoreError(f"cannot read history from {self.url}: {exc}") from exc
        return [self._from_record(conversation_id, doc) for doc in docs]

    async def bodies(
        self, after: tuple[str, int] | None = None, limit: int = 500
    ) -> list[tuple[str, int, str | bytes]]:
        query: dict[str, Any] = {}
        if after is not None:
            cid, seq = after
            query = {
                "$or": [
                    {"conversation_id": {"$gt": cid}},
                    {"conversation_id": cid, "seq": {"$gt": seq}},
                ]
            }
        try:
            cursor = (
                self._messages.find(query, {"_id": 0, "conversation_id": 1, "seq": 1, "body": 1})
                .sort([("conversation_id", ASCENDING), ("seq", ASCENDING)])
                .limit(limit)
            )
            return [
                (str(d["conversation_id"]), int(d["seq"]), _body(d["body"])) async for d in cursor
            ]
        except PyMongoError as exc:
            raise StoreError(f"cannot read messages from {self.url}: {exc}") from exc

    async def hide(self, conversation_id: str, seq: int, *, epoch: int | None = None) -> bool:
        where = {"conversation_id": conversation_id, "seq": seq}
        try:
            if epoch is None or not self.atomic_fencing:
                if epoch is not None:
                    await self._fence(conversation_id, epoch)
                result = await self._messages.update_one(where, {"$set": {"hidden": True}})
                return bool(result.matched_count == 1)
            assert self._client is not None
            matched: list[bool] = []

            async def fenced_hide(session: Any) -> None:
                await self._fence(conversation_id, epoch, session)
                result = await self._messages.update_one(
                    where, {"$set": {"hidden": True}}, session=session
                )
                matched[:] = [result.matched_count == 1]

            async with self._client.start_session() as session:
                await session.with_transaction(fenced_hide)
            return bool(matched and matched[0])
        except PyMongoError as exc:
            raise StoreError(f"cannot hide a message in {self.url}: {exc}") from exc

    async def replace_body(
        self, conversation_id: str, seq: int, old: str | bytes, new: str | bytes
    ) -> bool:
        # BSON compares a string and binary data as unequal types: ``old`` matches only
        # the body as stored.
        try:
            result = await self._messages.update_one(
                {"conversation_id": conversation_id, "seq": seq, "body": old},
                {"$set": {"body": new}},
            )
        except PyMongoError as exc:
            raise StoreError(f"cannot rewrite a message in {self.url}: {exc}") from exc
        return bool(result.modified_count == 1)

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

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[StoreSnapshot]:
        if self._client is None:
            raise StoreError(f"store {self.url} is not open; call open() first")
        if not self.atomic_fencing:  # a standalone server has no snapshot reads
            yield _Snapshot(self, None, "per-conversation")
            return
        async with self._client.start_session(snapshot=True) as session:
            chosen: tuple[Any, Consistency] = (session, "snapshot-session")
            try:  # the first read fixes the session's cluster time
                await self._settings.find_one({}, session=session)
            except OperationFailure:  # a server too old for snapshot reads outside a transaction
                chosen = (None, "per-conversation")
            except PyMongoError as exc:
                raise StoreError(f"cannot start a snapshot read of {self.url}: {exc}") from exc
            yield _Snapshot(self, *chosen)

    async def census(self) -> dict[RecordKind, int]:
        try:
            return {
                kind: int(await self._collection(name).count_documents({}))
                for kind, (name, _) in _COLLECTIONS.items()
            }
        except PyMongoError as exc:
            raise StoreError(f"cannot count records in {self.url}: {exc}") from exc

    async def _insert_records(self, kind: RecordKind, records: Sequence[Record]) -> None:
        name, _ = _COLLECTIONS[kind]
        try:
            await self._collection(name).insert_many([_document(kind, r) for r in records])
        except PyMongoError as exc:
            raise StoreError(
                f"cannot restore {kind} records into {self.url}: {str(exc)[:300]}"
            ) from exc

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()
