"""The DataVault (no Ray): isolation between agents and users, shared collections, TTL,
query filters, validation, sealing at rest — on SQLite and the MongoDB-wire server — and
tools using it through their run context."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import on_store

from overstory import Agent, OfflineModel, RunContext
from overstory.conversation.turn import run_turn
from overstory.exceptions import DataKeyError, VaultError
from overstory.messages import Message, ToolReturn
from overstory.providers.offline import Rule
from overstory.store import HistoryStore, open_store
from overstory.store.crypto import DataKeys
from overstory.vault import MAX_DOCUMENT_BYTES, DataVault

CANARY = "vault-canary-5e1f"


def run(url: str, body: Any, keys: DataKeys | None = None) -> Any:
    return on_store(url, body, keys)


def test_agents_and_users_never_see_each_others_documents(store_url: str) -> None:
    async def body(store: HistoryStore) -> None:
        a_u1 = DataVault(store, "support", "u1", shared=("faq",))
        a_u2 = DataVault(store, "support", "u2", shared=("faq",))
        b_u1 = DataVault(store, "billing", "u1", shared=("faq",))
        await a_u1.store("notes", {"text": "u1's note"}, key="n1")
        await a_u1.store("faq", {"q": "hours?", "a": "9-5"}, key="hours")
        assert await a_u1.retrieve("notes", "n1") == {"text": "u1's note"}
        assert await a_u2.retrieve("notes", "n1") is None  # another user
        assert await b_u1.retrieve("notes", "n1") is None  # another agent
        assert await a_u2.retrieve("faq", "hours") == {"q": "hours?", "a": "9-5"}  # shared
        assert await b_u1.retrieve("faq", "hours") is None  # shared within an agent only
        assert await a_u2.query("notes") == []
        assert not await a_u2.delete("notes", "n1")  # cannot delete what it cannot see
        assert await a_u1.retrieve("notes", "n1") is not None
        key = await a_u1.store("notes", {"text": "second"})
        assert len(key) == 32
        await a_u1.store("notes", {"text": "replaced"}, key="n1")
        expected = [text for _, text in sorted([("n1", "replaced"), (key, "second")])]
        assert [d["text"] for _, d in await a_u1.query("notes")] == expected  # key order
        assert await a_u1.delete("notes", "n1")

    run(store_url, body)


def test_ttl_query_filters_and_paging(store_url: str) -> None:
    async def body(store: HistoryStore) -> None:
        v = DataVault(store, "tasks", "u1")
        for i in range(230):  # more than one page of the store's scan
            await v.store("todo", {"n": i, "done": i % 3 == 0, "tag": "x"}, key=f"k{i:04d}")
        await v.store("todo", {"n": -1, "done": True}, key="gone", ttl_s=0.2)
        assert await v.retrieve("todo", "gone") is not None
        await asyncio.sleep(0.3)
        assert await v.retrieve("todo", "gone") is None
        done = await v.query("todo", {"done": True}, limit=1000)
        assert [d["n"] for _, d in done] == [i for i in range(230) if i % 3 == 0]
        assert [k for k, _ in await v.query("todo", {"tag": "x", "done": False}, limit=3)] == [
            "k0001",
            "k0002",
            "k0004",
        ]
        assert await v.query("todo", {"tag": "y"}) == []
        rows = await store.vault_collections("tasks", None)
        assert rows == [("u1", "todo", 230)]

    run(store_url, body)


def test_bad_calls_are_refused_by_name(sqlite_url: str) -> None:
    async def body(store: HistoryStore) -> None:
        v = DataVault(store, "a", "u")
        for call, problem in (
            (v.store("bad name!", {}), "collection"),
            (v.store("c", {}, key=""), "key"),
            (v.store("c", ["not", "a", "dict"]), "a JSON object"),  # type: ignore[arg-type]
            (v.store("c", {"x": float("nan")}), "must be JSON"),
            (v.store("c", {"x": "y" * MAX_DOCUMENT_BYTES}), "at most"),
            (v.store("c", {}, ttl_s=0), "ttl_s"),
            (v.query("c", limit=0), "limit"),
            (v.query("c", ["x"]), "filter"),  # type: ignore[arg-type]
        ):
            with pytest.raises(VaultError, match=problem):
                await call
        assert await store.vault_collections("a", None) == []

    run(sqlite_url, body)


def test_sealed_at_rest_and_a_moved_document_does_not_open(store_url: str) -> None:
    keys = DataKeys.parse(f"k:{base64.b64encode(os.urandom(32)).decode()}")

    async def body(store: HistoryStore) -> str:
        await DataVault(store, "a", "u1").store("secrets", {"text": CANARY}, key="s")
        raw = await store.vault_get(("a", "u1"), "secrets", "s")
        assert raw is not None
        await store.vault_put(("a", "u2"), "secrets", "s", raw, None)  # copied to u2
        with pytest.raises(DataKeyError):
            await DataVault(store, "a", "u2").retrieve("secrets", "s")
        got = await DataVault(store, "a", "u1").retrieve("secrets", "s")
        return str(got)

    assert CANARY in run(store_url, body, keys)
    if store_url.startswith("sqlite"):
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as conn:
            stored = " ".join(str(r[0]) for r in conn.execute("SELECT document FROM vault"))
    else:
        from pymongo import MongoClient

        client: MongoClient[dict[str, Any]] = MongoClient(store_url)
        stored = json.dumps(list(client.get_default_database()["vault"].find()), default=str)
        client.close()
    assert CANARY not in stored


async def remember(ctx: RunContext, text: str) -> str:
    """Remember something (an async tool)."""
    assert ctx.vault is not None
    await ctx.vault.store("notes", {"text": text, "turn": ctx.turn_id}, key="last")
    return "remembered"


def recall(ctx: RunContext) -> str:
    """Recall it (a sync tool, in a worker thread)."""
    assert ctx.vault is not None
    note = ctx.vault.sync.retrieve("notes", "last")
    return json.dumps(note)


def test_tools_use_the_vault_through_their_context(tmp_path: Path) -> None:
    rules = [Rule(r"remember (?P<text>.+)", "remember"), Rule(r"^recall", "recall")]
    agent = Agent("keeper", model=OfflineModel("k", rules=rules), tools=[remember, recall])

    async def body() -> list[str]:
        store = open_store(f"sqlite:///{tmp_path}/v.db", data_keys=None)
        await store.open()
        alice: list[Message] = []
        bob: list[Message] = []
        await run_turn(agent, store, "keeper:alice", alice, "t1", "remember the milk")
        await run_turn(agent, store, "keeper:alice", alice, "t2", "recall please")
        await run_turn(agent, store, "keeper:bob", bob, "t1", "recall please")
        await store.close()
        return [m.content for m in alice + bob if isinstance(m, ToolReturn)]

    results = asyncio.run(body())
    assert results[0] == "remembered"
    assert json.loads(results[1]) == {"text": "the milk", "turn": "t1"}
    assert json.loads(results[2]) is None  # bob's vault is his own


def test_the_vault_command_lists_gets_and_removes(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from overstory.cli.main import main

    async def body(store: HistoryStore) -> None:
        await DataVault(store, "a", "u1", shared=("faq",)).store("notes", {"t": 1}, key="n1")
        await DataVault(store, "a", "u1", shared=("faq",)).store("faq", {"q": 2}, key="f1")

    run(sqlite_url, body)
    assert main(["vault", "ls", "a", "--json", "--store", sqlite_url]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"owner": "", "collection": "faq", "documents": 1},
        {"owner": "u1", "collection": "notes", "documents": 1},
    ]
    assert main(["vault", "ls", "a", "notes", "--user", "u1", "--store", sqlite_url]) == 0
    assert capsys.readouterr().out.strip() == "n1"
    assert main(["vault", "get", "a", "faq", "f1", "--store", sqlite_url]) == 0
    assert json.loads(capsys.readouterr().out) == {"q": 2}
    assert main(["vault", "get", "a", "notes", "n1", "--store", sqlite_url]) == 1  # not shared
    capsys.readouterr()
    assert main(["vault", "rm", "a", "notes", "--user", "u1", "--json", "--store", sqlite_url]) == 0
    assert json.loads(capsys.readouterr().out) == {"deleted": 1}
    assert main(["vault", "get", "a", "x!", "k", "--store", sqlite_url]) == 2
    assert "collection" in capsys.readouterr().err


def test_rotation_reseals_vault_documents_and_keeps_their_expiry(store_url: str) -> None:
    from overstory.store.crypto import reseal

    k1 = f"k1:{base64.b64encode(os.urandom(32)).decode()}"
    k2 = f"k2:{base64.b64encode(os.urandom(32)).decode()}"

    async def write(store: HistoryStore) -> None:
        v = DataVault(store, "a", "u1")
        await v.store("notes", {"text": CANARY}, key="kept")
        await v.store("notes", {"text": "brief"}, key="brief", ttl_s=1.0)

    async def rotate(store: HistoryStore) -> dict[str, Any]:
        return await reseal(store)

    async def read(store: HistoryStore) -> list[Any]:
        v = DataVault(store, "a", "u1")
        first = [await v.retrieve("notes", "kept"), await v.retrieve("notes", "brief")]
        await asyncio.sleep(1.1)
        return [*first, await v.retrieve("notes", "brief")]

    run(store_url, write, DataKeys.parse(k1))
    counts = run(store_url, rotate, DataKeys.parse(f"{k2},{k1}"))
    assert (counts["examined"], counts["resealed"]) == (2, 2)
    kept, brief, later = run(store_url, read, DataKeys.parse(k2))  # k1 is gone now
    assert kept == {"text": CANARY}
    assert brief == {"text": "brief"}
    assert later is None  # its expiry survived the re-sealing


class _ToolWritesAfterTheRotationReads:
    """The store as the rotation sees it, but a tool's write lands right after the
    rotation has read the vault page and before it writes its re-sealed copy back: the
    interleaving where a blind write loses the tool's document."""

    def __init__(self, inner: HistoryStore, tool_write: Any) -> None:
        self._inner, self._tool_write, self.raced = inner, tool_write, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def vault_rows(
        self, after: tuple[str, str, str, str] | None = None, limit: int = 500
    ) -> list[tuple[str, str, str, str, str, float | None]]:
        rows = await self._inner.vault_rows(after, limit)
        if rows and not self.raced:
            self.raced = True
            await self._tool_write()
        return rows


