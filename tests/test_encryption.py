"""Encryption at rest (no Ray): keys, sealing, what the raw store holds (enc2 bytes: a
SQLite BLOB, BSON binary), tampering, wrong and missing keys, rotation, bodies sealed as
enc1 text by earlier versions — against SQLite and the MongoDB-wire server both."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import on_store

from overstory.exceptions import DataKeyError
from overstory.messages import (
    AssistantMessage,
    Message,
    ToolCall,
    ToolReturn,
    Usage,
    UserMessage,
    to_record,
)
from overstory.store import HistoryStore
from overstory.store.crypto import DataKeys, key_id_of, reseal

CANARY = "CANARY-7f3a-secret-text"


def _key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


K1, K2 = _key(), _key()


def run(url: str, keys: DataKeys | None, body: Callable[[HistoryStore], Awaitable[Any]]) -> Any:
    return on_store(url, body, keys)


def _turn(seq: int) -> list[Message]:
    """A user message, a tool call, its return and the answer: the canary in each body."""
    call = ToolCall(id=f"c{seq}", name="lookup", arguments={"q": CANARY})
    return [
        UserMessage(content=f"my text {CANARY}", seq=seq, turn_id=f"t{seq}", created_at=1.0),
        AssistantMessage(
            content="", tool_calls=(call,), seq=seq + 1, turn_id=f"t{seq}", created_at=1.0
        ),
        ToolReturn(
            tool_call_id=f"c{seq}",
            tool_name="lookup",
            content=CANARY,
            seq=seq + 2,
            turn_id=f"t{seq}",
            created_at=1.0,
        ),
        AssistantMessage(
            content=f"answer {CANARY}",
            usage=Usage(3, 4),
            seq=seq + 3,
            turn_id=f"t{seq}",
            created_at=1.0,
        ),
    ]


async def _write(store: HistoryStore, cid: str, messages: list[Message]) -> None:
    for message in messages:
        await store.append(cid, message)


def _mongo(url: str, body: Callable[[Any], Any]) -> Any:
    """``body(messages)`` on the MongoDB store's messages collection, past the store."""
    from pymongo import MongoClient

    client: MongoClient[dict[str, Any]] = MongoClient(url)
    try:
        return body(client.get_default_database()["messages"])
    finally:
        client.close()


def _raw_rows(url: str) -> list[tuple[str, str | bytes]]:
    """Every stored body, read past the store, in (conversation, seq) order, with how it
    is stored: SQLite's ``typeof(body)``; for MongoDB, what PyMongo decodes it to (BSON
    binary data comes back as ``bytes``, a string as ``str``)."""
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            rows = conn.execute(
                "SELECT typeof(body), body FROM messages ORDER BY conversation_id, seq"
            )
            return [(str(t), b) for t, b in rows]
    docs = _mongo(url, lambda c: list(c.find().sort([("conversation_id", 1), ("seq", 1)])))
    return [(type(d["body"]).__name__, d["body"]) for d in docs]


def _raw_bodies(url: str) -> list[str | bytes]:
    return [body for _, body in _raw_rows(url)]


def _shows(body: str | bytes, text: str) -> bool:
    return (text.encode() if isinstance(body, bytes) else text) in body


def _put_raw(url: str, cid: str, message: Message, body: str | bytes) -> None:
    """``message`` stored with ``body`` as it is, past the store (as an earlier version of
    overstory would have written it)."""
    record = {**to_record(message), "body": body}
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            conn.execute(
                "INSERT INTO messages (conversation_id, seq, turn_id, kind, created_at, body)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (cid, *(record[f] for f in ("seq", "turn_id", "kind", "created_at", "body"))),
            )
    else:
        _mongo(url, lambda c: c.insert_one({"conversation_id": cid, **record}))


def test_data_keys_parse_both_base64_alphabets_and_name_every_mistake(tmp_path: Path) -> None:
    raw = os.urandom(32)
    standard, urlsafe = base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()
    keys = DataKeys.parse(f"new:{urlsafe.rstrip('=')}, old:{standard}")
    assert (keys.primary, keys.keys["new"], keys.keys["old"]) == ("new", raw, raw)
    assert standard not in repr(keys)
    assert "'new'" in repr(keys)
    for text, problem in (
        ("", "names no key"),
        ("k1", "ID:BASE64"),
        ("bad id!:" + standard, "ID:BASE64"),
        ("k1:" + base64.b64encode(os.urandom(16)).decode(), "16 bytes; AES-256 needs 32"),
        ("k1:not*base64", "not standard or URL-safe base64"),
        (f"k1:{standard},k1:{standard}", "listed twice"),
    ):
        with pytest.raises(DataKeyError, match=problem):
            DataKeys.parse(text)
    key_file = tmp_path / "data.keys"
    key_file.write_text(f"# rotated on 2026-11-30\nk2:{K2}\nk1:{K1}  # the old one\n")
    from_file = DataKeys.from_environment({"OVERSTORY_DATA_KEY_FILE": str(key_file)})
    assert from_file is not None
    assert (from_file.primary, set(from_file.keys)) == ("k2", {"k1", "k2"})
    assert DataKeys.from_environment({}) is None
    with pytest.raises(DataKeyError, match="not both"):
        DataKeys.from_environment(
            {"OVERSTORY_DATA_KEYS": f"k:{K1}", "OVERSTORY_DATA_KEY_FILE": "x"}
        )
    with pytest.raises(DataKeyError, match="cannot read"):
        DataKeys.from_environment({"OVERSTORY_DATA_KEY_FILE": str(tmp_path / "missing")})


