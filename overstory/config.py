"""Runtime configuration: one validated value, from keyword arguments or a TOML file.

:class:`Config` holds where the tree runs (store, namespace, Ray address, resources) and
one group of settings per feature — ``limits``, ``conversations``, ``hosted``,
``dedicated``, ``supervision``, ``streams``, ``rollouts``, ``quotas``, ``usage``, ``jobs``
— each a frozen model whose defaults are declared here and nowhere else. The code that
runs a feature is handed its group whole.

Every key is known in advance; an unknown key, a wrong type or a bad value is a
:class:`~overstory.exceptions.ConfigError` naming the key — when the config is built,
not when it is first used. A key of the flat layout before 0.4 (``jobs_concurrency``)
is refused with the name it has now (``jobs.concurrency``).
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
    from .quota import Quota
from .store.url import resolve_store_url
from .validation import MAX_MESSAGE_CHARS, MAX_USER_ID_CHARS

__all__ = [
    "DEFAULT_NAMESPACE",
    "DEFAULT_STORE",
    "STORE_ENV",
    "Config",
    "ConversationSettings",
    "DedicatedSettings",
    "HostedSettings",
    "InputLimits",
    "JobSettings",
    "QuotaDefaults",
    "RolloutSettings",
    "StreamSettings",
    "SupervisionSettings",
    "UsageSettings",
    "load_config",
    "merge_settings",
]

DEFAULT_STORE = "sqlite:///overstory.db"
#: Environment variable naming the store when no ``store`` is given: how a deployment
#: hands every node (and the operator's clients) the same store URL without writing it
#: into a file that is checked in.
STORE_ENV = "OVERSTORY_STORE"
DEFAULT_NAMESPACE = "overstory"
_NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class _Group(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class InputLimits(_Group):
    """What a user may send: ``[limits]``."""

    max_message_chars: int = pydantic.Field(default=MAX_MESSAGE_CHARS, ge=1, le=10_000_000)
    """Longest message a user may send, in characters (longer ones are refused with
    ``InvalidMessage``, nothing stored)."""
    max_user_id_chars: int = pydantic.Field(default=MAX_USER_ID_CHARS, ge=1, le=4096)
    """Longest user id accepted, in characters (``InvalidUserId`` beyond it)."""


class ConversationSettings(_Group):
    """Every conversation's life, in either placement: ``[conversations]``."""

    activation_timeout_s: float = pydantic.Field(default=60.0, gt=0, le=3600)
    """How long get-or-start waits for a conversation to load its history."""
    idle_timeout_s: float | None = pydantic.Field(default=600.0, gt=0)
    """Passivate a conversation after this long without a turn (``None``: never)."""
    turn_timeout_s: float = pydantic.Field(default=300.0, gt=0, le=86_400)
    """A turn running longer crashes its conversation's entity: the caller gets
    ``TurnFailed``, and the conversation is restarted from the store."""
    send_timeout_s: float = pydantic.Field(default=600.0, gt=0, le=86_400)
    """Overall deadline of one ``send``, re-sends after crashes included."""
    max_restarts: int = pydantic.Field(default=3, ge=0)
    """Crashes of one conversation (a turn past its deadline, an exception escaping the
    turn) allowed within ``restart_period_s`` before it is quarantined; each is
    restarted from the store."""
    restart_period_s: float = pydantic.Field(default=60.0, gt=0)
    """The window ``max_restarts`` counts a conversation's crashes in; crashes older
    than it are forgotten."""
    quarantine_s: float = pydantic.Field(default=300.0, gt=0)
    """How long a quarantined conversation is refused."""
    tail_messages: int = pydantic.Field(default=500, ge=10, le=1_000_000)
    """The most messages a live conversation holds in memory. Activation reads the
    history's end page by page until it covers what the agent's models can read, at
    most this many (this many when a window is unknown). A model call sends at most
    these, fitted to its window (:mod:`overstory.compaction`). Older ones stay stored,
    paged with ``history(after=..., limit=...)``; a turn id older than them is looked
    up in the store."""


