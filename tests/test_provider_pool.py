"""The provider actor pool on the session's Ray: fallback through provider actors, the
breaker holding across conversations, BYOK isolation, limiter accuracy with callers in
several actors, and the demo finishing on the backup when the primary fails mid-run.

Vendors are loopback servers speaking the real wire formats (overstory.testing).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from conftest import kill_namespace, wait_dead
from ray._private.test_utils import wait_for_condition

import overstory
from overstory import Agent, Runtime
from overstory.cli.demo import add, word_count
from overstory.messages import TurnEvent, UserMessage
from overstory.providers import (
    BreakerPolicy,
    Endpoint,
    Limits,
    ModelRequest,
    RemoteModel,
    RetryPolicy,
    Secret,
)
from overstory.providers.pool import provider_actor_name, provider_namespace, provider_statuses
from overstory.testing import AnthropicServer, Fault, OpenAIServer

pytestmark = pytest.mark.ray

OPERATOR_KEY = "sk-operator-000000000001"


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[OpenAIServer, AnthropicServer]]:
    with OpenAIServer() as primary, AnthropicServer() as backup:
        yield primary, backup


@pytest.fixture(scope="module")
def chain(servers: tuple[OpenAIServer, AnthropicServer]) -> tuple[Endpoint, Endpoint]:
    primary, backup = servers
    fast = RetryPolicy(attempts=2, base_s=0.01, max_backoff_s=0.05)
    return (
        Endpoint(
            "openai",
            "primary-model",
            primary.base_url,
            key=Secret(OPERATOR_KEY),
            retry=fast,
            breaker=BreakerPolicy(failures=2, window_s=60, cooldown_s=600),
        ),
        Endpoint(
            "anthropic", "backup-model", backup.base_url, key=Secret(OPERATOR_KEY), retry=fast
        ),
    )


@pytest.fixture(scope="module")
def rt(
    ray_cluster: str, tmp_path_factory: pytest.TempPathFactory, chain: tuple[Endpoint, Endpoint]
) -> Iterator[Runtime]:
    namespace = f"t-pool-{uuid.uuid4().hex[:8]}"
    agent = Agent("pool-agent", model=list(chain), tools=[add, word_count])
    store = f"sqlite:///{tmp_path_factory.mktemp('pool')}/history.db"
    runtime = overstory.connect(agent, store=store, namespace=namespace)
    yield runtime
    kill_namespace(namespace)


@pytest.fixture(autouse=True)
def _healthy(servers: tuple[OpenAIServer, AnthropicServer]) -> Iterator[None]:
    for server in servers:
        server.reset()
        server.fail_always(None)
    return


def test_a_turn_with_tools_is_called_from_the_host_under_the_provider_actors_leases(
    rt: Runtime, servers: tuple[OpenAIServer, AnthropicServer], chain: tuple[Endpoint, Endpoint]
) -> None:
    primary, backup = servers
    conv = rt.conversation(f"tools-{uuid.uuid4().hex[:6]}")
    before = _status(rt, chain[0])["calls"] if _has_actor(rt, chain[0]) else 0
    reply = conv.send("what is 20 + 22?")
    assert reply.text == "tool results: 42"
    assert len(primary.requests) == 2
    assert backup.requests == []
    assert reply.usage.input_tokens > 0
    # The host called the vendor itself (its SDK is loaded there) ...
    assert conv.info()["vendor_sdks"] == ["openai"]
    # ... each call admitted by the endpoint's provider actor, every lease settled.
    status = _status(rt, chain[0])
    assert status["calls"] - before == 2
    assert status["leases"] == 0
    assert status["limits"]["in_flight"] == 0
    assert status["limits"]["admitted"] >= 2
    assert all(OPERATOR_KEY not in json.dumps(s) for s in provider_statuses(rt.config.namespace))


def test_a_dedicated_conversation_streams_through_the_provider_actor_and_loads_no_sdk(
    ray_cluster: str,
    tmp_path: Path,
    servers: tuple[OpenAIServer, AnthropicServer],
    chain: tuple[Endpoint, Endpoint],
) -> None:
    """One conversation per process: its calls go to the provider actor whole."""
    primary, _ = servers
    namespace = f"t-pool-dedicated-{uuid.uuid4().hex[:8]}"
    agent = Agent("pool-dedicated", model=list(chain), placement="dedicated")
    runtime = overstory.connect(agent, store=f"sqlite:///{tmp_path}/h.db", namespace=namespace)
    primary.stream_interval_s = 0.02
    try:
        conv = runtime.conversation("solo")
        events = list(conv.stream("say something"))
        assert events[-1].type == "completed"
        deltas = [e.text for e in events if e.type == "delta"]
        assert "".join(deltas) == events[-1].reply.text == "echo: say something"  # type: ignore[union-attr]
        assert conv.info()["vendor_sdks"] == []
        (status,) = provider_statuses(namespace)
        assert status["calls"] == 1
        assert status["leases"] == 0
    finally:
        primary.stream_interval_s = 0.0
        kill_namespace(namespace)


def _has_actor(rt: Runtime, endpoint: Endpoint) -> bool:
    return any(
        s["actor"] == provider_actor_name(endpoint) for s in provider_statuses(rt.config.namespace)
    )


def _status(rt: Runtime, endpoint: Endpoint) -> dict[str, Any]:
    (status,) = [
        s
        for s in provider_statuses(rt.config.namespace)
        if s["actor"] == provider_actor_name(endpoint)
    ]
    return status


def _settled(rt: Runtime, endpoint: Endpoint, timeout_s: float = 10.0) -> dict[str, Any]:
    """The endpoint's status once it holds no lease: a host tells the provider actor that
    a call ended in a note gathered per loop turn, which may land just after the turn's
    last event reached the reader (the status as it stands at the deadline)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = _status(rt, endpoint)
        if status["leases"] == 0 or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def test_a_streamed_turn_reads_the_vendors_deltas_through_the_provider_actor(
    rt: Runtime, servers: tuple[OpenAIServer, AnthropicServer]
) -> None:
    primary, backup = servers
    conv = rt.conversation(f"stream-{uuid.uuid4().hex[:6]}")
    primary.stream_interval_s = 0.02  # pieces that arrive together travel as one
    try:
        events = list(conv.stream("what is 20 + 22?"))
    finally:
        primary.stream_interval_s = 0.0
    types = [e.type for e in events]
    assert types[0] == "started"
    assert types[-1] == "completed"
    assert types.index("tool_call") < types.index("tool_result") < types.index("delta")
    deltas = [e.text for e in events if e.type == "delta"]
    assert len(deltas) > 1  # the server cut the answer into pieces; they came as pieces
    assert events[-1].reply is not None
    assert "".join(deltas) == events[-1].reply.text == "tool results: 42"
    assert [r.body["stream"] for r in primary.requests] == [True, True]
    assert backup.requests == []
    stored = conv.history()[-1]
    assert stored.content == "tool results: 42"
    assert stored.usage.input_tokens > 0  # usage read from the stream's last chunk
    # A reader that went away at any point reads on from there: the same events.
    for n in range(-1, len(events)):
        assert list(conv.resume(events[0].turn_id, after=n)) == events[n + 1 :], n


