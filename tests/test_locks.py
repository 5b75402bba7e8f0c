"""KeyedLocks: per-key mutual exclusion whose map holds only keys in use (no Ray)."""

from __future__ import annotations

import asyncio

from overstory.supervisors.locks import KeyedLocks


def test_one_holder_per_key_and_nothing_kept_afterwards() -> None:
    locks = KeyedLocks()
    inside: dict[str, int] = {"a": 0, "b": 0}
    most: dict[str, int] = {"a": 0, "b": 0}

    async def work(key: str) -> None:
        async with locks(key):
            inside[key] += 1
            most[key] = max(most[key], inside[key])
            await asyncio.sleep(0.001)
            inside[key] -= 1

    async def main() -> int:
        tasks = [asyncio.create_task(work(k)) for k in "ab" * 20]
        await asyncio.sleep(0)
        in_use = len(locks)
        await asyncio.gather(*tasks)
        return in_use

    assert asyncio.run(main()) == 2  # one lock per key while they are in use
    assert most == {"a": 1, "b": 1}
    assert len(locks) == 0  # 10,000 users served leave nothing behind


def test_a_failing_holder_releases_the_key() -> None:
    locks = KeyedLocks()

    async def main() -> None:
        try:
            async with locks("k"):
                raise RuntimeError("boom")
        except RuntimeError:
            pass
        async with locks("k"):
            pass

    asyncio.run(main())
    assert len(locks) == 0
