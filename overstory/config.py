"""Runtime configuration: one validated value, from keyword arguments or a TOML file.

Every key is known in advance; an unknown key, a wrong type or a bad value is a
:class:`~overstory.exceptions.ConfigError` naming the key — when the config is built,
not when it is first used.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydantic

from .exceptions import ConfigError

if TYPE_CHECKING:
    from .jobs import JobLimits
    from .quota import Quota
from .store.url import resolve_store_url
from .validation import MAX_MESSAGE_CHARS, MAX_USER_ID_CHARS

__all__ = ["DEFAULT_NAMESPACE", "DEFAULT_STORE", "STORE_ENV", "Config", "load_config"]

DEFAULT_STORE = "sqlite:///overstory.db"
#: Environment variable naming the store when no ``store`` is given: how a deployment
#: hands every node (and the operator's clients) the same store URL without writing it
#: into a file that is checked in.
STORE_ENV = "OVERSTORY_STORE"
DEFAULT_NAMESPACE = "overstory"
_NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class Config(pydantic.BaseModel):
    """Where history lives, which Ray cluster and namespace, and the input limits."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    store: str = pydantic.Field(default_factory=lambda: os.environ.get(STORE_ENV) or DEFAULT_STORE)
    """``sqlite:///path.db`` (one machine) or ``mongodb://host/db`` (a cluster); when not
    given, ``$OVERSTORY_STORE``, else ``sqlite:///overstory.db``."""
    namespace: str = DEFAULT_NAMESPACE
    """Ray namespace holding this app's named actors."""
    ray_address: str | None = None
    """Ray cluster to attach to; ``None`` uses ``RAY_ADDRESS`` or starts a local Ray."""
    max_message_chars: int = pydantic.Field(MAX_MESSAGE_CHARS, ge=1, le=10_000_000)
    """Longest message a user may send, in characters (longer ones are refused with
    ``InvalidMessage``, nothing stored)."""
    max_user_id_chars: int = pydantic.Field(MAX_USER_ID_CHARS, ge=1, le=4096)
    """Longest user id accepted, in characters (``InvalidUserId`` beyond it)."""
    actor_max_restarts: int = pydantic.Field(-1, ge=-1)
    """How often Ray restarts a crashed conversation actor in place (-1: always)."""
    activation_timeout_s: float = pydantic.Field(60.0, gt=0, le=3600)
    """How long get-or-start waits for a conversation actor to load its history."""
    idle_timeout_s: float | None = pydantic.Field(600.0, gt=0)
    """Passivate a conversation after this long without a turn (``None``: never)."""
    max_live_per_node: int | None = pydantic.Field(None, ge=1)
    """Dedicated placement: cap on live conversation actors per node (LRU idle ones go)."""
    hosts_per_node: int | None = pydantic.Field(None, ge=1, le=256)
    """Hosted placement: host actors per node (``None``: the node's CPU count), counted
    over the nodes alive when the namespace first boots and at each ``rebalance``."""
    shards: int = pydantic.Field(1024, ge=1, le=1_000_000)
    """Hosted placement: shards conversation ids hash to (fixed for a namespace)."""
    max_live_per_host: int = pydantic.Field(25_000, ge=1)
    """Hosted placement: live conversations per host; the least recently used idle ones
    are passivated beyond it, so memory stays bounded however many users there are."""
    turn_timeout_s: float = pydantic.Field(300.0, gt=0, le=86_400)
    """A turn running longer crashes its conversation's entity (either placement): the
    caller gets ``TurnFailed``, and the conversation is restarted from the store."""
    send_timeout_s: float = pydantic.Field(600.0, gt=0, le=86_400)
    """Overall deadline of one ``send``, re-sends after crashes included."""
    entity_max_restarts: int = pydantic.Field(3, ge=0)
    """Crashes of one conversation (a turn past its deadline, an exception escaping the
    turn) allowed within ``entity_restart_period_s`` before it is quarantined; each is
    restarted from the store. Both placements."""
    entity_restart_period_s: float = pydantic.Field(60.0, gt=0)
    """The window ``entity_max_restarts`` counts a conversation's crashes in (either
    placement); crashes older than it are forgotten."""
    quarantine_s: float = pydantic.Field(300.0, gt=0)
    """How long a quarantined conversation is refused."""
    stream_keep_turns: int = pydantic.Field(8, ge=1, le=1000)
    """Streamed turns whose event logs a conversation keeps for readers to resume."""
    stream_window_s: float = pydantic.Field(300.0, gt=0, le=86_400)
    """How long a finished turn's event log is kept; after it, ``resume`` replays the
    turn from its stored messages (one delta per model answer)."""
    rollout_refresh_s: float = pydantic.Field(5.0, gt=0, le=3600)
    """How long a host trusts its copy of a rollout split before reading it again (the
    rollout commands also tell every host at once; this bounds a missed notice)."""
    quota_tokens_per_day: int | None = pydantic.Field(None, ge=0)
    """Default per-user quota (``overstory quota set`` overrides it per user): model
    tokens (input and output) per UTC day, across every conversation of the user."""
    quota_requests_per_minute: int | None = pydantic.Field(None, ge=0)
    """Default per-user quota: turns started in any 60 s."""
    quota_concurrent_turns: int | None = pydantic.Field(None, ge=0)
    """Default per-user quota: turns running at once, cluster-wide."""
    quota_output_tokens: int = pydantic.Field(1024, ge=1, le=1_000_000)
    """The answer's share of a model call's token reservation (its input is estimated
    from the characters sent); real usage replaces it when the call returns."""
    prices: dict[str, dict[str, float]] = pydantic.Field(default_factory=dict)
    """Dollars per million tokens per model (``{model: {input, output}}``), for usage
    and cost (:mod:`overstory.usage`); a model without a price counts no cost."""
    jobs_concurrency: int = pydantic.Field(4, ge=1, le=10_000)
    """Background jobs (``rt.jobs.submit``) running at once in the namespace."""
    jobs_per_user: int = pydantic.Field(1, ge=1, le=1000)
    """Background jobs of one user running at once."""
    jobs_lease_s: float = pydantic.Field(30.0, ge=1, le=3600)
    """A running job's lease, renewed every third of it: a job whose runner died is
    taken up again at most this long after its last renewal."""
    jobs_keep_s: float = pydantic.Field(7 * 86_400.0, gt=0)
    """How long a finished job's record (status, result) is kept."""
    jobs_poll_s: float = pydantic.Field(1.0, gt=0, le=60)
    """How often the job runner looks for due jobs (a submit also wakes it at once)."""
    restart_intensity: int = pydantic.Field(100, ge=0)
    """Conversation restarts allowed within ``restart_period_s`` before the conversation
    supervisor gives up, shuts its children down and escalates to the root."""
    restart_period_s: float = pydantic.Field(10.0, gt=0)
    """The window ``restart_intensity`` counts conversation restarts in."""
    actor_resources: dict[str, float] = pydantic.Field(default_factory=dict)
    """Ray custom resources each conversation actor (dedicated) or host (hosted) requires:
    pins them to such nodes."""

    @pydantic.field_validator("prices", mode="before")
    @classmethod
    def _prices(cls, value: Any) -> dict[str, dict[str, float]]:
        from .usage import validate_prices

        try:
            return validate_prices(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc

    @pydantic.field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if not _NAMESPACE.match(value):
            raise ValueError("must be 1-63 letters, digits, '_', '.' or '-', starting alphanumeric")
        return value

    def job_limits(self) -> JobLimits:
        """The job runner's bounds (the ``jobs_*`` settings)."""
        from .jobs import JobLimits

        return JobLimits(self.jobs_concurrency, self.jobs_per_user, self.jobs_lease_s)

    def default_quota(self) -> Quota:
        """The quota of users without one of their own (the ``quota_*`` settings)."""
        from .quota import Quota

        return Quota(
            self.quota_tokens_per_day, self.quota_requests_per_minute, self.quota_concurrent_turns
        )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "config") -> Config:
        """Build and validate; raises :class:`ConfigError` naming every bad key."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source} must be a table of keys, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.model_fields))
        if unknown:
            raise ConfigError(
                f"unknown key(s) in {source}: {', '.join(map(repr, unknown))}; "
                f"known keys: {', '.join(cls.model_fields)}"
            )
        try:
            config = cls.model_validate(dict(data))
        except pydantic.ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})"
                for e in exc.errors(include_url=False)
            )
            # Not chained: ``problems`` is pydantic's whole report, which would print again.
            raise ConfigError(f"invalid {source}: {problems}") from None
        # Resolve here so a relative SQLite path means the caller's directory, not a worker's.
        resolved = resolve_store_url(config.store)
        if resolved == config.store:
            return config
        return cls.model_validate({**config.model_dump(exclude_unset=True), "store": resolved})


def load_config(path: str | Path, **overrides: Any) -> Config:
    """Read a TOML file (keys at top level or under ``[overstory]``); ``overrides`` win."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {str(path)!r} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc
    if set(data) == {"overstory"} and isinstance(data["overstory"], dict):
        data = data["overstory"]
    data.update({k: v for k, v in overrides.items() if v is not None})
    return Config.from_mapping(data, source=f"config file {str(path)!r}")
