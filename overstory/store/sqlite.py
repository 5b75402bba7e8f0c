"""SQLite history store: the embedded default for one machine.

stdlib ``sqlite3`` in WAL mode with ``synchronous=FULL``, so a message is on disk when
:meth:`append` returns. Each process (a host, a dedicated conversation actor) opens one
connection to the file; WAL lets them read while one writes, and ``busy_timeout``
queues writers.

**Group commit.** Writes (:meth:`append`, :meth:`acquire`) are queued and flushed at the
next turn of the event loop, all of them in one transaction: one fsync for every write
that arrived meanwhile, each in a savepoint of its own so one write's failure (a seq
conflict, a fenced epoch) never touches another's. A caller's write returns only after
the transaction that holds it has committed. A host serving thousands of conversations
then pays one fsync per loop iteration, not one per message; a lone writer pays one
loop hop more than a direct commit.

The sqlite3 calls run on the caller's event loop, blocking it for the length of one
flush (an insert with its fsync is ~0.5 ms here). Handing each call to a worker thread
cost more than that in thread hand-offs inside a Ray actor (measured: a turn went from
3.8 ms to 8.8 ms). The price: while another process holds the write lock, this
process's history reads wait too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

from ..exceptions import Fenced, SequenceConflict, StoreError, StoreUnavailable
from ..messages import Message
from .base import HistoryStore
from .records import Consistency, Record, RecordKind, StoreSnapshot

__all__ = ["SQLiteStore"]

T = TypeVar("T")

# ``messages.body`` is a message's JSON text, or its sealed record (.crypto): ``enc2``
# bytes, stored as a BLOB — a TEXT column converts only numbers to text, so a BLOB bound
# into it stays a BLOB (no schema change; older files hold ``enc1`` text, which still
# opens, beside them).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    conversation_id TEXT NOT NULL,
    seq             INTEGER NOT NULL CHECK (seq >= 0),
    turn_id         TEXT NOT NULL,
    kind            TEXT NOT NULL,
    created_at      REAL NOT NULL,
    body            TEXT NOT NULL,
    hidden          INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (conversation_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_turn ON messages (conversation_id, turn_id);
CREATE TABLE IF NOT EXISTS conversations (
    conversation_id TEXT PRIMARY KEY,
    epoch           INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS vault (
    agent       TEXT NOT NULL,
    owner       TEXT NOT NULL,
    collection  TEXT NOT NULL,
    key         TEXT NOT NULL,
    document    TEXT NOT NULL,
    expires_at  REAL,
    PRIMARY KEY (agent, owner, collection, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS vault_expiry ON vault (expires_at) WHERE expires_at IS NOT NULL;
"""


#: Each record kind's table and columns (in the shape of .records), in read order.
_TABLES: dict[RecordKind, tuple[str, tuple[str, ...], str]] = {
    "setting": ("settings", ("key", "value"), "key"),
    "message": (
        "messages",
        ("conversation_id", "seq", "turn_id", "kind", "created_at", "body", "hidden"),
        "conversation_id, seq",
    ),
    "vault": (
        "vault",
        ("agent", "owner", "collection", "key", "document", "expires_at"),
        "agent, owner, collection, key",
    ),
    "conversation": ("conversations", ("conversation_id", "epoch"), "conversation_id"),
}


def _record(kind: RecordKind, columns: tuple[str, ...], row: tuple[Any, ...]) -> Record:
    record = dict(zip(columns, row, strict=True))
    if kind == "message":
        record["created_at"], record["hidden"] = float(record["created_at"]), bool(record["hidden"])
    elif kind == "vault" and record["expires_at"] is not None:
        record["expires_at"] = float(record["expires_at"])
    return record


class _Snapshot(StoreSnapshot):
    """One read transaction on a connection of its own: in WAL mode it sees the file as
    it was at its first read, whatever is committed meanwhile, and blocks no writer."""

    consistency: Consistency = "transaction"

    def __init__(self, conn: sqlite3.Connection, url: str, page: int = 500) -> None:
        self._conn, self._url, self._page = conn, url, page

    async def records(self, kind: RecordKind) -> AsyncIterator[Record]:
        table, columns, order = _TABLES[kind]
        try:
            cursor = self._conn.execute(
                f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}"
            )
            while rows := cursor.fetchmany(self._page):
                for row in rows:
                    yield _record(kind, columns, row)
                await asyncio.sleep(0)  # one page at a time: the loop's other work goes on
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read {table} from {self._url}: {exc}") from exc


