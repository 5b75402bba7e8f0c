"""Background jobs without Ray: the pure transitions and the scheduling rule, and the
job book (records, the queue index, sealing, races, crash leftovers) on SQLite and the
MongoDB-wire server."""

from __future__ import annotations

import asyncio
import hmac
import threading
from dataclasses import replace
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest
from conftest import on_store

from overstory.config import JobSettings
from overstory.exceptions import (
    ConfigError,
    InvalidMessage,
    ModelError,
    TurnFailed,
    UnknownJob,
    UsageError,
)
from overstory.jobs import (
    MAX_DELIVERIES,
    JobBook,
    JobRecord,
    backoff_s,
    cancel,
    claim,
    claimable,
    delivered,
    fail,
    is_permanent,
    new_job,
    pick,
    renew,
    sign,
    succeed,
    validate_webhook,
)
from overstory.runtime.jobwatch import JobWatcher, status_callback
from overstory.store import HistoryStore

T0 = 1_800_000_000.0
CANARY = "job-canary-8c2d"


def job(user: str = "u1", *, at: float = T0, attempts: int = 3, webhook: str = "") -> JobRecord:
    return new_job(
        user, "helper", f"{CANARY} from {user}", max_attempts=attempts, webhook=webhook, now=at
    )


# --- the rules ----------------------------------------------------------------------------


def test_a_job_runs_retries_with_backoff_and_ends() -> None:
    j = job()
    assert j.state == "queued"
    assert j.due == T0
    assert j.turn_id == f"{j.id}-turn"
    assert claimable(j, T0, "r1")
    assert not claimable(j, T0 - 1, "r1")
    running = claim(j, T0, "r1", 30)
    assert (running.state, running.attempts, running.runner, running.due) == (
        "running",
        1,
        "r1",
        T0 + 30,
    )
    assert not claimable(running, T0 + 10, "r1")  # on its lease
    assert claimable(running, T0 + 31, "r1")  # the lease ended: its runner died
    assert claimable(running, T0 + 10, "r2")  # another incarnation's: adopted
    with pytest.raises(ValueError, match="not claimable"):
        claim(running, T0 + 10, "r1", 30)
    assert renew(running, T0 + 10, "r1", 30) == replace(running, due=T0 + 40)
    assert renew(running, T0 + 10, "r2", 30) is None  # not r2's to renew
    again = fail(running, T0 + 5, "TurnFailed: boom", permanent=False, jitter=0.5)
    assert (again.state, again.runner, again.error) == ("queued", "", "TurnFailed: boom")
    assert again.due == T0 + 5 + backoff_s(1, 0.5) == T0 + 7
    second = claim(again, T0 + 7, "r1", 30)
    assert second.attempts == 2
    assert second.started_at == T0
    quota = fail(second, T0 + 8, "QuotaExceeded", permanent=False, not_before_s=60)
    assert quota.due == T0 + 68  # the quota's retry-after beats the backoff
    third = claim(quota, T0 + 68, "r1", 30)
    out = fail(third, T0 + 70, "TurnFailed: again", permanent=False)
    assert (out.state, out.attempts, out.finished_at, out.has_work) == ("failed", 3, T0 + 70, False)
    done = succeed(claim(j, T0, "r1", 30), T0 + 3, "the answer", "")
    assert (done.state, done.reply, done.has_work, done.notified) == (
        "succeeded",
        "the answer",
        False,
        True,
    )
    assert fail(claim(j, T0, "r1", 30), T0, "bad", permanent=True).state == "failed"


def test_backoff_doubles_within_jitter_and_is_capped() -> None:
    assert [backoff_s(a, 0.5) for a in (1, 2, 3, 4)] == [2, 4, 8, 16]
    assert backoff_s(3, 0.0) == pytest.approx(6.4)
    assert backoff_s(3, 1.0) == pytest.approx(9.6)
    assert backoff_s(40, 0.5) == 300


