"""Endpoints: which vendor, model, key and URL a provider actor talks to, and its limits.

An :class:`Endpoint` is a validated value built on the client (the operator's machine or
a driver) from what users write — ``"openai:gpt-4.1-mini@http://127.0.0.1:8000/v1"`` —
plus the key from the standard environment variable or the user's own (BYOK). Its
:attr:`~Endpoint.key` is a :class:`Secret`: it travels inside the cluster to the provider
actor that owns the SDK client, but no repr, log line, error or span ever shows it.

Amazon Bedrock (``bedrock:anthropic.claude-sonnet-4-5-v1:0``) signs requests with AWS
credentials rather than sending a key: its Secret packs the access key id, the secret
access key and the session token, if any (:func:`aws_secret`, :func:`aws_credentials`),
read from the standard AWS variables, and the endpoint carries the AWS region.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal
from urllib.parse import urlsplit

from ..exceptions import ConfigError

__all__ = [
    "KEY_ENV",
    "BreakerPolicy",
    "Endpoint",
    "Limits",
    "RetryPolicy",
    "Secret",
    "Vendor",
    "aws_credentials",
    "aws_secret",
    "parse_model",
]

Vendor = Literal["anthropic", "openai", "bedrock"]

#: The standard AWS variables Bedrock's credentials and region are read from.
AWS_KEY_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
AWS_TOKEN_VAR = "AWS_SESSION_TOKEN"
AWS_REGION_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")

#: Where each vendor's key is read from when the user does not bring their own (as a
#: message names it: Bedrock's credentials are two variables, plus an optional token).
KEY_ENV: dict[Vendor, str] = {
    "anthropic": "ANTHROPIC_API_KEY",
    "openai": "OPENAI_API_KEY",
    "bedrock": " and ".join(AWS_KEY_VARS),
}

#: What users may write before the colon; OpenAI-compatible servers speak ``openai``.
_VENDOR_ALIASES: dict[str, Vendor] = {
    "anthropic": "anthropic",
    "openai": "openai",
    "openai-compatible": "openai",
    "vllm": "openai",
    "ollama": "openai",
    "lmstudio": "openai",
    "llamacpp": "openai",
    "bedrock": "bedrock",
}

#: An AWS region as AWS names them: us-east-1, eu-central-2, us-gov-west-1, ...
_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]{1,2}")
#: Access key ids are upper-case letters and digits; secrets and session tokens base64.
_AWS_KEY_ID = re.compile(r"[A-Z0-9]{16,128}")
_AWS_SECRET_PART = re.compile(r"[A-Za-z0-9+/=]{1,4096}")


class Secret:
    """A key that never shows itself: ``repr``/``str`` print ``Secret('sk-...a1b2')``
    at most (the last four characters, as vendors' consoles do), ``value`` gives it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError("an API key must be a non-empty string")
        if any(c.isspace() for c in value):
            raise ConfigError("an API key must not contain whitespace")
        self._value = value

    @property
    def value(self) -> str:
        return self._value

    def fingerprint(self) -> str:
        """A short, one-way id of the key (to tell endpoints apart without showing it)."""
        return hashlib.sha256(self._value.encode()).hexdigest()[:12]

    def __repr__(self) -> str:
        return f"Secret('****{self._value[-4:]}')" if len(self._value) >= 12 else "Secret('****')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[type[Secret], tuple[str]]:
        return (Secret, (self._value,))


def aws_secret(
    access_key_id: str, secret_access_key: str, session_token: str | None = None
) -> Secret:
    """AWS credentials packed into one :class:`Secret` (``id:secret[:token]``), as a
    Bedrock endpoint's key and as a user's own Bedrock key in ``api_keys``."""
    parts = [access_key_id, secret_access_key] + ([session_token] if session_token else [])
    secret = Secret(":".join(p.strip() if isinstance(p, str) else "" for p in parts))
    aws_credentials(secret)  # validated here, when built
    return secret


def aws_credentials(key: Secret) -> tuple[str, str, str | None]:
    """(access key id, secret access key, session token or None) from a Bedrock key.

    The message of a bad one names what is wrong, never the value (it is a secret).
    """
    parts = key.value.split(":")
    if len(parts) not in (2, 3):
        raise ConfigError(
            "Bedrock credentials are written ACCESS_KEY_ID:SECRET_ACCESS_KEY[:SESSION_TOKEN]; "
            f"got {len(parts)} part(s)"
        )
    if not _AWS_KEY_ID.fullmatch(parts[0]):
        raise ConfigError("an AWS access key id is 16-128 upper-case letters and digits")
    for name, part in zip(("secret access key", "session token"), parts[1:], strict=False):
        if not _AWS_SECRET_PART.fullmatch(part):
            raise ConfigError(f"an AWS {name} is base64 text (letters, digits, + / =)")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-endpoint admission limits, enforced by the endpoint's one provider actor.

    ``rpm``/``tpm``: requests / tokens admitted in any ``window_s`` (a minute); ``None``
    is unlimited. ``max_in_flight``: concurrent requests. ``max_wait_s``: how long a call
    may queue (callers are served in arrival order) before it falls through instead.
    Tokens are the prompt's estimate (characters / 4) at admission, corrected to the
    provider's reported usage (prompt + completion) when the answer arrives.
    ``lease_ttl_s``: a call made in another process (a host reading the vendor itself)
    holds its slot under a lease its process renews every third of this; the slot of a
    process that died holding it is freed within this (plus a quarter of it).
    """

    rpm: int | None = None
    tpm: int | None = None
    max_in_flight: int | None = None
    max_wait_s: float = 10.0
    window_s: float = 60.0
    lease_ttl_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "max_in_flight"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"limit {name} must be a positive integer or None, got {value!r}")
        if not 0 <= self.max_wait_s <= 3600:
            raise ConfigError(f"limit max_wait_s must be in [0, 3600], got {self.max_wait_s}")
        if not 0 < self.window_s <= 3600:
            raise ConfigError(f"limit window_s must be in (0, 3600], got {self.window_s}")
        if not 1 <= self.lease_ttl_s <= 3600:
            raise ConfigError(f"limit lease_ttl_s must be in [1, 3600], got {self.lease_ttl_s}")


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """Circuit breaker: open after ``failures`` counted failures within ``window_s``;
    after ``cooldown_s`` let one probe through (half-open); close on its success.
    An authentication failure opens it for ``auth_cooldown_s``."""

    failures: int = 5
    window_s: float = 30.0
    cooldown_s: float = 15.0
    auth_cooldown_s: float = 300.0

    def __post_init__(self) -> None:
        if not isinstance(self.failures, int) or self.failures < 1:
            raise ConfigError(f"breaker failures must be an int >= 1, got {self.failures!r}")
        for name in ("window_s", "cooldown_s", "auth_cooldown_s"):
            if not 0 < getattr(self, name) <= 86400:
                raise ConfigError(
                    f"breaker {name} must be in (0, 86400], got {getattr(self, name)}"
                )


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The one retry loop (the SDKs' own retries are off): up to ``attempts`` calls in
    all, exponential backoff from ``base_s`` capped at ``max_backoff_s`` with full jitter;
    a ``Retry-After`` longer than ``max_retry_after_s`` falls through instead of waiting."""

    attempts: int = 3
    base_s: float = 0.25
    max_backoff_s: float = 4.0
    max_retry_after_s: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or not 1 <= self.attempts <= 20:
            raise ConfigError(f"retry attempts must be an int in [1, 20], got {self.attempts!r}")
        for name in ("base_s", "max_backoff_s", "max_retry_after_s"):
            if not 0 <= getattr(self, name) <= 600:
                raise ConfigError(f"retry {name} must be in [0, 600], got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One configured endpoint: vendor + model + key + base URL, with its policies.

    Build it with :func:`parse_model` or directly; the key defaults to the vendor's
    environment variable (:data:`KEY_ENV`) read *here*, on the client, so it reaches the
    cluster's provider actor without being written into any file.
    """

    vendor: Vendor
    model: str
    base_url: str | None = None
    key: Secret | None = None
    limits: Limits = field(default_factory=Limits)
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_s: float = 60.0
    max_tokens: int = 1024
    region: str | None = None  # Bedrock only: the AWS region requests are signed for
    #: Tokens the model reads, prompt and answer (``None``: the built-in table's, if it
    #: knows the model; :mod:`.windows`). Prompts are fitted to it less ``max_tokens``.
    context_window: int | None = None

    def __post_init__(self) -> None:
        if self.vendor not in KEY_ENV:
            raise ConfigError(f"unknown vendor {self.vendor!r}; known: {', '.join(KEY_ENV)}")
        if not isinstance(self.model, str) or not self.model.strip() or len(self.model) > 200:
            raise ConfigError(f"a model name must be 1-200 characters, got {self.model!r}")
        if any(c.isspace() or ord(c) < 32 for c in self.model):
            raise ConfigError(f"a model name must not contain whitespace, got {self.model!r}")
        if self.base_url is not None:
            _check_url(self.base_url)
        if self.key is not None and not isinstance(self.key, Secret):
            raise ConfigError("Endpoint.key must be a Secret (wrap the key: Secret('sk-...'))")
        if self.vendor == "bedrock" and self.key is not None:
            aws_credentials(self.key)
        if self.region is not None:
            if self.vendor != "bedrock":
                raise ConfigError(f"only Bedrock endpoints take a region, not {self.vendor!r}")
            _check_region(self.region, "Endpoint.region")
        if not 0 < self.timeout_s <= 3600:
            raise ConfigError(f"timeout_s must be in (0, 3600], got {self.timeout_s}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if self.context_window is not None and (
            isinstance(self.context_window, bool)
            or not isinstance(self.context_window, int)
            or not self.max_tokens < self.context_window <= 100_000_000
        ):
            raise ConfigError(
                f"context_window must be an int of tokens above max_tokens "
                f"({self.max_tokens}) and at most 100,000,000, got {self.context_window!r}"
            )

    @property
    def name(self) -> str:
        """``vendor:model[@base_url]`` as users write it; never holds the key."""
        return f"{self.vendor}:{self.model}" + (f"@{self.base_url}" if self.base_url else "")

    @property
    def server(self) -> tuple[str, int | None]:
        """(host, port) the endpoint's requests go to (``server.address`` in spans)."""
        default = {
            "anthropic": "api.anthropic.com",
            "openai": "api.openai.com",
            "bedrock": f"bedrock-runtime.{self.region or 'us-east-1'}.amazonaws.com",
        }[self.vendor]
        if self.base_url is None:
            return default, 443
        parts = urlsplit(self.base_url)
        return parts.hostname or default, parts.port

    @property
    def id(self) -> str:
        """Stable id of (vendor, model, base URL, key, region): one provider actor per id."""
        fingerprint = self.key.fingerprint() if self.key else "-"
        parts = (self.vendor, self.model, self.base_url or "", fingerprint)
        raw = "\x00".join(parts + ((self.region or "",) if self.vendor == "bedrock" else ()))
        return hashlib.sha256(raw.encode()).hexdigest()[:20]

    def with_key(self, key: str | Secret) -> Endpoint:
        """This endpoint with another key (bring-your-own-key): a separate provider actor."""
        return replace(self, key=key if isinstance(key, Secret) else Secret(key))

    def resolved(self, environ: Mapping[str, str] | None = None) -> Endpoint:
        """With the key filled in from the environment when none was given.

        The vendors' own APIs need a key: a missing one is a configuration error named
        here, at configuration time. A self-hosted OpenAI-compatible server (``base_url``
        given) often needs none; it gets a placeholder. Bedrock needs AWS credentials and
        a region (:meth:`located`), even behind a base URL: its requests are signed.
        """
        env = os.environ if environ is None else environ
        if self.vendor == "bedrock":
            return self.located(env)._with_aws_key(env)
        if self.key is not None:
            return self
        raw = env.get(KEY_ENV[self.vendor], "").strip()
        if raw:
            return replace(self, key=Secret(raw))
        if self.base_url is not None:
            return replace(self, key=Secret("no-key-needed"))
        raise ConfigError(
            f"model {self.name!r} needs an API key: set {KEY_ENV[self.vendor]} in the "
            "environment, or pass the user's own key (api_keys=...)"
        )

    def located(self, environ: Mapping[str, str] | None = None) -> Endpoint:
        """A Bedrock endpoint with its region from ``AWS_REGION`` / ``AWS_DEFAULT_REGION``
        when none was given (a configuration error without one); others as they are."""
        if self.vendor != "bedrock" or self.region is not None:
            return self
        env = os.environ if environ is None else environ
        for var in AWS_REGION_VARS:
            raw = env.get(var, "").strip()
            if raw:
                _check_region(raw, var)
                return replace(self, region=raw)
        raise ConfigError(
            f"model {self.name!r} needs an AWS region: set {' or '.join(AWS_REGION_VARS)} "
            "in the environment, or give Endpoint(region=...)"
        )

    def _with_aws_key(self, env: Mapping[str, str]) -> Endpoint:
        if self.key is not None:
            return self
        values = {var: env.get(var, "").strip() for var in AWS_KEY_VARS}
        missing = [var for var, value in values.items() if not value]
        if missing:
            raise ConfigError(
                f"model {self.name!r} needs AWS credentials: set {' and '.join(missing)} in "
                f"the environment (and {AWS_TOKEN_VAR} for temporary credentials), or pass "
                "the user's own (api_keys={'bedrock': 'ID:SECRET[:TOKEN]'})"
            )
        token = env.get(AWS_TOKEN_VAR, "").strip() or None
        try:
            key = aws_secret(values[AWS_KEY_VARS[0]], values[AWS_KEY_VARS[1]], token)
        except ConfigError as exc:
            raise ConfigError(f"the AWS_* credentials in the environment: {exc}") from exc
        return replace(self, key=key)

    def __repr__(self) -> str:
        region = f", region={self.region!r}" if self.region else ""
        return f"Endpoint({self.name!r}, key={self.key!r}{region})"


def _check_region(region: str, where: str) -> None:
    if not isinstance(region, str) or not _REGION.fullmatch(region):
        raise ConfigError(f"{where} must be an AWS region such as 'us-east-1', got {region!r}")


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"base URL {url!r} must be http(s)://host[:port][/path]")
    if parts.username or parts.password:
        raise ConfigError("a base URL must not carry credentials; pass the key separately")
    if any(c.isspace() for c in url):
        raise ConfigError(f"base URL {url!r} contains whitespace")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(f"base URL {url!r} has a bad port: {exc}") from exc


_URL_START = re.compile(r"@(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def parse_model(spec: str) -> tuple[str, str, str | None]:
    """``PROVIDER:MODEL[@BASE_URL]`` -> (provider, model, base_url), validated.

    ``provider`` is a vendor (or an alias of one, e.g. ``vllm`` -> ``openai``) or
    ``offline``; the model may itself contain colons (``ollama:llama3.1:8b@http://...``,
    ``bedrock:anthropic.claude-sonnet-4-5-v1:0``).
    """
    if not isinstance(spec, str):
        raise ConfigError(f"a model is written 'provider:model[@base_url]', got {spec!r}")
    provider, sep, rest = spec.strip().partition(":")
    # "@" may be part of a model name (claude-3-5@20240620): the base URL starts at the
    # first "@" followed by a scheme.
    found = _URL_START.search(rest)
    model, base_url = (rest[: found.start()], rest[found.end() :]) if found else (rest, "")
    if not sep or not provider or not model:
        raise ConfigError(
            f"model {spec!r} must be written 'provider:model[@base_url]', "
            "e.g. 'openai:gpt-4.1-mini' or 'offline:echo'"
        )
    provider = provider.lower()
    if provider != "offline" and provider not in _VENDOR_ALIASES:
        known = ", ".join(["offline", *_VENDOR_ALIASES])
        raise ConfigError(f"unknown provider {provider!r} in model {spec!r}; known: {known}")
    if base_url:
        _check_url(base_url)
    vendor = _VENDOR_ALIASES.get(provider, "offline")
    return vendor, model, base_url or None