def test_a_stream_falls_through_before_its_first_token_and_ends_incomplete_after_it(
    rt: Runtime, servers: tuple[OpenAIServer, AnthropicServer]
) -> None:
    primary, backup = servers
    conv = rt.conversation(f"stream-fb-{uuid.uuid4().hex[:6]}")
    # Both of the primary's attempts break before a token: the chain moves on, unseen.
    primary.script(Fault.stream_error(after=0, status=500), Fault.stream_error(after=0, status=500))
    events = list(conv.stream("hello over there"))
    [fell] = [e for e in events if e.type == "fallback"]
    deltas = [e for e in events if e.type == "delta"]
    assert events.index(fell) < events.index(deltas[0])
    assert events[-1].reply is not None
    assert "".join(d.text for d in deltas) == events[-1].reply.text == "echo: hello over there"
    assert events[-1].reply.messages[-1].model == "backup-model"

    # The primary's breaker (2 failures open it) shares this module: a success clears it.
    assert conv.send("clear the count").messages[-1].model == "primary-model"
    primary.reset()
    backup.reset()
    primary.script(Fault.stream_drop(after=2))  # two 4-character pieces, then the cut
    events = list(conv.stream("cut this answer short"))
    last = events[-1]
    assert last.type == "incomplete"
    assert "(connection)" in last.text
    assert "connection lost mid-stream" in last.text
    shown = "".join(e.text for e in events if e.type == "delta")
    assert shown == "echo: cu"  # what was shown, once: no retry, no continuation
    assert len(primary.requests) == 1
    assert backup.requests == []
    stored = conv.history()[-1]
    assert stored.content == shown
    assert stored.incomplete == last.text
    conv.send("clear the count again")


