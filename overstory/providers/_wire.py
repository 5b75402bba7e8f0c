"""What the vendor modules share: turning an HTTP failure into a :class:`ModelError`.

Each vendor module catches its own SDK's exceptions and hands the status, headers and
message here, so the taxonomy is applied the same way to every vendor.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from ..exceptions import ModelError
from ..messages import ToolCall
from .taxonomy import is_context_overflow, kind_of_status, parse_retry_after

__all__ = ["http_error", "scrubbed", "tool_arguments", "tool_call"]

#: Longest provider error text kept in an error message (they can echo whole prompts).
_MAX_DETAIL = 300


def http_error(
    model: str,
    status: int,
    headers: Mapping[str, str],
    message: str,
    code: str | None = None,
) -> ModelError:
    """The :class:`ModelError` for an HTTP error answer from a provider."""
    kind = kind_of_status(status)
    if status in (400, 413) and is_context_overflow(code, message):
        kind = "context_overflow"
    detail = " ".join(message.split())[:_MAX_DETAIL]
    return ModelError(
        f"HTTP {status}: {detail}",
        model=model,
        kind=kind,
        status=status,
        retry_after=parse_retry_after(headers, time.time()),
    )


def tool_arguments(model: str, name: str, raw: Any) -> dict[str, Any]:
    """A tool call's arguments as a JSON object, from a JSON string or a dict.

    A model that produced arguments which are not a JSON object gave a malformed answer
    (retryable: sampling again usually fixes it).
    """
    value = raw
    if isinstance(raw, str):
        try:
            value = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as exc:
            raise ModelError(
                f"tool call {name!r} has arguments that are not JSON: {exc}",
                model=model,
                kind="malformed",
            ) from None
    if not isinstance(value, dict):
        raise ModelError(
            f"tool call {name!r} has arguments that are not a JSON object: {type(value).__name__}",
            model=model,
            kind="malformed",
        )
    return value


def tool_call(model: str, call_id: Any, name: Any, raw_arguments: Any) -> ToolCall:
    """A validated :class:`ToolCall` from a provider's reply."""
    if not isinstance(call_id, str) or not call_id or len(call_id) > 200:
        raise ModelError(
            f"tool call without a usable id: {call_id!r}", model=model, kind="malformed"
        )
    if not isinstance(name, str) or not name or len(name) > 200:
        raise ModelError(
            f"tool call without a usable name: {name!r}", model=model, kind="malformed"
        )
    return ToolCall(id=call_id, name=name, arguments=tool_arguments(model, name, raw_arguments))


def scrubbed(error: ModelError, key: str) -> ModelError:
    """``error`` with every occurrence of ``key`` masked (providers echo keys in 401s)."""
    text = str(error)
    if len(key) < 8 or key not in text:
        return error
    return ModelError(
        text.replace(key, "****"),
        model=error.model,
        kind=error.kind,
        retry_after=error.retry_after,
        status=error.status,
    )
