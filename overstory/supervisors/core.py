"""OTP supervision as pure functions: what to do when a child exits.

This mirrors Erlang/OTP's ``supervisor.erl``: restart strategies (``one_for_one``,
``one_for_all``, ``rest_for_one``), child restart types (``permanent``, ``transient``,
``temporary``) and restart intensity (more than ``max_restarts`` restarts within
``period_s`` seconds and the supervisor shuts down and escalates to its parent).

Nothing here touches Ray, a clock or any I/O: the current time is passed in, and each
call returns the next :class:`SupervisorState` and a :data:`Decision`. The actor shell
carries a decision out (terminates and starts the actors it names, in the order given)
and feeds each child's exit back in.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from overstory.exceptions import ConfigError
from overstory.supervisors.spec import (
    EXIT_REASONS,
    ChildSpec,
    ExitReason,
    RestartType,
    Strategy,
    SupervisorSpec,
)

__all__ = [
    "Decision",
    "Remove",
    "Restart",
    "Shutdown",
    "SupervisorState",
    "add_child",
    "initial_state",
    "on_exit",
    "remove_child",
    "replace_child",
    "restart_intensity",
    "should_restart",
]


@dataclass(frozen=True, slots=True)
class SupervisorState:
    """A supervisor between events: its spec, live children (start order), recent restarts."""

    spec: SupervisorSpec
    children: tuple[ChildSpec, ...]
    restarts: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class Restart:
    """Terminate ``terminate`` (reverse start order), then start ``start`` (start order)."""

    terminate: tuple[str, ...]
    start: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Remove:
    """The exited child is not restarted and is forgotten; nothing else changes."""

    child: str


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Intensity exceeded: terminate ``terminate`` (reverse start order), then escalate."""

    terminate: tuple[str, ...]


Decision = Restart | Remove | Shutdown


def initial_state(spec: SupervisorSpec) -> SupervisorState:
    """A supervisor that has just started every child of ``spec``, in order."""
    return SupervisorState(spec=spec, children=spec.children)


def should_restart(restart: RestartType, reason: ExitReason) -> bool:
    """Whether a child of this restart type is restarted after exiting for ``reason``."""
    if restart == "permanent":
        return True
    if restart == "transient":
        return reason == "crash"
    return False


def restart_intensity(
    restarts: tuple[float, ...], now: float, max_restarts: int, period_s: float
) -> tuple[tuple[float, ...], bool]:
    """Record a restart at ``now``; return the new window and whether intensity is exceeded.

    Restarts at least ``period_s`` old drop out of the window; more than ``max_restarts``
    restarts left inside it means the supervisor must give up.
    """
    window = (*(t for t in restarts if now - t < period_s), now)
    return window, len(window) > max_restarts


def _index(children: tuple[ChildSpec, ...], child_id: str) -> int:
    """Position of live child ``child_id``; KeyError naming it when there is none."""
    for i, child in enumerate(children):
        if child.id == child_id:
            return i
    raise KeyError(f"no live child {child_id!r}")


def _affected(strategy: Strategy, children: tuple[ChildSpec, ...], i: int) -> tuple[ChildSpec, ...]:
    """The children that go down with ``children[i]`` (itself included), in start order."""
    if strategy == "one_for_all":
        return children
    if strategy == "rest_for_one":
        return children[i:]
    return (children[i],)


def _remove(state: SupervisorState, i: int) -> tuple[SupervisorState, Decision]:
    child_id = state.children[i].id
    children = state.children[:i] + state.children[i + 1 :]
    return replace(state, children=children), Remove(child_id)


def _shutdown(
    state: SupervisorState, i: int, window: tuple[float, ...]
) -> tuple[SupervisorState, Decision]:
    others = tuple(c.id for c in reversed(state.children) if c.id != state.children[i].id)
    return replace(state, children=(), restarts=window), Shutdown(terminate=others)


def _restart(
    state: SupervisorState, i: int, window: tuple[float, ...]
) -> tuple[SupervisorState, Decision]:
    failed = state.children[i]
    affected = _affected(state.spec.strategy, state.children, i)
    siblings = tuple(c for c in affected if c.id != failed.id)
    # A temporary child taken down because of a sibling is never restarted.
    dropped = {c.id for c in siblings if c.restart == "temporary"}
    children = tuple(c for c in state.children if c.id not in dropped)
    decision = Restart(
        terminate=tuple(c.id for c in reversed(siblings)),
        start=tuple(c.id for c in affected if c.id not in dropped),
    )
    return replace(state, children=children, restarts=window), decision


def on_exit(
    state: SupervisorState, child_id: str, reason: ExitReason, now: float
) -> tuple[SupervisorState, Decision]:
    """Child ``child_id`` exited for ``reason`` at ``now``: the next state and what to do."""
    if reason not in EXIT_REASONS:
        raise ValueError(
            f"unknown exit reason {reason!r}; expected one of: {', '.join(EXIT_REASONS)}"
        )
    i = _index(state.children, child_id)
    if not should_restart(state.children[i].restart, reason):
        return _remove(state, i)
    spec = state.spec
    window, exceeded = restart_intensity(state.restarts, now, spec.max_restarts, spec.period_s)
    if exceeded:
        return _shutdown(state, i, window)
    return _restart(state, i, window)


def add_child(state: SupervisorState, child: ChildSpec) -> SupervisorState:
    """A dynamically started child, appended after every live child."""
    if any(c.id == child.id for c in state.children):
        raise ConfigError(f"duplicate child id {child.id!r}: a live child already has it")
    return replace(state, children=(*state.children, child))


def replace_child(state: SupervisorState, child: ChildSpec) -> SupervisorState:
    """A live child's spec changes (new code or options to start it with): it keeps its
    place in the start order, and the restart window is untouched."""
    i = _index(state.children, child.id)
    return replace(state, children=(*state.children[:i], child, *state.children[i + 1 :]))


def remove_child(state: SupervisorState, child_id: str) -> SupervisorState:
    """Terminate and forget a live child (not a restart: the window is untouched)."""
    i = _index(state.children, child_id)
    return replace(state, children=state.children[:i] + state.children[i + 1 :])
