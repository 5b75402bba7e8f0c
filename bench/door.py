"""Door benchmark: the HTTP front door under concurrency, against floors from the same run.

Every contender is reached by the official ``openai`` SDK (``AsyncOpenAI``, one client and
connection pool per user) with ``responses.create(stream=True)``; the time to first text
is from the call to the first ``response.output_text.delta``.

floor    a minimal Ray Serve FastAPI app on the same Serve proxy (route ``/floor``) that
         answers each request with the SSE bytes of one door response recorded at the
         start, written in as many chunks as that response had turn events (the
         ``started`` event, each text delta, the end): what Serve carries for a relay
         that forwards each event as it comes, with no turn, store or Ray call behind it.
door     overstory's door (hosted conversations, the offline model: no vendor at all),
         each user in a conversation of their own, ``--responses`` responses in a row.

At one stream (``--samples`` in a row) and at each ``--concurrency`` (that many users at
once, each making ``--responses`` streamed responses in a row). Printed per case: first
text p50/p99, wall time, responses/s, errors; the ratios door/floor. At the largest
concurrency also the door's CPU per response (its processes: the Serve proxy and
replica, the hosts, the provider actors, summed from /proc) and the resident memory of
the replica, the proxy and the hosts before, right after, and ``--settle`` seconds after
(``--idle-timeout`` and ``--window`` shorten how long the hosts keep idle conversations
and finished turns' events, to see the memory they held given back within the run).

``--vendor``: the same door and floor runs with the agent on a loopback OpenAI-format
server (``--server-ttft`` to its first byte, then a 4-character piece every
``--interval``), and the SDK against that server directly as the vendor's floor.
``--litellm PATH``: the LiteLLM proxy (``PATH`` is its ``litellm`` executable, installed
apart: a bench-only dependency) with one worker per core in front of the same server.

Run: .venv/bin/python bench/door.py [--concurrency 200 500] [--vendor] [--litellm PATH] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import httpx
import openai
import psutil
import ray
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from ray import serve
from streaming import free_port, pct, start_server, wait_up

import overstory
from overstory import Agent
from overstory._ray import quiet_worker_notices
from overstory.gateway.keys import create_key
from overstory.gateway.serve import serve_http
from overstory.providers import Endpoint, Secret
from overstory.store import run_on_store

TEXT = "tell me something in a few words please"
VENDOR_KEY = "sk-bench-door-vendor-000001"
LITELLM_KEY = "sk-bench-litellm-master-000001"

floor_app = FastAPI()


@serve.deployment(max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0})
@serve.ingress(floor_app)
class Floor:
    """Streams the recorded chunks for every request: Serve's own cost of a response."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    @floor_app.post("/v1/responses")
    async def respond(self) -> StreamingResponse:
        async def body() -> Any:
            for chunk in self.chunks:
                yield chunk

        return StreamingResponse(body(), media_type="text/event-stream")


def chunked(body: bytes) -> list[bytes]:
    """A door response's SSE bytes cut as one chunk per turn event: through
    ``response.in_progress`` (the turn's ``started``), through each text delta, the rest."""
    chunks: list[bytes] = []
    current = b""
    for event in (e + b"\n\n" for e in body.split(b"\n\n") if e.strip()):
        current += event
        kind = next((line for line in event.split(b"\n") if line.startswith(b"event:")), b"")
        if kind.endswith((b"response.in_progress", b"response.output_text.delta")):
            chunks.append(current)
            current = b""
    if current:
        chunks.append(current)
    return chunks


