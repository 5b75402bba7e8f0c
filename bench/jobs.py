"""Background jobs: what queueing a turn in the store costs against sending it (issue 15).

One tree on a local Ray (hosted, SQLite), the scripted offline model answering after
``--latency-ms``. Measured in the same run:

* **submit**: ``rt.submit`` returning (the job written to the store, the runner poked),
  p50 over ``--jobs`` submits;
* **one job's delay**: from submit to the runner storing its result (the record's
  ``finished_at - created_at``), p50 over jobs sent one at a time, against the p50 of a
  plain ``send`` of the same turn (the baseline);
* **throughput**: ``--jobs`` turns of ``--users`` users, as jobs (``jobs.concurrency``
  at once, one per user) and as sends from as many threads (the baseline): turns per
  second and the ratio.

Run: .venv/bin/python bench/jobs.py [--jobs 200] [--users 50] [--concurrency 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import overstory
from overstory import Agent, OfflineModel


def p50_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--single", type=int, default=30)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="ovs-bench-jobs-")
    agent = Agent("jobs-bench", model=OfflineModel("jobs-bench", latency_s=args.latency_ms / 1000))
    rt = overstory.connect(
        agent,
        store=f"sqlite:///{tmp}/history.db",
        namespace=f"bench-jobs-{uuid.uuid4().hex[:6]}",
        jobs={"concurrency": args.concurrency, "per_user": 1, "poll_s": 1.0},
    )
    try:
        users = [f"u{i}" for i in range(args.users)]
        for u in users:  # every conversation active: activation is not what is measured
            rt.conversation(u).send("warm up")
        rt.jobs.submit("warm", "warm up").result(timeout=120)

        # One at a time: a send, and a job from submit to its stored result.
        sends, delays, submits = [], [], []
        for i in range(args.single):
            start = time.perf_counter()
            rt.conversation(users[i % len(users)]).send(f"single send {i}")
            sends.append(time.perf_counter() - start)
            start = time.perf_counter()
            job = rt.jobs.submit(users[i % len(users)], f"single job {i}")
            submits.append(time.perf_counter() - start)
            job.wait(timeout=120)
            status = job.status()
            delays.append(status["finished_at"] - status["created_at"])

        # Throughput: the same turns as sends from `concurrency` threads, then as jobs.
        texts = [(users[i % len(users)], f"turn {i}") for i in range(args.jobs)]
        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(lambda ut: rt.conversation(ut[0]).send(ut[1]), texts))
        send_wall = time.perf_counter() - start
        start = time.perf_counter()
        jobs = []
        for user, text in texts:
            t0 = time.perf_counter()
            jobs.append(rt.jobs.submit(user, f"job {text}"))
            submits.append(time.perf_counter() - t0)
        for job in jobs:
            job.wait(timeout=600)
        job_wall = time.perf_counter() - start
        failed = [j.id for j in jobs if j.status()["state"] != "succeeded"]
    finally:
        rt.close()
    result: dict[str, Any] = {
        "latency_ms": args.latency_ms,
        "submit_p50_ms": p50_ms(submits),
        "send_p50_ms": p50_ms(sends),
        "job_delay_p50_ms": p50_ms(delays),
        "job_delay_added_ms": round(p50_ms(delays) - p50_ms(sends), 2),
        "turns": args.jobs,
        "users": args.users,
        "concurrency": args.concurrency,
        "sends_per_s": round(args.jobs / send_wall, 1),
        "jobs_per_s": round(args.jobs / job_wall, 1),
        "throughput_ratio": round((args.jobs / job_wall) / (args.jobs / send_wall), 3),
        "failed_jobs": len(failed),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"submit p50 {result['submit_p50_ms']} ms; one job submit->stored p50 "
        f"{result['job_delay_p50_ms']} ms vs send p50 {result['send_p50_ms']} ms "
        f"(+{result['job_delay_added_ms']} ms)"
    )
    print(
        f"{args.jobs} turns of {args.users} users, {args.concurrency} at once: sends "
        f"{result['sends_per_s']}/s, jobs {result['jobs_per_s']}/s "
        f"(ratio {result['throughput_ratio']}); failed jobs: {result['failed_jobs']}"
    )


if __name__ == "__main__":
    main()
