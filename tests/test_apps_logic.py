"""Apps and rollouts as plain logic, without Ray: loading ``module:attr``, the split's
transitions, the version choice, the store records, and a host (in-process, over a real
SQLite store) serving two agents and following a rollout, a promote and a rollback."""

from __future__ import annotations

import asyncio
import pickle
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from overstory import Agent, ConfigError, UnknownAgent, UsageError
from overstory.actors.host import HostActor
from overstory.app import App, AppLoadError, as_app, conversation_id, load_app
from overstory.config import Config
from overstory.messages import TurnRequest
from overstory.rollout import (
    Pin,
    Split,
    bucket,
    choose_version,
    promote,
    read_deployment,
    read_split,
    reset_for,
    rollback,
    rollout,
    update_split,
    write_deployment,
)
from overstory.sharding import ShardTable
from overstory.store import open_store
from overstory.wire import reply_of_wire, request_wire

V = ["1", "2", "3"]


def _agent(name: str, version: str = "1", **kw: Any) -> Agent:
    return Agent(name, version=version, model="offline:echo", **kw)


# --- App and load_app -----------------------------------------------------------------


@pytest.fixture
def app_dir(tmp_path: Path) -> Iterator[Path]:
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m.startswith("myapp_")]:
            del sys.modules[name]


def _module(where: Path, name: str, body: str) -> None:
    (where / f"{name}.py").write_text(textwrap.dedent(body))


def test_load_app_imports_the_module_and_takes_an_agent_a_list_or_an_app(app_dir: Path) -> None:
    _module(
        app_dir,
        "myapp_ok",
        """
        import overstory
        def shout(text: str) -> str:
            return text.upper()
        support = overstory.Agent("support", model="offline:echo", tools=[shout])
        sales = overstory.Agent("sales", model="offline:echo")
        both = [support, sales]
        app = overstory.App([support, sales])
        class Holder:
            inner = support
        """,
    )
    assert load_app("myapp_ok:support").names == ["support"]
    assert load_app("myapp_ok:both").names == ["support", "sales"]
    app = load_app("myapp_ok:app")
    assert app.default == "support"
    assert app.source == "myapp_ok:app"
    assert load_app("myapp_ok:Holder.inner").names == ["support"]
    # A deployed app travels as its path: unpickling imports the module again.
    again = pickle.loads(pickle.dumps(app))
    assert again.source == "myapp_ok:app"
    assert again.names == ["support", "sales"]


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("no_colon", "must look like 'package.module:attribute'"),
        ("myapp_missing:app", "does not import (ModuleNotFoundError"),
        ("myapp_bad:app", "does not import (ZeroDivisionError: division by zero)"),
        ("myapp_plain:nothing", "has no attribute 'nothing'"),
        ("myapp_plain:number", "expected an overstory.App, an overstory.Agent or a list"),
        ("myapp_plain:empty", "an app needs at least one agent"),
        ("myapp_plain:mixed", "holds overstory.Agent values"),
    ],
)
def test_a_bad_app_path_names_the_path_and_the_reason(
    app_dir: Path, path: str, reason: str
) -> None:
    _module(app_dir, "myapp_bad", "x = 1 / 0\n")
    _module(
        app_dir,
        "myapp_plain",
        """
        import overstory
        number = 3
        empty: list[object] = []
        mixed = [overstory.Agent("a"), "not an agent"]
        """,
    )
    with pytest.raises(AppLoadError) as info:
        load_app(path)
    assert repr(path) in str(info.value) or path == "no_colon"
    assert reason in str(info.value)


def test_an_import_error_keeps_its_cause_and_carries_its_traceback_across_ray(
    app_dir: Path,
) -> None:
    _module(app_dir, "myapp_broken", "import json\n\ndef helper():\n    return 1 / 0\n\nhelper()\n")
    with pytest.raises(AppLoadError) as info:
        load_app("myapp_broken:app")
    cause = info.value.__cause__
    assert isinstance(cause, ZeroDivisionError)  # chained: the user's own error
    # Ray sends an exception by pickling it, which drops __cause__: the message then
    # carries the user's traceback (their file, the line, the function).
    crossed = pickle.loads(pickle.dumps(info.value))
    assert isinstance(crossed, AppLoadError)
    text = str(crossed)
    assert text.startswith(str(info.value))
    assert "myapp_broken.py" in text
    assert "in helper" in text
    assert "return 1 / 0" in text
    assert "ZeroDivisionError: division by zero" in text
    # Crossing again adds nothing (the cause is gone, its text stays once).
    assert str(pickle.loads(pickle.dumps(crossed))) == text


