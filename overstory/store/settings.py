"""The store's settings: which keys exist and who owns them, and the one way to change one.

Settings (:meth:`~overstory.store.base.HistoryStore.get_setting` and friends) are a small
key/value table beside the history, written only by compare-and-set. Every key is
declared here, in :data:`KEYS`: a name (an exact key, or a prefix ending in ``:`` that
the owner extends with ``:``-joined parts), the module that owns it (the only one that
writes it) and what it holds. The stores refuse to write or delete a key that no entry
declares (:class:`UnregisteredSettingKey`), so a new kind of setting is added here first.

A read-modify-write of one value goes through :func:`update`: a pure function of the
stored value, applied by compare-and-set, retried on a lost race after a jittered,
growing pause, at most :attr:`Backoff.attempts` times (then :class:`SettingContended`
names the key). Changes that span several keys (the audit chain, a job and its queue
entry) retry with :func:`contend`, the same loop over a step of their own.
"""

from __future__ import annotations

import asyncio
import enum
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from ..exceptions import StoreError, UsageError

__all__ = [
    "CONFLICT",
    "KEYS",
    "Backoff",
    "Conflict",
    "SettingContended",
    "SettingsKey",
    "SettingsStore",
    "UnregisteredSettingKey",
    "Updated",
    "check_key",
    "contend",
    "owner_of",
    "update",
]

T = TypeVar("T")


# --- the registry of keys ---------------------------------------------------------------


class UnregisteredSettingKey(UsageError):
    """A settings key that no entry of :data:`KEYS` declares (a defect in the writer)."""


@dataclass(frozen=True, slots=True)
class SettingsKey:
    """One declared key (``name`` without a trailing ``:``) or family of keys (``name``
    ending in ``:``), the module that writes it, and what it holds."""

    name: str
    owner: str
    meaning: str

    @property
    def is_prefix(self) -> bool:
        return self.name.endswith(":")

    def key(self, *parts: str) -> str:
        """The key: ``name`` itself (an exact key) or ``name`` + the ``:``-joined parts."""
        if not self.is_prefix:
            if parts:
                raise UsageError(f"setting {self.name!r} is one key; it takes no parts")
            return self.name
        if not parts:
            raise UsageError(f"setting {self.name!r} is a prefix: give the key's parts")
        return self.name + ":".join(parts)

    def prefix(self, *parts: str) -> str:
        """What every key under ``parts`` starts with (for :meth:`settings` listings)."""
        if not self.is_prefix:
            raise UsageError(f"setting {self.name!r} is one key, not a prefix")
        return self.name + "".join(f"{part}:" for part in parts)


def _key(name: str, owner: str, meaning: str) -> SettingsKey:
    return SettingsKey(name, owner, meaning)


DATA_KEYS = _key(
    "overstory.data_keys",
    "overstory.store.crypto",
    "one check value per data key id that sealed records here (a wrong key fails at open)",
)
SHARD_TABLE = _key(
    "overstory.shard_table:",
    "overstory.sharding",
    "<namespace>: the hosted placement's shard table (hosts and their shards)",
)
DEPLOYMENT = _key(
    "overstory.app:",
    "overstory.rollout",
    "<namespace>: the deployed app (import path, working dir, generation)",
)
SPLIT = _key(
    "overstory.split:",
    "overstory.rollout",
    "<namespace>:<agent>: an agent's rollout split between its versions",
)
PIN = _key(
    "overstory.pin:",
    "overstory.rollout",
    "<namespace>:<conversation id>: the agent version a conversation is pinned to",
)
QUOTA = _key(
    "overstory.quota:",
    "overstory.quota",
    "<namespace>:<user digest>: a user's own quota (else the configured default)",
)
LEDGER = _key(
    "overstory.ledger:",
    "overstory.quota",
    "<namespace>:<user digest>: a user's usage ledger (tokens, requests, turns running)",
)
JOB = _key(
    "overstory.job:",
    "overstory.jobs",
    "<namespace>:<job id>: a background job's record (text and reply sealed)",
)
JOB_QUEUE = _key(
    "overstory.jobq:",
    "overstory.jobs",
    "<namespace>:<due ms>:<job id>: the job queue, an index of due times",
)
JOB_TURN = _key(
    "overstory.jobturn:",
    "overstory.jobs",
    "<namespace>:<turn id>: the job made for a chosen turn id (retried submits)",
)
CACHE = _key(
    "overstory.cache:",
    "overstory.cache",
    "<owner digest>:<request digest>: a cached model answer and its expiry (sealed)",
)
AUDIT = _key(
    "overstory.audit:",
    "overstory.audit",
    "<seq, 12 digits>: one record of the hash-chained audit trail",
)
AUDIT_HEAD = _key(
    "overstory.audit.head",
    "overstory.audit",
    "the audit trail's head: its last record's number and hash",
)
API_KEY = _key(
    "overstory.apikey:",
    "overstory.gateway.keys",
    "<key id>: an API key's record (its hash, never the key)",
)
API_KEYS = _key(
    "overstory.apikeys",
    "overstory.gateway.keys",
    "the index of every API key id",
)
CONVERSATION = _key(
    "overstory.conversation:",
    "overstory.access",
    "<conversation id>: an HTTP conversation's record (owner, metadata, shares)",
)
OWNED = _key(
    "overstory.owned:",
    "overstory.access",
    "<user digest>:<created ns>:<conversation id>: a user's list of conversations",
)
OWNED_LEGACY = _key(
    "overstory.conversations:",
    "overstory.access",
    "<user>: a user's conversations as one list (written before overstory.owned:; read only)",
)
IDEMPOTENCY = _key(
    "overstory.idempotency:",
    "overstory.gateway.app",
    "<scope digest>: an Idempotency-Key claim (the id its first request made)",
)
SUMMARY = _key(
    "overstory.summary:",
    "overstory.compaction",
    "<conversation id>: the summary of a conversation's earliest messages (seq range, sealed text)",
)
RESPONSE = _key(
    "overstory.response:",
    "overstory.gateway.app",
    "<response id>: what a stored response repeats of its request (metadata, instructions)",
)
READYZ = _key(
    "overstory.readyz",
    "overstory.gateway.app",
    "never written: /readyz reads it to see that the store answers",
)