def test_no_message_text_reaches_the_store_and_history_reads_back_whole(store_url: str) -> None:
    keys = DataKeys.parse(f"k1:{K1}")
    messages = _turn(0) + _turn(4)

    async def body(store: HistoryStore) -> list[Message]:
        await _write(store, "a:alice", messages)
        return await store.load("a:alice")

    loaded = run(store_url, keys, body)
    rows = _raw_rows(store_url)
    assert len(rows) == 8
    # stored as bytes: a BLOB in SQLite's TEXT-declared column, BSON binary in MongoDB
    assert {kind for kind, _ in rows} == {"blob" if store_url.startswith("sqlite") else "bytes"}
    raw = [body for _, body in rows]
    assert all(isinstance(b, bytes) and b.startswith(b"enc2:k1:") for b in raw)
    assert all(not _shows(b, CANARY) and not _shows(b, "my text") for b in raw)
    # no base64: the prefix, a nonce and a tag (8 + 12 + 16 bytes) over the JSON text
    assert [len(b) for b in raw] == [len(to_record(m)["body"].encode()) + 36 for m in messages]
    assert loaded == messages
    if store_url.startswith("mongodb"):  # nowhere in the documents either
        docs = _mongo(store_url, lambda c: list(c.find()))
        assert all(CANARY not in repr(d) for d in docs)
    if store_url.startswith("sqlite"):  # the file's bytes, its write-ahead log included
        path = Path(store_url.removeprefix("sqlite:///"))
        files = [p for p in (path, path.with_name(path.name + "-wal")) if p.exists()]
        assert all(CANARY.encode() not in p.read_bytes() for p in files)


def test_a_record_moved_altered_or_cut_short_does_not_open(store_url: str) -> None:
    keys = DataKeys.parse(f"k1:{K1}")

    async def body(store: HistoryStore) -> list[str | bytes]:
        await _write(store, "a:alice", _turn(0))
        await _write(store, "a:bob", [UserMessage(content="bob's", seq=0, turn_id="b")])
        rows = await store.bodies()
        return [b for _, _, b in rows]

    bodies = run(store_url, keys, body)  # a:alice 0-3, then a:bob 0
    assert all(isinstance(b, bytes) for b in bodies)  # as stored
    alice_0, alice_1, bob_0 = bodies[0], bodies[1], bodies[4]
    assert isinstance(alice_0, bytes)
    nonce_end = len(b"enc2:k1:") + 12
    cases = {
        # one bit of the ciphertext flipped
        "flipped": alice_0[:40] + bytes([alice_0[40] ^ 1]) + alice_0[41:],
        # the tag's last byte gone; cut inside the nonce (shorter than a nonce and a tag)
        "tag cut": alice_0[:-1],
        "nonce cut": alice_0[: nonce_end - 4],
        "header only": b"enc2:k1:",
        # bytes that are no enc2 record: plain JSON, a bad key id, an old prefix
        "plain bytes": b'{"content":"hello"}',
        "bad key id": b"enc2:k 1:" + alice_0[len(b"enc2:k1:") :],
        "enc1 bytes": b"enc1:k1:" + alice_0[len(b"enc2:k1:") :],
        "unknown key": b"enc2:k9:" + alice_0[len(b"enc2:k1:") :],
    }

    async def tamper(store: HistoryStore) -> dict[str, str]:
        errors: dict[str, str] = {}

        async def refused(name: str, cid: str) -> None:
            with pytest.raises(DataKeyError) as caught:
                await store.load(cid)
            errors[name] = str(caught.value)

        # text never matches a stored bytes body: compare-and-set sees the body as stored
        assert not await store.replace_body("a:alice", 0, alice_0.decode("latin-1"), alice_1)
        # alice's first message copied over bob's (another conversation, the same seq)
        assert await store.replace_body("a:bob", 0, bob_0, alice_0)
        await refused("other conversation", "a:bob")
        # alice's first message copied to her second position
        assert await store.replace_body("a:alice", 1, alice_1, alice_0)
        await refused("other seq", "a:alice")
        assert await store.replace_body("a:alice", 1, alice_0, alice_1)
        current: str | bytes = alice_0
        for name, damaged in cases.items():
            assert await store.replace_body("a:alice", 0, current, damaged)
            current = damaged
            await refused(name, "a:alice")
        assert await store.replace_body("a:alice", 0, current, alice_0)  # put back: it opens
        assert await store.load("a:alice") == _turn(0)
        return errors

    errors = run(store_url, keys, tamper)
    assert "message 0 of 'a:bob' does not open" in errors["other conversation"]
    assert "message 1 of 'a:alice' does not open" in errors["other seq"]
    for name in ("other conversation", "other seq", "flipped", "tag cut", "nonce cut"):
        assert "with data key 'k1': it was altered, moved" in errors[name], name
    assert "message 0 of 'a:alice' does not open" in errors["flipped"]
    assert "(ValueError)" in errors["nonce cut"]  # cut short: no tag to check
    assert "(ValueError)" in errors["header only"]
    for name in ("plain bytes", "bad key id", "enc1 bytes"):
        assert errors[name].startswith(
            "message 0 of 'a:alice' is stored as bytes but is not a sealed record"
        ), name
    assert "sealed with data key 'k9', which is not configured" in errors["unknown key"]
    assert all(CANARY not in e for e in errors.values())


