"""The public API on the session's Ray, for both placements: every test runs against a
hosted tree (conversations as entities in host actors) and a dedicated one (a named,
detached actor per conversation) — the same calls, the same guarantees."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator

import pytest
import ray
from conftest import kill_namespace

import overstory
from overstory import (
    ConfigError,
    InvalidMessage,
    InvalidUserId,
    Runtime,
    StoreUnavailable,
    ToolReturn,
    TurnFailed,
    UserMessage,
)
from overstory.app import conversation_id
from overstory.cli.demo import demo_agent
from overstory.messages import TurnRequest
from overstory.registry import actor_name
from overstory.wire import request_wire

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", params=["hosted", "dedicated"])
def rt(
    ray_cluster: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Runtime]:
    """One tree and one store per placement; every test uses user ids of its own."""
    namespace = f"t-runtime-{request.param}-{uuid.uuid4().hex[:8]}"
    store = f"sqlite:///{tmp_path_factory.mktemp('runtime')}/history.db"
    runtime = overstory.connect(
        demo_agent(placement=request.param),
        store=store,
        namespace=namespace,
        hosted={"hosts_per_node": 1},
    )
    yield runtime
    kill_namespace(namespace)


def run_driver(env: dict[str, str], code: str, *args: str) -> dict[str, object]:
    """Run ``code`` in a separate Python driver; it prints one JSON line last."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_send_returns_the_reply_and_history_returns_stored_messages(rt: Runtime) -> None:
    conv = rt.conversation("alice")
    reply = conv.send("what is 40 + 2?")
    assert reply.text == "add returned 42"
    assert [c.name for c in reply.tool_calls] == ["add"]
    second = conv.send("hello there")
    assert second.text == "echo #2: hello there"
    history = conv.history()
    assert [m.kind for m in history] == [
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
        "assistant",
    ]
    assert history == rt.stored_history("alice")
    assert rt.count_stored("alice") == 6


def test_async_forms(rt: Runtime) -> None:
    async def go() -> tuple[str, int]:
        conv = await rt.conversation_async("bea")
        reply = await conv.send_async("how many words are in 'one two three'?")
        return reply.text, len(await conv.history_async())

    assert asyncio.run(go()) == ("word_count returned 3", 4)


def test_the_actor_is_named_after_the_user_in_the_app_namespace(rt: Runtime) -> None:
    conv = rt.conversation("carl")
    if conv.placement == "hosted":  # the dashboard shows the host that serves it
        host = ray.get_actor(conv.actor_name, namespace=rt.config.namespace)
        assert conv.actor_name.startswith("overstory:host:")
        assert ray.get(host.status.remote())["pid"] == conv.info()["pid"]
        return
    handle = ray.get_actor(
        actor_name(conversation_id("demo-assistant", "carl")), namespace=rt.config.namespace
    )
    assert ray.get(handle.ready.remote())["pid"] == conv.info()["pid"]
    assert conv.actor_name.startswith(
        "conversation:demo-assistant:carl:"
    )  # readable on the dashboard
    mail = rt.conversation("carl.smith@example.com")
    assert mail.actor_name.startswith(
        "conversation:demo-assistant:ca***:"
    )  # personal data is masked
    assert "example" not in mail.actor_name
    assert ray.get_actor(mail.actor_name, namespace=rt.config.namespace) is not None


def test_detached_actor_outlives_its_driver_and_a_second_driver_reaches_it(
    rt: Runtime, driver_env: dict[str, str]
) -> None:
    code = """
        import json, sys, overstory
        from overstory.cli.demo import demo_agent
        rt = overstory.connect(
            demo_agent(placement=sys.argv[3]), store=sys.argv[1], namespace=sys.argv[2],
            hosted={"hosts_per_node": 1})
        conv = rt.conversation("dora")
        reply = conv.send("first message from driver one")
        print(json.dumps({"pid": conv.info()["pid"], "reply": reply.text}))
    """
    first = run_driver(
        driver_env, code, rt.config.store, rt.config.namespace, rt.registry.placement
    )
    assert first["reply"] == "echo #1: first message from driver one"
    # driver one has exited; its actor lives on and this driver reaches the same one
    conv = rt.conversation("dora")
    assert conv.info()["pid"] == first["pid"]
    assert conv.send("second message").text == "echo #2: second message"
    assert [m.content for m in conv.history() if isinstance(m, UserMessage)] == [
        "first message from driver one",
        "second message",
    ]


