"""Hosted placement on the session's Ray: conversations as entities inside host actors.

A test that crashes, kills, quarantines, fences or counts gets a tree of its own (one
host: ``hosted.hosts_per_node=1``), so what it does never reaches another; the others share one
module tree (``shared``), each with conversations of its own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import ray
from conftest import kill_namespace
from ray._common.test_utils import wait_for_condition

import overstory
from overstory import Agent, ConversationQuarantined, Runtime, TurnFailed, UserMessage
from overstory.cli.demo import DEMO_RULES, add, word_count
from overstory.config import merge_settings
from overstory.providers import OfflineModel
from overstory.sharding import HOST_PREFIX
from overstory.store import open_store
from overstory.testing.tools import block

pytestmark = pytest.mark.ray


def hosted_agent() -> Agent:
    model = OfflineModel("offline:hosted", rules=DEMO_RULES)
    return Agent("hosted-test", model=model, tools=[add, word_count, block])


def _connect(namespace: str, store: str, **settings: Any) -> Runtime:
    settings = merge_settings(
        {
            "hosted": {"hosts_per_node": 1},
            "conversations": {"turn_timeout_s": 3.0, "max_restarts": 2, "restart_period_s": 60.0},
        },
        settings,
    )
    return overstory.connect(hosted_agent(), store=store, namespace=namespace, **settings)


@pytest.fixture
def rt(ray_cluster: str, namespace: str, sqlite_url: str) -> Iterator[Runtime]:
    runtime = _connect(namespace, sqlite_url)
    yield runtime
    kill_namespace(namespace)


@pytest.fixture(scope="module")
def shared(ray_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    """One tree for the tests that neither crash, kill, fence nor count anything: each
    talks to conversations of its own, so they share its boot (seconds each)."""
    namespace = f"t-hosted-{uuid.uuid4().hex[:8]}"
    runtime = _connect(namespace, f"sqlite:///{tmp_path_factory.mktemp('hosted')}/history.db")
    yield runtime
    kill_namespace(namespace)


def _named(namespace: str) -> list[str]:
    return [
        e["name"]
        for e in ray.util.list_named_actors(all_namespaces=True)
        if e["namespace"] == namespace
    ]


def test_hosted_is_the_default_and_no_process_is_started_per_conversation(rt: Runtime) -> None:
    assert hosted_agent().placement == "hosted"
    convs = [rt.conversation(f"user-{i}") for i in range(20)]
    for conv in convs:
        assert conv.send("what is 2 + 3?").text == "add returned 5"
    info = convs[0].info()
    assert info["placement"] == "hosted"
    assert info["host"].startswith(HOST_PREFIX)
    assert info["messages"] == 4
    assert convs[0].actor_name == info["host"]  # readable on the Ray dashboard
    names = _named(rt.config.namespace)
    assert not [n for n in names if n.startswith("conversation:")]
    assert [n for n in names if n.startswith(HOST_PREFIX)] == [info["host"]]
    status = rt.status()
    assert status["placement"] == "hosted"
    assert status["live_conversations"] == 20
    (host,) = status["hosts"]
    assert (host["live"], host["pid"]) == (20, info["pid"])
    assert host["node_id"] == info["node_id"]
    assert host["memory"]["rss"] > 0
    assert len({c.info()["pid"] for c in convs}) == 1  # one process serves them all


def test_each_callers_turns_run_in_order(shared: Runtime) -> None:
    conv = shared.conversation("ordered")

    async def burst() -> None:
        await asyncio.gather(*(conv.send_async(f"!sleep 0.0{i % 3} msg {i}") for i in range(12)))

    asyncio.run(burst())
    sent = [m.content for m in conv.history() if isinstance(m, UserMessage)]
    assert sent == [f"!sleep 0.0{i % 3} msg {i}" for i in range(12)]


def test_two_drivers_reach_one_entity(shared: Runtime, driver_env: dict[str, str]) -> None:
    import json
    import subprocess
    import sys

    conv = shared.conversation("shared")
    conv.send("hello from the test")
    code = (
        "import json, sys, overstory\n"
        "from test_hosted import hosted_agent\n"
        "shared = overstory.connect(hosted_agent(), store=sys.argv[1], namespace=sys.argv[2],"
        " hosted={'hosts_per_node': 1})\n"
        "c = shared.conversation('shared')\n"
        "c.send('hello from another driver')\n"
        "print(json.dumps(c.info()))\n"
    )
    env = {**driver_env, "PYTHONPATH": os.path.dirname(__file__)}
    proc = subprocess.run(
        [sys.executable, "-c", code, shared.config.store, shared.config.namespace],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    other = json.loads(proc.stdout.strip().splitlines()[-1])
    mine = conv.info()
    assert (other["pid"], other["epoch"]) == (mine["pid"], mine["epoch"])
    assert [m.content for m in conv.history() if isinstance(m, UserMessage)] == [
        "hello from the test",
        "hello from another driver",
    ]


def test_host_killed_mid_turn_the_send_is_resent_and_stored_once(rt: Runtime) -> None:
    conv = rt.conversation("crashy")
    conv.send("warm up")
    pid = conv.info()["pid"]
    result: dict[str, Any] = {}

    def talk() -> None:
        try:
            result["reply"] = conv.send("!sleep 1.5 survive this", turn_id="t-kill")
        except Exception as exc:  # reported below
            result["error"] = exc

    talker = threading.Thread(target=talk)
    talker.start()
    wait_for_condition(lambda: rt.count_stored("crashy") == 3, timeout=10)  # mid-turn
    os.kill(pid, signal.SIGKILL)
    talker.join(timeout=60)
    assert "error" not in result, result.get("error")
    assert result["reply"].text.endswith("survive this")
    stored = rt.stored_history("crashy")
    assert [m.turn_id for m in stored if isinstance(m, UserMessage)].count("t-kill") == 1
    assert conv.info()["pid"] != pid
    assert rt.status()["host_restarts"] >= 1


def test_a_crashing_conversation_is_restarted_then_quarantined_alone(rt: Runtime) -> None:
    bad, good = rt.conversation("bad"), rt.conversation("good")
    good.send("hello")
    pid = good.info()["pid"]
    for i in range(3):  # conversations.max_restarts=2: the third crash in the period is too many
        with pytest.raises(TurnFailed, match=r"crashed.*scripted crash"):
            bad.send(f"!crash bug {i}")
        assert good.send(f"still fine {i}").text.startswith("echo")
    with pytest.raises(ConversationQuarantined, match="'hosted-test:bad' is quarantined") as caught:
        bad.send("hello?")
    assert caught.value.crashes == 3
    assert good.send("and after").text.startswith("echo")
    assert good.info()["pid"] == pid  # the host never went down
    status = rt.status()
    assert (status["entity_restarts"], status["quarantined"]) == (2, 1)
    stored = [m.content for m in rt.stored_history("bad") if isinstance(m, UserMessage)]
    assert stored == ["!crash bug 0", "!crash bug 1", "!crash bug 2"]  # nothing lost


def test_a_hanging_or_blocking_turn_delays_only_its_own_conversation(shared: Runtime) -> None:
    slow, quick = shared.conversation("slow"), shared.conversation("quick")
    quick.send("warm up")
    outcome: dict[str, Any] = {}

    def hang() -> None:
        try:
            slow.send('!tool block {"seconds": 6}')
        except TurnFailed as exc:
            outcome["error"] = exc

    hanger = threading.Thread(target=hang)
    hanger.start()
    wait_for_condition(lambda: shared.count_stored("slow") >= 2, timeout=10)  # the tool runs
    # The sync tool holds a thread, not the host's loop: the quick conversation's turns
    # all finish while the slow turn is still blocked (it ends at its 3 s deadline).
    for i in range(3):
        assert quick.send(f"meanwhile {i}").text.startswith("echo")
        assert hanger.is_alive(), f"the slow turn ended before quick send {i}"
    hanger.join(timeout=30)
    assert "deadline of 3 s" in str(outcome["error"])
    assert slow.send("after the deadline").text.startswith("echo")


def test_a_fenced_entity_is_dropped_and_the_turn_lands_once(rt: Runtime) -> None:
    conv = rt.conversation("fenced")
    conv.send("first")
    epoch = conv.info()["epoch"]

    async def take_over() -> None:  # another owner takes the conversation: a new epoch
        store = open_store(rt.config.store)
        await store.open()
        await store.acquire(conv.conversation_id)
        await store.close()

    asyncio.run(take_over())
    assert conv.send("second", turn_id="t-second").text.startswith("echo")
    assert conv.info()["epoch"] > epoch + 1
    assert rt.status()["fenced"] == 1
    turns = [m.turn_id for m in rt.stored_history("fenced") if isinstance(m, UserMessage)]
    assert turns.count("t-second") == 1


def test_idle_conversations_are_passivated_and_the_cap_evicts_lru(
    ray_cluster: str, namespace: str, sqlite_url: str
) -> None:
    rt = _connect(
        namespace,
        sqlite_url,
        conversations={"idle_timeout_s": 1.0},
        hosted={"max_live_per_host": 3},
    )
    try:
        for i in range(5):
            rt.conversation(f"capped-{i}").send(f"hello {i}")
        status = rt.status()
        assert (status["live"], status["evictions"]) == (3, 2)
        live = set(
            ray.get(rt.registry.hosts.route_host(rt.registry.hosts.table.hosts[0]).live.remote())
        )
        # the least recently used went
        assert live == {f"hosted-test:capped-{i}" for i in (2, 3, 4)}
        wait_for_condition(lambda: rt.status()["live"] == 0, timeout=15)
        again = rt.conversation("capped-0")
        assert again.send("back").text == "echo #2: back"  # its history came back with it
    finally:
        kill_namespace(namespace)


def test_a_client_with_a_stale_shard_table_is_rerouted(shared: Runtime) -> None:
    conv = shared.conversation("stale")
    conv.send("hello")
    router = shared.registry.hosts
    current = router.table
    router._table = type(current)(current.version - 1, current.shards, current.hosts)
    assert conv.send("again").text == "echo #2: again"
    assert router.table.version == current.version


def test_stop_conversation_and_async_api(rt: Runtime) -> None:
    async def go() -> list[str]:
        conv = await rt.conversation_async("asyncer")
        await conv.send_async("one")
        return [m.content for m in await conv.history_async()]

    assert asyncio.run(go()) == ["one", "echo #1: one"]
    assert rt.stop_conversation("asyncer") is True
    assert rt.stop_conversation("asyncer") is False  # not live any more
    assert rt.status()["passivations"] == 1
    assert rt.conversation("asyncer").send("two").text == "echo #2: two"


def test_a_tree_of_the_other_placement_is_refused_by_name(shared: Runtime) -> None:
    dedicated = Agent("other", placement="dedicated")
    with pytest.raises(overstory.ConfigError, match="serves hosted placement"):
        overstory.connect(dedicated, store=shared.config.store, namespace=shared.config.namespace)


def test_unknown_placement_is_a_config_error() -> None:
    with pytest.raises(overstory.ConfigError, match="unknown placement 'everywhere'"):
        Agent("x", placement="everywhere")  # type: ignore[arg-type]


def test_a_send_has_one_overall_deadline(shared: Runtime) -> None:
    hurried = Runtime(
        shared.config.merged({"conversations": {"send_timeout_s": 0.5}}),
        shared.app,
        started_ray=False,
    )
    with pytest.raises(overstory.ConversationUnavailable, match=r"send_timeout_s=0\.5"):
        hurried.conversation("late").send("!sleep 2 too slow", turn_id="t-late")
    # the turn went on in its host and finished; re-sending the same id returns it
    assert (
        shared.conversation("late")
        .send("!sleep 2 too slow", turn_id="t-late")
        .text.endswith("too slow")
    )
    turns = [m.turn_id for m in shared.stored_history("late") if isinstance(m, UserMessage)]
    assert turns == ["t-late"]


def test_hosts_dying_too_often_escalate_and_the_root_starts_them_again(
    ray_cluster: str, namespace: str, sqlite_url: str
) -> None:
    from overstory.supervisors.tree import HOSTS, ROOT

    rt = _connect(
        namespace, sqlite_url, supervision={"restart_intensity": 1, "restart_period_s": 60.0}
    )
    try:
        conv = rt.conversation("escalated")
        conv.send("before")
        old_supervisor = ray.get_actor(HOSTS, namespace=namespace)
        root = ray.get_actor(ROOT, namespace=namespace)
        host = conv.actor_name

        def watched() -> bool:  # the supervisor watches the process serving now
            status = ray.get(old_supervisor.status.remote())
            return bool(status["watching"].get(host) == conv.info()["incarnation"])

        for _ in range(2):  # the second restart within the period is one too many
            wait_for_condition(watched, timeout=60)
            pid = conv.info()["pid"]
            os.kill(pid, signal.SIGKILL)
            wait_for_condition(lambda pid=pid: conv.info()["pid"] != pid, timeout=60)
        wait_for_condition(lambda: ray.get(root.status.remote())["restarts"] >= 1, timeout=60)

        def replaced() -> bool:  # the root counts its restart before the new one's name
            try:
                supervisor = ray.get_actor(HOSTS, namespace=namespace)
            except ValueError:
                return False  # not registered yet
            return bool(supervisor._actor_id != old_supervisor._actor_id)

        wait_for_condition(replaced, timeout=60)  # a new host supervisor
        assert conv.send("after").text == "echo #2: after"
        assert [m.content for m in conv.history() if isinstance(m, UserMessage)] == [
            "before",
            "after",
        ]
    finally:
        kill_namespace(namespace)


def test_growing_a_running_tree_moves_shards_and_loses_nothing(
    ray_cluster: str, namespace: str, sqlite_url: str
) -> None:
    from overstory.supervisors.tree import HOSTS, ROOT

    rt = _connect(namespace, sqlite_url)  # one host
    try:
        users = [f"grow-{i}" for i in range(30)]
        for user in users:
            rt.conversation(user).send("before")
        stale = Runtime(rt.config, rt.app, started_ray=False)
        stale_conv = stale.conversation(users[0])
        assert len(stale.registry.hosts.table.hosts) == 1  # cached, and about to be old

        table = rt.rebalance(hosts=2)
        assert (table["version"], len(table["hosts"])) == (2, 2)
        assert {rt.conversation(u).actor_name for u in users} == set(table["hosts"])
        for user in users:
            assert rt.conversation(user).send("after").text == "echo #2: after"
        assert rt.status()["live_conversations"] == 30  # the old host shed what moved
        # A client that still routes by the old table is told the new one and follows.
        assert stale_conv.send("from an old client").text == "echo #3: from an old client"

        # The table is in the store: a restarted host supervisor serves both hosts again.
        root = ray.get_actor(ROOT, namespace=namespace)
        ray.kill(ray.get_actor(HOSTS, namespace=namespace), no_restart=False)
        wait_for_condition(lambda: ray.get(root.status.remote())["restarts"] >= 1, timeout=60)
        supervisor = ray.get_actor(HOSTS, namespace=namespace)
        wait_for_condition(
            lambda: len(ray.get(supervisor.status.remote())["watching"]) == 2, timeout=60
        )
        assert ray.get(supervisor.status.remote())["meta"]["shard_table"].version == 2
        for user in users[:5]:
            assert [m.content for m in rt.conversation(user).history()][::2][:2] == [
                "before",
                "after",
            ]

        # Shrinking retires the last host for good; the first takes its shards.
        small = rt.rebalance(hosts=1)
        assert (small["version"], small["hosts"]) == (3, table["hosts"][:1])
        for user in users:
            assert rt.conversation(user).send("smaller").text.endswith(": smaller")
        assert stale_conv.send("old client again").text.endswith(": old client again")
        assert ray.get(supervisor.status.remote())["children"] == small["hosts"]

        def retired_gone() -> bool:
            try:
                ray.get_actor(table["hosts"][1], namespace=namespace)
            except ValueError:
                return True
            return False

        wait_for_condition(retired_gone, timeout=30)  # stopped, not restarted
        turns = [m.turn_id for u in users for m in rt.stored_history(u) if m.kind == "user"]
        assert len(turns) == len(set(turns)) == 92  # every turn stored once
    finally:
        kill_namespace(namespace)


# --- streamed turns ---------------------------------------------------------------------------


def test_a_stream_joins_to_the_stored_reply_and_resume_replays_it_from_any_seq(
    shared: Runtime,
) -> None:
    conv = shared.conversation("streamer")
    events = list(conv.stream("what is 2 + 3? and some words after"))
    assert [e.seq for e in events] == list(range(len(events)))
    assert events[0].type == "started"
    assert [e.type for e in events[1:3]] == ["tool_call", "tool_result"]
    final = events[-1]
    assert final.type == "completed"
    assert final.reply is not None
    text = "".join(e.text for e in events if e.type == "delta")
    assert text == final.reply.text == conv.history()[-1].content == "add returned 5"
    turn_id = events[0].turn_id
    for n in range(-1, len(events)):
        assert list(conv.resume(turn_id, after=n)) == events[n + 1 :], n

    async def read_async() -> list[overstory.TurnEvent]:
        return [e async for e in conv.resume_async(turn_id, after=2)]

    assert asyncio.run(read_async()) == events[3:]
    with pytest.raises(overstory.UnknownTurn, match="has no turn 'never-sent'"):
        list(conv.resume("never-sent"))


def test_a_reader_that_goes_away_does_not_stop_the_turn(shared: Runtime) -> None:
    conv = shared.conversation("walker")
    reader = conv.stream("!sleep 0.5 said while nobody read", turn_id="t-away")
    first = next(reader)
    reader.close()  # the reader leaves after "started"
    rest = list(conv.resume("t-away", after=first.seq))
    assert rest[-1].type == "completed"
    assert "".join(e.text for e in rest if e.type == "delta") == "echo #1: said while nobody read"
    assert [m.turn_id for m in conv.history()].count("t-away") == 2  # user + reply, once


def test_a_host_killed_mid_turn_restarts_it_and_the_reader_sees_restarted_then_the_rest(
    rt: Runtime,
) -> None:
    conv = rt.conversation("crashy")
    pid = conv.info()["pid"]
    events = []
    for event in conv.stream("!sleep 1.0 the answer after a crash"):
        events.append(event)
        if event.type == "started":
            os.kill(pid, signal.SIGKILL)  # the turn is waiting on its model
    types = [e.type for e in events]
    assert types[0] == "started"
    assert types[1] == "restarted"
    assert types[-1] == "completed"
    assert [e.seq for e in events] == list(range(len(events)))
    assert (
        "".join(e.text for e in events if e.type == "delta") == "echo #1: the answer after a crash"
    )
    assert conv.info()["pid"] != pid
    stored = rt.stored_history("crashy")
    assert [m.kind for m in stored] == ["user", "assistant"]  # stored once


def test_a_reader_that_stops_at_the_last_event_does_not_hold_up_the_next_turn(
    shared: Runtime,
) -> None:
    """The turn's place in its caller's order is released when its last event arrives,
    not when the reader's iterator is closed: a reader that keeps it open must not make
    the next turn wait out the gate's gap timeout (10 s)."""
    conv = shared.conversation("stopper")
    events = conv.stream("first")  # held open after the loop
    for event in events:
        if event.terminal:
            break
    # Released at the last event: the next send goes to the gate as the lowest in flight
    # and is not queued behind the open iterator's turn.
    assert not conv._in_flight
    assert conv.send("second").text == "echo #2: second"
    events.close()


def test_cancel_ends_a_streamed_turn_incomplete_with_what_was_shown_stored(
    shared: Runtime,
) -> None:
    conv = shared.conversation("canceller")
    text = "!sleep 1.0 one two three four"
    events = conv.stream(text, turn_id="t-cancel")
    assert next(events).type == "started"
    assert conv.cancel("t-cancel")  # the model is still thinking: it stops at the first delta
    rest = list(events)
    assert rest[-1].type == "incomplete"
    assert rest[-1].text == "cancelled"
    shown = "".join(e.text for e in rest if e.type == "delta")
    assert shown == "echo "
    stored = shared.stored_history("canceller")
    assert (stored[-1].content, stored[-1].incomplete) == (shown, "cancelled")
    with pytest.raises(overstory.TurnIncomplete, match="cancelled"):
        conv.send(text, turn_id="t-cancel")  # the turn has ended: a re-send says how
    assert not conv.cancel("t-cancel")
    assert conv.send("next").text == "echo #2: next"
