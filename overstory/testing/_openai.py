"""The OpenAI Chat Completions wire format for :class:`~overstory.testing.servers.OpenAIServer`.

Pure functions, no I/O: ``_openai_problem`` says why OpenAI would refuse a request (with
the ``message``, ``param`` and ``code`` its 400 body names), ``_openai_answer`` builds the
deterministic ``chat.completion`` for a valid one, and ``_openai_fault`` and
``_openai_error`` render a :class:`~overstory.testing.servers.Fault` or a refusal as
OpenAI's status and error body. The server in :mod:`overstory.testing.servers` is a thin
HTTP shell around them.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable
from typing import Any

from ..providers.schema import example_of
from ._common import (
    _TOOL_NAME,
    Fault,
    _Event,
    _json_type,
    _match_rule,
    _pieces,
    _Problem,
    _Rules,
    _shaped,
    _tokens,
)

_OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def _openai_error(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _openai_overflow(tokens: int, window: int) -> tuple[int, Any]:
    """OpenAI's refusal of a prompt of ``tokens`` over a ``window``-token model."""
    message = (
        f"This model's maximum context length is {window} tokens. However, your messages "
        f"resulted in {tokens} tokens. Please reduce the length of the messages."
    )
    return 400, _openai_error(
        message, "invalid_request_error", "messages", "context_length_exceeded"
    )


def _openai_fault(fault: Fault) -> tuple[int, Any]:
    status = 503 if fault.kind == "overloaded" else fault.status
    if fault.body is not None:
        return status, fault.body
    if fault.kind == "context_overflow":
        return _openai_overflow(250_000, 128_000)
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


def _openai_settings_problem(body: dict[str, Any]) -> _Problem | None:
    """Why OpenAI would refuse the request's sampling settings, or None."""
    t = body.get("temperature")
    if t is not None:
        if isinstance(t, bool) or not isinstance(t, int | float):
            return _Problem(
                f"Invalid type for 'temperature': expected a decimal, but got {_json_type(t)} "
                "instead.",
                "temperature",
                "invalid_type",
            )
        if not 0 <= t <= 2:
            return _Problem(
                f"Invalid 'temperature': decimal above maximum value. Expected a value <= 2, "
                f"but got {t} instead.",
                "temperature",
                "decimal_above_max_value",
            )
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str)
        or (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(x, str) for x in stop))
    ):
        return _Problem("Invalid 'stop': expected a string or an array of up to 4 strings.", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        return _Problem("Invalid type for 'seed': expected an integer.", "seed", "invalid_type")
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind not in ("text", "json_object", "json_schema"):
            return _Problem(
                "Invalid 'response_format.type': expected one of 'text', 'json_object' or "
                f"'json_schema', got {kind!r}.",
                "response_format.type",
            )
        spec = fmt.get("json_schema")
        if kind == "json_schema" and not (
            isinstance(spec, dict)
            and isinstance(spec.get("name"), str)
            and isinstance(spec.get("schema", {}), dict)
        ):
            return _Problem(
                "Missing required parameter: 'response_format.json_schema' (with a 'name' "
                "and a 'schema' object).",
                "response_format.json_schema",
            )
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            return _Problem(f"Invalid '{key}': expected an integer >= 1, got {value!r}.", key)
    return None


def _openai_problem(body: Any) -> _Problem | None:
    """Why OpenAI would refuse this chat completion request, or None."""
    if not isinstance(body, dict):
        return _Problem(
            "We could not parse the JSON body of your request. The OpenAI API expects a JSON "
            "payload, but what was sent was not valid JSON."
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        return _Problem(
            f"Invalid type for 'stream': expected a boolean, but got {_json_type(stream)} instead.",
            "stream",
            "invalid_type",
        )
    if "stream_options" in body:
        options = body["stream_options"]
        if not stream:
            return _Problem(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                "stream_options",
            )
        if not isinstance(options, dict) or not isinstance(
            options.get("include_usage", False), bool
        ):
            return _Problem(
                "Invalid type for 'stream_options.include_usage': expected a boolean.",
                "stream_options.include_usage",
                "invalid_type",
            )
    problem = _openai_settings_problem(body)
    if problem is not None:
        return problem
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


def _openai_stream(answer: dict[str, Any], piece: int, include_usage: bool) -> list[_Event]:
    """``answer`` (a chat.completion) as the ``chat.completion.chunk`` s OpenAI streams: a
    role chunk, the text in ``piece``-character deltas, each tool call's id and name then
    its arguments in pieces, the finish chunk, and (``include_usage``) a last chunk with
    no choices and the usage; every chunk has ``usage: null`` before it."""
    choice = answer["choices"][0]
    message = choice["message"]
    base = {
        "id": answer["id"],
        "object": "chat.completion.chunk",
        "created": answer["created"],
        "model": answer["model"],
        "system_fingerprint": None,
        **({"usage": None} if include_usage else {}),
    }

    def chunk(delta: dict[str, Any], finish: str | None = None, content: bool = False) -> _Event:
        data = {
            **base,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        return _Event(None, data, content)

    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    events += [
        chunk({"content": p}, content=True) for p in _pieces(message["content"] or "", piece)
    ]
    for i, call in enumerate(message.get("tool_calls") or ()):
        fn = call["function"]
        head = {"index": i, "id": call["id"], "type": "function"}
        events.append(
            chunk({"tool_calls": [{**head, "function": {"name": fn["name"], "arguments": ""}}]})
        )
        events += [
            chunk({"tool_calls": [{"index": i, "function": {"arguments": p}}]}, content=True)
            for p in _pieces(fn["arguments"], piece)
        ]
    events.append(chunk({}, choice["finish_reason"]))
    if include_usage:
        events.append(_Event(None, {**base, "choices": [], "usage": answer["usage"]}))
    return events


def _openai_stream_error(fault: Fault) -> _Event:
    """The error OpenAI sends inside a stream that breaks: a ``data:`` line holding only
    an ``error`` object (what the SDK raises as ``APIError``)."""
    return _Event(None, _openai_fault(fault)[1])


#: What ends an OpenAI stream.
_OPENAI_DONE = _Event(None, "[DONE]")


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
    fmt = body.get("response_format") or {}
    if call is None and fmt.get("type") == "json_schema":  # the answer is an instance of it
        text = json.dumps(example_of(fmt["json_schema"].get("schema", {}), text))
    cap = body.get("max_completion_tokens", body.get("max_tokens"))
    text, cut, _ = _shaped(text, body.get("stop"), cap)
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
    if isinstance(cap, int) and not isinstance(cap, bool):
        out = min(out, cap)  # a vendor never bills more than the cap it was given
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
                "finish_reason": "tool_calls" if call is not None else cut or "stop",
            }
        ],
        "usage": {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out},
        "system_fingerprint": None,
    }
