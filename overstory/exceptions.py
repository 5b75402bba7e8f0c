"""Every error overstory raises, in one place.

User mistakes (bad configuration, bad input) are distinct from runtime failures, and
both sides subclass the stdlib exceptions users already catch::

    OverstoryError
    ├── UsageError (ValueError)             the caller got something wrong; retrying won't help
    │   ├── ConfigError                     unknown key, wrong type, bad value in a config
    │   ├── StoreURLError                   a store URL overstory cannot parse or does not support
    │   ├── VaultError                      a DataVault call with a bad collection, key, document or filter
    │   ├── DataKeyError                    a data key missing, malformed or wrong; a sealed record altered or moved
    │   ├── BackupInvalid                   a backup file truncated, corrupted, tampered or of another format version
    │   ├── StoreNotEmpty                   a restore into a store that already holds records (names them)
    │   ├── InvalidUserId                   empty, too long, or control characters
    │   ├── InvalidMessage                  empty, oversized, or not text
    │   ├── ToolDefinitionError             a tool function that cannot be described to a model
    │   ├── UnknownAgent                    no agent of that name is served (lists the served)
    │   ├── UnknownTurn                     no turn of that id in the conversation
    │   ├── UnknownJob                      no background job of that id
    │   ├── UnknownKey                      no API key of that id
    │   ├── AuthenticationFailed            credentials missing, malformed, unknown or revoked
    │   ├── UnknownConversation             no such conversation for this principal (HTTP 404)
    │   └── NotPermitted                    shared with them, but not for this (HTTP 403)
    └── RuntimeFailure (RuntimeError)       something failed while running; may be retried
        ├── StoreError                      the history store failed
        │   ├── StoreUnavailable            cannot reach / open the store
        │   ├── SequenceConflict            a (conversation, seq) record already exists
        │   └── Fenced                      a newer incarnation owns the conversation
        ├── ModelError                      a model / provider call failed (``kind`` says why)
        │   └── AllModelsFailed             every model in a chain failed; lists each failure
        ├── MaxRoundTripsExceeded           a turn needed more model round trips than allowed
        ├── TurnFailed                      a turn did not complete; the user message is stored
        │   └── TurnIncomplete              a streamed turn cut short (stored as such)
        ├── QuotaExceeded                   a user's quota refused a turn (which limit, when it frees)
        ├── JobFailed                       a background job failed or was cancelled (its error)
        ├── ConversationUnavailable         the conversation cannot be reached/started
        │   ├── Passivated                  it is shutting down; ask the registry again
        │   ├── StaleShardTable             routed with an old shard table (carries the new one)
        │   └── ConversationQuarantined     it kept crashing; its host refuses it for a while
        └── ClusterUnavailable              no Ray cluster to attach to, or none answers in time
            └── ClusterAuthRefused          the cluster refused this client (token auth)

Errors from Ray, PyMongo, sqlite3 and the vendor SDKs are translated into this tree where
they enter (``store/``, ``registry/``, ``actors/``, ``providers/``); none of them leak out
of the public API.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Literal

__all__ = [
    "AllModelsFailed",
    "AuthenticationFailed",
    "BackupInvalid",
    "ClusterAuthRefused",
    "ClusterUnavailable",
    "ConfigError",
    "ConversationQuarantined",
    "ConversationUnavailable",
    "DataKeyError",
    "Fenced",
    "InvalidMessage",
    "InvalidUserId",
    "JobFailed",
    "MaxRoundTripsExceeded",
    "ModelError",
    "ModelErrorKind",
    "NotPermitted",
    "OverstoryError",
    "Passivated",
    "QuotaExceeded",
    "RuntimeFailure",
    "SequenceConflict",
    "StaleShardTable",
    "StoreError",
    "StoreNotEmpty",
    "StoreURLError",
    "StoreUnavailable",
    "ToolDefinitionError",
    "TurnFailed",
    "TurnIncomplete",
    "UnknownAgent",
    "UnknownConversation",
    "UnknownJob",
    "UnknownKey",
    "UnknownTurn",
    "UsageError",
    "VaultError",
    "store_failed",
]


class OverstoryError(Exception):
    """Base class of every error overstory raises."""


# --- the caller's mistakes ---------------------------------------------------------------


class UsageError(OverstoryError, ValueError):
    """The caller passed something overstory cannot accept."""


class ConfigError(UsageError):
    """A configuration value or key is not valid."""


class DataKeyError(ConfigError):
    """A data key (encryption at rest) is missing, malformed or wrong, or a sealed
    message does not open with it (altered, or moved to another conversation or seq)."""


class BackupInvalid(UsageError):
    """A backup file that cannot be restored: missing, truncated, corrupted, altered after
    it was written (its checksum), or of a format version this overstory does not read.
    The message names the file and what is wrong; nothing was written."""


class StoreNotEmpty(UsageError):
    """A restore into a store that already holds records (the message says which): a
    restore writes only into an empty store, never over another deployment's state."""


