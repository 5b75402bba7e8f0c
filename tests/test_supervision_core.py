"""The pure supervision core against OTP's supervisor semantics (no Ray, no clock).

Example tests pin each rule down; a stateful hypothesis test drives random supervisors
through exits, clock ticks, dynamic adds and removals and compares every step with a
small reference model written here from scratch.
"""

from __future__ import annotations

import math
from typing import Any, get_args

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from overstory.exceptions import ConfigError
from overstory.supervisors.core import (
    Decision,
    Remove,
    Restart,
    Shutdown,
    SupervisorState,
    add_child,
    initial_state,
    on_exit,
    remove_child,
    replace_child,
    restart_intensity,
    should_restart,
)
from overstory.supervisors.spec import (
    DEFAULT_MAX_RESTARTS,
    DEFAULT_PERIOD_S,
    DEFAULT_RESTART,
    DEFAULT_STRATEGY,
    EXIT_REASONS,
    RESTART_TYPES,
    STRATEGIES,
    ChildSpec,
    ExitReason,
    RestartType,
    Strategy,
    SupervisorSpec,
)


def _sup(
    strategy: Strategy,
    *children: str,
    max_restarts: int = 10,
    period_s: float = 5.0,
) -> SupervisorState:
    """A fresh supervisor; a child is ``"id"`` or ``"id:restart_type"``."""
    specs = []
    for c in children:
        cid, _, kind = c.partition(":")
        specs.append(ChildSpec(cid, restart=kind or "permanent"))  # type: ignore[arg-type]
    spec = SupervisorSpec(strategy, max_restarts, period_s, tuple(specs))
    return initial_state(spec)


def _ids(state: SupervisorState) -> tuple[str, ...]:
    return tuple(c.id for c in state.children)


# --- specs -------------------------------------------------------------------------------


def test_defaults_and_vocabularies() -> None:
    spec = SupervisorSpec()
    assert (spec.strategy, spec.max_restarts, spec.period_s, spec.children) == (
        DEFAULT_STRATEGY,
        DEFAULT_MAX_RESTARTS,
        DEFAULT_PERIOD_S,
        (),
    )
    assert ChildSpec("a").restart == DEFAULT_RESTART
    assert get_args(Strategy) == STRATEGIES
    assert get_args(RestartType) == RESTART_TYPES
    assert get_args(ExitReason) == EXIT_REASONS


def test_child_start_factory_takes_no_part_in_equality() -> None:
    assert ChildSpec("a", start=object()) == ChildSpec("a", start=object())
    assert hash(ChildSpec("a", start=1)) == hash(ChildSpec("a", start=2))
    assert ChildSpec("a") != ChildSpec("a", restart="transient")


def test_children_list_is_stored_as_tuple() -> None:
    spec = SupervisorSpec(children=[ChildSpec("a")])  # type: ignore[arg-type]
    assert spec.children == (ChildSpec("a"),)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategy": "one_for_rest"}, r"unknown supervisor strategy 'one_for_rest'.*rest_for_one"),
        ({"max_restarts": -1}, r"max_restarts must be an int >= 0, got -1"),
        ({"max_restarts": True}, r"max_restarts must be an int >= 0, got True"),
        ({"max_restarts": 1.0}, r"max_restarts must be an int >= 0, got 1\.0"),
        ({"period_s": 0}, r"period_s must be a finite number > 0, got 0"),
        ({"period_s": -1.5}, r"period_s must be a finite number > 0, got -1\.5"),
        ({"period_s": math.nan}, r"period_s must be a finite number > 0, got nan"),
        ({"period_s": math.inf}, r"period_s must be a finite number > 0, got inf"),
        ({"period_s": True}, r"period_s must be a finite number > 0, got True"),
        ({"children": (ChildSpec("a"), ChildSpec("b"), ChildSpec("a"))}, r"duplicate child id 'a'"),
        ({"children": ("a",)}, r"children must be ChildSpec instances, got 'a'"),
    ],
)
def test_invalid_supervisor_spec(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SupervisorSpec(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"id": ""}, r"child id must be a non-empty string, got ''"),
        ({"id": 7}, r"child id must be a non-empty string, got 7"),
        (
            {"id": "a", "restart": "forever"},
            r"unknown restart type 'forever'; expected one of: permanent, transient, temporary",
        ),
    ],
)
def test_invalid_child_spec(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ChildSpec(**kwargs)


# --- restart types -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("restart", "reason", "expected"),
    [
        ("permanent", "normal", True),
        ("permanent", "shutdown", True),
        ("permanent", "crash", True),
        ("transient", "normal", False),
        ("transient", "shutdown", False),
        ("transient", "crash", True),
        ("temporary", "normal", False),
        ("temporary", "shutdown", False),
        ("temporary", "crash", False),
    ],
)
def test_should_restart(restart: RestartType, reason: ExitReason, expected: bool) -> None:
    assert should_restart(restart, reason) is expected