#: Every settings key the code reads or writes, by name.
KEYS: dict[str, SettingsKey] = {
    entry.name: entry
    for entry in (
        DATA_KEYS,
        SHARD_TABLE,
        DEPLOYMENT,
        SPLIT,
        PIN,
        QUOTA,
        LEDGER,
        JOB,
        JOB_QUEUE,
        JOB_TURN,
        CACHE,
        AUDIT,
        AUDIT_HEAD,
        API_KEY,
        API_KEYS,
        CONVERSATION,
        OWNED,
        OWNED_LEGACY,
        IDEMPOTENCY,
        SUMMARY,
        RESPONSE,
        READYZ,
    )
}


def owner_of(key: str) -> SettingsKey | None:
    """The entry that declares ``key`` (``None``: none does)."""
    exact = KEYS.get(key)
    if exact is not None and not exact.is_prefix:
        return exact
    family, colon, rest = key.partition(":")
    if colon and rest:
        return KEYS.get(family + ":")
    return None


def check_key(key: str) -> SettingsKey:
    """``key``'s entry; :class:`UnregisteredSettingKey` when no entry declares it."""
    entry = owner_of(key) if isinstance(key, str) else None
    if entry is None:
        raise UnregisteredSettingKey(
            f"settings key {key!r:.120} is not declared in overstory.store.settings.KEYS: "
            "declare its prefix there (with its owner and meaning) before writing it"
        )
    return entry


# --- compare-and-set, retried -----------------------------------------------------------


class SettingsStore(Protocol):
    """What :func:`update` needs of a store (every :class:`~.base.HistoryStore`)."""

    async def get_setting(self, key: str) -> str | None: ...

    async def put_setting(self, key: str, value: str, *, expected: str | None) -> bool: ...


class SettingContended(StoreError):
    """A compare-and-set lost to other writers on every attempt (too much contention)."""

    def __init__(self, key: str, attempts: int, what: str = "") -> None:
        self.key, self.attempts = key, attempts
        about = f" ({what})" if what else ""
        super().__init__(
            f"setting {key!r}{about} kept changing: {attempts} compare-and-set attempts "
            "lost to other writers"
        )


class Conflict(enum.Enum):
    """What a :func:`contend` step returns when another writer got in first."""

    CONFLICT = "conflict"


CONFLICT = Conflict.CONFLICT


@dataclass(frozen=True)
class Backoff:
    """How often a lost compare-and-set is tried again, and how long to wait first:
    before attempt ``n`` (from 1), ``random() * min(cap_s, base_s * 2**n)`` seconds
    ("full jitter"). ``sleep`` and ``random`` are injectable for tests."""

    attempts: int = 64
    base_s: float = 0.0005
    cap_s: float = 0.05
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep, compare=False)
    random: Callable[[], float] = field(default=random.random, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise UsageError(f"attempts must be an int, got {self.attempts!r}")
        if self.attempts < 1:
            raise UsageError(f"attempts must be at least 1, got {self.attempts}")
        if not 0 <= self.base_s <= self.cap_s:
            raise UsageError(f"need 0 <= base_s <= cap_s, got {self.base_s} and {self.cap_s}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt`` (0: the first, no wait)."""
        if attempt <= 0:
            return 0.0
        return float(self.random() * min(self.cap_s, self.base_s * 2.0**attempt))


DEFAULT_BACKOFF = Backoff()


async def contend(
    key: str,
    step: Callable[[], Awaitable[T | Conflict]],
    *,
    backoff: Backoff = DEFAULT_BACKOFF,
    what: str = "",
) -> T:
    """``await step()`` until it returns something other than :data:`CONFLICT`, pausing
    per ``backoff`` between attempts; :class:`SettingContended` (naming ``key``) when
    every attempt lost. ``step`` reads what it needs afresh each time."""
    for attempt in range(backoff.attempts):
        if attempt:
            await backoff.sleep(backoff.delay(attempt))
        result = await step()
        if not isinstance(result, Conflict):
            return result
    raise SettingContended(key, backoff.attempts, what)


@dataclass(frozen=True, slots=True)
class Updated:
    """What :func:`update` did: the value it read last and the value stored now
    (``old`` again when the function declined to change it)."""

    old: str | None
    new: str | None

    @property
    def changed(self) -> bool:
        return self.new != self.old


async def update(
    store: SettingsStore,
    key: str,
    fn: Callable[[str | None], str | None],
    *,
    backoff: Backoff = DEFAULT_BACKOFF,
    what: str = "",
) -> Updated:
    """Change setting ``key`` from its stored value (``None``: unset) to ``fn(value)``
    by compare-and-set, again on a lost race (see :class:`Backoff`).

    ``fn`` is a pure function of the value (it may raise, which ends the update): it
    returns the new value, or ``None`` — or the value itself — to leave it as it is.
    Raises :class:`SettingContended` when every attempt lost."""
    check_key(key)

    async def step() -> Updated | Conflict:
        old = await store.get_setting(key)
        new = fn(old)
        if new is None or new == old:
            return Updated(old, old)
        if await store.put_setting(key, new, expected=old):
            return Updated(old, new)
        return CONFLICT

    return await contend(key, step, backoff=backoff, what=what)
