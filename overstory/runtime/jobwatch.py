"""Calling back when background jobs end: one watcher per :class:`~overstory.Runtime`.

``rt.submit(..., on_done=callback)`` hands the job to the runtime's :class:`JobWatcher`.
The watcher is one thread holding one store connection, whatever the number of jobs it
watches: it looks at each pending job's record (:meth:`~overstory.jobs.JobBook.status`),
backing off per job (0.05 s doubling to 1 s: a job just submitted is seen ending soon,
a long one costs one read a second), and calls the job's callbacks once it has ended.
The thread starts with the first pending job and ends, closing its store connection,
when none is left or the runtime is closed; the next ``submit`` starts it again.

A job that is gone from the store (deleted, or swept before it was seen ending) is not
waited for forever: its callback gets a ``failed`` status whose ``error`` names the
:class:`~overstory.exceptions.UnknownJob`. A store that cannot be reached is retried
with the same backoff. Callbacks run one after another in the watcher's thread; one
that raises is logged and does not stop the others.

The job book has no way to wait for a change (the store is polled, as
:meth:`~overstory.Job.wait` polls), so the backoff is the whole cost; a notification
from the job runner could replace it without changing this interface.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ..exceptions import ConfigError, UnknownJob, UsageError
from ..jobs import TERMINAL, JobBook, JobRecord
from ..store import open_store
from ..store.base import HistoryStore

__all__ = ["PAUSE_S", "JobWatcher", "Outcome", "status_callback"]

log = logging.getLogger(__name__)

#: What a watch delivers: the job's record once it ended, or why it cannot be found.
Outcome = JobRecord | UnknownJob

#: The pause before a pending job is looked at again: first, then doubling to the cap.
PAUSE_S = (0.05, 1.0)


def status_callback(
    submitted: JobRecord, on_done: Callable[[dict[str, Any]], None]
) -> Callable[[Outcome], None]:
    """``on_done`` as a watch's callback: it gets the job's public status once it ended;
    for a job gone from the store, the submitted record marked ``failed`` with the
    reason in ``error`` (the same keys either way)."""

    def deliver(outcome: Outcome) -> None:
        if isinstance(outcome, UnknownJob):
            gone = replace(
                submitted,
                state="failed",
                error=f"UnknownJob: {outcome} (deleted, or swept before it was seen ending)",
                finished_at=time.time(),
                notified=True,
            )
            on_done(gone.public())
        else:
            on_done(outcome.public())

    return deliver


@dataclass(slots=True)
class _Pending:
    job_id: str
    deliver: Callable[[Outcome], None]
    pause: float
    due: float  # monotonic time of its next look


class JobWatcher:
    """The pending ``on_done`` callbacks of one runtime, watched by one thread.

    ``pause_s`` is ``(first, longest)`` pause between two looks at one job; ``clock``
    the monotonic clock the pauses are measured with.
    """

    def __init__(
        self,
        store_url: str,
        namespace: str,
        *,
        pause_s: tuple[float, float] = PAUSE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        first, longest = pause_s
        if not 0 < first <= longest:
            raise ConfigError(
                f"pause_s must be (first, longest) with 0 < first <= longest, got {pause_s!r}"
            )
        self.store_url, self.namespace = store_url, namespace
        self._first, self._longest = first, longest
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._failing = False  # the store failed on the last look (warn once per outage)

    # --- the caller's side --------------------------------------------------------------

    def watch(self, job_id: str, deliver: Callable[[Outcome], None]) -> None:
        """Call ``deliver`` once job ``job_id`` has ended (or is found gone)."""
        with self._lock:
            if self._closed:
                raise UsageError(f"the runtime is closed: job {job_id} cannot be watched")
            self._pending[next(self._ids)] = _Pending(job_id, deliver, self._first, self._clock())
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._main, name="overstory-job-watcher", daemon=True
                )
                self._thread.start()
        self._wake.set()

    @property
    def pending(self) -> int:
        """How many callbacks wait for their job to end."""
        with self._lock:
            return len(self._pending)

    @property
    def thread(self) -> threading.Thread | None:
        """The watcher's thread while it runs (``None``: nothing pending)."""
        with self._lock:
            return self._thread

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop watching: the thread ends (within ``timeout_s``) and pending callbacks
        are dropped, with a warning saying how many (their jobs still run)."""
        with self._lock:
            self._closed = True
            dropped = len(self._pending)
            self._pending.clear()
            thread = self._thread
        self._wake.set()
        if dropped:
            log.warning("runtime closed with %d on_done callback(s) still pending", dropped)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    # --- the watcher's thread -----------------------------------------------------------

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        store: HistoryStore | None = None
        try:
            while True:
                self._wake.clear()  # before reading: a watch() after this wakes us again
                with self._lock:
                    if self._closed or not self._pending:
                        self._thread = None
                        return
                    now = self._clock()
                    due = [(k, p) for k, p in self._pending.items() if p.due <= now]
                if due:
                    store = self._look(loop, store, due)
                with self._lock:
                    if self._closed or not self._pending:
                        continue
                    wait = min(p.due for p in self._pending.values()) - self._clock()
                if wait > 0:
                    self._wake.wait(wait)
        except BaseException:  # a bug here must not leave callers waiting in silence
            log.exception("the job watcher stopped; %d on_done callback(s) dropped", self.pending)
            with self._lock:
                self._pending.clear()
                self._thread = None
            raise
        finally:
            if store is not None:
                try:
                    loop.run_until_complete(store.close())
                except Exception as exc:
                    log.debug("closing the job watcher's store: %s", exc)
            loop.close()

    def _look(
        self,
        loop: asyncio.AbstractEventLoop,
        store: HistoryStore | None,
        due: list[tuple[int, _Pending]],
    ) -> HistoryStore | None:
        """Look at each due job once: deliver those that ended, back off the others.
        Returns the store connection to keep (``None`` after it failed)."""
        try:
            if store is None:
                store = open_store(self.store_url)
                loop.run_until_complete(store.open())
            book = JobBook(store, self.namespace)
            for key, pending in due:
                outcome: Outcome | None
                try:
                    record = loop.run_until_complete(book.status(pending.job_id))
                    outcome = record if record.state in TERMINAL else None
                except UnknownJob as exc:
                    outcome = exc
                if outcome is None:
                    self._back_off(key, pending)
                    continue
                with self._lock:
                    if self._pending.pop(key, None) is None:
                        continue  # closed meanwhile
                try:
                    pending.deliver(outcome)
                except Exception:
                    log.exception("on_done of job %s raised", pending.job_id)
        except Exception as exc:  # the store is away: try again after the backoff
            (log.debug if self._failing else log.warning)(
                "the job watcher cannot read the store (%s: %s); retrying",
                type(exc).__name__,
                exc,
            )
            self._failing = True
            for key, pending in due:
                self._back_off(key, pending)
            if store is not None:
                try:
                    loop.run_until_complete(store.close())
                except Exception as close_exc:
                    log.debug("closing a failed store: %s", close_exc)
            return None
        self._failing = False
        return store

    def _back_off(self, key: int, pending: _Pending) -> None:
        with self._lock:
            if key in self._pending:
                pending.pause = min(pending.pause * 2, self._longest)
                pending.due = self._clock() + pending.pause
