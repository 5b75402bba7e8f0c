"""The audit trail (no Ray): a hash chain that reports edits, deletions and a cut end;
concurrent writers; a writer that died half-way; the command."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import on_store

from overstory.audit import AuditRecord, append, records, verify
from overstory.gateway.keys import create_key, revoke_key
from overstory.store import HistoryStore, open_store


def run(url: str, body: Any) -> Any:
    return on_store(url, body)


async def _some(store: HistoryStore, n: int, who: str = "alice") -> None:
    for i in range(n):
        await append(
            store,
            who=who,
            action="access.denied",
            target=f"conv_{i}",
            outcome="denied",
            detail={"need": "read", "status": 404},
        )


def test_an_intact_chain_then_an_edit_a_deletion_and_a_cut_end_are_reported(
    sqlite_url: str,
) -> None:
    run(sqlite_url, lambda s: _some(s, 5))
    assert run(sqlite_url, verify) == []
    chain = run(sqlite_url, records)
    assert [r.seq for r in chain] == [1, 2, 3, 4, 5]
    assert chain[0].prev == "0" * 64
    assert all(b.prev == a.hash for a, b in itertools.pairwise(chain))

    async def edit(store: HistoryStore) -> None:
        key = "overstory.audit:000000000002"
        raw = await store.get_setting(key)
        assert raw is not None
        forged = json.loads(raw)
        forged["outcome"] = "ok"  # someone makes a denial look allowed
        assert await store.put_setting(key, json.dumps(forged), expected=raw)

    run(sqlite_url, edit)
    assert run(sqlite_url, verify) == ["record 2 was edited (its hash does not match)"]

    async def delete(store: HistoryStore, seq: int) -> None:
        key = f"overstory.audit:{seq:012d}"
        raw = await store.get_setting(key)
        assert raw is not None
        assert await store.delete_setting(key, expected=raw)

    run(sqlite_url, lambda s: delete(s, 4))
    assert run(sqlite_url, verify)[1:] == ["record 4 deleted"]
    run(sqlite_url, lambda s: delete(s, 5))
    assert run(sqlite_url, verify)[-1] == "records 4 to 5 cut off the end"


def test_concurrent_writers_and_one_that_died_half_way_keep_one_chain(sqlite_url: str) -> None:
    async def body() -> list[str]:
        stores = [open_store(sqlite_url), open_store(sqlite_url)]
        for s in stores:
            await s.open()
        await asyncio.gather(*(_some(stores[i % 2], 10, who=f"w{i}") for i in range(4)))
        # A writer that stored record 41 and died before moving the head:
        head = json.loads(await stores[0].get_setting("overstory.audit.head") or "{}")
        orphan = AuditRecord(41, 1.0, "w9", "key.created", "k", "ok", "", {}, head["hash"])
        orphan = AuditRecord(**{**orphan.__dict__, "hash": orphan.content_hash()})
        await stores[0].put_setting("overstory.audit:000000000041", orphan.to_json(), expected=None)
        await _some(stores[1], 1, who="after")  # adopts 41, writes 42
        problems = await verify(stores[0])
        chain = await records(stores[0])
        for s in stores:
            await s.close()
        assert [r.seq for r in chain] == list(range(1, 43))
        assert (chain[40].who, chain[41].who) == ("w9", "after")
        return problems

    assert asyncio.run(body()) == []


def test_keys_are_audited_and_the_command_lists_filters_and_verifies(
    sqlite_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from overstory.cli.main import main

    key, record = run(sqlite_url, lambda s: create_key(s, "bob"))
    run(sqlite_url, lambda s: revoke_key(s, record.key_id))
    run(sqlite_url, lambda s: _some(s, 2))
    assert main(["audit", "--json", "--store", sqlite_url]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["action"] for r in listed] == [
        "key.created",
        "key.revoked",
        "access.denied",
        "access.denied",
    ]
    assert key.split("_")[-1] not in json.dumps(listed)  # never the secret
    assert main(["audit", "--json", "--user", "alice", "--store", sqlite_url]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    assert main(["audit", "--json", "--since", "2999-01-01", "--store", sqlite_url]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["audit", "--store", sqlite_url]) == 0
    assert "key.created" in capsys.readouterr().out
    assert main(["audit", "--verify", "--store", sqlite_url]) == 0
    assert "intact" in capsys.readouterr().out

    async def edit(store: HistoryStore) -> None:
        raw = await store.get_setting("overstory.audit:000000000001")
        assert raw is not None
        await store.put_setting(
            "overstory.audit:000000000001", raw.replace('"bob"', '"eve"'), expected=raw
        )

    run(sqlite_url, edit)
    assert main(["audit", "--verify", "--json", "--store", sqlite_url]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["problems"] == ["record 1 was edited (its hash does not match)"]
    with pytest.raises(SystemExit) as refused:
        main(["audit", "--since", "yesterday", "--store", sqlite_url])
    assert refused.value.code == 2
    assert "ISO 8601" in capsys.readouterr().err
