"""``rt.jobs``: background jobs (:mod:`overstory.jobs`): submit, look up, list, cancel.

A job is a store record run by the namespace's job runner, so it outlives this process;
:class:`Job` is a handle on one.
"""

from __future__ import annotations

import builtins
import math
import time
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import RayActorError

from ..actors.jobs import JOBS
from ..exceptions import ConfigError, JobFailed, UsageError
from ..jobs import (
    TERMINAL,
    JobBook,
    JobRecord,
    job_turn_id,
    new_job,
    validate_job_id,
    validate_webhook,
)
from ..store import run_on_store
from ..validation import validate_message, validate_user_id
from .jobwatch import JobWatcher, status_callback

if TYPE_CHECKING:
    from .client import Runtime

__all__ = ["Job", "Jobs"]


class Jobs:
    """A runtime's background jobs (``rt.jobs``)."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        # One thread and one store connection for every submit(on_done=...), started on
        # the first and ended when none is pending or on close().
        config = runtime.config
        self._watcher = JobWatcher(config.store, config.namespace)

    def close(self) -> None:
        """Stop watching for ``on_done`` callbacks (pending ones are dropped; their
        jobs still run)."""
        self._watcher.close()

    def submit(
        self,
        user_id: str,
        text: str,
        *,
        agent: str | None = None,
        max_attempts: int = 3,
        delay_s: float = 0.0,
        webhook: str | None = None,
        on_done: Callable[[dict[str, Any]], None] | None = None,
    ) -> Job:
        """Queue ``text`` as a turn of ``user_id``'s conversation with ``agent`` and return
        at once (:mod:`overstory.jobs`). The job is in the store before this returns: it
        runs even if this process, a host or the runner dies, at least once and stored
        once (every attempt is the same turn), retried with backoff up to
        ``max_attempts`` while its failures are not permanent. ``delay_s`` schedules
        it that many seconds from now (Oban's ``schedule_in``).

        When it ends, ``webhook`` (an http(s) URL) gets its status as a JSON ``POST``
        (signed when ``OVERSTORY_WEBHOOK_SECRET`` is set in the cluster), and
        ``on_done(status)`` is called in this process (if it still runs and this runtime
        is not closed) by the runtime's one job watcher thread
        (:mod:`overstory.runtime.jobwatch`); a job gone from the store before it was
        seen ending gets a ``failed`` status naming the
        :class:`~overstory.exceptions.UnknownJob`.
        """
        name, _ = self._runtime._cid(user_id, agent)
        validate_message(text, max_chars=self._runtime.config.limits.max_message_chars)
        hook = validate_webhook(webhook)
        if on_done is not None and not callable(on_done):
            raise ConfigError(f"on_done must be callable, got {on_done!r}")
        job = new_job(
            user_id,
            name,
            text,
            max_attempts=max_attempts,
            webhook=hook,
            now=time.time(),
            delay_s=delay_s,
        )
        namespace = self._runtime.config.namespace
        run_on_store(self._runtime.config.store, lambda st: JobBook(st, namespace).add(job))
        self.poke()
        handle = Job(self, job.id, user_id, name)
        if on_done is not None:
            self._watcher.watch(job.id, status_callback(job, on_done))
        return handle

    def poke(self) -> None:
        """Wake the job runner (it would look within ``jobs.poll_s`` anyway)."""
        with suppress(ValueError, RayActorError):
            ray.get_actor(JOBS, namespace=self._runtime.config.namespace).poke.remote()

    def get(self, job_id: str) -> dict[str, Any]:
        """Job ``job_id``'s status: ``state`` (queued, running, succeeded, failed,
        cancelled), ``attempts``, ``reply`` (its answer's text), ``error`` (its last
        failure), times, ``turn_id`` …; :class:`~overstory.exceptions.UnknownJob` if
        there is none (jobs are kept ``jobs.keep_s`` after they end)."""
        namespace = self._runtime.config.namespace
        job_id = validate_job_id(job_id)
        record: JobRecord = run_on_store(
            self._runtime.config.store, lambda st: JobBook(st, namespace).status(job_id)
        )
        return record.public()

    def list(
        self, user_id: str | None = None, *, state: str | None = None, limit: int = 100
    ) -> builtins.list[dict[str, Any]]:
        """Jobs, newest first: ``user_id``'s, or everyone's; in ``state`` or any."""
        if user_id is not None:
            validate_user_id(user_id, max_chars=self._runtime.config.limits.max_user_id_chars)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise UsageError(f"limit must be an int 1..10000, got {limit!r}")
        namespace = self._runtime.config.namespace
        records: builtins.list[JobRecord] = run_on_store(
            self._runtime.config.store,
            lambda st: JobBook(st, namespace).listing(user=user_id, state=state, limit=limit),
        )
        return [r.public() for r in records]

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued job (also one waiting to be retried); its status after. A job
        running an attempt is not interrupted: :class:`~overstory.exceptions.UsageError`
        says so (as it does for one that has ended)."""
        namespace = self._runtime.config.namespace
        job_id = validate_job_id(job_id)

        async def go(store: Any) -> JobRecord:
            job, cancelled = await JobBook(store, namespace).cancel(job_id, time.time())
            if not cancelled:
                raise UsageError(f"job {job_id} is {job.state}: only a queued job is cancelled")
            return job

        record: JobRecord = run_on_store(self._runtime.config.store, go)
        return record.public()


class Job:
    """A background job (:meth:`Jobs.submit`): its ``id``, its status, its result."""

    def __init__(self, jobs: Jobs, job_id: str, user_id: str, agent: str) -> None:
        self._jobs = jobs
        self.id, self.user_id, self.agent = job_id, user_id, agent

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, user_id={self.user_id!r}, agent={self.agent!r})"

    @property
    def turn_id(self) -> str:
        """The turn it runs in the user's conversation (stored once, however often run)."""
        return job_turn_id(self.id)

    def status(self) -> dict[str, Any]:
        """:meth:`Jobs.get` of this job."""
        return self._jobs.get(self.id)

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Its status once it has ended (succeeded, failed or cancelled); ``TimeoutError``
        if it has not within ``timeout`` seconds (``None``: no limit)."""
        if timeout is not None and (isinstance(timeout, bool) or not timeout >= 0):
            raise UsageError(f"timeout must be seconds >= 0 or None, got {timeout!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.05
        while True:
            status = self.status()
            if status["state"] in TERMINAL:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"job {self.id} is still {status['state']} after {timeout:g} s "
                    f"(attempts: {status['attempts']})"
                )
            left = math.inf if deadline is None else deadline - time.monotonic()
            time.sleep(max(0.0, min(pause, left)))
            pause = min(pause * 2, 1.0)

    def result(self, timeout: float | None = None) -> str:
        """The answer's text once the job has succeeded; :class:`JobFailed` when it
        failed or was cancelled; ``TimeoutError`` after ``timeout`` seconds."""
        status = self.wait(timeout)
        if status["state"] != "succeeded":
            raise JobFailed(status)
        return str(status["reply"])

    def cancel(self) -> dict[str, Any]:
        """:meth:`Jobs.cancel` of this job."""
        return self._jobs.cancel(self.id)
