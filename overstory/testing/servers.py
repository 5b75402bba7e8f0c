"""Loopback HTTP servers that speak the OpenAI, Anthropic and Bedrock wire formats.

The official async SDKs talk to them over real HTTP, so tests, benchmarks and docs
exercise the same code path as production without a key or the network::

    with OpenAIServer() as server:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="sk-test")
        server.script(Fault.rate_limited(retry_after=2))   # the next request gets a 429
        ...

Run one by hand with ``python -m overstory.testing.servers openai --port 8000``.

Each server validates requests the way its vendor does (required fields, roles, tool
results answering the tool calls of the message just before) and answers 400 with a
vendor-shaped body naming the problem, so translation bugs in client code surface
here. Valid requests get deterministic answers:

* tool results at the end of the conversation -> ``"tool results: " + "; ".join(...)``;
* a last user message matching one of ``rules`` (``re.search``) whose tool was offered
  -> a call of that tool whose arguments are the pattern's named groups;
* anything else -> ``"echo: <last user text>"``.

Usage counts characters: input = request text // 4 + 1, output = answer // 4 + 1.

A request with ``"stream": true`` gets the same answer as server-sent events in the
vendor's format (OpenAI's ``chat.completion.chunk`` s ending ``[DONE]``, with a usage
chunk when ``stream_options.include_usage``; Anthropic's ``message_start`` ...
``message_stop``), text and tool-call arguments cut every ``piece_chars`` characters,
``stream_interval_s`` between content deltas.

:class:`BedrockServer` serves the Anthropic bodies on Bedrock's runtime paths
(``/model/{modelId}/invoke`` and ``/invoke-with-response-stream``, AWS event-stream
frames), refuses unsigned requests with 403 and names its errors in ``x-amzn-ErrorType``.

A :class:`Fault` scripts a failure; each server renders it in its vendor's shape
(``Fault.overloaded()`` is 529 for Anthropic and 503 for OpenAI).
``Fault.stream_error(after=N)`` and ``Fault.stream_drop(after=N)`` break a stream after
N content deltas, with the vendor's in-stream error event or a dropped connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import re
import signal
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, ClassVar, Self

try:
    from aiohttp import web
except ImportError as exc:  # aiohttp is in the 'testing' extra, not a core dependency
    raise ImportError(
        f"overstory.testing's servers need aiohttp ({exc}): pip install 'overstory[testing]'"
    ) from exc

from ..exceptions import ConfigError, UsageError
from ._anthropic import (
    _ANTHROPIC_TYPES,
    _anthropic_answer,
    _anthropic_error,
    _anthropic_fault,
    _anthropic_overflow,
    _anthropic_problem,
    _anthropic_stream,
    _anthropic_stream_error,
)
from ._bedrock import (
    EVENTSTREAM,
    _bedrock_chunk,
    _bedrock_error_headers,
    _bedrock_exception,
    _bedrock_fault,
    _bedrock_request,
    _bedrock_route,
    _sigv4_access_key,
    _sigv4_problem,
)
from ._common import (
    DEFAULT_RULES,
    Fault,
    FaultKind,
    Recorded,
    _Event,
    _Problem,
    _prompt_tokens,
    _Rules,
)
from ._openai import (
    _OPENAI_DONE,
    _openai_answer,
    _openai_error,
    _openai_fault,
    _openai_overflow,
    _openai_problem,
    _openai_stream,
    _openai_stream_error,
)

__all__ = [
    "DEFAULT_RULES",
    "AnthropicServer",
    "BedrockServer",
    "Fault",
    "FaultKind",
    "OpenAIServer",
    "Recorded",
    "WireServer",
    "main",
]


# --- the servers: thin I/O shells around the functions in _openai and _anthropic ---------

_Reply = tuple[int, Any, Mapping[str, str]]  # status, JSON body (or raw text), headers
_MALFORMED = '{"id": "broken", "choices": [{"index": 0, "mess'  # cut short: not JSON


def _bearer(headers: Mapping[str, str]) -> str:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class WireServer:
    """A loopback HTTP server speaking one vendor's wire format (see the module doc).

    ``start()`` serves from a daemon thread with its own event loop; ``serve_forever()``
    serves from the caller's loop. ``port=0`` picks a free port, kept across restarts.
    ``model`` overrides the model named in answers; ``latency_s`` delays every answer
    (a stream's first byte); ``piece_chars`` and ``stream_interval_s`` shape streams.
    ``context_window`` (tokens) refuses a longer prompt with the vendor's own
    prompt-too-long error; a prompt's tokens are its text's characters / 4 plus 3 per
    message (roughly the vendors' own count for English).
    ``script``, ``fail_always`` and ``reset`` may be called from any thread.
    """

    vendor: ClassVar[str] = ""
    _paths: ClassVar[tuple[str, ...]] = ()
    _base_path: ClassVar[str] = ""
    _request_id_header: ClassVar[str] = "x-request-id"

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        model: str | None = None,
        rules: Sequence[tuple[str, str]] = DEFAULT_RULES,
        latency_s: float = 0.0,
        piece_chars: int = 4,
        stream_interval_s: float = 0.0,
        context_window: int | None = None,
    ) -> None:
        if not self.vendor:
            raise UsageError("WireServer is a base class: use OpenAIServer or AnthropicServer")
        if not 0 <= port <= 65535:
            raise ConfigError(f"port must be 0..65535, got {port!r}")
        if latency_s < 0:
            raise ConfigError(f"latency_s must be >= 0, got {latency_s!r}")
        if isinstance(piece_chars, bool) or not isinstance(piece_chars, int) or piece_chars < 1:
            raise ConfigError(f"piece_chars must be an int >= 1, got {piece_chars!r}")
        if stream_interval_s < 0:
            raise ConfigError(f"stream_interval_s must be >= 0, got {stream_interval_s!r}")
        if context_window is not None and (
            isinstance(context_window, bool)
            or not isinstance(context_window, int)
            or context_window < 1
        ):
            raise ConfigError(f"context_window must be an int >= 1, got {context_window!r}")
        compiled: list[tuple[re.Pattern[str], str]] = []
        for pattern, tool in rules:
            try:
                compiled.append((re.compile(pattern), tool))
            except re.error as exc:
                raise ConfigError(f"rule pattern {pattern!r} is not a regex: {exc}") from exc
        self.host = host
        self.model = model
        self.latency_s = latency_s
        self.piece_chars = piece_chars
        self.stream_interval_s = stream_interval_s
        self.context_window = context_window
        self.requests: list[Recorded] = []
        self._rules: _Rules = tuple(compiled)
        self._port = port
        self._lock = threading.Lock()
        self._script: deque[Fault] = deque()
        self._always: Fault | None = None
        self._count = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- vendor hooks (pure) -- #

    def _api_key(self, headers: Mapping[str, str]) -> str:
        raise NotImplementedError

    def _header_problem(self, headers: Mapping[str, str]) -> _Problem | None:
        raise NotImplementedError

    def _problem(self, body: Any) -> _Problem | None:
        raise NotImplementedError

    def _answer(self, body: dict[str, Any], model: str, n: int) -> dict[str, Any]:
        raise NotImplementedError

    def _fault(self, fault: Fault) -> tuple[int, Any]:
        raise NotImplementedError

    def _error(self, problem: _Problem) -> Any:
        raise NotImplementedError

    def _stream(self, body: dict[str, Any], answer: dict[str, Any]) -> list[_Event]:
        """``answer`` as the vendor's stream events, without the end marker."""
        raise NotImplementedError

    def _stream_error(self, fault: Fault) -> _Event:
        raise NotImplementedError

    def _overflow(self, tokens: int, window: int) -> tuple[int, Any]:
        """The vendor's status and body refusing a prompt of ``tokens`` over ``window``."""
        raise NotImplementedError

    _stream_end: ClassVar[_Event | None] = None
    _stream_type: ClassVar[str] = "text/event-stream"

    def _route(self, raw_path: str, body: Any) -> tuple[Any, _Problem | None] | None:
        """For a path of the vendor's API: the request body in the shape the answerer
        reads, and why the vendor refuses the request before reading it (or None).
        None for any other path. ``raw_path`` is still percent-encoded."""
        return (body, None) if raw_path in self._paths else None

    def _status_headers(self, status: int) -> Mapping[str, str]:
        """Headers the vendor puts on an answer with ``status`` (errors' names)."""
        return {}

    def _frame(self, event: _Event) -> bytes:
        """One stream event as the vendor writes it on the wire."""
        return event.encode()

    def _error_frame(self, fault: Fault) -> bytes:
        """The vendor's in-stream error for ``fault``, as written on the wire."""
        return self._frame(self._stream_error(fault))

    # -- the public handle -- #

    @property
    def port(self) -> int:
        if self._port == 0:
            raise UsageError(f"{type(self).__name__} has no port until it is started")
        return self._port

    @property
    def base_url(self) -> str:
        """What to pass as the SDK's ``base_url``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self._base_path}"

    def script(self, *faults: Fault) -> None:
        """The next ``len(faults)`` requests get these faults in order (after any still
        scripted); later requests are answered normally again."""
        with self._lock:
            self._script.extend(faults)

    def fail_always(self, fault: Fault | None) -> None:
        """Every request not taken by ``script`` gets ``fault``, until called with None."""
        with self._lock:
            self._always = fault

    def reset(self) -> None:
        """Forget the recorded requests, the script and ``fail_always``."""
        with self._lock:
            self.requests.clear()
            self._script.clear()
            self._always = None

    def start(self) -> Self:
        """Serve from a daemon thread; returns once the server is listening."""
        if self._thread is not None:
            raise UsageError(f"{self!r} is already running")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:  # reported to start()'s caller
                failure.append(exc)
                loop.close()
                ready.set()
                return
            self._loop = loop
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._close())
                loop.close()

        thread = threading.Thread(target=run, name=f"{type(self).__name__}", daemon=True)
        thread.start()
        ready.wait()
        if failure:
            thread.join()
            raise failure[0]
        self._thread = thread
        return self

    def stop(self) -> None:
        """Stop serving (in-flight answers are given up to a second) and join the thread."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        self._thread = self._loop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def serve_forever(self) -> None:
        """Serve from the running event loop until cancelled."""
        await self._open()
        try:
            await asyncio.Event().wait()
        finally:
            await self._close()

    def __repr__(self) -> str:
        where = f"{self.host}:{self._port}" if self._port else self.host
        return f"{type(self).__name__}({where})"

    # -- I/O -- #

    async def _open(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self._port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._port = int(runner.addresses[0][1])
        self._runner = runner

    async def _close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", "replace")
        route = self._route(request.rel_url.raw_path, body)
        routed = request.method == "POST" and route is not None
        with self._lock:
            self.requests.append(
                Recorded(request.path, headers, body, self._api_key(headers), raw=raw)
            )
            n = next(self._count)
            fault = None
            if routed:
                fault = self._script.popleft() if self._script else self._always
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if fault is not None and fault.stall_s:
            await asyncio.sleep(fault.stall_s)
        body, refusal = route if route is not None else (body, None)
        streaming = isinstance(body, dict) and body.get("stream") is True
        strike = fault if fault is not None and fault.after is not None and streaming else None
        status, payload, extra = self._reply(
            request.method,
            request.path if route is None else None,
            headers,
            body,
            None if strike else fault,
            n,
            refusal,
        )
        reply_headers = {
            self._request_id_header: f"req_{n}",
            **(self._status_headers(status) if status >= 400 else {}),
            **extra,
        }
        if status == 200 and streaming and isinstance(payload, dict):
            return await self._send_stream(request, body, payload, strike, reply_headers)
        if isinstance(payload, str):
            return web.Response(
                status=status, text=payload, content_type="application/json", headers=reply_headers
            )
        return web.json_response(payload, status=status, headers=reply_headers)

    async def _send_stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        answer: dict[str, Any],
        strike: Fault | None,
        headers: Mapping[str, str],
    ) -> web.StreamResponse:
        """Write ``answer`` as server-sent events; ``strike`` breaks the stream."""
        events = self._stream(body, answer)
        cut = len(events) if strike is None else _strike_at(events, strike.after or 0)
        response = web.StreamResponse(
            status=200,
            headers={**headers, "content-type": self._stream_type, "cache-control": "no-cache"},
        )
        await response.prepare(request)
        for event in events[:cut]:
            if event.content and self.stream_interval_s:
                await asyncio.sleep(self.stream_interval_s)
            await response.write(self._frame(event))
        if strike is not None and strike.drop:
            if request.transport is not None:
                request.transport.close()  # no terminating chunk: the client sees a cut
            return response
        if strike is not None:
            await response.write(self._error_frame(strike))
        elif self._stream_end is not None:
            await response.write(self._frame(self._stream_end))
        await response.write_eof()
        return response

    def _reply(
        self,
        method: str,
        unknown_path: str | None,
        headers: Mapping[str, str],
        body: Any,
        fault: Fault | None,
        n: int,
        refusal: _Problem | None = None,
    ) -> _Reply:
        """Status, payload and extra headers for one request (no I/O): ``unknown_path``
        is the path when it is not the API's; ``refusal`` why the route refused it."""
        if unknown_path is not None:
            return 404, self._error(_Problem(f"Not found: {unknown_path}", status=404)), {}
        if method != "POST":
            refusal = _Problem(f"Method {method} not allowed", status=405)
            return 405, self._error(refusal), {"allow": "POST"}
        if fault is not None:
            if fault.after is not None:  # a stream's fault, on a request that does not stream
                status, payload = self._fault(fault)
                return status, payload, fault.headers
            if fault.malformed:
                return 200, _MALFORMED, fault.headers
            if fault.status != 200 or fault.body is not None:
                status, payload = self._fault(fault)
                return status, payload, fault.headers
        problem = self._header_problem(headers) or refusal or self._problem(body)
        if problem is not None:
            return problem.status, self._error(problem), {}
        if self.context_window is not None:
            tokens = _prompt_tokens(body)
            if tokens > self.context_window:
                status, payload = self._overflow(tokens, self.context_window)
                return status, payload, {}
        return 200, self._answer(body, self.model or body["model"], n), {}


class OpenAIServer(WireServer):
    """``POST /v1/chat/completions`` (and ``/chat/completions``); base_url ends in /v1."""

    vendor = "openai"
    _paths = ("/v1/chat/completions", "/chat/completions")
    _base_path = "/v1"
    _request_id_header = "x-request-id"

    def _api_key(self, headers: Mapping[str, str]) -> str:
        return _bearer(headers)

    def _header_problem(self, headers: Mapping[str, str]) -> _Problem | None:
        if self._api_key(headers):
            return None
        message = "You didn't provide an API key. Provide it in an Authorization: Bearer header."
        return _Problem(message, status=401)

    def _problem(self, body: Any) -> _Problem | None:
        return _openai_problem(body)

    def _answer(self, body: dict[str, Any], model: str, n: int) -> dict[str, Any]:
        return _openai_answer(body, model, self._rules, n)

    def _fault(self, fault: Fault) -> tuple[int, Any]:
        return _openai_fault(fault)

    def _error(self, problem: _Problem) -> Any:
        type_ = "server_error" if problem.status >= 500 else "invalid_request_error"
        return _openai_error(problem.message, type_, problem.param, problem.code)

    def _stream(self, body: dict[str, Any], answer: dict[str, Any]) -> list[_Event]:
        options = body.get("stream_options") or {}
        return _openai_stream(answer, self.piece_chars, bool(options.get("include_usage")))

    def _stream_error(self, fault: Fault) -> _Event:
        return _openai_stream_error(fault)

    def _overflow(self, tokens: int, window: int) -> tuple[int, Any]:
        return _openai_overflow(tokens, window)

    _stream_end = _OPENAI_DONE


class AnthropicServer(WireServer):
    """``POST /v1/messages``; base_url is the bare origin, as the SDK expects."""

    vendor = "anthropic"
    _paths = ("/v1/messages",)
    _base_path = ""
    _request_id_header = "request-id"

    def _api_key(self, headers: Mapping[str, str]) -> str:
        # anthropic 2.x sends the key as a bearer token; older SDKs and curl use x-api-key.
        return headers.get("x-api-key") or _bearer(headers)

    def _header_problem(self, headers: Mapping[str, str]) -> _Problem | None:
        if not self._api_key(headers):
            return _Problem("x-api-key or authorization header is required", status=401)
        if not headers.get("anthropic-version"):
            return _Problem("anthropic-version: header is required")
        return None

    def _problem(self, body: Any) -> _Problem | None:
        return _anthropic_problem(body)

    def _answer(self, body: dict[str, Any], model: str, n: int) -> dict[str, Any]:
        return _anthropic_answer(body, model, self._rules, n)

    def _fault(self, fault: Fault) -> tuple[int, Any]:
        return _anthropic_fault(fault)

    def _error(self, problem: _Problem) -> Any:
        default = ("api_error", "") if problem.status >= 500 else ("invalid_request_error", "")
        type_ = _ANTHROPIC_TYPES.get(problem.status, default)[0]
        if problem.status == 405:
            type_ = "invalid_request_error"
        return _anthropic_error(type_, problem.message)

    def _stream(self, body: dict[str, Any], answer: dict[str, Any]) -> list[_Event]:
        return _anthropic_stream(answer, self.piece_chars)

    def _stream_error(self, fault: Fault) -> _Event:
        return _anthropic_stream_error(fault)

    def _overflow(self, tokens: int, window: int) -> tuple[int, Any]:
        return _anthropic_overflow(tokens, window)


class BedrockServer(AnthropicServer):
    """Amazon Bedrock's runtime for Anthropic models: ``POST /model/{modelId}/invoke``
    and ``/invoke-with-response-stream`` (AWS event-stream framing), SigV4-signed; the
    bodies are Anthropic's. base_url is the bare origin, as ``AsyncAnthropicBedrock``
    expects. ``Recorded.api_key`` is the access key id the signature names."""

    vendor = "bedrock"
    _request_id_header = "x-amzn-RequestId"
    _stream_type = EVENTSTREAM

    def _route(self, raw_path: str, body: Any) -> tuple[Any, _Problem | None] | None:
        route = _bedrock_route(raw_path)
        return None if route is None else _bedrock_request(body, *route)

    def _api_key(self, headers: Mapping[str, str]) -> str:
        return _sigv4_access_key(headers)

    def _header_problem(self, headers: Mapping[str, str]) -> _Problem | None:
        return _sigv4_problem(headers)

    def _fault(self, fault: Fault) -> tuple[int, Any]:
        return _bedrock_fault(fault)

    def _overflow(self, tokens: int, window: int) -> tuple[int, Any]:
        return _bedrock_fault(Fault.context_overflow())  # Bedrock names no numbers

    def _error(self, problem: _Problem) -> Any:
        return {"message": problem.message}

    def _status_headers(self, status: int) -> Mapping[str, str]:
        return _bedrock_error_headers(status)

    def _stream(self, body: dict[str, Any], answer: dict[str, Any]) -> list[_Event]:
        # Bedrock relays Anthropic's events but not its keep-alive pings.
        return [e for e in super()._stream(body, answer) if e.name != "ping"]

    def _frame(self, event: _Event) -> bytes:
        return _bedrock_chunk(event)

    def _error_frame(self, fault: Fault) -> bytes:
        return _bedrock_exception(fault)


def _strike_at(events: Sequence[_Event], after: int) -> int:
    """Where a fault striking after ``after`` content deltas cuts ``events``: before the
    next content event, or right after the last one when there are not that many."""
    seen = 0
    last = 1  # no content at all: after the opening event
    for i, event in enumerate(events):
        if event.content:
            if seen == after:
                return i
            seen += 1
            last = i + 1
    return last


_SERVERS: dict[str, type[WireServer]] = {
    "openai": OpenAIServer,
    "anthropic": AnthropicServer,
    "bedrock": BedrockServer,
}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m overstory.testing.servers {openai,anthropic,bedrock} [--host H] [--port P]``."""
    parser = argparse.ArgumentParser(
        prog="python -m overstory.testing.servers",
        description="Serve a vendor's LLM wire format on loopback with deterministic answers.",
    )
    parser.add_argument("vendor", choices=sorted(_SERVERS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default=None, help="model named in answers")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--piece-chars", type=int, default=4, help="characters per streamed delta")
    parser.add_argument(
        "--stream-interval", type=float, default=0.0, help="seconds between streamed deltas"
    )
    args = parser.parse_args(argv)
    server = _SERVERS[args.vendor](
        host=args.host,
        port=args.port,
        model=args.model,
        latency_s=args.latency,
        piece_chars=args.piece_chars,
        stream_interval_s=args.stream_interval,
    )

    async def serve() -> None:
        stopped = asyncio.Event()
        with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows
            # Both signals just end the wait, so shutdown always takes the same path.
            for signum in (signal.SIGINT, signal.SIGTERM):
                asyncio.get_running_loop().add_signal_handler(signum, stopped.set)
        await server._open()
        print(f"{server.vendor} wire format at {server.base_url} (Ctrl-C stops)", flush=True)
        try:
            await stopped.wait()
        finally:
            await server._close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