def test_an_app_checks_names_versions_and_placement() -> None:
    app = App([_agent("a", "1"), _agent("b"), _agent("a", "2")])
    assert app.names == ["a", "b"]
    assert app.versions("a") == ["1", "2"]
    assert app.get("a").version == "1"
    assert app.get("a", "2").version == "2"
    with pytest.raises(
        UnknownAgent, match="no agent named 'c' is served here; served agents: 'a', 'b'"
    ):
        app.check("c")
    with pytest.raises(ConfigError, match="listed twice"):
        App([_agent("a"), _agent("a")])
    with pytest.raises(ConfigError, match="same placement"):
        App([_agent("a"), _agent("b", placement="dedicated")])
    with pytest.raises(ConfigError, match="has no version '9'"):
        app.get("a", "9")
    with pytest.raises(ConfigError, match="agent name 'a:b'"):
        Agent("a:b")
    with pytest.raises(ConfigError, match="version ''"):
        Agent("a", version="")
    assert as_app(_agent("x")).names == ["x"]
    assert pickle.loads(pickle.dumps(UnknownAgent("c", ["a"]))).served == ("a",)


# --- the split ------------------------------------------------------------------------


def test_rollout_promote_and_rollback_transitions() -> None:
    s0 = Split("a", live="1")
    s1 = rollout(s0, "2", 10, V)
    assert (s1.canary, s1.percent, s1.generation) == ("2", 10.0, 1)
    assert rollout(s1, "2", 10, V) == s1  # idempotent
    s2 = rollout(s1, "2", 50, V)
    assert s2.generation == 1  # same rollout: pins hold
    assert rollout(s2, "3", 5, V).generation == 2  # another version: a new rollout
    p = promote(s2, "2", V)
    assert (p.live, p.previous, p.canary, p.generation) == ("2", "1", None, 2)
    assert promote(p, "2", V) == p  # idempotent
    r = rollback(p)
    assert (r.live, r.previous, r.rolled_back_from, r.generation) == ("1", None, "2", 3)
    assert rollback(r) == r  # idempotent
    with pytest.raises(ConfigError, match="no previously promoted version"):
        rollback(s0)
    with pytest.raises(ConfigError, match="has no version '9'"):
        rollout(s0, "9", 10, V)
    with pytest.raises(ConfigError, match="in \\[0, 100\\]"):
        rollout(s0, "2", 101, V)
    with pytest.raises(ConfigError, match="is live already"):
        rollout(s0, "1", 10, V)
    # promoting the live version ends a rollout, for everyone
    ended = promote(s1, "1", V)
    assert (ended.live, ended.canary, ended.previous, ended.generation) == ("1", None, None, 2)
    assert Split.from_json(s2.to_json()) == s2


def test_choose_version_is_sticky_and_splits_new_conversations_by_percent() -> None:
    split = rollout(Split("a", live="1"), "2", 30, V)
    new = [choose_version(split, None, f"a:user-{i}", False, V) for i in range(1000)]
    on_canary = sum(1 for version, _ in new if version == "2")
    assert 250 <= on_canary <= 350  # 30 % of 1000, give or take a stable hash's spread
    assert all((pin is not None) == (version == "2") for version, pin in new)
    # an existing conversation without a pin started on live: it stays there
    assert choose_version(split, None, "a:old", True, V) == ("1", None)
    # a pin of this generation holds whatever the percentage is now
    pin = Pin("2", split.generation)
    assert choose_version(rollout(split, "2", 0, V), pin, "a:x", True, V) == ("2", None)
    # after a promote (or rollback) every pin is void: live for everyone
    promoted = promote(split, "2", V)
    assert choose_version(promoted, pin, "a:x", True, V) == ("2", None)
    assert choose_version(rollback(promoted), pin, "a:x", True, V) == ("1", None)
    # no canary: nothing to read or write
    assert choose_version(Split("a", live="1"), None, "a:x", False, V) == ("1", None)
    # a version the served app no longer lists falls back
    assert choose_version(split, Pin("2", split.generation), "a:x", True, ["1"]) == ("1", None)
    assert choose_version(Split("a", live="9"), None, "a:x", False, ["3"]) == ("3", None)
    assert 0 <= bucket("a:x", split) < 100


