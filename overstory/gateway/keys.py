"""API keys: made once, stored as a hash, checked in constant time.

A key reads ``ovs_<key id>_<secret>``: the key id (12 hex characters) names its record,
the secret (32 random bytes, URL-safe base64) is shown once, when it is made, and only
its SHA-256 is kept. A fast hash is enough: the secret has 256 bits of entropy, so there
is nothing to guess (GitHub and Stripe tokens are kept the same way); a slow one would
cost every request. The presented secret's hash is compared with :func:`hmac.compare_digest`.

Records live in the history store's settings (compare-and-set, both stores): one per
key (``overstory.apikey:<id>``) and an index of ids (``overstory.apikeys``). Revoking
keeps the record, marked, so ``keys list`` shows what was revoked and when.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ..access import Principal
from ..audit import note
from ..exceptions import AuthenticationFailed, StoreError, UnknownKey
from ..store import HistoryStore
from ..store.settings import API_KEY, API_KEYS, update
from ..validation import validate_user_id

__all__ = [
    "KEY_PREFIX",
    "KeyRecord",
    "authenticate_key",
    "create_key",
    "key_hash",
    "list_keys",
    "parse_key",
    "revoke_key",
]

KEY_PREFIX = "ovs"
_KEY = re.compile(rf"{KEY_PREFIX}_(?P<id>[0-9a-f]{{12}})_(?P<secret>[A-Za-z0-9_-]{{43}})")
_ID = re.compile(r"[0-9a-f]{12}")
_RECORD = API_KEY.prefix()
_INDEX = API_KEYS.key()


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What the store keeps about one key (never the key)."""

    key_id: str
    user: str
    admin: bool
    hash: str
    created_at: float
    revoked_at: float | None = None

    def public(self) -> dict[str, Any]:
        """The record without its hash, for listings."""
        return {k: v for k, v in asdict(self).items() if k != "hash"}


def key_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_key(key: str) -> tuple[str, str]:
    """``(key id, secret)`` of a well-formed key; AuthenticationFailed otherwise."""
    match = _KEY.fullmatch(key) if isinstance(key, str) else None
    if match is None:
        raise AuthenticationFailed(
            f"malformed API key: expected {KEY_PREFIX}_<12 hex>_<43 characters>"
        )
    return match["id"], match["secret"]


async def create_key(
    store: HistoryStore, user: str, *, admin: bool = False
) -> tuple[str, KeyRecord]:
    """A new key for ``user``: ``(the key, its record)``. The key is not kept anywhere."""
    user = validate_user_id(user)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    key_id = secrets.token_hex(6)
    record = KeyRecord(key_id, user, admin, key_hash(secret), time.time())
    if not await store.put_setting(_RECORD + key_id, _dump(record), expected=None):
        raise StoreError(f"API key id {key_id} exists already (try again)")
    await _update_index(store, lambda ids: [*ids, key_id])
    await note(
        store,
        who="operator",
        action="key.created",
        target=key_id,
        outcome="ok",
        detail={"user": user, "admin": admin},
    )
    return f"{KEY_PREFIX}_{key_id}_{secret}", record


async def list_keys(store: HistoryStore) -> list[KeyRecord]:
    """Every key's record (revoked ones included), oldest first."""
    records = [await _record(store, key_id) for key_id in await _index(store)]
    return sorted((r for r in records if r is not None), key=lambda r: r.created_at)


async def revoke_key(store: HistoryStore, key_id: str) -> KeyRecord:
    """Mark key ``key_id`` revoked (idempotent); its next use is refused."""
    if not isinstance(key_id, str) or not _ID.fullmatch(key_id):
        raise UnknownKey(f"not an API key id (12 hex characters): {key_id!r:.40}")
    now = time.time()

    def revoked(raw: str | None) -> str | None:
        if raw is None:
            raise UnknownKey(f"no API key {key_id!r}")
        record = _load(raw)
        if record.revoked_at is not None:
            return None  # revoked already
        return _dump(KeyRecord(**{**asdict(record), "revoked_at": now}))

    done = await update(store, API_KEY.key(key_id), revoked)
    assert done.new is not None
    record = _load(done.new)
    if done.changed:
        await note(
            store,
            who="operator",
            action="key.revoked",
            target=key_id,
            outcome="ok",
            detail={"user": record.user},
        )
    return record


async def authenticate_key(store: HistoryStore, key: str) -> Principal:
    """The principal a presented key stands for; AuthenticationFailed names why not
    (malformed, unknown, revoked, wrong) without quoting it."""
    key_id, secret = parse_key(key)
    record = await _record(store, key_id)
    # Compare a hash either way, so an unknown id costs what a wrong secret does.
    expected = record.hash if record is not None else key_hash("")
    matches = hmac.compare_digest(expected, key_hash(secret))
    if record is None or not matches:
        raise AuthenticationFailed("unknown API key")
    if record.revoked_at is not None:
        raise AuthenticationFailed(f"API key {key_id} was revoked")
    return Principal(record.user, record.admin, "api_key", key_id)


async def _record(store: HistoryStore, key_id: str) -> KeyRecord | None:
    raw = await store.get_setting(_RECORD + key_id)
    return None if raw is None else _load(raw)


async def _index(store: HistoryStore) -> list[str]:
    raw = await store.get_setting(_INDEX)
    return list(json.loads(raw)) if raw else []


async def _update_index(store: HistoryStore, change: Callable[[list[str]], list[str]]) -> None:
    def changed(raw: str | None) -> str:
        return json.dumps(change(list(json.loads(raw)) if raw else []))

    await update(store, _INDEX, changed)


def _dump(record: KeyRecord) -> str:
    return json.dumps(asdict(record), sort_keys=True)


def _load(raw: str) -> KeyRecord:
    return KeyRecord(**json.loads(raw))
