"""What the vendor modules share: the SDK boundary and its error translation.

:class:`SDKModel` is the one place a vendor SDK's exceptions become
:class:`ModelError` s (the official SDKs share their exception names), a key a provider
echoes is masked, and an unreadable answer becomes ``kind="malformed"``. A vendor module
only builds its client, sends the request and reads the answer.
"""

from __future__ import annotations

import json
import time
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any, ClassVar

from ..exceptions import ModelError
from ..messages import Message, ModelResponse, ToolCall
from ..tools import ToolDefinition
from .base import Model
from .endpoint import Endpoint
from .taxonomy import is_context_overflow, kind_of_status, parse_retry_after

__all__ = ["SDKModel", "http_error", "scrubbed", "tool_arguments", "tool_call"]


class SDKModel(Model):
    """One endpoint behind an official vendor SDK whose client never retries (the retry
    loop is ours). Subclasses set :attr:`sdk` and implement the three hooks."""

    #: The vendor's SDK module (``openai`` / ``anthropic``): its exception classes.
    sdk: ClassVar[ModuleType]
    #: What a well-formed answer is called, for the malformed-answer message.
    answer_shape: ClassVar[str]

    def __init__(self, endpoint: Endpoint) -> None:
        endpoint = endpoint.resolved()
        assert endpoint.key is not None
        self.endpoint = endpoint
        self._key = endpoint.key.value
        self._client = self._make_client(endpoint, self._key)

    @property
    def name(self) -> str:
        return self.endpoint.name

    @abstractmethod
    def _make_client(self, endpoint: Endpoint, key: str) -> Any:
        """The SDK's async client, built with ``max_retries=0``."""

    @abstractmethod
    async def _send(
        self,
        instructions: str,
        messages: Sequence[Message],
        tools: Sequence[ToolDefinition],
    ) -> Any:
        """The request in the vendor's format; returns the SDK's answer object."""

    @abstractmethod
    def _read(self, answer: Any) -> ModelResponse:
        """The SDK's answer as a :class:`ModelResponse` (may raise AttributeError & co)."""

    async def request(
        self,
        instructions: str,
        messages: Sequence[Message],
        tools: Sequence[ToolDefinition],
    ) -> ModelResponse:
        try:
            return self._parse(await self._call(instructions, messages, tools))
        except ModelError as exc:
            raise scrubbed(exc, self._key) from None

    async def _call(
        self,
        instructions: str,
        messages: Sequence[Message],
        tools: Sequence[ToolDefinition],
    ) -> Any:
        sdk = self.sdk
        try:
            return await self._send(instructions, messages, tools)
        except sdk.APIStatusError as exc:
            code = getattr(exc, "code", None)
            raise http_error(
                self.name, exc.status_code, exc.response.headers, exc.message, code
            ) from None
        except sdk.APITimeoutError:
            raise ModelError(
                f"no answer within {self.endpoint.timeout_s:g} s", model=self.name, kind="timeout"
            ) from None
        except sdk.APIConnectionError as exc:
            raise ModelError(
                f"connection failed: {exc}", model=self.name, kind="connection"
            ) from None
        except (sdk.APIError, ValueError, TypeError) as exc:
            # Includes a body that is not JSON: both SDKs let json.JSONDecodeError out.
            raise ModelError(
                f"unreadable answer: {type(exc).__name__}: {exc}", model=self.name, kind="malformed"
            ) from None

    def _parse(self, answer: Any) -> ModelResponse:
        try:
            return self._read(answer)
        except ModelError:
            raise
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
            raise ModelError(
                f"answer is not {self.answer_shape}: {type(exc).__name__}: {exc}",
                model=self.name,
                kind="malformed",
            ) from None


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