async def run_users(
    one: Callable[[str], Awaitable[float]], users: list[str], responses: int
) -> dict[str, Any]:
    """Every user at once, each making ``responses`` streamed responses in a row."""
    firsts: list[float] = []
    errors: list[str] = []

    async def user(u: str) -> None:
        for _ in range(responses):
            try:
                firsts.append(await one(u))
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {str(exc)[:120]}")

    started = time.perf_counter()
    await asyncio.gather(*(user(u) for u in users))
    wall = time.perf_counter() - started
    done = len(firsts)
    return {
        "first_p50_ms": round(pct(firsts, 0.5), 1) if firsts else None,
        "first_p99_ms": round(pct(firsts, 0.99), 1) if firsts else None,
        "wall_s": round(wall, 2),
        "responses_per_s": round(done / wall, 1),
        "responses": done,
        "errors": len(errors),
        "error_sample": errors[:3],
    }


def first_delta(client: openai.AsyncOpenAI, model: str, conversation: str | None) -> Any:
    async def one() -> float:
        started = time.perf_counter()
        first = 0.0
        extra: dict[str, Any] = {"conversation": conversation} if conversation else {}
        stream = await client.responses.create(model=model, input=TEXT, stream=True, **extra)
        async for event in stream:
            if not first and event.type == "response.output_text.delta":
                first = time.perf_counter() - started
            if event.type in ("response.failed", "response.incomplete"):
                raise RuntimeError(f"response ended {event.type}")
        if not first:
            raise RuntimeError("no text")
        return first

    return one


def door_processes() -> dict[str, list[int]]:
    """The pids of the door's processes by role (Ray names a worker process after its
    actor: ``ray::HostActor``, ``ray::ServeReplica:overstory-gateway:...``)."""
    prefixes = {
        "replica": "ray::ServeReplica:overstory-gateway",
        "proxy": "ray::ProxyActor",
        "hosts": "ray::HostActor",
        "providers": "ray::ProviderActor",
    }
    roles: dict[str, list[int]] = {role: [] for role in prefixes}
    roles["haproxy"] = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        title = " ".join(proc.info["cmdline"] or ())
        for role, prefix in prefixes.items():
            if title.startswith(prefix):
                roles[role].append(proc.info["pid"])
        if proc.info["name"] == "haproxy":
            roles["haproxy"].append(proc.info["pid"])
    return roles


def cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += psutil.Process(pid).memory_info().rss
    return round(total / 2**20, 1)