class VaultError(UsageError):
    """A DataVault call with a bad collection, key, document, filter or TTL."""


class StoreURLError(ConfigError):
    """A store URL that cannot be parsed or names an unsupported store."""


class InvalidUserId(UsageError):
    """A user id that cannot name a conversation."""


class InvalidMessage(UsageError):
    """A message that cannot be sent to a conversation."""


class ToolDefinitionError(UsageError):
    """A tool function that cannot be turned into a model-callable tool."""


# --- failures while running --------------------------------------------------------------


class UnknownAgent(UsageError):
    """No agent of this name is served; the message lists the ones that are."""

    def __init__(self, name: str, served: Sequence[str]) -> None:
        super().__init__(
            f"no agent named {name!r} is served here; served agents: "
            f"{', '.join(map(repr, served)) or 'none'}"
        )
        self.name = name
        self.served = tuple(served)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.name, self.served))


class UnknownTurn(UsageError):
    """A turn id the conversation has no turn of (nothing stored, nothing running)."""

    def __init__(self, conversation_id: str, turn_id: str) -> None:
        super().__init__(f"conversation {conversation_id!r} has no turn {turn_id!r}")
        self.conversation_id = conversation_id
        self.turn_id = turn_id

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.conversation_id, self.turn_id))


class UnknownJob(UsageError):
    """No background job of that id in the namespace (never submitted, or swept)."""


class UnknownKey(UsageError):
    """No API key has this id (``overstory keys revoke``)."""


class AuthenticationFailed(UsageError):
    """The caller's credentials are missing, malformed, unknown, revoked or expired.

    The message says which, never what was presented: a key or token is a secret even
    when it is wrong (it may be a real one pasted in the wrong place).
    """


class UnknownConversation(UsageError):
    """No such conversation for this principal: it does not exist, or it is neither
    theirs nor shared with them (the same answer, so nothing leaks)."""


class NotPermitted(UsageError):
    """The conversation is shared with this principal, but not for this action."""


class RuntimeFailure(OverstoryError, RuntimeError):
    """Something failed while running; the same call may succeed later."""


class StoreError(RuntimeFailure):
    """The history store failed."""


def store_failed(exc: BaseException) -> bool:
    """Whether ``exc`` is the store failing (what an operator is alerted on), not the
    store refusing a write by design (:class:`Fenced`, :class:`SequenceConflict`)."""
    return isinstance(exc, StoreError) and not isinstance(exc, Fenced | SequenceConflict)


class StoreUnavailable(StoreError):
    """The history store cannot be reached or opened."""


class SequenceConflict(StoreError):
    """A message with this (conversation id, sequence number) is already stored.

    Raised instead of overwriting: stored history is never altered.
    """

    def __init__(self, conversation_id: str, seq: int) -> None:
        super().__init__(
            f"conversation {conversation_id!r} already has a message with seq {seq}; "
            "nothing was overwritten"
        )
        self.conversation_id = conversation_id
        self.seq = seq

    def __reduce__(self) -> tuple[type[SequenceConflict], tuple[str, int]]:
        return (type(self), (self.conversation_id, self.seq))


