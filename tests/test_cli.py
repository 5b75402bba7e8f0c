"""The ``overstory`` command: demo (attached and self-started), chat, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from conftest import kill_namespace

from overstory.cli.demo import user_message

pytestmark = pytest.mark.ray

CLI = [sys.executable, "-m", "overstory.cli"]


def expected_messages(users: int, turns: int) -> int:
    """user + reply, plus a tool call and its return: every demo message asks for a tool
    (arithmetic, counting, or remembering the number it mentions)."""
    total = 0
    for u in range(users):
        for t in range(turns):
            text = user_message(u, t)
            tooled = text.startswith(("what is", "how many words", "tell me something about"))
            total += 4 if tooled else 2
    return total


def test_demo_json_summary_counts_from_the_store(
    driver_env: dict[str, str], sqlite_url: str
) -> None:
    proc = subprocess.run(
        [
            *CLI,
            "demo",
            "--users",
            "5",
            "--turns",
            "3",
            "--json",
            "--store",
            sqlite_url,
            "--namespace",
            "cli-demo",
        ],
        env=driver_env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["users"] == 5
    assert summary["turns_requested"] == summary["turns_completed"] == 15
    assert summary["errors"] == 0
    assert summary["tool_calls"] > 0
    assert summary["messages_stored"] == expected_messages(5, 3)
    assert 0 < summary["p50_turn_ms"] <= summary["p99_turn_ms"]


def test_demo_exits_non_zero_when_turns_fail(driver_env: dict[str, str], sqlite_url: str) -> None:
    # a store the actors cannot open (the directory is removed after connect) fails turns
    proc = subprocess.run(
        [
            *CLI,
            "demo",
            "--users",
            "1",
            "--turns",
            "1",
            "--json",
            "--store",
            "mongodb://127.0.0.1:9/x?serverSelectionTimeoutMS=300",
        ],
        env=driver_env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 2
    assert "cannot reach MongoDB store mongodb://127.0.0.1:9/x" in proc.stderr


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--store", "ftp://x/y"], "unsupported store scheme 'ftp'"),
        (["--namespace", "bad space"], "namespace"),
        (["--config", "/nonexistent/overstory.toml"], "does not exist"),
        (["--model", "gemini:pro"], "unknown provider 'gemini'"),
        (["--model", "openai:m@ftp://x"], "must be http(s)://"),
        (["--model", "anthropic:claude-sonnet-4-5"], "set ANTHROPIC_API_KEY"),
    ],
)
def test_bad_settings_exit_2_with_the_reason(args: list[str], problem: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    proc = subprocess.run(
        [*CLI, "demo", "--users", "1", "--turns", "1", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2
    assert problem in proc.stderr


def test_config_file_with_unknown_key(tmp_path: Path) -> None:
    config = tmp_path / "o.toml"
    config.write_text('store = "sqlite:///x.db"\nworkers = 3\n')
    proc = subprocess.run(
        [*CLI, "chat", "--user", "u", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown key(s)" in proc.stderr
    assert "'workers'" in proc.stderr


def test_chat_session(driver_env: dict[str, str], sqlite_url: str) -> None:
    lines = "hello there\nwhat is 2 + 2?\n/history\n\x00bad\n/quit\n"
    proc = subprocess.run(
        [*CLI, "chat", "--user", "zoe", "--store", sqlite_url, "--namespace", "cli-chat"],
        input=lines,
        env=driver_env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "assistant> echo #1: hello there" in out
    assert "assistant> add returned 4" in out
    assert '  [add({"a": "2", "b": "2"}) -> 4]' in out  # streamed: the tool call as it ran
    assert '[3] assistant: [calls add({"a": "2", "b": "2"})]' in out
    assert "error: message contains control or invalid characters (U+0000)" in out
    # a second chat session continues the same stored conversation
    again = subprocess.run(
        [*CLI, "chat", "--user", "zoe", "--store", sqlite_url, "--namespace", "cli-chat"],
        input="and again\n",
        env=driver_env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    kill_namespace("cli-chat")
    assert "6 stored messages" in again.stdout
    assert "assistant> echo #3: and again" in again.stdout


def test_chat_with_a_model_chain_of_local_endpoints(
    driver_env: dict[str, str], sqlite_url: str
) -> None:
    from overstory.testing import AnthropicServer, Fault, OpenAIServer

    namespace = "cli-chat-model"
    with OpenAIServer() as primary, AnthropicServer() as backup:
        primary.fail_always(Fault.unauthorized())
        proc = subprocess.run(
            [
                *CLI,
                "chat",
                "--user",
                "yan",
                "--store",
                sqlite_url,
                "--namespace",
                namespace,
                "--model",
                f"openai:gpt-local@{primary.base_url}",
                "--model",
                f"anthropic:claude-local@{backup.base_url}",
            ],
            input="what is 3 + 4?\n",
            env=driver_env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        kill_namespace(namespace)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "assistant> tool results: 7" in proc.stdout
    assert len(primary.requests) == 1  # auth failure: not retried, the circuit opens
    assert [r.body["model"] for r in backup.requests] == ["claude-local", "claude-local"]


@pytest.mark.slow
def test_demo_started_ray_leaves_no_process_behind() -> None:
    # A Ray of its own, not the session's (a short path: Ray's sockets live under it).
    ray_tmp = tempfile.mkdtemp(prefix="ovs-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp
    env["RAY_AUTH_MODE"] = "disabled"
    proc = subprocess.run(
        [*CLI, "demo", "--users", "3", "--turns", "2", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "local Ray started for this demo" in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["turns_completed"] == 6

    def left() -> list[tuple[int, str]]:
        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(p.info["cmdline"] or [])
            if ray_tmp in cmdline:
                found.append((p.info["pid"], cmdline[:200]))
        return found

    # Ray's agents notice their raylet is gone by polling: allow them a few seconds.
    deadline = time.monotonic() + 30
    while left() and time.monotonic() < deadline:
        time.sleep(0.5)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert left() == []


@pytest.mark.parametrize(
    ("args", "env_app", "problem"),
    [
        (["nosuch_module_xyz:app"], None, "'nosuch_module_xyz:app': module 'nosuch_module_xyz'"),
        ([], "nosuch_module_xyz:app", "'nosuch_module_xyz:app': module 'nosuch_module_xyz'"),
        (["overstory:nothing"], None, "module 'overstory' has no attribute 'nothing'"),
        (["json:dumps"], None, "expected an overstory.App, an overstory.Agent"),
        (["x:app", "--working-dir", "/nonexistent/dir"], None, "is not a directory"),
        (["--working-dir", "/tmp"], None, "--working-dir needs an app"),
    ],
)
def test_serve_with_a_bad_app_exits_2_before_touching_any_cluster(
    args: list[str], env_app: str | None, problem: str
) -> None:
    """No cluster runs at this address: the app is checked first, so the error is the
    app's, named, and the exit code 2 (a mistake), not 1 (no cluster)."""
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}
    env.pop("OVERSTORY_APP", None)
    if env_app is not None:
        env["OVERSTORY_APP"] = env_app
    proc = subprocess.run(
        [*CLI, "serve", *args], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert problem in proc.stderr


def test_migrate_copies_histories_from_before_apps(sqlite_url: str) -> None:
    import asyncio

    from overstory.messages import UserMessage
    from overstory.store import open_store

    async def seed() -> None:
        store = open_store(sqlite_url)
        await store.open()
        await store.append("alice", UserMessage(content="from before", seq=0, turn_id="t0"))
        await store.close()

    asyncio.run(seed())
    proc = subprocess.run(
        [*CLI, "migrate", "--agent", "support", "--store", sqlite_url, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["copied"], report["messages"]) == (["alice"], 1)
    bad = subprocess.run(
        [*CLI, "migrate", "--agent", "no good", "--store", sqlite_url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert "'no good' is not an agent name" in bad.stderr
