"""Agent: instructions, a model (chain) and typed tools.

An :class:`Agent` is a plain value: it is pickled into every conversation actor that
serves it, so its tools must be importable there (define them in a module, or in
``__main__`` for a script — Ray ships those by value).
"""

from __future__ import annotations

import copy
import importlib.util
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

from .compaction import ContextPolicy, Trim, check_policy
from .context import RunContext
from .exceptions import ConfigError, UsageError
from .messages import ToolCall, ToolReturn
from .output import check_output_type
from .providers import Model, ModelSettings, ModelSpec, Secret, resolve_model
from .providers.schema import OutputSchema
from .tools import Tool, ToolDefinition, unknown_tool
from .validation import check_client_tools

__all__ = [
    "DEFAULT_MAX_ROUND_TRIPS",
    "DEFAULT_PLACEMENT",
    "DEFAULT_VERSION",
    "PLACEMENTS",
    "Agent",
    "Placement",
    "is_plain_name",
]

DEFAULT_MAX_ROUND_TRIPS = 8

#: Where an agent's conversations live: ``hosted`` — as entities inside a few host actors
#: per node (thousands per process, activation = a store read); ``dedicated`` — one Ray
#: actor (a whole process) per conversation, for process isolation.
Placement = Literal["hosted", "dedicated"]
PLACEMENTS: tuple[Placement, ...] = ("hosted", "dedicated")
DEFAULT_PLACEMENT: Placement = "hosted"
DEFAULT_VERSION = "1"

#: Agent names and versions appear in conversation ids (``name:user``), in model names
#: over HTTP (``name/version``), in metric tags and on the command line: kept plain.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def is_plain_name(value: object) -> bool:
    """Whether ``value`` can be an agent's name or version (see :class:`Agent`)."""
    return isinstance(value, str) and bool(_NAME.match(value))


