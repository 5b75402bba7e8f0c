"""The error taxonomy: what each policy does about each kind of model failure.

One table, read by the retry loop, the circuit breaker and the fallback chain, so the
three never disagree. Vendor modules only have to say *which kind* a failure is
(:func:`kind_of_status`, :func:`is_context_overflow`); everything after that is here.

====================  =============================  ===========  =================
kind                  retry the same endpoint         breaker      fallback chain
====================  =============================  ===========  =================
rate_limited (429)    after ``Retry-After`` if short  not counted  falls through
overloaded (529/503)  backoff (or ``Retry-After``)    counted      falls through
server_error (5xx)    jittered backoff                counted      falls through
timeout               jittered backoff                counted      falls through
connection            jittered backoff                counted      falls through
malformed             jittered backoff                counted      falls through
auth (401/403)        never                           trips open   falls through
bad_request (400)     never                           not counted  falls through
context_overflow      never                           not counted  falls through
circuit_open          never (no request was sent)     —            falls through at once
limit_wait            never (the limiter said so)     not counted  falls through
====================  =============================  ===========  =================

Bedrock's AWS-style names (``x-amzn-ErrorType: ThrottlingException``, a stream's
``throttlingException``) name the same kinds (:func:`kind_of_aws_error`); its 424
``ModelErrorException`` is a ``server_error``, not a bad request.

Every kind falls through: a request another vendor would accept (a 400 can be one
vendor's validation quirk, an overflow fits a larger window) must reach it, because a
user's turn is answered whenever *any* configured provider can answer it. When all fail,
:class:`~overstory.exceptions.AllModelsFailed` lists each one's kind and reason.
"""

from __future__ import annotations

import email.utils
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..exceptions import ModelErrorKind

__all__ = [
    "Policy",
    "is_context_overflow",
    "kind_of_aws_error",
    "kind_of_error_type",
    "kind_of_status",
    "parse_retry_after",
    "policy",
]


@dataclass(frozen=True, slots=True)
class Policy:
    """What the policies do about one kind of failure."""

    retry: bool  # the retry loop may call the same endpoint again
    breaker: bool  # counts as a failure of the endpoint (towards opening its circuit)
    trip: bool = False  # opens the circuit at once (the endpoint is unhealthy)
    wait_for_retry_after: bool = False  # a retry waits for the provider's Retry-After


_POLICIES: dict[ModelErrorKind, Policy] = {
    "rate_limited": Policy(retry=True, breaker=False, wait_for_retry_after=True),
    "overloaded": Policy(retry=True, breaker=True, wait_for_retry_after=True),
    "server_error": Policy(retry=True, breaker=True),
    "timeout": Policy(retry=True, breaker=True),
    "connection": Policy(retry=True, breaker=True),
    "malformed": Policy(retry=True, breaker=True),
    "auth": Policy(retry=False, breaker=True, trip=True),
    "bad_request": Policy(retry=False, breaker=False),
    "context_overflow": Policy(retry=False, breaker=False),
    "circuit_open": Policy(retry=False, breaker=False),
    "limit_wait": Policy(retry=False, breaker=False),
}


def policy(kind: ModelErrorKind) -> Policy:
    """The policy for ``kind``."""
    return _POLICIES[kind]


def kind_of_status(status: int) -> ModelErrorKind:
    """The kind of an HTTP error status (context overflow is decided from the body)."""
    if status == 429:
        return "rate_limited"
    if status in (503, 529):
        return "overloaded"
    if status in (401, 403):
        return "auth"
    if status in (408, 504):
        return "timeout"
    if status >= 500:
        return "server_error"
    return "bad_request"


#: Error ``type`` / ``code`` names the vendors use in error bodies and stream error events
#: (compared lower-cased). Bedrock names its errors in AWS's style: ``ThrottlingException``
#: in the ``x-amzn-ErrorType`` header, ``throttlingException`` inside a stream.
_ERROR_TYPES: dict[str, ModelErrorKind] = {
    "overloaded_error": "overloaded",
    "rate_limit_error": "rate_limited",
    "rate_limit_exceeded": "rate_limited",
    "api_error": "server_error",
    "server_error": "server_error",
    "timeout_error": "timeout",
    "authentication_error": "auth",
    "permission_error": "auth",
    "invalid_api_key": "auth",
    "invalid_request_error": "bad_request",
    "context_length_exceeded": "context_overflow",
    "throttlingexception": "rate_limited",
    "modelnotreadyexception": "rate_limited",
    "servicequotaexceededexception": "rate_limited",
    "serviceunavailableexception": "overloaded",
    "internalserverexception": "server_error",
    "modelerrorexception": "server_error",
    "modelstreamerrorexception": "server_error",
    "modeltimeoutexception": "timeout",
    "accessdeniedexception": "auth",
    "unrecognizedclientexception": "auth",
    "validationexception": "bad_request",
}


def kind_of_error_type(names: list[str]) -> ModelErrorKind:
    """The kind named by an error's ``code`` or ``type`` (the first one known), for an
    error that came without an HTTP status (an event inside a stream). Unknown names
    are a server error: the stream broke on the vendor's side."""
    for name in names:
        if name.lower() in _ERROR_TYPES:
            return _ERROR_TYPES[name.lower()]
    return "server_error"


def kind_of_aws_error(headers: Mapping[str, str]) -> ModelErrorKind | None:
    """The kind an AWS service's ``x-amzn-ErrorType`` header names
    (``ThrottlingException:http://internal.amazon.com/...``), or None (no header, or a
    name not in the table: then the status decides). It refines a status whose kind
    AWS uses differently: Bedrock's 424 is the model failing, not the request."""
    lowered = {k.lower(): v for k, v in headers.items()}
    name = lowered.get("x-amzn-errortype", "").partition(":")[0].strip().lower()
    return _ERROR_TYPES.get(name) if name else None


_OVERFLOW = re.compile(
    r"context[_ ]length|context window|maximum context|prompt is too long|too many tokens"
    r"|input is too long|exceeds the (model'?s? )?(maximum|context)",
    re.I,
)


def is_context_overflow(code: str | None, message: str) -> bool:
    """Whether a 400's error code or message says the prompt does not fit the model."""
    return code == "context_length_exceeded" or bool(_OVERFLOW.search(message))


#: A provider asking for more than this is treated as "not now": the call falls through.
MAX_RETRY_AFTER_S = 3600.0


def parse_retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds to wait from ``retry-after-ms`` / ``retry-after`` (seconds or an HTTP date).

    ``now`` is the wall-clock time (``time.time()``) for the date form. Garbage, negative
    or absurd values give ``None``: a provider's header is outside input.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    raw_ms = lowered.get("retry-after-ms")
    if raw_ms is not None:
        try:
            value = float(raw_ms) / 1000
        except ValueError:
            value = math.nan
        if 0 <= value <= MAX_RETRY_AFTER_S:
            return value
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        value = when.timestamp() - now
        value = max(0.0, value)
    if not 0 <= value <= MAX_RETRY_AFTER_S:
        return None
    return value
