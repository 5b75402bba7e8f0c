"""Supervision with OTP semantics: pure decisions (``core``), thin Ray shells around them.

``spec``          strategies, restart types, intensity defaults, validated child specs
``core``          which children restart, in what order, and when to give up — pure
``tree``          the root supervisor and :func:`boot` (one named tree per namespace)
``conversations`` the dynamic supervisor of conversation actors (and the live registry)
"""

from .core import (
    Decision,
    Remove,
    Restart,
    Shutdown,
    SupervisorState,
    add_child,
    initial_state,
    on_exit,
    remove_child,
    restart_intensity,
    should_restart,
)
from .spec import (
    DEFAULT_MAX_RESTARTS,
    DEFAULT_PERIOD_S,
    ChildSpec,
    ExitReason,
    RestartType,
    Strategy,
    SupervisorSpec,
)

__all__ = [
    "DEFAULT_MAX_RESTARTS",
    "DEFAULT_PERIOD_S",
    "ChildSpec",
    "Decision",
    "ExitReason",
    "Remove",
    "Restart",
    "RestartType",
    "Shutdown",
    "Strategy",
    "SupervisorSpec",
    "SupervisorState",
    "add_child",
    "initial_state",
    "on_exit",
    "remove_child",
    "restart_intensity",
    "should_restart",
]
