"""Apps on the session's Ray: serving a module by path, agents by name, versions.

``overstory serve MODULE:ATTR`` runs in a subprocess against the session's Ray with the
module in a temporary ``--working-dir``: the test process never imports it, so a reply
that shows the module's tool output proves the hosts imported the deployed code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from conftest import kill_namespace

import overstory
from overstory import Agent, App, ConfigError, Runtime, UnknownAgent
from overstory.providers import OfflineModel, Rule
from overstory.rollout import write_deployment
from overstory.runtime import ops
from overstory.store import run_on_store

pytestmark = pytest.mark.ray

CLI = [sys.executable, "-m", "overstory.cli"]

APP = '''
import overstory
from overstory.providers import OfflineModel, Rule
from overstory.rollout import write_deployment
from overstory.runtime import ops
from overstory.store import run_on_store

FEE = {fee}

def refund(amount: float) -> str:
    """The refund for an amount, less the fee."""
    return f"refund {{amount * (1 - FEE):.2f}} (fee {{FEE}})"

def greeting() -> str:
    """A greeting."""
    return "hello from support"

billing = overstory.Agent(
    "billing",
    model=OfflineModel("billing", rules=(Rule(r"refund of (?P<amount>\\d+)", "refund"),)),
    tools=[refund],
    placement="{placement}",
)
support = overstory.Agent(
    "support", model=OfflineModel("support", rules=(Rule(r"greet", "greeting"),)),
    tools=[greeting],
    placement="{placement}",
)
app = [support, billing]
'''


def _write_app(where: Path, module: str, fee: float, placement: str = "hosted") -> None:
    (where / f"{module}.py").write_text(textwrap.dedent(APP.format(fee=fee, placement=placement)))


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=300)


@contextlib.contextmanager
def _deploy(ray_cluster: str, where: Path) -> Iterator[dict[str, Any]]:
    """Serve a fresh app module from ``where`` in a namespace of its own (a CLI run of
    ~10 s); the namespace is killed after."""
    module = f"app_{uuid.uuid4().hex[:8]}"
    namespace = f"t-{uuid.uuid4().hex[:12]}"
    sqlite_url = f"sqlite:///{where}/history.db"
    driver_env = {**os.environ, "RAY_ADDRESS": ray_cluster, "RAY_AUTH_MODE": "disabled"}
    _write_app(where, module, 0.1)
    common = ["--namespace", namespace, "--store", sqlite_url]
    serve = _cli(
        ["serve", f"{module}:app", "--working-dir", str(where), "--json", *common], driver_env
    )
    assert serve.returncode == 0, serve.stderr
    try:
        yield {
            "module": module,
            "dir": where,
            "common": common,
            "env": driver_env,
            "served": json.loads(serve.stdout.strip().splitlines()[-1]),
            "namespace": namespace,
            "store": sqlite_url,
        }
    finally:
        kill_namespace(namespace)


@pytest.fixture
def deployed(ray_cluster: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A served app of the test's own (it may serve it again)."""
    with _deploy(ray_cluster, tmp_path) as served:
        yield served


