"""The alert rules and the dashboard shipped under deploy/ name only what the code
exports: every ``ray_overstory_*`` series in an expression is a metric of
``overstory.telemetry.metrics.METRICS`` (a histogram's ``_bucket``/``_count``/``_sum``
only for a histogram), every label matched or grouped by is one of its tag keys, and
both files load. No Ray here: ``test_observability_ray.py`` checks the names reach a
node's metrics port."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from overstory.telemetry.metrics import METRICS, MetricSpec

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "overstory-alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "overstory-dashboard.json"

_SERIES = re.compile(r"\b(ray_overstory_[a-z0-9_]+)(\{[^}]*\})?")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_BY_NAME: dict[str, MetricSpec] = {spec.name: spec for spec in METRICS.values()}


def _spec_of(series: str) -> tuple[MetricSpec, bool]:
    """The metric behind an exported series name, and whether it is a histogram's
    ``_bucket`` (which adds the ``le`` label)."""
    name = series.removeprefix("ray_")
    if name in _BY_NAME:
        return _BY_NAME[name], False
    for suffix in ("_bucket", "_count", "_sum"):
        base = name.removesuffix(suffix)
        if base != name and base in _BY_NAME and _BY_NAME[base].kind == "histogram":
            return _BY_NAME[base], suffix == "_bucket"
    raise AssertionError(f"{series} is not a metric the code exports")


def check_expression(expr: str) -> set[str]:
    """The metrics ``expr`` reads; raises naming a series or label the code does not
    export. Grouping labels must be tag keys of every metric the expression reads."""
    found = _SERIES.findall(expr)
    assert found, f"no overstory metric in {expr!r}"
    allowed: set[str] | None = None
    names = set()
    for series, matchers in found:
        spec, bucket = _spec_of(series)
        names.add(spec.name)
        keys = set(spec.tag_keys) | ({"le"} if bucket else set())
        for label in _MATCHER.findall(matchers or ""):
            assert label in keys, f"{series} has no label {label!r} (it has {sorted(keys)})"
        allowed = keys if allowed is None else allowed | keys
    for group in _GROUPING.findall(expr):
        for label in (g.strip() for g in group.split(",") if g.strip()):
            assert allowed is not None
            assert label in allowed, f"{expr!r} groups by {label!r}"
    assert expr.count("(") == expr.count(")"), f"unbalanced parentheses in {expr!r}"
    return names


def _rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(RULES.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def _targets() -> list[dict[str, Any]]:
    board = json.loads(DASHBOARD.read_text())
    return [target for panel in board["panels"] for target in panel["targets"]]


def test_every_alert_is_complete_and_reads_exported_metrics() -> None:
    rules = _rules()
    assert {r["alert"] for r in rules} >= {
        "OverstoryTurnErrorRatio",
        "OverstoryTurnLatencyP99",
        "OverstoryCircuitOpen",
        "OverstoryRestarts",
        "OverstoryJobBacklog",
        "OverstoryJobQueueAge",
        "OverstoryQuarantines",
        "OverstoryQuotaRefusals",
        "OverstoryStoreErrors",
    }
    for rule in rules:
        assert rule["labels"]["severity"] in ("page", "warn"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        check_expression(rule["expr"])


def test_the_dashboard_loads_and_every_panel_reads_exported_metrics() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "overstory-overview"
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource"]
    read: set[str] = set()
    for panel in board["panels"]:
        assert panel["targets"], panel["title"]
        assert {t["refId"] for t in panel["targets"]} == {
            chr(ord("A") + i) for i in range(len(panel["targets"]))
        }
    for target in _targets():
        read |= check_expression(target["expr"])
    # The dashboard shows every metric overstory exports but the cache's.
    assert read >= {spec.name for spec in METRICS.values()} - {"overstory_cache_total"}


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("rate(ray_overstory_turn_total[5m])", "not a metric"),
        ("ray_overstory_turns_total_bucket", "not a metric"),
        ('ray_overstory_turns_total{user="alice"}', "no label 'user'"),
        ("sum by (user) (rate(ray_overstory_turns_total[5m]))", "groups by 'user'"),
        ("sum(rate(ray_overstory_turns_total[5m])", "unbalanced"),
        ("up", "no overstory metric"),
    ],
)
def test_the_check_catches_what_the_code_does_not_export(expr: str, problem: str) -> None:
    with pytest.raises(AssertionError, match=problem):
        check_expression(expr)