def test_permanent_child_restarts_even_after_a_normal_exit() -> None:
    state, decision = on_exit(_sup("one_for_one", "a", "b"), "a", "normal", now=0.0)
    assert decision == Restart(terminate=(), start=("a",))
    assert _ids(state) == ("a", "b")
    assert state.restarts == (0.0,)


def test_transient_child_is_removed_on_normal_exit_and_restarted_on_crash() -> None:
    sup = _sup("one_for_all", "a", "t:transient", "b")
    state, decision = on_exit(sup, "t", "normal", now=0.0)
    assert decision == Remove("t")
    assert _ids(state) == ("a", "b")
    assert state.restarts == ()
    state, decision = on_exit(sup, "t", "shutdown", now=0.0)
    assert decision == Remove("t")
    state, decision = on_exit(sup, "t", "crash", now=0.0)
    assert decision == Restart(terminate=("b", "a"), start=("a", "t", "b"))
    assert _ids(state) == ("a", "t", "b")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_temporary_child_is_never_restarted_and_siblings_stay_up(strategy: Strategy) -> None:
    sup = _sup(strategy, "a", "t:temporary", "b")
    state, decision = on_exit(sup, "t", "crash", now=0.0)
    assert decision == Remove("t")
    assert _ids(state) == ("a", "b")
    assert state.restarts == ()


# --- strategies --------------------------------------------------------------------------


def test_one_for_one_restarts_only_the_failed_child() -> None:
    state, decision = on_exit(_sup("one_for_one", "a", "b", "c"), "b", "crash", now=1.0)
    assert decision == Restart(terminate=(), start=("b",))
    assert _ids(state) == ("a", "b", "c")


def test_one_for_all_restarts_every_child_keeping_start_order() -> None:
    state, decision = on_exit(_sup("one_for_all", "a", "b", "c"), "b", "crash", now=1.0)
    assert decision == Restart(terminate=("c", "a"), start=("a", "b", "c"))
    assert _ids(state) == ("a", "b", "c")


def test_rest_for_one_restarts_the_failed_child_and_those_started_after_it() -> None:
    state, decision = on_exit(_sup("rest_for_one", "a", "b", "c", "d"), "b", "crash", now=1.0)
    assert decision == Restart(terminate=("d", "c"), start=("b", "c", "d"))
    assert _ids(state) == ("a", "b", "c", "d")


def test_one_for_all_drops_a_temporary_sibling() -> None:
    sup = _sup("one_for_all", "a", "t:temporary", "c", "u:transient")
    state, decision = on_exit(sup, "c", "crash", now=1.0)
    assert decision == Restart(terminate=("u", "t", "a"), start=("a", "c", "u"))
    assert _ids(state) == ("a", "c", "u")


def test_rest_for_one_drops_a_temporary_sibling_after_the_failed_child_only() -> None:
    sup = _sup("rest_for_one", "s:temporary", "a", "b", "t:temporary", "d")
    state, decision = on_exit(sup, "b", "crash", now=1.0)
    assert decision == Restart(terminate=("d", "t"), start=("b", "d"))
    assert _ids(state) == ("s", "a", "b", "d")


def test_dynamic_child_is_started_last_and_restarted_last() -> None:
    state = add_child(_sup("rest_for_one", "a", "b"), ChildSpec("x", restart="transient"))
    assert _ids(state) == ("a", "b", "x")
    state, decision = on_exit(state, "a", "crash", now=0.0)
    assert decision == Restart(terminate=("x", "b"), start=("a", "b", "x"))


