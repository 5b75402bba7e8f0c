"""App: the agents a namespace serves, deployed by import path (``module:attr``).

An :class:`App` is an ordered set of :class:`~overstory.agent.Agent` s — several names,
and several versions of one name. ``overstory serve pkg.mod:app`` records the path in
the store and every host (and dedicated conversation actor) imports it itself
(:func:`load_app`), so the tools that run are the deployed code, not whatever a client
pickled. ``attr`` may name an ``App``, an ``Agent``, or a list or tuple of agents.

Which version of an agent serves a conversation is the rollout's business
(:mod:`overstory.rollout`); here, the first version listed of each name is the one
that is live before any rollout, and the first name is the app's default agent.

Conversation ids: a user's conversation with agent ``NAME`` is ``NAME:<user id>``
(:func:`conversation_id`). Agent names cannot contain ``:``, so the id splits back
unambiguously whatever the user id holds.
"""

from __future__ import annotations

import importlib
import re
import sys
import traceback
from collections.abc import Iterable
from typing import Any

from .agent import Agent, Placement
from .exceptions import ConfigError, UnknownAgent

__all__ = [
    "App",
    "AppLoadError",
    "as_app",
    "conversation_id",
    "load_app",
    "split_conversation_id",
]

_SOURCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class AppLoadError(ConfigError):
    """``module:attr`` does not import, or names nothing an app can be made of.

    Raised ``from`` the error that caused it (the user's module's own import error, with
    its traceback). Ray sends an exception across a call by pickling it, which keeps the
    message and drops the cause, and a host or a node's probe imports the app on the far
    side of one: so when it is pickled, the cause's formatted traceback is written into
    the message, and the caller still sees where their module failed.
    """

    def __reduce__(self) -> tuple[object, ...]:
        message = str(self)
        cause = self.__cause__
        if cause is not None:
            shown = "".join(traceback.format_exception(cause)).rstrip()
            message = f"{message}\n\nCaused by:\n{shown}"
        return (type(self), (message,))


class App:
    """The agents of one deployment, in the order given (the first is the default).

    Every agent of an app has the same placement (one supervision tree serves it). Two
    entries with the same name are versions of one agent and must differ in
    ``version``; the first listed of a name is live for new conversations until a
    rollout promotes another.
    """

    def __init__(self, agents: Iterable[Agent], *, source: str | None = None) -> None:
        self.agents: tuple[Agent, ...] = tuple(agents)
        self.source = source
        if not self.agents:
            raise ConfigError("an app needs at least one agent")
        self._by_key: dict[tuple[str, str], Agent] = {}
        self._versions: dict[str, list[str]] = {}
        for agent in self.agents:
            if not isinstance(agent, Agent):
                raise ConfigError(f"an app holds overstory.Agent values, got {agent!r}")
            key = (agent.name, agent.version)
            if key in self._by_key:
                raise ConfigError(f"agent {agent.name!r} version {agent.version!r} is listed twice")
            self._by_key[key] = agent
            self._versions.setdefault(agent.name, []).append(agent.version)
        placements = {a.placement for a in self.agents}
        if len(placements) > 1:
            raise ConfigError(
                "every agent of an app needs the same placement (one tree serves them): "
                + ", ".join(f"{a.name}@{a.version}={a.placement}" for a in self.agents)
            )
        self.placement: Placement = self.agents[0].placement

    def __repr__(self) -> str:
        where = f", source={self.source!r}" if self.source else ""
        return f"App({self.describe()['agents']}{where})"

    def __reduce__(self) -> tuple[Any, ...]:
        # A deployed app travels as its import path: the receiving process imports the
        # deployed code itself instead of unpickling a client's copy of it.
        if self.source is not None:
            return (load_app, (self.source,))
        return (App, (self.agents,))

    @property
    def names(self) -> list[str]:
        """Agent names, in the order listed."""
        return list(self._versions)

    @property
    def default(self) -> str:
        """The agent a conversation gets when none is named: the first listed."""
        return self.agents[0].name

    def versions(self, name: str) -> list[str]:
        """Versions of ``name`` in the order listed (the first is live before a rollout)."""
        self.check(name)
        return list(self._versions[name])

    def check(self, name: str) -> str:
        """``name`` itself if the app serves it, else :class:`UnknownAgent` listing them."""
        if name not in self._versions:
            raise UnknownAgent(name, self.names)
        return name

    def get(self, name: str, version: str | None = None) -> Agent:
        """Agent ``name`` at ``version`` (default: its first listed version)."""
        versions = self.versions(name)
        version = versions[0] if version is None else version
        agent = self._by_key.get((name, version))
        if agent is None:
            raise ConfigError(
                f"agent {name!r} has no version {version!r}; versions: {', '.join(versions)}"
            )
        return agent

    def describe(self) -> dict[str, Any]:
        """JSON-able summary: what clients and ``overstory status`` are told, and what
        the deployment record keeps (so no supervisor has to import the app): agents and
        versions, and every version's model chain, each endpoint once."""
        from .providers.pool import chain_rows  # imports Ray: not at module import

        models: dict[str, dict[str, Any]] = {}
        for agent in self.agents:
            for row in chain_rows(agent.model):
                models.setdefault(row["model"], row)
        return {
            "source": self.source,
            "default": self.default,
            "placement": self.placement,
            "agents": {name: list(versions) for name, versions in self._versions.items()},
            "models": list(models.values()),
        }


def as_app(value: object, *, source: str | None = None) -> App:
    """An :class:`App` from an ``App``, an ``Agent``, or a list/tuple of agents."""
    if isinstance(value, App):
        return value if source is None else App(value.agents, source=source)
    if isinstance(value, Agent):
        return App((value,), source=source)
    if isinstance(value, list | tuple):
        return App(value, source=source)
    raise ConfigError(
        f"expected an overstory.App, an overstory.Agent or a list of agents, "
        f"got {type(value).__name__}"
    )


def load_app(source: str) -> App:
    """Import ``module:attr`` and make an :class:`App` of it.

    Raises :class:`AppLoadError` naming the path and why: a malformed path, a module
    that does not import (or raises while importing), a missing attribute, or an
    attribute that is not an app.
    """
    if not isinstance(source, str) or not _SOURCE.match(source):
        raise AppLoadError(
            f"app path {source!r} must look like 'package.module:attribute' "
            "(an Agent, a list of agents, or an overstory.App)"
        )
    module_name, _, attr = source.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # anything the user's module raises while importing
        raise AppLoadError(
            f"app {source!r}: module {module_name!r} does not import "
            f"({type(exc).__name__}: {exc}); is it installed or on PYTHONPATH "
            f"(sys.path: {sys.path[:4]}...)?"
        ) from exc
    value: Any = module
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError as exc:
            raise AppLoadError(
                f"app {source!r}: module {module_name!r} has no attribute {attr!r}"
            ) from exc
    try:
        return as_app(value, source=source)
    except ConfigError as exc:
        raise AppLoadError(f"app {source!r}: {exc}") from exc


# --- conversation ids -------------------------------------------------------------------


def conversation_id(agent: str, user_id: str) -> str:
    """The id of ``user_id``'s conversation with agent ``agent``."""
    return f"{agent}:{user_id}"


def split_conversation_id(cid: str) -> tuple[str, str]:
    """``(agent, user id)`` of a conversation id (see :func:`conversation_id`)."""
    agent, sep, user_id = cid.partition(":")
    if not sep or not agent or not user_id:
        raise ConfigError(f"{cid!r} is not a conversation id ('agent:user')")
    return agent, user_id