@pytest.fixture(scope="module")
def deployed_once(
    ray_cluster: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """One served app the module's tests share: they must leave it as it was served."""
    with _deploy(ray_cluster, tmp_path_factory.mktemp("deployed")) as served:
        yield served


def test_serve_a_module_by_path_then_talk_to_its_agents_by_name(deployed: dict[str, Any]) -> None:
    served = deployed["served"]
    assert served["app"]["agents"] == {"support": ["1"], "billing": ["1"]}
    assert served["source"] == f"{deployed['module']}:app"
    assert served["working_dir"].startswith("gcs://")
    assert deployed["module"] not in sys.modules  # this process never imported it

    rt = overstory.connect(namespace=deployed["namespace"], store=deployed["store"])
    try:
        billing = rt.conversation("alice", agent="billing")
        reply = billing.send("a refund of 20 please")
        assert "refund 18.00 (fee 0.1)" in reply.text  # the deployed tool ran, in a host
        assert (reply.agent, reply.agent_version) == ("billing", "1")
        default = rt.conversation("alice").send("greet me")
        assert default.agent == "support"  # the app's first agent
        assert "hello from support" in default.text
        # two agents, two histories
        billing_history = rt.stored_history("alice", agent="billing")
        support_history = rt.stored_history("alice", agent="support")
        assert [m.content for m in billing_history if m.kind == "user"] == ["a refund of 20 please"]
        assert [m.content for m in support_history if m.kind == "user"] == ["greet me"]
        with pytest.raises(UnknownAgent, match="served agents: 'support', 'billing'"):
            rt.conversation("alice", agent="sales")
        # a client cannot replace the deployed agents
        with pytest.raises(ConfigError, match="cannot replace"):
            overstory.connect(
                Agent("billing"), namespace=deployed["namespace"], store=deployed["store"]
            )
        # Serving again with new code replaces the agents; no conversation is lost.
        _write_app(deployed["dir"], deployed["module"], 0.5)
        again = _cli(
            [
                "serve",
                f"{deployed['module']}:app",
                "--working-dir",
                str(deployed["dir"]),
                *deployed["common"],
            ],
            deployed["env"],
        )
        assert again.returncode == 0, again.stderr
        assert "hosts replaced" in again.stdout
        second = billing.send("a refund of 20 again")
        assert "refund 10.00 (fee 0.5)" in second.text  # the new code
        users = [m.content for m in billing.history() if m.kind == "user"]
        assert users == ["a refund of 20 please", "a refund of 20 again"]
        # A host that dies for good after that is started by its supervisor with the
        # new working dir too, not the spec it first had.
        host = ray.get_actor(billing.actor_name, namespace=deployed["namespace"])
        ray.kill(host, no_restart=True)
        third = billing.send("a refund of 40 after a crash")
        assert "refund 20.00 (fee 0.5)" in third.text
    finally:
        rt.close()


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("app_nosuchmodule:app", "does not import (ModuleNotFoundError"),
        ("{module}:nothing", "has no attribute 'nothing'"),
        ("{module}:FEE", "expected an overstory.App, an overstory.Agent or a list"),
        ("not a path", "must look like 'package.module:attribute'"),
    ],
)
def test_a_bad_app_path_exits_2_naming_it_and_changes_nothing(
    deployed_once: dict[str, Any], path: str, reason: str
) -> None:
    deployed = deployed_once
    path = path.format(module=deployed["module"])
    bad = _cli(
        ["serve", path, "--working-dir", str(deployed["dir"]), *deployed["common"]],
        deployed["env"],
    )
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert repr(path) in bad.stderr
    assert reason in bad.stderr
    rt = overstory.connect(namespace=deployed["namespace"], store=deployed["store"])
    try:
        served = rt.served()
        assert served["source"] == f"{deployed['module']}:app"
        assert served["deployment"] == 1  # not re-recorded
        assert "refund 18.00" in rt.conversation("bob", agent="billing").send("refund of 20").text
    finally:
        rt.close()


