"""Per-conversation supervision: a crashed entity is restarted from the store, and one
that keeps crashing is quarantined.

Every shell that holds entities (a host holds thousands, a dedicated actor one) keeps one
:class:`EntitySupervision`. Each conversation is a transient child of its own small
one_for_one supervisor; whether a crash means "restart" or "give up" is the pure OTP
core's :func:`~overstory.supervisors.core.on_exit`, never a rule written here. Giving up
means quarantine: calls for that conversation get
:class:`~overstory.exceptions.ConversationQuarantined` until it expires, while the
process and its other conversations carry on. State is kept only for conversations
with a crash inside the restart period, and pruned as windows expire.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..config import ConversationSettings
from ..exceptions import ConversationQuarantined
from ..supervisors.core import Restart, SupervisorState, initial_state, on_exit
from ..supervisors.spec import ChildSpec, SupervisorSpec

__all__ = ["EntitySupervision"]


class EntitySupervision:
    """Crash accounting for the conversations of one process (see the module doc), by
    the ``[conversations]`` settings ``max_restarts``, ``restart_period_s`` and
    ``quarantine_s``.

    ``clock`` (monotonic) times restart windows; ``wall`` stamps quarantines (their
    ``until`` is shown to callers, so it is wall-clock time). Both are injectable.
    """

    def __init__(
        self,
        settings: ConversationSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.max_restarts = settings.max_restarts
        self.period_s = settings.restart_period_s
        self.quarantine_s = settings.quarantine_s
        self._clock = clock
        self._wall = wall
        self._crashes: dict[str, SupervisorState] = {}  # conversations with recent crashes
        self._quarantined: dict[str, ConversationQuarantined] = {}
        self.restarts = 0
        self.quarantines = 0

    def check(self, conversation_id: str) -> None:
        """Raise the conversation's :class:`ConversationQuarantined` while it holds."""
        quarantine = self._quarantined.get(conversation_id)
        if quarantine is None:
            return
        if self._wall() < quarantine.until:
            raise quarantine
        del self._quarantined[conversation_id]

    def crashed(self, conversation_id: str, reason: str) -> bool:
        """Conversation ``conversation_id`` crashed: ``True`` to restart it, ``False``
        when its restart intensity is exceeded and it is now quarantined."""
        now = self._clock()
        state = self._crashes.get(conversation_id)
        if state is None:
            spec = SupervisorSpec(
                "one_for_one",
                self.max_restarts,
                self.period_s,
                (ChildSpec(conversation_id, restart="transient"),),
            )
            state = initial_state(spec)
        state, decision = on_exit(state, conversation_id, "crash", now)
        self.prune()
        if isinstance(decision, Restart):
            self._crashes[conversation_id] = state
            self.restarts += 1
            return True
        self._crashes.pop(conversation_id, None)
        self.quarantines += 1
        self._quarantined[conversation_id] = ConversationQuarantined(
            conversation_id, len(state.restarts), self._wall() + self.quarantine_s, reason
        )
        return False

    def prune(self) -> None:
        """Forget expired crash windows and quarantines: this state must not grow."""
        now = self._clock()
        expired = [c for c, s in self._crashes.items() if now - s.restarts[-1] >= self.period_s]
        for cid in expired:
            del self._crashes[cid]
        wall = self._wall()
        for cid in [c for c, q in self._quarantined.items() if q.until <= wall]:
            del self._quarantined[cid]

    def tracked(self) -> int:
        """Conversations with crash or quarantine state (for tests: it stays bounded)."""
        return len(self._crashes) + len(self._quarantined)