def test_cancelling_a_vendor_stream_frees_the_endpoints_limiter_slot_at_once(
    rt: Runtime, servers: tuple[OpenAIServer, AnthropicServer], chain: tuple[Endpoint, Endpoint]
) -> None:
    primary, _ = servers
    # ~45 s to stream this answer to its end, past the wait below: a slot freed within
    # that wait was freed by the cancel.
    primary.stream_interval_s = 0.5
    try:
        conv = rt.conversation(f"stream-cancel-{uuid.uuid4().hex[:6]}")
        text = "a long answer that keeps coming " * 10
        events: list[TurnEvent] = []
        cancelled = False
        for event in conv.stream(text):
            events.append(event)
            if event.type == "delta" and not cancelled:
                assert conv.cancel(event.turn_id)
                cancelled = True
        assert events[-1].type == "incomplete"
        assert events[-1].text == "cancelled"
        shown = "".join(e.text for e in events if e.type == "delta")
        assert ("echo: " + text).startswith(shown)
        assert len(shown) < 40

        def released() -> bool:
            (row,) = [
                s
                for s in provider_statuses(rt.config.namespace)
                if s["actor"] == provider_actor_name(chain[0])
            ]
            return bool(row["limits"]["in_flight"] == 0)

        wait_for_condition(released, timeout=20, retry_interval_ms=100)
    finally:
        primary.stream_interval_s = 0.0


def test_primary_failing_falls_through_to_the_backup_after_its_retries(
    rt: Runtime, servers: tuple[OpenAIServer, AnthropicServer]
) -> None:
    primary, backup = servers
    primary.script(Fault.server_error(), Fault.server_error())
    reply = rt.conversation(f"fb-{uuid.uuid4().hex[:6]}").send("hello")
    assert reply.text == "echo: hello"
    assert reply.messages[-1].model == "backup-model"
    assert len(primary.requests) == 2  # the retry loop's 2 attempts, then fall through
    assert len(backup.requests) == 1


def test_the_breaker_opens_once_for_every_conversation_then_calls_skip_the_primary(
    rt: Runtime, servers: tuple[OpenAIServer, AnthropicServer], chain: tuple[Endpoint, Endpoint]
) -> None:
    primary, _backup = servers
    # A separate endpoint (its own actor and breaker) so other tests keep theirs closed.
    flaky = Endpoint(
        "openai",
        "flaky-model",
        primary.base_url,
        key=Secret(OPERATOR_KEY),
        retry=RetryPolicy(attempts=1),
        breaker=BreakerPolicy(failures=2, window_s=60, cooldown_s=600),
    )
    namespace = rt.config.namespace

    async def one(model: RemoteModel) -> str:
        with provider_namespace(namespace):
            msgs = [UserMessage(content="x", seq=0)]
            try:
                await model.request(ModelRequest("", msgs))
                return "ok"
            except overstory.ModelError as exc:
                return exc.kind

    primary.fail_always(Fault.server_error())
    # Two different callers (two RemoteModels, as two conversations would hold).
    kinds = [asyncio.run(one(RemoteModel(flaky))) for _ in range(4)]
    assert kinds == ["server_error", "server_error", "circuit_open", "circuit_open"]
    assert len(primary.requests) == 2  # while open, nothing reaches the server
    (status,) = [
        s for s in provider_statuses(namespace) if s["actor"] == provider_actor_name(flaky)
    ]
    assert status["circuit"]["state"] == "open"
    assert status["failures"] == {"server_error": 2, "circuit_open": 2}


