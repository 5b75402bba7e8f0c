"""Observability on the session's Ray: one trace per send across the Ray boundary,
exported over OTLP/HTTP from the driver, the conversation actor and the provider actor
to a loopback receiver that decodes the protobuf; metrics scraped from the node's
metrics port."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from conftest import kill_namespace
from otlp_receiver import OtlpReceiver, Span
from ray._private.test_utils import wait_for_condition

from overstory.testing import OpenAIServer

pytestmark = pytest.mark.ray

DRIVER = """
import json, sys
import overstory
from overstory import Agent
from overstory.providers import Endpoint, OfflineModel, Secret
from overstory.cli.demo import add

base_url, store, namespace = sys.argv[1:4]
agent = Agent(
    "traced",
    model=[
        OfflineModel("primary", fail_first=1),
        Endpoint("openai", "backup-model", base_url, key=Secret("sk-trace-000000000001")),
    ],
    tools=[add],
)
rt = overstory.connect(agent, store=store, namespace=namespace, telemetry=True)
reply = rt.conversation("traced-user").send("what is 2 + 3?")
rt.close()
print(json.dumps({"text": reply.text}))
"""


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


def test_one_trace_per_send_reaches_a_real_otlp_receiver_from_every_process(
    driver_env: dict[str, str], receiver: OtlpReceiver, tmp_path: Path
) -> None:
    namespace = f"t-otlp-{uuid.uuid4().hex[:6]}"
    env = {
        **driver_env,
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": "otlp-test",
    }
    with OpenAIServer() as server:
        try:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    textwrap.dedent(DRIVER),
                    server.base_url,
                    f"sqlite:///{tmp_path}/h.db",
                    namespace,
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert '"add returned 5"' in proc.stdout  # the primary answers round 2

            wanted = [
                "overstory.send",
                "invoke_agent traced",
                "chat primary",
                "chat backup-model",
                "execute_tool add",
            ]

            def complete(spans: list[Span]) -> bool:
                names = [s.name for s in spans]
                return all(n in names for n in wanted) and names.count("chat primary") == 2

            spans = receiver.wait_for(complete, timeout_s=60)
        finally:
            kill_namespace(namespace)

    by_name: dict[str, list[Span]] = {}
    for s in spans:
        by_name.setdefault(s.name, []).append(s)
    (send,) = by_name["overstory.send"]
    (agent,) = by_name["invoke_agent traced"]
    (backup,) = by_name["chat backup-model"]
    (tool,) = by_name["execute_tool add"]
    failed, final = sorted(by_name["chat primary"], key=lambda s: "error.type" not in s.attributes)
    # One trace: the client's span is the parent of the actor's, across the Ray boundary,
    # and the provider actor's chat span is a child of the turn.
    assert {s.trace_id for s in (send, agent, backup, tool, failed, final)} == {send.trace_id}
    assert send.parent_span_id == ""
    assert agent.parent_span_id == send.span_id
    for child in (backup, tool, failed, final):
        assert child.parent_span_id == agent.span_id
    assert send.kind == "CLIENT"
    assert agent.kind == "INTERNAL"
    assert backup.kind == "CLIENT"
    assert backup.attributes["gen_ai.provider.name"] == "openai"
    assert backup.attributes["server.address"] == "127.0.0.1"
    assert backup.attributes["gen_ai.response.model"] == "backup-model"
    assert backup.attributes["gen_ai.usage.input_tokens"] > 0
    assert failed.attributes["error.type"] == "server_error"
    fallbacks = [e for e in agent.events if e.name == "overstory.fallback"]
    assert len(fallbacks) == 1
    assert agent.attributes["gen_ai.conversation.id"] == "traced:traced-user"  # agent:user
    assert agent.attributes["gen_ai.usage.output_tokens"] > 0
    # Every process exported under the configured service name.
    assert {s.service_name for s in spans} == {"otlp-test"}


def test_metrics_reach_the_nodes_metrics_port(ray_cluster: str, tmp_path: Path) -> None:
    import overstory
    from overstory.cli.demo import demo_agent

    namespace = f"t-metrics-{uuid.uuid4().hex[:6]}"
    rt = overstory.connect(demo_agent(), store=f"sqlite:///{tmp_path}/m.db", namespace=namespace)
    try:
        conv = rt.conversation("metered")
        conv.send("what is 1 + 2?")
        conv.send("!fail on purpose")  # a failed turn, with its own outcome
    except overstory.TurnFailed:
        pass
    assert rt.stop_conversation("metered")  # a passivation
    try:
        node = next(n for n in ray.nodes() if n["Alive"])  # type: ignore[no-untyped-call]
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        wanted = (
            "ray_overstory_turns_total",
            "ray_overstory_turn_latency_seconds",
            "ray_overstory_tool_calls_total",
            "ray_overstory_tokens_total",
            "ray_overstory_live_conversations",
            "ray_overstory_model_calls_total",
            "ray_overstory_model_call_seconds",
            "ray_overstory_passivations_total",
        )
        # The node's port also shows what earlier tests in this Ray recorded: wait for
        # this test's own samples, not only for the names.
        ours = (
            'agent="demo-assistant"',
            'outcome="ok"',
            'tool="add"',
            'host="overstory:host:',  # live conversations, per host
            'outcome="server_error"',  # the scripted failure, by its kind
        )
        text = ""

        def scraped() -> bool:
            nonlocal text
            with urllib.request.urlopen(url, timeout=5) as page:
                text = page.read().decode()
            samples = [line for line in text.splitlines() if not line.startswith("#")]
            named = all(any(line.startswith(name) for line in samples) for name in wanted)
            return named and all(label in text for label in ours)

        with contextlib.suppress(RuntimeError):  # timed out: the asserts below say what
            wait_for_condition(scraped, timeout=60, retry_interval_ms=1000)
        for name in wanted:
            assert name in text, name
        for label in ours:
            assert label in text, label
        assert "metered" not in text  # no user ids in tags
    finally:
        rt.close()
        kill_namespace(namespace)