class HostedSettings(_Group):
    """The hosted placement (conversations as entities in a few host actors):
    ``[hosted]``."""

    hosts_per_node: int | None = pydantic.Field(default=None, ge=1, le=256)
    """Host actors per node (``None``: the node's CPU count), counted over the nodes
    alive when the namespace first boots, at each ``rebalance``, and when the
    membership changes (``auto_rebalance``)."""
    shards: int = pydantic.Field(default=1024, ge=1, le=1_000_000)
    """Shards conversation ids hash to (fixed for a namespace)."""
    max_live_per_host: int = pydantic.Field(default=25_000, ge=1)
    """Live conversations per host; the least recently used idle ones are passivated
    beyond it, so memory stays bounded however many users there are."""
    auto_rebalance: bool = True
    """Follow the cluster's membership: when nodes join or leave (the Ray autoscaler,
    or ``ray start``/``ray stop``), add or retire hosts as ``overstory rebalance``
    would, once the new count has held for ``rebalance_settle_s``."""
    rebalance_poll_s: float = pydantic.Field(default=5.0, gt=0, le=3600)
    """How often the host supervisor looks at the alive nodes."""
    rebalance_settle_s: float = pydantic.Field(default=30.0, ge=0)
    """How long a new host count must hold before the hosts follow it (a node that
    flaps never settles, so nothing moves)."""
    rebalance_cooldown_s: float = pydantic.Field(default=120.0, ge=0)
    """The least time between two automatic resizes."""
    retire_grace_s: float = pydantic.Field(default=30.0, ge=0)
    """How long a retired host may finish the turns it runs before it is stopped (a
    turn cut short resumes on the new host from the store)."""


class DedicatedSettings(_Group):
    """The dedicated placement (one named actor per conversation): ``[dedicated]``."""

    max_live_per_node: int | None = pydantic.Field(default=None, ge=1)
    """Cap on live conversation actors per node (LRU idle ones go)."""
    actor_max_restarts: int = pydantic.Field(default=-1, ge=-1)
    """How often Ray restarts a crashed conversation actor in place (-1: always)."""


class SupervisionSettings(_Group):
    """The supervisor above the conversations (the host supervisor, or the dedicated
    placement's conversation supervisor): ``[supervision]``."""

    restart_intensity: int = pydantic.Field(default=100, ge=0)
    """Child restarts allowed within ``restart_period_s`` before the supervisor gives
    up, shuts its children down and escalates to the root."""
    restart_period_s: float = pydantic.Field(default=10.0, gt=0)
    """The window ``restart_intensity`` counts restarts in."""


class StreamSettings(_Group):
    """Streamed turns' event logs, kept for readers to resume: ``[streams]``."""

    keep_turns: int = pydantic.Field(default=8, ge=1, le=1000)
    """Streamed turns whose event logs a conversation keeps."""
    window_s: float = pydantic.Field(default=300.0, gt=0, le=86_400)
    """How long a finished turn's event log is kept; after it, ``resume`` replays the
    turn from its stored messages (one delta per model answer)."""
    batch_s: float = pydantic.Field(default=0.05, ge=0, le=1.0)
    """Events that arrive within this many seconds reach a streamed turn's reader in one
    answer (0: each as it comes). The first text delta and the turn's end are never held
    back; a larger window spares every hop work per event under load."""


class RolloutSettings(_Group):
    """Agent versions rolled out by split: ``[rollouts]``."""

    refresh_s: float = pydantic.Field(default=5.0, gt=0, le=3600)
    """How long a host trusts its copy of a rollout split before reading it again (the
    rollout commands also tell every host at once; this bounds a missed notice)."""


