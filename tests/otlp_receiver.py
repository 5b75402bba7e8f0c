"""A small OTLP trace receiver on loopback, for tests that prove real export.

It speaks the wire formats a collector speaks. Over HTTP (``http/protobuf``):
``POST /v1/traces`` with an ``application/x-protobuf`` body (gzip or deflate
``Content-Encoding`` allowed) holding an ``ExportTraceServiceRequest``, answered ``200``
with an empty ``ExportTraceServiceResponse``. Over gRPC (``grpc``): the
``opentelemetry.proto.collector.trace.v1.TraceService/Export`` call, served by grpcio.
Each span is kept flattened as a :class:`Span`; tests wait for the ones they expect with
:meth:`OtlpReceiver.wait_for`, which blocks on a condition variable notified by every
export (no polling)::

    with OtlpReceiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, ...}
        ...
        spans = receiver.wait_for(lambda spans: any(s.name == "chat m" for s in spans), 30)
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as PbStatus

__all__ = ["Event", "OtlpReceiver", "Span"]

TRACES_PATH = "/v1/traces"


@dataclass(frozen=True)
class Event:
    name: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class Span:
    """One received span, flattened: ids in hex, kind and status by name (``CLIENT``,
    ``ERROR``), attributes as plain Python values."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    kind: str  # INTERNAL, SERVER, CLIENT, PRODUCER, CONSUMER, UNSPECIFIED
    attributes: dict[str, Any]
    events: list[Event] = field(default_factory=list)
    status: str = "UNSET"  # UNSET, OK, ERROR
    status_message: str = ""
    service_name: str = ""


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return _attributes(v.kvlist_value.values)
    return getattr(v, which)


def _attributes(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    kv: KeyValue
    for kv in kvs:
        out[kv.key] = _value(kv.value)
    return out


def _flatten(request: ExportTraceServiceRequest) -> list[Span]:
    spans: list[Span] = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        service = str(resource.get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                spans.append(
                    Span(
                        name=s.name,
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        kind=PbSpan.SpanKind.Name(s.kind).removeprefix("SPAN_KIND_"),
                        attributes=_attributes(s.attributes),
                        events=[Event(e.name, _attributes(e.attributes)) for e in s.events],
                        status=PbStatus.StatusCode.Name(s.status.code).removeprefix("STATUS_CODE_"),
                        status_message=s.status.message,
                        service_name=service,
                    )
                )
    return spans


def _decode_body(body: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    if encoding in ("", "identity"):
        return body
    raise ValueError(f"unsupported Content-Encoding {encoding!r}")


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    def Export(
        self, request: ExportTraceServiceRequest, context: Any
    ) -> ExportTraceServiceResponse:
        # grpcio decompresses before this point and hides grpc-encoding: "" always
        self.receiver._add(_flatten(request), "")
        return ExportTraceServiceResponse()


class OtlpReceiver:
    """An OTLP trace receiver on ``127.0.0.1`` and a free port, in daemon threads.

    ``protocol`` is what ``OTEL_EXPORTER_OTLP_PROTOCOL`` names: ``http/protobuf`` or
    ``grpc``; :attr:`endpoint` is the address an exporter of that protocol is given.
    """

    def __init__(self, protocol: Literal["http/protobuf", "grpc"] = "http/protobuf") -> None:
        self.protocol = protocol
        self._cond = threading.Condition()
        self._spans: list[Span] = []
        self.requests = 0
        # Content-Encoding of each HTTP request ("" = none; always "" over gRPC)
        self.encodings: set[str] = set()
        self._grpc: grpc.Server | None = None
        if protocol == "grpc":
            self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
            trace_service_pb2_grpc.add_TraceServiceServicer_to_server(
                _TraceService(self), self._grpc
            )
            self.port: int = self._grpc.add_insecure_port("127.0.0.1:0")
            self._grpc.start()
            return
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if self.path.split("?", 1)[0] != TRACES_PATH:
                    self._answer(404, b"", "text/plain")
                    return
                if self.headers.get_content_type() != "application/x-protobuf":
                    self._answer(415, b"", "text/plain")
                    return
                try:
                    raw = _decode_body(body, self.headers.get("Content-Encoding", ""))
                    request = ExportTraceServiceRequest.FromString(raw)
                except Exception:  # a malformed payload is the client's error
                    self._answer(400, b"", "text/plain")
                    return
                receiver._add(_flatten(request), self.headers.get("Content-Encoding", ""))
                reply = ExportTraceServiceResponse().SerializeToString()
                self._answer(200, reply, "application/x-protobuf")

            def _answer(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output quiet

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="otlp-receiver", daemon=True
        )
        self._thread.start()

    @property
    def endpoint(self) -> str:
        """The base URL, as ``OTEL_EXPORTER_OTLP_ENDPOINT`` takes it."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def traces_url(self) -> str:
        """The full traces URL, as ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` takes it."""
        return self.endpoint + (TRACES_PATH if self.protocol == "http/protobuf" else "")

    @property
    def spans(self) -> list[Span]:
        """A copy of every span received so far, in arrival order."""
        with self._cond:
            return list(self._spans)

    def _add(self, spans: list[Span], encoding: str) -> None:
        with self._cond:
            self._spans.extend(spans)
            self.requests += 1
            self.encodings.add(encoding.strip().lower())
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[Span]], bool], timeout_s: float) -> list[Span]:
        """Block until ``predicate(spans)`` holds (checked after every export) and return
        the spans; ``TimeoutError`` listing what arrived if it does not within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate(self._spans):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = [s.name for s in self._spans]
                    raise TimeoutError(f"no matching spans after {timeout_s} s; received {names!r}")
                self._cond.wait(remaining)
            return list(self._spans)

    def close(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace=None).wait(5)
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> OtlpReceiver:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
