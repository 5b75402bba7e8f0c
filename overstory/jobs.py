"""Durable background jobs: a turn queued in the store, run later, at least once.

``rt.jobs.submit(user, text)`` writes a job and returns at once; the tree's job runner
(:mod:`overstory.actors.jobs`) runs it as a turn of the user's conversation and keeps
its status, attempts and result here. Everything about a job is one record in the
store's settings, changed only by compare-and-set through the pure transitions below
(:func:`claim`, :func:`renew`, :func:`succeed`, :func:`fail`, :func:`cancel`,
:func:`delivered`); no process holds state another needs after it dies.

**The queue is an index of times.** Beside each record whose job has work left (to run,
or a webhook to deliver) lies one queue entry ``overstory.jobq:<ns>:<due ms>:<id>``;
settings list in key order, so the runner reads the due ones first and stops at the
first in the future. A running job's entry is due when its lease ends: a runner that
dies leaves its jobs due again after at most a lease, with nothing to clean up first.
Moving a job writes its new entry, then compare-and-sets the record, then deletes the
old entry; a crash between steps leaves at most an entry that disagrees with its
record's ``due``, which the next scan deletes (:meth:`JobBook.tidy`).

**At least once, stored once.** Every attempt sends the same turn id
(:attr:`JobRecord.turn_id`), which the conversation treats idempotently: an attempt
after a crash returns the stored reply, or resumes the turn from its last stored
message; the user's message and the answer are stored once however often it runs.

Texts and replies are sealed with the store's data keys (bound to the job's id) when
history is.
"""

from __future__ import annotations

import hmac
import json
import math
import re
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from hashlib import sha256
from typing import TYPE_CHECKING, Any, Literal, cast
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from .config import JobSettings
from .exceptions import ConfigError, DataKeyError, UnknownJob, UsageError
from .store.base import HistoryStore
from .store.crypto import DataKeys, is_sealed, key_id_of, register_resealer, reseal_settings
from .store.settings import (
    CONFLICT,
    JOB,
    JOB_QUEUE,
    JOB_TURN,
    Backoff,
    Conflict,
    contend,
)

