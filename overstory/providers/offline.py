"""A scripted, deterministic model that needs no key and no network.

It ships with the package so the demo and the tests run anywhere. Given the same
history it always gives the same answer:

* after tool returns, it summarises them (``add returned 7``);
* a user message matching one of its :class:`Rule` s becomes a tool call whose
  arguments are the pattern's named groups (pydantic coerces ``"3"`` to ``3``);
* directives at the start of a user message script the model for tests and demos:
  ``!sleep 0.5`` (delay, then go on with the rest), ``!fail why`` (a retryable
  :class:`ModelError`), ``!fatal why`` (a non-retryable one),
  ``!tool NAME {"json": "args"}`` (call a tool once), ``!loop NAME {...}`` (call it on
  every round trip, to hit the agent's ``max_round_trips``), ``!crash why`` (raise a
  plain ``RuntimeError``: a bug escaping the turn machinery, which crashes the
  conversation — for supervision tests and chaos); with structured output asked for,
  ``!malformed`` answers JSON that matches no schema (to exercise the re-ask);
* anything else is echoed back with its position in the conversation.

Token usage is counted as characters / 4, so it is deterministic too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from ..exceptions import ConfigError, ModelError
from ..messages import (
    AssistantMessage,
    Message,
    ModelResponse,
    ToolCall,
    ToolReturn,
    Usage,
    UserMessage,
)
from .base import Model, ModelRequest, ModelSettings, StreamItem, traced_stream
from .schema import example_of
from .windows import Budget

__all__ = ["OfflineModel", "Rule"]

#: A word and the whitespace after it (leading whitespace, if any, is its own piece): the
#: pieces join back to exactly the text.
_WORDS = re.compile(r"\s+(?=\S)|\S+\s*|\s+")
_DIRECTIVE = re.compile(r"^!(?P<verb>sleep|fail|fatal|crash|tool|loop)\b[ \t]*(?P<rest>.*)", re.S)


@dataclass(frozen=True, slots=True)
class Rule:
    """When a user message matches ``pattern`` (``re.search``), call ``tool``.

    The tool's arguments are the pattern's named groups.
    """

    pattern: str
    tool: str

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise ConfigError(f"rule pattern {self.pattern!r} is not a regex: {exc}") from exc


class OfflineModel(Model):
    """The scripted offline model. ``latency_s`` delays every answer; ``fail_first``
    makes the first N requests fail (to exercise fallback and error paths);
    ``context_window`` (tokens, counted as characters / 4 like its usage) refuses a
    longer prompt with OpenAI's overflow error (``context_overflow``), as a vendor
    would. ``offline:NAME@WINDOW`` is the same from a model string."""

    def __init__(
        self,
        model: str = "echo",
        *,
        rules: Sequence[Rule] = (),
        latency_s: float = 0.0,
        fail_first: int = 0,
        context_window: int | None = None,
    ) -> None:
        if context_window is not None and (
            isinstance(context_window, bool)
            or not isinstance(context_window, int)
            or not 0 < context_window <= 100_000_000
        ):
            raise ConfigError(
                f"context_window must be an int of tokens > 0, got {context_window!r}"
            )
        if latency_s < 0:
            raise ConfigError(f"latency_s must be >= 0, got {latency_s}")
        if fail_first < 0:
            raise ConfigError(f"fail_first must be >= 0, got {fail_first}")
        self.model = model
        self.rules = tuple(rules)
        self.latency_s = latency_s
        self.fail_first = fail_first
        self.context_window = context_window
        self.requests = 0

    @property
    def name(self) -> str:
        return f"offline:{self.model}"

    def budget(self) -> Budget | None:
        return Budget.of(self.name, self.context_window)

    async def request(self, req: ModelRequest) -> ModelResponse:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        return await self._answer(req)

    def stream(self, req: ModelRequest) -> AsyncGenerator[StreamItem, None]:
        """Word by word (each word with the whitespace after it), ``latency_s`` spread
        evenly over the words; a tool call, which has no text, after all of it. In a
        ``chat`` span, as :meth:`call` is."""
        provider, _, model = self.name.partition(":")
        return traced_stream(self._words, provider, model, req)

    async def _words(self, req: ModelRequest) -> AsyncGenerator[StreamItem, None]:
        response = await self._answer(req)
        words = _WORDS.findall(response.content)
        pause = self.latency_s / max(1, len(words))
        if not words and self.latency_s:
            await asyncio.sleep(self.latency_s)
        for word in words:
            if pause:
                await asyncio.sleep(pause)
            yield word
        yield response

    async def _answer(self, req: ModelRequest) -> ModelResponse:
        """The scripted answer, at once (``request`` and ``stream`` add the latency),
        ended at the first ``stop`` sequence and cut to ``max_output_tokens``."""
        response = await self._scripted(req)
        forced = req.settings.forced()
        if forced is not None and req.tools and not response.tool_calls:
            response = _forced(response, req, forced)
        if req.output is not None and not response.tool_calls:
            response = _structured(response, req)
        return _settled(response, req.settings)

    async def _scripted(self, req: ModelRequest) -> ModelResponse:
        self.requests += 1
        if self.requests <= self.fail_first:
            raise ModelError(f"scripted failure {self.requests}/{self.fail_first}", model=self.name)
        self._fits(req)
        messages = req.messages
        user_index = next(
            (i for i in range(len(messages) - 1, -1, -1) if messages[i].kind == "user"), -1
        )
        if user_index < 0:
            raise ModelError("no user message to answer", model=self.name, retryable=False)
        user = messages[user_index]
        assert isinstance(user, UserMessage)
        text = user.content
        match = _DIRECTIVE.match(text)
        while match and match["verb"] == "sleep":
            delay, _, text = match["rest"].partition(" ")
            await asyncio.sleep(_seconds(delay, self.name))
            match = _DIRECTIVE.match(text)
        since_user = messages[user_index + 1 :]
        last = messages[-1]
        n_user = [m.kind for m in messages].count("user")
        prompt_chars = len(req.instructions) + sum(map(len, [m.content for m in messages]))

        if isinstance(last, ToolReturn) and not (match and match["verb"] == "loop"):
            return self._text(_summarise(since_user), prompt_chars)
        if req.settings.tool_choice == "none" and match and match["verb"] in ("tool", "loop"):
            match = None  # asked to answer without tools: the directive is text
        if match and match["verb"] == "crash":
            raise RuntimeError(f"scripted crash: {match['rest'].strip() or 'no reason given'}")
        if match and match["verb"] in ("fail", "fatal"):
            raise ModelError(
                f"scripted {match['verb']}: {match['rest'].strip() or 'no reason given'}",
                model=self.name,
                retryable=match["verb"] == "fail",
            )
        if match and match["verb"] in ("tool", "loop"):
            name, _, raw = match["rest"].strip().partition(" ")
            try:
                arguments = json.loads(raw) if raw.strip() else {}
            except json.JSONDecodeError as exc:
                raise ModelError(
                    f"!{match['verb']} arguments are not JSON: {exc}",
                    model=self.name,
                    retryable=False,
                ) from exc
            return self._call(name, arguments, last.seq, prompt_chars)
        for rule in self.rules if req.settings.tool_choice != "none" else ():
            found = re.search(rule.pattern, text)
            if found:
                return self._call(rule.tool, found.groupdict(), last.seq, prompt_chars)
        return self._text(f"echo #{n_user}: {text}", prompt_chars)

    def _fits(self, req: ModelRequest) -> None:
        """Refuse a prompt longer than the window, as OpenAI does (its code and wording)."""
        if self.context_window is None:
            return
        texts = [req.instructions, *(m.content for m in req.messages)]
        texts += [
            json.dumps(c.arguments)
            for m in req.messages
            if isinstance(m, AssistantMessage)
            for c in m.tool_calls
        ]
        tokens = sum(len(t) for t in texts) // 4 + 3 * len(req.messages)
        if tokens > self.context_window:
            raise ModelError(
                f"This model's maximum context length is {self.context_window} tokens. "
                f"However, your messages resulted in {tokens} tokens. Please reduce the "
                "length of the messages.",
                model=self.name,
                kind="context_overflow",
                status=400,
            )

    def _text(self, content: str, prompt_chars: int) -> ModelResponse:
        return ModelResponse(
            content=content,
            usage=Usage(prompt_chars // 4 + 1, len(content) // 4 + 1),
            model=self.name,
        )

    def _call(self, tool: str, arguments: object, seq: int, prompt_chars: int) -> ModelResponse:
        call = ToolCall(
            id=f"call_{seq + 1}_0",
            name=tool,
            arguments=arguments if isinstance(arguments, dict) else {"value": arguments},
        )
        return ModelResponse(
            tool_calls=(call,),
            usage=Usage(prompt_chars // 4 + 1, 8),
            model=self.name,
            finish_reason="tool_calls",
        )


def _forced(response: ModelResponse, req: ModelRequest, forced: str) -> ModelResponse:
    """A call instead of ``response``'s text, as ``tool_choice`` demands: to the tool
    it names (``required``: the first offered), its arguments an instance of the
    tool's schema built from the text."""
    tool = next((t for t in req.tools if forced in ("required", t.name)), req.tools[0])
    arguments = example_of(tool.parameters, response.content)
    seq = req.messages[-1].seq if req.messages else -1
    call = ToolCall(
        id=f"call_{seq + 1}_0",
        name=tool.name,
        arguments=arguments if isinstance(arguments, dict) else {"value": arguments},
    )
    return dataclasses.replace(response, content="", tool_calls=(call,), finish_reason="tool_calls")


