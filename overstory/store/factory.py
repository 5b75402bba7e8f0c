"""The store a URL names: :func:`open_store` picks the implementation (imported only when
chosen: pymongo stays unloaded for a SQLite store)."""

from __future__ import annotations

from typing import Literal

from .base import HistoryStore
from .crypto import DataKeys
from .url import resolve_store_url

__all__ = ["open_store"]


def open_store(
    url: str, *, data_keys: DataKeys | Literal["environment"] | None = "environment"
) -> HistoryStore:
    """The (not yet opened) store for ``url``; call ``await store.open()`` next.

    ``data_keys``: the keys that seal message bodies (:mod:`.crypto`); by default those
    ``OVERSTORY_DATA_KEYS`` or ``OVERSTORY_DATA_KEY_FILE`` give (none: in the clear).
    Opening checks them against the store (a missing or wrong key fails there)."""
    url = resolve_store_url(url)
    keys = DataKeys.from_environment() if data_keys == "environment" else data_keys
    store: HistoryStore
    if url.startswith("sqlite:"):
        from .sqlite import SQLiteStore

        store = SQLiteStore(url.removeprefix("sqlite:///"))
    else:
        from .mongodb import MongoStore

        store = MongoStore(url)
    store.data_keys = keys  # type: ignore[assignment]
    return store
