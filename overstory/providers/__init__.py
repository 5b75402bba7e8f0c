"""Model providers: one module per vendor, policies as wrappers.

:func:`resolve_model` turns what users write (``"offline:demo"``, a :class:`Model`, or a
list of either for a fallback chain) into one :class:`Model`.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..exceptions import ConfigError
from .base import Model
from .fallback import FallbackModel
from .offline import OfflineModel, Rule

__all__ = ["FallbackModel", "Model", "ModelSpec", "OfflineModel", "Rule", "resolve_model"]

ModelSpec = Model | str | Sequence[Model | str]

_KNOWN = ("offline",)


def resolve_model(spec: ModelSpec) -> Model:
    """One :class:`Model` from a model, a ``provider:model`` string or a chain of them."""
    if isinstance(spec, Model):
        return spec
    if isinstance(spec, str):
        return _from_string(spec)
    if isinstance(spec, Sequence):
        models = [resolve_model(s) for s in spec]
        if not models:
            raise ConfigError("a model chain needs at least one model, got an empty list")
        return models[0] if len(models) == 1 else FallbackModel(*models)
    raise ConfigError(f"a model is a Model, a 'provider:model' string or a list; got {spec!r}")


def _from_string(spec: str) -> Model:
    provider, sep, model = spec.partition(":")
    if not sep or not provider or not model:
        raise ConfigError(f"model {spec!r} must be written 'provider:model', e.g. 'offline:echo'")
    if provider == "offline":
        return OfflineModel(model)
    raise ConfigError(
        f"unknown provider {provider!r} in model {spec!r}; this build knows: {', '.join(_KNOWN)}"
    )