class Fenced(StoreError):
    """A newer incarnation of the conversation took it over; this one may not write.

    Every conversation actor takes a new epoch from the store when it activates, and
    every write carries it: a zombie (an old incarnation still running after its
    replacement started) has its writes rejected instead of corrupting history.
    """

    def __init__(self, conversation_id: str, epoch: int, current: int) -> None:
        super().__init__(
            f"conversation {conversation_id!r} is owned by incarnation {current}; "
            f"incarnation {epoch} may no longer write to it"
        )
        self.conversation_id = conversation_id
        self.epoch = epoch
        self.current = current

    def __reduce__(self) -> tuple[type[Fenced], tuple[str, int, int]]:
        return (type(self), (self.conversation_id, self.epoch, self.current))


#: Why a model call failed, as the fallback, retry and breaker policies see it
#: (``providers/taxonomy.py`` holds what each policy does about each kind).
ModelErrorKind = Literal[
    "rate_limited",  # 429 from the provider
    "overloaded",  # 529 / 503: the provider is shedding load
    "server_error",  # other 5xx
    "timeout",  # no answer in time
    "connection",  # could not connect / connection dropped
    "malformed",  # an answer that is not the vendor's format
    "auth",  # 401 / 403: the key is wrong, revoked or not allowed
    "bad_request",  # 400 / 404 / 422: this request will fail the same way again
    "context_overflow",  # the prompt does not fit the model's context window
    "circuit_open",  # the endpoint's circuit breaker refused the call (no request sent)
    "limit_wait",  # the endpoint's rate limiter could not admit the call in time
]


class ModelError(RuntimeFailure):
    """A model call failed; ``kind`` says why (see :data:`ModelErrorKind`).

    ``retry_after`` is the delay the provider asked for (``Retry-After``), when it did;
    ``status`` the HTTP status, when there was one. ``retryable=False`` is shorthand for
    ``kind="bad_request"``.
    """

    def __init__(
        self,
        message: str,
        *,
        model: str = "",
        kind: ModelErrorKind | None = None,
        retryable: bool = True,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.model = model
        self.kind: ModelErrorKind = kind or ("server_error" if retryable else "bad_request")
        self.retry_after = retry_after
        self.status = status

    @property
    def retryable(self) -> bool:
        """Whether the same call to the same model may succeed later."""
        return self.kind not in ("auth", "bad_request", "context_overflow")

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_model_error,
            (type(self), str(self), self.model, self.kind, self.retry_after, self.status),
        )


def _rebuild_model_error(
    cls: type[ModelError],
    message: str,
    model: str,
    kind: ModelErrorKind,
    retry_after: float | None,
    status: int | None,
) -> ModelError:
    return cls(message, model=model, kind=kind, retry_after=retry_after, status=status)


class AllModelsFailed(ModelError):
    """Every model of a chain failed; ``failures`` holds each one's error, in chain order."""

    def __init__(self, failures: Sequence[ModelError]) -> None:
        lines = "; ".join(f"{f.model or '?'}: [{f.kind}] {f}" for f in failures)
        last = failures[-1].kind if failures else None
        super().__init__(f"all {len(failures)} model(s) failed: {lines}", kind=last)
        self.failures = list(failures)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.failures,))


class MaxRoundTripsExceeded(RuntimeFailure):
    """The model kept calling tools past the agent's ``max_round_trips``."""


class TurnFailed(RuntimeFailure):
    """A turn did not complete.

    The user's message is stored (it was written before the model was called); the turn
    may be retried with a new message.
    """

    def __init__(
        self,
        conversation_id: str,
        turn_id: str,
        reason: str,
        cause: BaseException | None = None,
    ) -> None:
        super().__init__(f"turn {turn_id} of conversation {conversation_id!r} failed: {reason}")
        self.conversation_id = conversation_id
        self.turn_id = turn_id
        self.reason = reason
        if cause is not None:
            # Kept through pickling (below), so a client across Ray sees e.g. the
            # ``AllModelsFailed.failures`` that ended the turn, not only their text.
            self.__cause__ = cause

    def __reduce__(self) -> tuple[object, ...]:
        return (
            type(self),
            (self.conversation_id, self.turn_id, self.reason, self.__cause__),
        )