class QuotaDefaults(_Group):
    """The quota of users without one of their own (``overstory quota set`` gives one):
    ``[quotas]``."""

    tokens_per_day: int | None = pydantic.Field(default=None, ge=0)
    """Model tokens (input and output) per UTC day, across every conversation of the
    user (``None``: unlimited)."""
    requests_per_minute: int | None = pydantic.Field(default=None, ge=0)
    """Turns started in any 60 s (``None``: unlimited)."""
    concurrent_turns: int | None = pydantic.Field(default=None, ge=0)
    """Turns running at once, cluster-wide (``None``: unlimited)."""
    output_tokens: int = pydantic.Field(default=1024, ge=1, le=1_000_000)
    """The answer's share of a model call's token reservation (its input is estimated
    from the characters sent); real usage replaces it when the call returns."""

    def quota(self) -> Quota:
        """These defaults as the :class:`~overstory.quota.Quota` a user without one has."""
        from .quota import Quota

        return Quota(self.tokens_per_day, self.requests_per_minute, self.concurrent_turns)


class UsageSettings(_Group):
    """Usage and cost accounting (:mod:`overstory.usage`): ``[usage]``."""

    prices: dict[str, dict[str, float]] = pydantic.Field(default_factory=dict)
    """Dollars per million tokens per model (``{model: {input, output}}``); a model
    without a price counts no cost."""

    @pydantic.field_validator("prices", mode="before")
    @classmethod
    def _prices(cls, value: Any) -> dict[str, dict[str, float]]:
        from .usage import validate_prices

        try:
            return validate_prices(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc


class JobSettings(_Group):
    """Background jobs (``rt.jobs.submit``): ``[jobs]``."""

    concurrency: int = pydantic.Field(default=4, ge=1, le=10_000)
    """Jobs running at once in the namespace."""
    per_user: int = pydantic.Field(default=1, ge=1, le=1000)
    """Jobs of one user running at once."""
    lease_s: float = pydantic.Field(default=30.0, ge=1, le=3600)
    """A running job's lease, renewed every third of it: a job whose runner died is
    taken up again at most this long after its last renewal."""
    keep_s: float = pydantic.Field(default=7 * 86_400.0, gt=0)
    """How long a finished job's record (status, result) is kept."""
    poll_s: float = pydantic.Field(default=1.0, gt=0, le=60)
    """How often the job runner looks for due jobs (a submit also wakes it at once)."""


class Config(pydantic.BaseModel):
    """Where the tree runs, and one group of settings per feature."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    store: str = pydantic.Field(default_factory=lambda: os.environ.get(STORE_ENV) or DEFAULT_STORE)
    """``sqlite:///path.db`` (one machine) or ``mongodb://host/db`` (a cluster); when not
    given, ``$OVERSTORY_STORE``, else ``sqlite:///overstory.db``."""
    namespace: str = DEFAULT_NAMESPACE
    """Ray namespace holding this app's named actors."""
    ray_address: str | None = None
    """Ray cluster to attach to; ``None`` uses ``RAY_ADDRESS`` or starts a local Ray."""
    actor_resources: dict[str, float] = pydantic.Field(default_factory=dict)
    """Ray custom resources each conversation actor (dedicated) or host (hosted) requires:
    pins them to such nodes."""
    limits: InputLimits = InputLimits()
    """What a user may send."""
    conversations: ConversationSettings = ConversationSettings()
    """Every conversation's life, in either placement."""
    hosted: HostedSettings = HostedSettings()
    """The hosted placement."""
    dedicated: DedicatedSettings = DedicatedSettings()
    """The dedicated placement."""
    supervision: SupervisionSettings = SupervisionSettings()
    """The supervisor above the conversations."""
    streams: StreamSettings = StreamSettings()
    """Streamed turns kept for resume."""
    rollouts: RolloutSettings = RolloutSettings()
    """Rollout splits."""
    quotas: QuotaDefaults = QuotaDefaults()
    """The default per-user quota."""
    usage: UsageSettings = UsageSettings()
    """Usage and cost accounting."""
    jobs: JobSettings = JobSettings()
    """Background jobs."""

    @pydantic.field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if not _NAMESPACE.match(value):
            raise ValueError("must be 1-63 letters, digits, '_', '.' or '-', starting alphanumeric")
        return value

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "config") -> Config:
        """Build and validate; raises :class:`ConfigError` naming every bad key."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source} must be a table of keys, got {type(data).__name__}")
        _refuse_unknown(cls, data, source, "")
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
        return config.model_copy(update={"store": resolved})

    def merged(self, overrides: Mapping[str, Any], *, source: str = "overrides") -> Config:
        """This config with ``overrides`` applied (a group's table — or a group —
        changes only the keys it names), validated as :meth:`from_mapping` does."""
        return Config.from_mapping(merge_settings(self.model_dump(), overrides), source=source)


#: Where each key of the flat layout before the groups lives now.
_MOVED = {
    "max_message_chars": "limits.max_message_chars",
    "max_user_id_chars": "limits.max_user_id_chars",
    "activation_timeout_s": "conversations.activation_timeout_s",
    "idle_timeout_s": "conversations.idle_timeout_s",
    "turn_timeout_s": "conversations.turn_timeout_s",
    "send_timeout_s": "conversations.send_timeout_s",
    "entity_max_restarts": "conversations.max_restarts",
    "entity_restart_period_s": "conversations.restart_period_s",
    "quarantine_s": "conversations.quarantine_s",
    "hosts_per_node": "hosted.hosts_per_node",
    "shards": "hosted.shards",
    "max_live_per_host": "hosted.max_live_per_host",
    "max_live_per_node": "dedicated.max_live_per_node",
    "actor_max_restarts": "dedicated.actor_max_restarts",
    "restart_intensity": "supervision.restart_intensity",
    "restart_period_s": "supervision.restart_period_s",
    "stream_keep_turns": "streams.keep_turns",
    "stream_window_s": "streams.window_s",
    "stream_batch_s": "streams.batch_s",
    "rollout_refresh_s": "rollouts.refresh_s",
    "quota_tokens_per_day": "quotas.tokens_per_day",
    "quota_requests_per_minute": "quotas.requests_per_minute",
    "quota_concurrent_turns": "quotas.concurrent_turns",
    "quota_output_tokens": "quotas.output_tokens",
    "prices": "usage.prices",
    "jobs_concurrency": "jobs.concurrency",
    "jobs_per_user": "jobs.per_user",
    "jobs_lease_s": "jobs.lease_s",
    "jobs_keep_s": "jobs.keep_s",
    "jobs_poll_s": "jobs.poll_s",
}


def _refuse_unknown(
    model: type[pydantic.BaseModel], data: Mapping[str, Any], source: str, prefix: str
) -> None:
    """A :class:`ConfigError` for the first table holding keys ``model`` does not know,
    naming each one (and where a key of the old flat layout went)."""
    unknown = sorted(set(data) - set(model.model_fields))
    if unknown:
        hints = [f" ({k!r} is now {_MOVED[k]!r})" for k in unknown if not prefix and k in _MOVED]
        raise ConfigError(
            f"unknown key(s) in {source}: {', '.join(repr(prefix + k) for k in unknown)}"
            f"{''.join(hints)}; known keys"
            f"{f' of {prefix[:-1]!r}' if prefix else ''}: {', '.join(model.model_fields)}"
        )
    for name, value in data.items():
        group = model.model_fields[name].annotation
        if isinstance(group, type) and issubclass(group, _Group) and isinstance(value, Mapping):
            _refuse_unknown(group, value, source, f"{prefix}{name}.")


def merge_settings(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` over it, table by table: a group given as a table (or
    as a group's model) changes only the keys it names."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, pydantic.BaseModel):
            value = value.model_dump(exclude_unset=True)
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read a TOML file (keys at top level or under ``[overstory]``, a group's keys in its
    own table, e.g. ``[jobs]`` or ``[overstory.jobs]``); ``overrides`` win, key by key
    (see :func:`merge_settings`)."""
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
    return Config.from_mapping(
        merge_settings(data, overrides or {}), source=f"config file {str(path)!r}"
    )
