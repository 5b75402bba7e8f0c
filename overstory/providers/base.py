"""The interface every model provider implements.

A :class:`Model` turns one :class:`ModelRequest` (instructions, messages, tool
definitions) into one :class:`~overstory.messages.ModelResponse`. Vendors (issue:
providers) and the scripted :class:`~overstory.providers.offline.OfflineModel` implement
it; policies such as :class:`~overstory.providers.fallback.FallbackModel` wrap it.

Implementations raise :class:`~overstory.exceptions.ModelError` (never a vendor SDK's
own exception) so wrappers can decide what to do without knowing the vendor.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

from opentelemetry.trace import Span

from ..exceptions import ModelError
from ..messages import Message, ModelResponse
from ..telemetry import (
    chat_span,
    metrics,
    record_chat_content,
    record_chat_response,
    record_first_token,
)
from ..tools import ToolDefinition
from .windows import Budget

if TYPE_CHECKING:
    from .endpoint import Secret

__all__ = [
    "FallThrough",
    "Model",
    "ModelRequest",
    "PolicyModel",
    "StreamItem",
    "record_response",
    "traced_request",
    "traced_stream",
]


@dataclass(frozen=True, slots=True, init=False)
class ModelRequest:
    """What one model call is asked: the instructions, the history as the model sees it,
    and the tools it may call. Every :class:`Model` method takes one; a wrapper that
    changes what is sent (redaction) sends a copy made with :func:`dataclasses.replace`.

    Later per-call options (an output schema, a cap on output tokens, ...) will be
    fields of it. Any sequences are accepted and stored as tuples.
    """

    instructions: str
    messages: tuple[Message, ...]
    tools: tuple[ToolDefinition, ...] = ()

    def __init__(
        self,
        instructions: str,
        messages: Sequence[Message],
        tools: Sequence[ToolDefinition] = (),
    ) -> None:
        object.__setattr__(self, "instructions", instructions)
        object.__setattr__(self, "messages", tuple(messages))
        object.__setattr__(self, "tools", tuple(tools))


@dataclass(frozen=True, slots=True)
class FallThrough:
    """In a model's stream: ``model`` failed before its first token with ``error``; the
    next model of the chain answers instead (nothing of ``model`` was shown)."""

    model: str
    error: ModelError


#: What :meth:`Model.stream` yields: text deltas (``str``), fall-throughs, and last the
#: whole :class:`~overstory.messages.ModelResponse` (its content is the deltas joined).
StreamItem: TypeAlias = "str | FallThrough | ModelResponse"


class Model(ABC):
    """One model endpoint (or a policy wrapping several)."""

    @property
    @abstractmethod
    def name(self) -> str:
        """``provider:model`` as users write it, e.g. ``offline:demo``. Never holds a key."""

    @abstractmethod
    async def request(self, req: ModelRequest) -> ModelResponse:
        """One model call. Raises :class:`~overstory.exceptions.ModelError` on failure."""

    async def call(self, req: ModelRequest) -> ModelResponse:
        """:meth:`request` inside a ``chat {model}`` span, with token metrics.

        What the turn loop calls. Policies that delegate (fallback) or models whose
        request goes out elsewhere (a provider actor) override it; a model only
        implements :meth:`request`.
        """
        provider, _, model = self.name.partition(":")
        return await traced_request(self.request, provider, model, req)

    async def stream(self, req: ModelRequest) -> AsyncGenerator[StreamItem, None]:
        """The answer as it arrives: text deltas, then the whole response, whose content
        is exactly the deltas joined. A :class:`~overstory.exceptions.ModelError` before
        the first delta means nothing was shown (a chain may fall through); after it,
        the answer is cut short.

        This default answers in one piece (:meth:`call`, then its text as one delta);
        a model that can stream overrides it.
        """
        response = await self.call(req)
        if response.content:
            yield response.content
        yield response

    def with_api_keys(self, keys: Mapping[str, Secret]) -> Model:
        """This model using the user's own keys (vendor -> key) where it calls a vendor."""
        return self

    def budget(self) -> Budget | None:
        """What a call may send this model (:mod:`.windows`); ``None`` while its window
        is unknown. This default knows only a window an overflow error named here."""
        return Budget.of(self.name, None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class PolicyModel(Model):
    """A policy around one model (breaker, retries, limiter): it keeps that model's name."""

    def __init__(self, model: Model) -> None:
        self.model = model

    @property
    def name(self) -> str:
        return self.model.name

    def budget(self) -> Budget | None:
        return self.model.budget()


Request = Callable[[ModelRequest], Awaitable[ModelResponse]]


async def traced_request(
    request: Request,
    provider: str,
    model: str,
    req: ModelRequest,
    server_address: str | None = None,
    server_port: int | None = None,
) -> ModelResponse:
    """``request(req)`` inside a ``chat {model}`` span: its answer recorded on the span
    (contents only with capture on) and in the token metrics; every call, answered or
    not, in ``model_calls_total`` and ``model_call_seconds`` (outcome ``ok`` or the
    error's kind)."""
    started = time.monotonic()
    outcome = "error"
    try:
        with chat_span(provider, model, server_address, server_port) as span:
            response = await request(req)
            outcome = "ok"
            record_response(span, provider, model, response)
            record_chat_content(
                span, messages=req.messages, response=response, instructions=req.instructions
            )
            return response
    except ModelError as exc:
        outcome = exc.kind
        raise
    finally:
        metrics().model_call(provider, model, outcome, time.monotonic() - started)


Stream = Callable[[ModelRequest], AsyncGenerator[StreamItem, None]]


async def traced_stream(
    stream: Stream,
    provider: str,
    model: str,
    req: ModelRequest,
    server_address: str | None = None,
    server_port: int | None = None,
) -> AsyncGenerator[StreamItem, None]:
    """``stream(req)``'s items inside a ``chat {model}`` span, as :func:`traced_request`
    does for one answer, plus the time to the first text delta on the span
    (``overstory.time_to_first_token_s``). A reader that stops early ends the span
    with ``error.type=cancelled`` and the call's outcome ``cancelled``.

    Iterate it from one task: the span is the current one between its items.
    """
    started = time.monotonic()
    outcome = "error"
    try:
        with chat_span(provider, model, server_address, server_port) as span:
            first = True
            async with aclosing(stream(req)) as items:
                async for item in items:
                    if first and isinstance(item, str):
                        first = False
                        record_first_token(span, time.monotonic() - started)
                    if isinstance(item, ModelResponse):
                        outcome = "ok"
                        record_response(span, provider, model, item)
                        record_chat_content(
                            span,
                            messages=req.messages,
                            response=item,
                            instructions=req.instructions,
                        )
                    yield item
    except ModelError as exc:
        outcome = exc.kind
        raise
    except (GeneratorExit, asyncio.CancelledError):
        outcome = "cancelled"
        raise
    finally:
        metrics().model_call(provider, model, outcome, time.monotonic() - started)


def record_response(span: Span, provider: str, model: str, response: ModelResponse) -> None:
    """A model's answer on its ``chat`` span and in the token metrics."""
    usage = response.usage
    record_chat_response(
        span,
        response_model=response.model or model,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        finish_reasons=[response.finish_reason],
    )
    metrics().tokens(provider, model, usage.input_tokens, usage.output_tokens)
