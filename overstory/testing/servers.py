"""Loopback HTTP servers that speak the OpenAI and Anthropic wire formats.

The official async SDKs talk to them over real HTTP, so tests, benchmarks and docs
exercise the same code path as production without a key or the network::

    with OpenAIServer() as server:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="sk-test")
        server.script(Fault.rate_limited(retry_after=2))   # the next request gets a 429
        ...

Run one by hand with ``python -m overstory.testing.servers openai --port 8000``.

Each server validates requests the way its vendor does (required fields, roles, tool
results answering the tool calls of the message just before) and answers 400 with a
vendor-shaped body naming the problem, so translation bugs in client code surface
here. Valid requests get deterministic answers:

* tool results at the end of the conversation -> ``"tool results: " + "; ".join(...)``;
* a last user message matching one of ``rules`` (``re.search``) whose tool was offered
  -> a call of that tool whose arguments are the pattern's named groups;
* anything else -> ``"echo: <last user text>"``.

Usage counts characters: input = request text // 4 + 1, output = answer // 4 + 1.
Streaming is not supported (400). A :class:`Fault` scripts a failure; each server
renders it in its vendor's shape (``Fault.overloaded()`` is 529 for Anthropic and 503
for OpenAI).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, Literal, Self

from aiohttp import web

from ..exceptions import ConfigError, UsageError

__all__ = [
    "DEFAULT_RULES",
    "AnthropicServer",
    "Fault",
    "FaultKind",
    "OpenAIServer",
    "Recorded",
    "WireServer",
    "main",
]

DEFAULT_RULES: tuple[tuple[str, str], ...] = (
    (r"what is (?P<a>-?\d+) \+ (?P<b>-?\d+)", "add"),
    (r"how many words are in '(?P<text>[^']*)'", "word_count"),
)

FaultKind = Literal[
    "custom",
    "rate_limited",
    "overloaded",
    "server_error",
    "unauthorized",
    "bad_request",
    "context_overflow",
    "stall",
    "malformed",
]

_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_Rules = Sequence[tuple[re.Pattern[str], str]]  # (compiled pattern, tool name)


def _seconds(value: float) -> str:
    """Seconds as the vendors write them in ``retry-after``: ``"2"``, or ``"0.5"``."""
    return str(int(value)) if float(value).is_integer() else str(value)


@dataclass(frozen=True)
class Fault:
    """One scripted failure; the server renders status and body in its vendor's shape.

    After sleeping ``stall_s``: a ``malformed`` fault answers 200 with a body that is not
    JSON; a fault with status 200 and no ``body`` answers normally (a slow answer);
    anything else answers ``status`` with ``body``, or with the vendor's error body for
    the status (and ``message``) when ``body`` is None. ``headers`` go on the response.
    """

    status: int = 500
    body: Any = field(default=None, hash=False)  # JSON-able; None: the vendor's error body
    headers: Mapping[str, str] = field(default_factory=dict, hash=False)
    stall_s: float = 0.0
    malformed: bool = False
    kind: FaultKind = "custom"
    message: str | None = None

    def __post_init__(self) -> None:
        if not 200 <= self.status <= 599:
            raise ConfigError(f"a fault's status must be 200..599, got {self.status!r}")
        if self.stall_s < 0:
            raise ConfigError(f"a fault's stall_s must be >= 0, got {self.stall_s!r}")

    @classmethod
    def rate_limited(cls, retry_after: float | None = 1.0) -> Fault:
        """429, with ``retry-after`` (seconds) when given."""
        headers = {} if retry_after is None else {"retry-after": _seconds(retry_after)}
        return cls(status=429, headers=headers, kind="rate_limited")

    @classmethod
    def overloaded(cls, retry_after: float | None = None) -> Fault:
        """Anthropic: 529 ``overloaded_error``; OpenAI: 503."""
        headers = {} if retry_after is None else {"retry-after": _seconds(retry_after)}
        return cls(status=529, headers=headers, kind="overloaded")

    @classmethod
    def server_error(cls) -> Fault:
        return cls(status=500, kind="server_error")

    @classmethod
    def unauthorized(cls) -> Fault:
        return cls(status=401, kind="unauthorized")

    @classmethod
    def bad_request(cls, message: str = "invalid request") -> Fault:
        return cls(status=400, kind="bad_request", message=message)

    @classmethod
    def context_overflow(cls) -> Fault:
        """400 with the vendor's own prompt-too-long body."""
        return cls(status=400, kind="context_overflow")

    @classmethod
    def stall(cls, seconds: float) -> Fault:
        """Answer normally, ``seconds`` late: a client with a shorter timeout times out."""
        return cls(status=200, stall_s=seconds, kind="stall")

    @classmethod
    def malformed_body(cls) -> Fault:
        """200 with ``content-type: application/json`` and a truncated JSON body."""
        return cls(status=200, malformed=True, kind="malformed")


