"""Background jobs on a real tree: a job runs once and is listed; it survives a SIGKILL
of its host and of the runner mid-turn, completing with its turn stored once; failures
retry with backoff and end; per-user concurrency holds; cancel; a signed webhook and a
callback notify."""

from __future__ import annotations

import hmac
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from hashlib import sha256
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import ray
from conftest import WEBHOOK_SECRET, kill_namespace, on_store, wait_for

import overstory
from overstory import Agent, JobFailed, OfflineModel, Runtime, UnknownAgent, UnknownJob
from overstory.actors.jobs import JOBS
from overstory.cli.main import main
from overstory.exceptions import ConfigError, InvalidMessage, UsageError
from overstory.jobs import JobBook
from overstory.messages import Message

pytestmark = pytest.mark.ray


def _connect(namespace: str, store: str) -> Runtime:
    agents = [
        Agent("helper", model=OfflineModel("helper", latency_s=0.02)),
        # Its first two requests fail (a retryable model error), the third answers.
        Agent("flaky", model=OfflineModel("flaky", fail_first=2)),
        Agent("cached", model=OfflineModel("cached"), cache_ttl_s=0.5),
    ]
    return overstory.connect(
        agents,
        store=store,
        namespace=namespace,
        hosted={"hosts_per_node": 1},
        jobs={"poll_s": 0.2, "lease_s": 3.0, "concurrency": 3, "per_user": 1},
    )


@pytest.fixture
def rt(ray_cluster: str, namespace: str, sqlite_url: str) -> Iterator[Runtime]:
    """A tree of its own, for a test that kills part of it or counts the runner's jobs."""
    runtime = _connect(namespace, sqlite_url)
    yield runtime
    runtime.close()
    kill_namespace(namespace)


@pytest.fixture(scope="module")
def shared(ray_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    """One tree for the tests that neither kill nor count across users (booting one takes
    seconds): each submits its own users' jobs."""
    namespace = f"t-jobs-{uuid.uuid4().hex[:8]}"
    runtime = _connect(namespace, f"sqlite:///{tmp_path_factory.mktemp('jobs')}/history.db")
    yield runtime
    runtime.close()
    kill_namespace(namespace)


def runner_status(rt: Runtime) -> dict[str, Any]:
    status: dict[str, Any] = ray.get(
        ray.get_actor(JOBS, namespace=rt.config.namespace).status.remote(), timeout=30
    )
    return status


def turn_of(history: list[Message], turn_id: str) -> list[Message]:
    return [m for m in history if m.turn_id == turn_id]


def test_a_job_runs_once_is_listed_and_calls_back(
    rt: Runtime, capsys: pytest.CaptureFixture[str]
) -> None:
    called: list[dict[str, Any]] = []
    done = threading.Event()

    def on_done(status: dict[str, Any]) -> None:
        called.append(status)
        done.set()

    # Its model takes 1.5 s: a submit that ran the job before returning would find it done.
    job = rt.jobs.submit("alice", "!sleep 1.5 summarise my week", on_done=on_done)
    assert rt.jobs.get(job.id)["state"] in ("queued", "running")  # queued, not run, by submit
    assert not done.is_set()
    assert job.result(timeout=60) == "echo #1: summarise my week"
    status = rt.jobs.get(job.id)
    assert status["state"] == "succeeded"
    assert status["attempts"] == 1
    assert status["turn_id"] == job.turn_id
    assert status["user"] == "alice"
    assert status["agent"] == "helper"
    history = rt.stored_history("alice")
    assert [m.kind for m in turn_of(history, job.turn_id)] == ["user", "assistant"]
    assert done.wait(30)
    assert called[0]["id"] == job.id
    assert called[0]["reply"] == "echo #1: summarise my week"
    # A later interactive turn follows it in the same conversation.
    assert rt.conversation("alice").send("and now?").text == "echo #2: and now?"
    assert [j["id"] for j in rt.jobs.list("alice")] == [job.id]
    assert rt.jobs.list("bob") == []
    with pytest.raises(ConfigError, match="delay_s"):
        rt.jobs.submit("alice", "hi", delay_s=-1)
    assert runner_status(rt)["counters"]["succeeded"] == 1
    with pytest.raises(UnknownJob):
        rt.jobs.get("job_0000000000000000000000000")
    with pytest.raises(UsageError, match="job id"):
        rt.jobs.get("no-such-thing")
    # Bad input is refused before anything is stored.
    with pytest.raises(UnknownAgent):
        rt.jobs.submit("alice", "hi", agent="nobody")
    with pytest.raises(InvalidMessage):
        rt.jobs.submit("alice", "   ")
    with pytest.raises(ConfigError, match="max_attempts"):
        rt.jobs.submit("alice", "hi", max_attempts=0)
    with pytest.raises(ConfigError, match="webhook"):
        rt.jobs.submit("alice", "hi", webhook="file:///etc/passwd")
    assert len(rt.jobs.list()) == 1
    # Scheduled: it waits for its time, then runs.
    later = rt.jobs.submit("alice", "in a second and a half", delay_s=1.5)
    assert later.status()["next_attempt_at"] >= later.status()["created_at"] + 1.5
    assert later.result(timeout=60) == "echo #3: in a second and a half"
    ran = rt.jobs.get(later.id)
    assert ran["started_at"] >= ran["created_at"] + 1.5
    # The operator's view, from the store.
    args = ["--store", rt.config.store, "--namespace", rt.config.namespace]
    assert main(["jobs", "--user", "alice", "--json", *args]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(j["id"], j["state"], j["attempts"]) for j in listed] == [
        (later.id, "succeeded", 1),
        (job.id, "succeeded", 1),
    ]
    assert main(["jobs", *args]) == 0
    assert f"{job.id}  succeeded 1/3" in capsys.readouterr().out
    assert main(["jobs", job.id, "--json", *args]) == 0
    assert json.loads(capsys.readouterr().out)["reply"] == "echo #1: summarise my week"
    assert main(["jobs", "job_0000000000000000000000000", *args]) == 2
    assert "no job" in capsys.readouterr().err


def test_many_on_done_callbacks_share_one_watcher_and_a_deleted_job_is_reported(
    rt: Runtime,
) -> None:
    statuses: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()
    all_done = threading.Event()
    users = [f"many-{i}" for i in range(8)]

    def on_done(status: dict[str, Any]) -> None:
        with lock:
            statuses[status["id"]] = status
            if len(statuses) == len(users) + 1:
                all_done.set()

    def watchers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "overstory-job-watcher"]

    # Queued an hour ahead: it is still pending when its record is deleted.
    doomed = rt.jobs.submit("doomed", "never runs", delay_s=3600, on_done=on_done)
    jobs = [rt.jobs.submit(u, f"hello from {u}", on_done=on_done) for u in users]
    assert len(watchers()) == 1  # nine jobs pending, one thread (none per job)
    assert not [t for t in threading.enumerate() if t.name.startswith("on_done-")]

    async def delete(store: Any) -> None:
        book = JobBook(store, rt.config.namespace)
        found = await book.get(doomed.id)
        assert found is not None
        assert await store.delete_setting(book.job_key(doomed.id), expected=found[0])

    on_store(rt.config.store, delete)
    assert all_done.wait(60), f"{len(statuses)} of {len(users) + 1} called back"
    for job, user in zip(jobs, users, strict=True):
        assert statuses[job.id]["state"] == "succeeded"
        assert statuses[job.id]["reply"] == f"echo #1: hello from {user}"
    gone = statuses[doomed.id]
    assert gone["state"] == "failed"
    assert "UnknownJob" in gone["error"]
    # Nothing pending: the watcher's thread ends; the next submit starts it again.
    wait_for(lambda: not watchers(), 30, "the watcher's thread to end")
    rt.close()  # drops what is pending, ends the thread
    assert not watchers()