@pytest.mark.parametrize("tool_keys", ["old", "new"])
def test_a_tool_write_racing_a_rotation_survives_sealed_under_the_new_key(
    store_url: str, tool_keys: str
) -> None:
    """The tool's process was started before the new key (k1 seals: its new document
    must be re-sealed again) or after (k2 seals: its document is left as written)."""
    from overstory.store.crypto import key_id_of, reseal

    k1 = f"k1:{base64.b64encode(os.urandom(32)).decode()}"
    k2 = f"k2:{base64.b64encode(os.urandom(32)).decode()}"
    old, new = DataKeys.parse(k1), DataKeys.parse(f"{k2},{k1}")

    async def scenario() -> tuple[dict[str, Any], bool]:
        tool = open_store(store_url, data_keys=old)
        await tool.open()  # before the new key reached the store
        rotating = open_store(store_url, data_keys=new)
        await rotating.open()
        await DataVault(tool, "a", "u1").store("notes", {"text": "before"}, key="n", ttl_s=60)
        if tool_keys == "new":
            await tool.close()
            tool = open_store(store_url, data_keys=new)
            await tool.open()
        try:

            async def tool_write() -> None:
                await DataVault(tool, "a", "u1").store("notes", {"text": "the tool's"}, key="n")

            racing = _ToolWritesAfterTheRotationReads(rotating, tool_write)
            counts = await reseal(racing)  # type: ignore[arg-type]
            return counts, racing.raced
        finally:
            await tool.close()
            await rotating.close()

    async def read(store: HistoryStore) -> tuple[Any, str | None]:
        raw = await store.vault_get(("a", "u1"), "notes", "n")
        document = await DataVault(store, "a", "u1").retrieve("notes", "n")
        return document, None if raw is None else key_id_of(raw)

    counts, raced = asyncio.run(scenario())
    assert raced  # the tool's write did land between the rotation's read and its write
    assert counts["skipped"] == 0
    document, key_id = run(store_url, read, DataKeys.parse(k2))  # k1 is gone now
    assert document == {"text": "the tool's"}  # not the re-sealed "before"
    assert key_id == "k2"