@dataclass(frozen=True)
class Recorded:
    """One request as the server received it."""

    path: str
    headers: Mapping[str, str]  # lower-cased names
    body: Any  # the parsed JSON, or the raw text when it was not JSON
    api_key: str  # "" when none was sent
    at: float = field(default_factory=time.time)  # wall-clock arrival time


@dataclass(frozen=True)
class _Problem:
    """Why a request is refused: the message, and (OpenAI only) ``param`` and ``code``."""

    message: str
    param: str | None = None
    code: str | None = None
    status: int = 400


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)


def _tokens(chars: int) -> int:
    return chars // 4 + 1


def _match_rule(
    text: str, rules: _Rules, offered: Iterable[str]
) -> tuple[str, dict[str, Any]] | None:
    """The first rule whose pattern matches ``text`` and whose tool was offered."""
    names = set(offered)
    for pattern, tool in rules:
        match = pattern.search(text)
        if match is not None and tool in names:
            return tool, dict(match.groupdict())
    return None


# --- OpenAI Chat Completions -------------------------------------------------------------

_OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def _openai_error(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _openai_fault(fault: Fault) -> tuple[int, Any]:
    status = 503 if fault.kind == "overloaded" else fault.status
    if fault.body is not None:
        return status, fault.body
    if fault.kind == "context_overflow":
        message = (
            "This model's maximum context length is 128000 tokens. However, your messages "
            "resulted in 250000 tokens. Please reduce the length of the messages."
        )
        return 400, _openai_error(
            message, "invalid_request_error", "messages", "context_length_exceeded"
        )
    type_, message, code = "invalid_request_error", f"HTTP {status}", None
    if status == 400:
        message = "invalid request"
    elif status == 401:
        message, code = "Incorrect API key provided.", "invalid_api_key"
    elif status == 404:
        message = "The requested resource does not exist."
    elif status == 429:
        type_, code = "requests", "rate_limit_exceeded"
        message = "Rate limit reached for requests. Please try again later."
    elif status == 503:
        type_, message = (
            "server_error",
            "The engine is currently overloaded, please try again later",
        )
    elif status >= 500:
        type_ = "server_error"
        message = "The server had an error while processing your request. Sorry about that!"
    return status, _openai_error(fault.message or message, type_, None, code)


def _openai_text(content: Any) -> str:
    """The text of a message's ``content``: a string, or the text of its parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def _openai_content_problem(content: Any, where: str) -> _Problem | None:
    if isinstance(content, str):
        return None
    if not isinstance(content, list):
        return _Problem(
            f"Invalid type for '{where}': expected one of a string or array of objects, "
            f"but got {_json_type(content)} instead.",
            where,
            "invalid_type",
        )
    for k, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            return _Problem(
                f"Missing required parameter: '{where}[{k}].type'.", f"{where}[{k}].type"
            )
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            return _Problem(
                f"Missing required parameter: '{where}[{k}].text'.", f"{where}[{k}].text"
            )
    return None


def _openai_tools_problem(tools: Any) -> _Problem | None:
    if not isinstance(tools, list):
        return _Problem(
            f"Invalid type for 'tools': expected an array, but got {_json_type(tools)} instead.",
            "tools",
            "invalid_type",
        )
    for j, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else tool
            return _Problem(
                f"Invalid value: {kind!r}. Supported values are: 'function' and 'custom'.",
                f"tools[{j}].type",
                "invalid_value",
            )
        fn = tool.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            return _Problem(
                f"Missing required parameter: 'tools[{j}].function.name'.",
                f"tools[{j}].function.name",
                "missing_required_parameter",
            )
        if not _TOOL_NAME.fullmatch(name):
            return _Problem(
                f"Invalid 'tools[{j}].function.name': string does not match pattern. Expected a "
                f"string that matches the pattern '^[a-zA-Z0-9_-]+$', got {name!r}.",
                f"tools[{j}].function.name",
                "invalid_value",
            )
        params = fn.get("parameters") if isinstance(fn, dict) else None
        if params is not None and not isinstance(params, dict):
            return _Problem(
                f"Invalid type for 'tools[{j}].function.parameters': expected an object, but "
                f"got {_json_type(params)} instead.",
                f"tools[{j}].function.parameters",
                "invalid_type",
            )
    return None


def _openai_unanswered(index: int, ids: Iterable[str]) -> _Problem:
    return _Problem(
        "An assistant message with 'tool_calls' must be followed by tool messages responding "
        "to each 'tool_call_id'. The following tool_call_ids did not have response messages: "
        + ", ".join(sorted(ids)),
        f"messages.[{index}].role",
    )


def _openai_message_problem(i: int, m: Any) -> _Problem | None:
    """What is wrong with one message on its own (pairing is checked by the caller)."""
    if not isinstance(m, dict):
        return _Problem(
            f"Invalid type for 'messages[{i}]': expected an object, but got {_json_type(m)} "
            "instead.",
            f"messages[{i}]",
            "invalid_type",
        )
    role = m.get("role")
    if role not in _OPENAI_ROLES:
        return _Problem(
            f"Invalid value: {role!r}. Supported values are: 'system', 'assistant', 'user', "
            "'function', 'tool', and 'developer'.",
            f"messages[{i}].role",
            "invalid_value",
        )
    content = m.get("content")
    calls = m.get("tool_calls")
    if role == "tool" and not isinstance(m.get("tool_call_id"), str):
        return _Problem(
            f"Missing required parameter: 'messages[{i}].tool_call_id'.",
            f"messages[{i}].tool_call_id",
            "missing_required_parameter",
        )
    if role == "assistant" and content is None:
        if not calls:
            return _Problem(
                "Invalid value for 'content': expected a string, got null.",
                f"messages.[{i}].content",
            )
    elif "content" not in m:
        return _Problem(
            f"Missing required parameter: 'messages[{i}].content'.",
            f"messages[{i}].content",
            "missing_required_parameter",
        )
    elif problem := _openai_content_problem(content, f"messages[{i}].content"):
        return problem
    if calls is None:
        return None
    if role != "assistant" or not isinstance(calls, list):
        return _Problem(f"Invalid 'messages[{i}].tool_calls'.", f"messages[{i}].tool_calls")
    for k, call in enumerate(calls):
        where = f"messages[{i}].tool_calls[{k}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call, dict) or not isinstance(call.get("id"), str):
            return _Problem(f"Missing required parameter: '{where}.id'.", f"{where}.id")
        if call.get("type") != "function" or not isinstance(fn, dict):
            return _Problem(f"Missing required parameter: '{where}.function'.", f"{where}.function")
        if not isinstance(fn.get("name"), str):
            return _Problem(
                f"Missing required parameter: '{where}.function.name'.", f"{where}.function.name"
            )
        if not isinstance(fn.get("arguments"), str):
            return _Problem(
                f"Invalid type for '{where}.function.arguments': expected a string, but got "
                f"{_json_type(fn.get('arguments'))} instead.",
                f"{where}.function.arguments",
                "invalid_type",
            )
    return None


def _openai_problem(body: Any) -> _Problem | None:
    """Why OpenAI would refuse this chat completion request, or None."""
    if not isinstance(body, dict):
        return _Problem(
            "We could not parse the JSON body of your request. The OpenAI API expects a JSON "
            "payload, but what was sent was not valid JSON."
        )
    if body.get("stream"):
        return _Problem("streaming not supported by this test server", "stream")
    model = body.get("model")
    if model is None:
        return _Problem("you must provide a model parameter")
    if not isinstance(model, str) or not model:
        return _Problem(f"Invalid 'model': expected a non-empty string, got {model!r}.", "model")
    messages = body.get("messages")
    if messages is None:
        return _Problem(
            "Missing required parameter: 'messages'.", "messages", "missing_required_parameter"
        )
    if not isinstance(messages, list) or not messages:
        return _Problem(
            "Invalid 'messages': expected a non-empty array of objects, got "
            f"{_json_type(messages) if messages != [] else 'an empty array'}.",
            "messages",
            "empty_array" if messages == [] else "invalid_type",
        )
    if "tools" in body and (problem := _openai_tools_problem(body["tools"])):
        return problem
    calls_at, expected, unanswered = 0, set[str](), set[str]()  # the last tool-calling message
    for i, m in enumerate(messages):
        if problem := _openai_message_problem(i, m):
            return problem
        if m["role"] == "tool":
            call_id = m["tool_call_id"]
            if not expected:
                return _Problem(
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    "preceeding message with 'tool_calls'.",
                    f"messages.[{i}].role",
                )
            if call_id not in unanswered:
                return _Problem(
                    f"Invalid parameter: 'tool_call_id' of {call_id!r} not found in "
                    "'tool_calls' of previous message.",
                    f"messages.[{i}].tool_call_id",
                )
            unanswered.discard(call_id)
            continue
        if unanswered:
            return _openai_unanswered(calls_at, unanswered)
        expected = {c["id"] for c in m.get("tool_calls") or ()}
        calls_at, unanswered = i, set(expected)
    return _openai_unanswered(calls_at, unanswered) if unanswered else None


def _openai_answer(body: dict[str, Any], model: str, rules: _Rules, n: int) -> dict[str, Any]:
    """The chat.completion object answering a valid request."""
    messages: list[dict[str, Any]] = body["messages"]
    chars = sum(
        len(_openai_text(m.get("content")))
        + sum(len(c["function"]["arguments"]) for c in m.get("tool_calls") or ())
        for m in messages
    )
    trailing = list(itertools.takewhile(lambda m: m["role"] == "tool", reversed(messages)))
    user = next((m for m in reversed(messages) if m["role"] == "user"), None)
    offered = [t["function"]["name"] for t in body.get("tools") or ()]
    if body.get("tool_choice") == "none":
        offered = []
    call = None
    if trailing:
        text = "tool results: " + "; ".join(_openai_text(m["content"]) for m in reversed(trailing))
    else:
        user_text = _openai_text(user["content"]) if user else ""
        call = _match_rule(user_text, rules, offered)
        text = f"echo: {user_text}"
    message: dict[str, Any] = {
        "role": "assistant",
        "content": text,
        "refusal": None,
        "annotations": [],
    }
    if call is not None:
        made = sum(len(m.get("tool_calls") or ()) for m in messages)
        arguments = json.dumps(call[1])
        message["content"] = None
        message["tool_calls"] = [
            {
                "id": f"call_{made + 1}",
                "type": "function",
                "function": {"name": call[0], "arguments": arguments},
            }
        ]
        out = _tokens(len(call[0]) + len(arguments))
    else:
        out = _tokens(len(text))
    prompt = _tokens(chars)
    return {
        "id": f"chatcmpl-{n}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": "stop" if call is None else "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out},
        "system_fingerprint": None,
    }


# --- Anthropic Messages ------------------------------------------------------------------

_ANTHROPIC_TYPES = {
    400: ("invalid_request_error", "invalid request"),
    401: ("authentication_error", "invalid x-api-key"),
    403: (
        "permission_error",
        "Your API key does not have permission to use the specified resource.",
    ),
    404: ("not_found_error", "Not found"),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: (
        "rate_limit_error",
        "This request would exceed your organization's rate limit. Please try again later.",
    ),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}
_ANTHROPIC_BLOCKS = (
    "text", "image", "document", "search_result", "tool_use", "tool_result", "thinking",
    "redacted_thinking", "server_tool_use", "web_search_tool_result",
)  # fmt: skip


def _anthropic_error(type_: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": type_, "message": message}}


def _anthropic_fault(fault: Fault) -> tuple[int, Any]:
    if fault.body is not None:
        return fault.status, fault.body
    if fault.kind == "context_overflow":
        message = "prompt is too long: 250000 tokens > 200000 maximum"
        return 400, _anthropic_error("invalid_request_error", message)
    default = (
        ("api_error", "Internal server error")
        if fault.status >= 500
        else ("invalid_request_error", f"HTTP {fault.status}")
    )
    type_, message = _ANTHROPIC_TYPES.get(fault.status, default)
    return fault.status, _anthropic_error(type_, fault.message or message)


def _anthropic_text(content: Any) -> str:
    """The text of ``content``: a string, or the text of its text blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            b["text"]
            for b in content
            if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
        )
    return ""