def test_a_module_that_imports_here_but_not_on_the_nodes_exits_2(
    deployed_once: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """On PYTHONPATH of the command only (no --working-dir): the nodes cannot import it."""
    deployed = deployed_once
    elsewhere = tmp_path_factory.mktemp("local-only")
    module = f"app_{uuid.uuid4().hex[:8]}"
    _write_app(elsewhere, module, 0.3)
    env = {**deployed["env"], "PYTHONPATH": str(elsewhere)}
    bad = _cli(["serve", f"{module}:app", *deployed["common"]], env)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "on node" in bad.stderr
    assert "does not import" in bad.stderr
    # The node's own traceback of the import crossed Ray in the message (not dropped).
    assert "Caused by:\nTraceback (most recent call last):" in bad.stderr
    assert f"ModuleNotFoundError: No module named '{module}'" in bad.stderr


def test_a_deployed_dedicated_app_and_a_tree_booted_again_from_its_record(
    ray_cluster: str, namespace: str, sqlite_url: str, tmp_path: Path, driver_env: dict[str, str]
) -> None:
    """Dedicated actors import the deployed module (with the working dir) too, and a
    client with no agent boots a gone tree again from the store's deployment record."""
    module = f"app_{uuid.uuid4().hex[:8]}"
    _write_app(tmp_path, module, 0.25, placement="dedicated")
    common = ["--namespace", namespace, "--store", sqlite_url]
    serve = _cli(["serve", f"{module}:app", "--working-dir", str(tmp_path), *common], driver_env)
    assert serve.returncode == 0, serve.stderr
    try:
        rt = overstory.connect(namespace=namespace, store=sqlite_url)
        try:
            conv = rt.conversation("dora", agent="billing")
            assert "refund 15.00 (fee 0.25)" in conv.send("refund of 20").text
            assert conv.info()["placement"] == "dedicated"
            assert conv.actor_name.startswith("conversation:billing:dora:")
            assert rt.served()["placement"] == "dedicated"
        finally:
            rt.close()
        kill_namespace(namespace)  # the whole tree is gone; the store keeps the record
        again = overstory.connect(namespace=namespace, store=sqlite_url)
        try:
            assert again.served()["source"] == f"{module}:app"
            reply = again.conversation("dora", agent="billing").send("refund of 40")
            assert "refund 30.00 (fee 0.25)" in reply.text
            stored = again.stored_history("dora", agent="billing")
            assert [m.content for m in stored if m.kind == "user"] == [
                "refund of 20",
                "refund of 40",
            ]
        finally:
            again.close()
    finally:
        kill_namespace(namespace)


def test_health_names_an_app_the_hosts_cannot_import(
    ray_cluster: str, namespace: str, sqlite_url: str
) -> None:
    """A record naming a module the hosts cannot import (written behind serve's back,
    as a node without the app would see it): health says so, naming the module."""
    rt = overstory.connect(Agent("a"), namespace=namespace, store=sqlite_url)
    try:
        rt.conversation("u").send("hi")
        assert ops.health(ops.Probe(namespace)) == []
        run_on_store(
            sqlite_url,
            lambda s: write_deployment(s, namespace, "gone_module_xyz:app", rt.app, None),
        )
        rt.registry.redeploy()  # fresh hosts read the record
        found = ops.health(ops.Probe(namespace))
        assert any(
            "the app cannot be served" in p and "module 'gone_module_xyz' does not import" in p
            for p in found
        ), found
    finally:
        rt.close()
        kill_namespace(namespace)


# --- versions ------------------------------------------------------------------------------


def _versioned(**kw: Any) -> App:
    def agent(version: str) -> Agent:
        return Agent("helper", version=version, model=OfflineModel(f"v{version}"), **kw)

    return App([agent("1"), agent("2")])


@pytest.fixture
def versioned(ray_cluster: str, namespace: str, sqlite_url: str) -> Iterator[Runtime]:
    rt = overstory.connect(
        _versioned(), namespace=namespace, store=sqlite_url, hosted={"hosts_per_node": 2}
    )
    try:
        yield rt
    finally:
        rt.close()
        kill_namespace(namespace)


def _versions(rt: Runtime, users: list[str], tag: str) -> dict[str, str]:
    async def go() -> dict[str, str]:
        async def one(user: str) -> tuple[str, str]:
            conv = await rt.conversation_async(user)
            reply = await conv.send_async(f"{tag} from {user}")
            return user, reply.agent_version

        return dict(await asyncio.gather(*(one(u) for u in users)))

    return asyncio.run(go())


def test_a_rollout_splits_new_conversations_and_they_stay_on_their_version(
    versioned: Runtime, namespace: str, sqlite_url: str
) -> None:
    rt = versioned
    old = _versions(rt, ["old-0", "old-1"], "before")
    assert set(old.values()) == {"1"}
    split = rt.rollouts.start("helper", "2", 30)
    assert split["canary"] == "2"
    assert split["new_conversations_percent"] == {"1": 70.0, "2": 30.0}
    assert rt.rollouts.start("helper", "2", 30) == split  # idempotent
    users = [f"new-{i}" for i in range(240)]
    first = _versions(rt, users, "first")
    share = 100 * sum(1 for v in first.values() if v == "2") / len(users)
    assert 20 <= share <= 40, share  # within 10 points of 30 %
    assert set(_versions(rt, ["old-0", "old-1"], "during").values()) == {"1"}

    sample = users[:60]
    # Sticky across passivation ...
    for user in sample:
        rt.stop_conversation(user)
    assert _versions(rt, sample, "after passivation") == {u: first[u] for u in sample}
    # ... across a host restart (SIGKILL; Ray restarts it in place) ...
    host = ray.get_actor(rt.registry.hosts.table.hosts[0], namespace=namespace)
    ray.kill(host, no_restart=False)
    assert _versions(rt, sample, "after a host crash") == {u: first[u] for u in sample}
    # ... and across a change of percentage: the rollout's conversations keep theirs.
    rt.rollouts.start("helper", "2", 90)
    assert _versions(rt, sample, "after 90 %") == {u: first[u] for u in sample}

    # A whole new tree on the same store keeps the split and every pin.
    rt.close()
    kill_namespace(namespace)
    again = overstory.connect(_versioned(), namespace=namespace, store=sqlite_url)
    try:
        assert again.rollouts.split("helper")["percent"] == 90.0
        assert _versions(again, sample, "new tree") == {u: first[u] for u in sample}
        # promote: everyone on 2 from the next turn; rollback: everyone back on 1
        promoted = again.rollouts.promote("helper", "2")
        assert (promoted["live"], promoted["previous"], promoted["canary"]) == ("2", "1", None)
        everyone = [*sample, "old-0", "old-1"]
        assert set(_versions(again, everyone, "promoted").values()) == {"2"}
        assert again.rollouts.promote("helper", "2") == promoted  # idempotent
        rolled = again.rollouts.rollback("helper")
        assert rolled["live"] == "1"
        assert set(_versions(again, everyone, "rolled back").values()) == {"1"}
        assert again.rollouts.rollback("helper") == rolled  # idempotent
    finally:
        again.close()


def test_rollout_commands_print_the_split_and_status_shows_it(
    versioned: Runtime, namespace: str, sqlite_url: str, driver_env: dict[str, str]
) -> None:
    versioned.conversation("alice").send("hi")
    common = ["--namespace", namespace, "--json"]
    out = _cli(["rollout", "helper", "2", "--percent", "25", *common], driver_env)
    assert out.returncode == 0, out.stderr
    split = json.loads(out.stdout)
    assert split["new_conversations_percent"] == {"1": 75.0, "2": 25.0}
    again = _cli(["rollout", "helper", "2", "--percent", "25", *common], driver_env)
    assert json.loads(again.stdout) == split  # idempotent
    promoted = _cli(["promote", "helper", "2", *common], driver_env)
    assert json.loads(promoted.stdout)["live"] == "2"
    assert versioned.conversation("alice").send("hi again").agent_version == "2"
    bad = _cli(["rollout", "helper", "7", "--percent", "5", *common], driver_env)
    assert bad.returncode == 2
    assert "has no version '7'" in bad.stderr
    unknown = _cli(["promote", "nobody", "1", *common], driver_env)
    assert unknown.returncode == 2
    assert "served agents: 'helper'" in unknown.stderr
    status = _cli(["status", "--namespace", namespace, "--json"], driver_env)
    assert status.returncode == 0, status.stderr
    apps = json.loads(status.stdout)["apps"]
    assert apps["agents"][0]["name"] == "helper"
    assert apps["agents"][0]["versions"] == ["1", "2"]
    assert apps["agents"][0]["split"]["live"] == "2"
    text = _cli(["rollback", "helper", "--namespace", namespace], driver_env)
    assert text.returncode == 0, text.stderr
    assert "agent helper: live 1" in text.stdout


def test_a_dedicated_app_serves_agents_by_name_and_version(
    ray_cluster: str, namespace: str, sqlite_url: str
) -> None:
    rule = (Rule(r"add (?P<a>\d+) (?P<b>\d+)", "add"),)

    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    app = App(
        [
            Agent(
                "calc", model=OfflineModel("calc", rules=rule), tools=[add], placement="dedicated"
            ),
            Agent("echo", placement="dedicated"),
        ]
    )
    rt = overstory.connect(app, namespace=namespace, store=sqlite_url)
    try:
        calc = rt.conversation("u", agent="calc").send("add 2 3")
        assert "5" in calc.text
        assert (calc.agent, calc.agent_version) == ("calc", "1")
        assert rt.conversation("u", agent="echo").send("hi").agent == "echo"
        assert rt.conversation("u", agent="calc").info()["agent"] == "calc"
        with pytest.raises(UnknownAgent, match="'calc', 'echo'"):
            rt.conversation("u", agent="nope")
        assert rt.served()["placement"] == "dedicated"
    finally:
        rt.close()
        kill_namespace(namespace)
