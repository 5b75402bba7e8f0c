"""Fallback: try each model of a chain in order until one answers."""

from __future__ import annotations

from collections.abc import Sequence

from ..exceptions import AllModelsFailed, ConfigError, ModelError
from ..messages import Message, ModelResponse
from ..tools import ToolDefinition
from .base import Model

__all__ = ["FallbackModel"]


class FallbackModel(Model):
    """Calls ``models[0]``; on a :class:`ModelError` falls through to the next one.

    When every model fails, raises :class:`AllModelsFailed` listing each failure. The
    error taxonomy (which failures fall through and which retry) grows with the provider
    pool; here every ``ModelError`` falls through.
    """

    def __init__(self, *models: Model) -> None:
        if not models:
            raise ConfigError("a model chain needs at least one model")
        self.models = models

    @property
    def name(self) -> str:
        return " -> ".join(m.name for m in self.models)

    async def request(
        self,
        instructions: str,
        messages: Sequence[Message],
        tools: Sequence[ToolDefinition],
    ) -> ModelResponse:
        failures: list[ModelError] = []
        for model in self.models:
            try:
                return await model.request(instructions, messages, tools)
            except ModelError as exc:
                if not exc.model:
                    exc.model = model.name
                failures.append(exc)
        raise AllModelsFailed(failures)