def test_a_job_survives_a_sigkill_of_its_host_mid_turn(rt: Runtime) -> None:
    job = rt.jobs.submit("carol", "!sleep 2 a long report")
    # Its user message is stored before the model is called: the turn is under way.
    wait_for(lambda: turn_of(rt.stored_history("carol"), job.turn_id), 30, "carol's job's turn")
    os.kill(rt.conversation("carol").info()["pid"], signal.SIGKILL)
    assert job.result(timeout=120) == "echo #1: a long report"
    history = rt.stored_history("carol")
    assert [m.kind for m in history] == ["user", "assistant"]  # stored once
    assert rt.jobs.get(job.id)["attempts"] == 1  # the runner's client re-sent the same turn


def test_a_job_survives_a_sigkill_of_the_runner_mid_turn(rt: Runtime) -> None:
    job = rt.jobs.submit("dave", "!sleep 2 a long report")
    wait_for(lambda: turn_of(rt.stored_history("dave"), job.turn_id), 30, "dave's job's turn")
    before = runner_status(rt)
    assert before["running"] == [job.id]
    os.kill(before["pid"], signal.SIGKILL)
    assert job.result(timeout=120) == "echo #1: a long report"
    status = rt.jobs.get(job.id)
    assert status["attempts"] == 2  # the new incarnation adopted it at once
    assert [m.kind for m in rt.stored_history("dave")] == ["user", "assistant"]  # stored once
    assert runner_status(rt)["incarnation"] != before["incarnation"]


