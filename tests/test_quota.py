"""Quotas on a real tree: one user's budget across several conversations on two hosts,
with turns that time out and turns cancelled mid-stream; turns at once and per minute."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from conftest import kill_namespace, wait_for

import overstory
from overstory import Agent, Conversation, OfflineModel, QuotaExceeded, Runtime, TurnFailed
from overstory.messages import AssistantMessage

pytestmark = pytest.mark.ray

BUDGET = 3_000
OUTPUT = 60  # the answer's share of each call's reservation


@pytest.fixture(scope="module")
def rt(ray_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    """One tree for the module (booting one takes seconds): each test's quotas are its
    own users'."""
    namespace = f"t-quota-{uuid.uuid4().hex[:8]}"
    agent = Agent("q", model=OfflineModel("q", latency_s=0.05))
    runtime = overstory.connect(
        agent,
        store=f"sqlite:///{tmp_path_factory.mktemp('quota')}/history.db",
        namespace=namespace,
        hosted={"hosts_per_node": 2},
        conversations={"turn_timeout_s": 1.0},
        quotas={"output_tokens": OUTPUT},
    )
    yield runtime
    runtime.close()
    kill_namespace(namespace)


def test_one_users_budget_holds_across_conversations_on_two_hosts(rt: Runtime) -> None:
    rt.quotas.set("carol", tokens_per_day=BUDGET)
    # Four conversations on each of two hosts (ids are random: draw until both have four).
    by_host: dict[str, list[Conversation]] = {}
    for _ in range(200):
        conv = rt.new_conversation("carol", agent="q")
        by_host.setdefault(conv.actor_name, []).append(conv)
        if len([h for h in by_host.values() if len(h) >= 4]) >= 2:
            break
    full = [h[:4] for h in by_host.values() if len(h) >= 4]
    assert len(full) >= 2, f"conversations per host: { {k: len(v) for k, v in by_host.items()} }"
    convs = full[0] + full[1]  # the user's turns run on two hosts
    refusals: list[QuotaExceeded] = []
    errors: list[BaseException] = []
    unchanged_after_refusal: list[bool] = []
    lock = threading.Lock()

    def talk(i: int) -> None:
        conv = convs[i]
        for n in range(60):
            before = len(conv.history())
            try:
                if n == 3:  # a turn past its deadline (1 s): its reservation is freed
                    conv.send("!sleep 3 too slow")
                elif n == 5:  # a streamed turn cancelled after its first delta
                    for event in conv.stream(f"a reply of several words, number {n}"):
                        if event.type == "delta":
                            conv.cancel(event.turn_id)
                else:
                    conv.send(f"message {n} of conversation {i}")
            except QuotaExceeded as exc:
                with lock:
                    refusals.append(exc)
                    unchanged_after_refusal.append(len(conv.history()) == before)
                return
            except TurnFailed:
                continue  # the timed-out turn
            except BaseException as exc:  # reported below
                with lock:
                    errors.append(exc)
                return

    threads = [threading.Thread(target=talk, args=(i,)) for i in range(len(convs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert errors == []
    standing = rt.quotas.get("carol")
    used = standing["usage"]["tokens"]
    # Every conversation stopped on the budget, having stored nothing for the refused turn.
    assert len(refusals) == len(convs)
    assert {r.limit for r in refusals} == {"tokens_per_day"}
    assert all(unchanged_after_refusal)
    # Nothing leaked: no reservation and no turn slot left, timeouts and cancels included.
    assert standing["usage"]["reserved_tokens"] == 0
    assert standing["usage"]["running_turns"] == 0
    # Committed tokens: at most the budget plus one call's estimate (the largest a call
    # here reserves: its history is under 2,000 characters), and at least what the stored
    # answers say they used (a cancelled call counts its estimate, its usage unknown).
    assert used <= BUDGET + 2_000 // 4 + OUTPUT
    stored = sum(
        m.usage.input_tokens + m.usage.output_tokens
        for c in convs
        for m in c.history()
        if isinstance(m, AssistantMessage)
    )
    assert stored <= used
    assert used > BUDGET // 2


def test_turns_at_once_and_per_minute_are_refused_with_when_they_free(rt: Runtime) -> None:
    rt.quotas.set("dan", concurrent_turns=1)
    a, b = rt.new_conversation("dan", agent="q"), rt.new_conversation("dan", agent="q")
    slow = threading.Thread(target=a.send, args=("!sleep 0.8 slow one",))
    slow.start()
    wait_for(lambda: a.info()["busy"], 30, "the slow turn to start")
    with pytest.raises(QuotaExceeded) as refused:
        b.send("meanwhile")
    assert (refused.value.limit, refused.value.value) == ("concurrent_turns", 1)
    assert b.history() == []  # nothing stored for the refused turn
    slow.join()
    assert b.send("now").text == "echo #1: now"  # the slot is free again

    rt.quotas.set("erin", requests_per_minute=2)
    c = rt.new_conversation("erin", agent="q")
    c.send("one")
    c.send("two")
    with pytest.raises(QuotaExceeded) as refused:
        c.send("three")
    assert refused.value.limit == "requests_per_minute"
    assert 0 < refused.value.retry_after_s <= 60
    assert refused.value.resets_at > time.time()
    assert len(c.history()) == 4
    shown = rt.quotas.get("erin")
    assert shown["own"] is True
    assert shown["quota"]["requests_per_minute"] == 2
    assert shown["usage"]["turns_last_minute"] == 2
