"""The store a URL names: :func:`open_store` picks the implementation (imported only when
chosen: pymongo stays unloaded for a SQLite store)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, TypeVar

from .base import HistoryStore
from .crypto import DataKeys
from .url import resolve_store_url

T = TypeVar("T")

__all__ = ["open_store", "run_on_store"]


def open_store(
    url: str,
    *,
    data_keys: DataKeys | Literal["environment"] | None = "environment",
    raw: bool = False,
) -> HistoryStore:
    """The (not yet opened) store for ``url``; call ``await store.open()`` next.

    ``data_keys``: the keys that seal message bodies (:mod:`.crypto`); by default those
    ``OVERSTORY_DATA_KEYS`` or ``OVERSTORY_DATA_KEY_FILE`` give (none: in the clear).
    Opening checks them against the store (a missing or wrong key fails there).

    ``raw``: for copying records as stored (backup, restore): no data key, none
    checked, nothing written at open; reading a sealed message fails."""
    url = resolve_store_url(url)
    if raw:
        data_keys = None
    keys = DataKeys.from_environment() if data_keys == "environment" else data_keys
    store: HistoryStore
    if url.startswith("sqlite:"):
        from .sqlite import SQLiteStore

        store = SQLiteStore(url.removeprefix("sqlite:///"))
    else:
        from .mongodb import MongoStore

        store = MongoStore(url)
    store.data_keys = keys  # type: ignore[assignment]
    store.verify_keys = not raw
    return store


def run_on_store(url: str, fn: Callable[[HistoryStore], Awaitable[T]], *, raw: bool = False) -> T:
    """``await fn(store)`` on the store ``url`` names, opened for it and closed after,
    from sync code (operators' commands, the client's sync calls). Inside a running
    event loop it runs in a thread of its own, so it never blocks on that loop.
    ``raw``: opened without data keys (see :func:`open_store`)."""

    async def go() -> T:
        store = open_store(url, raw=raw)
        await store.open()
        try:
            return await fn(store)
        finally:
            await store.close()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(go())
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, go()).result()
