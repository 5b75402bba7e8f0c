"""What a supervisor is told: its restart strategy, its restart intensity and its children.

The vocabularies are OTP's (``supervisor.erl``): a strategy says which siblings restart
with a failed child, a child's restart type says which exits restart it, and an exit
reason says how a child ended. The specs are validated when built, so the pure core
(:mod:`overstory.supervisors.core`) never sees a bad one; every mistake is a
:class:`~overstory.exceptions.ConfigError` naming the offending value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from overstory.exceptions import ConfigError

__all__ = [
    "DEFAULT_MAX_RESTARTS",
    "DEFAULT_PERIOD_S",
    "DEFAULT_RESTART",
    "DEFAULT_STRATEGY",
    "EXIT_REASONS",
    "RESTART_TYPES",
    "STRATEGIES",
    "ChildSpec",
    "ExitReason",
    "RestartType",
    "Strategy",
    "SupervisorSpec",
]

Strategy = Literal["one_for_one", "one_for_all", "rest_for_one"]
RestartType = Literal["permanent", "transient", "temporary"]
ExitReason = Literal["normal", "shutdown", "crash"]

STRATEGIES: tuple[Strategy, ...] = ("one_for_one", "one_for_all", "rest_for_one")
RESTART_TYPES: tuple[RestartType, ...] = ("permanent", "transient", "temporary")
EXIT_REASONS: tuple[ExitReason, ...] = ("normal", "shutdown", "crash")

DEFAULT_STRATEGY: Strategy = "one_for_one"
DEFAULT_RESTART: RestartType = "permanent"
# OTP-style restart intensity: more than DEFAULT_MAX_RESTARTS restarts within
# DEFAULT_PERIOD_S seconds and the supervisor gives up. Defined here and nowhere else.
DEFAULT_MAX_RESTARTS = 3
DEFAULT_PERIOD_S = 5.0


def _one_of(kind: str, value: object, allowed: tuple[str, ...]) -> None:
    """Raise ConfigError unless ``value`` is one of ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"unknown {kind} {value!r}; expected one of: {', '.join(allowed)}")


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """One supervised child.

    ``start`` is opaque here (the actor shell's factory) and takes no part in equality
    or hashing: two specs are the same child when their id and restart type are.
    """

    id: str
    start: Any = field(default=None, compare=False)
    restart: RestartType = DEFAULT_RESTART

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ConfigError(f"child id must be a non-empty string, got {self.id!r}")
        _one_of("restart type", self.restart, RESTART_TYPES)


@dataclass(frozen=True, slots=True)
class SupervisorSpec:
    """A supervisor: strategy, restart intensity (``max_restarts`` per ``period_s``), children.

    ``children`` are started in the order given; a list is accepted and stored as a tuple.
    """

    strategy: Strategy = DEFAULT_STRATEGY
    max_restarts: int = DEFAULT_MAX_RESTARTS
    period_s: float = DEFAULT_PERIOD_S
    children: tuple[ChildSpec, ...] = ()

    def __post_init__(self) -> None:
        _one_of("supervisor strategy", self.strategy, STRATEGIES)
        m = self.max_restarts
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ConfigError(f"max_restarts must be an int >= 0, got {m!r}")
        p = self.period_s
        if isinstance(p, bool) or not isinstance(p, int | float) or not (0 < p < math.inf):
            raise ConfigError(f"period_s must be a finite number > 0, got {p!r}")
        object.__setattr__(self, "children", tuple(self.children))
        seen: set[str] = set()
        for child in self.children:
            if not isinstance(child, ChildSpec):
                raise ConfigError(f"children must be ChildSpec instances, got {child!r}")
            if child.id in seen:
                raise ConfigError(f"duplicate child id {child.id!r}")
            seen.add(child.id)