def _anthropic_block_problem(where: str, role: str, block: Any) -> str | None:
    kind = block.get("type") if isinstance(block, dict) else None
    if kind not in _ANTHROPIC_BLOCKS:
        return (
            f"{where}: Input tag {kind!r} found using 'type' does not match any of the "
            f"expected tags: {', '.join(repr(t) for t in _ANTHROPIC_BLOCKS)}"
        )
    assert isinstance(block, dict)
    if kind == "text" and not isinstance(block.get("text"), str):
        return f"{where}.text.text: Field required"
    if kind == "tool_use":
        if role != "assistant":
            return f"{where}: `tool_use` blocks can only be in `assistant` messages"
        for key, ok in (("id", str), ("name", str), ("input", dict)):
            if not isinstance(block.get(key), ok):
                return f"{where}.tool_use.{key}: Input should be a valid {'dictionary' if ok is dict else 'string'}"
    if kind == "tool_result":
        if role != "user":
            return f"{where}: `tool_result` blocks can only be in `user` messages"
        if not isinstance(block.get("tool_use_id"), str):
            return f"{where}.tool_result.tool_use_id: Field required"
        if not isinstance(block.get("content", ""), str | list):
            return f"{where}.tool_result.content: Input should be a valid list"
    return None


def _anthropic_tools_problem(tools: Any) -> str | None:
    if not isinstance(tools, list):
        return "tools: Input should be a valid list"
    for j, tool in enumerate(tools):
        if not isinstance(tool, dict):
            return f"tools.{j}: Input should be a valid dictionary"
        if tool.get("type", "custom") != "custom":
            continue  # a server tool (web search, ...): not checked here
        name = tool.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            return f"tools.{j}.custom.name: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$' (got {name!r})"
        if not isinstance(tool.get("input_schema"), dict):
            return f"tools.{j}.custom.input_schema: Field required"
    return None