# --- restart intensity -------------------------------------------------------------------


def test_intensity_exceeded_shuts_down_every_other_child_in_reverse_order() -> None:
    state = _sup("rest_for_one", "a", "b", "c", "d", max_restarts=2, period_s=10.0)
    state, _ = on_exit(state, "c", "crash", now=0.0)
    state, _ = on_exit(state, "c", "crash", now=1.0)
    assert state.restarts == (0.0, 1.0)
    state, decision = on_exit(state, "c", "crash", now=2.0)
    # Every other live child, not just the rest_for_one set.
    assert decision == Shutdown(terminate=("d", "b", "a"))
    assert state.children == ()
    assert state.restarts == (0.0, 1.0, 2.0)


def test_zero_max_restarts_shuts_down_on_the_first_restart_only() -> None:
    state = _sup("one_for_one", "a", "t:transient", max_restarts=0)
    state, decision = on_exit(state, "t", "normal", now=0.0)
    assert decision == Remove("t")
    state, decision = on_exit(state, "a", "crash", now=0.0)
    assert decision == Shutdown(terminate=())
    assert state.children == ()


def test_restarts_older_than_the_period_do_not_count() -> None:
    state = _sup("one_for_one", "a", max_restarts=2, period_s=5.0)
    state, _ = on_exit(state, "a", "crash", now=0.0)
    state, _ = on_exit(state, "a", "crash", now=1.0)
    # 5.0 - 0.0 is not < 5.0: the first restart has left the window.
    state, decision = on_exit(state, "a", "crash", now=5.0)
    assert isinstance(decision, Restart)
    assert state.restarts == (1.0, 5.0)
    state, decision = on_exit(state, "a", "crash", now=5.5)
    assert decision == Shutdown(terminate=())


def test_restart_intensity_function() -> None:
    assert restart_intensity((), 0.0, 0, 1.0) == ((0.0,), True)
    assert restart_intensity((1.0, 2.0, 3.0), 4.0, 3, 2.5) == ((2.0, 3.0, 4.0), False)
    assert restart_intensity((1.0, 2.0, 3.0), 4.0, 2, 3.5) == ((1.0, 2.0, 3.0, 4.0), True)


# --- errors, add and remove ----------------------------------------------------------------


def test_unknown_child_and_unknown_reason() -> None:
    with pytest.raises(KeyError, match="'zz'"):
        on_exit(_sup("one_for_one", "a"), "zz", "crash", now=0.0)
    with pytest.raises(KeyError, match="'zz'"):
        remove_child(_sup("one_for_one", "a"), "zz")
    with pytest.raises(ValueError, match="unknown exit reason 'boom'"):
        on_exit(_sup("one_for_one", "a"), "a", "boom", now=0.0)  # type: ignore[arg-type]


def test_add_child_rejects_a_live_duplicate_but_accepts_a_removed_id() -> None:
    state = _sup("one_for_one", "a", "b")
    with pytest.raises(ConfigError, match="duplicate child id 'a'"):
        add_child(state, ChildSpec("a"))
    state = remove_child(state, "a")
    assert _ids(state) == ("b",)
    assert _ids(add_child(state, ChildSpec("a"))) == ("b", "a")


def test_remove_child_leaves_the_restart_window_alone() -> None:
    state, _ = on_exit(_sup("one_for_all", "a", "b"), "a", "crash", now=3.0)
    state = remove_child(state, "b")
    assert (_ids(state), state.restarts) == (("a",), (3.0,))


def test_replace_child_keeps_its_place_and_the_restart_window() -> None:
    state, _ = on_exit(_sup("rest_for_one", "a", "b", "c"), "b", "crash", now=3.0)
    new = ChildSpec("b", start="new code", restart="transient")
    state = replace_child(state, new)
    assert (_ids(state), state.restarts) == (("a", "b", "c"), (3.0,))
    assert state.children[1] is new
    with pytest.raises(KeyError, match="'zz'"):
        replace_child(state, ChildSpec("zz"))
    # the new spec is what a restart sees: b is transient now, so a normal exit removes it
    state, decision = on_exit(state, "b", "normal", now=4.0)
    assert isinstance(decision, Remove)