class Agent:
    """What answers a conversation.

    ``model`` is a :class:`Model`, a ``provider:model`` string, or a list of them tried in
    fallback order. ``tools`` are functions (or :class:`Tool` s) the model may call.
    ``max_round_trips`` bounds the model calls of one turn. ``placement`` says where its
    conversations live (:data:`Placement`; the public API and guarantees are the same).
    ``version`` tells apart versions of one agent served side by side (rollouts:
    :mod:`overstory.rollout`). Names and versions are 1-64 letters, digits, ``_``, ``.``
    or ``-``.

    ``redact_pii``: e-mail addresses, phone numbers, card numbers, IBANs and secrets
    become placeholders before text reaches the model, and are restored in its answers
    and tool-call arguments (:mod:`overstory.redaction`). ``cache_ttl_s``: answers are
    cached that long per conversation owner, keyed on everything that changes them;
    answers calling tools only with ``cache_tool_calls`` (:mod:`overstory.cache`).

    ``models``: other models a turn may choose, by name (``send(text, model="fast")``;
    ``"default"`` is ``model``); ``route(ctx, text) -> name | None`` (sync or async)
    chooses one for each new turn that names none (e.g. by the message's complexity).
    ``model_settings``: temperature, max output tokens, stop sequences, seed
    (:class:`~overstory.providers.ModelSettings`, or a mapping of them); a turn's own
    ``settings`` are merged over them.

    ``output_type``: the answer is structured (:mod:`overstory.output`): a pydantic
    model, dataclass or TypedDict the final answer's JSON must match — asked for
    natively from each vendor, validated, asked again with the error up to
    ``output_retries`` times; ``Reply.output`` holds the value.

    ``context``: what a model call sees of a long conversation (:mod:`overstory.compaction`):
    :class:`~overstory.compaction.Trim` (default: the most recent whole turns that fit
    the model's window), :class:`~overstory.compaction.Compact` (those plus a durable
    summary of the rest), or a function ``(ctx, messages) -> messages``.

    ``caller_instructions``: what a turn's own instructions (the HTTP door's
    ``instructions`` and system messages) do: ``"append"`` (default: added after the
    agent's), ``"replace"`` (used instead of the agent's) or ``"refuse"`` (a turn that
    sends some is refused).
    """

    def __init__(
        self,
        name: str,
        *,
        instructions: str = "",
        model: ModelSpec = "offline:echo",
        tools: Iterable[Callable[..., Any] | Tool] = (),
        max_round_trips: int = DEFAULT_MAX_ROUND_TRIPS,
        placement: Placement = DEFAULT_PLACEMENT,
        version: str = DEFAULT_VERSION,
        redact_pii: bool = False,
        cache_ttl_s: float | None = None,
        cache_tool_calls: bool = False,
        vault_shared: Iterable[str] = (),
        context: ContextPolicy | None = None,
        models: Mapping[str, ModelSpec] | None = None,
        route: Callable[[RunContext, str], Any] | None = None,
        model_settings: ModelSettings | Mapping[str, Any] | None = None,
        output_type: Any = None,
        output_retries: int = 2,
        caller_instructions: Literal["append", "replace", "refuse"] = "append",
    ) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"an agent needs a non-empty name, got {name!r}")
        if not is_plain_name(name):
            raise ConfigError(
                f"agent name {name!r} must be 1-64 letters, digits, '_', '.' or '-', "
                "starting with a letter or digit"
            )
        if not is_plain_name(version):
            raise ConfigError(
                f"version {version!r} of agent {name!r} must be a string of 1-64 letters, "
                "digits, '_', '.' or '-', starting with a letter or digit"
            )
        if not isinstance(redact_pii, bool):
            raise ConfigError(f"redact_pii must be True or False, got {redact_pii!r}")
        if redact_pii and importlib.util.find_spec("presidio_analyzer") is None:
            raise ConfigError(
                f"agent {name!r}: redact_pii needs Presidio: pip install 'overstory[pii]'"
            )
        if cache_ttl_s is not None and (
            isinstance(cache_ttl_s, bool)
            or not isinstance(cache_ttl_s, int | float)
            or not 0 < cache_ttl_s <= 30 * 86_400
        ):
            raise ConfigError(
                f"cache_ttl_s must be seconds in (0, 30 days] or None, got {cache_ttl_s!r}"
            )
        if not isinstance(cache_tool_calls, bool):
            raise ConfigError(f"cache_tool_calls must be True or False, got {cache_tool_calls!r}")
        shared = (vault_shared,) if isinstance(vault_shared, str) else tuple(vault_shared)
        for collection in shared:
            if not isinstance(collection, str) or not is_plain_name(collection):
                raise ConfigError(
                    f"vault_shared names collections (1-64 letters, digits, '_', '.', '-'), "
                    f"got {collection!r}"
                )
        if not isinstance(max_round_trips, int) or max_round_trips < 1:
            raise ConfigError(f"max_round_trips must be an int >= 1, got {max_round_trips!r}")
        if placement not in PLACEMENTS:
            raise ConfigError(
                f"unknown placement {placement!r} for agent {name!r}; "
                f"expected one of: {', '.join(PLACEMENTS)}"
            )
        self.name = name
        self.version = version
        self.placement: Placement = placement
        self.instructions = instructions
        self.model: Model = resolve_model(model)
        self.max_round_trips = max_round_trips
        self.context: ContextPolicy = Trim() if context is None else check_policy(context)
        self.models: dict[str, Model] = {}
        for alias, spec in (models or {}).items():
            if not is_plain_name(alias) or alias == "default":
                raise ConfigError(
                    f"agent {name!r}: a model's name in models= must be 1-64 letters, digits, "
                    f"'_', '.' or '-' and not 'default' (the agent's own model), got {alias!r}"
                )
            self.models[alias] = resolve_model(spec)
        if route is not None and not callable(route):
            raise ConfigError(f"route must be a function (ctx, text) -> model name, got {route!r}")
        self.route = route
        self.model_settings = ModelSettings.of(model_settings)
        if (
            isinstance(output_retries, bool)
            or not isinstance(output_retries, int)
            or not 0 <= output_retries <= 10
        ):
            raise ConfigError(f"output_retries must be an int in [0, 10], got {output_retries!r}")
        self.output_retries = output_retries
        self.output_type: Any = None
        self.output: OutputSchema | None = None
        if output_type is not None:
            self.output_type, self.output = output_type, check_output_type(output_type)
        if caller_instructions not in ("append", "replace", "refuse"):
            raise ConfigError(
                "caller_instructions must be 'append', 'replace' or 'refuse', "
                f"got {caller_instructions!r}"
            )
        self.caller_instructions = caller_instructions
        self.redact_pii = redact_pii
        self.cache_ttl_s = None if cache_ttl_s is None else float(cache_ttl_s)
        self.cache_tool_calls = cache_tool_calls
        self.vault_shared: frozenset[str] = frozenset(shared)
        self.tools: dict[str, Tool] = {}
        for item in tools:
            tool = item if isinstance(item, Tool) else Tool(item)
            if tool.name in self.tools:
                raise ConfigError(f"agent {name!r} has two tools named {tool.name!r}")
            self.tools[tool.name] = tool
        self.tool_definitions: tuple[ToolDefinition, ...] = tuple(
            t.definition for t in self.tools.values()
        )
        #: The names of the client tools a turn offers beside the agent's own
        #: (:meth:`with_client_tools`): the caller runs them, not the agent.
        self.client_tools: frozenset[str] = frozenset()

    def with_api_keys(self, keys: Mapping[str, Secret]) -> Agent:
        """This agent calling vendors with the user's own keys (bring-your-own-key).

        Each (endpoint, key) pair gets its own provider actor, so one user's limits,
        breaker state and bill never mix with another's.
        """
        if not keys:
            return self
        clone = copy.copy(self)
        clone.model = self.model.with_api_keys(keys)
        clone.models = {alias: m.with_api_keys(keys) for alias, m in self.models.items()}
        return clone

    def choose(self, model: str | None) -> Model:
        """The model a turn runs on: ``model`` (a name in ``models``, or ``"default"``),
        else the agent's own. An unknown name is refused, naming those allowed."""
        if model is None or model == "default":
            return self.model
        found = self.models.get(model)
        if found is None:
            allowed = ", ".join(["default", *self.models])
            raise UsageError(
                f"agent {self.name!r} has no model {model!r} for a turn to choose; "
                f"it allows: {allowed}"
            )
        return found

    def with_output(self, output_type: Any) -> Agent:
        """This agent answering ``output_type`` (a turn's own choice; ``None``: its own)."""
        if output_type is None or output_type is self.output_type:
            return self
        clone = copy.copy(self)
        clone.output_type, clone.output = output_type, check_output_type(output_type)
        return clone

    def with_instructions(self, extra: str) -> Agent:
        """This agent with a turn's own instructions, as ``caller_instructions`` says:
        after its own, instead of them, or refused (:class:`UsageError`)."""
        if not extra:
            return self
        if self.caller_instructions == "refuse":
            raise UsageError(f"agent {self.name!r} takes no instructions from its callers")
        clone = copy.copy(self)
        if self.caller_instructions == "replace" or not self.instructions:
            clone.instructions = extra
        else:
            clone.instructions = f"{self.instructions}\n\n{extra}"
        return clone

    def with_client_tools(self, tools: Sequence[ToolDefinition]) -> Agent:
        """This agent offering ``tools`` (a caller's, for one turn) beside its own: a
        call to one ends the turn for the caller to run it. A name one of the agent's
        own tools has, or given twice, is refused."""
        if not tools:
            return self
        check_client_tools(tools)
        names = [t.name for t in tools]
        for name in names:
            if name in self.tools:
                raise UsageError(
                    f"client tool {name!r}: agent {self.name!r} has a tool of that name"
                )
        clone = copy.copy(self)
        clone.tool_definitions = self.tool_definitions + tuple(tools)
        clone.client_tools = frozenset(names)
        return clone

    def for_turn(self, model: Model, settings: ModelSettings | None) -> Agent:
        """This agent as one turn runs it: on ``model``, with ``settings`` over its own."""
        if model is self.model and settings is None:
            return self
        clone = copy.copy(self)
        clone.model = model
        if settings is not None:
            clone.model_settings = settings.over(self.model_settings)
        return clone

    def context_tokens(self) -> int | None:
        """The most prompt tokens any model this agent may run on can read (``None``
        when one of them has no known window): what a conversation holds in memory."""
        budgets = [m.budget() for m in (self.model, *self.models.values())]
        if any(b is None for b in budgets):
            return None
        return max(b.prompt for b in budgets if b is not None)

    def output_cap(
        self, settings: ModelSettings | None = None, model: str | None = None
    ) -> int | None:
        """The most tokens one answer may take (``None``: unknown): the settings' cap,
        else the largest the turn's model — any model the agent may route to — is
        configured to give. What a quota reserves for an answer."""
        merged = self.model_settings if settings is None else settings.over(self.model_settings)
        if merged.max_output_tokens is not None:
            return merged.max_output_tokens
        candidates = (
            [self.choose(model)]
            if model or self.route is None
            else [self.model, *self.models.values()]
        )
        reserves = [b.reserve for m in candidates if (b := m.budget()) is not None and b.reserve]
        return max(reserves, default=None)

    def __repr__(self) -> str:
        return (
            f"Agent({self.name!r}, version={self.version!r}, model={self.model.name!r}, tools={list(self.tools)}, "
            f"max_round_trips={self.max_round_trips}, placement={self.placement!r})"
        )

    async def run_tool(self, call: ToolCall, context: RunContext | None = None) -> ToolReturn:
        """Run one tool call (``context`` for tools that take one); an unknown tool is an
        error return, never an exception."""
        tool = self.tools.get(call.name)
        if tool is None:
            return unknown_tool(call, list(self.tools))
        return await tool.run(call, context)
