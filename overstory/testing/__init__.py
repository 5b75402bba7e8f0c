"""Test doubles that ship with overstory, like httpx's ``MockTransport``.

:mod:`overstory.testing.servers` holds loopback HTTP servers speaking the OpenAI Chat
Completions and Anthropic Messages wire formats, for the official SDKs to talk to::

    from overstory.testing import Fault, OpenAIServer

    with OpenAIServer() as server:
        server.script(Fault.rate_limited(retry_after=2))
        ...  # openai.AsyncOpenAI(base_url=server.base_url, api_key="sk-test")

The names are imported on first use, so ``import overstory.testing`` costs nothing and
``python -m overstory.testing.servers`` runs without a double import. The servers need
the ``testing`` extra (``pip install 'overstory[testing]'``, for aiohttp);
:mod:`overstory.testing.tools` needs nothing beyond overstory (hosts import it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .servers import (
        DEFAULT_RULES,
        AnthropicServer,
        BedrockServer,
        Fault,
        FaultKind,
        OpenAIServer,
        Recorded,
        WireServer,
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
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import servers

        return getattr(servers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
