"""One contract, run against both stores: SQLite and MongoDB (secantusdb or MONGO_URI)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from overstory.exceptions import Fenced, SequenceConflict, StoreUnavailable
from overstory.messages import (
    AssistantMessage,
    Message,
    ToolCall,
    ToolReturn,
    Usage,
    UserMessage,
)
from overstory.store import HistoryStore, open_store


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def with_store(url: str, body: Callable[[HistoryStore], Awaitable[Any]]) -> Any:
    async def go() -> Any:
        store = open_store(url)
        await store.open()
        try:
            return await body(store)
        finally:
            await store.close()

    return run(go())


def sample_turn(turn_id: str, start: int) -> list[Message]:
    return [
        UserMessage(content="what is 2 + 3? ünïcödé 🌲", seq=start, turn_id=turn_id),
        AssistantMessage(
            tool_calls=(ToolCall(id="c1", name="add", arguments={"a": 2, "b": 3}),),
            usage=Usage(10, 2),
            model="offline:demo",
            seq=start + 1,
            turn_id=turn_id,
        ),
        ToolReturn(tool_call_id="c1", tool_name="add", content="5", seq=start + 2, turn_id=turn_id),
        AssistantMessage(content="5", usage=Usage(12, 1), seq=start + 3, turn_id=turn_id),
    ]


def test_round_trip_every_message_kind_in_order(store_url: str) -> None:
    messages = sample_turn("t1", 0) + sample_turn("t2", 4)

    async def body(store: HistoryStore) -> list[Message]:
        for m in reversed(messages):  # insertion order must not matter: seq orders
            await store.append("alice", m)
        return await store.load("alice")

    assert with_store(store_url, body) == messages


def test_pages_tails_and_turns_are_read_without_the_whole_history(store_url: str) -> None:
    messages = [m for n in range(5) for m in sample_turn(f"t{n}", 4 * n)]

    async def body(store: HistoryStore) -> tuple[Any, ...]:
        for m in messages:
            await store.append("alice", m)
        await store.append("bob", UserMessage(content="b", seq=0, turn_id="t1"))
        return (
            await store.load("alice", after=5, limit=3),
            await store.load("alice", after=17),
            await store.load("alice", limit=2),
            await store.load_last("alice", 6),
            await store.load_last("alice", 100),
            await store.load_last("nobody", 3),
            await store.load_turn("alice", "t1"),
            await store.load_turn("alice", "missing"),
        )

    page, end, head, tail, everything, none, turn, missing = with_store(store_url, body)
    assert [m.seq for m in page] == [6, 7, 8]
    assert [m.seq for m in end] == [18, 19]
    assert head == messages[:2]
    assert tail == messages[-6:]
    assert everything == messages
    assert none == []
    assert turn == messages[4:8]  # alice's turn t1 only, not bob's
    assert missing == []


def test_duplicate_seq_is_rejected_and_nothing_is_overwritten(store_url: str) -> None:
    original = UserMessage(content="first", seq=0, turn_id="t1")
    intruder = UserMessage(content="second", seq=0, turn_id="t2")

    async def body(store: HistoryStore) -> tuple[SequenceConflict, list[Message]]:
        await store.append("alice", original)
        with pytest.raises(SequenceConflict) as info:
            await store.append("alice", intruder)
        return info.value, await store.load("alice")

    error, stored = with_store(store_url, body)
    assert (error.conversation_id, error.seq) == ("alice", 0)
    assert stored == [original]


def test_conversations_are_isolated_and_counted(store_url: str) -> None:
    async def body(store: HistoryStore) -> tuple[Any, ...]:
        for i in range(3):
            await store.append("alice", UserMessage(content=f"a{i}", seq=i, turn_id=f"a{i}"))
        await store.append("bob", UserMessage(content="b0", seq=0, turn_id="b0"))
        return (
            await store.count("alice"),
            await store.count("bob"),
            await store.count("nobody"),
            await store.count(),
            await store.conversation_ids(),
            await store.load("nobody"),
            [m.content for m in await store.load("bob")],
        )

    assert with_store(store_url, body) == (3, 1, 0, 4, ["alice", "bob"], [], ["b0"])


def test_history_survives_reopening_the_store(store_url: str) -> None:
    messages = sample_turn("t1", 0)

    async def write(store: HistoryStore) -> None:
        for m in messages:
            await store.append("alice", m)

    with_store(store_url, write)
    assert with_store(store_url, lambda s: s.load("alice")) == messages


def test_concurrent_appends_to_one_seq_store_exactly_one(store_url: str) -> None:
    async def body(store: HistoryStore) -> tuple[int, list[Message]]:
        others = [open_store(store_url) for _ in range(3)]
        for other in others:
            await other.open()
        try:
            attempts = [
                s.append("race", UserMessage(content=f"writer {i}", seq=0, turn_id=f"w{i}"))
                for i, s in enumerate([store, *others])
            ]
            results = await asyncio.gather(*attempts, return_exceptions=True)
        finally:
            for other in others:
                await other.close()
        conflicts = sum(isinstance(r, SequenceConflict) for r in results)
        return conflicts, await store.load("race")

    conflicts, stored = with_store(store_url, body)
    assert conflicts == 3
    assert len(stored) == 1


def test_open_is_idempotent_and_close_twice_is_harmless(store_url: str) -> None:
    async def go() -> int:
        store = open_store(store_url)
        await store.open()
        await store.open()
        await store.append("x", UserMessage(content="hi", seq=0, turn_id="t"))
        n = await store.count("x")
        await store.close()
        await store.close()
        return n

    assert run(go()) == 1


def test_url_in_repr_hides_the_password() -> None:
    store = open_store("mongodb://app:s3cret@127.0.0.1:1/db")
    assert "s3cret" not in repr(store)
    assert "***" in store.url


# --- store-specific failures ------------------------------------------------------------


def test_sqlite_uses_wal_and_a_unique_key(sqlite_url: str) -> None:
    with_store(sqlite_url, lambda s: s.count())
    path = sqlite_url.removeprefix("sqlite:///")
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        pk = [r[1] for r in conn.execute("PRAGMA table_info(messages)") if r[5]]
        assert pk == ["conversation_id", "seq"]
    finally:
        conn.close()


def test_sqlite_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/no/such/dir/h.db"
    with pytest.raises(StoreUnavailable, match="does not exist"):
        with_store(url, lambda s: s.count())


def test_sqlite_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreUnavailable, match=r"junk\.db"):
        with_store(f"sqlite:///{path}", lambda s: s.count())
    assert path.read_bytes() == b"this is not sqlite" * 100


def test_mongodb_unreachable_is_a_clear_error() -> None:
    from overstory.store.mongodb import MongoStore

    async def go() -> None:
        store = MongoStore("mongodb://127.0.0.1:9/overstory", timeout_s=0.5)
        await store.open()

    with pytest.raises(
        StoreUnavailable, match=r"cannot reach MongoDB store mongodb://127\.0\.0\.1:9"
    ):
        run(go())


def test_mongodb_records_one_document_per_message_with_unique_index(mongo_url: str) -> None:
    from pymongo import MongoClient

    async def write(store: HistoryStore) -> None:
        for m in sample_turn("t1", 0):
            await store.append("alice", m)

    with_store(mongo_url, write)
    base, db = mongo_url.rsplit("/", 1)
    client: MongoClient[dict[str, Any]] = MongoClient(base)
    try:
        coll = client[db]["messages"]
        assert coll.count_documents({"conversation_id": "alice"}) == 4
        index = coll.index_information()["conversation_seq_unique"]
        assert index["unique"] is True
        assert index["key"] == [("conversation_id", 1), ("seq", 1)]
    finally:
        client.close()


# --- fencing ---------------------------------------------------------------------------


def test_acquire_gives_each_incarnation_a_higher_epoch(store_url: str) -> None:
    async def body(store: HistoryStore) -> list[int]:
        return [
            await store.acquire("alice"),
            await store.acquire("alice"),
            await store.acquire("bob"),
            await store.acquire("alice"),
        ]

    assert with_store(store_url, body) == [1, 2, 1, 3]


def test_a_zombie_cannot_write_after_its_replacement_took_over(store_url: str) -> None:
    async def body(store: HistoryStore) -> tuple[Fenced, list[Message]]:
        old = await store.acquire("alice")
        await store.append("alice", UserMessage(content="old 0", seq=0, turn_id="a"), epoch=old)
        new = await store.acquire("alice")  # the replacement starts
        with pytest.raises(Fenced) as info:
            await store.append(
                "alice", UserMessage(content="zombie 1", seq=1, turn_id="z"), epoch=old
            )
        await store.append("alice", UserMessage(content="new 1", seq=1, turn_id="b"), epoch=new)
        return info.value, await store.load("alice")

    error, stored = with_store(store_url, body)
    assert (error.epoch, error.current) == (1, 2)
    assert "incarnation 1 may no longer write" in str(error)
    assert [m.content for m in stored] == ["old 0", "new 1"]


def test_fencing_a_conversation_never_taken_over(store_url: str) -> None:
    async def body(store: HistoryStore) -> int:
        with pytest.raises(Fenced):
            await store.append("ghost", UserMessage(content="x", seq=0, turn_id="t"), epoch=5)
        return await store.count("ghost")

    assert with_store(store_url, body) == 0


def test_zombie_and_replacement_racing_on_separate_connections(store_url: str) -> None:
    """Many writes of an old incarnation race a takeover: none lands after it."""

    async def body(store: HistoryStore) -> tuple[list[Message], int]:
        zombie = open_store(store_url)
        await zombie.open()
        try:
            old = await zombie.acquire("race")
            taken = asyncio.Event()
            underway = asyncio.Event()  # the zombie has stored a few: take over mid-stream
            outcomes: list[tuple[int, bool]] = []

            async def zombie_writes() -> None:
                for seq in range(30):
                    started_after_takeover = taken.is_set()
                    try:
                        await zombie.append(
                            "race", UserMessage(content=f"z{seq}", seq=seq, turn_id="z"), epoch=old
                        )
                        outcomes.append((seq, started_after_takeover))
                        if seq == 2:
                            underway.set()
                    except Fenced:
                        return
                    await asyncio.sleep(0)

            async def takeover() -> int:
                await underway.wait()
                epoch = await store.acquire("race")
                taken.set()
                return epoch

            _, new = await asyncio.gather(zombie_writes(), takeover())
            # a zombie write begun after the takeover returned, yet stored, is a breach
            assert not [seq for seq, after in outcomes if after]
            return await store.load("race"), new
        finally:
            await zombie.close()

    stored, new = with_store(store_url, body)
    assert new == 2
    assert 0 < len(stored) < 30  # the takeover landed mid-stream and stopped the zombie
    assert [m.seq for m in stored] == list(range(len(stored)))


def test_sqlite_group_commit_batches_writes_and_isolates_each_failure(sqlite_url: str) -> None:
    """Writes made in one loop turn share one transaction; a conflicting or fenced write
    fails alone, and every other write of the batch is stored."""
    from overstory.store.sqlite import SQLiteStore

    async def body(store: HistoryStore) -> tuple[list[Any], int]:
        assert isinstance(store, SQLiteStore)
        await store.append("taken", UserMessage(content="first", seq=0, turn_id="t0"))
        epoch = await store.acquire("fenced")
        await store.acquire("fenced")  # a newer owner: ``epoch`` is stale now
        flushes = store.flushes
        writes = [
            store.append(f"c{i}", UserMessage(content=f"m{i}", seq=0, turn_id="t"))
            for i in range(50)
        ]
        writes.append(store.append("taken", UserMessage(content="dup", seq=0, turn_id="t1")))
        writes.append(
            store.append("fenced", UserMessage(content="x", seq=0, turn_id="t"), epoch=epoch)
        )
        results = await asyncio.gather(*writes, return_exceptions=True)
        return results, store.flushes - flushes

    results, flushes = with_store(sqlite_url, body)
    assert flushes == 1  # 52 writes, one transaction, one fsync
    assert results[:50] == [None] * 50
    assert isinstance(results[50], SequenceConflict)
    assert isinstance(results[51], Fenced)
    assert with_store(sqlite_url, lambda s: s.count()) == 51
    assert [m.content for m in with_store(sqlite_url, lambda s: s.load("taken"))] == ["first"]


K = "overstory.cache:k"  # settings keys are declared (overstory.store.settings.KEYS)
P = "overstory.cache:"


def test_settings_are_compare_and_set(store_url: str) -> None:
    async def body(store: HistoryStore) -> list[Any]:
        other = open_store(store_url)
        await other.open()
        try:
            return [
                await store.get_setting(K),
                await store.put_setting(K, "v1", expected=None),
                await other.put_setting(K, "x", expected=None),  # already set: refused
                await other.get_setting(K),
                await store.put_setting(K, "v2", expected="v1"),
                await other.put_setting(K, "v3", expected="v1"),  # stale expectation
                await other.get_setting(K),
            ]
        finally:
            await other.close()

    assert with_store(store_url, body) == [None, True, False, "v1", True, False, "v2"]
    assert with_store(store_url, lambda s: s.get_setting(K)) == "v2"  # durable


def test_settings_list_by_prefix_in_key_order_and_delete_by_compare(store_url: str) -> None:
    async def body(store: HistoryStore) -> list[Any]:
        # Characters LIKE and regexes treat specially must be taken literally.
        for key in ("p%_.*:b", "p%_.*:a", "p%_.*:c", "p%_.*", "p%x:a", "q:a", "p%_.:z"):
            await store.put_setting(P + key, key.upper(), expected=None)
        first = await store.settings(P + "p%_.*:", limit=2)
        rest = await store.settings(P + "p%_.*:", after=first[-1][0], limit=2)
        return [
            first,
            rest,
            await store.settings(P + "p%_.*:", after=P + "p%_.*:c"),
            await store.delete_setting(P + "p%_.*:a", expected="stale"),  # refused
            await store.delete_setting(P + "p%_.*:a", expected="P%_.*:A"),
            await store.get_setting(P + "p%_.*:a"),
            [k.removeprefix(P) for k, _ in await store.settings(P + "p")],
        ]

    first, rest, none, stale, deleted, gone, every = with_store(store_url, body)
    assert first == [(P + "p%_.*:a", "P%_.*:A"), (P + "p%_.*:b", "P%_.*:B")]
    assert rest == [(P + "p%_.*:c", "P%_.*:C")]
    assert (none, stale, deleted, gone) == ([], False, True, None)
    assert every == ["p%_.*", "p%_.*:b", "p%_.*:c", "p%_.:z", "p%x:a"]


def test_a_settings_key_nobody_declared_is_refused_and_nothing_is_written(
    store_url: str,
) -> None:
    from overstory.store.settings import UnregisteredSettingKey

    async def body(store: HistoryStore) -> list[str]:
        refused = []
        for key in ("k", "overstory.nobody:x", "overstory.cache:", "overstory.apikeys:x"):
            with pytest.raises(UnregisteredSettingKey) as caught:
                await store.put_setting(key, "v", expected=None)
            refused.append(str(caught.value))
            assert await store.get_setting(key) is None
        with pytest.raises(UnregisteredSettingKey):
            await store.delete_setting("k", expected="v")
        return refused

    refused = with_store(store_url, body)
    assert "'k' is not declared in overstory.store.settings.KEYS" in refused[0]
    assert "'overstory.nobody:x'" in refused[1]


def test_vault_replace_is_compare_and_set_and_keeps_the_expiry(store_url: str) -> None:
    space = ("agent", "u1")

    async def body(store: HistoryStore) -> list[Any]:
        await store.vault_put(space, "c", "k", "one", 1.0)  # expired long ago
        return [
            await store.vault_get(space, "c", "k"),  # expired: not served
            await store.vault_document(space, "c", "k"),  # but there, for re-sealing
            await store.vault_replace(space, "c", "k", "stale", "two"),  # refused
            await store.vault_replace(space, "c", "k", "one", "two"),
            await store.vault_replace(space, "c", "gone", "one", "two"),  # absent: refused
            await store.vault_document(space, "c", "gone"),
            await store.vault_rows(),
        ]

    got = with_store(store_url, body)
    assert got[:6] == [None, "one", False, True, False, None]
    assert got[6] == [("agent", "u1", "c", "k", "two", 1.0)]  # the expiry untouched


def test_a_hidden_message_keeps_its_record_and_reads_back_hidden(store_url: str) -> None:
    """A tombstone: ``hide`` marks the message, every read returns it marked, its body
    intact (kept for audit); an epoch no longer current is fenced; a missing seq says so."""
    messages = sample_turn("t1", 0)

    async def body(store: HistoryStore) -> tuple[Any, ...]:
        for m in messages:
            await store.append("alice", m)
        epoch = await store.acquire("alice")
        hid = await store.hide("alice", 2, epoch=epoch)
        again = await store.hide("alice", 2)  # idempotent
        missing = await store.hide("alice", 99)
        newer = await store.acquire("alice")
        with pytest.raises(Fenced):
            await store.hide("alice", 1, epoch=epoch)
        assert newer > epoch
        return hid, again, missing, await store.load("alice"), await store.load_turn("alice", "t1")

    hid, again, missing, loaded, turn = with_store(store_url, body)
    assert (hid, again, missing) == (True, True, False)
    assert [m.hidden for m in loaded] == [False, False, True, False]
    assert loaded[2].content == "5"  # the record is kept
    assert turn == loaded


def test_a_store_made_before_tombstones_gains_the_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE messages (conversation_id TEXT NOT NULL, seq INTEGER NOT NULL, "
        "turn_id TEXT NOT NULL, kind TEXT NOT NULL, created_at REAL NOT NULL, "
        "body TEXT NOT NULL, PRIMARY KEY (conversation_id, seq)) WITHOUT ROWID;"
        "INSERT INTO messages VALUES ('alice', 0, 't', 'user', 1.0, '{\"content\":\"hi\"}');"
    )
    conn.commit()
    conn.close()

    async def body(store: HistoryStore) -> tuple[bool, list[Message]]:
        return await store.hide("alice", 0), await store.load("alice")

    hid, loaded = with_store(f"sqlite:///{path}", body)
    assert hid
    assert [(m.content, m.hidden) for m in loaded] == [("hi", True)]
