"""Fallback: try each model of a chain in order until one answers."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import aclosing

from opentelemetry import trace

from ..exceptions import AllModelsFailed, ConfigError, ModelError
from ..messages import ModelResponse
from ..telemetry import metrics, record_fallback
from .base import FallThrough, Model, ModelRequest, StreamItem
from .endpoint import Secret
from .windows import Budget

__all__ = ["FallbackModel"]


class FallbackModel(Model):
    """Calls ``models[0]``; on a :class:`ModelError` falls through to the next one.

    Retrying one endpoint is its provider actor's business (``providers/taxonomy.py``):
    by the time an error reaches the chain, that endpoint has given up for this call, so
    every kind falls through — a circuit that is open costs one actor round trip. When
    every model fails, raises :class:`AllModelsFailed` listing each failure, in order.
    ``on_fallback(failed, error, next_model)`` is told about each fall-through.
    """

    def __init__(
        self,
        *models: Model,
        on_fallback: Callable[[Model, ModelError, Model | None], None] | None = None,
    ) -> None:
        if not models:
            raise ConfigError("a model chain needs at least one model")
        self.models = models
        self.on_fallback = on_fallback

    def with_api_keys(self, keys: Mapping[str, Secret]) -> Model:
        return FallbackModel(
            *(m.with_api_keys(keys) for m in self.models), on_fallback=self.on_fallback
        )

    @property
    def name(self) -> str:
        return " -> ".join(m.name for m in self.models)

    def budget(self) -> Budget | None:
        """The member's with the least room for a prompt (every member is sent the same
        request, so it must fit them all); members whose window is unknown don't count."""
        budgets = [b for m in self.models if (b := m.budget()) is not None]
        return min(budgets, key=lambda b: b.prompt, default=None)

    async def request(self, req: ModelRequest) -> ModelResponse:
        return await self._chain(False, req)

    async def call(self, req: ModelRequest) -> ModelResponse:
        """Each model's own :meth:`~Model.call` (its ``chat`` span); a fall-through is an
        ``overstory.fallback`` event on the current span and a metric."""
        return await self._chain(True, req)

    async def stream(self, req: ModelRequest) -> AsyncGenerator[StreamItem, None]:
        """Each model's stream in turn: a failure *before its first delta* falls through
        (one :class:`FallThrough` item, nothing of it shown); a failure after it ends
        the stream with that error — never a second answer appended to a partial one."""
        failures: list[ModelError] = []
        for i, model in enumerate(self.models):
            shown = False
            try:
                async with aclosing(model.stream(req)) as items:
                    async for item in items:
                        shown = shown or isinstance(item, str)
                        yield item
                        if isinstance(item, ModelResponse):
                            return
            except ModelError as exc:
                if not exc.model:
                    exc.model = model.name
                if shown:
                    raise
                failures.append(exc)
                self._fell_through(model, exc, i, traced=True)
                yield FallThrough(model.name, exc)
        raise AllModelsFailed(failures)

    def _fell_through(self, model: Model, exc: ModelError, i: int, *, traced: bool) -> None:
        following = self.models[i + 1] if i + 1 < len(self.models) else None
        if traced:
            record_fallback(
                trace.get_current_span(),
                failed_model=model.name,
                error_type=exc.kind,
                next_model=following.name if following else None,
            )
            metrics().fallback(model.name, exc.kind)
        if self.on_fallback is not None:
            self.on_fallback(model, exc, following)

    async def _chain(self, traced: bool, req: ModelRequest) -> ModelResponse:
        failures: list[ModelError] = []
        for i, model in enumerate(self.models):
            try:
                if traced:
                    return await model.call(req)
                return await model.request(req)
            except ModelError as exc:
                if not exc.model:
                    exc.model = model.name
                failures.append(exc)
                self._fell_through(model, exc, i, traced=traced)
        raise AllModelsFailed(failures)
