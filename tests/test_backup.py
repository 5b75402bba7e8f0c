"""Backup and restore (no Ray): round trips SQLite → SQLite and SQLite → MongoDB →
SQLite comparing every record of every kind (sealed bodies as stored: enc2 bytes, and
enc1 text from a version-1 backup made before enc2; the audit chain verified), a
snapshot taken while a writer appends, damaged files refused by name with nothing
written, a non-empty target refused, and the two commands end to end."""

from __future__ import annotations

import base64
import gzip
import json
import os
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import on_store

from overstory import audit
from overstory.exceptions import BackupInvalid, DataKeyError, StoreNotEmpty, UsageError
from overstory.gateway.keys import create_key, revoke_key
from overstory.jobs import JobBook, new_job
from overstory.messages import AssistantMessage, Message, Usage, UserMessage
from overstory.quota import Quota, change_quota
from overstory.store import HistoryStore
from overstory.store.backup import _records, read_manifest, restore_backup, write_backup
from overstory.store.crypto import DataKeys, key_id_of, reseal
from overstory.store.records import KINDS
from overstory.store.settings import LEDGER
from overstory.vault import DataVault

CANARY = "CANARY-backup-5d1e"
K1 = base64.b64encode(os.urandom(32)).decode()
KEYS = DataKeys.parse(f"k1:{K1}")
CONVERSATIONS = ("a:alice", "a:bob", "b:carol")


def run(url: str, body: Callable[[HistoryStore], Awaitable[Any]], keys: Any = KEYS) -> Any:
    return on_store(url, body, keys)


def raw(url: str, body: Callable[[HistoryStore], Awaitable[Any]]) -> Any:
    """``body`` on the store opened raw (no data key), as the commands open it."""
    return on_store(url, body, raw=True)


def _turn(seq: int, turn: str) -> list[Message]:
    return [
        UserMessage(content=f"{CANARY} question {seq}", seq=seq, turn_id=turn, created_at=1.5),
        AssistantMessage(
            content=f"{CANARY} answer {seq}",
            usage=Usage(3, 4),
            model="m",
            seq=seq + 1,
            turn_id=turn,
            created_at=2.25,
        ),
    ]


async def populate(store: HistoryStore) -> None:
    """Some of every kind of record, through the code that owns each (sealed where the
    owner seals): histories (one message hidden), epochs, vault documents (one expiring),
    an API key created and revoked, a quota, a job, audit records."""
    for n, cid in enumerate(CONVERSATIONS):
        epoch = await store.acquire(cid)
        for turn in range(n + 1):
            for message in _turn(2 * turn, f"t{turn}"):
                await store.append(cid, message, epoch=epoch)
    await store.hide("a:alice", 1)
    await store.acquire("a:alice")  # epoch 2
    vault = DataVault(store, "a", "alice")
    await vault.store("notes", {"text": CANARY}, key="n1")
    await vault.store("notes", {"text": "short-lived"}, key="n2", ttl_s=3600.123456)
    await DataVault(store, "a", "").store("shared", {"n": 1}, key="s1")
    _, record = await create_key(store, "bob")
    await create_key(store, "alice", admin=True)
    await revoke_key(store, record.key_id)
    await change_quota(store, "ns", "dave", Quota(), {"concurrent_turns": 2})
    await JobBook(store, "ns").add(
        new_job("alice", "a", CANARY, max_attempts=1, webhook="", now=1.0)
    )
    for n in range(3):
        await audit.append(
            store, who="operator", action="access.denied", target=f"c{n}", outcome="denied"
        )


async def dump(store: HistoryStore) -> dict[str, list[dict[str, Any]]]:
    """Every record of every kind, as stored (one snapshot)."""
    out: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    async with store.snapshot() as snapshot:
        for kind in KINDS:
            out[kind] = [record async for record in snapshot.records(kind)]
    return out


async def seen(store: HistoryStore) -> dict[str, Any]:
    """What the owners read back (opened with the key): histories, vault rows, settings,
    the audit chain and its verdict."""
    return {
        "histories": {cid: await store.load(cid) for cid in await store.conversation_ids()},
        "bodies": await store.bodies(),
        "vault": await store.vault_rows(),
        "settings": await store.settings("", limit=10_000),
        "audit": [r.hash for r in await audit.records(store)],
        "problems": await audit.verify(store),
        "census": await store.census(),
    }


