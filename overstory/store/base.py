"""The history store protocol: one durable record per message.

Records are keyed by ``(conversation id, seq)`` with a unique index: appending a
message whose seq is taken raises :class:`~overstory.exceptions.SequenceConflict` and
changes nothing. Stores never update or delete a message record.

Settings (:meth:`HistoryStore.get_setting`, :meth:`HistoryStore.put_setting`) hold the
little cluster state that must outlive every process — the hosted placement's shard
table, rollouts, quotas, jobs, API keys — written by compare-and-set so two writers
never lose each other's update. Every key is declared, with its owner, in
:mod:`.settings` (a write to an undeclared key is refused), and a read-modify-write goes
through :func:`.settings.update`.

Fencing: :meth:`HistoryStore.acquire` gives each new incarnation of a conversation a
higher epoch; an append that carries an older epoch raises
:class:`~overstory.exceptions.Fenced` and stores nothing. The check and the insert are
one atomic step (a SQLite transaction; a MongoDB transaction that also writes the
conversation's epoch document, so a concurrent takeover conflicts with it).

Backup and restore (:mod:`.backup`) read a store whole through :meth:`HistoryStore.snapshot`
and write one through :meth:`HistoryStore.import_records`, records as stored
(:mod:`.records`): written once here over three per-store primitives (the snapshot,
:meth:`HistoryStore.census` and :meth:`HistoryStore._insert_records`).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from ..exceptions import DataKeyError, StoreNotEmpty
from ..messages import Message, from_record, to_record
from .crypto import DataKeys, is_sealed, key_id_of, register_resealer, verify_checks
from .records import KINDS, Record, RecordKind, StoreSnapshot
from .settings import DATA_KEYS, Backoff, SettingContended, check_key, update

__all__ = ["HistoryStore"]


class HistoryStore(ABC):
    """Durable, append-only message history. Async; one instance per process.

    With :attr:`data_keys` set (:func:`~overstory.store.open_store` reads them from the
    environment), message bodies are sealed before they are written and opened after
    they are read (:mod:`.crypto`); the seq, turn id, kind and time stay in the clear
    for the indexes.
    """

    data_keys: DataKeys | None = None
    #: ``False`` for a store opened *raw* (``open_store(url, raw=True)``: backup and
    #: restore): its data keys are neither checked nor recorded at open, so opening
    #: writes nothing; it copies records as stored and never opens a sealed one.
    verify_keys: bool = True

    # --- encryption at rest: what both stores call ---------------------------------------

    def _to_record(self, conversation_id: str, message: Message) -> dict[str, Any]:
        record = to_record(message)
        if self.data_keys is not None:
            record["body"] = self.data_keys.seal_bytes(record["body"], conversation_id, message.seq)
        return record

    def _from_record(self, conversation_id: str, record: dict[str, Any]) -> Message:
        body: str | bytes = record["body"]
        if is_sealed(body):
            if self.data_keys is None:
                key_id = key_id_of(body)
                raise DataKeyError(
                    f"message {record['seq']} of {conversation_id!r} is "
                    + (
                        "stored as bytes but is not a sealed record"
                        if key_id is None
                        else f"encrypted (data key {key_id!r}) and no data key is configured"
                    )
                )
            record = {
                **record,
                "body": self.data_keys.open(body, conversation_id, int(record["seq"])),
            }
        return from_record(record)

    async def _verify_data_keys(self) -> None:
        """At open: the configured keys against the store's check values (a missing or
        wrong key fails here, naming its id, not on some later read)."""

        if not self.verify_keys:
            return

        def checked(stored: str | None) -> str | None:
            checks = verify_checks(self.data_keys, stored, self.url)
            return None if checks is None else json.dumps(checks, sort_keys=True)

        try:
            await update(self, DATA_KEYS.key(), checked, backoff=Backoff(attempts=16))
        except SettingContended as exc:
            raise DataKeyError(f"the data key check values in {self.url} kept changing") from exc

    @abstractmethod
    async def bodies(
        self, after: tuple[str, int] | None = None, limit: int = 500
    ) -> list[tuple[str, int, str | bytes]]:
        """Up to ``limit`` stored ``(conversation id, seq, body)`` after ``after``, in
        (conversation, seq) order, bodies as stored (plain JSON text, ``enc1`` text or
        ``enc2`` bytes: :mod:`.crypto`): for re-sealing."""

    @abstractmethod
    async def hide(self, conversation_id: str, seq: int, *, epoch: int | None = None) -> bool:
        """Mark message ``seq`` hidden (a tombstone: its record stays, read back with
        ``hidden``); ``False`` when there is no such message. With ``epoch``, only if it
        is still the conversation's current epoch (else ``Fenced``)."""

    @abstractmethod
    async def replace_body(
        self, conversation_id: str, seq: int, old: str | bytes, new: str | bytes
    ) -> bool:
        """Compare-and-set one message's stored body (only ``rotate-data`` rewrites): text
        and bytes never compare equal, so ``old`` is the body exactly as stored."""

    @property
    @abstractmethod
    def url(self) -> str:
        """The store's URL with any password masked; safe for logs and errors."""

    @abstractmethod
    async def open(self) -> None:
        """Connect and create the schema/indexes. Raises ``StoreUnavailable``. Idempotent."""

    @abstractmethod
    async def acquire(self, conversation_id: str) -> int:
        """Take the conversation over: a new epoch, higher than every earlier one."""

    @abstractmethod
    async def append(
        self, conversation_id: str, message: Message, *, epoch: int | None = None
    ) -> None:
        """Durably store ``message`` at ``message.seq``; returns once it is durable.

        With ``epoch``, only if it is still the conversation's current epoch (else
        ``Fenced``). Raises ``SequenceConflict`` when that seq is taken, ``StoreError``
        otherwise.
        """

    @abstractmethod
    async def load(
        self, conversation_id: str, *, after: int = -1, limit: int | None = None
    ) -> list[Message]:
        """The conversation's stored messages with seq above ``after``, ordered by seq,
        at most ``limit`` of them (``None``: all): a page of its history."""

    @abstractmethod
    async def load_last(
        self, conversation_id: str, n: int, *, before: int | None = None
    ) -> list[Message]:
        """The conversation's last ``n`` stored messages (with seq below ``before``, when
        given), ordered by seq: its tail, or the page before a part already read."""

    @abstractmethod
    async def load_turn(self, conversation_id: str, turn_id: str) -> list[Message]:
        """The stored messages of turn ``turn_id``, ordered by seq (indexed: a turn older
        than any tail a process holds is found without reading the history)."""

    @abstractmethod
    async def count(self, conversation_id: str | None = None) -> int:
        """How many messages one conversation (or, with ``None``, the store) holds."""

    @abstractmethod
    async def conversation_ids(self) -> list[str]:
        """Ids of every conversation with at least one message, sorted."""

    @abstractmethod
    async def get_setting(self, key: str) -> str | None:
        """A small piece of cluster state stored beside the history (``None``: unset)."""

    async def put_setting(self, key: str, value: str, *, expected: str | None) -> bool:
        """Compare-and-set: store ``value`` only if the current value is ``expected``
        (``None``: only if unset). Returns whether it was stored; never overwrites a
        value another writer changed meanwhile. ``key`` must be declared in
        :data:`.settings.KEYS` (else :class:`~.settings.UnregisteredSettingKey`)."""
        check_key(key)
        return await self._put_setting(key, value, expected=expected)

    async def delete_setting(self, key: str, *, expected: str) -> bool:
        """Compare-and-delete: remove ``key`` only if its value is ``expected``."""
        check_key(key)
        return await self._delete_setting(key, expected=expected)

    @abstractmethod
    async def _put_setting(self, key: str, value: str, *, expected: str | None) -> bool:
        """:meth:`put_setting` of a declared key."""

    @abstractmethod
    async def _delete_setting(self, key: str, *, expected: str) -> bool:
        """:meth:`delete_setting` of a declared key."""

    @abstractmethod
    async def settings(
        self, prefix: str, *, after: str = "", limit: int = 100
    ) -> list[tuple[str, str]]:
        """Up to ``limit`` ``(key, value)`` pairs whose key starts with ``prefix`` and
        sorts after ``after``, in key order (page on with the last key)."""

    # --- the DataVault's documents (overstory.vault) ---------------------------------------

    @abstractmethod
    async def vault_put(
        self,
        space: tuple[str, str],
        collection: str,
        key: str,
        document: str,
        expires_at: float | None,
    ) -> None:
        """Store (or replace) one document of ``space`` (agent, owner; owner "" for a
        collection shared across the agent's users)."""

    @abstractmethod
    async def vault_replace(
        self, space: tuple[str, str], collection: str, key: str, old: str, new: str
    ) -> bool:
        """Compare-and-set one document: store ``new`` (its expiry unchanged) only if
        the stored document is ``old``. Whether it was stored (for re-sealing)."""

    @abstractmethod
    async def vault_document(self, space: tuple[str, str], collection: str, key: str) -> str | None:
        """The document as stored, expired or not (``None``: absent): for re-sealing."""

    @abstractmethod
    async def vault_get(self, space: tuple[str, str], collection: str, key: str) -> str | None:
        """The document (``None``: absent or expired)."""

    @abstractmethod
    async def vault_delete(self, space: tuple[str, str], collection: str, key: str | None) -> int:
        """Delete one document, or with ``key`` None the whole collection; how many."""

    @abstractmethod
    async def vault_scan(
        self, space: tuple[str, str], collection: str, *, after: str = "", limit: int = 100
    ) -> list[tuple[str, str]]:
        """Up to ``limit`` unexpired ``(key, document)`` after ``after``, in key order."""

    @abstractmethod
    async def vault_rows(
        self, after: tuple[str, str, str, str] | None = None, limit: int = 500
    ) -> list[tuple[str, str, str, str, str, float | None]]:
        """Up to ``limit`` ``(agent, owner, collection, key, document, expires_at)`` after
        ``after`` (every document, expired ones included), in that order: for re-sealing."""

    @abstractmethod
    async def vault_collections(self, agent: str, owner: str | None) -> list[tuple[str, str, int]]:
        """``(owner, collection, unexpired documents)`` of ``agent`` (one owner's, or all)."""

    # --- backup and restore: every record, as stored (.records) ---------------------------

    @abstractmethod
    def snapshot(self) -> AbstractAsyncContextManager[StoreSnapshot]:
        """A consistent read of the whole store while it serves (how consistent:
        :attr:`StoreSnapshot.consistency`); held open until the context ends."""

    @abstractmethod
    async def census(self) -> dict[RecordKind, int]:
        """How many records of each kind the store holds."""

    @abstractmethod
    async def _insert_records(self, kind: RecordKind, records: Sequence[Record]) -> None:
        """Insert ``records`` of ``kind`` as they are (no sealing, no compare-and-set),
        durably; a record whose key is taken fails the call (``StoreError``)."""

    async def require_empty(self) -> None:
        """:class:`~overstory.exceptions.StoreNotEmpty`, naming what it holds, unless the
        store holds no record of any kind."""
        held = {kind: n for kind, n in (await self.census()).items() if n}
        if not held:
            return
        what = ", ".join(f"{n} {kind} record(s)" for kind, n in held.items())
        sample = ""
        if held.get("setting"):
            keys = [key for key, _ in await self.settings("", limit=3)]
            sample = f" (settings such as {', '.join(map(repr, keys))})"
        raise StoreNotEmpty(
            f"store {self.url} is not empty: it holds {what}{sample}. A restore writes only "
            "into an empty store: name a new database or file"
        )

    async def import_records(
        self, records: AsyncIterable[tuple[RecordKind, Record]], *, batch: int = 500
    ) -> dict[RecordKind, int]:
        """Write ``records`` (checked already: :func:`~.records.check_record`) into this
        store, which must be empty (else :class:`~overstory.exceptions.StoreNotEmpty`
        and nothing is written), ``batch`` at a time. Returns the counts per kind. A
        failure part-way leaves the records written so far: discard the store."""
        await self.require_empty()
        counts: dict[RecordKind, int] = dict.fromkeys(KINDS, 0)
        pending: list[Record] = []
        pending_kind: RecordKind | None = None
        async for kind, record in records:
            if pending and (kind != pending_kind or len(pending) >= batch):
                assert pending_kind is not None
                await self._insert_records(pending_kind, pending)
                pending = []
            pending_kind = kind
            pending.append(record)
            counts[kind] += 1
        if pending:
            assert pending_kind is not None
            await self._insert_records(pending_kind, pending)
        return counts

    @abstractmethod
    async def close(self) -> None:
        """Release connections. Idempotent."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


async def reseal_messages(store: HistoryStore, keys: DataKeys, batch: int) -> dict[str, int]:
    """Seal every message body not under the primary key with it (plain bodies, and
    those sealed with an older key or as ``enc1`` text: each becomes ``enc2`` bytes), page
    by page, each by compare-and-set: messages are never rewritten otherwise, so one that
    changed meanwhile is another rotation's."""
    counts = {"examined": 0, "resealed": 0, "skipped": 0}
    after: tuple[str, int] | None = None
    while rows := await store.bodies(after, batch):
        for cid, seq, body in rows:
            counts["examined"] += 1
            if not isinstance(body, bytes) or key_id_of(body) != keys.primary:
                fresh = keys.seal_bytes(keys.open(body, cid, seq), cid, seq)
                if await store.replace_body(cid, seq, body, fresh):
                    counts["resealed"] += 1
                else:
                    counts["skipped"] += 1  # changed meanwhile: another rotation's
        after = rows[-1][0], rows[-1][1]
    return counts


register_resealer("messages", reseal_messages)