def test_bodies_sealed_as_enc1_text_by_earlier_versions_still_open(store_url: str) -> None:
    """A store written before enc2: its sealed bodies are enc1 text (base64) beside the
    new bytes ones; both open, and the raw records keep their forms until re-sealed."""
    keys = DataKeys.parse(f"k1:{K1}")
    run(store_url, keys, lambda s: _write(s, "a:alice", _turn(0)))
    for message in _turn(4):
        body = keys.seal(to_record(message)["body"], "a:alice", message.seq)
        assert body.startswith("enc1:k1:")
        _put_raw(store_url, "a:alice", message, body)
    forms = [type(b).__name__ for b in _raw_bodies(store_url)]
    assert forms == ["bytes"] * 4 + ["str"] * 4
    assert run(store_url, keys, lambda s: s.load("a:alice")) == _turn(0) + _turn(4)
    assert run(store_url, keys, lambda s: s.load_turn("a:alice", "t4")) == _turn(4)
    # an enc1 record moved to another position does not open either
    enc1_4 = _raw_bodies(store_url)[4]
    assert isinstance(enc1_4, str)

    async def move(store: HistoryStore) -> None:
        old = _raw_bodies(store_url)[5]
        assert await store.replace_body("a:alice", 5, old, enc1_4)
        with pytest.raises(DataKeyError, match="message 5 of 'a:alice' does not open"):
            await store.load("a:alice")

    run(store_url, keys, move)


def test_a_wrong_or_missing_key_fails_at_open_naming_the_key(store_url: str) -> None:
    run(store_url, DataKeys.parse(f"k1:{K1}"), lambda s: _write(s, "a:alice", _turn(0)))
    with pytest.raises(DataKeyError, match="no key is configured"):
        run(store_url, None, lambda s: s.count())
    with pytest.raises(DataKeyError, match="data key 'k1' is wrong"):
        run(store_url, DataKeys.parse(f"k1:{K2}"), lambda s: s.count())
    with pytest.raises(DataKeyError, match=r"sealed with data key.*'k1'.*not configured"):
        run(store_url, DataKeys.parse(f"k2:{K2}"), lambda s: s.count())
    # the stored history is untouched by the refusals
    assert run(store_url, DataKeys.parse(f"k1:{K1}"), lambda s: s.load("a:alice")) == _turn(0)


