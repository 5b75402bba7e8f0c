"""Supervision benchmark (P5), measured in one run on this machine.

P5a  crash -> serving again: SIGKILL a conversation actor's process and time until a
     send returns its reply, vs. a bare Ray actor with ``max_restarts=-1`` until a
     call returns. Target <= 1.2x.
P5b  re-activation of a passivated conversation holding 100 messages: time of the
     first send after passivation (transparent re-activation + the turn), with a bare
     named actor's creation for scale.

Run: .venv/bin/python bench/supervision.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time
import uuid
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray
from _common import median_ms, seed
from ray.exceptions import RayActorError

import overstory
from overstory.app import conversation_id


@ray.remote(max_restarts=-1, max_task_retries=0)
class BareRestartable:
    def pid(self) -> int:
        return os.getpid()


@ray.remote
class Bare:
    def pid(self) -> int:
        return os.getpid()


def call_until_served(fn: Any) -> None:
    """Call until the actor answers (a restarting actor first fails fast)."""
    while True:
        try:
            fn()
            return
        except RayActorError:
            continue


def ms(samples: list[float]) -> float:
    return round(median_ms(samples), 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="overstory-bench-")
    url = f"sqlite:///{tmp}/bench.db"
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    time.sleep(5)  # let Ray's prestarted workers settle before measuring
    ns = f"bench-{uuid.uuid4().hex[:6]}"
    rt = overstory.connect(overstory.Agent("bench"), store=url, namespace=ns)

    ours, bare = [], []
    conv = rt.conversation("p5-user")
    conv.send("hello")
    restartable = BareRestartable.remote()
    ray.get(restartable.pid.remote())
    for i in range(args.rounds):
        pid = conv.info()["pid"]
        t = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        conv.send(f"after crash {i}")
        ours.append(time.perf_counter() - t)

        pid = ray.get(restartable.pid.remote())
        t = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        call_until_served(lambda: ray.get(restartable.pid.remote()))
        bare.append(time.perf_counter() - t)
    print(
        f"P5a crash->serving: overstory p50={ms(ours)} ms, bare max_restarts actor p50={ms(bare)} ms,"
        f" ratio={ms(ours) / ms(bare):.3f} (target <= 1.2)"
    )

    react, create = [], []
    for i in range(args.rounds):
        user = f"p5b-user-{i}"
        seed(url, conversation_id("bench", user), 100)
        c = rt.conversation(user)
        c.send("first")
        assert rt.stop_conversation(user)
        t = time.perf_counter()
        c.send("after passivation")
        react.append(time.perf_counter() - t)
        t = time.perf_counter()
        b = Bare.options(name=f"bare-{i}", namespace=ns).remote()
        ray.get(b.pid.remote())
        create.append(time.perf_counter() - t)
        ray.kill(b)
        rt.stop_conversation(user)
    print(
        f"P5b re-activation (100 msgs) + turn p50={ms(react)} ms; bare named actor creation"
        f" p50={ms(create)} ms; ratio={ms(react) / ms(create):.3f}"
    )
    rt.close()
    ray.shutdown()


if __name__ == "__main__":
    main()