def test_cancel_only_what_has_not_started() -> None:
    j = job()
    assert cancel(j, T0 + 1) == replace(j, state="cancelled", finished_at=T0 + 1, due=T0 + 1)
    assert cancel(claim(j, T0, "r", 30), T0) is None
    waiting = fail(claim(j, T0, "r", 30), T0, "x", permanent=False)
    assert cancel(waiting, T0 + 1) is not None  # waiting for its retry: still queued


def test_webhooks_are_retried_then_given_up() -> None:
    j = succeed(claim(job(webhook="http://127.0.0.1:9/hook"), T0, "r", 30), T0, "ok")
    assert not j.notified
    assert j.has_work
    for n in range(1, MAX_DELIVERIES):
        j = delivered(j, T0 + n, "HTTP 500", jitter=0.5)
        assert not j.notified
        assert j.deliveries == n
        assert j.due == T0 + n + backoff_s(n, 0.5)
    j = delivered(j, T0 + 9, "HTTP 500")
    assert j.notified
    assert j.webhook_error == "HTTP 500"
    assert not j.has_work
    ok = delivered(succeed(claim(job(webhook="http://h/x"), T0, "r", 30), T0, "ok"), T0)
    assert ok.notified
    assert ok.webhook_error == ""
    assert ok.deliveries == 1


def test_pick_bounds_concurrency_overall_and_per_user() -> None:
    jobs = [job("a"), job("a"), job("b"), job("c"), job("b"), job("d")]
    limits = JobSettings(concurrency=3, per_user=1)
    assert [j.user for j in pick(jobs, {}, limits)] == ["a", "b", "c"]
    assert [j.user for j in pick(jobs, {"a": 1, "c": 1}, limits)] == ["b"]
    assert pick(jobs, {"x": 3}, limits) == []
    two = JobSettings(concurrency=10, per_user=2)
    assert [j.user for j in pick(jobs, {"b": 1}, two)] == ["a", "a", "b", "c", "d"]


def test_which_failures_are_permanent() -> None:
    assert is_permanent(InvalidMessage("too long"))
    assert is_permanent(TurnFailed("c", "t", "bad", ModelError("400", retryable=False)))
    assert not is_permanent(TurnFailed("c", "t", "busy", ModelError("overloaded")))
    assert not is_permanent(TurnFailed("c", "t", "no cause"))
    assert not is_permanent(RuntimeError("host died"))


def test_bad_input_is_refused_by_name() -> None:
    for bad in (0, 101, True, "3", 2.5):
        with pytest.raises(ConfigError, match="max_attempts"):
            new_job("u", "a", "t", max_attempts=bad, webhook="", now=T0)  # type: ignore[arg-type]
    for bad_delay in (-1, float("nan"), 400 * 86_400, True, "5"):
        with pytest.raises(ConfigError, match="delay_s"):
            new_job("u", "a", "t", max_attempts=3, webhook="", now=T0, delay_s=bad_delay)  # type: ignore[arg-type]
    later = new_job("u", "a", "t", max_attempts=3, webhook="", now=T0, delay_s=90)
    assert later.due == T0 + 90
    assert not claimable(later, T0 + 89, "r")
    assert claimable(later, T0 + 90, "r")
    assert validate_webhook(None) == ""
    assert validate_webhook("https://example.com/h?x=1") == "https://example.com/h?x=1"
    for bad_url in (
        "ftp://h/x",
        "http://",
        "not a url",
        "http://u:p@h/x",
        "http://h/\n",
        "x" * 3000,
        7,
    ):
        with pytest.raises(ConfigError, match="webhook"):
            validate_webhook(bad_url)


def test_webhook_signature_is_stripes_scheme() -> None:
    header = sign("s3cret", b'{"id":"job_1"}', 1_700_000_000.9)
    stamp, mac = header.split(",")
    assert stamp == "t=1700000000"
    expected = hmac.new(b"s3cret", b'1700000000.{"id":"job_1"}', sha256).hexdigest()
    assert mac == f"v1={expected}"


