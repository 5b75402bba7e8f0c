"""Amazon Bedrock's runtime wire format for :class:`~overstory.testing.servers.BedrockServer`.

Bedrock serves Anthropic's Messages API under its own paths and framing; the request and
answer bodies are Anthropic's (built by :mod:`._anthropic`), so only the differences are
here, as pure functions with no I/O:

* the path names the model: ``POST /model/{modelId}/invoke`` answers the Messages JSON,
  ``POST /model/{modelId}/invoke-with-response-stream`` the same events as a stream
  (``_bedrock_route``); the body has no ``model`` or ``stream`` and must carry
  ``anthropic_version: "bedrock-2023-05-31"`` (``_bedrock_request``);
* requests are signed with AWS SigV4 (``_sigv4_problem``: an unsigned one is refused
  with 403, as AWS refuses it);
* errors are ``{"message": ...}`` with the exception's name in ``x-amzn-ErrorType``
  (``_bedrock_fault``, ``_bedrock_error_type``);
* a stream is a sequence of AWS event-stream messages
  (``application/vnd.amazon.eventstream``): each Anthropic event is a ``chunk`` whose
  JSON payload carries the event's JSON base64-encoded (``_bedrock_chunk``), and a
  failure mid-stream is an ``exception`` message such as ``throttlingException``
  (``_bedrock_exception``).

The framing (``_eventstream_message``): total length and headers length (u32 big-endian),
the CRC32 of those 8 bytes, the headers (name length u8, name, type 7 = string, value
length u16, value), the payload, and the CRC32 of everything before it.
"""

from __future__ import annotations

import base64
import json
import re
import struct
import zlib
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from ._common import Fault, _Event, _Problem

BEDROCK_VERSION = "bedrock-2023-05-31"
EVENTSTREAM = "application/vnd.amazon.eventstream"

#: status -> (the exception Bedrock names in x-amzn-ErrorType, its usual message)
_BEDROCK_ERRORS: dict[int, tuple[str, str]] = {
    400: ("ValidationException", "Malformed input request, please reformat your input and try again."),
    403: ("AccessDeniedException", "You don't have access to the model with the specified model ID."),
    404: ("ResourceNotFoundException", "The requested resource could not be found."),
    408: ("ModelTimeoutException", "Model has timed out in processing the request."),
    424: ("ModelErrorException", "The model failed to process the request."),
    429: ("ThrottlingException", "Too many requests, please wait before trying again."),
    500: ("InternalServerException", "The server encountered an internal error."),
    503: ("ServiceUnavailableException", "Bedrock is unable to process your request."),
}  # fmt: skip
_ERROR_NAMESPACE = "http://internal.amazon.com/coral/com.amazon.bedrock/"

_ROUTE = re.compile(r"/model/(?P<model>[^/]+)/(?P<op>invoke|invoke-with-response-stream)")
_SIGV4 = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key_id>[A-Z0-9]{16,128})/(?P<date>\d{8})/"
    r"(?P<region>[a-z0-9-]+)/bedrock/aws4_request, ?SignedHeaders=(?P<signed>[a-z0-9;-]+), ?"
    r"Signature=[0-9a-f]{64}"
)


def _bedrock_route(raw_path: str) -> tuple[str, bool] | None:
    """(model id, whether it streams) for a Bedrock runtime path, else None. The model
    id is the path segment percent-decoded (an ARN's ``/`` travels as ``%2F``)."""
    match = _ROUTE.fullmatch(raw_path)
    if match is None:
        return None
    return unquote(match["model"]), match["op"] == "invoke-with-response-stream"


def _bedrock_error_type(status: int) -> str:
    """The exception name for ``status`` (as ``x-amzn-ErrorType`` names it)."""
    default = "InternalServerException" if status >= 500 else "ValidationException"
    return _BEDROCK_ERRORS.get(status, (default, ""))[0]


def _bedrock_error_headers(status: int) -> dict[str, str]:
    return {"x-amzn-ErrorType": f"{_bedrock_error_type(status)}:{_ERROR_NAMESPACE}"}


def _bedrock_status(fault: Fault) -> int:
    """Bedrock's status for ``fault``: overloaded is 503 (Bedrock has no 529) and a
    refused credential is 403 (AWS never answers 401)."""
    if fault.kind == "overloaded" or fault.status == 529:
        return 503
    return 403 if fault.status == 401 else fault.status


