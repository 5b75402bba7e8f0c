"""The chaos property's oracle on its own (no Ray): it must be able to say "no kill landed
mid-turn" and "this store lost / duplicated a turn", or the property could not fail."""

from __future__ import annotations

from chaos_oracle import Kill, TurnSpan, damage, mid_turn_kills

from overstory.messages import AssistantMessage, Message, ToolCall, UserMessage


def span(turn_id: str, pid: int, start: float, end: float, restarted: bool = True) -> TurnSpan:
    return TurnSpan(turn_id, pid, start, end, restarted)


def test_a_kill_inside_a_restarted_turn_on_its_process_counts() -> None:
    turns = [span("a", pid=10, start=1.0, end=3.0)]
    assert mid_turn_kills(turns, [Kill(at=2.0, pid=10)]) == 1


def test_kills_that_missed_every_turn_count_zero() -> None:
    turns = [span("a", 10, 1.0, 3.0), span("b", 11, 5.0, 6.0)]
    kills = [
        Kill(at=0.5, pid=10),  # before the turn began
        Kill(at=3.5, pid=10),  # after it ended
        Kill(at=2.0, pid=11),  # during a turn, but another process's
        Kill(at=5.5, pid=99),  # a process serving no turn
    ]
    assert mid_turn_kills(turns, kills) == 0
    assert mid_turn_kills([], kills) == 0
    assert mid_turn_kills(turns, []) == 0


def test_a_kill_within_the_readers_window_without_a_restart_does_not_count() -> None:
    # The turn had ended in its process before its reader read the end: no restart.
    turns = [span("a", 10, 1.0, 3.0, restarted=False)]
    assert mid_turn_kills(turns, [Kill(at=2.0, pid=10)]) == 0


def test_each_kill_counts_once_however_many_turns_it_interrupted() -> None:
    turns = [span("a", 10, 1.0, 3.0), span("b", 10, 1.5, 4.0)]
    assert mid_turn_kills(turns, [Kill(at=2.0, pid=10)]) == 1
    assert mid_turn_kills(turns, [Kill(at=2.0, pid=10), Kill(at=3.5, pid=10)]) == 2


def stored_turn(turn_id: str, first_seq: int, text: str = "hi") -> list[Message]:
    return [
        UserMessage(content=text, seq=first_seq, turn_id=turn_id),
        AssistantMessage(content="echo", seq=first_seq + 1, turn_id=turn_id),
    ]


def test_a_store_holding_every_acknowledged_turn_once_is_undamaged() -> None:
    stored = stored_turn("t1", 0) + stored_turn("t2", 2)
    verdict = damage([("t1", "hi"), ("t2", "hi")], stored)
    assert verdict.none
    assert (verdict.lost, verdict.duplicated, verdict.seqs_contiguous) == (0, 0, True)


def test_an_acknowledged_turn_missing_or_unfinished_is_lost() -> None:
    assert damage([("t1", "hi"), ("t2", "hi")], stored_turn("t1", 0)).lost == 1
    # Its user message stored, its final answer not (only a tool call): lost too.
    half = [
        UserMessage(content="hi", seq=0, turn_id="t1"),
        AssistantMessage(seq=1, turn_id="t1", tool_calls=(ToolCall("c1", "add"),)),
    ]
    verdict = damage([("t1", "hi")], half)
    assert verdict.lost == 1
    assert not verdict.none


def test_a_turn_stored_twice_is_duplicated() -> None:
    stored = stored_turn("t1", 0) + stored_turn("t1", 2)
    verdict = damage([("t1", "hi")], stored)
    assert (verdict.lost, verdict.duplicated) == (0, 1)
    assert not verdict.none


def test_a_gap_in_the_seqs_is_damage() -> None:
    verdict = damage([("t1", "hi")], stored_turn("t1", 1))
    assert (verdict.lost, verdict.duplicated, verdict.seqs_contiguous) == (0, 0, False)
    assert not verdict.none
