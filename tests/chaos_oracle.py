"""The chaos property's oracle, pure (no Ray): which kills landed mid-turn, and what the
store lost or duplicated. ``tests/test_chaos_oracle.py`` tests it on its own;
``tests/test_chaos.py`` feeds it what the talkers and the killer recorded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from overstory.cli.demo import audit
from overstory.messages import Message


@dataclass(frozen=True)
class Kill:
    """A ``SIGKILL`` sent to process ``pid`` at ``at`` (``time.monotonic``)."""

    at: float
    pid: int


@dataclass(frozen=True)
class TurnSpan:
    """One streamed turn as its reader saw it: the process serving the conversation when
    it began (``pid``), when the reader read its ``started`` event and its terminal event
    (``time.monotonic``), and whether a ``restarted`` event came between (the process
    running it died, and the turn was started again elsewhere)."""

    turn_id: str
    pid: int
    started_at: float
    ended_at: float
    restarted: bool


def mid_turn_kills(turns: Sequence[TurnSpan], kills: Sequence[Kill]) -> int:
    """How many ``kills`` landed while a turn was running in the killed process.

    A kill counts when a turn served by that pid had started (its reader had read
    ``started``) and not yet ended (no terminal event read) at the kill, *and* the turn
    then saw ``restarted``: the reader's times only bound the turn from outside (it may
    have ended in its process before its reader read the end), so the ``restarted``
    event is what proves the process died with the turn in it. Each kill counts once,
    however many turns it interrupted.
    """
    landed = 0
    for kill in kills:
        if any(
            t.restarted and t.pid == kill.pid and t.started_at <= kill.at <= t.ended_at
            for t in turns
        ):
            landed += 1
    return landed


@dataclass(frozen=True)
class Damage:
    """What a conversation's store got wrong: acknowledged turns lost, turns stored more
    than once, and whether the messages' ``seq`` s run 0, 1, 2, ... without a gap."""

    lost: int
    duplicated: int
    seqs_contiguous: bool

    @property
    def none(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.seqs_contiguous


def damage(acked: Sequence[tuple[str, str]], stored: Sequence[Message]) -> Damage:
    """Judge one conversation's store against the ``(turn_id, text)`` turns its talker
    had acknowledged (the demo's own :func:`~overstory.cli.demo.audit`, plus seqs)."""
    lost, duplicated = audit(list(acked), list(stored))
    return Damage(lost, duplicated, [m.seq for m in stored] == list(range(len(stored))))