def _structured(response: ModelResponse, req: ModelRequest) -> ModelResponse:
    """The answer as JSON matching ``req.output``'s schema (an instance built from it,
    its strings the user's last message); ``!malformed`` in that message answers JSON
    that matches no schema, once — the re-ask that follows is another user message."""
    assert req.output is not None
    user = next((m for m in reversed(req.messages) if isinstance(m, UserMessage)), None)
    text = user.content if user is not None else ""
    if text.startswith("!malformed"):
        content = json.dumps({"malformed": True})
    else:
        content = json.dumps(example_of(req.output.schema, response.content))
    return dataclasses.replace(response, content=content)


def _settled(response: ModelResponse, settings: ModelSettings) -> ModelResponse:
    """``response`` as the settings shape it, as a vendor would: the text ends before
    the first stop sequence (finish ``stop``) and holds at most ``max_output_tokens``
    (4 characters each; finish ``length``)."""
    text, finish = response.content, response.finish_reason
    for stop in settings.stop:
        at = text.find(stop)
        if at >= 0:
            text, finish = text[:at], "stop"
    cap = settings.max_output_tokens
    if cap is not None and len(text) > cap * 4:
        text, finish = text[: cap * 4], "length"
    out = response.usage.output_tokens if text == response.content else len(text) // 4 + 1
    if cap is not None:
        out = min(out, cap)  # never more than the cap, which is what a quota reserved
    if (text, finish, out) == (
        response.content,
        response.finish_reason,
        response.usage.output_tokens,
    ):
        return response
    usage = Usage(response.usage.input_tokens, out)
    return dataclasses.replace(response, content=text, finish_reason=finish, usage=usage)


def _seconds(raw: str, model: str) -> float:
    try:
        value = float(raw)
    except ValueError as exc:
        raise ModelError(
            f"!sleep needs seconds, got {raw!r}", model=model, retryable=False
        ) from exc
    if not 0 <= value <= 600:
        raise ModelError(
            f"!sleep seconds must be in [0, 600], got {value}", model=model, retryable=False
        )
    return value


def _summarise(turn: Sequence[Message]) -> str:
    start = max((i for i, m in enumerate(turn) if isinstance(m, AssistantMessage)), default=-1)
    parts = []
    for m in turn[start + 1 :]:
        if isinstance(m, ToolReturn):
            verb = "failed" if m.is_error else "returned"
            parts.append(f"{m.tool_name} {verb} {m.content}")
    return "; ".join(parts) or "done"
