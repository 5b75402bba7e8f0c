"""The store's settings (no Ray): the registry of keys and their owners, and the one
compare-and-set update with bounded, jittered retries."""

from __future__ import annotations

import asyncio
import importlib
import json
from typing import Any

import pytest
from conftest import on_store

from overstory.exceptions import StoreError, UsageError
from overstory.store import HistoryStore
from overstory.store.settings import (
    CONFLICT,
    JOB,
    JOB_QUEUE,
    KEYS,
    Backoff,
    Conflict,
    SettingContended,
    SettingsKey,
    UnregisteredSettingKey,
    check_key,
    contend,
    owner_of,
    update,
)

COUNTER = "overstory.cache:counter"


def test_every_declared_key_names_a_real_owner_a_meaning_and_no_other_key() -> None:
    for name, entry in KEYS.items():
        assert entry.name == name
        assert entry.meaning.strip(), f"{name} has no meaning"
        importlib.import_module(entry.owner)  # the owner module exists
        # An exact key has no ':' and a prefix exactly one, at its end: so a key's
        # entry is found by its first ':' and no entry shadows another.
        assert name.count(":") == (1 if entry.is_prefix else 0), name
        assert name.startswith("overstory."), name


def test_keys_are_built_from_their_entry_and_found_again() -> None:
    assert JOB.key("ns", "job_1") == "overstory.job:ns:job_1"
    assert (
        JOB_QUEUE.key("ns", "000000000001000", "job_1") == "overstory.jobq:ns:000000000001000:job_1"
    )
    assert JOB.prefix("ns") == "overstory.job:ns:"
    assert owner_of(JOB_QUEUE.key("ns", "1", "j")) is JOB_QUEUE
    assert owner_of("overstory.audit.head") is KEYS["overstory.audit.head"]
    assert check_key("overstory.apikeys").owner == "overstory.gateway.keys"
    for bad in ("overstory.job:", "overstory.job", "overstory.apikeys:x", "other:x", ""):
        assert owner_of(bad) is None, bad
        with pytest.raises(UnregisteredSettingKey, match="not declared"):
            check_key(bad)
    with pytest.raises(UsageError, match="prefix"):
        JOB.key()
    with pytest.raises(UsageError, match="one key"):
        KEYS["overstory.apikeys"].key("x")
    assert SettingsKey("overstory.x:", "m", "y").is_prefix


def test_backoff_is_full_jitter_growing_to_its_cap_and_validated() -> None:
    backoff = Backoff(attempts=8, base_s=0.001, cap_s=0.01, random=lambda: 1.0)
    assert [backoff.delay(n) for n in range(6)] == [0.0, 0.002, 0.004, 0.008, 0.01, 0.01]
    assert Backoff(random=lambda: 0.5, base_s=0.001, cap_s=1.0).delay(1) == 0.001
    for bad in ({"attempts": 0}, {"attempts": True}, {"base_s": 1.0, "cap_s": 0.5}):
        with pytest.raises(UsageError):
            Backoff(**bad)  # type: ignore[arg-type]


class _Rival:
    """A store whose value another writer changes right after every read of ``key``
    (the first ``times`` reads): each compare-and-set then loses."""

    def __init__(self, inner: HistoryStore, times: int) -> None:
        self._inner, self.times, self.reads = inner, times, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def get_setting(self, key: str) -> str | None:
        raw = await self._inner.get_setting(key)
        self.reads += 1
        if self.reads <= self.times:
            rival = json.dumps({"rival": self.reads})
            assert await self._inner.put_setting(key, rival, expected=raw)
        return raw


def _plus_one(raw: str | None) -> str:
    return json.dumps({"n": (json.loads(raw).get("n", 0) if raw else 0) + 1})


def test_update_retries_lost_races_with_backoff_then_names_the_key(sqlite_url: str) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    backoff = Backoff(attempts=4, base_s=0.001, cap_s=0.004, sleep=sleep, random=lambda: 1.0)

    async def body(store: HistoryStore) -> tuple[Any, ...]:
        wins_third = await update(_Rival(store, 2), COUNTER, _plus_one, backoff=backoff)  # type: ignore[arg-type]
        after_win = list(slept)
        slept.clear()
        with pytest.raises(SettingContended) as caught:
            await update(_Rival(store, 99), COUNTER, _plus_one, backoff=backoff, what="a test")  # type: ignore[arg-type]
        return wins_third, after_win, caught.value, await store.get_setting(COUNTER)

    won, after_win, error, stored = on_store(sqlite_url, body, None)
    assert (won.old, won.new, won.changed) == ('{"rival": 2}', '{"n": 1}', True)
    assert after_win == [0.002, 0.004]  # before the 2nd and 3rd attempts
    assert slept == [0.002, 0.004, 0.004]  # 4 attempts, capped
    assert isinstance(error, StoreError)
    assert (error.key, error.attempts) == (COUNTER, 4)
    assert str(error) == (
        f"setting {COUNTER!r} (a test) kept changing: 4 compare-and-set attempts lost to "
        "other writers"
    )
    assert stored == '{"rival": 4}'  # the rival's 4th write stands; ours never landed


def test_update_leaves_the_value_when_the_function_declines_or_raises(sqlite_url: str) -> None:
    def refuse(raw: str | None) -> str | None:
        raise UsageError(f"no: {raw}")

    async def body(store: HistoryStore) -> tuple[Any, ...]:
        first = await update(store, COUNTER, lambda raw: "v1")
        declined = await update(store, COUNTER, lambda raw: None)
        same = await update(store, COUNTER, lambda raw: raw)
        with pytest.raises(UsageError, match="no: v1"):
            await update(store, COUNTER, refuse)
        with pytest.raises(UnregisteredSettingKey):
            await update(store, "nobody", lambda raw: "x")
        return first, declined, same, await store.get_setting(COUNTER)

    first, declined, same, stored = on_store(sqlite_url, body, None)
    assert (first.old, first.new, first.changed) == (None, "v1", True)
    assert (declined.old, declined.new, declined.changed) == ("v1", "v1", False)
    assert not same.changed
    assert stored == "v1"


def test_concurrent_updates_from_two_stores_lose_no_increment(store_url: str) -> None:
    from overstory.store import open_store

    async def body(store: HistoryStore) -> Any:
        other = open_store(store_url, data_keys=None)
        await other.open()
        try:
            await asyncio.gather(
                *(update(s, COUNTER, _plus_one) for _ in range(20) for s in (store, other))
            )
        finally:
            await other.close()
        return json.loads(await store.get_setting(COUNTER) or "{}")

    assert on_store(store_url, body, None) == {"n": 40}


def test_contend_returns_the_first_result_that_is_not_a_conflict() -> None:
    tries: list[int] = []

    async def step() -> str | Conflict:
        tries.append(1)
        return CONFLICT if len(tries) < 3 else "done"

    async def no_sleep(seconds: float) -> None:
        pass

    got = asyncio.run(contend("k", step, backoff=Backoff(attempts=3, sleep=no_sleep)))
    assert (got, len(tries)) == ("done", 3)
