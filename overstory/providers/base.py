"""The interface every model provider implements.

A :class:`Model` turns (instructions, messages, tool definitions) into one
:class:`~overstory.messages.ModelResponse`. Vendors (issue: providers) and the scripted
:class:`~overstory.providers.offline.OfflineModel` implement it; policies such as
:class:`~overstory.providers.fallback.FallbackModel` wrap it.

Implementations raise :class:`~overstory.exceptions.ModelError` (never a vendor SDK's
own exception) so wrappers can decide what to do without knowing the vendor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ..messages import Message, ModelResponse
from ..tools import ToolDefinition

if TYPE_CHECKING:
    from .endpoint import Secret

__all__ = ["Model"]


class Model(ABC):
    """One model endpoint (or a policy wrapping several)."""

    @property
    @abstractmethod
    def name(self) -> str:
        """``provider:model`` as users write it, e.g. ``offline:demo``. Never holds a key."""

    @abstractmethod
    async def request(
        self,
        instructions: str,
        messages: Sequence[Message],
        tools: Sequence[ToolDefinition],
    ) -> ModelResponse:
        """One model call. Raises :class:`~overstory.exceptions.ModelError` on failure."""

    def with_api_keys(self, keys: Mapping[str, Secret]) -> Model:
        """This model using the user's own keys (vendor -> key) where it calls a vendor."""
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