def _anthropic_messages_problem(messages: list[Any]) -> str | None:
    tool_uses: list[str] = []  # ids of the tool_use blocks in the previous message
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages.{i}: Input should be a valid dictionary"
        role = m.get("role")
        if role == "system":
            return (
                'messages: Unexpected role "system". The Messages API accepts a top-level '
                '`system` parameter, not "system" as an input message role.'
            )
        if role not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant' (got {role!r})"
        content = m.get("content")
        if content is None:
            return f"messages.{i}.content: Field required"
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            return f"messages.{i}.content: Input should be a valid list"
        for k, block in enumerate(blocks):
            if problem := _anthropic_block_problem(f"messages.{i}.content.{k}", role, block):
                return problem
        results = [b["tool_use_id"] for b in blocks if b["type"] == "tool_result"]
        if stray := [r for r in results if r not in tool_uses]:
            k = next(k for k, b in enumerate(blocks) if b.get("tool_use_id") == stray[0])
            return (
                f"messages.{i}.content.{k}: unexpected `tool_use_id` found in `tool_result` "
                f"blocks: {', '.join(stray)}. Each `tool_result` block must have a "
                "corresponding `tool_use` block in the previous message."
            )
        if missing := [t for t in tool_uses if t not in results]:
            return (
                f"messages.{i - 1}: `tool_use` ids were found without `tool_result` blocks "
                f"immediately after: {', '.join(missing)}. Each `tool_use` block must have a "
                "corresponding `tool_result` block in the next message."
            )
        tool_uses = [b["id"] for b in blocks if b["type"] == "tool_use"]
    return None