class TurnIncomplete(TurnFailed):
    """A streamed turn ended part-way: the model failed after its first token, or the
    turn was cancelled. What was produced is stored as the turn's (incomplete) answer;
    ``reply`` is it."""

    def __init__(self, conversation_id: str, turn_id: str, reason: str, reply: object) -> None:
        super().__init__(conversation_id, turn_id, reason)
        self.reply = reply

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.conversation_id, self.turn_id, self.reason, self.reply))


class QuotaExceeded(RuntimeFailure):
    """A user's quota refused a turn (or a model call within one). ``limit`` names it
    (``tokens_per_day``, ``requests_per_minute``, ``concurrent_turns``), ``value`` is
    its setting, ``retry_after_s`` how long until it frees (``resets_at``, epoch
    seconds, the same moment). A turn refused at its start stored nothing."""

    def __init__(self, limit: str, value: int, retry_after_s: float) -> None:
        import time

        self.limit, self.value, self.retry_after_s = limit, value, retry_after_s
        self.resets_at = time.time() + retry_after_s
        when = (
            "at the next UTC midnight" if limit == "tokens_per_day" else f"in {retry_after_s:.1f} s"
        )
        super().__init__(f"quota exceeded: {limit} = {value}; it frees {when}")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.limit, self.value, self.retry_after_s))


class JobFailed(RuntimeFailure):
    """A background job ended without an answer: ``state`` is ``failed`` (``error``:
    its last attempt's) or ``cancelled``; ``job`` is its status."""

    def __init__(self, job: dict[str, object]) -> None:
        self.job = job
        self.state, self.error = str(job.get("state")), str(job.get("error") or "")
        attempts = job.get("attempts")
        super().__init__(
            f"job {job.get('id')} {self.state} after {attempts} attempt(s)"
            + (f": {self.error}" if self.error else "")
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.job,))


class ConversationUnavailable(RuntimeFailure):
    """The conversation actor could not be reached or started."""


class Passivated(ConversationUnavailable):
    """This conversation actor is passivating (idle or evicted) and takes no new turns.

    Client handles never show it to users: they get the conversation from the registry
    again, which starts a fresh actor from the store, and re-send.
    """


class StaleShardTable(ConversationUnavailable):
    """A request reached a host with a shard table older (or other) than the host's.

    Carries the host's table (``version``, ``shards``, ``hosts``) so the client updates
    its cache and re-sends to the right host; users never see it.
    """

    def __init__(self, version: int, shards: int, hosts: Sequence[str]) -> None:
        super().__init__(f"shard table version {version} ({len(hosts)} hosts) is current; re-route")
        self.version = version
        self.shards = shards
        self.hosts = tuple(hosts)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.version, self.shards, self.hosts))


class ConversationQuarantined(ConversationUnavailable):
    """A conversation crashed its entity more often than its restart intensity allows.

    Its host refuses it until ``until`` (a wall-clock time); the rest of the host and
    its other conversations carry on. Its history is stored and unharmed.
    """

    def __init__(self, conversation_id: str, crashes: int, until: float, last: str) -> None:
        super().__init__(
            f"conversation {conversation_id!r} is quarantined: it crashed {crashes} times "
            f"within its restart period (last: {last}); it is refused until "
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(until))}"
        )
        self.conversation_id = conversation_id
        self.crashes = crashes
        self.until = until
        self.last = last

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.conversation_id, self.crashes, self.until, self.last))


class ClusterUnavailable(RuntimeFailure):
    """No running Ray cluster to attach to, or it did not answer or let this client in.

    The operator commands never start a Ray of their own; the message names the address.
    """


class ClusterAuthRefused(ClusterUnavailable):
    """The cluster answered and refused this client: its token is missing or wrong.

    The message names the address and what to set on this side; it never holds a token.
    """

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"the Ray cluster at {address!r} refused this client: {reason}")
        self.address = address
        self.reason = reason

    def __reduce__(self) -> tuple[type[ClusterAuthRefused], tuple[str, str]]:
        return (type(self), (self.address, self.reason))