def test_byok_users_reach_the_vendor_with_their_own_keys_through_their_own_actors(
    rt: Runtime, servers: tuple[OpenAIServer, AnthropicServer], chain: tuple[Endpoint, Endpoint]
) -> None:
    primary, _ = servers
    alice_key, bob_key = "sk-alice-00000000000001", "sk-bob-000000000000001"
    tag = uuid.uuid4().hex[:6]
    alice = rt.conversation(f"alice-{tag}", api_keys={"openai": alice_key})
    bob = rt.conversation(f"bob-{tag}", api_keys={"openai": bob_key})
    carol = rt.conversation(f"carol-{tag}")
    for conv in (alice, bob, carol, alice):
        primary.reset()
        conv.send(f"hi from {conv.user_id}")
        expected = {alice: alice_key, bob: bob_key, carol: OPERATOR_KEY}[conv]
        assert [r.api_key for r in primary.requests] == [expected]
    names = {s["actor"] for s in provider_statuses(rt.config.namespace)}
    ids = {chain[0].id, chain[0].with_key(alice_key).id, chain[0].with_key(bob_key).id}
    assert {provider_actor_name(chain[0].with_key(k)) for k in (alice_key, bob_key)} <= names
    assert len(ids) == 3
    # The keys survive a crash of alice's actor: the supervisor restarts it with them.
    old = ray.get_actor(alice.actor_name, namespace=rt.config.namespace)
    ray.kill(old, no_restart=True)
    wait_dead(old)
    primary.reset()
    alice.send("after the crash")
    assert [r.api_key for r in primary.requests] == [alice_key]


@ray.remote(num_cpus=0)
class Caller:
    """Calls one endpoint from its own process, as a conversation actor would."""

    async def burst(self, endpoint: Endpoint, namespace: str, n: int) -> list[float]:
        model = RemoteModel(endpoint)
        msgs = [UserMessage(content="count me", seq=0)]

        async def one() -> float:
            with provider_namespace(namespace):
                await model.request(ModelRequest("", msgs))
            return time.time()

        return list(await asyncio.gather(*(one() for _ in range(n))))


def test_the_rpm_limit_holds_across_callers_in_several_actors(
    rt: Runtime, servers: tuple[OpenAIServer, AnthropicServer]
) -> None:
    primary, _ = servers
    limit, window = 8, 3.0
    endpoint = Endpoint(
        "openai",
        "limited-model",
        primary.base_url,
        key=Secret(OPERATOR_KEY),
        limits=Limits(rpm=limit, window_s=window, max_wait_s=30),
    )
    callers = [Caller.remote() for _ in range(4)]  # type: ignore[attr-defined]
    try:
        # Warm up (actor start, SDK client, first connection), then let the window empty:
        # from here on a request's completion trails its admission by a few ms only.
        ray.get([c.burst.remote(endpoint, rt.config.namespace, 1) for c in callers[:1]])
        wait_for_condition(
            lambda: _limits(rt, endpoint)["rpm_used"] == 0, timeout=10, retry_interval_ms=50
        )
        primary.reset()
        start = time.time()
        done = ray.get([c.burst.remote(endpoint, rt.config.namespace, 6) for c in callers])
    finally:
        for c in callers:
            ray.kill(c)
    assert sum(len(batch) for batch in done) == 24
    # When the vendor received each request: admission plus a few ms of HTTP (the
    # callers' completion times would add their own scheduling noise).
    times = sorted(r.at - start for r in primary.requests)
    assert len(times) == 24
    slack = 0.5  # HTTP time between admission and arrival, on a loaded 2-core machine
    for i, t in enumerate(times):
        inside = sum(1 for u in times[i:] if u < t + window - slack)
        assert inside <= limit, " ".join(f"{x:.3f}" for x in times)
    # 24 requests at 8 per window need 3 windows: the last ones start after 2 windows.
    assert times[-1] >= 2 * window - slack
    assert _limits(rt, endpoint)["admitted"] == 25


