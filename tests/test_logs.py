"""JSON log lines (no Ray): the runtime's own lines carry the trace they were logged in."""

from __future__ import annotations

import json
import logging

import pytest

from overstory.exceptions import ConfigError
from overstory.telemetry.logs import JsonFormatter, setup_logging


def test_a_log_line_is_one_json_object_with_its_trace() -> None:
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("test")
    formatter = JsonFormatter()
    record = logging.LogRecord(
        "overstory.actors.host",
        logging.WARNING,
        __file__,
        1,
        "restart of %r failed",
        ("host-3",),
        None,
    )
    with tracer.start_as_current_span("turn") as span:
        line = json.loads(formatter.format(record))
        context = span.get_span_context()
    assert line["level"] == "warning"
    assert line["logger"] == "overstory.actors.host"
    assert line["message"] == "restart of 'host-3' failed"
    assert line["trace_id"] == f"{context.trace_id:032x}"
    assert line["span_id"] == f"{context.span_id:016x}"
    assert line["ts"].endswith("+00:00")
    try:
        raise RuntimeError("the store went away\nsecond line")
    except RuntimeError:
        import sys

        failed = logging.LogRecord(
            "overstory", logging.ERROR, __file__, 1, "sweep failed", (), sys.exc_info()
        )
    line = json.loads(formatter.format(failed))
    assert (line["error"], line["error_message"]) == ("RuntimeError", "the store went away")
    assert "trace_id" not in line  # outside a span


def test_the_mode_comes_from_the_environment_and_a_bad_one_is_named() -> None:
    assert setup_logging({}) == "text"
    with pytest.raises(ConfigError, match="OVERSTORY_LOG must be 'text' or 'json', got 'yaml'"):
        setup_logging({"OVERSTORY_LOG": "yaml"})


def test_the_cli_refuses_a_bad_log_mode(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], sqlite_url: str
) -> None:
    from overstory.cli.main import main

    monkeypatch.setenv("OVERSTORY_LOG", "xml")
    assert main(["keys", "list", "--store", sqlite_url]) == 2
    assert "OVERSTORY_LOG" in capsys.readouterr().err