# --- stateful: the core against an independent reference model ---------------------------

_RESTARTED_BY: dict[str, frozenset[str]] = {
    "permanent": frozenset({"normal", "shutdown", "crash"}),
    "transient": frozenset({"crash"}),
    "temporary": frozenset(),
}


class _Model:
    """Supervisor semantics re-derived on plain lists: simulate the exit, step by step."""

    def __init__(self, strategy: str, max_restarts: int, period: float) -> None:
        self.strategy, self.max_restarts, self.period = strategy, max_restarts, period
        self.ids: list[str] = []
        self.kind: dict[str, str] = {}
        self.stamps: list[float] = []
        self.dead = False

    def add(self, cid: str, kind: str) -> bool:
        if cid in self.ids:
            return False
        self.ids.append(cid)
        self.kind[cid] = kind
        return True

    def exit(self, cid: str, reason: str, now: float) -> tuple[str, list[str], list[str]]:
        """Return (what happened, terminated in order, started in order)."""
        if reason not in _RESTARTED_BY[self.kind[cid]]:
            self.ids.remove(cid)
            return "remove", [], []
        self.stamps = [t for t in self.stamps if t > now - self.period]
        self.stamps.append(now)
        if len(self.stamps) > self.max_restarts:
            gone = [x for x in self.ids[::-1] if x != cid]
            self.ids, self.dead = [], True
            return "shutdown", gone, []
        pos = self.ids.index(cid)
        if self.strategy == "one_for_all":
            down = list(self.ids)
        elif self.strategy == "rest_for_one":
            down = self.ids[pos:]
        else:
            down = [cid]
        terminated = []
        for x in reversed(self.ids):  # stop the siblings, last started first
            if x in down and x != cid:
                terminated.append(x)
        started, survivors = [], []
        for x in self.ids:  # then start again, first started first
            if x in down and x != cid and self.kind[x] == "temporary":
                continue
            survivors.append(x)
            if x in down:
                started.append(x)
        self.ids = survivors
        return "restart", terminated, started


def test_dynamic_transient_children_as_the_dedicated_supervisor_uses_them() -> None:
    """Start empty; each activation adds a transient child, passivation removes it, a
    crash restarts only that child, and too many crashes shut the rest down."""
    state = initial_state(SupervisorSpec("one_for_one", 2, 10.0))
    for uid in ("ann", "bob", "cy"):
        state = add_child(state, ChildSpec(uid, restart="transient"))
    state = remove_child(state, "bob")  # passivated: no restart, window untouched
    assert (_ids(state), state.restarts) == (("ann", "cy"), ())
    state, decision = on_exit(state, "ann", "crash", 1.0)
    assert decision == Restart(terminate=(), start=("ann",))
    state, decision = on_exit(state, "cy", "crash", 2.0)
    assert decision == Restart(terminate=(), start=("cy",))
    state, decision = on_exit(state, "ann", "crash", 3.0)
    assert decision == Shutdown(terminate=("cy",))
    assert _ids(state) == ()


def test_one_child_per_conversation_as_a_host_supervises_entities() -> None:
    """A host keeps a one-child supervisor per crashing conversation: restarts within
    intensity, then Shutdown — which the host turns into a quarantine of that one."""
    spec = SupervisorSpec("one_for_one", 2, 60.0, (ChildSpec("conv", restart="transient"),))
    state = initial_state(spec)
    decisions = []
    for t in (0.0, 1.0, 2.0):
        state, decision = on_exit(state, "conv", "crash", t)
        decisions.append(type(decision).__name__)
    assert decisions == ["Restart", "Restart", "Shutdown"]
    state = initial_state(spec)  # crashes a period apart never add up
    for t in (0.0, 60.0, 120.0, 180.0):
        state, decision = on_exit(state, "conv", "crash", t)
        assert isinstance(decision, Restart)


_POOL = [f"c{i}" for i in range(8)]
_QUARTERS = st.integers(0, 20).map(lambda q: q / 4)  # 0..5 s, exact in binary floating point