_Write = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]"]


def _fence(conn: sqlite3.Connection, conversation_id: str, epoch: int | None) -> None:
    """:class:`Fenced` unless ``epoch`` is still the conversation's (``None``: no check);
    run inside the write it guards (one writer at a time)."""
    if epoch is None:
        return
    found = conn.execute(
        "SELECT epoch FROM conversations WHERE conversation_id = ?", (conversation_id,)
    ).fetchone()
    current = int(found[0]) if found else 0
    if current != epoch:
        raise Fenced(conversation_id, epoch, current)


class SQLiteStore(HistoryStore):
    """History in one SQLite file at ``path``."""

    def __init__(self, path: str, *, busy_timeout_s: float = 30.0) -> None:
        self.path = os.path.abspath(path)
        self._busy_timeout_ms = int(busy_timeout_s * 1000)
        self._conn: sqlite3.Connection | None = None
        self._queue: list[_Write] = []
        self.flushes = 0  # transactions committed (each holds one or more writes)
        self.writes = 0

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            raise StoreError(f"store {self.url} is not open; call open() first")
        return fn(self._conn)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in the next group commit; returns once that commit is durable."""
        if self._conn is None:
            raise StoreError(f"store {self.url} is not open; call open() first")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue.append((fn, future))
        return await future

    def _flush(self) -> None:
        """Commit every queued write in one transaction, each in its own savepoint."""
        batch, self._queue = self._queue, []
        conn = self._conn
        if conn is None:
            error = StoreError(f"store {self.url} was closed before the write committed")
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        done: list[tuple[asyncio.Future[Any], Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(StoreError(f"cannot write to {self.url}: {exc}"))
            return
        # A lone write needs no savepoint: if it fails, rolling the transaction back
        # undoes exactly it (and saves two statements on every quiet turn).
        alone = len(batch) == 1
        try:
            for fn, future in batch:
                if not alone:
                    conn.execute("SAVEPOINT w")
                try:
                    result = fn(conn)
                except Exception as exc:
                    if not alone:
                        conn.execute("ROLLBACK TO w")
                        conn.execute("RELEASE w")
                    if not future.done():
                        future.set_exception(exc)
                    continue
                if not alone:
                    conn.execute("RELEASE w")
                done.append((future, result))
            conn.execute("COMMIT" if done else "ROLLBACK")
        except sqlite3.Error as exc:
            # The transaction as a whole failed: none of its writes is stored.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            for _, future in batch:
                if not future.done():
                    future.set_exception(StoreError(f"cannot commit to {self.url}: {exc}"))
            return
        self.flushes += 1
        self.writes += len(batch)
        for future, result in done:
            if not future.done():
                future.set_result(result)

    async def open(self) -> None:
        if self._conn is not None:
            return
        try:
            self._conn = self._connect()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open SQLite store {self.url}: {exc}") from exc
        try:
            await self._verify_data_keys()
        except BaseException:
            await self.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            raise sqlite3.OperationalError(f"directory {directory!r} does not exist")
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        try:
            conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"WAL mode refused (journal_mode={mode})")
            conn.execute("PRAGMA synchronous = FULL")
            conn.executescript(_SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
            if "hidden" not in columns:  # a store made before tombstones
                conn.execute("ALTER TABLE messages ADD COLUMN hidden INTEGER NOT NULL DEFAULT 0")
        except BaseException:
            conn.close()
            raise
        return conn

    async def acquire(self, conversation_id: str) -> int:
        def bump(conn: sqlite3.Connection) -> int:
            try:
                row = conn.execute(
                    "INSERT INTO conversations (conversation_id, epoch) VALUES (?, 1)"
                    " ON CONFLICT (conversation_id) DO UPDATE SET epoch = epoch + 1"
                    " RETURNING epoch",
                    (conversation_id,),
                ).fetchone()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot take over conversation in {self.url}: {exc}") from exc
            return int(row[0])

        return await self._write(bump)

    async def append(
        self, conversation_id: str, message: Message, *, epoch: int | None = None
    ) -> None:
        record = self._to_record(conversation_id, message)
        row = (
            conversation_id,
            record["seq"],
            record["turn_id"],
            record["kind"],
            record["created_at"],
            record["body"],
        )

        def insert(conn: sqlite3.Connection) -> None:
            try:
                _fence(conn, conversation_id, epoch)
                conn.execute(
                    "INSERT INTO messages (conversation_id, seq, turn_id, kind, created_at, body)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    row,
                )
            except sqlite3.IntegrityError as exc:
                if "UNIQUE" in str(exc) or "PRIMARY KEY" in str(exc):
                    raise SequenceConflict(conversation_id, message.seq) from exc
                raise StoreError(f"cannot store message seq={message.seq}: {exc}") from exc
            except sqlite3.Error as exc:
                raise StoreError(f"cannot store message in {self.url}: {exc}") from exc

        await self._write(insert)

    async def get_setting(self, key: str) -> str | None:
        def select(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
            return None if row is None else str(row[0])

        try:
            return await self._run(select)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read setting {key!r} from {self.url}: {exc}") from exc

    async def _put_setting(self, key: str, value: str, *, expected: str | None) -> bool:
        def swap(conn: sqlite3.Connection) -> bool:
            try:
                if expected is None:
                    cursor = conn.execute(
                        "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT DO NOTHING",
                        (key, value),
                    )
                else:
                    cursor = conn.execute(
                        "UPDATE settings SET value = ? WHERE key = ? AND value = ?",
                        (value, key, expected),
                    )
            except sqlite3.Error as exc:
                raise StoreError(f"cannot store setting {key!r} in {self.url}: {exc}") from exc
            return cursor.rowcount == 1

        return await self._write(swap)

    async def _delete_setting(self, key: str, *, expected: str) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            try:
                cursor = conn.execute(
                    "DELETE FROM settings WHERE key = ? AND value = ?", (key, expected)
                )
            except sqlite3.Error as exc:
                raise StoreError(f"cannot delete setting {key!r} in {self.url}: {exc}") from exc
            return cursor.rowcount == 1

        return await self._write(delete)

    async def settings(
        self, prefix: str, *, after: str = "", limit: int = 100
    ) -> list[tuple[str, str]]:
        # A range on the primary key, not LIKE: prefixes may hold % and _.
        start = max(prefix, after)

        def select(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            rows = conn.execute(
                "SELECT key, value FROM settings WHERE key > ? AND key >= ? ORDER BY key LIMIT ?",
                (after, start, limit),
            ).fetchall()
            return [(str(k), str(v)) for k, v in rows]

        try:
            rows = await self._run(select)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot list settings from {self.url}: {exc}") from exc
        return [(k, v) for k, v in rows if k.startswith(prefix)]  # contiguous: a prefix ends

    async def vault_put(
        self,
        space: tuple[str, str],
        collection: str,
        key: str,
        document: str,
        expires_at: float | None,
    ) -> None:
        def upsert(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    "INSERT INTO vault (agent, owner, collection, key, document, expires_at)"
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (agent, owner, collection, key)"
                    " DO UPDATE SET document = excluded.document, expires_at = excluded.expires_at",
                    (*space, collection, key, document, expires_at),
                )
            except sqlite3.Error as exc:
                raise StoreError(f"cannot store a vault document in {self.url}: {exc}") from exc

        await self._write(upsert)

    async def vault_replace(
        self, space: tuple[str, str], collection: str, key: str, old: str, new: str
    ) -> bool:
        def swap(conn: sqlite3.Connection) -> bool:
            try:
                cursor = conn.execute(
                    "UPDATE vault SET document = ? WHERE agent = ? AND owner = ?"
                    " AND collection = ? AND key = ? AND document = ?",
                    (new, *space, collection, key, old),
                )
            except sqlite3.Error as exc:
                raise StoreError(f"cannot rewrite a vault document in {self.url}: {exc}") from exc
            return cursor.rowcount == 1

        return await self._write(swap)

    async def vault_document(self, space: tuple[str, str], collection: str, key: str) -> str | None:
        return await self._vault_read(space, collection, key, live=False)

    async def vault_get(self, space: tuple[str, str], collection: str, key: str) -> str | None:
        return await self._vault_read(space, collection, key, live=True)

    async def _vault_read(
        self, space: tuple[str, str], collection: str, key: str, *, live: bool
    ) -> str | None:
        """One document as stored; ``live``: ``None`` once it has expired."""
        query = (
            "SELECT document FROM vault WHERE agent = ? AND owner = ? AND collection = ?"
            " AND key = ?"
        )
        args: tuple[object, ...] = (*space, collection, key)
        if live:
            query += " AND (expires_at IS NULL OR expires_at > ?)"
            args = (*args, time.time())

        def select(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(query, args).fetchone()
            return None if row is None else str(row[0])

        try:
            return await self._run(select)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the vault in {self.url}: {exc}") from exc

    async def vault_delete(self, space: tuple[str, str], collection: str, key: str | None) -> int:
        def delete(conn: sqlite3.Connection) -> int:
            try:
                if key is None:
                    cursor = conn.execute(
                        "DELETE FROM vault WHERE agent = ? AND owner = ? AND collection = ?",
                        (*space, collection),
                    )
                else:
                    cursor = conn.execute(
                        "DELETE FROM vault WHERE agent = ? AND owner = ? AND collection = ?"
                        " AND key = ?",
                        (*space, collection, key),
                    )
            except sqlite3.Error as exc:
                raise StoreError(f"cannot delete from the vault in {self.url}: {exc}") from exc
            return int(cursor.rowcount)

        return await self._write(delete)

    async def vault_scan(
        self, space: tuple[str, str], collection: str, *, after: str = "", limit: int = 100
    ) -> list[tuple[str, str]]:
        def select(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            rows = conn.execute(
                "SELECT key, document FROM vault WHERE agent = ? AND owner = ? AND collection = ?"
                " AND key > ? AND (expires_at IS NULL OR expires_at > ?) ORDER BY key LIMIT ?",
                (*space, collection, after, time.time(), limit),
            ).fetchall()
            return [(str(k), str(d)) for k, d in rows]

        try:
            return await self._run(select)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the vault in {self.url}: {exc}") from exc

    async def vault_rows(
        self, after: tuple[str, str, str, str] | None = None, limit: int = 500
    ) -> list[tuple[str, str, str, str, str, float | None]]:
        start = after if after is not None else ("", "", "", "")

        def select(conn: sqlite3.Connection) -> list[tuple[str, str, str, str, str, float | None]]:
            rows = conn.execute(
                "SELECT agent, owner, collection, key, document, expires_at FROM vault"
                " WHERE (agent, owner, collection, key) > (?, ?, ?, ?)"
                " ORDER BY agent, owner, collection, key LIMIT ?",
                (*start, limit),
            ).fetchall()
            return [
                (str(a), str(o), str(c), str(k), str(d), None if e is None else float(e))
                for a, o, c, k, d, e in rows
            ]

        try:
            return await self._run(select)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the vault in {self.url}: {exc}") from exc

    async def vault_collections(self, agent: str, owner: str | None) -> list[tuple[str, str, int]]:
        def select(conn: sqlite3.Connection) -> list[tuple[str, str, int]]:
            query = (
                "SELECT owner, collection, COUNT(*) FROM vault WHERE agent = ?"
                " AND (expires_at IS NULL OR expires_at > ?)"
            )
            args: tuple[Any, ...] = (agent, time.time())
            if owner is not None:
                query, args = query + " AND owner = ?", (*args, owner)
            rows = conn.execute(query + " GROUP BY owner, collection ORDER BY 1, 2", args)
            return [(str(o), str(c), int(n)) for o, c, n in rows.fetchall()]

        try:
            return await self._run(select)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the vault in {self.url}: {exc}") from exc

    async def load(
        self, conversation_id: str, *, after: int = -1, limit: int | None = None
    ) -> list[Message]:
        return await self._select(
            "WHERE conversation_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (conversation_id, after, -1 if limit is None else limit),
            conversation_id,
        )

    async def load_last(
        self, conversation_id: str, n: int, *, before: int | None = None
    ) -> list[Message]:
        below = 2**63 - 1 if before is None else before
        found = await self._select(
            "WHERE conversation_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
            (conversation_id, below, n),
            conversation_id,
        )
        return found[::-1]

    async def load_turn(self, conversation_id: str, turn_id: str) -> list[Message]:
        # Named: without statistics the planner would rather walk the primary key in
        # seq order (no sort) than seek the index — the whole conversation, every turn.
        return await self._select(
            "INDEXED BY messages_turn WHERE conversation_id = ? AND turn_id = ? ORDER BY seq",
            (conversation_id, turn_id),
            conversation_id,
        )

    async def _select(
        self, where: str, args: tuple[Any, ...], conversation_id: str
    ) -> list[Message]:
        def select(conn: sqlite3.Connection) -> list[Any]:
            return conn.execute(
                "SELECT seq, turn_id, kind, created_at, body, hidden FROM messages " + where, args
            ).fetchall()

        try:
            rows = await self._run(select)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read history from {self.url}: {exc}") from exc
        return [
            self._from_record(
                conversation_id,
                {
                    "seq": r[0],
                    "turn_id": r[1],
                    "kind": r[2],
                    "created_at": r[3],
                    "body": r[4],
                    "hidden": bool(r[5]),
                },
            )
            for r in rows
        ]

    async def bodies(
        self, after: tuple[str, int] | None = None, limit: int = 500
    ) -> list[tuple[str, int, str | bytes]]:
        cid, seq = after if after is not None else ("", -1)

        def select(conn: sqlite3.Connection) -> list[tuple[str, int, str | bytes]]:
            rows = conn.execute(
                "SELECT conversation_id, seq, body FROM messages"
                " WHERE (conversation_id, seq) > (?, ?) ORDER BY conversation_id, seq LIMIT ?",
                (cid, seq, limit),
            ).fetchall()
            return [(str(c), int(n), b if isinstance(b, bytes) else str(b)) for c, n, b in rows]

        try:
            return await self._run(select)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read messages from {self.url}: {exc}") from exc

    async def hide(self, conversation_id: str, seq: int, *, epoch: int | None = None) -> bool:
        def mark(conn: sqlite3.Connection) -> bool:
            try:
                _fence(conn, conversation_id, epoch)
                cursor = conn.execute(
                    "UPDATE messages SET hidden = 1 WHERE conversation_id = ? AND seq = ?",
                    (conversation_id, seq),
                )
            except sqlite3.Error as exc:
                raise StoreError(f"cannot hide a message in {self.url}: {exc}") from exc
            return cursor.rowcount == 1

        return await self._write(mark)

    async def replace_body(
        self, conversation_id: str, seq: int, old: str | bytes, new: str | bytes
    ) -> bool:
        # A BLOB never equals a TEXT (the column's TEXT affinity leaves a bound BLOB a
        # BLOB): ``old`` matches only the body as stored, in its storage class.
        def swap(conn: sqlite3.Connection) -> bool:
            try:
                cursor = conn.execute(
                    "UPDATE messages SET body = ? WHERE conversation_id = ? AND seq = ?"
                    " AND body = ?",
                    (new, conversation_id, seq, old),
                )
            except sqlite3.Error as exc:
                raise StoreError(f"cannot rewrite a message in {self.url}: {exc}") from exc
            return cursor.rowcount == 1

        return await self._write(swap)

    async def count(self, conversation_id: str | None = None) -> int:
        def select(conn: sqlite3.Connection) -> int:
            if conversation_id is None:
                row = conn.execute("SELECT COUNT(*) FROM messages").fetchone()
            else:
                row = conn.execute(
                    "SELECT COUNT(*) FROM messages WHERE conversation_id = ?", (conversation_id,)
                ).fetchone()
            return int(row[0])

        try:
            return await self._run(select)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot count messages in {self.url}: {exc}") from exc

    async def conversation_ids(self) -> list[str]:
        def select(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT DISTINCT conversation_id FROM messages ORDER BY conversation_id"
            )
            return [r[0] for r in rows]

        try:
            return await self._run(select)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot list conversations in {self.url}: {exc}") from exc

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[StoreSnapshot]:
        if self._conn is None:
            raise StoreError(f"store {self.url} is not open; call open() first")
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
            conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            conn.execute("BEGIN")
            conn.execute("SELECT COUNT(*) FROM settings").fetchone()  # the snapshot starts
        except sqlite3.Error as exc:
            raise StoreError(f"cannot start a read transaction on {self.url}: {exc}") from exc
        try:
            yield _Snapshot(conn, self.url)
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            conn.close()

    async def census(self) -> dict[RecordKind, int]:
        def select(conn: sqlite3.Connection) -> dict[RecordKind, int]:
            return {
                kind: int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
                for kind, (table, _, _) in _TABLES.items()
            }

        try:
            return await self._run(select)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot count records in {self.url}: {exc}") from exc

    async def _insert_records(self, kind: RecordKind, records: Sequence[Record]) -> None:
        table, columns, _ = _TABLES[kind]
        rows = [tuple(record[c] for c in columns) for record in records]
        statement = (
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        )

        def insert(conn: sqlite3.Connection) -> None:
            try:
                conn.executemany(statement, rows)
            except sqlite3.Error as exc:
                raise StoreError(f"cannot restore {kind} records into {self.url}: {exc}") from exc

        await self._write(insert)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