# --- the book, on both stores -------------------------------------------------------------


def test_the_queue_is_read_in_due_order_and_moves_with_the_record(store_url: str) -> None:
    async def body(store: HistoryStore) -> None:
        book = JobBook(store, "ns-jobs-1")
        later, sooner = job("u1", at=T0 + 5), job("u2", at=T0)
        await book.add(later)
        await book.add(sooner)
        assert [jid for _, _, jid in await book.due(T0 + 1)] == [sooner.id]
        assert [jid for _, _, jid in await book.due(T0 + 5)] == [sooner.id, later.id]
        assert await JobBook(store, "other-ns").due(T0 + 9) == []  # namespaced
        raw, stored = (await book.get(sooner.id)) or ("", sooner)
        assert stored == sooner
        running = claim(stored, T0, "r1", 30)
        raw2 = await book.move(raw, stored, running)
        assert raw2 is not None
        assert [jid for _, _, jid in await book.due(T0 + 10)] == [later.id]  # on its lease
        assert [jid for _, _, jid in await book.due(T0 + 30)] == [later.id, sooner.id]
        assert await book.move(raw, stored, claim(stored, T0, "r2", 30)) is None  # stale raw
        done = succeed(running, T0 + 2, "ok")
        assert await book.move(raw2, running, done) is not None
        assert [jid for _, _, jid in await book.due(T0 + 99)] == [later.id]  # no entry left
        assert (await book.status(sooner.id)).reply == "ok"
        with pytest.raises(UnknownJob):
            await book.status("job_0000000000000000000000000")
        with pytest.raises(UsageError, match="job id"):
            await book.status("../etc")
        listed = await book.listing()
        assert [j.id for j in listed] == [later.id, sooner.id]  # newest first
        assert [j.id for j in await book.listing(user="u2")] == [sooner.id]
        assert [j.id for j in await book.listing(state="queued")] == [later.id]
        with pytest.raises(UsageError, match="state"):
            await book.listing(state="lost")

    on_store(store_url, body)


def test_two_runners_racing_for_a_job_one_wins(store_url: str) -> None:
    async def body(store: HistoryStore) -> None:
        book = JobBook(store, "ns-jobs-2")
        for n in range(5):
            await book.add(job(f"u{n}"))

        async def runner(me: str) -> list[str]:
            won = []
            for entry, due, jid in await book.due(T0 + 1):
                got = await book.tidy(entry, due, jid, T0 + 1)
                if got is None or got[1].state != "queued":  # (a running one is adopted)
                    continue
                if await book.move(got[0], got[1], claim(got[1], T0 + 1, me, 30)):
                    won.append(jid)
            return won

        a, b = await asyncio.gather(runner("ra"), runner("rb"))
        assert sorted(a + b) == sorted(j.id for j in await book.listing())
        assert not set(a) & set(b)
        for j in await book.listing():
            assert j.attempts == 1
            assert j.runner in ("ra", "rb")

    on_store(store_url, body)


