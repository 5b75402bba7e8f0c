"""The door's OpenAPI 3.1 document (pure): every route, its request and its answers, as
served — what client generators and schemathesis read at ``/openapi.json``.

Written here, not derived from the routes: they read raw bodies (to bound their size and
depth before parsing) and validate by hand, with the rules this document states. It is
made for the agents the door serves (``model`` is one of them) and the message limit it
enforces, so a body valid by the document is one the door takes.
"""

from __future__ import annotations

from typing import Any

__all__ = ["openapi"]

_REF = "#/components/schemas/"

#: A message's text: not blank, no control characters but newlines and tabs
#: (:func:`~overstory.validation.validate_message`).
_TEXT_CHAR = r"[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"
_TEXT_PATTERN = rf"^{_TEXT_CHAR}*[^\s\x00-\x1f\x7f-\x9f]{_TEXT_CHAR}*$"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _obj(
    properties: dict[str, Any], required: tuple[str, ...] = (), *, closed: bool = False
) -> dict[str, Any]:
    """An object; ``closed``: a request body, which refuses other fields and takes
    ``null`` for any optional one (as OpenAI's API does)."""
    if closed:
        properties = {
            k: v if k in required else {"anyOf": [v, {"type": "null"}]}
            for k, v in properties.items()
        }
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    return schema


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {"4XX": _json(_ref("Error"), "Refused: the error names the problem")}
#: A server-sent event, as a reader parses one (its ``data`` is a JSON object's text,
#: and ``[DONE]`` ends a chat completion's stream).
_STREAM = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "properties": {
                "data": {"type": "string"},
                "event": {"type": "string"},
                "id": {"type": "string"},
            },
        }
    }
}

#: A user id: not blank, no surrounding whitespace, no control, format or private-use
#: characters (:func:`~overstory.validation.validate_user_id`; the common ones excluded).
_NOT_ID = (
    r"\x00-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ue000-\uf8ff"
    r"\U000e0000-\U000e007f\U000f0000-\U0010ffff"
)
_USER_PATTERN = rf"^[^\s{_NOT_ID}](?:[^{_NOT_ID}]*[^\s{_NOT_ID}])?$"


def _op(
    summary: str,
    answer: dict[str, Any],
    *,
    body: dict[str, Any] | None = None,
    parameters: list[dict[str, Any]] | None = None,
    stream: bool = False,
    public: bool = False,
    required: bool = True,
) -> dict[str, Any]:
    ok = _json(answer)
    if stream:
        ok["content"].update(_STREAM)
    op: dict[str, Any] = {"summary": summary, "responses": {"200": ok, **_ERRORS}}
    if body is not None:
        op["requestBody"] = {
            "required": required,
            "content": {"application/json": {"schema": body}},
        }
    if parameters:
        op["parameters"] = parameters
    if public:
        op["security"] = []
    return op