@settings(max_examples=300, stateful_step_count=40, deadline=None)
class SupervisorMachine(RuleBasedStateMachine):
    state: SupervisorState
    model: _Model

    @initialize(
        strategy=st.sampled_from(STRATEGIES),
        max_restarts=st.integers(0, 4),
        period=st.integers(4, 40).map(lambda q: q / 4),
        # Empty too: the dedicated conversation supervisor starts with no children and
        # adds one transient child per activation (add_dynamic_child below).
        kinds=st.lists(st.sampled_from(RESTART_TYPES), min_size=0, max_size=6),
    )
    def start(
        self, strategy: Strategy, max_restarts: int, period: float, kinds: list[RestartType]
    ) -> None:
        children = tuple(ChildSpec(f"c{i}", restart=k) for i, k in enumerate(kinds))
        self.state = initial_state(SupervisorSpec(strategy, max_restarts, period, children))
        self.model = _Model(strategy, max_restarts, period)
        for child in children:
            self.model.add(child.id, child.restart)
        self.now = 0.0

    def _alive(self) -> bool:
        return not self.model.dead

    @rule(dt=_QUARTERS)
    def tick(self, dt: float) -> None:
        self.now += dt

    @precondition(lambda self: self._alive() and self.model.ids)
    @rule(pick=st.integers(0, 7), reason=st.sampled_from(EXIT_REASONS))
    def child_exits(self, pick: int, reason: ExitReason) -> None:
        before = _ids(self.state)
        cid = before[pick % len(before)]
        self.state, decision = on_exit(self.state, cid, reason, self.now)
        kind, terminated, started = self.model.exit(cid, reason, self.now)
        self._check_decision(decision, cid, before, kind, terminated, started)

    def _check_decision(
        self,
        decision: Decision,
        cid: str,
        before: tuple[str, ...],
        kind: str,
        terminated: list[str],
        started: list[str],
    ) -> None:
        after = _ids(self.state)
        if isinstance(decision, Remove):
            assert (kind, decision.child) == ("remove", cid)
            assert cid not in after
            return
        positions = [before.index(x) for x in decision.terminate]
        assert positions == sorted(positions, reverse=True), "terminate not in reverse order"
        assert cid not in decision.terminate
        assert list(decision.terminate) == terminated
        if isinstance(decision, Shutdown):
            assert kind == "shutdown"
            assert after == ()
            return
        assert kind == "restart"
        assert set(decision.start) <= set(after)
        assert cid in decision.start
        positions = [after.index(x) for x in decision.start]
        assert positions == sorted(positions), "start not in start order"
        assert list(decision.start) == started

    @precondition(lambda self: self._alive())
    @rule(pick=st.sampled_from(_POOL), restart=st.sampled_from(RESTART_TYPES))
    def add_dynamic_child(self, pick: str, restart: RestartType) -> None:
        if self.model.add(pick, restart):
            self.state = add_child(self.state, ChildSpec(pick, restart=restart))
        else:
            with pytest.raises(ConfigError, match="duplicate child id"):
                add_child(self.state, ChildSpec(pick, restart=restart))

    @precondition(lambda self: self._alive() and self.model.ids)
    @rule(pick=st.integers(0, 7))
    def remove_a_child(self, pick: int) -> None:
        cid = self.model.ids[pick % len(self.model.ids)]
        self.model.ids.remove(cid)
        self.state = remove_child(self.state, cid)

    @precondition(lambda self: not self._alive())
    @rule(pick=st.sampled_from(_POOL))
    def shut_down_supervisor_has_no_children(self, pick: str) -> None:
        with pytest.raises(KeyError):
            on_exit(self.state, pick, "crash", self.now)

    @invariant()
    def same_children_as_the_model(self) -> None:
        assert list(_ids(self.state)) == self.model.ids

    @invariant()
    def same_restart_window_as_the_model(self) -> None:
        assert list(self.state.restarts) == self.model.stamps
        if not self.model.dead:
            assert len(self.state.restarts) <= self.state.spec.max_restarts


TestSupervisorMachine = SupervisorMachine.TestCase