def test_crash_leftovers_are_tidied_and_nothing_is_lost(store_url: str) -> None:
    async def body(store: HistoryStore) -> None:
        book = JobBook(store, "ns-jobs-3")
        j = job()
        await book.add(j)
        raw = (await book.get(j.id) or ("", j))[0]
        # A runner died after writing the new entry and before the record's CAS:
        claimed = claim(j, T0, "r1", 30)
        await store.put_setting(book.entry_key(claimed.due, j.id), j.id, expected=None)
        entries = await book.due(T0 + 60)
        assert len(entries) == 2
        kept = [await book.tidy(e, d, jid, T0 + 60) for e, d, jid in entries]
        assert [k[1] if k else None for k in kept] == [j, None]  # the stray entry is gone
        assert len(await book.due(T0 + 60)) == 1
        # ... and after the CAS, before deleting the old entry:
        await store.put_setting(book.entry_key(claimed.due, j.id), j.id, expected=None)
        assert await store.put_setting(book.job_key(j.id), book.encode(claimed), expected=raw)
        entries = await book.due(T0 + 60)
        kept = [await book.tidy(e, d, jid, T0 + 60) for e, d, jid in entries]
        assert [k[1] if k else None for k in kept] == [None, claimed]
        # An entry without a record: a submit in progress for a minute, then stray.
        ghost = "job_0000000000001aaaaaaaaaaaa"
        await store.put_setting(book.entry_key(T0, ghost), ghost, expected=None)
        assert await book.tidy(book.entry_key(T0, ghost), T0, ghost, T0 + 30) is None
        assert any(jid == ghost for _, _, jid in await book.due(T0 + 99))
        assert await book.tidy(book.entry_key(T0, ghost), T0, ghost, T0 + 61) is None
        assert not any(jid == ghost for _, _, jid in await book.due(T0 + 99))

    on_store(store_url, body)


def test_texts_and_replies_are_sealed_and_bound_to_their_job(store_url: str) -> None:
    async def body(store: HistoryStore) -> None:
        assert store.data_keys is not None  # the test session runs with keys on
        book = JobBook(store, "ns-jobs-4")
        a, b = job("u1"), job("u2", at=T0 + 1)
        await book.add(a)
        await book.add(b)
        found = await book.get(a.id)
        assert found is not None
        running = claim(a, T0, "r", 30)
        raw = await book.move(found[0], a, running)
        assert raw is not None
        raw = await book.move(raw, running, succeed(running, T0, f"reply {CANARY}"))
        assert raw is not None
        assert CANARY not in raw
        assert (await book.status(a.id)).reply == f"reply {CANARY}"
        # b's sealed text put into a's record does not open.
        raw_b = await store.get_setting(book.job_key(b.id))
        assert raw_b is not None
        import json

        forged = {**json.loads(raw), "text": json.loads(raw_b)["text"]}
        assert await store.put_setting(book.job_key(a.id), json.dumps(forged), expected=raw)
        from overstory.exceptions import DataKeyError

        with pytest.raises(DataKeyError):
            await book.status(a.id)

    on_store(store_url, body)


def test_sweep_removes_old_finished_jobs_only(store_url: str) -> None:
    async def body(store: HistoryStore) -> None:
        book = JobBook(store, "ns-jobs-5")
        old, fresh, waiting = job("a"), job("b"), job("c")
        hooked = job("d", webhook="http://127.0.0.1:9/h")
        for j in (old, fresh, waiting, hooked):
            await book.add(j)
        for j, at in ((old, T0), (fresh, T0 + 500), (hooked, T0)):
            raw, rec = await book.get(j.id) or ("", j)
            running = claim(rec, at, "r", 30)
            raw2 = await book.move(raw, rec, running)
            assert raw2 is not None
            assert await book.move(raw2, running, succeed(running, at, "ok")) is not None
        assert await book.sweep(T0 + 1000, keep_s=600) == 1  # old; hooked awaits its webhook
        assert sorted(j.user for j in await book.listing()) == ["b", "c", "d"]

    on_store(store_url, body)