__all__ = [
    "JOB_STATES",
    "TERMINAL",
    "JobBook",
    "JobRecord",
    "JobState",
    "backoff_s",
    "cancel",
    "claim",
    "claimable",
    "delivered",
    "fail",
    "is_permanent",
    "job_turn_id",
    "new_job",
    "pick",
    "renew",
    "reseal_jobs",
    "sign",
    "succeed",
    "validate_job_id",
    "validate_webhook",
]

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JOB_STATES: tuple[JobState, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

#: A webhook is tried this many times (with backoff) before it is given up.
MAX_DELIVERIES = 5
#: Retry backoff: ``BASE * 2**(attempt-1)`` seconds, capped, with ±20 % jitter.
BACKOFF_BASE_S = 2.0
BACKOFF_CAP_S = 300.0
MAX_ATTEMPTS = 100
MAX_WEBHOOK_CHARS = 2048
MAX_DELAY_S = 366 * 86_400.0
_ID = re.compile(r"^job_[0-9]{13}[0-9a-f]{12}$")


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One job as stored (texts in the clear here; sealed in the store)."""

    id: str
    user: str
    agent: str
    text: str
    max_attempts: int
    created_at: float
    due: float
    """When the queue looks at the job next: its start (queued), its lease's end
    (running), now (a webhook to deliver)."""
    state: JobState = "queued"
    attempts: int = 0
    runner: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    error: str = ""
    reply: str = ""
    incomplete: str = ""
    webhook: str = ""
    notified: bool = True
    deliveries: int = 0
    webhook_error: str = ""
    turn: str = ""
    """The turn id its submitter chose (the HTTP door: the response id); else derived."""
    version: str = ""
    """The agent version its turn runs on ("": the rollout's)."""

    @property
    def turn_id(self) -> str:
        """The turn every attempt sends: the conversation stores it once."""
        return self.turn or job_turn_id(self.id)

    @property
    def has_work(self) -> bool:
        """Whether the queue holds an entry for it (to run, or to notify)."""
        return self.state not in TERMINAL or not self.notified

    def public(self) -> dict[str, Any]:
        """What ``rt.jobs.get`` and ``overstory jobs`` show (the text too: it is the caller's)."""
        shown = asdict(self)
        shown["turn_id"] = self.turn_id
        shown["webhook"] = _shown_url(self.webhook)
        del shown["runner"], shown["due"]
        shown["next_attempt_at"] = self.due if self.state == "queued" else None
        return shown


def _shown_url(url: str) -> str:
    """A webhook as status shows it: scheme and host only (a URL's path or query often
    holds a token, as Slack's and Discord's do)."""
    if not url:
        return ""
    parts = urlsplit(url)
    rest = "/…" if parts.path.strip("/") or parts.query else ""
    return f"{parts.scheme}://{parts.netloc}{rest}"


# --- the pure rules -----------------------------------------------------------------------


def job_turn_id(job_id: str) -> str:
    """The turn id of job ``job_id``'s every attempt."""
    return f"{job_id}-turn"


def new_job(
    user: str,
    agent: str,
    text: str,
    *,
    max_attempts: int,
    webhook: str,
    now: float,
    delay_s: float = 0.0,
    turn_id: str = "",
    version: str = "",
    token: str | None = None,
) -> JobRecord:
    """A queued job, due now (or ``delay_s`` seconds from now, at most a year). Its id
    sorts by creation time (``job_<ms><random>``)."""
    if (
        isinstance(delay_s, bool)
        or not isinstance(delay_s, int | float)
        or not 0 <= delay_s <= MAX_DELAY_S
    ):
        raise ConfigError(f"delay_s must be seconds in [0, {MAX_DELAY_S:g}], got {delay_s!r}")
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int):
        raise ConfigError(f"max_attempts must be an int, got {max_attempts!r}")
    if not 1 <= max_attempts <= MAX_ATTEMPTS:
        raise ConfigError(f"max_attempts must be 1..{MAX_ATTEMPTS}, got {max_attempts}")
    job_id = f"job_{int(now * 1000):013d}{token or secrets.token_hex(6)}"
    return JobRecord(
        id=job_id,
        user=user,
        agent=agent,
        text=text,
        max_attempts=max_attempts,
        created_at=now,
        due=now + float(delay_s),
        webhook=webhook,
        turn=turn_id,
        version=version,
    )


def validate_job_id(job_id: object) -> str:
    if not isinstance(job_id, str) or not _ID.match(job_id):
        raise UsageError(f"a job id looks like 'job_' + 25 digits and hex, got {job_id!r}")
    return job_id


def validate_webhook(url: object) -> str:
    """An ``http(s)://host/...`` URL of at most 2048 characters (``None``: no webhook)."""
    if url is None:
        return ""
    if not isinstance(url, str) or not url or len(url) > MAX_WEBHOOK_CHARS:
        raise ConfigError(f"webhook must be an http(s) URL of 1..{MAX_WEBHOOK_CHARS} characters")
    if not url.isprintable() or any(c.isspace() for c in url):
        raise ConfigError(f"webhook must not hold spaces or control characters: {url[:80]!r}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"webhook must be an http:// or https:// URL with a host, got {url!r}")
    if parts.username or parts.password:
        raise ConfigError("webhook must not carry credentials in its URL")
    return url


def claimable(job: JobRecord, now: float, me: str) -> bool:
    """Whether runner ``me`` may take ``job`` now: queued and due, or running on a lease
    that ended (its runner died), or held by another incarnation of the runner (there
    is one runner per namespace, so another one's job is a dead one's; running it again
    is safe because its turn is idempotent)."""
    if job.state == "queued":
        return job.due <= now
    return job.state == "running" and (job.due <= now or job.runner != me)


def claim(job: JobRecord, now: float, me: str, lease_s: float) -> JobRecord:
    """The job running on ``me``'s lease: one more attempt."""
    if not claimable(job, now, me):
        raise ValueError(f"job {job.id} is {job.state} and not claimable by {me}")
    return replace(
        job,
        state="running",
        attempts=job.attempts + 1,
        runner=me,
        due=now + lease_s,
        started_at=job.started_at if job.started_at is not None else now,
    )


def renew(job: JobRecord, now: float, me: str, lease_s: float) -> JobRecord | None:
    """The lease extended; ``None`` when the job is no longer ``me``'s to run."""
    if job.state != "running" or job.runner != me:
        return None
    return replace(job, due=now + lease_s)


def succeed(job: JobRecord, now: float, reply: str, incomplete: str = "") -> JobRecord:
    return replace(
        job,
        state="succeeded",
        reply=reply,
        incomplete=incomplete,
        error="",
        finished_at=now,
        due=now,
        notified=not job.webhook,
    )


def backoff_s(attempt: int, jitter: float = 0.5) -> float:
    """Seconds before attempt ``attempt + 1``: 2, 4, 8 … capped at 300, times
    ``0.8 + 0.4 * jitter`` (``jitter`` in [0, 1])."""
    base = min(BACKOFF_BASE_S * 2.0 ** max(attempt - 1, 0), BACKOFF_CAP_S)
    return float(base * (0.8 + 0.4 * min(max(jitter, 0.0), 1.0)))


def fail(
    job: JobRecord,
    now: float,
    error: str,
    *,
    permanent: bool,
    not_before_s: float = 0.0,
    jitter: float = 0.5,
) -> JobRecord:
    """After a failed attempt: queued again after a backoff (at least ``not_before_s``,
    a quota's retry-after), or failed for good when the error is permanent or the
    attempts are spent."""
    if permanent or job.attempts >= job.max_attempts:
        return replace(
            job, state="failed", error=error, finished_at=now, due=now, notified=not job.webhook
        )
    wait = max(backoff_s(job.attempts, jitter), not_before_s)
    return replace(job, state="queued", error=error, runner="", due=now + wait)


def cancel(job: JobRecord, now: float) -> JobRecord | None:
    """Cancelled, if it has not started an attempt that is running (``None``: it is
    running or finished; a running turn is not interrupted)."""
    if job.state != "queued":
        return None
    return replace(job, state="cancelled", finished_at=now, due=now, notified=not job.webhook)


def delivered(job: JobRecord, now: float, error: str = "", *, jitter: float = 0.5) -> JobRecord:
    """After one webhook delivery: done (``error`` empty), retried after a backoff, or
    given up after :data:`MAX_DELIVERIES` (the error kept)."""
    deliveries = job.deliveries + 1
    if not error or deliveries >= MAX_DELIVERIES:
        return replace(job, notified=True, deliveries=deliveries, webhook_error=error)
    return replace(
        job, deliveries=deliveries, webhook_error=error, due=now + backoff_s(deliveries, jitter)
    )


def pick(
    candidates: Iterable[JobRecord], running: Mapping[str, int], limits: JobSettings
) -> list[JobRecord]:
    """Which ``candidates`` (in due order) to start, given how many jobs each user has
    ``running``: never more than ``limits.concurrency`` in all, nor ``limits.per_user``
    for one user."""
    per_user = dict(running)
    total = sum(per_user.values())
    chosen: list[JobRecord] = []
    for job in candidates:
        if total >= limits.concurrency:
            break
        if per_user.get(job.user, 0) >= limits.per_user:
            continue
        chosen.append(job)
        per_user[job.user] = per_user.get(job.user, 0) + 1
        total += 1
    return chosen


def is_permanent(exc: BaseException) -> bool:
    """Whether another attempt cannot help: bad input, an unknown agent, a model that
    refused the request itself (not overloaded, not down), a turn interrupted and
    overtaken by later turns."""
    if isinstance(exc, UsageError):
        return True
    cause = exc.__cause__
    retryable = getattr(cause, "retryable", None)
    if retryable is False:
        return True
    return type(cause).__name__ == "MaxRoundTripsExceeded"


def sign(secret: str, body: bytes, now: float) -> str:
    """The ``overstory-signature`` header of a webhook: ``t=<unix s>,v1=<hex>`` where v1
    is HMAC-SHA256 over ``"<t>." + body`` (Stripe's scheme: a receiver checks it and
    refuses old timestamps, so a captured delivery cannot be replayed later)."""
    stamp = str(int(now))
    mac = hmac.new(secret.encode(), stamp.encode() + b"." + body, sha256).hexdigest()
    return f"t={stamp},v1={mac}"


# --- the records in the store -------------------------------------------------------------


#: Every job record's key starts with it (then ``<namespace>:<job id>``).
_JOBS_PREFIX = JOB.prefix()


def _ms(t: float) -> str:
    return f"{max(math.ceil(t * 1000), 0):015d}"


class JobBook:
    """A namespace's jobs in ``store``: records, the queue index, sealing."""

    def __init__(self, store: HistoryStore, namespace: str) -> None:
        self.store, self.namespace = store, namespace
        self._jobs = JOB.prefix(namespace)
        self._queue = JOB_QUEUE.prefix(namespace)

    # keys and encoding

    def job_key(self, job_id: str) -> str:
        return JOB.key(self.namespace, job_id)

    def entry_key(self, due: float, job_id: str) -> str:
        return JOB_QUEUE.key(self.namespace, _ms(due), job_id)

    def _aad(self, job_id: str) -> str:
        return f"job\0{self.namespace}\0{job_id}"

    def encode(self, job: JobRecord) -> str:
        record = asdict(job)
        keys = self.store.data_keys
        if keys is not None:
            record["text"] = keys.seal(job.text, self._aad(job.id), 0)
            if job.reply:
                record["reply"] = keys.seal(job.reply, self._aad(job.id), 1)
        return json.dumps(record, sort_keys=True, separators=(",", ":"))

    def decode(self, raw: str) -> JobRecord:
        record = json.loads(raw)
        keys = self.store.data_keys
        for field, seq in (("text", 0), ("reply", 1)):
            if is_sealed(record[field]):
                if keys is None:
                    raise DataKeyError(
                        f"job {record['id']} is encrypted (data key "
                        f"{key_id_of(record[field])!r}) and no data key is configured"
                    )
                record[field] = keys.open(record[field], self._aad(record["id"]), seq)
        record["state"] = cast(JobState, record["state"])
        return JobRecord(**record)

    # reading

    async def get(self, job_id: str) -> tuple[str, JobRecord] | None:
        raw = await self.store.get_setting(self.job_key(job_id))
        return None if raw is None else (raw, self.decode(raw))

    async def status(self, job_id: str) -> JobRecord:
        found = await self.get(validate_job_id(job_id))
        if found is None:
            raise UnknownJob(f"no job {job_id!r} in namespace {self.namespace!r}")
        return found[1]

    async def listing(
        self, *, user: str | None = None, state: str | None = None, limit: int = 100
    ) -> list[JobRecord]:
        """Jobs, newest first, of ``user`` / in ``state`` (a scan of every record: jobs
        are kept ``jobs.keep_s`` after they end)."""
        if state is not None and state not in JOB_STATES:
            raise UsageError(f"state must be one of {', '.join(JOB_STATES)}, got {state!r}")
        found = [
            job
            async for _key, _raw, job in self._records()
            if (user is None or job.user == user) and (state is None or job.state == state)
        ]
        found.reverse()
        return found[:limit]

    async def _records(self) -> AsyncIterator[tuple[str, str, JobRecord]]:
        """Every job record of the namespace, oldest first: ``(key, raw, decoded)``."""
        after = ""
        while page := await self.store.settings(self._jobs, after=after, limit=500):
            for key, raw in page:
                yield key, raw, self.decode(raw)
            after = page[-1][0]

    async def due(self, now: float, limit: int = 100) -> list[tuple[str, float, str]]:
        """Queue entries due by ``now`` (``(entry key, due, job id)``), soonest first;
        with ``now`` infinite, every entry."""
        out: list[tuple[str, float, str]] = []
        for key, _ in await self.store.settings(self._queue, limit=limit):
            stamp, _, job_id = key[len(self._queue) :].partition(":")
            due = int(stamp) / 1000
            if due > now:
                break
            out.append((key, due, job_id))
        return out

    # writing

    async def add(self, job: JobRecord) -> None:
        """Store a new job: its queue entry first, so a record never lacks one."""
        await self.store.put_setting(self.entry_key(job.due, job.id), job.id, expected=None)
        if not await self.store.put_setting(self.job_key(job.id), self.encode(job), expected=None):
            raise UsageError(f"job id {job.id} is taken")  # 48 random bits: practically never

    def _turn_key(self, turn: str) -> str:
        return JOB_TURN.key(self.namespace, turn)

    async def add_once(self, job: JobRecord) -> JobRecord:
        """Store a job for its chosen turn (:attr:`JobRecord.turn`) unless one is stored
        for that turn already: then that one. Retried requests make one job."""
        assert job.turn, "add_once is for jobs with a chosen turn id"
        slot = self._turn_key(job.turn)
        if not await self.store.put_setting(slot, job.id, expected=None):
            first = await self.store.get_setting(slot) or job.id
            found = await self.get(first)
            if found is not None:
                return found[1]
            job = replace(job, id=first)  # its maker died between the two writes
        try:
            await self.add(job)
        except UsageError:  # another request made it meanwhile
            found = await self.get(job.id)
            if found is None:
                raise
            return found[1]
        return job

    async def cancel(self, job_id: str, now: float) -> tuple[JobRecord, bool]:
        """Cancel job ``job_id`` if it is queued (:func:`cancel`, by compare-and-set):
        ``(its record after, whether this cancelled it)``; ``UnknownJob`` if none."""
        changed = await self.change(validate_job_id(job_id), lambda job: cancel(job, now))
        if changed is None:
            raise UnknownJob(f"no job {job_id!r} in namespace {self.namespace!r}")
        return changed

    async def change(
        self,
        job_id: str,
        step: Callable[[JobRecord], JobRecord | None],
        *,
        backoff: Backoff | None = None,
    ) -> tuple[JobRecord, bool] | None:
        """Apply the pure transition ``step`` to the stored job by compare-and-set
        (:meth:`move`), again after another writer got in first: ``(its record after,
        whether ``step`` changed it)``, ``None`` when the job is gone. ``step``
        returning ``None`` declines. Raises ``SettingContended`` when every attempt of
        ``backoff`` lost."""

        async def attempt() -> tuple[JobRecord, bool] | Conflict | None:
            found = await self.get(job_id)
            if found is None:
                return None
            raw, job = found
            new = step(job)
            if new is None:
                return job, False
            if await self.move(raw, job, new) is not None:
                return new, True
            return CONFLICT

        return await contend(
            self.job_key(job_id), attempt, backoff=backoff or Backoff(), what=f"job {job_id}"
        )

    async def for_turn(self, turn: str) -> JobRecord | None:
        """The job stored for chosen turn ``turn`` (:meth:`add_once`), if any."""
        job_id = await self.store.get_setting(self._turn_key(turn))
        found = None if job_id is None else await self.get(job_id)
        return None if found is None else found[1]

    async def move(self, raw: str, old: JobRecord, new: JobRecord) -> str | None:
        """Compare-and-set ``old`` (stored as ``raw``) to ``new``, moving its queue entry;
        the new raw record, or ``None`` when another writer changed it first."""
        new_entry = self.entry_key(new.due, new.id) if new.has_work else None
        old_entry = self.entry_key(old.due, old.id) if old.has_work else None
        if new_entry is not None and new_entry != old_entry:
            await self.store.put_setting(new_entry, new.id, expected=None)
        encoded = self.encode(new)
        if not await self.store.put_setting(self.job_key(new.id), encoded, expected=raw):
            if new_entry is not None and new_entry != old_entry:
                await self.store.delete_setting(new_entry, expected=new.id)
            return None
        if old_entry is not None and old_entry != new_entry:
            await self.store.delete_setting(old_entry, expected=old.id)
        return encoded

    async def tidy(
        self, entry: str, due: float, job_id: str, now: float
    ) -> tuple[str, JobRecord] | None:
        """The job an entry points at (raw and decoded) — or ``None`` after deleting a stale entry (its job
        gone, finished and notified, or moved to another time). An entry younger than a
        minute whose job is missing may be a submit in progress, and is kept."""
        found = await self.get(job_id)
        if found is None:
            if due < now - 60:
                await self.store.delete_setting(entry, expected=job_id)
            return None
        job = found[1]
        if not job.has_work or self.entry_key(job.due, job.id) != entry:
            await self.store.delete_setting(entry, expected=job_id)
            return None
        return found

    async def sweep(self, now: float, keep_s: float) -> int:
        """Delete jobs that ended (and were notified) more than ``keep_s`` ago."""
        gone = 0
        async for key, raw, job in self._records():
            ended = job.finished_at
            if not job.has_work and ended is not None and ended < now - keep_s:
                gone += await self.store.delete_setting(key, expected=raw)
                if job.turn:
                    await self.store.delete_setting(self._turn_key(job.turn), expected=job.id)
        return gone


async def reseal_jobs(store: HistoryStore, keys: DataKeys, batch: int) -> dict[str, int]:
    """Seal every job record's text and reply under the primary data key (plain ones,
    and those under an older key), each by compare-and-set, again if a runner changed
    the record meanwhile: for ``keys rotate-data`` (registered with the store's crypto)."""

    def resealed(key: str, raw: str | None) -> str | None:
        if raw is None:
            return None  # swept meanwhile
        record = json.loads(raw)
        fields = [record["text"]] + ([record["reply"]] if record["reply"] else [])
        if all(key_id_of(f) == keys.primary for f in fields):
            return None
        book = JobBook(store, key[len(_JOBS_PREFIX) :].partition(":")[0])
        return book.encode(book.decode(raw))

    return await reseal_settings(store, _JOBS_PREFIX, batch, resealed)


register_resealer("jobs", reseal_jobs)
