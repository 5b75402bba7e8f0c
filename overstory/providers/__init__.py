"""Model providers: one module per vendor, policies as wrappers, one actor per endpoint.

:func:`resolve_model` turns what users write — ``"offline:demo"``,
``"openai:gpt-4.1-mini@http://127.0.0.1:8000/v1"``, an :class:`Endpoint`, a
:class:`Model`, or a list of these for a fallback chain — into one :class:`Model`.
Vendor endpoints become :class:`RemoteModel` s: calls go to the endpoint's provider
actor, which owns the SDK client, the rate limiter and the circuit breaker.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..exceptions import ConfigError
from .base import Model, ModelRequest, ModelSettings
from .breaker import BreakerModel, CircuitBreaker
from .endpoint import (
    KEY_ENV,
    BreakerPolicy,
    Endpoint,
    Limits,
    RetryPolicy,
    Secret,
    aws_credentials,
    aws_secret,
    parse_model,
)
from .fallback import FallbackModel
from .limits import AsyncRateLimiter, LimitedModel, RateLimiter
from .offline import OfflineModel, Rule
from .pool import ProviderActor, RemoteModel
from .retry import RetryingModel

__all__ = [
    "KEY_ENV",
    "AsyncRateLimiter",
    "BreakerModel",
    "BreakerPolicy",
    "CircuitBreaker",
    "Endpoint",
    "FallbackModel",
    "LimitedModel",
    "Limits",
    "Model",
    "ModelRequest",
    "ModelSettings",
    "ModelSpec",
    "OfflineModel",
    "ProviderActor",
    "RateLimiter",
    "RemoteModel",
    "RetryPolicy",
    "RetryingModel",
    "Rule",
    "Secret",
    "api_keys",
    "aws_secret",
    "parse_model",
    "resolve_model",
]

ModelSpec = Model | Endpoint | str | Sequence[Model | Endpoint | str]


def resolve_model(spec: ModelSpec) -> Model:
    """One :class:`Model` from a model, an endpoint, a ``provider:model[@url]`` string,
    or a list of them (a fallback chain, tried in order)."""
    if isinstance(spec, Model):
        return spec
    if isinstance(spec, Endpoint):
        return RemoteModel(spec if spec.key is not None else _env_key(spec))
    if isinstance(spec, str):
        return _from_string(spec)
    if isinstance(spec, Sequence):
        models = [resolve_model(s) for s in spec]
        if not models:
            raise ConfigError("a model chain needs at least one model, got an empty list")
        return models[0] if len(models) == 1 else FallbackModel(*models)
    raise ConfigError(
        f"a model is a Model, an Endpoint, a 'provider:model[@base_url]' string or a list; "
        f"got {spec!r}"
    )


def _env_key(endpoint: Endpoint) -> Endpoint:
    """With the key from the vendor's environment variable, when one is set (read here,
    on the client). Without one the endpoint works only with users' own keys. A Bedrock
    endpoint's AWS region is configuration, not a user's: it must be known here."""
    endpoint = endpoint.located()
    try:
        return endpoint.resolved()
    except ConfigError:
        return endpoint


def _from_string(spec: str) -> Model:
    vendor, model, base_url = parse_model(spec)
    if vendor == "offline":
        if base_url is not None:
            raise ConfigError(f"the offline model takes no base URL: {spec!r}")
        name, at, window = model.rpartition("@")
        if at and window.isdigit():  # offline:NAME@WINDOW: a context window, in tokens
            return OfflineModel(name, context_window=int(window))
        return OfflineModel(model)
    assert vendor in KEY_ENV
    return resolve_model(Endpoint(vendor, model, base_url))


def api_keys(keys: Mapping[str, str]) -> dict[str, Secret]:
    """Validate a user's own keys (``{"openai": "sk-...", "anthropic": "..."}``; for
    Bedrock the user's AWS credentials, ``"ACCESS_KEY_ID:SECRET_ACCESS_KEY[:TOKEN]"``)."""
    if not isinstance(keys, Mapping):
        raise ConfigError(f"api_keys must map a vendor to a key, got {type(keys).__name__}")
    out: dict[str, Secret] = {}
    for vendor, key in keys.items():
        if vendor not in KEY_ENV:
            raise ConfigError(
                f"api_keys has an unknown vendor {vendor!r}; known: {', '.join(KEY_ENV)}"
            )
        out[vendor] = key if isinstance(key, Secret) else Secret(key)
        if vendor == "bedrock":
            aws_credentials(out[vendor])
    return out
