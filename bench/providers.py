"""Provider pool benchmark (P6), measured in one run on this machine.

P6a  added latency of a fall-through when the primary's circuit is open: a chain
     [primary (circuit open), backup] vs. the backup alone, both through provider
     actors to a loopback OpenAI-format server, called from a Ray actor (as a
     conversation would). Target: added <= 5 ms (median).
P6b  limiter accuracy: an RPM limit L, 4 caller actors sending as fast as they are let
     through for one minute; requests the vendor server received in that minute vs. L.
     Target: within +-2 %.

Run: .venv/bin/python bench/providers.py [--rounds 200] [--rpm 120] [--minute 60]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray

from overstory.messages import UserMessage
from overstory.providers import (
    BreakerPolicy,
    Endpoint,
    FallbackModel,
    Limits,
    ModelRequest,
    RemoteModel,
    RetryPolicy,
    Secret,
)
from overstory.providers.pool import provider_actor_name, provider_namespace, provider_statuses
from overstory.testing import Fault, OpenAIServer

MSGS = [UserMessage(content="ping", seq=0)]


@ray.remote(num_cpus=0)
class Caller:
    """A process of its own calling models, like a conversation actor."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace

    async def timed(self, model: object, rounds: int, forget_hint: bool = False) -> list[float]:
        samples = []
        with provider_namespace(self.namespace):
            for _ in range(rounds):
                if forget_hint:  # ask the provider actor every time (a first contact)
                    for m in getattr(model, "models", ()):
                        m._open_until = 0.0
                start = time.perf_counter()
                await model.call(ModelRequest("", MSGS))  # type: ignore[attr-defined]
                samples.append(time.perf_counter() - start)
        return samples

    async def flood(self, model: object, until: float, concurrency: int) -> int:
        """Keep ``concurrency`` requests going until wall time ``until``; count answers."""
        done = 0

        async def worker() -> None:
            nonlocal done
            with provider_namespace(self.namespace):
                while time.time() < until:
                    try:
                        await model.call(ModelRequest("", MSGS))  # type: ignore[attr-defined]
                        done += 1
                    except Exception:
                        pass

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done


def p6a(server: OpenAIServer, failing: OpenAIServer, namespace: str, rounds: int) -> None:
    key = Secret("sk-bench-000000000001")
    primary = Endpoint(
        "openai",
        "primary",
        failing.base_url,
        key=key,
        retry=RetryPolicy(attempts=1),
        breaker=BreakerPolicy(failures=1, cooldown_s=3600),
    )
    backup = Endpoint("openai", "backup", server.base_url, key=key)
    chain = FallbackModel(RemoteModel(primary), RemoteModel(backup))
    alone = RemoteModel(backup)
    failing.fail_always(Fault.server_error())
    caller = Caller.remote(namespace)  # type: ignore[attr-defined]
    ray.get(caller.timed.remote(chain, 3))  # opens the primary's circuit, warms both
    ray.get(caller.timed.remote(alone, 3))
    seen = len(failing.requests)
    chained: list[float] = []
    asking: list[float] = []
    direct: list[float] = []
    for _ in range(max(1, rounds // 20)):  # interleaved, so drift hits both alike
        chained += ray.get(caller.timed.remote(chain, 20))
        asking += ray.get(caller.timed.remote(chain, 20, True))
        direct += ray.get(caller.timed.remote(alone, 20))
    assert len(failing.requests) == seen, "an open circuit must send nothing"
    c, a, d = (statistics.median(x) * 1000 for x in (chained, asking, direct))
    print(
        f"P6a fall-through past an open circuit (target added <= 5 ms), backup alone {d:.2f} ms "
        f"p50: chain {c:.2f} ms -> added {c - d:.2f} ms (caller knows the circuit is open); "
        f"asking the primary's actor each time {a:.2f} ms -> added {a - d:.2f} ms; "
        f"{len(chained)} calls each"
    )


def p6b(server: OpenAIServer, namespace: str, rpm: int, minute: float) -> None:
    limited = Endpoint(
        "openai",
        "limited",
        server.base_url,
        key=Secret("sk-bench-000000000002"),
        limits=Limits(rpm=rpm, window_s=minute, max_wait_s=minute),
    )
    model = RemoteModel(limited)
    callers = [Caller.remote(namespace) for _ in range(4)]  # type: ignore[attr-defined]
    # Warm up (provider actor, SDK client, connections), then let the window empty, so
    # that server arrival times trail admissions by about the same few ms for every call.
    ray.get([c.timed.remote(model, 1) for c in callers])
    while _rpm_used(namespace, limited) > 0:
        time.sleep(1)
    server.reset()
    start = time.time()
    # Two minutes of demand: the first minute fills the window, the second must refill
    # it exactly as the first minute's requests leave it.
    answered = sum(ray.get([c.flood.remote(model, start + 2 * minute, 8) for c in callers]))
    arrivals = sorted(r.at for r in server.requests)
    # The busiest window of `minute` seconds anywhere in the run (a sliding check).
    busiest = max(sum(1 for u in arrivals[i:] if u < t + minute) for i, t in enumerate(arrivals))
    first = sum(1 for t in arrivals if t < start + minute)
    print(
        f"P6b RPM limit L={rpm}, window {minute:g} s, 4 caller actors x 8 concurrent for "
        f"{2 * minute:g} s: first minute received {first} ({first / rpm:.3f} x L), busiest "
        f"window anywhere {busiest} ({busiest / rpm:.3f} x L), {answered} answered in all "
        f"(target within 1.00 +- 0.02 x L)"
    )


def _rpm_used(namespace: str, endpoint: Endpoint) -> int:
    name = provider_actor_name(endpoint)
    (status,) = [s for s in provider_statuses(namespace) if s["actor"] == name]
    return int(status["limits"]["rpm_used"])


def _p(samples: list[float], q: float) -> float:
    return sorted(samples)[int(q * (len(samples) - 1))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--rpm", type=int, default=120)
    parser.add_argument("--minute", type=float, default=60.0)
    args = parser.parse_args()
    ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    namespace = f"bench-p6-{uuid.uuid4().hex[:6]}"
    try:
        with OpenAIServer() as server, OpenAIServer() as failing:
            p6a(server, failing, namespace, args.rounds)
            p6b(server, namespace, args.rpm, args.minute)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
