"""Durable history: the :class:`HistoryStore` protocol, SQLite and MongoDB."""

from .base import HistoryStore
from .factory import open_store, run_on_store
from .url import redact_url, resolve_store_url

__all__ = ["HistoryStore", "open_store", "redact_url", "resolve_store_url", "run_on_store"]
