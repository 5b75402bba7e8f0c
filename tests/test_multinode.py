"""A node hosting a conversation is removed: it answers from another node, history intact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("placement", ["hosted", "dedicated"])
def test_conversation_survives_the_loss_of_its_node(placement: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ovs-", dir="/tmp")  # its own Ray
    script = Path(__file__).with_name("multinode_check.py")
    proc = subprocess.run(
        [sys.executable, str(script), placement],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["moved"] is True
    assert result["placement"] == placement
    assert result["reply"] == "echo #2: after the node went"
    assert result["history"] == ["before the node goes", "after the node went"]
