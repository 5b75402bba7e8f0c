"""KeyedLocks: one asyncio lock per key, held only while someone uses it.

A long-lived supervisor serialises work per user; a ``defaultdict(asyncio.Lock)`` would
keep one lock for every user it has ever seen. Here a key's lock is dropped as soon as
its last holder or waiter leaves, so the map holds only keys in use right now.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

__all__ = ["KeyedLocks"]


class KeyedLocks:
    """``async with locks(key):`` — mutual exclusion per key, bounded by keys in use."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def __call__(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
