"""Which version of an agent serves a conversation: the split, pins, and the deployment.

Per agent name, a :class:`Split` says which version is ``live`` (promoted), which was
live before it (``previous``, for a rollback), and an optional ``canary`` version with
the percentage of *new* conversations it gets. The split and the deployment record live
in the store (compare-and-set settings), so every host, a restarted tree and every
operator command see one truth.

The decision is one pure function, :func:`choose_version`, called by whatever serves
the conversation (a host's entity, a dedicated actor) before each turn:

* no canary: the live version, for everyone — nothing is read or written;
* a conversation pinned in this split's ``generation`` keeps its pinned version
  (sticky while a rollout runs, across passivation and restarts: the pin is stored);
* a conversation that already has history started before the rollout: live;
* a new conversation: the canary when its stable hash bucket (``[0, 100)``) is below
  ``percent``, else live. Only canary conversations are pinned: every other one is on
  "live", whatever live is.

:func:`promote` and :func:`rollback` bump the ``generation``: every pin is void from then
on, so each conversation moves to the (new) live version at its next turn — a
blue-green switch. Starting a rollout of another version bumps it too (the old canary's
conversations go back to live); changing only the percentage does not.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from .app import App
from .exceptions import ConfigError, StoreError, UnknownAgent
from .store import HistoryStore
from .store.settings import DEPLOYMENT, PIN, SPLIT, Backoff, SettingContended, update

__all__ = [
    "Deployment",
    "Pin",
    "Split",
    "bucket",
    "choose_version",
    "deployment_key",
    "pin_key",
    "promote",
    "read_deployment",
    "read_pin",
    "read_split",
    "rollback",
    "rollout",
    "split_key",
    "update_split",
    "write_deployment",
    "write_pin",
]

#: Compare-and-set attempts before a write gives up (another writer kept winning).
_CAS = Backoff(attempts=16)


@dataclass(frozen=True)
class Split:
    """How new and existing conversations of agent ``agent`` map to its versions."""

    agent: str
    live: str
    previous: str | None = None
    canary: str | None = None
    percent: float = 0.0
    generation: int = 0
    rolled_back_from: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str) -> Split:
        try:
            data = json.loads(raw)
            split = cls(**data)
        except (ValueError, TypeError) as exc:
            raise StoreError(
                f"the stored rollout split is unreadable ({exc}): {raw[:200]!r}"
            ) from exc
        if not 0 <= split.percent <= 100 or split.generation < 0:
            raise StoreError(f"the stored rollout split is out of range: {raw[:200]!r}")
        return split

    def describe(self) -> dict[str, Any]:
        """JSON-able, with the share of new conversations each version gets."""
        shares = {self.live: 100.0}
        if self.canary is not None:
            shares = {self.live: 100.0 - self.percent, self.canary: self.percent}
        return {**asdict(self), "new_conversations_percent": shares}


@dataclass(frozen=True)
class Pin:
    """A conversation's version, valid while the split is at ``generation``."""

    version: str
    generation: int

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "generation": self.generation})

    @classmethod
    def from_json(cls, raw: str) -> Pin:
        try:
            data = json.loads(raw)
            return cls(str(data["version"]), int(data["generation"]))
        except (ValueError, TypeError, KeyError) as exc:
            raise StoreError(f"a stored version pin is unreadable ({exc}): {raw[:200]!r}") from exc


# --- pure decisions -------------------------------------------------------------------------


