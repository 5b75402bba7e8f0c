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


def test_a_conversation_survives_the_loss_of_its_node_in_either_placement() -> None:
    """One cluster for both placements (booting one takes tens of seconds): each
    placement's tree loses the node serving its conversation in turn."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ovs-", dir="/tmp")  # its own Ray
    script = Path(__file__).with_name("multinode_check.py")
    proc = subprocess.run(
        [sys.executable, str(script), "hosted", "dedicated"],
        env=env,
        capture_output=True,
        text=True,
        timeout=360,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(results) == ["dedicated", "hosted"]
    for placement, result in results.items():
        assert result["moved"] is True, placement
        assert result["placement"] == placement
        assert result["reply"] == "echo #2: after the node went", placement
        assert result["history"] == ["before the node goes", "after the node went"], placement
