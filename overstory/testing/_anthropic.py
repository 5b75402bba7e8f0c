"""The Anthropic Messages wire format for :class:`~overstory.testing.servers.AnthropicServer`.

Pure functions, no I/O: ``_anthropic_problem`` says why Anthropic would refuse a request
(with the message its 400 body names), ``_anthropic_answer`` builds the deterministic
``message`` object for a valid one, and ``_anthropic_fault`` and ``_anthropic_error``
render a :class:`~overstory.testing.servers.Fault` or a refusal as Anthropic's status and
error body (``_ANTHROPIC_TYPES`` maps a status to its error type and default message).
The server in :mod:`overstory.testing.servers` is a thin HTTP shell around them.
"""

from __future__ import annotations

import json
from typing import Any

from ..providers.schema import example_of
from ._common import (
    _TOOL_NAME,
    Fault,
    _Event,
    _match_rule,
    _pieces,
    _Problem,
    _Rules,
    _shaped,
    _tokens,
)

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


def _anthropic_overflow(tokens: int, window: int) -> tuple[int, Any]:
    """Anthropic's refusal of a prompt of ``tokens`` over a ``window``-token model."""
    message = f"prompt is too long: {tokens} tokens > {window} maximum"
    return 400, _anthropic_error("invalid_request_error", message)


def _anthropic_fault(fault: Fault) -> tuple[int, Any]:
    if fault.body is not None:
        return fault.status, fault.body
    if fault.kind == "context_overflow":
        return _anthropic_overflow(250_000, 200_000)
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
    if not isinstance(body.get("stream", False), bool):
        return _Problem("stream: Input should be a valid boolean")
    for key in ("model", "max_tokens", "messages"):
        if key not in body:
            return _Problem(f"{key}: Field required")
    if not isinstance(body["model"], str) or not body["model"]:
        return _Problem(f"model: Input should be a non-empty string (got {body['model']!r})")
    max_tokens = body["max_tokens"]
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return _Problem(f"max_tokens: Input should be an integer >= 1 (got {max_tokens!r})")
    t = body.get("temperature")
    if t is not None and (isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t <= 1):
        return _Problem(f"temperature: Input should be less than or equal to 1 (got {t!r})")
    stops = body.get("stop_sequences")
    if stops is not None and not (
        isinstance(stops, list) and all(isinstance(x, str) and x.strip() for x in stops)
    ):
        return _Problem("stop_sequences: Input should be a valid list of non-empty strings")
    if "seed" in body:
        return _Problem("seed: Extra inputs are not permitted")
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
    user_text = _anthropic_text(user["content"]) if user else ""
    if results:
        text = "tool results: " + "; ".join(_anthropic_text(b.get("content", "")) for b in results)
    else:
        call = _match_rule(user_text, rules, offered)
        text = f"echo: {user_text}"
    raw_choice = body.get("tool_choice")
    choice: dict[str, Any] = raw_choice if isinstance(raw_choice, dict) else {}
    forced = choice.get("name") if choice.get("type") == "tool" else None
    if choice.get("type") == "any" and call is None and offered:
        forced = offered[-1]  # made to call a tool, with none of its rules matching
    if forced is not None:  # the forced tool's input is an instance of its schema
        schema: Any = next(
            (t.get("input_schema", {}) for t in body["tools"] if t.get("name") == forced), {}
        )
        call = (forced, example_of(schema, text))
    text, cut, matched = _shaped(text, body.get("stop_sequences"), body.get("max_tokens"))
    reason = {"stop": "stop_sequence", "length": "max_tokens"}.get(cut or "", "end_turn")
    if call is None:
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]
        out = min(_tokens(len(text)), body["max_tokens"])  # never billed past the cap
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
        "stop_reason": reason if call is None else "tool_use",
        "stop_sequence": matched if call is None else None,
        "usage": {
            "input_tokens": _tokens(chars),
            "output_tokens": out,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }


def _anthropic_stream(message: dict[str, Any], piece: int) -> list[_Event]:
    """``message`` as the events the Messages API streams: ``message_start`` (input
    usage), per content block a start, its deltas (text, or the tool input's JSON in
    ``piece``-character ``input_json_delta`` s) and a stop, a ``ping``, then
    ``message_delta`` (stop reason, output usage) and ``message_stop``."""
    usage = message["usage"]
    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**usage, "output_tokens": 1},
    }
    events = [
        _Event("message_start", {"type": "message_start", "message": start}),
        _Event("ping", {"type": "ping"}),
    ]
    for i, block in enumerate(message["content"]):
        opened: dict[str, Any]
        if block["type"] == "text":
            opened = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": p} for p in _pieces(block["text"], piece)]
        else:
            opened = {**block, "input": {}}
            raw = json.dumps(block["input"])
            deltas = [{"type": "input_json_delta", "partial_json": p} for p in _pieces(raw, piece)]
        events.append(
            _Event(
                "content_block_start",
                {"type": "content_block_start", "index": i, "content_block": opened},
            )
        )
        events += [
            _Event(
                "content_block_delta",
                {"type": "content_block_delta", "index": i, "delta": d},
                content=True,
            )
            for d in deltas
        ]
        events.append(_Event("content_block_stop", {"type": "content_block_stop", "index": i}))
    events.append(
        _Event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {
                    "stop_reason": message["stop_reason"],
                    "stop_sequence": message.get("stop_sequence"),
                },
                "usage": {"output_tokens": usage["output_tokens"]},
            },
        )
    )
    events.append(_Event("message_stop", {"type": "message_stop"}))
    return events


def _anthropic_stream_error(fault: Fault) -> _Event:
    """The ``error`` event Anthropic sends inside a stream that breaks (e.g. overloaded)."""
    return _Event("error", _anthropic_fault(fault)[1])