def _limits(rt: Runtime, endpoint: Endpoint) -> dict[str, Any]:
    (status,) = [
        s
        for s in provider_statuses(rt.config.namespace)
        if s["actor"] == provider_actor_name(endpoint)
    ]
    limits: dict[str, Any] = status["limits"]
    return limits


def test_the_demo_finishes_on_the_backup_when_the_primary_fails_mid_run(
    driver_env: dict[str, str],
    servers: tuple[OpenAIServer, AnthropicServer],
    tmp_path: Path,
) -> None:
    primary, backup = servers
    namespace = f"t-demo-fb-{uuid.uuid4().hex[:6]}"
    cmd = [
        sys.executable,
        "-m",
        "overstory.cli",
        "demo",
        "--users",
        "4",
        "--turns",
        "4",
        "--json",
        "--namespace",
        namespace,
        "--store",
        f"sqlite:///{tmp_path}/demo.db",
        "--model",
        f"openai:primary@{primary.base_url}",
        "--model",
        f"anthropic:backup@{backup.base_url}",
    ]
    proc = subprocess.Popen(
        cmd, env=driver_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        # Mid-run: once the primary has answered a few turns, it starts failing.
        wait_for_condition(lambda: len(primary.requests) >= 4, timeout=120, retry_interval_ms=20)
        primary.fail_always(Fault.overloaded())
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_namespace(namespace)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["turns_completed"] == summary["turns_requested"] == 16
    assert summary["errors"] == 0
    assert summary["lost_messages"] == 0
    assert len(backup.requests) > 0
    served = {r.body["model"] for r in backup.requests}
    assert served == {"backup"}


def test_status_shows_the_chain_and_health_fails_only_when_no_model_can_answer(
    rt: Runtime, servers: tuple[OpenAIServer, AnthropicServer], chain: tuple[Endpoint, Endpoint]
) -> None:
    # Last in this module: it leaves both circuits of the chain open.
    from overstory.runtime import ops

    probe = ops.Probe(rt.config.namespace)
    conv = rt.conversation(f"health-{uuid.uuid4().hex[:6]}")
    conv.send("warm both endpoints up")
    report = ops.status(probe)["providers"]
    assert [row["model"] for row in report["chain"]] == [chain[0].name, chain[1].name]
    assert report["chain"][0]["state"] == "closed"
    assert report["chain"][0]["headroom"]["in_flight"] == 0
    assert ops.health(probe) == []

    primary, backup = servers
    primary.fail_always(Fault.unauthorized())  # auth: the primary's circuit opens at once
    backup.fail_always(Fault.server_error())  # 5 counted failures open the backup's
    for _ in range(5):
        with pytest.raises(
            overstory.TurnFailed, match=r"\[auth\].*\[server_error\]|\[circuit_open\]"
        ):
            conv.send("anyone there?")
    states = [row["state"] for row in ops.status(probe)["providers"]["chain"]]
    assert states == ["open", "open"]
    (problem,) = ops.health(probe)
    assert problem.startswith("no model of the chain can answer")
    assert "auth" in problem


def test_a_bedrock_agent_answers_and_streams_through_its_provider_actor(
    ray_cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Bedrock endpoint on a real tree: credentials and region from the standard AWS
    variables (read on the client), the turn through the provider actor, tools, a stream;
    every request signed for bedrock in that region, the secret nowhere in the actors'
    statuses."""
    from overstory.testing import BedrockServer

    key_id, secret, region = "AKIARAYTESTBEDROCK01", "ray/Secret+Access0123456789abcd", "us-west-2"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_REGION", region)
    namespace = f"t-bedrock-{uuid.uuid4().hex[:8]}"
    with BedrockServer() as server:
        model = f"bedrock:anthropic.claude-sonnet-4-5-v1:0@{server.base_url}"
        agent = Agent("bedrock-agent", model=model, tools=[add])
        runtime = overstory.connect(
            agent, store=f"sqlite:///{tmp_path}/history.db", namespace=namespace
        )
        try:
            conv = runtime.conversation("bedrock-user")
            assert conv.send("what is 20 + 22?").text == "tool results: 42"
            deltas = [e.text for e in conv.stream("hello over the stream") if e.type == "delta"]
            assert "".join(deltas) == "echo: hello over the stream"
            assert [m.kind for m in conv.history()] == [
                "user",
                "assistant",
                "tool",
                "assistant",
                "user",
                "assistant",
            ]
            paths = [r.path for r in server.requests]
            assert paths == [
                "/model/anthropic.claude-sonnet-4-5-v1:0/invoke",
                "/model/anthropic.claude-sonnet-4-5-v1:0/invoke",
                "/model/anthropic.claude-sonnet-4-5-v1:0/invoke-with-response-stream",
            ]
            for recorded in server.requests:
                authorization = recorded.headers["authorization"]
                assert authorization.startswith(f"AWS4-HMAC-SHA256 Credential={key_id}/")
                assert f"/{region}/bedrock/aws4_request" in authorization
            statuses = json.dumps(provider_statuses(namespace))
            assert "provider:bedrock:" in statuses
            assert secret not in statuses
        finally:
            runtime.close()
            kill_namespace(namespace)


def test_a_host_killed_holding_the_endpoints_only_slot_frees_it_within_the_lease_ttl(
    ray_cluster: str, tmp_path: Path, servers: tuple[OpenAIServer, AnthropicServer]
) -> None:
    """The host reads the vendor's stream itself under a lease on the endpoint's one slot
    (``max_in_flight=1``). A stream longer than the lease's TTL keeps its slot (the host
    renews it); a host SIGKILLed mid-stream frees it within the TTL, so the turn Ray
    restarts on the new host process gets the slot and finishes, instead of waiting out
    its queue (``max_wait_s``) behind a dead caller's lease."""
    primary, _ = servers
    endpoint = Endpoint(
        "openai",
        "lease-model",
        primary.base_url,
        key=Secret(OPERATOR_KEY),
        retry=RetryPolicy(attempts=1),
        limits=Limits(max_in_flight=1, max_wait_s=60, lease_ttl_s=1.0),
    )
    namespace = f"t-lease-{uuid.uuid4().hex[:8]}"
    agent = Agent("lease-agent", model=[endpoint])
    runtime = overstory.connect(
        agent, store=f"sqlite:///{tmp_path}/history.db", namespace=namespace
    )
    text = "a long answer that keeps on coming " * 3  # ~30 pieces of 4 characters
    try:
        # A stream of ~2 s, twice the TTL: renewed, never taken for lost.
        primary.stream_interval_s = 0.07
        conv = runtime.conversation("holder")
        events = list(conv.stream(text))
        assert events[-1].type == "completed"
        status = _settled(runtime, endpoint)
        assert status["leases_expired"] == 0
        assert status["leases"] == 0
        assert status["limits"]["in_flight"] == 0

        # SIGKILL the host mid-stream: its lease holds the only slot until it lapses.
        pid = conv.info()["pid"]
        primary.stream_interval_s = 0.3
        events, killed_at = [], 0.0
        for event in conv.stream(text):
            events.append(event)
            if event.type == "delta" and not killed_at:
                assert _status(runtime, endpoint)["leases"] == 1
                os.kill(pid, signal.SIGKILL)
                killed_at = time.monotonic()
                primary.stream_interval_s = 0.0
        types = [e.type for e in events]
        assert "restarted" in types
        assert types[-1] == "completed"
        after = events[types.index("restarted") :]
        assert "".join(e.text for e in after if e.type == "delta") == "echo: " + text
        status = _settled(runtime, endpoint)
        assert status["leases_expired"] == 1  # the dead host's lease, and only it
        assert status["leases"] == 0
        assert status["limits"]["in_flight"] == 0
        assert conv.info()["pid"] != pid
        stored = runtime.stored_history("holder")
        assert [m.kind for m in stored] == ["user", "assistant"] * 2  # each turn once
    finally:
        primary.stream_interval_s = 0.0
        kill_namespace(namespace)
