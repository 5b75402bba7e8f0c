"""Structured output: what ``Agent(output_type=...)`` (or a turn's ``output_type``) asks
the answer to be, and the check of what the model answered.

The type is any the pydantic ``TypeAdapter`` takes that describes a JSON object — a
pydantic model, a dataclass, a ``TypedDict`` — or an
:class:`~overstory.providers.schema.OutputSchema`: a bare JSON schema with a name (what
an HTTP client's ``text.format`` gives), checked with ``jsonschema``; its value is the
parsed JSON. Its JSON schema goes with every model call
of the turn (:class:`~overstory.providers.schema.OutputSchema`; each vendor asks for it
natively), the final answer is validated against the type, and one that does not match
is asked for again with the validation error, up to the agent's ``output_retries``. The
answer's JSON text is what is stored; ``Reply.output`` is the validated value.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import jsonschema
import pydantic

from .exceptions import ConfigError
from .providers.schema import OutputSchema

__all__ = ["OutputInvalid", "check_output_type", "parse_output", "retry_prompt"]


class OutputInvalid(ValueError):
    """A model's answer does not match the output type (the message says how)."""


@lru_cache(maxsize=256)
def _adapter(output_type: Any) -> pydantic.TypeAdapter[Any]:
    return pydantic.TypeAdapter(output_type)


def check_output_type(output_type: Any) -> OutputSchema:
    """``output_type``'s schema; a :class:`ConfigError` unless it describes an object."""
    if isinstance(output_type, OutputSchema):
        try:
            jsonschema.validators.validator_for(output_type.schema).check_schema(output_type.schema)
        except jsonschema.SchemaError as exc:
            raise ConfigError(
                f"the schema of {output_type.name} is not a JSON schema: {exc.message}"
            ) from exc
        if output_type.schema.get("type") != "object":
            raise ConfigError(f"the schema of {output_type.name} must describe a JSON object")
        return output_type
    name = getattr(output_type, "__name__", None) or "output"
    try:
        schema = _adapter(output_type).json_schema()
    except (pydantic.PydanticUserError, pydantic.PydanticSchemaGenerationError, TypeError) as exc:
        raise ConfigError(f"output_type {output_type!r} has no JSON schema: {exc}") from exc
    if schema.get("type") != "object":
        raise ConfigError(
            f"output_type {name} must describe a JSON object (a pydantic model, a dataclass "
            f"or a TypedDict); its schema is of type {schema.get('type')!r}"
        )
    return OutputSchema(name, schema)


def parse_output(output_type: Any, text: str) -> Any:
    """The value ``text`` (the model's JSON) holds; :class:`OutputInvalid` naming the
    first errors when it does not match ``output_type``."""
    if isinstance(output_type, OutputSchema):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise OutputInvalid(f"(root): not JSON: {exc}") from exc
        errors = sorted(
            jsonschema.validators.validator_for(output_type.schema)(output_type.schema).iter_errors(
                value
            ),
            key=lambda e: list(e.path),
        )
        if errors:
            raise OutputInvalid(
                "; ".join(
                    f"{'.'.join(map(str, e.path)) or '(root)'}: {e.message}" for e in errors[:5]
                )
            )
        return value
    try:
        return _adapter(output_type).validate_json(text)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise OutputInvalid(problems) from exc


def retry_prompt(schema: OutputSchema, error: OutputInvalid) -> str:
    """What a model is told when its answer did not match."""
    return (
        f"Your answer does not match the required {schema.name} schema ({error}). "
        "Answer again with only the JSON object, matching the schema exactly."
    )