def start_litellm(path: str, vendor_url: str, workers: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = Path(tempfile.mkdtemp(prefix="bench-litellm-")) / "config.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: m\n"
        "    litellm_params:\n"
        "      model: openai/m\n"
        f"      api_base: {vendor_url}\n"
        f"      api_key: {VENDOR_KEY}\n"
        "litellm_settings:\n"
        "  drop_params: true\n"
        "general_settings:\n"
        f"  master_key: {LITELLM_KEY}\n"
    )
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}  # no network here
    proc = subprocess.Popen(
        [path, "--config", str(config), "--port", str(port), "--num_workers", str(workers)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health/liveliness", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError("the LiteLLM proxy did not come up")


def litellm_first(client: openai.AsyncOpenAI) -> Any:
    """Time to first text of one streamed chat completion (LiteLLM, or the vendor)."""

    async def one() -> float:
        started = time.perf_counter()
        first = 0.0
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": TEXT}], stream=True
        )
        async for chunk in stream:
            if not first and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - started
        if not first:
            raise RuntimeError("no text")
        return first

    return one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[200, 500])
    parser.add_argument("--responses", type=int, default=2)
    parser.add_argument("--settle", type=float, default=15.0)
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        help="conversations.idle_timeout_s (default: the runtime's, 600 s)",
    )
    parser.add_argument(
        "--window",
        type=float,
        default=None,
        help="streams.window_s (default: the runtime's, 300 s)",
    )
    parser.add_argument(
        "--batch",
        type=float,
        default=None,
        help="streams.batch_s (default: the runtime's, 0.05 s)",
    )
    parser.add_argument("--vendor", action="store_true")
    parser.add_argument("--litellm", default=None)
    parser.add_argument("--server-ttft", type=float, default=0.2)
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    quiet_worker_notices()
    vendor = lite = None
    vendor_url = ""
    if args.vendor or args.litellm:
        vendor, vendor_url = start_server(args.server_ttft, args.interval)
    tmp = tempfile.mkdtemp(prefix="bench-door-")
    report: dict[str, Any] = {"cases": [], "memory": {}, "cpu": {}}
    try:
        model: Any = (
            Endpoint("openai", "m", vendor_url, key=Secret(VENDOR_KEY))
            if args.vendor
            else "offline:echo"
        )
        agent = Agent("door-bench", model=model, placement="hosted")
        settings: dict[str, Any] = {}
        if args.idle_timeout is not None:
            settings["conversations"] = {"idle_timeout_s": args.idle_timeout}
        streams: dict[str, float] = {}
        if args.window is not None:
            streams["window_s"] = args.window
        if args.batch is not None:
            streams["batch_s"] = args.batch
        if streams:
            settings["streams"] = streams
        rt = overstory.connect(
            agent,
            store=f"sqlite:///{tmp}/history.db",
            namespace=f"bench-door-{uuid.uuid4().hex[:6]}",
            **settings,
        )
        door_url = serve_http(rt.config.namespace, rt.config.store, "127.0.0.1", free_port())
        most = max([args.samples, *args.concurrency])
        users = [f"u{i}" for i in range(most)]

        async def measure() -> None:
            await wait_up(door_url)
            keys = {
                u: run_on_store(rt.config.store, lambda s, u=u: create_key(s, u))[0] for u in users
            }
            clients = {
                u: openai.AsyncOpenAI(
                    base_url=f"{door_url}/v1", api_key=keys[u], max_retries=0, timeout=300
                )
                for u in users
            }
            made = await asyncio.gather(*(clients[u].conversations.create() for u in users))
            conversations = {u: c.id for u, c in zip(users, made, strict=True)}
            # One response recorded whole: the floor replays its bytes.
            async with httpx.AsyncClient(timeout=60) as raw:
                answer = await raw.post(
                    f"{door_url}/v1/responses",
                    headers={"authorization": f"Bearer {keys[users[0]]}"},
                    json={"model": "door-bench", "input": TEXT, "stream": True},
                )
            chunks = chunked(answer.content)
            report["floor_chunks_per_response"] = len(chunks)
            await asyncio.to_thread(
                serve.run, Floor.bind(chunks), name="floor", route_prefix="/floor", blocking=False
            )
            floors = {
                u: openai.AsyncOpenAI(
                    base_url=f"{door_url}/floor/v1", api_key="x", max_retries=0, timeout=300
                )
                for u in users
            }
            for _ in range(30):  # the floor app is up once it answers
                try:
                    await first_delta(floors[users[0]], "door-bench", None)()
                    break
                except Exception:
                    await asyncio.sleep(1)
            # Warm: every conversation active, every client connected.
            await asyncio.gather(
                *(first_delta(clients[u], "door-bench", conversations[u])() for u in users)
            )
            await asyncio.gather(*(first_delta(floors[u], "door-bench", None)() for u in users))

            def door(u: str) -> Awaitable[float]:
                return first_delta(clients[u], "door-bench", conversations[u])()  # type: ignore[no-any-return]

            def floor(u: str) -> Awaitable[float]:
                return first_delta(floors[u], "door-bench", None)()  # type: ignore[no-any-return]

            one_floor = [await floor(users[0]) for _ in range(args.samples)]
            one_door = [await door(users[0]) for _ in range(args.samples)]
            report["cases"].append(
                {
                    "case": "1 stream",
                    "floor": {"first_p50_ms": round(pct(one_floor, 0.5), 1)},
                    "door": {"first_p50_ms": round(pct(one_door, 0.5), 1)},
                    "added_p50_ms": round(pct(one_door, 0.5) - pct(one_floor, 0.5), 1),
                }
            )
            roles = door_processes()
            mine = [p for pids in roles.values() for p in pids]
            report["memory"]["idle"] = {r: rss_mb(p) for r, p in roles.items()}
            for c in args.concurrency:
                group = users[:c]
                f = await run_users(floor, group, args.responses)
                before = cpu_s(mine)
                d = await run_users(door, group, args.responses)
                used = cpu_s(mine) - before
                case: dict[str, Any] = {"case": f"{c} concurrent", "floor": f, "door": d}
                if f["first_p50_ms"] and d["first_p50_ms"]:
                    case["first_p50_ratio"] = round(d["first_p50_ms"] / f["first_p50_ms"], 2)
                case["door_cpu_ms_per_response"] = round(1000 * used / max(1, d["responses"]), 1)
                report["cases"].append(case)
            report["memory"]["after"] = {r: rss_mb(p) for r, p in roles.items()}
            await asyncio.sleep(args.settle)
            report["memory"]["settled"] = {r: rss_mb(p) for r, p in roles.items()}
            await asyncio.gather(*(c.close() for c in [*clients.values(), *floors.values()]))

        asyncio.run(measure())
        if args.vendor:

            async def direct() -> None:
                sdks = {
                    u: openai.AsyncOpenAI(
                        base_url=vendor_url, api_key=VENDOR_KEY, max_retries=0, timeout=300
                    )
                    for u in users
                }
                # Warm: every client connected, as the door's and LiteLLM's are.
                await asyncio.gather(*(litellm_first(sdks[u])() for u in users))
                for c in args.concurrency:
                    got = await run_users(
                        lambda u: litellm_first(sdks[u])(), users[:c], args.responses
                    )
                    report["cases"].append({"case": f"{c} concurrent", "sdk direct": got})
                await asyncio.gather(*(client.close() for client in sdks.values()))

            asyncio.run(direct())
        if args.litellm:
            lite, lite_url = start_litellm(args.litellm, vendor_url, os.cpu_count() or 1)

            async def against_litellm() -> None:
                lites = {
                    u: openai.AsyncOpenAI(
                        base_url=f"{lite_url}/v1", api_key=LITELLM_KEY, max_retries=0, timeout=300
                    )
                    for u in users
                }
                await asyncio.gather(*(litellm_first(lites[u])() for u in users))  # warm
                for c in args.concurrency:
                    group = users[:c]
                    got = await run_users(
                        lambda u: litellm_first(lites[u])(), group, args.responses
                    )
                    report["cases"].append({"case": f"{c} concurrent", "litellm": got})
                await asyncio.gather(*(client.close() for client in lites.values()))

            asyncio.run(against_litellm())
        serve.shutdown()
        rt.close()
    finally:
        for proc in (vendor, lite):
            if proc is not None:
                proc.terminate()
                proc.wait()
        ray.shutdown()
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"door bench ({'vendor: loopback server' if args.vendor else 'offline model'}; "
        f"{args.responses} streamed responses per user; floor: "
        f"{report['floor_chunks_per_response']} chunks/response)"
    )
    for case in report["cases"]:
        print(f"  {case['case']}:")
        for who in ("floor", "door", "sdk direct", "litellm"):
            if who in case:
                r = case[who]
                extra = (
                    f", {r['wall_s']} s wall, {r['responses_per_s']}/s, {r['errors']} errors"
                    if "wall_s" in r
                    else ""
                )
                tail = f" / p99 {r['first_p99_ms']}" if "first_p99_ms" in r else ""
                print(f"    {who:>10}: first text p50 {r['first_p50_ms']}{tail} ms{extra}")
        for key in ("added_p50_ms", "first_p50_ratio", "door_cpu_ms_per_response"):
            if key in case:
                print(f"    {key}: {case[key]}")
    for when, rows in report["memory"].items():
        print(f"  RSS {when}: " + ", ".join(f"{r} {mb} MB" for r, mb in rows.items()))


if __name__ == "__main__":
    main()