def test_rotate_data_reseals_job_records_too(store_url: str) -> None:
    import base64
    import os

    from overstory.store.crypto import DataKeys, reseal

    k1 = DataKeys.parse(f"k1:{base64.b64encode(os.urandom(32)).decode()}")
    k2 = DataKeys.parse(
        f"k2:{base64.b64encode(os.urandom(32)).decode()},{k1.primary}:"
        f"{base64.b64encode(k1.keys[k1.primary]).decode()}"
    )
    plain, sealed = job("before", at=T0), job("after", at=T0 + 1)

    async def write_plain(store: HistoryStore) -> None:
        await JobBook(store, "ns-jobs-6").add(plain)

    async def write_sealed(store: HistoryStore) -> None:
        book = JobBook(store, "ns-jobs-6")
        await book.add(sealed)
        raw, rec = await book.get(sealed.id) or ("", sealed)
        running = claim(rec, T0 + 1, "r", 30)
        raw2 = await book.move(raw, rec, running)
        assert raw2 is not None
        assert await book.move(raw2, running, succeed(running, T0 + 2, f"answer {CANARY}"))

    async def read(store: HistoryStore) -> list[tuple[str, str]]:
        return [(j.text, j.reply) for j in await JobBook(store, "ns-jobs-6").listing()]

    on_store(store_url, write_plain, None)  # before encryption was on
    on_store(store_url, write_sealed, k1)
    counts = on_store(store_url, reseal, k2)
    assert (counts["examined"], counts["resealed"]) == (2, 2)
    assert on_store(store_url, reseal, k2)["resealed"] == 0  # nothing left to do
    only_k2 = DataKeys.parse(f"k2:{base64.b64encode(k2.keys['k2']).decode()}")
    assert on_store(store_url, read, only_k2) == [
        (sealed.text, f"answer {CANARY}"),
        (plain.text, ""),
    ]


def test_status_shows_a_webhook_without_its_path_or_query() -> None:
    hooked = job(webhook="https://hooks.example.com/services/T000/B000/XXXXsecret?x=1")
    assert hooked.public()["webhook"] == "https://hooks.example.com/…"
    assert job(webhook="http://127.0.0.1:8080/").public()["webhook"] == "http://127.0.0.1:8080"
    assert job().public()["webhook"] == ""


def test_cancel_in_the_book_is_one_compare_and_set(store_url: str) -> None:
    async def body(store: HistoryStore) -> None:
        book = JobBook(store, "ns-jobs-7")
        queued, running = job("a"), job("b", at=T0 + 1)
        for j in (queued, running):
            await book.add(j)
        raw, rec = await book.get(running.id) or ("", running)
        assert await book.move(raw, rec, claim(rec, T0 + 1, "r", 30))
        done, now = await book.cancel(queued.id, T0 + 2)
        assert (done.state, now) == ("cancelled", True)
        assert (await book.cancel(queued.id, T0 + 3))[1] is False  # once
        left, now = await book.cancel(running.id, T0 + 2)
        assert (left.state, now) == ("running", False)  # a running attempt goes on
        assert [jid for _, _, jid in await book.due(T0 + 99)] == [running.id]
        with pytest.raises(UnknownJob):
            await book.cancel("job_0000000000000000000000000", T0)

    on_store(store_url, body)


# --- on_done: one watcher per runtime -------------------------------------------------------


def _watcher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "overstory-job-watcher"]


def test_one_watcher_thread_calls_back_every_job_once_it_ends(sqlite_url: str) -> None:
    ns = "ns-watch-1"
    jobs = [job(f"u{i}", at=T0 + i) for i in range(20)]
    on_store(sqlite_url, lambda store: _add_all(JobBook(store, ns), jobs))
    watcher = JobWatcher(sqlite_url, ns, pause_s=(0.01, 0.05))
    got: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()
    all_done = threading.Event()

    def collect(status: dict[str, Any]) -> None:
        with lock:
            assert status["id"] not in got, "called back twice"
            got[status["id"]] = status
            if len(got) == len(jobs):
                all_done.set()

    for j in jobs:
        watcher.watch(j.id, status_callback(j, collect))
    assert len(_watcher_threads()) == 1  # twenty jobs pending, one thread
    thread = watcher.thread
    assert thread is not None
    assert watcher.pending == len(jobs)
    assert got == {}  # queued jobs have not ended

    async def finish(store: HistoryStore) -> None:
        book = JobBook(store, ns)
        for i, j in enumerate(jobs):
            found = await book.get(j.id)
            assert found is not None
            raw, record = found
            ended = cancel(record, T0 + 50) if i % 2 else succeed(record, T0 + 50, f"reply {i}")
            assert ended is not None
            assert await book.move(raw, record, ended) is not None

    on_store(sqlite_url, finish)
    assert all_done.wait(30), f"only {len(got)} of {len(jobs)} called back"
    for i, j in enumerate(jobs):
        status = got[j.id]
        if i % 2:
            assert status["state"] == "cancelled"
        else:
            assert (status["state"], status["reply"]) == ("succeeded", f"reply {i}")
    thread.join(10)  # nothing pending: the thread ends (and closes its store)
    assert not thread.is_alive()
    assert watcher.thread is None
    assert _watcher_threads() == []
    watcher.close()