def test_concurrent_get_or_start_yields_exactly_one_actor(
    rt: Runtime, driver_env: dict[str, str]
) -> None:
    code = """
        import json, sys, overstory
        from overstory.cli.demo import demo_agent
        rt = overstory.connect(
            demo_agent(placement=sys.argv[3]), store=sys.argv[1], namespace=sys.argv[2],
            hosted={"hosts_per_node": 1})
        print(json.dumps({"pid": rt.conversation("erin").info()["pid"]}))
    """
    env_args = (rt.config.store, rt.config.namespace, rt.registry.placement)
    drivers = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), *env_args],
            env=driver_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    pids: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def grab() -> None:
        # A Runtime per thread, so no handle cache is shared: each one races the GCS.
        own = Runtime(rt.config, rt.app, started_ray=False)
        barrier.wait()
        try:
            pids.append(own.conversation("erin").info()["pid"])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=grab) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for d in drivers:
        out, err = d.communicate(timeout=180)
        assert d.returncode == 0, err[-3000:]
        pids.append(json.loads(out.strip().splitlines()[-1])["pid"])
    assert not errors
    assert len(pids) == 8
    assert len(set(pids)) == 1


def test_concurrent_sends_run_one_turn_at_a_time_in_order(rt: Runtime) -> None:
    conv = rt.conversation("fay")
    texts = [f"!sleep 0.0{i % 3} message {i}" for i in range(12)]

    async def go() -> list[str]:
        # submitted in order from one caller; the later ones arrive while earlier run
        replies = await asyncio.gather(*(conv.send_async(t) for t in texts))
        return [r.text for r in replies]

    replies = asyncio.run(go())
    assert replies == [f"echo #{i + 1}: message {i}" for i in range(12)]
    history = conv.history()
    # turns never interleave: each turn's messages are contiguous, user then assistant
    assert [m.kind for m in history] == ["user", "assistant"] * 12
    assert all(history[2 * i].turn_id == history[2 * i + 1].turn_id for i in range(12))
    assert [m.content for m in history if isinstance(m, UserMessage)] == texts


def test_a_new_actor_rebuilds_history_from_the_store(rt: Runtime) -> None:
    conv = rt.conversation("gus")
    conv.send("remember me")
    old_epoch = conv.info()["epoch"]
    assert rt.stop_conversation("gus")  # the actor or entity is gone; the store remains
    fresh = Runtime(rt.config, rt.app, started_ray=False).conversation("gus")
    assert fresh.info()["epoch"] > old_epoch  # a new activation, from the store
    assert [m.content for m in fresh.history()][:2] == ["remember me", "echo #1: remember me"]
    assert fresh.send("and now?").text == "echo #2: and now?"
    assert [m.seq for m in fresh.history()] == [0, 1, 2, 3]


def test_a_handle_never_stays_dead(rt: Runtime) -> None:
    conv = rt.conversation("hal")
    conv.send("before")
    handle = ray.get_actor(conv.actor_name, namespace=rt.config.namespace)
    ray.kill(handle, no_restart=True)
    # the same Conversation object re-resolves and the history is intact
    assert conv.send("after").text == "echo #2: after"
    assert rt.count_stored("hal") == 4


def test_crash_restarts_in_place_and_keeps_history(rt: Runtime) -> None:
    conv = rt.conversation("ivy")
    conv.send("one")
    pid = conv.info()["pid"]
    os.kill(pid, 9)
    reply = conv.send("two")
    assert reply.text == "echo #2: two"
    assert conv.info()["pid"] != pid
    assert rt.count_stored("ivy") == 4


def test_a_failed_turn_is_reported_and_the_conversation_goes_on(rt: Runtime) -> None:
    conv = rt.conversation("jo")
    with pytest.raises(TurnFailed, match="scripted fail: provider down") as info:
        conv.send("!fail provider down")
    assert info.value.conversation_id == "demo-assistant:jo"
    # The cause crossed Ray with the error, typed (AllModelsFailed keeps .failures too).
    assert isinstance(info.value.__cause__, overstory.ModelError)
    assert info.value.__cause__.kind == "server_error"
    assert conv.send("retry please").text == "echo #2: retry please"
    assert [m.kind for m in conv.history()] == ["user", "user", "assistant"]


def test_a_raising_tool_does_not_kill_the_conversation(rt: Runtime) -> None:
    conv = rt.conversation("kim")
    reply = conv.send('!tool add {"a": "not a number", "b": 1}')
    errors = [m for m in reply.messages if isinstance(m, ToolReturn) and m.is_error]
    assert len(errors) == 1
    assert "invalid arguments for tool 'add'" in errors[0].content
    assert conv.send("still alive?").text == "echo #2: still alive?"


def test_resending_a_turn_id_does_not_duplicate_it(rt: Runtime) -> None:
    conv = rt.conversation("lou")
    first = conv.send("only once", turn_id="turn-1")
    again = conv.send("only once", turn_id="turn-1")
    assert again.text == first.text
    assert rt.count_stored("lou") == 2


def test_bad_input_is_refused_at_the_boundary_and_changes_nothing(rt: Runtime) -> None:
    conv = rt.conversation("max")
    conv.send("keep this")
    before = rt.stored_history("max")
    for bad in ["", "   ", "x" * (rt.config.limits.max_message_chars + 1), "nul\x00"]:
        with pytest.raises(InvalidMessage):
            conv.send(bad)
    for bad_id in ["", "x" * 300, "tab\there", "\x1b[2J"]:
        with pytest.raises(InvalidUserId):
            rt.conversation(bad_id)
    with pytest.raises(InvalidMessage, match="different message"):
        conv.send("another text", turn_id=before[0].turn_id)
    assert rt.stored_history("max") == before