def _to_millis(moment: float | None) -> float | None:
    """What MongoDB keeps of a time: a date, to the millisecond (cut, not rounded)."""
    if moment is None:
        return None
    date = datetime.fromtimestamp(moment, UTC)
    return date.replace(microsecond=date.microsecond // 1000 * 1000).timestamp()


def millis(records: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """``records`` with vault expiries as MongoDB keeps them (to the millisecond)."""
    vault = [{**r, "expires_at": _to_millis(r["expires_at"])} for r in records["vault"]]
    assert vault != records["vault"]  # the test's expiry has sub-millisecond digits
    return {**records, "vault": vault}


def backup(url: str, dest: Path) -> Any:
    return raw(url, lambda store: write_backup(store, dest))


def restore(src: Path, url: str, keys: DataKeys | None = KEYS) -> Any:
    return raw(url, lambda store: restore_backup(src, store, keys=keys))


def test_sqlite_round_trip_keeps_every_record_sealed_and_the_audit_chain(
    sqlite_url: str, tmp_path: Path
) -> None:
    run(sqlite_url, populate)
    original = raw(sqlite_url, dump)
    assert {kind: len(rs) for kind, rs in original.items()} == {
        "setting": 14,
        "message": 12,
        "vault": 3,
        "conversation": 3,
    }
    manifest = backup(sqlite_url, tmp_path / "one.backup")
    assert (manifest.source, manifest.consistency, manifest.version) == ("sqlite", "transaction", 2)
    assert manifest.data_keys["k1"]["records"] == 12 + 3 + 1  # messages, vault, the job
    text = gzip.decompress((tmp_path / "one.backup").read_bytes())
    assert CANARY.encode() not in text
    # a bytes body (enc2) is a {"bytes": base64} object in the file, byte for byte
    assert all(isinstance(r["body"], bytes) for r in original["message"])
    lines = [json.loads(line) for line in text.splitlines()]
    bodies = [line["message"]["body"] for line in lines if "message" in line]
    assert [base64.b64decode(b["bytes"]) for b in bodies] == [
        r["body"] for r in original["message"]
    ]

    target = f"sqlite:///{tmp_path}/restored.db"
    restored = restore(tmp_path / "one.backup", target)
    assert restored.counts == manifest.counts == {k: len(v) for k, v in original.items()}
    assert restored.keys == {"k1": "verified"}
    assert raw(target, dump) == original  # every record of every kind, as stored
    assert {key_id_of(r["body"]) for r in original["message"]} == {"k1"}
    after = run(target, seen)
    assert after == run(sqlite_url, seen)
    assert after["problems"] == []
    assert len(after["audit"]) == 6  # 2 keys made, 1 revoked, 3 denials
    assert after["histories"]["a:alice"][1].hidden
    assert after["histories"]["b:carol"][-1].content == f"{CANARY} answer 4"
    with pytest.raises(DataKeyError, match="no key is configured"):
        run(target, lambda s: s.load("a:alice"), keys=None)  # sealed: the key is still needed


def test_sqlite_to_mongodb_and_back_is_a_backup_and_a_restore(
    sqlite_url: str, mongo_url: str, tmp_path: Path
) -> None:
    run(sqlite_url, populate)
    original = raw(sqlite_url, dump)
    backup(sqlite_url, tmp_path / "from-sqlite.backup")
    restore(tmp_path / "from-sqlite.backup", mongo_url)
    in_mongo = raw(mongo_url, dump)
    assert in_mongo == millis(original)
    assert run(mongo_url, seen)["histories"] == run(sqlite_url, seen)["histories"]
    assert run(mongo_url, audit.verify) == []

    manifest = backup(mongo_url, tmp_path / "from-mongo.backup")
    assert (manifest.source, manifest.consistency) == ("mongodb", "snapshot-session")
    back = f"sqlite:///{tmp_path}/back.db"
    restore(tmp_path / "from-mongo.backup", back)
    assert raw(back, dump) == millis(original)
    there, here = run(back, seen), run(sqlite_url, seen)
    assert there["problems"] == []
    assert there["audit"] == here["audit"]
    assert (there["histories"], there["bodies"]) == (here["histories"], here["bodies"])


def test_restore_refuses_a_store_that_is_not_empty_and_changes_nothing(
    store_url: str, sqlite_url: str, tmp_path: Path
) -> None:
    if store_url == sqlite_url:
        sqlite_url = f"sqlite:///{tmp_path}/source.db"
    run(sqlite_url, populate)
    backup(sqlite_url, tmp_path / "b.backup")
    run(store_url, lambda s: s.append("x:y", UserMessage(content="mine", seq=0, turn_id="t")))
    before = raw(store_url, dump)
    with pytest.raises(StoreNotEmpty) as refused:
        restore(tmp_path / "b.backup", store_url)
    # opened with a key, a store records its check value: a setting
    assert "1 setting record(s), 1 message record(s)" in str(refused.value)
    assert "'overstory.data_keys'" in str(refused.value)
    assert raw(store_url, dump) == before


def _rewrite(src: Path, dest: Path, edit: Callable[[list[bytes]], list[bytes]]) -> Path:
    lines = gzip.decompress(src.read_bytes()).splitlines(keepends=True)
    dest.write_bytes(gzip.compress(b"".join(edit(lines))))
    return dest


def _end(lines: list[bytes], change: Callable[[dict[str, Any]], None]) -> list[bytes]:
    end = json.loads(lines[-1])
    change(end["end"])
    return [*lines[:-1], (json.dumps(end) + "\n").encode()]


_BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _body(
    lines: list[bytes], change: Callable[[str], str | None], *, extra: bool = False
) -> list[bytes]:
    """``lines`` with the first message body (``{"bytes": ...}``) that ``change`` takes
    (``None``: it does not) changed, and with ``extra``, a field besides ``bytes``."""
    out = list(lines)
    for n, line in enumerate(lines):
        record = json.loads(line)
        if "message" not in record:
            continue
        changed = change(record["message"]["body"]["bytes"])
        if changed is None:
            continue
        record["message"]["body"] = {"bytes": changed, **({"text": "x"} if extra else {})}
        out[n] = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        return out
    raise AssertionError("no message body to change")


def _padding_bit(text: str) -> str | None:
    """Base64 ending in ``=`` with the last data character's lowest bit (a padding bit,
    zero in canonical base64) set; ``None`` when there is no padding."""
    if not text.endswith("="):
        return None
    last = len(text.rstrip("=")) - 1
    return text[:last] + _BASE64[_BASE64.index(text[last]) | 1] + text[last + 1 :]


def _touch(line: bytes) -> bytes:
    return line.replace(b'"turn_id":"t0"', b'"turn_id":"t9"', 1)


def test_damaged_backups_are_refused_by_name_before_anything_is_written(
    sqlite_url: str, tmp_path: Path
) -> None:
    run(sqlite_url, populate)
    good = tmp_path / "good.backup"
    backup(sqlite_url, good)
    data = good.read_bytes()
    damaged: dict[str, Path] = {}

    def case(name: str, content: bytes) -> None:
        damaged[name] = tmp_path / f"{name}.backup"
        damaged[name].write_bytes(content)

    case("cut", data[: len(data) // 2])
    case("not-gzip", b'{"format": "overstory-backup"}\n')
    case("flipped", data[:-6] + bytes([data[-6] ^ 0x40]) + data[-5:])
    case("empty", gzip.compress(b""))
    cases = {
        "cut": "is truncated: its compressed stream ends early",
        "not-gzip": "corrupted or not a backup",
        "flipped": "corrupted or not a backup",
        "empty": "is empty",
        "no-end": "is truncated: no end record after line",
        "half-line": "is truncated: line",
        "altered": "was altered: its records' sha256",
        "not-json": "line 3: not JSON",
        "version": "is format version 3; this overstory reads versions 1, 2",
        "v1-bytes": "line 16: message field 'body' has a bad value {'bytes'",
        "not-base64": "line 16: message body is not base64",
        "not-canonical": "message body is not canonical base64",
        "bytes-shape": "line 16: message field 'body' has a bad value {'bytes'",
        "counts": "holds",
        "reordered": "record out of order or repeated",
        "unknown-key": "is not declared by this overstory",
        "bad-field": "message field 'seq' has a bad value -1",
        "after-end": "data after the end record",
    }
    edits: dict[str, Callable[[list[bytes]], list[bytes]]] = {
        "no-end": lambda ls: ls[:-1],
        "half-line": lambda ls: [*ls[:-1], ls[-1][:-5]],
        "altered": lambda ls: [_touch(ln) for ln in ls],
        "not-json": lambda ls: [*ls[:2], b"{not json\n", *ls[3:]],
        "version": lambda ls: [ls[0].replace(b'"version":2', b'"version":3'), *ls[1:]],
        # a version-1 file had text bodies only
        "v1-bytes": lambda ls: [ls[0].replace(b'"version":2', b'"version":1'), *ls[1:]],
        "not-base64": lambda ls: _body(ls, lambda b: "*" + b[1:]),
        # a padding bit set: it decodes, but is not the text it was written as
        "not-canonical": lambda ls: _body(ls, _padding_bit),
        "bytes-shape": lambda ls: _body(ls, lambda b: b, extra=True),
        "counts": lambda ls: _end(ls, lambda e: e["counts"].update(message=11)),
        "reordered": lambda ls: [ls[0], ls[2], ls[1], *ls[3:]],
        "unknown-key": lambda ls: [
            ls[0],
            b'{"setting":{"key":"overstory.zzz:1","value":"x"}}\n',
            *ls[1:],
        ],
        "bad-field": lambda ls: [ln.replace(b'"seq":0', b'"seq":-1') for ln in ls],
        "after-end": lambda ls: [*ls, ls[1]],
    }
    for name, edit in edits.items():
        damaged[name] = _rewrite(good, tmp_path / f"{name}.backup", edit)
    assert set(damaged) == set(cases)
    target = f"sqlite:///{tmp_path}/target.db"
    for name, problem in cases.items():
        with pytest.raises(BackupInvalid, match="backup '.*" + name) as refused:
            restore(damaged[name], target)
        assert problem in str(refused.value), (name, str(refused.value))
        assert set(raw(target, lambda s: s.census()).values()) == {0}, name
    with pytest.raises(BackupInvalid, match="does not exist"):
        read_manifest(tmp_path / "missing.backup")
    assert read_manifest(good).counts["message"] == 12  # the good one still reads


def test_a_wrong_data_key_is_refused_and_a_missing_one_reported(
    sqlite_url: str, tmp_path: Path
) -> None:
    run(sqlite_url, populate)
    backup(sqlite_url, tmp_path / "b.backup")
    other = DataKeys.parse(f"k1:{base64.b64encode(os.urandom(32)).decode()}")
    target = f"sqlite:///{tmp_path}/t.db"
    with pytest.raises(DataKeyError, match=r"data key\(s\) 'k1' .* are different"):
        restore(tmp_path / "b.backup", target, keys=other)
    assert set(raw(target, lambda s: s.census()).values()) == {0}
    assert restore(tmp_path / "b.backup", target, keys=None).keys == {"k1": "missing"}
    assert run(target, audit.verify) == []  # the right key opens the restored store


def test_a_backup_never_replaces_a_file_unless_told(sqlite_url: str, tmp_path: Path) -> None:
    run(sqlite_url, populate)
    dest = tmp_path / "b.backup"
    dest.write_text("precious")
    with pytest.raises(UsageError, match="exists already"):
        backup(sqlite_url, dest)
    assert dest.read_text() == "precious"
    assert raw(sqlite_url, lambda s: write_backup(s, dest, overwrite=True)).counts["message"] == 12
    assert read_manifest(dest).counts["message"] == 12
    assert sorted(p.name for p in tmp_path.iterdir() if "partial" in p.name) == []
    with pytest.raises(UsageError, match="does not exist"):
        backup(sqlite_url, tmp_path / "nowhere" / "b.backup")


def test_a_backup_while_a_writer_appends_is_a_consistent_snapshot(
    store_url: str, tmp_path: Path
) -> None:
    """A writer (a thread with its own connection, as another process would be) appends
    messages round-robin to three conversations and after each one moves a counter (a
    setting) to how many it has written, while a backup runs. Every conversation in the
    backup is a gap-free prefix of what was written. SQLite's (one read transaction) is
    the store at one instant: the first K writes exactly, the counter K or (between the
    two writes) K - 1. Without a snapshot, settings are read first: the counter is at
    most K."""
    counter = LEDGER.key("ns", "writer")
    order: list[tuple[str, int]] = []
    ready, stop = threading.Event(), threading.Event()
    # enough that the backup reads several pages
    enough = 1200 if store_url.startswith("sqlite") else 300

    async def write(store: HistoryStore) -> None:
        n = 0
        while not stop.is_set():
            cid, seq = CONVERSATIONS[n % 3], n // 3
            await store.append(cid, UserMessage(content=f"m{n}", seq=seq, turn_id=f"t{seq}"))
            order.append((cid, seq))
            n += 1
            await store.put_setting(counter, str(n), expected=None if n == 1 else str(n - 1))
            if n == enough:
                ready.set()

    writer = threading.Thread(target=run, args=(store_url, write))
    writer.start()
    try:
        assert ready.wait(timeout=120), "the writer did not get going"
        started = len(order)
        manifest = backup(store_url, tmp_path / "live.backup")
        finished = len(order)
    finally:
        stop.set()
        writer.join()
    assert finished > started, "the writer was not writing during the backup"

    records = list(_records(tmp_path / "live.backup", []))
    messages = [(r["conversation_id"], r["seq"]) for kind, r in records if kind == "message"]
    value = next(
        int(r["value"]) for kind, r in records if kind == "setting" and r["key"] == counter
    )
    for cid in CONVERSATIONS:
        seqs = [seq for c, seq in messages if c == cid]
        assert seqs == list(range(len(seqs))), f"{cid}: not a gap-free prefix"
    assert started <= len(messages) < len(order)
    if manifest.consistency == "transaction":
        assert sorted(messages) == sorted(order[: len(messages)])  # the first K writes
        assert value in (len(messages) - 1, len(messages))  # ... and the counter then
    else:
        assert value <= len(messages)


def test_the_backup_and_restore_commands_end_to_end(
    sqlite_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from overstory.cli.main import main

    run(sqlite_url, populate)
    monkeypatch.delenv("OVERSTORY_DATA_KEY_FILE", raising=False)
    monkeypatch.delenv("OVERSTORY_DATA_KEYS", raising=False)  # a backup needs no key
    dest = tmp_path / "cli.backup"
    assert main(["backup", str(dest), "--store", sqlite_url, "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["counts"] == {"setting": 14, "message": 12, "vault": 3, "conversation": 3}
    assert (made["consistency"], made["data_keys"]) == ("transaction", ["k1"])
    assert main(["backup", str(dest), "--store", sqlite_url]) == 2
    assert "exists already" in capsys.readouterr().err
    assert main(["backup", str(dest), "--store", sqlite_url, "--force"]) == 0
    assert "12 messages, 3 vault documents" in capsys.readouterr().out

    assert main(["restore", str(dest), "--check"]) == 0
    assert "is intact" in capsys.readouterr().out
    target = f"sqlite:///{tmp_path}/cli-restored.db"
    assert main(["restore", str(dest)]) == 2
    assert "--store URL" in capsys.readouterr().err
    monkeypatch.setenv("OVERSTORY_DATA_KEYS", f"k1:{K1}")
    assert main(["restore", str(dest), "--store", target, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["restored"] == made["counts"]
    assert report["data_keys"] == {"k1": "verified"}
    assert report["audit"] == {"records": 6, "intact": True, "problems": []}
    assert main(["restore", str(dest), "--store", target]) == 2
    assert "is not empty" in capsys.readouterr().err
    monkeypatch.delenv("OVERSTORY_DATA_KEYS")
    other = f"sqlite:///{tmp_path}/cli-other.db"
    assert main(["restore", str(dest), "--store", other]) == 0
    out = capsys.readouterr().out
    assert "data key 'k1': NOT configured here" in out
    assert "the audit chain of 6 record(s) is intact" in out
    assert raw(other, dump) == raw(sqlite_url, dump)

    # the installed entry point, in a process of its own
    proc = subprocess.run(
        [sys.executable, "-m", "overstory.cli", "restore", str(dest), "--check", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert proc.returncode == 0, proc.stderr
    checked = json.loads(proc.stdout)
    assert (checked["intact"], checked["counts"]) == (True, made["counts"])


#: tests/data/backup-v1.jsonl: a backup made by overstory before message bodies were
#: sealed as bytes (format version 1, ef35a84), ungzipped so it reads in review: a body
#: stored in the clear, three sealed as enc1 text, an enc1 vault document. Made with
#: this (test-only) key.
OLD_BACKUP = Path(__file__).resolve().parent / "data" / "backup-v1.jsonl"
OLD_KEYS = DataKeys.parse("k1:+5b3w8K3TUdwW09sIXGa3KteFgz0ZRmL4lo4ZjyKXZ8=")
OLD_HISTORIES = {
    "a:alice": [
        UserMessage(content="before encryption", seq=0, turn_id="t0", created_at=1.5),
        AssistantMessage(
            content="sealed as enc1 text",
            usage=Usage(3, 4),
            model="m",
            seq=1,
            turn_id="t0",
            created_at=2.25,
        ),
    ],
    "a:bob": [
        UserMessage(content="bob's question", seq=0, turn_id="t0", created_at=3.0, hidden=True),
        AssistantMessage(
            content="bob's answer",
            usage=Usage(1, 2),
            model="m",
            seq=1,
            turn_id="t0",
            created_at=3.5,
        ),
    ],
}


def test_a_version_1_backup_with_enc1_text_bodies_restores_and_round_trips(
    store_url: str, tmp_path: Path
) -> None:
    """The old file restores into either store as it is (text bodies stay text) and opens
    with its key; with a new message beside them (enc2 bytes), a version-2 backup keeps
    both forms byte for byte; ``rotate-data`` then turns the old bodies into enc2."""
    old = tmp_path / "v1.backup"
    old.write_bytes(gzip.compress(OLD_BACKUP.read_bytes()))
    manifest = read_manifest(old)
    assert (manifest.version, manifest.counts["message"]) == (1, 4)
    assert manifest.data_keys["k1"]["records"] == 4  # three bodies and the vault document
    restored = restore(old, store_url, keys=OLD_KEYS)
    assert restored.keys == {"k1": "verified"}
    stored = raw(store_url, dump)
    assert stored["message"] == [r for kind, r in _records(old, []) if kind == "message"]
    assert [type(r["body"]) for r in stored["message"]] == [str] * 4
    assert [key_id_of(r["body"]) for r in stored["message"]] == [None, "k1", "k1", "k1"]

    async def read(store: HistoryStore) -> tuple[dict[str, list[Message]], Any]:
        histories = {cid: await store.load(cid) for cid in await store.conversation_ids()}
        return histories, await DataVault(store, "a", "alice").retrieve("notes", "n1")

    assert run(store_url, read, keys=OLD_KEYS) == (OLD_HISTORIES, {"text": "a note"})

    new = UserMessage(content=f"{CANARY} new", seq=2, turn_id="t1", created_at=4.0)
    run(store_url, lambda s: s.append("a:bob", new), keys=OLD_KEYS)
    mixed = raw(store_url, dump)
    assert [type(r["body"]) for r in mixed["message"]] == [str] * 4 + [bytes]
    manifest = backup(store_url, tmp_path / "v2.backup")
    assert (manifest.version, manifest.data_keys["k1"]["records"]) == (2, 5)
    again = f"sqlite:///{tmp_path}/again.db"
    assert restore(tmp_path / "v2.backup", again, keys=OLD_KEYS).keys == {"k1": "verified"}
    assert raw(again, dump) == mixed
    histories = {**OLD_HISTORIES, "a:bob": [*OLD_HISTORIES["a:bob"], new]}
    assert run(again, read, keys=OLD_KEYS) == (histories, {"text": "a note"})

    counts = run(again, reseal, keys=OLD_KEYS)
    assert counts["skipped"] == 0
    bodies = [r["body"] for r in raw(again, dump)["message"]]
    assert all(isinstance(b, bytes) and b.startswith(b"enc2:k1:") for b in bodies)
    assert bodies[4] == mixed["message"][4]["body"]  # enc2 under the first key already
    assert run(again, read, keys=OLD_KEYS) == (histories, {"text": "a note"})
