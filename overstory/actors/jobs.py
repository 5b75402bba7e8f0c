"""The job runner: the root's ``jobs`` child, one per namespace; also its hourly upkeep
(:meth:`JobRunner.maintain`: old jobs, expired response-cache entries).

It holds no job state of its own (:mod:`overstory.jobs` keeps everything in the
store): it reads the due queue entries every ``jobs.poll_s`` (or at once, when a submit
pokes it), takes the ones :func:`~overstory.jobs.pick` allows by compare-and-set
(:func:`~overstory.jobs.claim`), and runs each as a turn of its user's conversation
through the same client every driver uses — so a host killed mid-turn is re-sent to,
as any client would, with the job's turn id.

The runner is a client of conversations, yet it lives in the supervision tree, below
the client layer (the registry boots it): so it never imports the client. It states the
one thing it needs, :class:`JobTurns` (stream a job's turn), and the client hands it
an :data:`OpenTurns` when it boots the tree
(:class:`overstory.runtime.client.ClientTurns`, sent to the runner's process by
reference); the runner opens it on its first job. While a turn runs, the job's lease is
renewed every third of ``jobs.lease_s``; if this process dies, Ray (then the root)
starts it again and the new incarnation adopts the jobs the old one held
(:func:`~overstory.jobs.claimable`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import httpx
import ray

from .. import cache
from ..agent import Placement
from ..config import Config
from ..exceptions import QuotaExceeded, store_failed
from ..jobs import (
    TERMINAL,
    JobBook,
    JobRecord,
    claim,
    claimable,
    delivered,
    fail,
    is_permanent,
    pick,
    renew,
    sign,
    succeed,
)
from ..messages import TurnEvent
from ..store import HistoryStore, open_store
from ..store.settings import Backoff, SettingContended
from ..supervisors.watch import DRAIN_TIMEOUT_S, new_incarnation, until_death
from ..telemetry import flush_async, metrics, setup_telemetry

__all__ = ["JOBS", "WEBHOOK_SECRET_ENV", "JobRunner", "JobTurns", "OpenTurns"]

#: The runner's actor name in the namespace.
JOBS = "overstory.jobs"
#: With it set (in the cluster's environment), webhooks carry ``overstory-signature``.
WEBHOOK_SECRET_ENV = "OVERSTORY_WEBHOOK_SECRET"
#: How many queue entries one scan reads.
_SCAN = 200
_SWEEP_EVERY_S = 3600.0
_WEBHOOK_TIMEOUT_S = 10.0
#: A job's record changes by compare-and-set: at most 32 tries, a random pause of up to
#: 10, 20, 40, then 50 ms between.
_CHANGE_BACKOFF = Backoff(attempts=32, base_s=0.005, cap_s=0.05)

log = logging.getLogger(__name__)


class JobTurns(Protocol):
    """How the runner runs a job: as a streamed turn of ``user``'s conversation with
    ``agent``, under the job's ``turn_id`` (a turn sent again after its host died is the
    same turn), its events until the terminal one."""

    def stream(
        self, user: str, agent: str, text: str, *, turn_id: str, version: str | None
    ) -> AsyncIterator[TurnEvent]: ...


#: Makes the runner's :class:`JobTurns` in the runner's own process; it may block (a
#: client attaches to the running tree), so the runner calls it in a thread.
OpenTurns = Callable[[Config, Placement], JobTurns]


class JobRunner:
    """Runs a namespace's background jobs (see the module doc)."""

    def __init__(
        self, namespace: str, config: Config, placement: Placement, open_turns: OpenTurns
    ) -> None:
        self.namespace, self.config, self.placement = namespace, config, placement
        self.open_turns = open_turns
        self.limits = config.jobs
        self.incarnation = new_incarnation()
        setup_telemetry()
        self._store: HistoryStore = open_store(config.store)
        self._book = JobBook(self._store, namespace)
        self._turns: JobTurns | None = None  # made on first use (it attaches to the tree)
        self._running: dict[str, JobRecord] = {}  # job id -> the record as claimed
        self._tasks: set[asyncio.Task[Any]] = set()
        self._notifying: set[str] = set()  # jobs whose webhook is being delivered
        self._main: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self.counters: Counter[str] = Counter()
        self._started_at = time.time()
        # Ray restarts this process in place after a crash, and its supervisor may be
        # down too (nobody would call ready): start the loop by calling it ourselves.
        # Not one call fired and forgotten: one sent while the restart is still being
        # recorded can go to the dead incarnation and be lost (seen: a runner that never
        # started its loop, its job held until someone called ready). A thread asks
        # until the loop runs.
        threading.Thread(target=self._start_itself, name="runner-start", daemon=True).start()

    def _start_itself(self, attempts: int = 120) -> None:
        handle = ray.get_runtime_context().current_actor
        for _ in range(attempts):
            if self._main is not None:
                return
            try:
                ray.get(handle.ready.remote(), timeout=30)
                return
            except Exception as exc:  # the actor is between incarnations: ask again
                log.warning("the runner could not start its loop yet (%s): asking again", exc)
                time.sleep(1.0)

    # --- supervision protocol -----------------------------------------------------------

    async def ready(self) -> dict[str, Any]:
        if self._main is None:
            self._wake = asyncio.Event()
            self._main = asyncio.get_running_loop().create_task(self._loop())
        return self.status()

    async def watch(self, incarnation: str | None = None) -> str:
        return await until_death(incarnation, self.incarnation)

    async def drain(self, timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
        """Before the supervisor stops this runner (``stop_child``): export its buffered
        spans, off the loop. Its jobs need nothing: their leases lapse and another
        runner claims them."""
        return await flush_async(timeout_s)

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "incarnation": self.incarnation,
            "started_at": self._started_at,
            "running": sorted(self._running),
            "counters": dict(self.counters),
        }

    async def maintain(self) -> dict[str, int]:
        """The namespace's hourly upkeep (also callable by operators and tests): jobs
        ended more than ``jobs.keep_s`` ago, and expired response-cache entries."""
        await self._store.open()
        done = {
            "jobs_swept": await self._book.sweep(time.time(), self.config.jobs.keep_s),
            "cache_swept": await cache.sweep(self._store),
        }
        self.counters.update(done)
        return done

    async def poke(self) -> None:
        """A job was submitted: look now, not at the next poll."""
        await self.ready()
        assert self._wake is not None
        self._wake.set()

    # --- the loop -----------------------------------------------------------------------

    async def _loop(self) -> None:
        adopt, swept = True, 0.0
        while True:
            try:
                await self._store.open()  # idempotent; a store down at start is retried
                await self._scan(adopt)
                adopt = False
                if time.time() - swept > _SWEEP_EVERY_S:
                    swept = time.time()
                    await self.maintain()
            except Exception as exc:  # the store is down, say: keep polling
                if store_failed(exc):
                    metrics().store_error("jobs")
                log.warning("job scan failed: %s: %s", type(exc).__name__, exc)
            assert self._wake is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.jobs.poll_s)
            self._wake.clear()

    async def _scan(self, adopt: bool) -> None:
        """Start what is due and allowed (:func:`~overstory.jobs.pick` on each job, in due
        order, until the runner is full). The first scan of an incarnation reads the
        queue's future too, to adopt the jobs a dead one held on leases not yet ended."""
        if len(self._running) >= self.limits.concurrency:
            return
        now = time.time()
        entries = await self._book.due(math.inf if adopt else now, limit=_SCAN)
        overdue = [due for _, due, _ in entries if due <= now]
        metrics().jobs_due(len(overdue))
        metrics().jobs_oldest_due(now - min(overdue) if overdue else 0.0)
        users = Counter(job.user for job in self._running.values())
        for entry, due, job_id in entries:  # soonest first; read no more than it takes
            if len(self._running) >= self.limits.concurrency:
                break
            if job_id in self._running or job_id in self._notifying:
                continue
            got = await self._book.tidy(entry, due, job_id, now)
            if got is None:
                continue
            raw, job = got
            if job.state in TERMINAL:  # its webhook is due (its runner died before)
                if job.due <= now:
                    self._spawn(self._notify(job.id))
                continue
            if not claimable(job, now, self.incarnation) or not pick([job], users, self.limits):
                continue
            claimed = claim(job, now, self.incarnation, self.limits.lease_s)
            if await self._book.move(raw, job, claimed) is not None:
                self._running[job.id] = claimed
                users[job.user] += 1
                self._spawn(self._run(claimed))
        metrics().jobs_running(len(self._running))

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        """A task kept referenced until it ends (the loop holds tasks only weakly)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- one job ------------------------------------------------------------------------

    async def _client(self) -> JobTurns:
        if self._turns is None:
            self._turns = await asyncio.to_thread(self.open_turns, self.config, self.placement)
        return self._turns

    async def _run(self, job: JobRecord) -> None:
        heart = self._spawn(self._heartbeat(job.id))
        try:
            outcome = await self._attempt(job)
        finally:
            heart.cancel()
            self._running.pop(job.id, None)
            metrics().jobs_running(len(self._running))
        final = await self._change(job.id, outcome)
        if final is not None:
            label = final.state if final.state in TERMINAL else "retried"
            self.counters[label] += 1
            metrics().job(label)
            if final.state in TERMINAL and not final.notified:
                await self._notify(job.id)
        if self._wake is not None:
            self._wake.set()  # a slot is free

    async def _attempt(self, job: JobRecord) -> Callable[[JobRecord], JobRecord | None]:
        """Run the job's turn once; how its record changes after. The turn runs as a
        streamed turn, as the HTTP door's do: readers of the response (``GET
        /v1/responses/{id}``) tail it live, and a host that dies under it is handled as
        for any reader (the turn starts again from its stored message)."""
        me = self.incarnation

        def failed(
            error: str, permanent: bool, not_before_s: float = 0.0
        ) -> Callable[[JobRecord], JobRecord | None]:
            jitter = random.random()
            return _if_mine(
                me,
                lambda j: fail(
                    j,
                    time.time(),
                    error,
                    permanent=permanent,
                    not_before_s=not_before_s,
                    jitter=jitter,
                ),
            )

        last: TurnEvent | None = None
        try:
            turns = await self._client()
            version = job.version or None
            async for event in turns.stream(
                job.user, job.agent, job.text, turn_id=job.turn_id, version=version
            ):
                last = event
        except QuotaExceeded as exc:
            return failed(_describe(exc), False, exc.retry_after_s)
        except Exception as exc:
            return failed(_describe(exc), is_permanent(exc))
        if last is None or not last.terminal:  # not expected: a stream ends with its turn
            return failed("the turn's stream ended early", False)
        if last.type == "failed":
            return failed(f"TurnFailed: {last.text}"[:2000], not last.retryable)
        reply = last.reply
        text = reply.text if reply is not None else ""
        # Completed, or stored cut short (cancelled, say): its answer, and why it is short.
        incomplete = last.text if last.type == "incomplete" else (reply.incomplete if reply else "")
        return _if_mine(me, lambda j: succeed(j, time.time(), text, incomplete))

    async def _heartbeat(self, job_id: str) -> None:
        me, lease = self.incarnation, self.limits.lease_s
        while True:
            await asyncio.sleep(lease / 3)
            with contextlib.suppress(Exception):  # a missed renewal: the next one may do
                await self._change(job_id, lambda j: renew(j, time.time(), me, lease))

    async def _change(
        self, job_id: str, step: Callable[[JobRecord], JobRecord | None]
    ) -> JobRecord | None:
        """Apply ``step`` to the stored job by compare-and-set (again on a conflict);
        the new record, or ``None`` when ``step`` declines or the job is gone."""
        try:
            changed = await self._book.change(job_id, step, backoff=_CHANGE_BACKOFF)
        except SettingContended:
            attempts = _CHANGE_BACKOFF.attempts
            log.warning("job %s: gave up a change after %d conflicts", job_id, attempts)
            return None
        return changed[0] if changed is not None and changed[1] else None

    # --- webhooks -----------------------------------------------------------------------

    async def _notify(self, job_id: str) -> None:
        if job_id in self._notifying:
            return
        self._notifying.add(job_id)
        try:
            await self._deliver(job_id)
        finally:
            self._notifying.discard(job_id)

    async def _deliver(self, job_id: str) -> None:
        found = await self._book.get(job_id)
        if found is None or found[1].notified or found[1].state not in TERMINAL:
            return
        job = found[1]
        body = json.dumps(
            {k: v for k, v in job.public().items() if k not in ("webhook", "webhook_error")},
            sort_keys=True,
        ).encode()
        headers = {"content-type": "application/json", "overstory-job-id": job.id}
        secret = os.environ.get(WEBHOOK_SECRET_ENV)
        if secret:
            headers["overstory-signature"] = sign(secret, body, time.time())
        error = ""
        try:
            async with httpx.AsyncClient(timeout=_WEBHOOK_TIMEOUT_S) as client:
                response = await client.post(job.webhook, content=body, headers=headers)
            if not 200 <= response.status_code < 300:
                error = f"the webhook answered HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        jitter = random.random()
        done = await self._change(
            job_id,
            lambda j: None if j.notified else delivered(j, time.time(), error, jitter=jitter),
        )
        self.counters["webhooks_ok" if not error else "webhooks_failed"] += 1
        if done is not None and not done.notified:
            log.info("job %s: webhook failed (%s); again at %.0f", job_id, error, done.due)


def _if_mine(
    me: str, step: Callable[[JobRecord], JobRecord]
) -> Callable[[JobRecord], JobRecord | None]:
    """``step`` applied only while the job is still this incarnation's running attempt
    (a cancelled or adopted job is not overwritten)."""
    return lambda job: step(job) if job.state == "running" and job.runner == me else None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]