def bucket(conversation_id: str, split: Split) -> float:
    """A conversation's stable place in ``[0, 100)`` for the split's canary."""
    digest = hashlib.sha256(f"{split.agent}\0{split.canary}\0{conversation_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 / 100


def choose_version(
    split: Split,
    pin: Pin | None,
    conversation_id: str,
    has_history: bool,
    versions: Sequence[str],
    requested: str | None = None,
) -> tuple[str, Pin | None]:
    """The version that serves the next turn, and a pin to store first (or ``None``).

    ``versions`` are the ones the running app has: a split or pin naming a version the
    app no longer lists falls back to live, and a live version it no longer lists to the
    first one it does (the deployment that dropped it resets the split, see
    :func:`reset_for`).

    ``requested``: the caller named a version for this turn (``model="agent/v2"`` over
    HTTP, ``send(..., version="v2")`` in Python). It serves this turn only — nothing is
    pinned, and the conversation's next turn without one is the rollout's again — and
    :class:`~overstory.exceptions.UnknownAgent` names the served versions when it is
    not one of them.
    """
    if requested is not None:
        if requested not in versions:
            raise UnknownAgent(
                f"{split.agent}/{requested}", [f"{split.agent}/{v}" for v in versions]
            )
        return requested, None
    live = split.live if split.live in versions else versions[0]
    if split.canary is None or split.canary not in versions:
        return live, None
    if pin is not None and pin.generation == split.generation:
        return (pin.version if pin.version in versions else live), None
    if has_history:
        return live, None
    if bucket(conversation_id, split) < split.percent:
        return split.canary, Pin(split.canary, split.generation)
    return live, None


def _known(split: Split, version: str, versions: Sequence[str]) -> None:
    if version not in versions:
        raise ConfigError(
            f"agent {split.agent!r} has no version {version!r} in the served app; "
            f"versions: {', '.join(versions)}"
        )


def rollout(split: Split, version: str, percent: float, versions: Sequence[str]) -> Split:
    """``percent`` % of new conversations get ``version``; the others stay as they are."""
    _known(split, version, versions)
    if isinstance(percent, bool) or not isinstance(percent, int | float) or not 0 <= percent <= 100:
        raise ConfigError(f"a rollout percentage is a number in [0, 100], got {percent!r}")
    if version == split.live:
        raise ConfigError(
            f"version {version!r} of agent {split.agent!r} is live already; roll out another "
            f"version, or `overstory promote {split.agent} {version}` to end a rollout"
        )
    if version == split.canary:
        return replace(split, percent=float(percent))  # same rollout: pins hold
    return replace(split, canary=version, percent=float(percent), generation=split.generation + 1)


def promote(split: Split, version: str, versions: Sequence[str]) -> Split:
    """``version`` is live for everyone from each conversation's next turn."""
    _known(split, version, versions)
    if version == split.live and split.canary is None:
        return split  # nothing to do: idempotent
    return Split(
        split.agent,
        live=version,
        previous=split.previous if version == split.live else split.live,
        generation=split.generation + 1,
    )


def rollback(split: Split) -> Split:
    """Back to the previously promoted version, for everyone, from their next turn."""
    if split.previous is None:
        if split.rolled_back_from is not None and split.canary is None:
            return split  # rolled back already: idempotent
        raise ConfigError(
            f"agent {split.agent!r} has no previously promoted version to roll back to "
            f"(live: {split.live!r}); to end a rollout, promote the live version"
        )
    return Split(
        split.agent,
        live=split.previous,
        rolled_back_from=split.live,
        generation=split.generation + 1,
    )


def reset_for(split: Split | None, name: str, versions: Sequence[str]) -> Split | None:
    """The split after deploying an app that lists ``versions`` of agent ``name``:
    ``None`` when the stored one still fits, else a fresh one (live = the first version
    listed) that voids every pin."""
    if split is None:
        return Split(name, live=versions[0])
    if split.live in versions and (split.canary is None or split.canary in versions):
        return None
    return Split(name, live=versions[0], generation=split.generation + 1)


# --- the store --------------------------------------------------------------------------


def deployment_key(namespace: str) -> str:
    return DEPLOYMENT.key(namespace)


def split_key(namespace: str, agent: str) -> str:
    return SPLIT.key(namespace, agent)


def pin_key(namespace: str, conversation_id: str) -> str:
    return PIN.key(namespace, conversation_id)


@dataclass(frozen=True)
class Deployment:
    """What ``overstory serve MODULE:ATTR`` recorded: the import path every host
    imports, the Ray ``runtime_env`` working dir it needs (a ``gcs://`` package URI),
    the app's summary (:meth:`App.describe`) and a counter bumped by each serve."""

    source: str
    app: dict[str, Any]
    working_dir: str | None = None
    generation: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str) -> Deployment:
        try:
            return cls(**json.loads(raw))
        except (ValueError, TypeError) as exc:
            raise StoreError(f"the stored deployment is unreadable ({exc}): {raw[:200]!r}") from exc


async def read_deployment(store: HistoryStore, namespace: str) -> Deployment | None:
    raw = await store.get_setting(deployment_key(namespace))
    return None if raw is None else Deployment.from_json(raw)


async def write_deployment(
    store: HistoryStore, namespace: str, source: str, app: App, working_dir: str | None
) -> Deployment:
    """Record ``app`` as the namespace's deployment and make every agent's split fit it."""

    made: list[Deployment] = []

    def recorded(raw: str | None) -> str:
        generation = 1 if raw is None else Deployment.from_json(raw).generation + 1
        made.append(Deployment(source, app.describe(), working_dir, generation))
        return made[-1].to_json()

    try:
        await update(store, deployment_key(namespace), recorded, backoff=_CAS)
    except SettingContended as exc:
        raise StoreError(f"the deployment of {namespace!r} kept changing while writing it") from exc
    new = made[-1]  # the one the last, successful attempt made
    for name in app.names:
        await update_split(store, namespace, name, app.versions(name), lambda s: s, reset=True)
    return new


async def read_split(
    store: HistoryStore, namespace: str, name: str, versions: Sequence[str]
) -> Split:
    """Agent ``name``'s stored split, or the one a fresh deployment starts with."""
    raw = await store.get_setting(split_key(namespace, name))
    return Split(name, live=versions[0]) if raw is None else Split.from_json(raw)


async def update_split(
    store: HistoryStore,
    namespace: str,
    name: str,
    versions: Sequence[str],
    change: Callable[[Split], Split],
    *,
    reset: bool = False,
) -> Split:
    """Apply ``change`` to agent ``name``'s split by compare-and-set (retried when
    another writer got in first); ``reset`` first fits the split to ``versions`` (the
    ones the served app lists)."""

    made: list[Split] = []

    def changed(raw: str | None) -> str | None:
        current = None if raw is None else Split.from_json(raw)
        base = current
        if reset or current is None:
            base = reset_for(current, name, versions) or current
        assert base is not None
        made.append(change(base))
        if raw is not None and made[-1] == current:
            return None  # unchanged: nothing to write (idempotent commands)
        return made[-1].to_json()

    try:
        await update(store, split_key(namespace, name), changed, backoff=_CAS)
    except SettingContended as exc:
        raise StoreError(f"the split of agent {name!r} kept changing while writing it") from exc
    return made[-1]  # what the last, successful attempt made


async def read_pin(store: HistoryStore, namespace: str, conversation_id: str) -> Pin | None:
    raw = await store.get_setting(pin_key(namespace, conversation_id))
    return None if raw is None else Pin.from_json(raw)


async def write_pin(
    store: HistoryStore, namespace: str, conversation_id: str, pin: Pin, old: Pin | None
) -> None:
    """Store ``pin`` (only the conversation's one live entity writes it)."""
    key = pin_key(namespace, conversation_id)
    expected = None if old is None else old.to_json()
    if not await store.put_setting(key, pin.to_json(), expected=expected):
        # Someone else's pin (an entity fenced out since): ours is the one that serves.
        current = await store.get_setting(key)
        await store.put_setting(key, pin.to_json(), expected=current)