def _path(name: str, pattern: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": 200}
    if pattern:
        schema["pattern"] = pattern
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


_PAGING = [
    _query("limit", {"type": "integer", "minimum": 1, "maximum": 100}),
    _query("order", {"type": "string", "enum": ["asc", "desc"]}),
    _query("after", {"type": "string", "pattern": r"^item_\d{1,12}(_\d{1,6})?$"}),
]


def openapi(agents: list[str], max_chars: int) -> dict[str, Any]:
    """The document for a door serving ``agents`` with messages of at most
    ``max_chars`` characters."""
    text = {"type": "string", "minLength": 1, "maxLength": max_chars, "pattern": _TEXT_PATTERN}
    model = {"type": "string", "enum": sorted(agents) or ["none"]}
    metadata = {
        "type": "object",
        "maxProperties": 16,
        "propertyNames": {"maxLength": 64},
        "additionalProperties": {"type": "string", "maxLength": 512},
    }
    user_message = _obj(
        {
            "type": {"const": "message"},
            "role": {"const": "user"},
            "content": text,
        },
        ("role", "content"),
        closed=True,
    )
    conv_ref = {"type": "string", "pattern": r"^conv_[0-9a-f]{24}$"}
    function_tool = _obj(
        {
            "type": {"const": "function"},
            "name": {"type": "string", "pattern": r"^[A-Za-z0-9_-]{1,64}$"},
            "description": {"type": "string"},
            "parameters": {"type": "object"},
            "strict": {"type": "boolean"},
        },
        ("type", "name"),
        closed=True,
    )
    create_response = _obj(
        {
            "model": model,
            "input": {
                "oneOf": [
                    text,
                    {"type": "array", "items": user_message, "minItems": 1, "maxItems": 1},
                ]
            },
            "stream": {"type": "boolean"},
            "instructions": {"type": "string"},
            "metadata": metadata,
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
            "max_output_tokens": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
            "parallel_tool_calls": {"type": "boolean"},
            "tool_choice": {"type": "string", "enum": ["auto", "none", "required"]},
            "truncation": {"type": "string", "enum": ["auto"]},
            "top_p": {"type": "number", "enum": [1]},
            "include": {
                "type": "array",
                "items": {"type": "string", "enum": ["reasoning.encrypted_content"]},
            },
            "conversation": {
                "oneOf": [
                    conv_ref,
                    _obj({"id": conv_ref}, ("id",), closed=True),
                ]
            },
            "previous_response_id": {"type": "string", "pattern": r"^resp_[0-9a-f]{40}$"},
            "tools": {"type": "array", "maxItems": 128, "items": function_tool},
        },
        ("model", "input"),
        closed=True,
    )
    create_response["not"] = {"required": ["conversation", "previous_response_id"]}
    chat_message = _obj(
        {"role": {"type": "string", "enum": ["system", "developer", "user"]}, "content": text},
        ("role", "content"),
        closed=True,
    )
    chat_request = _obj(
        {
            "model": model,
            "messages": {
                "type": "array",
                "minItems": 1,
                "items": chat_message,
                # the last message is the user's: what the turn answers
                "contains": _obj({"role": {"const": "user"}}),
            },
            "stream": {"type": "boolean"},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
            "max_tokens": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
            "seed": {"type": "integer", "minimum": -(2**63) + 1, "maximum": 2**63 - 1},
        },
        ("model", "messages"),
        closed=True,
    )
    conversation_body = _obj({"metadata": metadata}, closed=True)
    share_body = _obj(
        {
            "user": {
                "type": "string",
                "minLength": 1,
                "maxLength": 256,
                "pattern": _USER_PATTERN,
            },
            "access": {"type": "string", "enum": ["read", "write", "none"]},
        },
        ("user", "access"),
        closed=True,
    )
    items_body = _obj(
        {"items": {"type": "array", "minItems": 1, "maxItems": 20, "items": user_message}},
        ("items",),
        closed=True,
    )
    conv_id = _path("conversation_id")
    resp_id = _path("response_id")
    item_id = _path("item_id")
    any_object: dict[str, Any] = {"type": "object"}
    response = _obj(
        {
            "id": {"type": "string"},
            "object": {"const": "response"},
            "status": {
                "type": "string",
                "enum": ["completed", "failed", "in_progress", "cancelled", "queued", "incomplete"],
            },
            "model": {"type": "string"},
            "output": {"type": "array", "items": any_object},
        },
        ("id", "object", "status", "model", "output"),
    )
    conversation = _obj(
        {"id": {"type": "string"}, "object": {"const": "conversation"}, "metadata": any_object},
        ("id", "object"),
    )
    listed = _obj(
        {
            "object": {"const": "list"},
            "data": {"type": "array", "items": any_object},
            "has_more": {"type": "boolean"},
        },
        ("object", "data"),
    )
    paths: dict[str, Any] = {
        "/": {
            "get": {
                "summary": "The chat page",
                "security": [],
                "responses": {
                    "200": {
                        "description": "HTML",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/healthz": {"get": _op("Liveness", _obj({"status": {"const": "ok"}}), public=True)},
        "/readyz": {
            "get": {
                "summary": "Readiness: the store and the tree answer",
                "security": [],
                "responses": {
                    "200": _json(_ref("Ready")),
                    "503": _json(_ref("Ready"), "Not ready: the problems are named"),
                },
            }
        },
        "/v1/models": {"get": _op("The served agents, as models", listed)},
        "/v1/responses": {
            "post": _op("Create a response (a turn)", response, body=create_response, stream=True)
        },
        "/v1/responses/{response_id}": {
            "get": _op(
                "Retrieve (or stream again) a response",
                response,
                parameters=[
                    resp_id,
                    _query("stream", {"type": "boolean"}),
                    _query("starting_after", {"type": "integer", "minimum": -1}),
                ],
                stream=True,
            ),
            "delete": _op(
                "Delete a response (its messages become tombstones)",
                _obj({"id": {"type": "string"}, "deleted": {"const": True}}, ("id", "deleted")),
                parameters=[resp_id],
            ),
        },
        "/v1/responses/{response_id}/cancel": {
            "post": _op("Cancel a running response", response, parameters=[resp_id])
        },
        "/v1/responses/{response_id}/input_items": {
            "get": _op("A response's input items", listed, parameters=[resp_id, *_PAGING])
        },
        "/v1/chat/completions": {
            "post": _op("A stateless chat completion", any_object, body=chat_request, stream=True)
        },
        "/v1/conversations": {
            "post": _op(
                "Create a conversation", conversation, body=conversation_body, required=False
            ),
            "get": _op("The caller's conversations", listed, parameters=_PAGING[:2]),
        },
        "/v1/conversations/{conversation_id}": {
            "get": _op("Retrieve a conversation", conversation, parameters=[conv_id]),
            "post": _op(
                "Update a conversation's metadata",
                conversation,
                parameters=[conv_id],
                body=conversation_body,
                required=False,
            ),
            "delete": _op(
                "Delete a conversation",
                _obj({"id": {"type": "string"}, "deleted": {"const": True}}, ("id", "deleted")),
                parameters=[conv_id],
            ),
        },
        "/v1/conversations/{conversation_id}/shares": {
            "get": _op("Who else reaches it", any_object, parameters=[conv_id]),
            "post": _op("Share it, or stop", any_object, parameters=[conv_id], body=share_body),
        },
        "/v1/conversations/{conversation_id}/items": {
            "get": _op("Its items", listed, parameters=[conv_id, *_PAGING]),
            "post": _op(
                "Append items (no model call)", listed, parameters=[conv_id], body=items_body
            ),
        },
        "/v1/conversations/{conversation_id}/items/{item_id}": {
            "get": _op("One item", any_object, parameters=[conv_id, item_id]),
            "delete": _op(
                "Delete an item (a tombstone)", conversation, parameters=[conv_id, item_id]
            ),
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "overstory",
            "version": "1",
            "description": "OpenAI-compatible Responses, Conversations and Chat Completions "
            "for the agents this door serves. Request bodies are described in their common "
            "form (a text input, plain messages); the door takes more — input item lists, "
            "tool calls and outputs, text.format, response_format — as the compatibility "
            "table in the docs says, parameter by parameter.",
        },
        "paths": paths,
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": _obj(
                    {
                        "error": _obj(
                            {
                                "message": {"type": "string"},
                                "type": {"type": "string"},
                                "param": {"type": ["string", "null"]},
                                "code": {"type": ["string", "null"]},
                            },
                            ("message", "type"),
                        )
                    },
                    ("error",),
                ),
                "Ready": _obj(
                    {"ready": {"type": "boolean"}, "problems": {"type": "array"}},
                    ("ready", "problems"),
                ),
            },
        },
    }
