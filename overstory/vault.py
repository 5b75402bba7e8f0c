"""The DataVault: JSON documents a tool keeps, namespaced per agent and per user.

A tool reaches it through its run context::

    async def remember(ctx: RunContext, note: str) -> str:
        key = await ctx.vault.store("notes", {"text": note}, ttl_s=86_400)
        return f"saved as {key}"

    def recall(ctx: RunContext) -> str:                # a sync tool: ctx.vault.sync
        return json.dumps(ctx.vault.sync.query("notes", limit=5))

Documents belong to (agent, user): one agent never reads another's vault, nor one user
another's. A collection the agent declares shared (``Agent(..., vault_shared=("faq",))``)
is one per agent, for all its users. Documents are JSON objects of at most
``MAX_DOCUMENT_BYTES``, live in the store beside the history (a ``vault`` table or
collection, indexed on agent, owner, collection and key), are sealed at rest when
history is (the associated data names agent, owner, collection and key: a document
moved elsewhere does not open), and may expire (``ttl_s``; MongoDB also drops them
itself). ``overstory keys rotate-data`` re-seals them by compare-and-set (this module
registers :func:`reseal_vault`): a tool's write racing the rotation is kept. ``query`` filters on top-level fields by equality, after opening documents, in
key order.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import time
import uuid
from collections.abc import Callable, Collection, Coroutine, Mapping
from typing import Any, Concatenate, ParamSpec, TypeVar

from .exceptions import VaultError
from .store import HistoryStore
from .store.crypto import DataKeys, key_id_of, register_resealer
from .store.settings import CONFLICT, Backoff, Conflict, SettingContended, contend

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "DataVault",
    "SyncVault",
    "VaultError",
    "clear",
    "fetch",
    "keys",
    "listing",
    "reseal_vault",
    "vault_aad",
]

MAX_DOCUMENT_BYTES = 64 * 1024
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
_SCAN = 200
T = TypeVar("T")
P = ParamSpec("P")


def vault_aad(agent: str, owner: str, collection: str, key: str) -> str:
    """What a document is bound to (its "conversation id" when sealed)."""
    return json.dumps(["vault", agent, owner, collection, key])


def _collection(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise VaultError(
            f"collection must be 1-64 letters, digits, '_', '.' or '-', got {name!r:.80}"
        )
    return name


def _key(key: object) -> str:
    if not isinstance(key, str) or not 0 < len(key) <= 200 or not key.isprintable():
        raise VaultError(f"key must be 1-200 printable characters, got {key!r:.80}")
    return key


def _document(document: object) -> str:
    if not isinstance(document, Mapping):
        raise VaultError(f"a document is a JSON object (a dict), got {type(document).__name__}")
    try:
        text = json.dumps(document, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise VaultError(f"a document must be JSON: {exc}") from exc
    if len(text.encode()) > MAX_DOCUMENT_BYTES:
        raise VaultError(
            f"a document is at most {MAX_DOCUMENT_BYTES} bytes as JSON, this one "
            f"{len(text.encode())}"
        )
    return text


class DataVault:
    """One agent's vault as one user sees it (see the module doc)."""

    def __init__(
        self,
        store: HistoryStore,
        agent: str,
        user: str,
        shared: Collection[str] = (),
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._store, self.agent, self.user = store, agent, user
        self._shared = frozenset(shared)
        self._loop = loop

    def _space(self, collection: str) -> tuple[str, str]:
        return (self.agent, "" if collection in self._shared else self.user)

    def _aad(self, space: tuple[str, str], collection: str, key: str) -> str:
        return vault_aad(*space, collection, key)

    def _seal(self, space: tuple[str, str], collection: str, key: str, text: str) -> str:
        keys = self._store.data_keys
        return text if keys is None else keys.seal(text, self._aad(space, collection, key), 0)

    def _open(self, space: tuple[str, str], collection: str, key: str, text: str) -> Any:
        keys = self._store.data_keys
        if keys is not None:
            text = keys.open(text, self._aad(space, collection, key), 0)
        return json.loads(text)

    async def store(
        self,
        collection: str,
        document: Mapping[str, Any],
        key: str | None = None,
        *,
        ttl_s: float | None = None,
    ) -> str:
        """Keep ``document`` (replacing one with the same key); returns its key (a new
        random one when none is given)."""
        collection = _collection(collection)
        key = uuid.uuid4().hex if key is None else _key(key)
        text = _document(document)
        if ttl_s is not None and (isinstance(ttl_s, bool) or not 0 < ttl_s <= 366 * 86_400):
            raise VaultError(f"ttl_s must be seconds in (0, 366 days], got {ttl_s!r}")
        space = self._space(collection)
        expires = None if ttl_s is None else time.time() + float(ttl_s)
        await self._store.vault_put(
            space, collection, key, self._seal(space, collection, key, text), expires
        )
        return key

    async def retrieve(self, collection: str, key: str) -> dict[str, Any] | None:
        """The document, or ``None`` (absent, or expired)."""
        collection, key = _collection(collection), _key(key)
        space = self._space(collection)
        raw = await self._store.vault_get(space, collection, key)
        return None if raw is None else dict(self._open(space, collection, key, raw))

    async def delete(self, collection: str, key: str) -> bool:
        collection, key = _collection(collection), _key(key)
        return bool(await self._store.vault_delete(self._space(collection), collection, key))

    async def query(
        self, collection: str, filter: Mapping[str, Any] | None = None, limit: int = 100
    ) -> list[tuple[str, dict[str, Any]]]:
        """Up to ``limit`` ``(key, document)`` whose top-level fields equal ``filter``'s,
        in key order."""
        collection = _collection(collection)
        if filter is not None and not isinstance(filter, Mapping):
            raise VaultError(f"filter is a dict of field -> value, got {type(filter).__name__}")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise VaultError(f"limit must be 1..1000, got {limit!r}")
        wanted = dict(filter or {})
        space, after = self._space(collection), ""
        found: list[tuple[str, dict[str, Any]]] = []
        while len(found) < limit:
            page = await self._store.vault_scan(space, collection, after=after, limit=_SCAN)
            for key, raw in page:
                document = self._open(space, collection, key, raw)
                if all(document.get(k) == v for k, v in wanted.items()):
                    found.append((key, dict(document)))
                    if len(found) == limit:
                        break
            if len(page) < _SCAN:
                break
            after = page[-1][0]
        return found

    @property
    def sync(self) -> SyncVault:
        """The same calls for a sync tool (it runs in a worker thread, off the loop)."""
        if self._loop is None:
            raise VaultError("this vault has no event loop to run sync calls on")
        return SyncVault(self, self._loop)


def _blocking(
    method: Callable[Concatenate[DataVault, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[SyncVault, P], T]:
    """:class:`DataVault`'s ``method`` as a :class:`SyncVault` method: the same arguments,
    run on the vault's loop and waited for."""

    @functools.wraps(method)
    def call(self: SyncVault, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._wait(method(self._vault, *args, **kwargs))

    call.__qualname__ = f"SyncVault.{method.__name__}"
    return call


class SyncVault:
    """:class:`DataVault`'s calls, blocking, for sync tools."""

    def __init__(self, vault: DataVault, loop: asyncio.AbstractEventLoop) -> None:
        self._vault, self._loop = vault, loop

    def _wait(self, call: Coroutine[Any, Any, T]) -> T:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            raise VaultError("a sync vault call on the event loop would block it: await ctx.vault")
        return asyncio.run_coroutine_threadsafe(call, self._loop).result()

    store = _blocking(DataVault.store)
    retrieve = _blocking(DataVault.retrieve)
    delete = _blocking(DataVault.delete)
    query = _blocking(DataVault.query)


# --- operators (the Python client and ``overstory vault``) ----------------------------------


async def listing(store: HistoryStore, agent: str, user: str | None) -> list[dict[str, Any]]:
    """``agent``'s collections — one user's (``""``: the shared ones) or every owner's —
    with how many unexpired documents each holds."""
    return [
        {"owner": owner, "collection": collection, "documents": n}
        for owner, collection, n in await store.vault_collections(agent, user)
    ]


async def keys(store: HistoryStore, agent: str, user: str, collection: str) -> list[str]:
    """The keys of one collection (``user`` ``""``: a shared collection)."""
    found = await DataVault(store, agent, user).query(collection, limit=1000)
    return [k for k, _ in found]


async def fetch(
    store: HistoryStore, agent: str, user: str, collection: str, key: str
) -> dict[str, Any] | None:
    return await DataVault(store, agent, user).retrieve(collection, key)


async def clear(
    store: HistoryStore, agent: str, user: str, collection: str, key: str | None
) -> int:
    """Delete one document, or the whole collection; how many went."""
    collection = _collection(collection)
    space = (agent, user)
    return await store.vault_delete(space, collection, None if key is None else _key(key))


async def reseal_vault(store: HistoryStore, keys: DataKeys, batch: int) -> dict[str, int]:
    """Seal every document not under the primary key with it, expired ones included,
    each by compare-and-set: a document a tool rewrote since it was read is read again
    (and re-sealed, unless its writer sealed it under the primary key already); its
    expiry is never touched. A document that kept changing is counted ``skipped``."""
    counts = {"examined": 0, "resealed": 0, "skipped": 0}
    place: tuple[str, str, str, str] | None = None
    while rows := await store.vault_rows(place, batch):
        for agent, owner, collection, key, document, _expires in rows:
            counts["examined"] += 1
            try:
                resealed = await _reseal_one(store, keys, (agent, owner), collection, key, document)
            except SettingContended:
                counts["skipped"] += 1
                continue
            counts["resealed"] += resealed
        place = rows[-1][:4]
    return counts


async def _reseal_one(
    store: HistoryStore,
    keys: DataKeys,
    space: tuple[str, str],
    collection: str,
    key: str,
    document: str,
) -> bool:
    """Re-seal one document read as ``document``; whether this wrote it."""
    aad = vault_aad(*space, collection, key)
    current: str | None = document

    async def step() -> bool | Conflict:
        nonlocal current
        if current is None or key_id_of(current) == keys.primary:
            return False  # deleted, or written under the primary key meanwhile
        fresh = keys.seal(keys.open(current, aad, 0), aad, 0)
        if await store.vault_replace(space, collection, key, current, fresh):
            return True
        current = await store.vault_document(space, collection, key)
        return CONFLICT

    where = f"vault:{space[0]}/{space[1]}/{collection}/{key}"
    return await contend(where, step, backoff=Backoff(attempts=8), what="a vault document")


register_resealer("vault", reseal_vault)
