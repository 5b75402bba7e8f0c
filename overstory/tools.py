"""Typed tools: plain Python functions the model may call.

A tool's arguments are validated by pydantic from the function's type hints, and the
same hints produce the JSON schema sent to the model. A tool never kills a conversation:
bad arguments, an unknown tool name or an exception inside the tool all come back to the
model as a :class:`~overstory.messages.ToolReturn` with ``is_error=True``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable
from typing import Any, get_type_hints

import pydantic

from .context import RunContext
from .exceptions import ToolDefinitionError
from .messages import ToolCall, ToolDefinition, ToolReturn

__all__ = ["Tool", "ToolDefinition"]

_MAX_ERROR_CHARS = 2_000


class Tool:
    """A function the model can call, with arguments validated from its type hints.

    ``Tool(fn)`` takes the name from ``fn.__name__`` and the description from the first
    paragraph of its docstring unless given. Every parameter needs a type hint; ``*args``
    and ``**kwargs`` are refused because no schema can describe them.
    """

    def __init__(
        self,
        function: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
    ) -> None:
        if not callable(function):
            raise ToolDefinitionError(f"a tool must be a function, got {function!r}")
        self.function = function
        self.name: str = name or str(getattr(function, "__name__", ""))
        if not self.name.isidentifier():
            raise ToolDefinitionError(
                f"tool name {self.name!r} must be a Python identifier "
                "(letters, digits and underscores)"
            )
        doc = inspect.getdoc(function) or ""
        self.description = description if description is not None else doc.split("\n\n")[0]
        self._is_async = inspect.iscoroutinefunction(function)
        #: Whether its first parameter is a RunContext (injected, not in the schema).
        self.takes_context = _takes_context(function)
        # Built eagerly to report definition errors now; rebuilt lazily after unpickling
        # because a pydantic model created at run time cannot be pickled by reference.
        self._args_model: type[pydantic.BaseModel] | None = _args_model(
            self.name, function, self.takes_context
        )
        self.definition = ToolDefinition(
            name=self.name,
            description=self.description,
            parameters=_schema(self._args_model),
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_args_model"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"Tool({self.name!r})"

    async def run(self, call: ToolCall, context: RunContext | None = None) -> ToolReturn:
        """Validate ``call.arguments`` and run the function (with ``context`` first when
        it takes one); errors become error returns."""
        if self._args_model is None:
            self._args_model = _args_model(self.name, self.function, self.takes_context)
        try:
            args = self._args_model.model_validate(call.arguments)
        except pydantic.ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(arguments)'}: {e['msg']}"
                for e in exc.errors(include_url=False)
            )
            return _error(call, f"invalid arguments for tool {self.name!r}: {problems}")
        kwargs = {k: getattr(args, k) for k in type(args).model_fields}
        first = (context,) if self.takes_context else ()
        if self.takes_context and context is None:
            return _error(call, f"tool {self.name!r} needs a RunContext and none was given")
        try:
            if self._is_async:
                result = await self.function(*first, **kwargs)
            else:
                result = await asyncio.to_thread(self.function, *first, **kwargs)
        except Exception as exc:  # a tool's failure is reported to the model, by design
            return _error(call, f"tool {self.name!r} raised {type(exc).__name__}: {exc}")
        return ToolReturn(tool_call_id=call.id, tool_name=self.name, content=_render(result))


def _error(call: ToolCall, text: str) -> ToolReturn:
    return ToolReturn(
        tool_call_id=call.id,
        tool_name=call.name,
        content=text[:_MAX_ERROR_CHARS],
        is_error=True,
    )


def unknown_tool(call: ToolCall, known: list[str]) -> ToolReturn:
    """The error return for a call to a tool the agent does not have."""
    return _error(
        call, f"unknown tool {call.name!r}; available tools: {', '.join(known) or 'none'}"
    )


def _render(result: Any) -> str:
    if isinstance(result, str):
        return result
    return json.dumps(pydantic.TypeAdapter(Any).dump_python(result, mode="json"))


def _takes_context(function: Callable[..., Any]) -> bool:
    """Whether the first parameter is annotated :class:`RunContext` (and only it)."""
    try:
        params = list(inspect.signature(function).parameters.values())
        hints = get_type_hints(function)
    except (TypeError, ValueError, NameError):
        return False  # _args_model reports it
    named = [p for p in params if hints.get(p.name) is RunContext]
    if named and named[0] is not params[0]:
        raise ToolDefinitionError(
            f"RunContext must be the first parameter of tool "
            f"{getattr(function, '__name__', function)!r}, not {named[0].name!r}"
        )
    return bool(named)


def _args_model(
    name: str, function: Callable[..., Any], takes_context: bool = False
) -> type[pydantic.BaseModel]:
    try:
        signature = inspect.signature(function)
        hints = get_type_hints(function)
    except (TypeError, ValueError, NameError) as exc:
        raise ToolDefinitionError(f"cannot read the signature of tool {name!r}: {exc}") from exc
    fields: dict[str, Any] = {}
    params = list(signature.parameters.values())[1 if takes_context else 0 :]
    for param in params:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ToolDefinitionError(
                f"tool {name!r} takes *{param.name}/**{param.name}; "
                "tools need named, typed parameters"
            )
        if param.name not in hints:
            raise ToolDefinitionError(f"parameter {param.name!r} of tool {name!r} has no type hint")
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (hints[param.name], default)
    try:
        return pydantic.create_model(  # type: ignore[call-overload, no-any-return]
            f"{name}_arguments",
            __config__=pydantic.ConfigDict(extra="forbid"),
            **fields,
        )
    except (pydantic.PydanticSchemaGenerationError, TypeError) as exc:
        raise ToolDefinitionError(
            f"tool {name!r} has a parameter type pydantic cannot validate: {exc}"
        ) from exc


def _schema(model: type[pydantic.BaseModel]) -> dict[str, Any]:
    try:
        schema = model.model_json_schema()
    except pydantic.errors.PydanticInvalidForJsonSchema as exc:
        raise ToolDefinitionError(f"tool {model.__name__!r} has no JSON schema: {exc}") from exc
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)
    return schema
