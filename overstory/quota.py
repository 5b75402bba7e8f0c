"""Per-user quotas that hold cluster-wide: tokens per day, turns per minute, turns at once.

One **ledger per user** lives in the store (a compare-and-set setting), not in any
process: every host and dedicated actor serving that user's conversations — on any node
— reads it, applies one pure step (:func:`apply`) and writes it back only if nobody
wrote in between (else it reads again). Nothing is held in memory that a kill could
lose, so there is no ledger to restart or recover.

Reserve, then commit:

* a new turn is **admitted** (:class:`Admit`) against the turns-per-minute window, the
  turns-at-once slots and the day's tokens, reserving an estimate of its first model
  call; nothing is stored for a turn refused here (:class:`~overstory.exceptions.QuotaExceeded`
  says which limit and when it frees);
* every later model call of the turn reserves its own estimate (:class:`Reserve`);
* a call's real usage replaces its reservation (:class:`Commit`); a call that failed,
  timed out or was cancelled gives it back (:class:`Release`); the turn's end frees its
  slot and anything it still held (:class:`Finish`);
* a host killed mid-turn cannot give anything back: every slot and reservation carries
  an expiry (the turn's deadline and a margin), after which the next step drops it.

Admission sums what is committed and what is reserved, so however many hosts run the
user's turns at once, the committed tokens exceed the day's budget only by what calls
used beyond their estimates.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from .exceptions import ConfigError, QuotaExceeded, StoreError
from .messages import AssistantMessage, Message
from .store import HistoryStore
from .store.settings import LEDGER, QUOTA, Backoff, SettingContended, update
from .telemetry import metrics

__all__ = [
    "UNSET",
    "Admit",
    "Commit",
    "Finish",
    "Ledger",
    "Quota",
    "QuotaBook",
    "Release",
    "Reserve",
    "Ticket",
    "Unset",
    "apply",
    "audited_refusal",
    "call_texts",
    "change_quota",
    "estimate_tokens",
    "finish",
    "ledger_key",
    "quota_key",
    "read_quota",
    "report",
    "step_ledger",
    "write_quota",
]

WINDOW_S = 60.0


class Unset(enum.Enum):
    """A keyword not given (``None`` means "no limit", so it cannot mean that)."""

    UNSET = "unset"


UNSET = Unset.UNSET
#: Quota and ledger writes by compare-and-set: tries and pauses (see Backoff).
_CAS = Backoff(attempts=64)


@dataclass(frozen=True)
class Quota:
    """A user's limits (``None``: no limit of that kind)."""

    tokens_per_day: int | None = None
    requests_per_minute: int | None = None
    concurrent_turns: int | None = None

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 0
            ):
                raise ConfigError(
                    f"quota {name} must be a whole number >= 0 or None, got {value!r}"
                )

    @property
    def limited(self) -> bool:
        return any(v is not None for v in asdict(self).values())

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "quota") -> Quota:
        unknown = set(data) - {"tokens_per_day", "requests_per_minute", "concurrent_turns"}
        if unknown:
            raise ConfigError(f"{source}: unknown quota key(s) {', '.join(sorted(unknown))}")
        return cls(**data)


