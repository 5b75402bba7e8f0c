"""Who may reach a conversation: its record (owner, agent, shares) and the one rule.

The rule (:func:`access`) is checked twice: at the door, by the gateway, and again where
the conversation lives, by its host or dedicated actor, for every call that carries a
principal (:func:`check_access`) — a bug in the gateway's mapping from request to
conversation cannot hand one user another's history. Calls without a principal come
from Python drivers inside the cluster, which are trusted as before.

Ownership is domain logic that runs inside every turn, so it lives below the actors
(the gateway, the client and the conversation entity all import it); no FastAPI here.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from .app import split_conversation_id
from .exceptions import NotPermitted, UnknownConversation, UsageError
from .store import HistoryStore
from .store.settings import CONVERSATION, OWNED, OWNED_LEGACY, update

__all__ = [
    "CONVERSATION_ID",
    "RECORD_PREFIX",
    "ConversationRecord",
    "Need",
    "Principal",
    "RecordCache",
    "access",
    "check_access",
    "create_record",
    "delete_record",
    "is_conversation_id",
    "load_record",
    "new_conversation_id",
    "owned_records",
    "update_record",
    "user_of",
    "validate_metadata",
]

#: An HTTP conversation's id: ``conv_`` and 24 hex characters.
CONVERSATION_ID = re.compile(r"conv_(?P<hex>[0-9a-f]{24})")
#: Where a conversation's record is kept (a store setting per conversation).
RECORD_PREFIX = CONVERSATION.prefix()
#: One setting per conversation a user owns, ``<prefix><user digest>:<created ns>:<id>``,
#: so a user's list is a prefix scan in creation order and adding one is one insert.
_OWNED = OWNED.prefix()
_OWNED_LIST = OWNED_LEGACY.prefix()  # before: one list value per user (still read)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a user id, whether they are an admin, and how they proved it."""

    user: str
    admin: bool = False
    via: str = "api_key"  # or "jwt"
    key_id: str | None = None


def new_conversation_id() -> str:
    return f"conv_{secrets.token_hex(12)}"


def is_conversation_id(value: object) -> bool:
    return isinstance(value, str) and CONVERSATION_ID.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class ConversationRecord:
    """A conversation of the HTTP API: its owner, agent and metadata (its history is the
    runtime's conversation of ``id`` with ``agent``)."""

    id: str
    owner: str
    agent: str | None
    metadata: dict[str, str] = field(default_factory=dict)
    created_at: int = 0
    deleted_at: float | None = None
    shares: dict[str, str] = field(default_factory=dict)  # user -> "read" | "write"
    created_ns: int = 0  # orders a user's list (0: a record from before it, by created_at)

    def dumps(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def loads(cls, raw: str) -> ConversationRecord:
        return cls(**json.loads(raw))

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "conversation",
            "created_at": self.created_at,
            "metadata": dict(self.metadata),
        }


Need = Literal["read", "write", "own"]
_ALLOWS: dict[str, frozenset[str]] = {
    "read": frozenset({"read"}),
    "write": frozenset({"read", "write"}),
}


def access(record: ConversationRecord | None, principal: Principal, need: Need) -> int:
    """What ``principal`` may do to a conversation, as an HTTP status: 200 allowed; 404
    when it does not exist for them (gone, or neither theirs nor shared with them: the
    same answer, so nobody learns what exists); 403 when it is shared with them but not
    for this (``read`` shares read; ``write`` shares also run and cancel responses; only
    the owner and admins change metadata and shares, or delete)."""
    if record is None or record.deleted_at is not None:
        return 404
    if principal.admin or record.owner == principal.user:
        return 200
    share = record.shares.get(principal.user)
    if share is None:
        return 404
    return 200 if need in _ALLOWS.get(share, frozenset()) else 403


async def load_record(store: HistoryStore, conversation_id: str) -> ConversationRecord | None:
    """The record of an HTTP conversation id (None: no such conversation)."""
    if not is_conversation_id(conversation_id):
        return None
    raw = await store.get_setting(RECORD_PREFIX + conversation_id)
    return None if raw is None else ConversationRecord.loads(raw)