def _bedrock_fault(fault: Fault) -> tuple[int, Any]:
    status = _bedrock_status(fault)
    if fault.body is not None:
        return status, fault.body
    if fault.kind == "context_overflow":
        return 400, {"message": "Input is too long for requested model."}
    default = "The server encountered an internal error." if status >= 500 else f"HTTP {status}"
    return status, {"message": fault.message or _BEDROCK_ERRORS.get(status, ("", default))[1]}


def _bedrock_request(body: Any, model: str, streaming: bool) -> tuple[Any, _Problem | None]:
    """The request as an Anthropic Messages body (model and stream from the path), and
    why Bedrock refuses it before Anthropic's own checks (which that body then gets), or
    None."""
    if not isinstance(body, dict):
        return body, _Problem("Malformed input request: the body is not a JSON object.")
    for key in ("model", "stream"):
        if key in body:
            return body, _Problem(
                f"Malformed input request: extraneous key [{key}] is not permitted"
            )
    if body.get("anthropic_version") != BEDROCK_VERSION:
        got = body.get("anthropic_version")
        message = (
            f"Malformed input request: anthropic_version must be {BEDROCK_VERSION!r}, got {got!r}"
        )
        return body, _Problem(message)
    return {**body, "model": model, "stream": streaming}, None


def _sigv4_access_key(headers: Mapping[str, str]) -> str:
    """The access key id a SigV4-signed request names ("" when it is not signed)."""
    match = _SIGV4.fullmatch(headers.get("authorization", "").strip())
    return match["key_id"] if match else ""


def _sigv4_problem(headers: Mapping[str, str]) -> _Problem | None:
    """Why AWS refuses the request's signature as it stands: no SigV4 ``Authorization``
    for the ``bedrock`` service, or one without the signed ``host`` and ``x-amz-date``.
    (The signature itself is not recomputed: the server does not know the secret.)"""
    match = _SIGV4.fullmatch(headers.get("authorization", "").strip())
    if match is None:
        return _Problem("Missing Authentication Token", status=403)
    if not {"host", "x-amz-date"} <= set(match["signed"].split(";")):
        return _Problem("The request signature does not sign host and x-amz-date", status=403)
    if not headers.get("x-amz-date", "").startswith(match["date"]):
        return _Problem("The credential scope's date is not the request's x-amz-date", status=403)
    return None


def _eventstream_message(headers: Mapping[str, str], payload: bytes) -> bytes:
    """One AWS event-stream message with string-valued ``headers``."""
    encoded = b"".join(
        struct.pack(">B", len(name.encode())) + name.encode()
        + struct.pack(">BH", 7, len(value.encode())) + value.encode()
        for name, value in headers.items()
    )  # fmt: skip
    total = 12 + len(encoded) + len(payload) + 4
    prelude = struct.pack(">II", total, len(encoded))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + encoded + payload
    return message + struct.pack(">I", zlib.crc32(message))


def _bedrock_chunk(event: _Event) -> bytes:
    """An Anthropic stream event as Bedrock's ``chunk`` message."""
    raw = json.dumps(event.data).encode()
    payload = json.dumps({"bytes": base64.b64encode(raw).decode()}).encode()
    headers = {
        ":event-type": "chunk",
        ":content-type": "application/json",
        ":message-type": "event",
    }
    return _eventstream_message(headers, payload)


#: status -> the stream exception Bedrock sends for it (its ResponseStream's members)
_STREAM_EXCEPTIONS = {
    400: "validationException",
    408: "modelTimeoutException",
    424: "modelStreamErrorException",
    429: "throttlingException",
    503: "serviceUnavailableException",
}


def _bedrock_exception(fault: Fault) -> bytes:
    """The ``exception`` message Bedrock sends inside a stream that breaks."""
    status = _bedrock_status(fault)
    name = _STREAM_EXCEPTIONS.get(status, "internalServerException")
    message = fault.message or _BEDROCK_ERRORS.get(status, ("", "Internal server error"))[1]
    headers = {
        ":exception-type": name,
        ":content-type": "application/json",
        ":message-type": "exception",
    }
    return _eventstream_message(headers, json.dumps({"message": message}).encode())
