"""Helpers shared by the bench scripts (driver-side only: no Ray actor classes here,
because workers cannot import this module)."""

from __future__ import annotations

import asyncio
import statistics

from overstory.messages import UserMessage
from overstory.store import open_store


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def seed(url: str, conversation: str, n: int) -> None:
    """Store ``n`` user messages in ``conversation`` (an ``agent:user`` id) directly, as
    an existing history."""

    async def go() -> None:
        store = open_store(url)
        await store.open()
        for i in range(n):
            await store.append(
                conversation, UserMessage(content=f"stored message {i}", seq=i, turn_id=f"t{i}")
            )
        await store.close()

    asyncio.run(go())