def test_the_actor_checks_input_too(rt: Runtime) -> None:
    # A client that skips the handle's checks still cannot store a bad message.
    conv = rt.conversation("ned")
    if conv.placement == "hosted":
        version, _, host = rt.registry.hosts.route("ned")
        send = functools.partial(host.send.remote, version, "ned")
    else:
        handle = ray.get_actor(
            actor_name(conversation_id("demo-assistant", "ned")), namespace=rt.config.namespace
        )
        send = handle.send.remote
    # Ray re-raises the actor's error as a subclass of it.
    with pytest.raises(InvalidMessage, match="U\\+0000"):
        ray.get(send(request_wire(TurnRequest("t1", "\x00"))))
    # A request not laid out as the wire module does (an older client's dataclass).
    with pytest.raises(InvalidMessage, match=r"a list of 9\), got TurnRequest"):
        ray.get(send(TurnRequest("t1", "hello")))
    with pytest.raises(InvalidMessage, match="other fields must be among"):
        ray.get(send(["t1", "hello", None, 0, None, None, None, None, {"colour": "red"}]))
    assert rt.count_stored("ned") == 0


def test_connect_fails_fast_on_bad_or_unreachable_stores(
    ray_cluster: str, tmp_path: object
) -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        overstory.connect(stroe="sqlite:///x.db")
    with pytest.raises(StoreUnavailable, match="does not exist"):
        overstory.connect(store=f"sqlite:///{tmp_path}/missing/dir/h.db")
    with pytest.raises(StoreUnavailable, match="cannot reach MongoDB"):
        overstory.connect(store="mongodb://127.0.0.1:9/x?serverSelectionTimeoutMS=500")


def test_conversations_on_mongodb(ray_cluster: str, mongo_url: str, namespace: str) -> None:
    rt = overstory.connect(demo_agent(), store=mongo_url, namespace=namespace)
    try:
        conv = rt.conversation("olga")
        assert conv.send("what is 1 + 1?").text == "add returned 2"
        rt.stop_conversation("olga")
        again = Runtime(rt.config, rt.app, started_ray=False).conversation("olga")
        assert len(again.history()) == 4
        assert rt.count_stored("olga") == 4
    finally:
        kill_namespace(namespace)


def test_a_streamed_turn_in_either_placement(rt: Runtime) -> None:
    """The same events whichever the placement: the deltas join to the stored reply,
    a reader resumes from any seq, and the turn goes on while nobody reads."""
    conv = rt.conversation("stella")
    events = list(conv.stream("what is 4 + 5? please"))
    assert [e.type for e in events[:3]] == ["started", "tool_call", "tool_result"]
    assert events[-1].type == "completed"
    assert "".join(e.text for e in events if e.type == "delta") == "add returned 9"
    assert conv.history()[-1].content == "add returned 9"
    turn_id = events[0].turn_id
    assert list(conv.resume(turn_id, after=2)) == events[3:]
    away = conv.stream("!sleep 0.3 while away", turn_id="t-stella-away")
    next(away)
    away.close()
    rest = list(conv.resume("t-stella-away", after=0))
    assert "".join(e.text for e in rest if e.type == "delta") == "echo #2: while away"
    assert (
        rt.count_stored("stella") == 6
    )  # two turns: user, assistant, tool, assistant; user, assistant


def test_a_turn_chooses_settings_and_structure_and_history_pages(rt: Runtime) -> None:
    """Settings, an output type and paging cross Ray to either placement; a bad choice is
    refused by name before anything is sent or stored."""
    from overstory import UsageError
    from overstory.testing.tools import Forecast

    conv = rt.conversation("choices")
    capped = conv.send("x" * 200, settings={"max_output_tokens": 5})
    assert len(capped.text) == 20
    structured = conv.send("weather in Oslo?", output_type=Forecast)
    assert isinstance(structured.output, Forecast)
    assert json.loads(structured.text) == structured.output.model_dump()
    events = list(conv.stream("and in Bergen?", output_type=Forecast))
    deltas = [e.text for e in events if e.type == "delta"]
    assert len(deltas) == 1
    assert events[-1].reply is not None
    assert isinstance(events[-1].reply.output, Forecast)
    with pytest.raises(UsageError, match="top_k"):
        conv.send("hi", settings={"top_k": 1})
    with pytest.raises(UsageError, match="allows: default"):
        conv.send("hi", model="gpt-9")
    everything = conv.history()
    assert len(everything) == 6  # three turns; the refused ones stored nothing
    assert [m.seq for m in conv.history(after=1, limit=3)] == [2, 3, 4]
    with pytest.raises(UsageError, match="limit"):
        conv.history(limit=0)
