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
import re
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypeAlias

from opentelemetry.trace import Span

from ..exceptions import ConfigError, ModelError
from ..messages import Message, ModelResponse
from ..telemetry import (
    chat_span,
    metrics,
    record_chat_content,
    record_chat_response,
    record_first_token,
)
from ..tools import ToolDefinition
from .schema import OutputSchema
from .windows import Budget

if TYPE_CHECKING:
    from .endpoint import Secret

__all__ = [
    "FallThrough",
    "Model",
    "ModelRequest",
    "ModelSettings",
    "PolicyModel",
    "StreamItem",
    "record_response",
    "traced_request",
    "traced_stream",
]


#: ``tool_choice``: a mode, or a tool's name (OpenAI's rule for function names).
_TOOL_CHOICE = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """How a model answers: each setting ``None`` (or empty) leaves the vendor's default.

    ``temperature`` (0-2; Anthropic takes 0-1 and refuses more), ``max_output_tokens``
    (the answer's cap: the vendor stops there, and a quota reserves exactly this for the
    answer), ``stop`` (up to 4 sequences that end the answer), ``seed`` (OpenAI-format
    endpoints; Anthropic and Bedrock have none and refuse a call that sets one),
    ``tool_choice`` (``"auto"``, ``"none"``: answer without tools, ``"required"``: call
    one, or a tool's name: call that one — ``required`` and a name hold for the turn's
    first call only, so the turn can end), ``parallel_tool_calls`` (``False``: at most
    one call per answer). Set per agent (``Agent(model_settings=...)``) and per turn
    (``send(settings=...)``, merged over the agent's)."""

    temperature: float | None = None
    max_output_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    tool_choice: str | None = None
    parallel_tool_calls: bool | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if t is not None and (
            isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t <= 2
        ):
            raise ConfigError(f"temperature must be a number in [0, 2] or None, got {t!r}")
        m = self.max_output_tokens
        if m is not None and (
            isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= 1_000_000
        ):
            raise ConfigError(
                f"max_output_tokens must be an int in [1, 1000000] or None, got {m!r}"
            )
        stop = self.stop
        if isinstance(stop, str) or not isinstance(stop, tuple | list):
            raise ConfigError(f"stop must be a list of up to 4 strings, got {stop!r}")
        if len(stop) > 4 or not all(isinstance(x, str) and 0 < len(x) <= 200 for x in stop):
            raise ConfigError(f"stop must be up to 4 strings of 1-200 characters, got {stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        seed = self.seed
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, int) or abs(seed) >= 2**63
        ):
            raise ConfigError(f"seed must be a 64-bit int or None, got {seed!r}")
        choice = self.tool_choice
        if choice is not None and (
            not isinstance(choice, str) or not _TOOL_CHOICE.fullmatch(choice)
        ):
            raise ConfigError(
                "tool_choice must be 'auto', 'none', 'required' or a tool's name, "
                f"got {choice!r:.80}"
            )
        if self.parallel_tool_calls is not None and not isinstance(self.parallel_tool_calls, bool):
            raise ConfigError(
                f"parallel_tool_calls must be a bool or None, got {self.parallel_tool_calls!r}"
            )

    @classmethod
    def of(cls, value: ModelSettings | Mapping[str, Any] | None) -> ModelSettings:
        """Settings from a :class:`ModelSettings`, a mapping of its fields (an unknown
        key is refused by name) or ``None`` (all defaults)."""
        if value is None:
            return _DEFAULT_SETTINGS
        if isinstance(value, ModelSettings):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"model settings are a ModelSettings or a mapping, got {value!r}")
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(
                f"unknown model setting(s) {', '.join(map(repr, unknown))}; known: "
                "temperature, max_output_tokens, stop, seed, tool_choice, parallel_tool_calls"
            )
        return cls(**value)

    def over(self, base: ModelSettings) -> ModelSettings:
        """These settings where set, ``base``'s elsewhere (a turn's over its agent's)."""
        return ModelSettings(
            self.temperature if self.temperature is not None else base.temperature,
            self.max_output_tokens
            if self.max_output_tokens is not None
            else base.max_output_tokens,
            self.stop or base.stop,
            self.seed if self.seed is not None else base.seed,
            self.tool_choice if self.tool_choice is not None else base.tool_choice,
            self.parallel_tool_calls
            if self.parallel_tool_calls is not None
            else base.parallel_tool_calls,
        )

    def forced(self) -> str | None:
        """The tool the model must call (``required``: any), else ``None``."""
        return None if self.tool_choice in (None, "auto", "none") else self.tool_choice

    def as_dict(self) -> dict[str, Any]:
        """The settings that are set (for cache keys and spans)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) not in (None, ())
        }


_DEFAULT_SETTINGS = ModelSettings()


@dataclass(frozen=True, slots=True, init=False)
class ModelRequest:
    """What one model call is asked: the instructions, the history as the model sees it,
    the tools it may call, how to answer (:class:`ModelSettings`) and, for structured
    output, the schema the answer's JSON must match (:class:`~.schema.OutputSchema`). Every
    :class:`Model` method takes one; a wrapper that changes what is sent (redaction)
    sends a copy made with :func:`dataclasses.replace`. Any sequences are accepted and
    stored as tuples.
    """

    instructions: str
    messages: tuple[Message, ...]
    tools: tuple[ToolDefinition, ...] = ()
    settings: ModelSettings = _DEFAULT_SETTINGS
    output: OutputSchema | None = None

    def __init__(
        self,
        instructions: str,
        messages: Sequence[Message],
        tools: Sequence[ToolDefinition] = (),
        settings: ModelSettings | None = None,
        output: OutputSchema | None = None,
    ) -> None:
        object.__setattr__(self, "instructions", instructions)
        object.__setattr__(self, "messages", tuple(messages))
        object.__setattr__(self, "tools", tuple(tools))
        object.__setattr__(self, "settings", settings or _DEFAULT_SETTINGS)
        object.__setattr__(self, "output", output)


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