@dataclass(frozen=True)
class Ledger:
    """One user's ledger: the UTC ``day`` and its committed ``tokens``; open
    ``reserved`` estimates and turn ``slots`` (each with its expiry); the start times of
    the turns of the last minute."""

    day: str = ""
    tokens: int = 0
    reserved: dict[str, tuple[int, float]] = field(default_factory=dict)  # id -> (tokens, expiry)
    slots: dict[str, float] = field(default_factory=dict)  # turn id -> expiry
    starts: tuple[float, ...] = ()

    def to_json(self) -> str:
        return json.dumps(
            {
                "day": self.day,
                "tokens": self.tokens,
                "reserved": {k: list(v) for k, v in self.reserved.items()},
                "slots": self.slots,
                "starts": list(self.starts),
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, raw: str) -> Ledger:
        try:
            data = json.loads(raw)
            return cls(
                str(data["day"]),
                int(data["tokens"]),
                {str(k): (int(v[0]), float(v[1])) for k, v in data["reserved"].items()},
                {str(k): float(v) for k, v in data["slots"].items()},
                tuple(float(t) for t in data["starts"]),
            )
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise StoreError(f"a stored quota ledger is unreadable ({exc}): {raw[:200]!r}") from exc

    @property
    def reserved_tokens(self) -> int:
        return sum(tokens for tokens, _ in self.reserved.values())


# --- the steps ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Admit:
    """Admit turn ``turn`` (a new one: counted against every limit) reserving
    ``estimate`` tokens for its first call as ``call``; a turn resumed after its process
    died (``new=False``) only takes its slot back, never refused."""

    turn: str
    call: str
    estimate: int
    expires: float
    new: bool = True


@dataclass(frozen=True)
class Reserve:
    call: str
    estimate: int
    expires: float


@dataclass(frozen=True)
class Commit:
    call: str
    tokens: int


@dataclass(frozen=True)
class Release:
    call: str


@dataclass(frozen=True)
class Finish:
    """The turn ended: free its slot and every reservation it still holds."""

    turn: str


Step = Admit | Reserve | Commit | Release | Finish


def _day(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")


def _next_midnight(now: float) -> float:
    today = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return (today + timedelta(days=1)).timestamp()


def _tidy(ledger: Ledger, now: float) -> Ledger:
    """Drop what expired (a process died holding it) and the starts older than a
    minute; a new UTC day starts with no committed tokens."""
    day = _day(now)
    return Ledger(
        day,
        ledger.tokens if ledger.day == day else 0,
        {k: v for k, v in ledger.reserved.items() if v[1] > now},
        {k: v for k, v in ledger.slots.items() if v > now},
        tuple(t for t in ledger.starts if t > now - WINDOW_S),
    )


def step_ledger(ledger: Ledger, step: Step, quota: Quota, now: float) -> Ledger:
    """The ledger after ``step`` — or :class:`QuotaExceeded` naming the limit and the
    seconds until it frees. The one rule every process applies (see the module doc)."""
    ledger = _tidy(ledger, now)
    if isinstance(step, Admit):
        if step.turn in ledger.slots:  # admitted already (a retried start): nothing new
            return ledger
        if step.new:
            limit = quota.requests_per_minute
            if limit is not None and len(ledger.starts) >= limit:
                wait = (ledger.starts[-limit] + WINDOW_S - now) if limit else WINDOW_S
                raise QuotaExceeded("requests_per_minute", limit, max(wait, 0.001))
            limit = quota.concurrent_turns
            if limit is not None and len(ledger.slots) >= limit:
                soonest = min(ledger.slots.values(), default=now + 1.0)
                raise QuotaExceeded("concurrent_turns", limit, min(1.0, soonest - now))
            _check_tokens(ledger, quota, step.estimate, now)
        return replace(
            ledger,
            reserved={**ledger.reserved, step.call: (step.estimate, step.expires)},
            slots={**ledger.slots, step.turn: step.expires},
            starts=(*ledger.starts, now) if step.new else ledger.starts,
        )
    if isinstance(step, Reserve):
        if step.call in ledger.reserved:
            return ledger
        _check_tokens(ledger, quota, step.estimate, now)
        return replace(
            ledger, reserved={**ledger.reserved, step.call: (step.estimate, step.expires)}
        )
    if isinstance(step, Commit):
        rest = {k: v for k, v in ledger.reserved.items() if k != step.call}
        return replace(ledger, tokens=ledger.tokens + step.tokens, reserved=rest)
    if isinstance(step, Release):
        return replace(
            ledger, reserved={k: v for k, v in ledger.reserved.items() if k != step.call}
        )
    prefix = f"{step.turn}#"
    return replace(
        ledger,
        reserved={k: v for k, v in ledger.reserved.items() if not k.startswith(prefix)},
        slots={k: v for k, v in ledger.slots.items() if k != step.turn},
    )


def _check_tokens(ledger: Ledger, quota: Quota, estimate: int, now: float) -> None:
    limit = quota.tokens_per_day
    if limit is not None and ledger.tokens + ledger.reserved_tokens + estimate > limit:
        raise QuotaExceeded("tokens_per_day", limit, max(_next_midnight(now) - now, 0.001))


def call_texts(instructions: str, history: Sequence[Message]) -> list[str]:
    """What a model call sends, as text (the input its estimate counts)."""
    texts = [instructions]
    for m in history:
        texts.append(m.content)
        if isinstance(m, AssistantMessage):
            texts += [json.dumps(c.arguments) for c in m.tool_calls]
    return texts


def estimate_tokens(texts: Sequence[str], output_tokens: int) -> int:
    """A call's reservation: its input at ~4 characters a token (rounded up), plus
    ``output_tokens`` for the answer."""
    return math.ceil(sum(len(t) for t in texts) / 4) + output_tokens


# --- the store ------------------------------------------------------------------------------


def _digest(user: str) -> str:
    return hashlib.sha256(user.encode()).hexdigest()[:32]


def quota_key(namespace: str, user: str) -> str:
    return QUOTA.key(namespace, _digest(user))


def ledger_key(namespace: str, user: str) -> str:
    return LEDGER.key(namespace, _digest(user))


async def read_quota(store: HistoryStore, namespace: str, user: str) -> Quota | None:
    """The user's own quota (``None``: the configured default applies)."""
    raw = await store.get_setting(quota_key(namespace, user))
    if raw is None:
        return None
    try:
        return Quota.from_mapping(json.loads(raw), source="stored quota")
    except (ValueError, TypeError, ConfigError) as exc:
        raise StoreError(f"the stored quota of a user is unreadable ({exc})") from exc


async def write_quota(store: HistoryStore, namespace: str, user: str, quota: Quota) -> None:
    try:
        await update(store, quota_key(namespace, user), lambda _: quota.to_json(), backoff=_CAS)
    except SettingContended as exc:
        raise StoreError("a user's quota kept changing while writing it") from exc


async def read_ledger(store: HistoryStore, namespace: str, user: str) -> Ledger:
    raw = await store.get_setting(ledger_key(namespace, user))
    return _tidy(Ledger() if raw is None else Ledger.from_json(raw), time.time())


async def apply(
    store: HistoryStore,
    namespace: str,
    user: str,
    quota: Quota,
    steps: Sequence[Step],
    now: float | None = None,
) -> Ledger:
    """Apply ``steps`` to the user's stored ledger in one compare-and-set (all or none:
    :class:`QuotaExceeded` from any step leaves it as it was)."""
    made: list[Ledger] = []

    def stepped(raw: str | None) -> str:
        ledger = Ledger() if raw is None else Ledger.from_json(raw)
        at = time.time() if now is None else now
        for step in steps:
            ledger = step_ledger(ledger, step, quota, at)
        made.append(ledger)
        return ledger.to_json()

    try:
        await update(store, ledger_key(namespace, user), stepped, backoff=_CAS)
    except QuotaExceeded as exc:
        metrics().quota_refusal(exc.limit)
        raise
    except SettingContended as exc:
        raise StoreError(
            "a user's quota ledger kept changing while writing it (too much contention)"
        ) from exc
    return made[-1]


async def change_quota(
    store: HistoryStore, namespace: str, user: str, default: Quota, changes: Mapping[str, Any]
) -> Quota:
    """Change the limits in ``changes`` of ``user``'s own quota (starting from
    ``default`` when they have none); the others keep their value."""
    current = await read_quota(store, namespace, user) or default
    changed = replace(current, **changes)  # validated again
    await write_quota(store, namespace, user, changed)
    return changed


async def report(store: HistoryStore, namespace: str, user: str, default: Quota) -> dict[str, Any]:
    """``{"user", "quota", "own" (theirs, or the default), "usage": {"day", "tokens",
    "reserved_tokens", "running_turns", "turns_last_minute"}}``."""
    own = await read_quota(store, namespace, user)
    ledger = await read_ledger(store, namespace, user)
    return {
        "user": user,
        "quota": asdict(own or default),
        "own": own is not None,
        "usage": {
            "day": ledger.day,
            "tokens": ledger.tokens,
            "reserved_tokens": ledger.reserved_tokens,
            "running_turns": len(ledger.slots),
            "turns_last_minute": len(ledger.starts),
        },
    }


# --- what a process serving conversations holds ---------------------------------------------


class QuotaBook:
    """A host's (or dedicated actor's) view of quotas: each user's quota, read from the
    store and kept ``refresh_s`` (a changed quota applies within that), and the default
    for users without one. :meth:`admit` is called before a turn stores anything."""

    def __init__(
        self,
        store: HistoryStore,
        namespace: str,
        default: Quota,
        *,
        turn_timeout_s: float,
        output_tokens: int,
        refresh_s: float = 5.0,
    ) -> None:
        self.store, self.namespace, self.default = store, namespace, default
        self.turn_timeout_s, self.output_tokens, self.refresh_s = (
            turn_timeout_s,
            output_tokens,
            refresh_s,
        )
        self._quotas: dict[str, tuple[Quota, float]] = {}

    async def quota(self, user: str) -> Quota:
        cached = self._quotas.get(user)
        now = time.monotonic()
        if cached is not None and now - cached[1] < self.refresh_s:
            return cached[0]
        quota = await read_quota(self.store, self.namespace, user) or self.default
        if len(self._quotas) > 50_000:
            self._quotas.clear()
        self._quotas[user] = (quota, now)
        return quota

    def forget(self, user: str | None = None) -> None:
        """A quota changed: read it again (one user's, or all)."""
        if user is None:
            self._quotas.clear()
        else:
            self._quotas.pop(user, None)

    async def admit_turn(
        self,
        user: str,
        conversation_id: str,
        turn_id: str,
        text: str,
        history: Sequence[Message],
        instructions: str,
        output_tokens: int | None = None,
    ) -> Ticket | None:
        """:meth:`admit` for a turn about to run on ``history`` (a turn id already in it
        is resumed, never refused); a refusal is written to the audit trail first.
        ``output_tokens``: the cap on each answer (else the configured estimate)."""
        new = not any(m.turn_id == turn_id for m in history)
        texts = [*call_texts(instructions, history), text]
        try:
            return await self.admit(user, conversation_id, turn_id, texts, new, output_tokens)
        except QuotaExceeded as exc:
            await audited_refusal(self.store, user, conversation_id, exc)
            raise

    async def admit(
        self,
        user: str,
        conversation_id: str,
        turn_id: str,
        texts: Sequence[str],
        new: bool,
        output_tokens: int | None = None,
    ) -> Ticket | None:
        """Admit turn ``turn_id`` of ``conversation_id``, a conversation of ``user``
        (``None`` when no limit applies to them), reserving its first call's estimate
        from ``texts`` (the instructions and the history the call will send). Raises
        :class:`QuotaExceeded`; nothing is written then."""
        quota = await self.quota(user)
        if not quota.limited:
            return None
        # Turn ids are unique within a conversation only: the ledger names turns by both.
        ticket = Ticket(self, user, quota, f"{conversation_id}/{turn_id}")
        await ticket.admit(texts, new, output_tokens)
        return ticket


class Ticket:
    """One admitted turn's reservations (see the module doc). Model calls are numbered
    ``<turn id>#<n>``; :meth:`finish` frees whatever the turn still holds."""

    def __init__(self, book: QuotaBook, user: str, quota: Quota, turn_id: str) -> None:
        self.book, self.user, self.quota, self.turn_id = book, user, quota, turn_id
        self._calls = 0
        self.open: str | None = None  # the call whose reservation is held
        self._open_estimate = 0

    def _expiry(self) -> float:
        return time.time() + self.book.turn_timeout_s + 30.0

    def _next_call(self) -> str:
        self._calls += 1
        return f"{self.turn_id}#{self._calls}"

    async def _apply(self, *steps: Step) -> None:
        await apply(self.book.store, self.book.namespace, self.user, self.quota, steps)

    def _estimate(self, texts: Sequence[str], output_tokens: int | None) -> int:
        """The input's estimate plus the answer's cap (``None``: the configured guess)."""
        return estimate_tokens(texts, output_tokens or self.book.output_tokens)

    async def admit(
        self, texts: Sequence[str], new: bool, output_tokens: int | None = None
    ) -> None:
        call, estimate = self._next_call(), self._estimate(texts, output_tokens)
        await self._apply(Admit(self.turn_id, call, estimate, self._expiry(), new))
        self.open, self._open_estimate = call, estimate

    async def before_call(self, texts: Sequence[str], output_tokens: int | None = None) -> None:
        """Reserve the next model call's estimate — its input, plus ``output_tokens``, the
        cap on its answer — (the first call's was reserved at admission). Raises
        :class:`QuotaExceeded`."""
        if self.open is None:
            call, estimate = self._next_call(), self._estimate(texts, output_tokens)
            await self._apply(Reserve(call, estimate, self._expiry()))
            self.open, self._open_estimate = call, estimate

    def estimate_of_open(self) -> int:
        """The open call's reservation (what counts when its real usage is unknown)."""
        return self._open_estimate

    async def after_call(self, tokens: int | None) -> None:
        """The call ended: its real usage (``None``: it failed; the estimate is given
        back) replaces its reservation."""
        call, self.open = self.open, None
        if call is not None:
            await self._apply(Release(call) if tokens is None else Commit(call, tokens))

    async def finish(self) -> None:
        """The turn ended however it ended: its slot and reservations are freed."""
        self.open = None
        await self._apply(Finish(self.turn_id))


async def finish(ticket: Ticket) -> None:
    """Free what ``ticket`` holds — also while its turn is being cancelled (shielded).
    A store that cannot be reached leaves it to expire (the next step drops it)."""
    with contextlib.suppress(StoreError):
        await asyncio.shield(ticket.finish())


async def audited_refusal(
    store: HistoryStore, user: str, conversation_id: str, exc: QuotaExceeded
) -> None:
    """The audit record of a turn the quota refused."""
    from .audit import note

    await note(
        store,
        who=user,
        action="quota.refused",
        target=conversation_id,
        outcome="refused",
        detail={
            "limit": exc.limit,
            "value": exc.value,
            "retry_after_s": round(exc.retry_after_s, 1),
        },
    )
