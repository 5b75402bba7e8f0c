"""What the vendor modules share: the SDK boundary and its error translation.

:class:`SDKModel` is the one place a vendor SDK's exceptions become
:class:`ModelError` s (the official SDKs share their exception names), a key a provider
echoes is masked, and an unreadable answer becomes ``kind="malformed"``. A vendor module
only builds its client, sends the request, reads the answer, and assembles a streamed
answer from its events (an :class:`Assembler`).

Inside a stream the SDKs raise what they do at the door (an error *event* becomes an
``APIError`` or a status error with status 200) or let the HTTP library's transport
error out (a dropped connection): both become the kind the event names, or
``connection`` / ``timeout``.
"""

from __future__ import annotations

import json
import time
from abc import abstractmethod
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from types import ModuleType
from typing import Any, ClassVar, Protocol, TypeVar

import httpx2

from ..exceptions import ModelError
from ..messages import ModelResponse, ToolCall
from .base import Model, ModelRequest, StreamItem
from .endpoint import Endpoint
from .taxonomy import (
    is_context_overflow,
    kind_of_aws_error,
    kind_of_error_type,
    kind_of_status,
    parse_retry_after,
)

__all__ = [
    "Assembler",
    "SDKModel",
    "aiohttp_client",
    "http_error",
    "scrubbed",
    "stream_error",
    "tool_arguments",
    "tool_call",
]

_T = TypeVar("_T")

try:  # the SDKs' aiohttp transport (aiohttp_client) raises these underneath
    from aiohttp import ClientError as _AiohttpError

    _AIOHTTP_ERRORS: tuple[type[BaseException], ...] = (_AiohttpError,)
except ImportError:  # pragma: no cover - without aiohttp the SDKs use httpx
    _AIOHTTP_ERRORS = ()


def aiohttp_client(sdk: ModuleType) -> Any:
    """The SDK's own aiohttp transport (``DefaultAioHttpClient``: its defaults, its
    proxies and CA bundle from the environment, aiohttp's errors mapped to the ones its
    default transport raises), or ``None`` for its default (httpx over h11) when this
    SDK or install has none.

    A host reads every vendor stream it serves: with httpx's pure-Python reads (h11) a
    streamed answer of 15 chunks cost its reader 1.9-2.1 ms of CPU, with aiohttp's C
    parser 1.1-1.3 ms (``bench/vendor_http.py``)."""
    make = getattr(sdk, "DefaultAioHttpClient", None)
    if make is None:
        return None
    try:
        return make()
    except RuntimeError:  # the SDK's stand-in when aiohttp is not installed
        return None


