"""Conversations under supervision: crashes, zombies, passivation, the live cap, the tree."""

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
from overstory import Reply, Runtime, UserMessage
from overstory.actors.names import actor_name
from overstory.app import conversation_id
from overstory.cli.demo import demo_agent
from overstory.store import open_store
from overstory.supervisors import ChildSpec, SupervisorSpec
from overstory.supervisors.named import SUPERVISED
from overstory.supervisors.tree import CONVERSATIONS, ROOT, NamedChild, boot

pytestmark = pytest.mark.ray


def _runtime(tmp_path_factory: pytest.TempPathFactory, **settings: Any) -> Runtime:
    namespace = f"t-life-{uuid.uuid4().hex[:8]}"
    store = f"sqlite:///{tmp_path_factory.mktemp('life')}/history.db"
    return overstory.connect(
        demo_agent(placement="dedicated"), store=store, namespace=namespace, **settings
    )


@pytest.fixture(scope="module")
def rt(ray_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    runtime = _runtime(tmp_path_factory, conversations={"idle_timeout_s": 1.5})
    yield runtime
    kill_namespace(runtime.config.namespace)


@pytest.fixture(scope="module")
def steady(ray_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    """A runtime without idle timeout: crash tests must not race a passivation."""
    runtime = _runtime(tmp_path_factory)
    yield runtime
    kill_namespace(runtime.config.namespace)


def cid(user: str) -> str:
    """The id of ``user``'s conversation with the demo agent these tests serve."""
    return conversation_id("demo-assistant", user)


def _live_names(ns: str) -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(True) if a["namespace"] == ns}


def user_texts(rt: Runtime, user: str) -> list[str]:
    return [m.content for m in rt.stored_history(user) if isinstance(m, UserMessage)]


def test_idle_conversations_passivate_and_come_back_transparently(rt: Runtime) -> None:
    ns = rt.config.namespace
    before = rt.status()["passivations"]
    conv = rt.conversation("idle-ida")
    conv.send("before the nap")
    wait_for_condition(lambda: actor_name(cid("idle-ida")) not in _live_names(ns), timeout=15)
    # The supervisor frees the name (ray.kill) before it counts the passivation: it waits
    # for the child's watcher first (up to 10 s), so the count may come a moment later.
    wait_for_condition(lambda: rt.status()["passivations"] > before, timeout=15)
    assert cid("idle-ida") not in [
        c["user_id"] for c in ray.get(rt.registry.supervisor().children.remote())
    ]
    # the same handle keeps working: the registry re-activates from the store
    assert conv.send("after the nap").text == "echo #2: after the nap"
    assert user_texts(rt, "idle-ida") == ["before the nap", "after the nap"]


def test_the_live_cap_passivates_the_least_recently_used(
    ray_cluster: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    rt = _runtime(tmp_path_factory, dedicated={"max_live_per_node": 3})
    try:
        users = [f"cap-{i}" for i in range(6)]
        convs = [rt.conversation(u) for u in users[:3]]
        for conv in reversed(convs):  # cap-2 is now the least recently used, cap-0 the most
            conv.send("hi")
        for user in users[3:]:
            rt.conversation(user).send("hi")
            assert max(rt.status()["per_node"].values()) <= 3
        live = {c["user_id"] for c in ray.get(rt.registry.supervisor().children.remote())}
        assert live == {cid("cap-3"), cid("cap-4"), cid("cap-5")}
        assert rt.status()["evictions"] == 3
        # the evicted answer again, with their history
        assert convs[0].send("again").text == "echo #2: again"
    finally:
        kill_namespace(rt.config.namespace)


def test_a_turn_interrupted_by_a_crash_completes_exactly_once(steady: Runtime) -> None:
    rt = steady
    conv = rt.conversation("crash-cat")
    conv.send("warm up")
    pid, incarnation = conv.info()["pid"], conv.info()["incarnation"]
    restarts = rt.status()["restarts"]
    result: list[Reply | BaseException] = []

    def send() -> None:
        try:
            result.append(conv.send("!sleep 1.5 slow question", turn_id="slow-1"))
        except BaseException as exc:
            result.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    # the user message is durable before the model is called: kill inside the model call
    wait_for_condition(lambda: rt.count_stored("crash-cat") == 3, timeout=10)
    os.kill(pid, signal.SIGKILL)
    sender.join(timeout=60)
    reply = result[0]
    assert isinstance(reply, Reply), reply
    assert reply.text == "echo #2: slow question"
    assert user_texts(rt, "crash-cat") == ["warm up", "!sleep 1.5 slow question"]
    assert [m.seq for m in rt.stored_history("crash-cat")] == [0, 1, 2, 3]
    assert conv.info()["pid"] != pid
    assert rt.status()["restarts"] > restarts
    # A watch meant for the process that died is answered at once: had the supervisor
    # been between its ready and its watch call at the crash, it still counts it.
    assert conv.info()["incarnation"] != incarnation
    actor = ray.get_actor(conv.actor_name, namespace=rt.config.namespace)
    assert ray.get(actor.watch.remote(incarnation), timeout=10) == "restarted"


def test_a_zombie_is_fenced_out_and_the_turn_lands_once(steady: Runtime) -> None:
    rt = steady
    conv = rt.conversation("zombie-zed")
    conv.send("one")
    old = conv.info()

    async def take_over() -> int:  # what a replacement incarnation does first
        store = open_store(rt.config.store)
        await store.open()
        try:
            return await store.acquire(conv.conversation_id)
        finally:
            await store.close()

    assert asyncio.run(take_over()) == old["epoch"] + 1
    # the running actor is now a zombie: its write is refused, it ends itself, and the
    # handle re-sends the turn to a fresh incarnation, which stores it once
    assert conv.send("two").text == "echo #2: two"
    assert user_texts(rt, "zombie-zed") == ["one", "two"]
    assert conv.info()["epoch"] > old["epoch"] + 1


def test_booting_twice_attaches_to_the_running_tree(rt: Runtime) -> None:
    ns = rt.config.namespace
    root = ray.get_actor(ROOT, namespace=ns)
    again = overstory.connect(
        demo_agent(placement="dedicated"), store=rt.config.store, namespace=ns
    )
    assert ray.get_actor(ROOT, namespace=ns)._actor_id == root._actor_id
    names = [
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == ns
    ]
    assert names.count(ROOT) == 1
    assert names.count(CONVERSATIONS) == 1
    assert again.conversation("tree-tim").send("hi").text == "echo #1: hi"


def _crash_conversation_supervisor(ns: str) -> None:
    """Kill the conversation supervisor's process (Ray restarts it in place) and wait
    until the root has counted the restart: the kill itself lands asynchronously."""
    root = ray.get_actor(ROOT, namespace=ns)
    restarts = ray.get(root.status.remote())["restarts"]
    ray.kill(ray.get_actor(CONVERSATIONS, namespace=ns), no_restart=False)
    wait_for_condition(
        lambda: ray.get(root.status.remote())["restarts"] == restarts + 1, timeout=30
    )


def test_a_crashed_conversation_supervisor_is_restarted_and_adopts_its_children(
    steady: Runtime,
) -> None:
    rt, ns = steady, steady.config.namespace
    conv = rt.conversation("orphan-olive")
    conv.send("one")
    pid = conv.info()["pid"]
    supervisor = ray.get_actor(CONVERSATIONS, namespace=ns)
    _crash_conversation_supervisor(ns)
    wait_for_condition(
        lambda: (
            cid("orphan-olive")
            in [c["user_id"] for c in ray.get(supervisor.children.remote(), timeout=5)]
        ),
        timeout=30,
    )
    assert conv.send("two").text == "echo #2: two"
    assert conv.info()["pid"] == pid  # the conversation itself never stopped


def test_a_conversation_left_half_passivated_by_a_crashed_supervisor_is_ended(
    steady: Runtime,
) -> None:
    rt, ns = steady, steady.config.namespace
    conv = rt.conversation("half-hal")
    conv.send("one")
    # what the supervisor does before it kills a passivating child: the actor now refuses
    # turns. The supervisor dies before the kill.
    actor = ray.get_actor(actor_name(cid("half-hal")), namespace=ns)
    assert ray.get(actor.passivate.remote()) is True
    _crash_conversation_supervisor(ns)
    # the restarted supervisor finishes the passivation instead of leaving the name held
    wait_for_condition(lambda: actor_name(cid("half-hal")) not in _live_names(ns), timeout=30)
    assert conv.send("two").text == "echo #2: two"
    assert user_texts(rt, "half-hal") == ["one", "two"]


def test_an_idle_orphan_is_still_passivated_after_its_supervisor_restarts(rt: Runtime) -> None:
    conv = rt.conversation("nap-nora")
    conv.send("one")
    pid = conv.info()["pid"]
    ns = rt.config.namespace
    ray.kill(ray.get_actor(CONVERSATIONS, namespace=ns), no_restart=False)
    # Its ask to passivate (1.5 s idle) may reach the restarting supervisor before the
    # supervisor has adopted it, and be refused: the actor must ask again later.
    wait_for_condition(lambda: actor_name(cid("nap-nora")) not in _live_names(ns), timeout=30)
    assert conv.send("two").text == "echo #2: two"
    assert conv.info()["pid"] != pid
    assert user_texts(rt, "nap-nora") == ["one", "two"]


def test_exceeding_restart_intensity_escalates_to_the_root(
    ray_cluster: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    rt = _runtime(tmp_path_factory, supervision={"restart_intensity": 1, "restart_period_s": 60})
    try:
        ns = rt.config.namespace
        root = ray.get_actor(ROOT, namespace=ns)
        supervisor = ray.get_actor(CONVERSATIONS, namespace=ns)
        conv = rt.conversation("esc-eve")
        conv.send("one")
        # first crash: within the intensity (1 in 60 s), the supervisor restarts it
        os.kill(conv.info()["pid"], signal.SIGKILL)
        wait_for_condition(lambda: ray.get(supervisor.status.remote())["restarts"] == 1, timeout=30)
        assert conv.send("two").text == "echo #2: two"
        # second crash: intensity exceeded -> children shut down, escalated to the root,
        # which restarts the conversation supervisor (a new actor)
        os.kill(conv.info()["pid"], signal.SIGKILL)
        wait_for_condition(lambda: ray.get(root.status.remote())["restarts"] == 1, timeout=60)
        ray.get(root.ready.remote(), timeout=60)  # holds the root's lock: the restart is done
        replacement = ray.get_actor(CONVERSATIONS, namespace=ns)
        assert replacement._actor_id != supervisor._actor_id
        # the tree serves again and the history is intact
        assert conv.send("three").text == "echo #3: three"
    finally:
        kill_namespace(rt.config.namespace)


def _pid_of(conv: overstory.Conversation) -> int | None:
    try:
        return int(conv.info()["pid"])
    except Exception:
        return None


def test_a_child_that_cannot_restart_counts_as_crashing_until_the_root_gives_up(
    ray_cluster: str, tmp_path: Any
) -> None:
    class _Flaky:
        """A permanent child whose start fails while ``marker`` exists (defined here:
        Ray pickles a local class by value, a module-level one by its module)."""

        def __init__(self, marker: str) -> None:
            self.marker = marker

        def ready(self) -> dict[str, Any]:
            if os.path.exists(self.marker):
                raise RuntimeError("cannot start: the marker file is present")
            return {"pid": os.getpid()}

        async def watch(self, incarnation: str | None = None) -> str:
            await asyncio.Event().wait()
            return "shutdown"

        def pid(self) -> int:
            return os.getpid()

    ns = f"t-root-{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "broken"
    child = NamedChild(ray.remote(_Flaky), "flaky", (str(marker),), SUPERVISED)
    spec = SupervisorSpec(max_restarts=2, period_s=60, children=(ChildSpec("flaky", start=child),))
    try:
        root = boot(ns, spec)
        assert ray.get(root.ready.remote(), timeout=60)["children"] == ["flaky"]
        flaky = ray.get_actor("flaky", namespace=ns)
        marker.write_text("")
        os.kill(ray.get(flaky.pid.remote()), signal.SIGKILL)

        # Ray restarts the process, but its start fails: each failure is one more crash,
        # and past 2 restarts in 60 s the root shuts the tree down instead of leaving a
        # child nobody watches.
        def root_is_gone() -> bool:
            try:
                ray.get(root.status.remote(), timeout=5)
            except ray.exceptions.RayActorError:
                return True
            return False

        wait_for_condition(root_is_gone, timeout=60)
        # and the broken child was ended with it: nothing of the tree is left running
        assert "flaky" not in _live_names(ns)
    finally:
        kill_namespace(ns)


def test_one_for_all_drains_the_siblings_it_stops(ray_cluster: str, tmp_path: Any) -> None:
    class _Child:
        """A permanent child that writes its pid to ``drained`` when asked to drain
        (defined here: Ray pickles a local class by value)."""

        def __init__(self, drained: str) -> None:
            self.drained = drained

        def ready(self) -> dict[str, Any]:
            return {"pid": os.getpid()}

        async def watch(self, incarnation: str | None = None) -> str:
            await asyncio.Event().wait()
            return "shutdown"

        async def drain(self, timeout_s: float) -> bool:
            await asyncio.to_thread(self._note)
            return True

        def _note(self) -> None:
            with open(self.drained, "a") as f:
                f.write(f"{os.getpid()}\n")

        def pid(self) -> int:
            return os.getpid()

    ns = f"t-drain-{uuid.uuid4().hex[:8]}"
    drained = {name: tmp_path / f"{name}.drained" for name in ("a", "b")}
    children = tuple(
        ChildSpec(name, start=NamedChild(ray.remote(_Child), name, (str(path),), SUPERVISED))
        for name, path in drained.items()
    )
    spec = SupervisorSpec(strategy="one_for_all", max_restarts=3, period_s=60, children=children)
    try:
        root = boot(ns, spec)
        assert ray.get(root.ready.remote(), timeout=60)["children"] == ["a", "b"]
        a, b = (ray.get_actor(name, namespace=ns) for name in ("a", "b"))
        pid_a, pid_b = ray.get([a.pid.remote(), b.pid.remote()], timeout=60)
        os.kill(pid_b, signal.SIGKILL)  # b crashes: one_for_all stops a, then starts both
        wait_for_condition(lambda: ray.get(root.status.remote())["restarts"] == 1, timeout=60)
        ray.get(root.ready.remote(), timeout=60)  # holds the root's lock: the restart is done
        # a was asked to drain before it was killed (b was dead: nothing to ask)
        assert drained["a"].read_text().split() == [str(pid_a)]
        assert not drained["b"].exists()
        new_a = ray.get_actor("a", namespace=ns)
        assert ray.get(new_a.pid.remote(), timeout=60) != pid_a  # a fresh process
    finally:
        kill_namespace(ns)