def test_a_requested_version_serves_that_turn_only_and_must_be_served() -> None:
    split = rollout(Split("a", live="1"), "2", 100, V)
    # asked for: that version, whatever the split or a pin says, and nothing is pinned
    assert choose_version(split, None, "a:new", False, V, requested="1") == ("1", None)
    assert choose_version(split, Pin("2", split.generation), "a:x", True, V, "1") == ("1", None)
    assert choose_version(Split("a", live="1"), None, "a:x", True, V, "2") == ("2", None)
    # the next turn without one is the rollout's again
    assert choose_version(split, None, "a:new", False, V) == ("2", Pin("2", split.generation))
    with pytest.raises(UnknownAgent, match=r"'a/9'.*'a/1', 'a/2'"):
        choose_version(split, None, "a:x", False, V, requested="9")


def test_a_deployment_resets_only_splits_it_no_longer_fits() -> None:
    split = rollout(Split("a", live="1"), "2", 30, V)
    assert reset_for(split, "a", ["1", "2"]) is None
    fresh = reset_for(split, "a", ["2", "3"])
    assert fresh is not None
    assert (fresh.live, fresh.canary, fresh.generation) == ("2", None, 2)
    assert reset_for(None, "a", ["7"]) == Split("a", live="7")


def test_splits_and_deployments_are_stored_by_compare_and_set(sqlite_url: str) -> None:
    app = App([_agent("a", "1"), _agent("a", "2")], source="pkg.mod:app")

    async def go() -> tuple[Any, ...]:
        store = open_store(sqlite_url)
        await store.open()
        try:
            first = await write_deployment(store, "ns", "pkg.mod:app", app, None)
            initial = await read_split(store, "ns", "a", ["1", "2"])
            changed = await update_split(
                store, "ns", "a", ["1", "2"], lambda s: rollout(s, "2", 40, ["1", "2"])
            )
            again = await write_deployment(store, "ns", "pkg.mod:app", app, "gcs://x.zip")
            kept = await read_split(store, "ns", "a", ["1", "2"])
            record = await read_deployment(store, "ns")
            return first, initial, changed, again, kept, record
        finally:
            await store.close()

    first, initial, changed, again, kept, record = asyncio.run(go())
    assert first.generation == 1
    assert again.generation == 2
    assert initial == Split("a", live="1")
    assert changed.canary == "2"
    assert kept == changed
    assert record.working_dir == "gcs://x.zip"
    assert record.app["agents"] == {"a": ["1", "2"]}


# --- a host serving an app (in-process, real SQLite) -----------------------------------


def _host(sqlite_url: str, app: App) -> HostActor:
    table = ShardTable.build(1, shards=16)
    config = Config.from_mapping({"store": sqlite_url})
    return HostActor("ns", table.hosts[0], table, app, config)


def test_a_host_serves_two_agents_as_separate_histories_and_refuses_an_unknown_one(
    sqlite_url: str,
) -> None:
    app = App([_agent("support"), _agent("sales")])
    host = _host(sqlite_url, app)

    async def go() -> tuple[Any, ...]:
        v = host.table.version
        try:
            a = reply_of_wire(
                await host.send(
                    v,
                    conversation_id("support", "u"),
                    request_wire(TurnRequest("t1", "hi support")),
                )
            )
            b = reply_of_wire(
                await host.send(
                    v, conversation_id("sales", "u"), request_wire(TurnRequest("t1", "hi sales"))
                )
            )
            with pytest.raises(UnknownAgent, match="served agents: 'support', 'sales'"):
                await host.send(
                    v, conversation_id("billing", "u"), request_wire(TurnRequest("t1", "hi"))
                )
            count = await host.services.store.count(conversation_id("billing", "u"))
            histories = [
                await host.services.store.load(conversation_id(n, "u"))
                for n in ("support", "sales")
            ]
            return a, b, count, histories
        finally:
            await host.services.store.close()

    a, b, count, (support, sales) = asyncio.run(go())
    assert (a.agent, a.agent_version, b.agent) == ("support", "1", "sales")
    assert count == 0  # an unknown agent stores nothing
    assert [m.content for m in support if m.kind == "user"] == ["hi support"]
    assert [m.content for m in sales if m.kind == "user"] == ["hi sales"]