def test_rotation_seals_plain_and_old_records_with_the_new_key_then_old_keys_may_go(
    store_url: str,
) -> None:
    run(store_url, None, lambda s: _write(s, "a:alice", _turn(0)))  # before encryption
    assert sum(_shows(b, CANARY) for b in _raw_bodies(store_url)) == 4  # in the clear
    assert all(isinstance(b, str) for b in _raw_bodies(store_url))  # plain bodies: text
    k1 = DataKeys.parse(f"k1:{K1}")
    run(store_url, k1, lambda s: _write(s, "a:alice", _turn(4)))  # turned on: mixed
    for message in _turn(8):  # and sealed as enc1 text, as overstory did before enc2
        body = k1.seal(to_record(message)["body"], "a:alice", message.seq)
        _put_raw(store_url, "a:alice", message, body)
    history = _turn(0) + _turn(4) + _turn(8)
    assert run(store_url, k1, lambda s: s.load("a:alice")) == history
    # plain, enc2 under k1 and enc1 under k1: all but the enc2 ones are re-sealed
    first = run(store_url, k1, reseal)
    assert (first["examined"], first["resealed"], first["skipped"]) == (12, 8, 0)
    raw = _raw_bodies(store_url)
    assert all(isinstance(b, bytes) and b.startswith(b"enc2:k1:") for b in raw)
    assert not any(_shows(b, CANARY) for b in raw)
    assert run(store_url, k1, lambda s: s.load("a:alice")) == history

    k2_then_k1 = DataKeys.parse(f"k2:{K2},k1:{K1}")
    second = run(store_url, k2_then_k1, reseal)
    assert (second["resealed"], second["key"]) == (12, "k2")
    assert run(store_url, k2_then_k1, reseal)["resealed"] == 0  # nothing left to do
    assert {key_id_of(b) for b in _raw_bodies(store_url)} == {"k2"}
    # every record is under k2 now, and k1's check value was dropped: k1 may go
    only_k2 = DataKeys.parse(f"k2:{K2}")
    assert run(store_url, only_k2, lambda s: s.load("a:alice")) == history
    with pytest.raises(DataKeyError, match="no key is configured"):
        run(store_url, None, lambda s: s.count())


def test_the_rotate_data_command_reseals_with_the_first_key(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from overstory.cli.main import main

    run(sqlite_url, DataKeys.parse(f"k1:{K1}"), lambda s: _write(s, "a:alice", _turn(0)))
    monkeypatch.delenv("OVERSTORY_DATA_KEY_FILE", raising=False)
    monkeypatch.setenv("OVERSTORY_DATA_KEYS", f"k2:{K2},k1:{K1}")
    assert main(["keys", "rotate-data", "--json", "--store", sqlite_url]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {"examined": 4, "resealed": 4, "skipped": 0, "key": "k2"}
    monkeypatch.setenv("OVERSTORY_DATA_KEYS", f"k1:{K1}")  # the old key alone: refused
    assert main(["keys", "rotate-data", "--store", sqlite_url]) == 2
    assert "'k2'" in capsys.readouterr().err
    monkeypatch.delenv("OVERSTORY_DATA_KEYS")
    assert main(["keys", "list", "--store", sqlite_url]) == 2  # no key: any use refused
    assert "OVERSTORY_DATA_KEYS" in capsys.readouterr().err


def test_rotate_data_reseals_every_owner_of_sealed_records_and_requires_each(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """History, vault documents and job records: the command imports each owner, whose
    re-sealer registers with crypto; a required owner that is missing writes nothing."""
    from overstory.cli.main import main
    from overstory.jobs import JobBook, new_job
    from overstory.store.crypto import key_id_of, resealers
    from overstory.vault import DataVault

    assert {"messages", "vault", "jobs"} <= set(resealers())

    async def write(store: HistoryStore) -> None:
        await _write(store, "a:alice", _turn(0))
        await DataVault(store, "a", "alice").store("notes", {"text": CANARY}, key="n")
        await JobBook(store, "ns").add(
            new_job("alice", "a", CANARY, max_attempts=1, webhook="", now=1.0)
        )

    async def sealed_with(store: HistoryStore) -> dict[str, set[str | None]]:
        jobs = await store.settings("overstory.job:")
        return {
            "messages": {key_id_of(body) for _, _, body in await store.bodies()},
            "vault": {key_id_of(row[4]) for row in await store.vault_rows()},
            "jobs": {key_id_of(json.loads(raw)["text"]) for _, raw in jobs},
        }

    run(sqlite_url, DataKeys.parse(f"k1:{K1}"), write)
    k2_then_k1 = DataKeys.parse(f"k2:{K2},k1:{K1}")
    with pytest.raises(DataKeyError, match="no re-sealer is registered for nobody"):
        run(sqlite_url, k2_then_k1, lambda s: reseal(s, require=("jobs", "nobody")))
    before = {"messages": {"k1"}, "vault": {"k1"}, "jobs": {"k1"}}
    assert run(sqlite_url, k2_then_k1, sealed_with) == before  # nothing written

    monkeypatch.delenv("OVERSTORY_DATA_KEY_FILE", raising=False)
    monkeypatch.setenv("OVERSTORY_DATA_KEYS", f"k2:{K2},k1:{K1}")
    assert main(["keys", "rotate-data", "--json", "--store", sqlite_url]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {"examined": 6, "resealed": 6, "skipped": 0, "key": "k2"}
    after = {"messages": {"k2"}, "vault": {"k2"}, "jobs": {"k2"}}
    assert run(sqlite_url, DataKeys.parse(f"k2:{K2}"), sealed_with) == after