def _anthropic_problem(body: Any) -> _Problem | None:
    """Why Anthropic would refuse this Messages request, or None."""
    if not isinstance(body, dict):
        return _Problem("There was an issue with your request: the body is not a JSON object.")
    if body.get("stream"):
        return _Problem("streaming not supported by this test server")
    for key in ("model", "max_tokens", "messages"):
        if key not in body:
            return _Problem(f"{key}: Field required")
    if not isinstance(body["model"], str) or not body["model"]:
        return _Problem(f"model: Input should be a non-empty string (got {body['model']!r})")
    max_tokens = body["max_tokens"]
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return _Problem(f"max_tokens: Input should be an integer >= 1 (got {max_tokens!r})")
    if not isinstance(body["messages"], list):
        return _Problem("messages: Input should be a valid list")
    if not body["messages"]:
        return _Problem("messages: at least one message is required")
    system = body.get("system")
    if system is not None and not isinstance(system, str | list):
        return _Problem("system: Input should be a valid string or a list of text blocks")
    problem = _anthropic_messages_problem(body["messages"])
    if problem is None and "tools" in body:
        problem = _anthropic_tools_problem(body["tools"])
    return None if problem is None else _Problem(problem)


def _anthropic_answer(body: dict[str, Any], model: str, rules: _Rules, n: int) -> dict[str, Any]:
    """The message object answering a valid request."""
    messages: list[dict[str, Any]] = body["messages"]

    def blocks(m: dict[str, Any]) -> list[dict[str, Any]]:
        content = m["content"]
        return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)

    chars = len(_anthropic_text(body.get("system")))
    made = 0
    for m in messages:
        for b in blocks(m):
            chars += len(b.get("text", "")) if b["type"] == "text" else 0
            chars += len(_anthropic_text(b.get("content", ""))) if b["type"] == "tool_result" else 0
            chars += len(json.dumps(b["input"])) if b["type"] == "tool_use" else 0
            made += b["type"] == "tool_use"
    last = messages[-1]
    results = (
        [b for b in blocks(last) if b["type"] == "tool_result"] if last["role"] == "user" else []
    )
    user = next((m for m in reversed(messages) if m["role"] == "user"), None)
    offered = [t["name"] for t in body.get("tools") or () if t.get("type", "custom") == "custom"]
    if isinstance(body.get("tool_choice"), dict) and body["tool_choice"].get("type") == "none":
        offered = []
    call = None
    if results:
        text = "tool results: " + "; ".join(_anthropic_text(b.get("content", "")) for b in results)
    else:
        user_text = _anthropic_text(user["content"]) if user else ""
        call = _match_rule(user_text, rules, offered)
        text = f"echo: {user_text}"
    if call is None:
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]
        out = _tokens(len(text))
    else:
        content = [
            {"type": "tool_use", "id": f"toolu_{made + 1}", "name": call[0], "input": call[1]}
        ]
        out = _tokens(len(call[0]) + len(json.dumps(call[1])))
    return {
        "id": f"msg_{n}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": "end_turn" if call is None else "tool_use",
        "stop_sequence": None,
        "usage": {
            "input_tokens": _tokens(chars),
            "output_tokens": out,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }


# --- the servers: thin I/O shells around the functions above -----------------------------

_Reply = tuple[int, Any, Mapping[str, str]]  # status, JSON body (or raw text), headers
_MALFORMED = '{"id": "broken", "choices": [{"index": 0, "mess'  # cut short: not JSON


def _bearer(headers: Mapping[str, str]) -> str:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class WireServer:
    """A loopback HTTP server speaking one vendor's wire format (see the module doc).

    ``start()`` serves from a daemon thread with its own event loop; ``serve_forever()``
    serves from the caller's loop. ``port=0`` picks a free port, kept across restarts.
    ``model`` overrides the model named in answers; ``latency_s`` delays every answer.
    ``script``, ``fail_always`` and ``reset`` may be called from any thread.
    """

    vendor: ClassVar[str] = ""
    _paths: ClassVar[tuple[str, ...]] = ()
    _base_path: ClassVar[str] = ""
    _request_id_header: ClassVar[str] = "x-request-id"

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        model: str | None = None,
        rules: Sequence[tuple[str, str]] = DEFAULT_RULES,
        latency_s: float = 0.0,
    ) -> None:
        if not self.vendor:
            raise UsageError("WireServer is a base class: use OpenAIServer or AnthropicServer")
        if not 0 <= port <= 65535:
            raise ConfigError(f"port must be 0..65535, got {port!r}")
        if latency_s < 0:
            raise ConfigError(f"latency_s must be >= 0, got {latency_s!r}")
        compiled: list[tuple[re.Pattern[str], str]] = []
        for pattern, tool in rules:
            try:
                compiled.append((re.compile(pattern), tool))
            except re.error as exc:
                raise ConfigError(f"rule pattern {pattern!r} is not a regex: {exc}") from exc
        self.host = host
        self.model = model
        self.latency_s = latency_s
        self.requests: list[Recorded] = []
        self._rules: _Rules = tuple(compiled)
        self._port = port
        self._lock = threading.Lock()
        self._script: deque[Fault] = deque()
        self._always: Fault | None = None
        self._count = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- vendor hooks (pure) -- #

    def _api_key(self, headers: Mapping[str, str]) -> str:
        raise NotImplementedError

    def _header_problem(self, headers: Mapping[str, str]) -> _Problem | None:
        raise NotImplementedError

    def _problem(self, body: Any) -> _Problem | None:
        raise NotImplementedError

    def _answer(self, body: dict[str, Any], model: str, n: int) -> dict[str, Any]:
        raise NotImplementedError

    def _fault(self, fault: Fault) -> tuple[int, Any]:
        raise NotImplementedError

    def _error(self, problem: _Problem) -> Any:
        raise NotImplementedError

    # -- the public handle -- #

    @property
    def port(self) -> int:
        if self._port == 0:
            raise UsageError(f"{type(self).__name__} has no port until it is started")
        return self._port

    @property
    def base_url(self) -> str:
        """What to pass as the SDK's ``base_url``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self._base_path}"

    def script(self, *faults: Fault) -> None:
        """The next ``len(faults)`` requests get these faults in order (after any still
        scripted); later requests are answered normally again."""
        with self._lock:
            self._script.extend(faults)

    def fail_always(self, fault: Fault | None) -> None:
        """Every request not taken by ``script`` gets ``fault``, until called with None."""
        with self._lock:
            self._always = fault

    def reset(self) -> None:
        """Forget the recorded requests, the script and ``fail_always``."""
        with self._lock:
            self.requests.clear()
            self._script.clear()
            self._always = None

    def start(self) -> Self:
        """Serve from a daemon thread; returns once the server is listening."""
        if self._thread is not None:
            raise UsageError(f"{self!r} is already running")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:  # reported to start()'s caller
                failure.append(exc)
                loop.close()
                ready.set()
                return
            self._loop = loop
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._close())
                loop.close()

        thread = threading.Thread(target=run, name=f"{type(self).__name__}", daemon=True)
        thread.start()
        ready.wait()
        if failure:
            thread.join()
            raise failure[0]
        self._thread = thread
        return self

    def stop(self) -> None:
        """Stop serving (in-flight answers are given up to a second) and join the thread."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        self._thread = self._loop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def serve_forever(self) -> None:
        """Serve from the running event loop until cancelled."""
        await self._open()
        try:
            await asyncio.Event().wait()
        finally:
            await self._close()

    def __repr__(self) -> str:
        where = f"{self.host}:{self._port}" if self._port else self.host
        return f"{type(self).__name__}({where})"

    # -- I/O -- #

    async def _open(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self._port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._port = int(runner.addresses[0][1])
        self._runner = runner

    async def _close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", "replace")
        routed = request.method == "POST" and request.path in self._paths
        with self._lock:
            self.requests.append(Recorded(request.path, headers, body, self._api_key(headers)))
            n = next(self._count)
            fault = None
            if routed:
                fault = self._script.popleft() if self._script else self._always
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if fault is not None and fault.stall_s:
            await asyncio.sleep(fault.stall_s)
        status, payload, extra = self._reply(request.method, request.path, headers, body, fault, n)
        reply_headers = {self._request_id_header: f"req_{n}", **extra}
        if isinstance(payload, str):
            return web.Response(
                status=status, text=payload, content_type="application/json", headers=reply_headers
            )
        return web.json_response(payload, status=status, headers=reply_headers)

    def _reply(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: Any,
        fault: Fault | None,
        n: int,
    ) -> _Reply:
        """Status, payload and extra headers for one request (no I/O)."""
        if path not in self._paths:
            return 404, self._error(_Problem(f"Not found: {path}", status=404)), {}
        if method != "POST":
            refusal = _Problem(f"Method {method} not allowed", status=405)
            return 405, self._error(refusal), {"allow": "POST"}
        if fault is not None:
            if fault.malformed:
                return 200, _MALFORMED, fault.headers
            if fault.status != 200 or fault.body is not None:
                status, payload = self._fault(fault)
                return status, payload, fault.headers
        problem = self._header_problem(headers) or self._problem(body)
        if problem is not None:
            return problem.status, self._error(problem), {}
        return 200, self._answer(body, self.model or body["model"], n), {}


class OpenAIServer(WireServer):
    """``POST /v1/chat/completions`` (and ``/chat/completions``); base_url ends in /v1."""

    vendor = "openai"
    _paths = ("/v1/chat/completions", "/chat/completions")
    _base_path = "/v1"
    _request_id_header = "x-request-id"

    def _api_key(self, headers: Mapping[str, str]) -> str:
        return _bearer(headers)

    def _header_problem(self, headers: Mapping[str, str]) -> _Problem | None:
        if self._api_key(headers):
            return None
        message = "You didn't provide an API key. Provide it in an Authorization: Bearer header."
        return _Problem(message, status=401)

    def _problem(self, body: Any) -> _Problem | None:
        return _openai_problem(body)

    def _answer(self, body: dict[str, Any], model: str, n: int) -> dict[str, Any]:
        return _openai_answer(body, model, self._rules, n)

    def _fault(self, fault: Fault) -> tuple[int, Any]:
        return _openai_fault(fault)

    def _error(self, problem: _Problem) -> Any:
        type_ = "server_error" if problem.status >= 500 else "invalid_request_error"
        return _openai_error(problem.message, type_, problem.param, problem.code)


class AnthropicServer(WireServer):
    """``POST /v1/messages``; base_url is the bare origin, as the SDK expects."""

    vendor = "anthropic"
    _paths = ("/v1/messages",)
    _base_path = ""
    _request_id_header = "request-id"

    def _api_key(self, headers: Mapping[str, str]) -> str:
        # anthropic 2.x sends the key as a bearer token; older SDKs and curl use x-api-key.
        return headers.get("x-api-key") or _bearer(headers)

    def _header_problem(self, headers: Mapping[str, str]) -> _Problem | None:
        if not self._api_key(headers):
            return _Problem("x-api-key or authorization header is required", status=401)
        if not headers.get("anthropic-version"):
            return _Problem("anthropic-version: header is required")
        return None

    def _problem(self, body: Any) -> _Problem | None:
        return _anthropic_problem(body)

    def _answer(self, body: dict[str, Any], model: str, n: int) -> dict[str, Any]:
        return _anthropic_answer(body, model, self._rules, n)

    def _fault(self, fault: Fault) -> tuple[int, Any]:
        return _anthropic_fault(fault)

    def _error(self, problem: _Problem) -> Any:
        default = ("api_error", "") if problem.status >= 500 else ("invalid_request_error", "")
        type_ = _ANTHROPIC_TYPES.get(problem.status, default)[0]
        if problem.status == 405:
            type_ = "invalid_request_error"
        return _anthropic_error(type_, problem.message)


_SERVERS: dict[str, type[WireServer]] = {"openai": OpenAIServer, "anthropic": AnthropicServer}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m overstory.testing.servers {openai,anthropic} [--host H] [--port P]``."""
    parser = argparse.ArgumentParser(
        prog="python -m overstory.testing.servers",
        description="Serve a vendor's LLM wire format on loopback with deterministic answers.",
    )
    parser.add_argument("vendor", choices=sorted(_SERVERS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default=None, help="model named in answers")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    args = parser.parse_args(argv)
    server = _SERVERS[args.vendor](
        host=args.host, port=args.port, model=args.model, latency_s=args.latency
    )

    async def serve() -> None:
        stopped = asyncio.Event()
        with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
        await server._open()
        print(f"{server.vendor} wire format at {server.base_url} (Ctrl-C stops)", flush=True)
        try:
            await stopped.wait()
        finally:
            await server._close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