def _not_a_timeout(exc: BaseException) -> BaseException | None:
    """The aiohttp error behind a "timeout" that was none (``None`` for a real one).

    The SDKs' aiohttp transport maps every ``aiohttp.ClientConnectionError`` it has no
    closer entry for to ``ConnectTimeout``: a refused connection, or a server that hung
    up mid-answer, would reach us as a timeout. aiohttp's own timeouts are
    ``TimeoutError`` s; any other aiohttp error in the chain is the connection's."""
    seen: BaseException | None = exc
    for _ in range(16):  # a chain is a few links; a bound all the same
        if seen is None:
            break
        if isinstance(seen, _AIOHTTP_ERRORS) and not isinstance(seen, TimeoutError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class Assembler(Protocol):
    """Builds one answer from a vendor's stream events, as they arrive."""

    def feed(self, event: Any) -> str:
        """Take one event; the text it adds ("" for none)."""

    def response(self) -> ModelResponse:
        """The whole answer, once the stream ended (raises ModelError if it is cut)."""


class SDKModel(Model):
    """One endpoint behind an official vendor SDK whose client never retries (the retry
    loop is ours). Subclasses set :attr:`sdk` and implement the hooks: the client, the
    request's arguments, the create call, reading an answer and assembling a stream."""

    #: The vendor's SDK module (``openai`` / ``anthropic``): its exception classes.
    sdk: ClassVar[ModuleType]
    #: What a well-formed answer is called, for the malformed-answer message.
    answer_shape: ClassVar[str]

    def __init__(self, endpoint: Endpoint) -> None:
        endpoint = endpoint.resolved()
        assert endpoint.key is not None
        self.endpoint = endpoint
        self._key = endpoint.key.value
        #: What is masked in error messages: the key, or each part of a packed one.
        self._secrets = (*(p for p in self._key.split(":") if len(p) >= 8), self._key)
        self._client = self._make_client(endpoint, self._key)

    @property
    def name(self) -> str:
        return self.endpoint.name

    async def aclose(self) -> None:
        """Close the client's connections (a process that drops this model)."""
        await self._client.close()

    @abstractmethod
    def _make_client(self, endpoint: Endpoint, key: str) -> Any:
        """The SDK's async client, built with ``max_retries=0``."""

    #: What a streamed request adds to the arguments (OpenAI also asks for the usage).
    stream_arguments: ClassVar[dict[str, Any]] = {"stream": True}

    @abstractmethod
    def _arguments(self, req: ModelRequest) -> dict[str, Any]:
        """The request in the vendor's format, as the SDK's keyword arguments."""

    @abstractmethod
    def _create(self, **arguments: Any) -> Awaitable[Any]:
        """The SDK's create call: its answer object, or its async stream of events."""

    @abstractmethod
    def _read(self, answer: Any) -> ModelResponse:
        """The SDK's answer as a :class:`ModelResponse` (may raise AttributeError & co)."""

    @abstractmethod
    def _assembler(self) -> Assembler:
        """A fresh assembler for one streamed answer."""

    async def request(self, req: ModelRequest) -> ModelResponse:
        try:
            with self._sdk_errors():
                answer = await self._create(**self._arguments(req))
            return self._parsed(self._read, answer)
        except ModelError as exc:
            raise scrubbed(exc, *self._secrets) from None

    async def stream(self, req: ModelRequest) -> AsyncGenerator[StreamItem, None]:
        """The vendor's stream: each text delta as it arrives, then the answer assembled
        from all events (tool calls and usage included). Closing the generator closes
        the HTTP response."""
        assembler = self._assembler()
        try:
            with self._sdk_errors():
                arguments = self._arguments(req)
                events = await self._create(**arguments, **self.stream_arguments)
            with self._sdk_errors(mid_stream=True):
                try:
                    async for event in events:
                        text = self._parsed(assembler.feed, event)
                        if text:
                            yield text
                finally:
                    await events.close()
            yield self._parsed(assembler.response)
        except ModelError as exc:
            raise scrubbed(exc, *self._secrets) from None

    @contextmanager
    def _sdk_errors(self, *, mid_stream: bool = False) -> Iterator[None]:
        """The SDK's (and, mid-stream, the HTTP library's) exceptions as ModelErrors.

        Not chained (``from None``), here and where :func:`scrubbed` masks keys: an SDK
        error holds the request and response (headers with the API key, bodies with the
        user's text) and would carry them into logs and across Ray; the ModelError keeps
        what a caller needs (kind, status, the vendor's message, retry-after)."""
        sdk = self.sdk
        lost = "connection lost mid-stream" if mid_stream else "connection failed"
        try:
            yield
        except sdk.APIStatusError as exc:
            if exc.status_code == 200:  # an error event inside a stream (Anthropic)
                raise stream_error(self.name, exc.body, exc.message) from None
            code = getattr(exc, "code", None)
            raise http_error(
                self.name, exc.status_code, exc.response.headers, exc.message, code
            ) from None
        except (sdk.APITimeoutError, httpx2.TimeoutException) as exc:
            cut = _not_a_timeout(exc)
            if cut is not None:
                raise ModelError(
                    f"{lost}: {type(cut).__name__}: {cut}", model=self.name, kind="connection"
                ) from None
            raise ModelError(
                f"no answer within {self.endpoint.timeout_s:g} s", model=self.name, kind="timeout"
            ) from None
        except sdk.APIConnectionError as exc:
            raise ModelError(f"{lost}: {exc}", model=self.name, kind="connection") from None
        except httpx2.TransportError as exc:  # a stream cut (Anthropic's SDK lets it out)
            raise ModelError(
                f"{lost}: {type(exc).__name__}: {exc}", model=self.name, kind="connection"
            ) from None
        except sdk.APIError as exc:
            if isinstance(exc.body, dict):  # an error event inside a stream (OpenAI)
                raise stream_error(self.name, exc.body, exc.message) from None
            raise ModelError(
                f"unreadable answer: {type(exc).__name__}: {exc}", model=self.name, kind="malformed"
            ) from None
        except (ValueError, TypeError) as exc:
            # Includes a body that is not JSON: both SDKs let json.JSONDecodeError out.
            raise ModelError(
                f"unreadable answer: {type(exc).__name__}: {exc}", model=self.name, kind="malformed"
            ) from None

    def _parsed(self, read: Callable[..., _T], *answer: Any) -> _T:
        """``read(*answer)``, an answer of the wrong shape being ``malformed``."""
        try:
            return read(*answer)
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
    kind = kind_of_aws_error(headers) or kind_of_status(status)
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


def stream_error(model: str, body: Any, message: str) -> ModelError:
    """The :class:`ModelError` for an error event inside a stream: its kind from the
    error's ``type`` or ``code`` (``overloaded_error``, ``server_error``, ...)."""
    error = body.get("error", body) if isinstance(body, dict) else {}
    error = error if isinstance(error, dict) else {}
    names = [v for v in (error.get("code"), error.get("type")) if isinstance(v, str)]
    kind = kind_of_error_type(names)
    text = error.get("message") if isinstance(error.get("message"), str) else message
    detail = " ".join(str(text).split())[:_MAX_DETAIL]
    return ModelError(f"error event mid-stream: {detail}", model=model, kind=kind)


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


def scrubbed(error: ModelError, *keys: str) -> ModelError:
    """``error`` with every occurrence of each key masked (providers echo keys in 401s)."""
    text = str(error)
    masked = text
    for key in sorted(keys, key=len, reverse=True):  # a whole key before its parts
        if len(key) >= 8:
            masked = masked.replace(key, "****")
    if masked == text:
        return error
    return ModelError(
        masked,
        model=error.model,
        kind=error.kind,
        retry_after=error.retry_after,
        status=error.status,
    )