def test_a_host_follows_rollout_stickiness_promote_and_rollback(sqlite_url: str) -> None:
    app = App([_agent("a", "1"), _agent("a", "2")])
    host = _host(sqlite_url, app)
    versions = ["1", "2"]

    async def change(fn: Any) -> None:
        await update_split(host.services.store, "ns", "a", versions, fn)
        host.forget_splits()

    async def turn(user: str, n: int) -> str:
        reply = reply_of_wire(
            await host.send(
                host.table.version,
                conversation_id("a", user),
                request_wire(TurnRequest(f"t{n}", "hi")),
            )
        )
        return reply.agent_version

    async def go() -> dict[str, Any]:
        try:
            old = await turn("old", 0)  # before the rollout
            await change(lambda s: rollout(s, "2", 50, versions))
            users = [f"u{i}" for i in range(60)]
            first = {u: await turn(u, 1) for u in users}
            # passivate everything: the pins come back from the store
            for cid in host.live():
                await host.passivate(host.table.version, cid)
            await change(lambda s: rollout(s, "2", 0, versions))  # no new ones; pins hold
            second = {u: await turn(u, 2) for u in users}
            old_again = await turn("old", 3)
            await change(lambda s: promote(s, "2", versions))
            promoted = {u: await turn(u, 4) for u in [*users, "old"]}
            await change(rollback)
            rolled = {u: await turn(u, 5) for u in [*users, "old"]}
            return {
                "old": (old, old_again),
                "first": first,
                "second": second,
                "promoted": promoted,
                "rolled": rolled,
            }
        finally:
            await host.services.store.close()

    got = asyncio.run(go())
    assert got["old"] == ("1", "1")  # an existing conversation stays on live
    canary = sum(1 for v in got["first"].values() if v == "2")
    assert 15 <= canary <= 45
    assert got["second"] == got["first"]  # sticky across passivation and a percent change
    assert set(got["promoted"].values()) == {"2"}
    assert set(got["rolled"].values()) == {"1"}


# --- histories from before apps -------------------------------------------------------


def test_unprefixed_ids_are_copied_and_agent_looking_ones_only_reported() -> None:
    from overstory.cli.deploy import unprefixed

    to_copy, ambiguous = unprefixed(["alice", "bob@example.com", ":x", "a b:c", "support:bob"])
    assert to_copy == ["alice", "bob@example.com", ":x", "a b:c"]
    assert ambiguous == ["support:bob"]


def test_histories_from_before_apps_are_copied_once_and_a_cut_run_is_completed(
    sqlite_url: str,
) -> None:
    from overstory.cli.deploy import adopt_histories
    from overstory.messages import UserMessage

    async def go() -> tuple[Any, ...]:
        store = open_store(sqlite_url)
        await store.open()
        try:
            for user, n in (("alice", 3), ("bob", 2), ("carl", 1)):
                for i in range(n):
                    message = UserMessage(content=f"{user} {i}", seq=i, turn_id=f"t{i}")
                    await store.append(user, message)
            # a run cut short after bob's first message; carl already talks to the agent
            await store.append("support:bob", (await store.load("bob"))[0])
            await store.append("support:carl", UserMessage(content="new", seq=0, turn_id="n0"))
            dry = await adopt_histories(store, "support", dry_run=True)
            assert await store.count("support:alice") == 0  # a dry run copies nothing
            first = await adopt_histories(store, "support")
            second = await adopt_histories(store, "support")
            loaded = {u: await store.load(f"support:{u}") for u in ("alice", "bob", "carl")}
            old = {u: await store.load(u) for u in ("alice", "bob")}
            return dry, first, second, loaded, old
        finally:
            await store.close()

    dry, first, second, loaded, old = asyncio.run(go())
    assert dry["copied"] == first["copied"] == ["alice", "bob"]
    assert first["messages"] == 3 + 1  # bob's first message was there already
    assert first["already_there_or_in_use"] == ["carl"]
    assert second["copied"] == []  # idempotent
    assert loaded["alice"] == old["alice"]  # the same records, seq and turn ids
    assert loaded["bob"] == old["bob"]
    assert [m.content for m in loaded["carl"]] == ["new"]  # left alone
    assert len(old["alice"]) == 3  # the old records stay
    with pytest.raises(UsageError, match="is not an agent name"):
        asyncio.run(adopt_histories(open_store(sqlite_url), "bad name"))
