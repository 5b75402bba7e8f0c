"""Structured output: the schema a call asks the answer to match, and a deterministic
instance of a JSON schema (what the offline model and the loopback servers answer).

A :class:`OutputSchema` goes with a :class:`~overstory.providers.ModelRequest`; each
vendor asks for it natively — OpenAI's ``response_format`` of type ``json_schema``,
Anthropic's (and Bedrock's) forced tool :data:`OUTPUT_TOOL` — and the answer's text is
the JSON. Validating it (pydantic) and asking again is the turn's business.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["OUTPUT_TOOL", "OutputSchema", "example_of"]

#: The tool an Anthropic-format model is made to call with its structured answer.
OUTPUT_TOOL = "final_output"


@dataclass(frozen=True, slots=True)
class OutputSchema:
    """The JSON schema (``schema``, a JSON object) an answer must match, by ``name``."""

    name: str
    schema: dict[str, Any] = field(compare=False)

    @property
    def digest(self) -> str:
        """The schema as canonical JSON (cache keys compare it)."""
        return json.dumps(self.schema, sort_keys=True, separators=(",", ":"))


def example_of(schema: Any, text: str = "", defs: dict[str, Any] | None = None) -> Any:
    """A deterministic instance of JSON schema ``schema``: strings are ``text`` (or
    their default, first enum value, or ``"text"``), integers 1, numbers 1.5, booleans
    true, arrays one item, objects every property; ``$ref`` and ``anyOf`` / ``oneOf`` /
    ``allOf`` are followed (the first non-null choice)."""
    if not isinstance(schema, dict):
        return None
    if defs is None:
        defs = schema.get("$defs") or schema.get("definitions") or {}
    if "$ref" in schema:
        name = str(schema["$ref"]).rsplit("/", 1)[-1]
        return example_of(defs.get(name, {}), text, defs)
    if "const" in schema:
        return schema["const"]
    if "default" in schema:
        return schema["default"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        choices = [c for c in schema.get(key, ()) if c.get("type") != "null"]
        if choices:
            return example_of(choices[0], text, defs)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        return {name: example_of(sub, text, defs) for name, sub in props.items()}
    if kind == "array":
        return [example_of(schema.get("items", {}), text, defs)]
    if kind == "integer":
        return 1
    if kind == "number":
        return 1.5
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return text or "text"
