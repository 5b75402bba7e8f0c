"""Quotas without Ray: the ledger's one rule, and many writers on one real store."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from overstory.exceptions import ConfigError, QuotaExceeded, StoreError
from overstory.quota import (
    Admit,
    Commit,
    Finish,
    Ledger,
    Quota,
    Release,
    Reserve,
    apply,
    change_quota,
    estimate_tokens,
    read_ledger,
    report,
    step_ledger,
)
from overstory.store import HistoryStore, open_store

NOON = 1_796_040_000.0  # 2026-11-30 12:00 UTC
assert NOON % 86_400 == 43_200


def test_tokens_are_reserved_then_committed_and_a_refusal_says_until_when() -> None:
    quota = Quota(tokens_per_day=1000)
    ledger = step_ledger(Ledger(), Admit("t1", "t1#1", 600, NOON + 60), quota, NOON)
    assert (ledger.tokens, ledger.reserved_tokens, list(ledger.slots)) == (0, 600, ["t1"])
    # what is reserved counts: 600 + 500 > 1000
    with pytest.raises(QuotaExceeded) as refused:
        step_ledger(ledger, Admit("t2", "t2#1", 500, NOON + 60), quota, NOON)
    assert refused.value.limit == "tokens_per_day"
    assert refused.value.retry_after_s == pytest.approx(43_200)  # the next UTC midnight
    assert "tokens_per_day = 1000" in str(refused.value)
    ledger = step_ledger(ledger, Commit("t1#1", 250), quota, NOON)  # real usage replaces it
    assert (ledger.tokens, ledger.reserved_tokens) == (250, 0)
    ledger = step_ledger(ledger, Reserve("t1#2", 700, NOON + 60), quota, NOON)
    ledger = step_ledger(ledger, Release("t1#2"), quota, NOON)  # a failed call gives it back
    assert ledger.reserved_tokens == 0
    ledger = step_ledger(ledger, Admit("t2", "t2#1", 500, NOON + 60), quota, NOON)
    ledger = step_ledger(ledger, Finish("t2"), quota, NOON)  # the end frees what it held
    assert (ledger.reserved_tokens, dict(ledger.slots)) == (0, {"t1": NOON + 60})
    # a new UTC day starts from nothing committed
    tomorrow = step_ledger(ledger, Finish("t1"), quota, NOON + 86_400)
    assert (tomorrow.day, tomorrow.tokens) == ("2026-12-01", 0)


def test_turns_per_minute_and_turns_at_once() -> None:
    quota = Quota(requests_per_minute=2, concurrent_turns=2)
    ledger = Ledger()
    for i, at in enumerate((NOON, NOON + 10)):
        ledger = step_ledger(ledger, Admit(f"t{i}", f"t{i}#1", 1, at + 300), quota, at)
    with pytest.raises(QuotaExceeded) as refused:
        step_ledger(ledger, Admit("t9", "t9#1", 1, NOON + 300), quota, NOON + 20)
    assert refused.value.limit == "requests_per_minute"
    assert refused.value.retry_after_s == pytest.approx(40)  # the first start leaves the window
    ledger = step_ledger(ledger, Finish("t0"), quota, NOON + 61)
    ledger = step_ledger(ledger, Admit("t2", "t2#1", 1, NOON + 300), quota, NOON + 61)
    with pytest.raises(QuotaExceeded, match="concurrent_turns = 2"):  # t1 and t2 run
        step_ledger(ledger, Admit("t3", "t3#1", 1, NOON + 300), quota, NOON + 200)
    # the same turn admitted again (a retried start) is not a second turn
    assert step_ledger(ledger, Admit("t2", "t2#1", 1, NOON + 300), quota, NOON + 62) == step_ledger(
        ledger, Finish("nothing"), quota, NOON + 62
    )
    # a resumed turn (its process died) takes its slot back and is never refused
    full = step_ledger(ledger, Admit("t1", "t1#2", 1, NOON + 300, new=False), quota, NOON + 62)
    assert set(full.slots) == {"t1", "t2"}
    # a process that died holding a slot: it expires, and the next step drops it
    later = step_ledger(full, Admit("t4", "t4#1", 1, NOON + 900), quota, NOON + 311)
    assert set(later.slots) == {"t4"}


def test_quotas_and_ledgers_are_validated() -> None:
    with pytest.raises(ConfigError, match="tokens_per_day must be a whole number"):
        Quota(tokens_per_day=-1)
    with pytest.raises(ConfigError, match="whole number"):
        Quota(concurrent_turns=True)
    with pytest.raises(ConfigError, match="unknown quota key"):
        Quota.from_mapping({"tokens": 5})
    with pytest.raises(StoreError, match="unreadable"):
        Ledger.from_json('{"day": 1}')
    assert not Quota().limited
    assert Quota(concurrent_turns=0).limited
    assert estimate_tokens(["abcde", "fgh"], 10) == 12  # 8 characters: 2 tokens, + 10


def _run(body: object) -> object:
    return asyncio.run(body)  # type: ignore[arg-type]


def test_many_writers_on_one_store_never_overspend_and_leak_nothing(tmp_path: Path) -> None:
    """Eight turn loops on two store connections (two hosts), sharing one user's ledger:
    calls that use up to their estimate, calls that fail, turns whose process "dies"
    (never finishing: their slot and reservation expire) and cancelled turns."""
    url = f"sqlite:///{tmp_path}/quota.db"
    budget, estimate = 5_000, 120
    quota = Quota(tokens_per_day=budget, concurrent_turns=5)
    rng = random.Random(7)
    now = [NOON]

    async def loop(store: HistoryStore, worker: int, committed: list[int]) -> None:
        for n in range(40):
            turn = f"w{worker}-{n}"
            try:
                await apply(
                    store,
                    "ns",
                    "carol",
                    quota,
                    [Admit(turn, f"{turn}#1", estimate, now[0] + 30)],
                    now[0],
                )
            except QuotaExceeded:
                await asyncio.sleep(0)
                continue
            try:
                for call in range(1, rng.randint(1, 3) + 1):
                    rid = f"{turn}#{call}"
                    if call > 1:
                        await apply(
                            store,
                            "ns",
                            "carol",
                            quota,
                            [Reserve(rid, estimate, now[0] + 30)],
                            now[0],
                        )
                    await asyncio.sleep(0)
                    fate = rng.random()
                    if fate < 0.1:
                        raise ConnectionError("the model failed")
                    if fate < 0.15:
                        return  # the process died: nothing is given back, it expires
                    used = rng.randint(1, estimate)
                    await apply(store, "ns", "carol", quota, [Commit(rid, used)], now[0])
                    committed.append(used)
                    if fate > 0.95:
                        raise asyncio.CancelledError  # cancelled between calls
            except (ConnectionError, QuotaExceeded, asyncio.CancelledError):
                pass
            await apply(store, "ns", "carol", quota, [Finish(turn)], now[0])

    async def body() -> tuple[Ledger, list[int]]:
        stores = [open_store(url, data_keys=None), open_store(url, data_keys=None)]
        for s in stores:
            await s.open()
        committed: list[int] = []
        await asyncio.gather(*(loop(stores[w % 2], w, committed) for w in range(8)))
        now[0] += 31  # past every expiry
        ledger = await apply(stores[0], "ns", "carol", quota, [Finish("sweep")], now[0])
        for s in stores:
            await s.close()
        return ledger, committed

    ledger, committed = _run(body())  # type: ignore[misc]
    assert ledger.tokens == sum(committed)
    assert ledger.tokens <= budget  # calls used at most their estimates: no overspend at all
    assert (
        len(committed) >= 10
    )  # work was admitted (dead turns' slots block the rest until they expire)
    assert (ledger.reserved, ledger.slots) == ({}, {})  # nothing leaked


def test_a_quota_is_changed_in_part_and_reported(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/quota.db"
    default = Quota(tokens_per_day=100)

    async def body() -> tuple[dict[str, object], dict[str, object], Ledger]:
        store = open_store(url, data_keys=None)
        await store.open()
        before = await report(store, "ns", "dave", default)
        await change_quota(store, "ns", "dave", default, {"concurrent_turns": 2})
        mine = Quota(tokens_per_day=100, concurrent_turns=2)
        await apply(store, "ns", "dave", mine, [Admit("t", "t#1", 7, 2e9)])
        after = await report(store, "ns", "dave", default)
        ledger = await read_ledger(store, "ns", "dave")
        await store.close()
        return before, after, ledger

    before, after, ledger = _run(body())  # type: ignore[misc]
    assert before["own"] is False
    assert before["quota"] == {
        "tokens_per_day": 100,
        "requests_per_minute": None,
        "concurrent_turns": None,
    }
    assert after["own"] is True
    assert after["quota"] == {
        "tokens_per_day": 100,
        "requests_per_minute": None,
        "concurrent_turns": 2,
    }
    assert after["usage"] == {  # type: ignore[comparison-overlap]
        "day": ledger.day,
        "tokens": 0,
        "reserved_tokens": 7,
        "running_turns": 1,
        "turns_last_minute": 1,
    }


def test_the_same_turn_id_in_two_conversations_is_two_turns(tmp_path: Path) -> None:
    from overstory.quota import QuotaBook, finish

    async def body() -> list[int]:
        store = open_store(f"sqlite:///{tmp_path}/q.db", data_keys=None)
        await store.open()
        book = QuotaBook(store, "ns", Quota(concurrent_turns=2), turn_timeout_s=60, output_tokens=1)
        one = await book.admit("gus", "a:conv_1", "t1", ["hi"], True)
        two = await book.admit("gus", "a:conv_2", "t1", ["hi"], True)
        running = [len((await read_ledger(store, "ns", "gus")).slots)]
        with pytest.raises(QuotaExceeded, match="concurrent_turns"):
            await book.admit("gus", "a:conv_3", "t1", ["hi"], True)
        assert one is not None
        assert two is not None
        await finish(one)
        running.append(len((await read_ledger(store, "ns", "gus")).slots))
        await finish(two)
        running.append(len((await read_ledger(store, "ns", "gus")).slots))
        await store.close()
        return running

    assert _run(body()) == [2, 1, 0]