async def _add_all(book: JobBook, jobs: list[JobRecord]) -> None:
    for j in jobs:
        await book.add(j)


def test_a_job_gone_from_the_store_is_reported_as_failed(sqlite_url: str) -> None:
    ns = "ns-watch-2"
    gone, kept = job("u1"), job("u2", at=T0 + 1)

    async def add_then_delete(store: HistoryStore) -> None:
        book = JobBook(store, ns)
        await _add_all(book, [gone, kept])
        found = await book.get(gone.id)
        assert found is not None
        assert await store.delete_setting(book.job_key(gone.id), expected=found[0])

    on_store(sqlite_url, add_then_delete)
    watcher = JobWatcher(sqlite_url, ns, pause_s=(0.01, 0.05))
    statuses: list[dict[str, Any]] = []
    called = threading.Event()

    def raising(status: dict[str, Any]) -> None:
        raise RuntimeError("a callback's own bug")

    def record(status: dict[str, Any]) -> None:
        statuses.append(status)
        called.set()

    kept_called: list[dict[str, Any]] = []
    watcher.watch(kept.id, status_callback(kept, kept_called.append))  # queued: not called
    watcher.watch(gone.id, status_callback(gone, raising))  # logged; the next still runs
    watcher.watch(gone.id, status_callback(gone, record))
    assert called.wait(30)
    (status,) = statuses
    assert status["id"] == gone.id
    assert status["state"] == "failed"
    assert "UnknownJob" in status["error"]
    assert gone.id in status["error"]
    assert set(status) == set(gone.public())  # the same keys as any status
    # The job still in the store is still watched; close() drops it and ends the thread.
    assert watcher.pending == 1
    thread = watcher.thread
    assert thread is not None
    watcher.close(timeout_s=10)
    assert not thread.is_alive()
    assert watcher.pending == 0
    assert kept_called == []
    with pytest.raises(UsageError, match="closed"):
        watcher.watch(kept.id, status_callback(kept, record))


def test_an_unreachable_store_is_retried_not_fatal(tmp_path: Path) -> None:
    # A SQLite file in a directory that does not exist yet cannot be opened; once it
    # exists, the watcher's next attempt reads the (ended) job.
    where = tmp_path / "later"
    url = f"sqlite:///{where}/history.db"
    watcher = JobWatcher(url, "ns-watch-3", pause_s=(0.01, 0.05))
    ended = succeed(claim(job(), T0, "r1", 30), T0 + 1, "late but fine")
    statuses: list[dict[str, Any]] = []
    called = threading.Event()

    def record(status: dict[str, Any]) -> None:
        statuses.append(status)
        called.set()

    watcher.watch(ended.id, status_callback(ended, record))
    assert not called.wait(0.3)  # the store is away: nothing delivered, the thread goes on
    assert watcher.thread is not None
    # The store appears whole (made aside, then renamed into place): an empty one seen
    # first would rightly report the job as gone.
    aside = tmp_path / "aside"
    aside.mkdir()
    on_store(f"sqlite:///{aside}/history.db", lambda s: JobBook(s, "ns-watch-3").add(ended))
    aside.rename(where)
    assert called.wait(30)
    assert statuses[0]["state"] == "succeeded"
    assert statuses[0]["reply"] == "late but fine"
    watcher.close()
