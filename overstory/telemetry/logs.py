"""The runtime's own log lines, as JSON when asked (``OVERSTORY_LOG=json``).

One object per line on stderr: ``ts`` (UTC, ISO 8601), ``level``, ``logger``,
``message``, the ``trace_id`` and ``span_id`` of the span current when the line was
logged (so a line joins its trace), ``process``, and for an exception its ``error``
type and first line. overstory logs no message text or secret (its lines name
conversations, actors and kinds of failure); the variable reaches Ray's workers as the
``OTEL_*`` ones do (``connect`` forwards it).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from ..exceptions import ConfigError

__all__ = ["LOG_ENV", "JsonFormatter", "setup_logging"]

LOG_ENV = "OVERSTORY_LOG"
_MODES = ("text", "json")
_lock = threading.Lock()
_installed: list[logging.Handler] = []


class JsonFormatter(logging.Formatter):
    """A log record as one JSON object (see the module doc)."""

    def format(self, record: logging.LogRecord) -> str:
        from opentelemetry import trace

        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            data["trace_id"] = f"{context.trace_id:032x}"
            data["span_id"] = f"{context.span_id:016x}"
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            data["error"] = type(exc).__name__
            data["error_message"] = str(exc).splitlines()[0][:300] if str(exc) else ""
        return json.dumps(data, ensure_ascii=False)


def setup_logging(env: Mapping[str, str] | None = None) -> str:
    """Apply ``OVERSTORY_LOG`` (``text``, the default: Python's logging as configured;
    ``json``: overstory's loggers write JSON lines to stderr). Idempotent per process.
    Raises :class:`ConfigError` for another value."""
    mode = (os.environ if env is None else env).get(LOG_ENV, "").strip().lower() or "text"
    if mode not in _MODES:
        raise ConfigError(f"{LOG_ENV} must be 'text' or 'json', got {mode!r}")
    with _lock:
        if mode == "json" and not _installed:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(JsonFormatter())
            logger = logging.getLogger("overstory")
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False
            _installed.append(handler)
    return mode
