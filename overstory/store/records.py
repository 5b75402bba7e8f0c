"""The store's records as they are stored: four kinds, one plain dict shape each.

A backup (:mod:`.backup`) copies a store record by record, in these shapes, without
reading them: a sealed message body or vault document stays sealed (this module never
sees a data key), and a setting's value is copied as the string its owner wrote.

* ``setting``: ``key``, ``value`` — every setting (:mod:`.settings`), in key order.
* ``message``: ``conversation_id``, ``seq``, ``turn_id``, ``kind``, ``created_at``,
  ``body``, ``hidden`` — in (conversation, seq) order. ``body`` is ``str`` (the message's
  JSON, or an ``enc1`` sealed text) or ``bytes`` (an ``enc2`` sealed record: :mod:`.crypto`);
  a backup file writes bytes as ``{"bytes": BASE64}`` (:mod:`.backup`).
* ``vault``: ``agent``, ``owner``, ``collection``, ``key``, ``document``, ``expires_at``
  (epoch seconds or ``None``) — in that order, expired documents included.
* ``conversation``: ``conversation_id``, ``epoch`` — the fencing epochs, in id order.

:data:`KINDS` is the order a snapshot reads them in (settings first: see
:class:`StoreSnapshot`). :func:`check_record` validates a record from outside (a backup
file) before any store sees it; :func:`order_key` is the order each kind is read in, so
a reader can check that a file's records are sorted and unique.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Literal, cast

from ..exceptions import BackupInvalid
from .settings import owner_of

__all__ = [
    "FIELDS",
    "KINDS",
    "Consistency",
    "Record",
    "RecordKind",
    "StoreSnapshot",
    "check_record",
    "order_key",
]

RecordKind = Literal["setting", "message", "vault", "conversation"]
Record = dict[str, Any]

#: The order a snapshot reads (and a backup file holds) the kinds in.
KINDS: tuple[RecordKind, ...] = ("setting", "message", "vault", "conversation")

#: How consistent a snapshot is (see :class:`StoreSnapshot` and docs/operations/backup.md):
#: ``transaction`` — one read transaction, the store at one instant (SQLite);
#: ``snapshot-session`` — a MongoDB snapshot session (one cluster time, when the server
#: honours it), with the per-conversation bounds below as well;
#: ``per-conversation`` — no snapshot: each record as it was when read, each
#: conversation's messages the prefix it had at one instant.
Consistency = Literal["transaction", "snapshot-session", "per-conversation"]


def _text(value: object) -> bool:
    return isinstance(value, str)


def _text_or_bytes(value: object) -> bool:
    return isinstance(value, str | bytes)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _flag(value: object) -> bool:
    return isinstance(value, bool)


def _moment(value: object) -> bool:
    return value is None or _number(value)


_Check = Callable[[object], bool]  # a predicate of one field's value

#: Each kind's fields, in order, and what each must be.
FIELDS: Mapping[RecordKind, Mapping[str, _Check]] = {
    "setting": {"key": _text, "value": _text},
    "message": {
        "conversation_id": _text,
        "seq": _count,
        "turn_id": _text,
        "kind": _text,
        "created_at": _number,
        "body": _text_or_bytes,
        "hidden": _flag,
    },
    "vault": {
        "agent": _text,
        "owner": _text,
        "collection": _text,
        "key": _text,
        "document": _text,
        "expires_at": _moment,
    },
    "conversation": {"conversation_id": _text, "epoch": _count},
}

_ORDER: Mapping[RecordKind, tuple[str, ...]] = {
    "setting": ("key",),
    "message": ("conversation_id", "seq"),
    "vault": ("agent", "owner", "collection", "key"),
    "conversation": ("conversation_id",),
}


def order_key(kind: RecordKind, record: Mapping[str, Any]) -> tuple[Any, ...]:
    """Where ``record`` sorts among its kind (each kind is read in this order, and it is
    unique: two records of one kind never share it)."""
    return tuple(record[name] for name in _ORDER[kind])


def check_record(kind: object, record: object, where: str) -> tuple[RecordKind, Record]:
    """``(kind, record)`` when ``record`` is a well-formed record of ``kind``: exactly its
    fields, each of its type; a setting's key declared by this overstory. Else
    :class:`BackupInvalid` naming ``where`` (a file and line) and the problem."""
    if kind not in FIELDS:
        raise BackupInvalid(f"{where}: unknown record kind {kind!r:.60}")
    fields = FIELDS[cast(RecordKind, kind)]
    if not isinstance(record, dict):
        raise BackupInvalid(f"{where}: a {kind} record must be a JSON object")
    if set(record) != set(fields):
        missing, extra = sorted(set(fields) - set(record)), sorted(set(record) - set(fields))
        raise BackupInvalid(
            f"{where}: a {kind} record has fields {', '.join(fields)}"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; unknown {', '.join(map(repr, extra))[:200]}" if extra else "")
        )
    for name, valid in fields.items():
        if not valid(record[name]):
            raise BackupInvalid(
                f"{where}: {kind} field {name!r} has a bad value {record[name]!r:.80}"
            )
    if kind == "setting" and owner_of(record["key"]) is None:
        raise BackupInvalid(
            f"{where}: setting {record['key']!r:.120} is not declared by this overstory "
            "(a backup made by a newer version? restore it with that version)"
        )
    return cast(RecordKind, kind), record


class StoreSnapshot(ABC):
    """One consistent read of a whole store, record by record, as stored.

    The store makes one (:meth:`~.base.HistoryStore.snapshot`) and reads it kind by kind
    in :data:`KINDS` order. Settings come first: where the store cannot read everything
    at one instant (MongoDB without a snapshot session), a conversation's messages are
    then read up to the length it had *after* its settings were read, so a summary
    (a setting covering seqs ``[0, upto)``) never covers a message the backup lacks.
    """

    #: What the snapshot guarantees (recorded in the backup's header).
    consistency: Consistency

    @abstractmethod
    def records(self, kind: RecordKind) -> AsyncIterator[Record]:
        """Every record of ``kind``, in :func:`order_key` order, as stored."""
