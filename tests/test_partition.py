"""A network partition survived: three Ray nodes on this machine, each in a network
namespace of its own (``ip netns``, veth pairs on a bridge), one cut off mid-traffic for
longer than Ray's failure detection, then healed (root only; ``.ci/run`` runs as root).
The driver, in the head's namespace, is ``partition_check.py``."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FAST_FAILURE_DETECTION, run_check

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None,
        reason="network namespaces need root and iproute2 (.ci/run has both)",
    ),
]

NODES = {"head": "10.77.0.1", "w1": "10.77.0.2", "w2": "10.77.0.3"}
RAY = str(Path(sys.executable).with_name("ray"))


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def network() -> Iterator[Path]:
    """The bridge and the three namespaces (10.77.0.0/24); on the way out every process
    left in them is killed and they are deleted."""
    run = Path(tempfile.mkdtemp(prefix="p", dir="/tmp"))
    tag = uuid.uuid4().hex[:5]
    run = run.rename(run.with_name(tag))  # short: interface names hold 15 characters
    bridge = f"ovsbr-{tag}"
    _ip("link", "add", bridge, "type", "bridge")
    _ip("link", "set", bridge, "up")
    try:
        for node, address in NODES.items():
            ns, veth = f"ovs-{tag}-{node}", f"v{tag}{node}"
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", bridge, "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield run
    finally:
        for node in NODES:
            ns = f"ovs-{tag}-{node}"
            pids = subprocess.run(
                ["ip", "netns", "pids", ns], capture_output=True, text=True, check=False
            ).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
            subprocess.run(["ip", "link", "del", f"v{tag}{node}"], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)
        shutil.rmtree(run, ignore_errors=True)


def test_a_node_cut_off_then_healed_loses_no_turn_and_its_writes_are_fenced(
    network: Path,
) -> None:
    run = network
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(FAST_FAILURE_DETECTION, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    head = [
        "ip", "netns", "exec", f"ovs-{run.name}-head", RAY, "start", "--head",
        f"--port={port}", f"--node-ip-address={NODES['head']}", "--num-cpus=1",
        f"--temp-dir={run / 'head'}", "--include-dashboard=false", "--disable-usage-stats",
    ]  # fmt: skip
    subprocess.run(head, env=env, check=True, capture_output=True, timeout=120)
    for node in ("w1", "w2"):
        worker = [
            "ip", "netns", "exec", f"ovs-{run.name}-{node}", RAY, "start",
            f"--address={NODES['head']}:{port}", f"--node-ip-address={NODES[node]}",
            "--num-cpus=1", f"--temp-dir={run / node}", "--disable-usage-stats",
        ]  # fmt: skip
        subprocess.run(worker, env=env, check=True, capture_output=True, timeout=120)
    result = run_check(
        "partition_check.py",
        str(run),
        str(port),
        env=env,
        prefix=("ip", "netns", "exec", f"ovs-{run.name}-head"),
        timeout=500,
    )
    print(result)  # the figures the docs quote
    assert result["acknowledged"] > 100
    assert result["slow_acknowledged"] == 3  # re-sent to the new hosts, answered
    assert result["lost"] == 0
    assert result["duplicated"] == 0
    assert result["fenced_writes"] >= 1  # the cut-off host tried, and was refused
    assert result["hosts"] == 3  # the healed node rejoined and the hosts followed it
