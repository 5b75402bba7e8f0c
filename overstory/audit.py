"""The audit trail: one append-only, hash-chained record per security-relevant event.

What is recorded (who, what, target, outcome, when, trace id — never message text, never
a secret): authentication failures at the HTTP door (and the first success of each key
per replica every 10 minutes), authorization denials, quota refusals, API key creation
and revocation, share changes, an admin reaching someone else's conversation, and
rollouts (rollout, promote, rollback).

Each record carries the hash of the one before it (``prev``) and its own hash over its
content and ``prev`` (SHA-256 of canonical JSON), numbered from 1 in the store's settings
(one per record, written once, compare-and-set) beside a head (the last number and
hash). :func:`verify` walks the chain: a record edited (its hash no longer matches), a
record deleted (a gap, or a ``prev`` that does not match) or records cut off the end
(the head names a record that is gone) are reported with the number where it breaks.

Appending is a compare-and-set of the next number then of the head; a writer that died
between the two leaves a record past the head, which the next writer checks (its
``prev`` must be the head's hash) and adopts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .exceptions import StoreError
from .store import HistoryStore
from .store.settings import (
    AUDIT,
    AUDIT_HEAD,
    CONFLICT,
    Backoff,
    Conflict,
    SettingContended,
    contend,
)

__all__ = ["AuditRecord", "append", "note", "records", "trace_id", "verify"]

_CAS = Backoff(attempts=64)
_log = logging.getLogger(__name__)
_GENESIS = "0" * 64


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    at: float
    who: str  # the user (or "operator" for the CLI, "anonymous" before authentication)
    action: str  # e.g. "auth.failed", "access.denied", "quota.refused", "key.created"
    target: str  # what it was about: a conversation id, a key id, an agent
    outcome: str  # "ok", "denied", "refused", "failed"
    trace_id: str
    detail: Mapping[str, Any]
    prev: str
    hash: str = ""

    def content_hash(self) -> str:
        body = asdict(self)
        body.pop("hash")
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: str) -> AuditRecord:
        data = json.loads(raw)
        return cls(**data)


#: One chain per store (every namespace, the CLI and the door write to it).
_PREFIX = AUDIT.prefix()
_HEAD = AUDIT_HEAD.key()


def _record_key(seq: int) -> str:
    return AUDIT.key(f"{seq:012d}")


def trace_id() -> str:
    """The current span's trace id (32 hex digits), or "" outside a trace."""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else ""


def _clean_detail(detail: Mapping[str, Any] | None) -> dict[str, Any]:
    """Only short scalar values: an audit record never carries message text."""
    out: dict[str, Any] = {}
    for k, v in (detail or {}).items():
        if isinstance(v, bool | int | float) or v is None:
            out[str(k)[:64]] = v
        else:
            out[str(k)[:64]] = str(v)[:200]
    return out


async def append(
    store: HistoryStore,
    *,
    who: str,
    action: str,
    target: str,
    outcome: str,
    detail: Mapping[str, Any] | None = None,
    trace: str | None = None,
) -> AuditRecord:
    """Add one record at the end of the chain (see the module doc)."""
    head_key = _HEAD

    async def attempt() -> AuditRecord | Conflict:
        raw_head = await store.get_setting(head_key)
        head: dict[str, Any] = json.loads(raw_head) if raw_head else {"seq": 0, "hash": _GENESIS}
        seq = int(head["seq"]) + 1
        past = await store.get_setting(_record_key(seq))
        if past is not None:  # a writer died before moving the head: adopt its record
            record = AuditRecord.from_json(past)
            if record.prev == head["hash"] and record.hash == record.content_hash():
                await store.put_setting(
                    head_key, json.dumps({"seq": seq, "hash": record.hash}), expected=raw_head
                )
            return CONFLICT
        record = AuditRecord(
            seq,
            time.time(),
            str(who)[:200],
            action,
            str(target)[:200],
            outcome,
            trace_id() if trace is None else trace,
            _clean_detail(detail),
            str(head["hash"]),
        )
        record = AuditRecord(**{**asdict(record), "hash": record.content_hash()})
        if not await store.put_setting(_record_key(seq), record.to_json(), expected=None):
            return CONFLICT  # another writer took this number
        new_head = json.dumps({"seq": seq, "hash": record.hash})
        await store.put_setting(head_key, new_head, expected=raw_head)
        return record  # a lost head update is adopted by the next writer

    try:
        return await contend(head_key, attempt, backoff=_CAS, what="the audit trail")
    except SettingContended as exc:
        raise StoreError(
            "the audit trail kept changing while appending (too much contention)"
        ) from exc


async def note(store: HistoryStore, **fields: Any) -> None:
    """:func:`append`, where the event must not fail because the trail could not be
    written (a store that cannot be reached right now): the failure is logged instead.
    Availability first; a team that must fail closed calls :func:`append` itself."""
    try:
        await append(store, **fields)
    except StoreError as exc:
        _log.warning("audit record %s not written: %s", fields.get("action"), exc)


async def records(store: HistoryStore) -> list[AuditRecord]:
    """Every record, in order (as stored: :func:`verify` says whether to trust them)."""
    after, out = "", []
    while page := await store.settings(_PREFIX, after=after, limit=500):
        out += [AuditRecord.from_json(raw) for _, raw in page]
        after = page[-1][0]
    return out


async def verify(store: HistoryStore) -> list[str]:
    """The chain's problems (empty: intact)."""
    problems: list[str] = []
    prev, expected_seq = _GENESIS, 1
    chain = await records(store)
    for record in chain:
        if record.seq != expected_seq:
            problems.append(
                f"record {expected_seq}"
                + (f" to {record.seq - 1}" if record.seq - 1 > expected_seq else "")
                + " deleted"
            )
        elif record.prev != prev:
            problems.append(f"record {record.seq} does not follow record {record.seq - 1}")
        if record.hash != record.content_hash():
            problems.append(f"record {record.seq} was edited (its hash does not match)")
        prev, expected_seq = record.hash, record.seq + 1
    raw_head = await store.get_setting(_HEAD)
    if raw_head is not None:
        head = json.loads(raw_head)
        last = chain[-1].seq if chain else 0
        if int(head["seq"]) > last:
            problems.append(f"records {last + 1} to {head['seq']} cut off the end")
        elif int(head["seq"]) == last and chain and head["hash"] != chain[-1].hash:
            problems.append(f"record {last} does not match the head")
    elif chain:
        problems.append("the chain has records but no head")
    return problems