def validate_metadata(value: Any) -> dict[str, str]:
    """A conversation's metadata by OpenAI's rule: up to 16 string pairs, keys up to 64
    characters, values up to 512 (``None``: none)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > 16:
        raise UsageError("metadata: an object of up to 16 string pairs")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str) or len(k) > 64 or len(v) > 512:
            raise UsageError(
                "metadata: keys are strings of up to 64 characters, values of up to 512"
            )
    return dict(value)


async def create_record(
    store: HistoryStore,
    owner: str,
    agent: str | None,
    metadata: dict[str, str],
    conversation_id: str | None = None,
) -> ConversationRecord | None:
    """A new conversation of ``owner``, listed among theirs. ``conversation_id``: the id
    to make (a retried create: the record the first try made, if it is ``owner``'s).
    ``None`` when that id is someone else's (or, vanishingly, a fresh id collides)."""
    now = time.time_ns()
    record = ConversationRecord(
        conversation_id or new_conversation_id(),
        owner,
        agent,
        dict(metadata),
        now // 1_000_000_000,
        created_ns=now,
    )
    if not await store.put_setting(RECORD_PREFIX + record.id, record.dumps(), expected=None):
        existing = await load_record(store, record.id)
        if conversation_id is None or existing is None or existing.owner != owner:
            return None
        record = existing
    await store.put_setting(_owned_key(record), record.id, expected=None)  # idempotent
    return record


async def owned_records(store: HistoryStore, user: str) -> list[ConversationRecord]:
    """A user's conversations, oldest first (deleted ones left out)."""
    legacy = await store.get_setting(_OWNED_LIST + user)
    ids: list[str] = list(json.loads(legacy)) if legacy else []
    prefix, after = _owned_prefix(user), ""
    while listed := await store.settings(prefix, after=after, limit=500):
        ids += [cid for _, cid in listed if cid not in ids]
        after = listed[-1][0]
    records = [await load_record(store, cid) for cid in ids]
    return [r for r in records if r is not None and r.deleted_at is None]


async def update_record(
    store: HistoryStore, record: ConversationRecord, **changes: Any
) -> ConversationRecord:
    """``record`` with ``changes``, by compare-and-set on what is stored now."""
    made: list[ConversationRecord] = []

    def changed(raw: str | None) -> str:
        current = ConversationRecord.loads(raw) if raw else record
        made.append(replace(current, **changes))
        return made[-1].dumps()

    await update(store, CONVERSATION.key(record.id), changed)
    return made[-1]


async def delete_record(store: HistoryStore, record: ConversationRecord) -> None:
    """Mark the conversation deleted (its history stays for operators) and take it off
    its owner's list."""
    await update_record(store, record, deleted_at=time.time())
    await store.delete_setting(_owned_key(record), expected=record.id)


def _owned_prefix(user: str) -> str:
    return f"{_OWNED}{hashlib.sha256(user.encode()).hexdigest()[:32]}:"


def _owned_key(record: ConversationRecord) -> str:
    created = record.created_ns or record.created_at * 1_000_000_000
    return f"{_owned_prefix(record.owner)}{created:020d}:{record.id}"


class RecordCache:
    """Records read recently, kept ``ttl_s`` (at most ``size``, least recently used out):
    a host checks every call made for an HTTP caller, long polls included, and a stream
    makes many. A refusal is never decided on a cached record (it reads again first), so
    a new share works at once; a share taken back reaches the host within ``ttl_s`` (the
    gateway, which reads the record afresh, refuses the caller at once)."""

    def __init__(
        self, ttl_s: float = 2.0, size: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s, self.size, self._clock = ttl_s, size, clock
        self._items: OrderedDict[str, tuple[ConversationRecord | None, float]] = OrderedDict()

    async def get(
        self, store: HistoryStore, conversation_id: str, *, fresh: bool = False
    ) -> ConversationRecord | None:
        """The record, from the cache unless ``fresh`` or older than ``ttl_s``."""
        now = self._clock()
        hit = self._items.get(conversation_id)
        if hit is not None and not fresh and now - hit[1] < self.ttl_s:
            self._items.move_to_end(conversation_id)
            return hit[0]
        record = await load_record(store, conversation_id)
        self._items[conversation_id] = (record, now)
        self._items.move_to_end(conversation_id)
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return record


async def user_of(
    store: HistoryStore, conversation_id: str, cache: RecordCache | None = None
) -> str:
    """The user a runtime conversation (``agent:user``) counts against: its owner for an
    HTTP conversation (a ``conv_`` id), else the user part itself. Quotas are per user,
    whichever of their conversations runs the turn."""
    _, user = split_conversation_id(conversation_id)
    if is_conversation_id(user):
        record = await (cache.get(store, user) if cache else load_record(store, user))
        if record is not None:
            return record.owner
    return user


async def check_access(
    store: HistoryStore,
    conversation_id: str,
    principal: Principal | None,
    need: Need,
    cache: RecordCache | None = None,
) -> None:
    """Raise unless ``principal`` may do ``need`` to runtime conversation
    ``conversation_id`` (``agent:user``): for an HTTP conversation (its user part a
    ``conv_`` id) by its record and :func:`access`; for a user's own conversation, only
    that user or an admin. ``principal`` None: a trusted in-cluster caller, allowed.

    :class:`UnknownConversation` for "not there for you" (the door's 404) and
    :class:`NotPermitted` for a share that does not allow this (403).
    """
    if principal is None:
        return
    _, user = split_conversation_id(conversation_id)
    if is_conversation_id(user):
        record = await (cache.get(store, user) if cache else load_record(store, user))
        status = access(record, principal, need)
        if status != 200 and cache is not None:  # refuse only on what the store says now
            status = access(await cache.get(store, user, fresh=True), principal, need)
    else:
        status = 200 if principal.admin or principal.user == user else 404
    if status == 404:
        raise UnknownConversation(f"no conversation {user!r:.70} for {principal.user!r:.70}")
    if status == 403:
        raise NotPermitted(
            f"{principal.user!r:.70} may only read conversation {user!r:.70}"
            if need == "write"
            else f"only the owner of conversation {user!r:.70} may do this"
        )