def test_a_job_survives_its_supervisors_and_the_runner_killed_at_once(rt: Runtime) -> None:
    """SIGKILL the root, the host supervisor and the runner mid-turn: Ray restarts each in
    place; the runner starts its own loop (no supervisor calls it) and adopts the job."""
    from overstory.supervisors.tree import HOSTS, ROOT

    job = rt.jobs.submit("ivan", "!sleep 2 a long report")
    wait_for(lambda: turn_of(rt.stored_history("ivan"), job.turn_id), 30, "ivan's job's turn")
    pids = [runner_status(rt)["pid"]]
    for name in (ROOT, HOSTS):
        actor = ray.get_actor(name, namespace=rt.config.namespace)
        pids.append(ray.get(actor.status.remote(), timeout=30)["pid"])
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert job.result(timeout=120) == "echo #1: a long report"
    assert [m.kind for m in rt.stored_history("ivan")] == ["user", "assistant"]
    assert runner_status(rt)["pid"] != pids[0]


def test_failures_retry_with_backoff_then_end(shared: Runtime) -> None:
    flaky = shared.jobs.submit("erin", "third time lucky", agent="flaky")
    assert flaky.result(timeout=60) == "echo #1: third time lucky"
    status = shared.jobs.get(flaky.id)
    assert status["attempts"] == 3
    assert status["error"] == ""
    # Two retries waited ~2 and ~4 s (±20 %).
    assert status["finished_at"] - status["started_at"] >= 1.6 + 3.2
    assert [m.kind for m in shared.stored_history("erin", agent="flaky")] == ["user", "assistant"]
    # A model that refuses the request itself: no retry.
    fatal = shared.jobs.submit("erin", "!fatal bad request")
    with pytest.raises(JobFailed, match="scripted fatal") as caught:
        fatal.result(timeout=60)
    assert caught.value.job["attempts"] == 1
    assert shared.jobs.get(fatal.id)["state"] == "failed"


def test_per_user_concurrency_and_cancel(shared: Runtime) -> None:
    a = [shared.jobs.submit("frank", f"!sleep 1 job {n}") for n in range(3)]
    b = shared.jobs.submit("grace", "!sleep 1 job of grace")
    wait_for(
        lambda: (
            shared.jobs.get(a[1].id)["state"] != "queued"
            or shared.jobs.get(a[0].id)["state"] == "running"
        ),
        30,
        "the first job to start",
    )
    assert shared.jobs.cancel(a[2].id)["state"] == "cancelled"  # still waiting its turn
    with pytest.raises(JobFailed, match="cancelled"):
        a[2].result(timeout=5)
    for job in (a[0], a[1], b):
        job.result(timeout=60)
    spans = sorted(
        (shared.jobs.get(j.id)["started_at"], shared.jobs.get(j.id)["finished_at"]) for j in a[:2]
    )
    assert spans[0][1] <= spans[1][0]  # one of frank's at a time
    grace = shared.jobs.get(b.id)
    assert grace["started_at"] < spans[0][1]  # grace's ran beside frank's first
    with pytest.raises(UsageError, match="only a queued job"):
        shared.jobs.cancel(a[0].id)
    assert [m.content for m in shared.stored_history("frank") if m.kind == "user"] == [
        "!sleep 1 job 0",
        "!sleep 1 job 1",
    ]


class _Hook(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]] = []
    fail_first = 1

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).received.append((dict(self.headers), body))
        status = 500 if len(type(self).received) <= type(self).fail_first else 204
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_signed_webhook_is_delivered_and_retried(shared: Runtime) -> None:
    _Hook.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hooks/jobs"
        job = shared.jobs.submit("heidi", "notify me", webhook=url)
        job.result(timeout=60)
        wait_for(lambda: shared.jobs.get(job.id)["notified"], 30, "the job's webhook")
    finally:
        server.shutdown()
    status = shared.jobs.get(job.id)
    assert status["deliveries"] == 2  # a 500 first, retried after a backoff
    assert status["webhook_error"] == ""
    assert len(_Hook.received) == 2
    headers, body = _Hook.received[-1]
    sent = json.loads(body)
    assert sent["id"] == job.id
    assert sent["state"] == "succeeded"
    assert sent["reply"] == "echo #1: notify me"
    stamp, mac = headers["overstory-signature"].split(",")
    t = stamp.removeprefix("t=")
    expected = hmac.new(WEBHOOK_SECRET.encode(), f"{t}.".encode() + body, sha256).hexdigest()
    assert mac == f"v1={expected}"
    assert abs(time.time() - int(t)) < 120


def test_the_runners_upkeep_sweeps_expired_cache_entries(shared: Runtime) -> None:
    """The response cache has no process of its own: the runner's hourly upkeep drops its
    expired entries (called here at once)."""
    conv = shared.conversation("judy", agent="cached")
    conv.send("cache this answer")
    time.sleep(0.6)  # past its 0.5 s
    runner = ray.get_actor(JOBS, namespace=shared.config.namespace)
    done = ray.get(runner.maintain.remote(), timeout=30)
    assert done["cache_swept"] == 1
    assert done["jobs_swept"] == 0  # none ended a week ago
    assert ray.get(runner.maintain.remote(), timeout=30)["cache_swept"] == 0
