"""PII redaction before text reaches a provider, and restoration in what comes back.

``Agent(..., redact_pii=True)``: before each model call, e-mail addresses, phone
numbers, payment card numbers (Luhn-checked), IBANs (checksum-checked) and secrets
(``sk-…`` and ``sk-ant-…`` API keys, AWS access key ids, GitHub tokens, JWTs,
``Bearer …`` credentials) in the instructions and the history become placeholders such
as ``<EMAIL_1>``; in the model's answer — its text, each streamed delta (a placeholder
split across deltas included) and the arguments of the tools it calls — placeholders are
restored before anything is stored, shown or run. The stored history keeps the original
text (encrypted at rest when that is on); the provider, its spans and its logs see only
placeholders.

Detection is Presidio's analyzer recognizers (pattern and checksum based: no NLP model,
nothing downloaded, works offline) plus recognizers of our own for secrets.

**Stable per conversation, stored nowhere.** Placeholders are numbered per kind in the
order values first appear in the conversation's history. The history is stored, so the
mapping is rebuilt from it at every call — the same value is the same placeholder in
every turn, after a restart and on any host — and no map of secrets is kept anywhere
(there is nothing to lose, and nothing extra to protect).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace
from typing import Any

from .messages import AssistantMessage, Message, ModelResponse, ToolCall, ToolReturn, UserMessage
from .providers.base import Model, ModelRequest, StreamItem

__all__ = ["Finding", "Placeholders", "RedactingModel", "Redactor", "Restorer", "redactor"]

#: Presidio entity -> our placeholder label.
_LABELS = {
    "EMAIL_ADDRESS": "EMAIL",
    "PHONE_NUMBER": "PHONE",
    "CREDIT_CARD": "CARD",
    "IBAN_CODE": "IBAN",
    "SECRET": "SECRET",
}
_PLACEHOLDER = re.compile(r"<(EMAIL|PHONE|CARD|IBAN|SECRET)_(\d{1,6})>")
#: What may still become a placeholder at the end of a streamed piece.
_PARTIAL = re.compile(r"<(?:[A-Z]{0,6}(?:_\d{0,6})?)?$")

#: Where a phone number may be: 7+ digits with separators between them.
_PHONE_CANDIDATE = re.compile(r"\+?\(?\d[\d\s().\-/]{5,22}\d")
#: Our secret patterns (score 1.0: a match is a secret; order: most specific first).
_SECRETS = (
    ("anthropic key", r"\bsk-ant-[A-Za-z0-9_\-]{20,}"),
    ("openai key", r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}"),
    ("aws access key id", r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b"),
    ("github token", r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b"),
    ("jwt", r"\beyJ[A-Za-z0-9_\-]{5,}\.eyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]{10,}"),
    ("bearer credential", r"(?<=\bBearer )[A-Za-z0-9._~+/\-]{16,}=*"),
)


@dataclass(frozen=True, slots=True)
class Finding:
    start: int
    end: int
    label: str  # EMAIL, PHONE, CARD, IBAN, SECRET


class Redactor:
    """Finds what to redact in a text (thread-safe; one per process, see :func:`redactor`).
    Results are cached per text (a conversation's history is scanned at every call)."""

    def __init__(self, cache_size: int = 20_000) -> None:
        import tldextract
        from presidio_analyzer import Pattern, PatternRecognizer
        from presidio_analyzer.predefined_recognizers import (
            CreditCardRecognizer,
            EmailRecognizer,
            IbanRecognizer,
            PhoneRecognizer,
        )

        # Presidio's card pattern predates Mastercard's 2221-2720 range; Luhn-checked alike.
        mastercard_2 = Pattern(
            "Mastercard 2-series",
            r"\b2(?:22[1-9]|2[3-9]\d|[3-6]\d\d|7[01]\d|720)[- ]?\d{4}[- ]?\d{4}[- ]?\d{4}\b",
            0.3,
        )
        # The public suffix list from the package's own snapshot: never a download.
        offline = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

        class OfflineEmailRecognizer(EmailRecognizer):  # type: ignore[misc]
            def validate_result(self, pattern_text: str) -> bool:
                return bool(offline(pattern_text.rpartition("@")[2]).fqdn)

        secrets = PatternRecognizer(
            supported_entity="SECRET",
            name="overstory secrets",
            patterns=[Pattern(name, regex, 1.0) for name, regex in _SECRETS],
            global_regex_flags=re.M,  # case matters in key prefixes
        )
        self._recognizers: list[Any] = [
            secrets,
            OfflineEmailRecognizer(),
            CreditCardRecognizer(patterns=[*CreditCardRecognizer.PATTERNS, mastercard_2]),
            IbanRecognizer(),
        ]
        self._phones = PhoneRecognizer()
        self._cache: OrderedDict[str, tuple[Finding, ...]] = OrderedDict()
        self._size = cache_size
        self._lock = threading.Lock()

    def find(self, text: str) -> tuple[Finding, ...]:
        """Non-overlapping findings in ``text``, in order (where two overlap, the longer
        wins; a secret wins over what it contains)."""
        if not text:
            return ()
        with self._lock:
            hit = self._cache.get(text)
            if hit is not None:
                self._cache.move_to_end(text)
                return hit
        found: list[tuple[int, int, int, str]] = []  # (start, -length, rank, label)
        for rank, recognizer in enumerate(self._recognizers):
            for result in recognizer.analyze(text, recognizer.supported_entities, None):
                label = _LABELS.get(result.entity_type)
                if label is not None and result.end > result.start:
                    found.append((result.start, -(result.end - result.start), rank, label))
        # Presidio's phone recognizer (libphonenumber, one pass per region) is the slow
        # one: it reads only the runs of digits that could be a number, with some context.
        rank = len(self._recognizers)
        for candidate in _PHONE_CANDIDATE.finditer(text):
            lo, hi = max(0, candidate.start() - 8), min(len(text), candidate.end() + 8)
            window = text[lo:hi]
            for result in self._phones.analyze(window, self._phones.supported_entities, None):  # type: ignore[arg-type]
                if result.end > result.start:
                    found.append((lo + result.start, -(result.end - result.start), rank, "PHONE"))
        chosen: list[Finding] = []
        for start, neg_length, _, label in sorted(set(found)):  # windows may overlap
            end = start - neg_length
            if chosen and start < chosen[-1].end:
                continue  # overlaps one already chosen (it started earlier or is longer)
            chosen.append(Finding(start, end, label))
        result_ = tuple(chosen)
        with self._lock:
            self._cache[text] = result_
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return result_


_REDACTOR: Redactor | None = None
_REDACTOR_LOCK = threading.Lock()


def redactor() -> Redactor:
    """The process's redactor (made on first use: importing Presidio takes a second)."""
    global _REDACTOR
    with _REDACTOR_LOCK:
        if _REDACTOR is None:
            _REDACTOR = Redactor()
        return _REDACTOR


class Placeholders:
    """One conversation's mapping, value <-> placeholder, numbered per label in order of
    first appearance (see the module doc)."""

    def __init__(self, finder: Redactor) -> None:
        self._finder = finder
        self.by_value: dict[str, str] = {}
        self.by_placeholder: dict[str, str] = {}
        self._counts: dict[str, int] = {}

    def redact(self, text: str) -> str:
        findings = self._finder.find(text)
        if not findings:
            return text
        out: list[str] = []
        at = 0
        for f in findings:
            value = text[f.start : f.end]
            placeholder = self.by_value.get(value)
            if placeholder is None:
                self._counts[f.label] = n = self._counts.get(f.label, 0) + 1
                placeholder = f"<{f.label}_{n}>"
                self.by_value[value] = placeholder
                self.by_placeholder[placeholder] = value
            out += [text[at : f.start], placeholder]
            at = f.end
        out.append(text[at:])
        return "".join(out)

    def restore(self, text: str) -> str:
        """Placeholders this conversation made, back to their values (others stay)."""
        if "<" not in text:
            return text
        return _PLACEHOLDER.sub(lambda m: self.by_placeholder.get(m.group(0), m.group(0)), text)

    def restore_value(self, value: Any) -> Any:
        """Restored inside a tool call's JSON arguments (strings, lists, objects)."""
        if isinstance(value, str):
            return self.restore(value)
        if isinstance(value, list):
            return [self.restore_value(v) for v in value]
        if isinstance(value, dict):
            return {k: self.restore_value(v) for k, v in value.items()}
        return value

    def redact_message(self, message: Message) -> Message:
        if isinstance(message, UserMessage):
            return replace(message, content=self.redact(message.content))
        if isinstance(message, ToolReturn):
            return replace(message, content=self.redact(message.content))
        assert isinstance(message, AssistantMessage)
        calls = tuple(
            replace(c, arguments=json.loads(self.redact(json.dumps(c.arguments))))
            for c in message.tool_calls
        )
        return replace(message, content=self.redact(message.content), tool_calls=calls)


class Restorer:
    """Restores placeholders in streamed pieces: a piece ending in what may still become
    a placeholder keeps that tail back until the next piece settles it, so the pieces
    given out join to exactly the restored whole."""

    def __init__(self, placeholders: Placeholders) -> None:
        self._placeholders = placeholders
        self._held = ""

    def feed(self, piece: str) -> str:
        text = self._held + piece
        cut = text.rfind("<")
        if cut >= 0 and _PARTIAL.match(text, cut) and len(text) - cut <= 16:
            text, self._held = text[:cut], text[cut:]
        else:
            self._held = ""
        return self._placeholders.restore(text)

    def flush(self) -> str:
        held, self._held = self._held, ""
        return self._placeholders.restore(held)


class RedactingModel(Model):
    """``inner`` called with the instructions and history redacted; its answer (and
    every streamed piece, and tool-call arguments) restored. Made per call by the turn
    when the agent redacts (``Agent(redact_pii=True)``)."""

    def __init__(self, inner: Model, finder: Redactor | None = None) -> None:
        self.inner = inner
        self._finder = finder or redactor()

    @property
    def name(self) -> str:
        return self.inner.name

    def _prepare(self, req: ModelRequest) -> tuple[Placeholders, ModelRequest]:
        """The placeholders of ``req``'s conversation, and ``req`` redacted with them."""
        placeholders = Placeholders(self._finder)
        # History first, in order: a value's number is fixed by its first appearance.
        messages = tuple(placeholders.redact_message(m) for m in req.messages)
        instructions = placeholders.redact(req.instructions)
        return placeholders, replace(req, instructions=instructions, messages=messages)

    @staticmethod
    def _restored(response: ModelResponse, placeholders: Placeholders) -> ModelResponse:
        calls = tuple(
            ToolCall(c.id, c.name, placeholders.restore_value(c.arguments))
            for c in response.tool_calls
        )
        return replace(response, content=placeholders.restore(response.content), tool_calls=calls)

    async def request(self, req: ModelRequest) -> ModelResponse:
        placeholders, redacted = self._prepare(req)
        response = await self.inner.call(redacted)
        return self._restored(response, placeholders)

    async def call(self, req: ModelRequest) -> ModelResponse:
        return await self.request(req)

    async def stream(self, req: ModelRequest) -> AsyncGenerator[StreamItem, None]:
        placeholders, redacted = self._prepare(req)
        restorer = Restorer(placeholders)
        inner = self.inner.stream(redacted)
        try:
            async for item in inner:
                if isinstance(item, str):
                    piece = restorer.feed(item)
                    if piece:
                        yield piece
                elif isinstance(item, ModelResponse):
                    rest = restorer.flush()
                    if rest:
                        yield rest
                    yield self._restored(item, placeholders)
                else:
                    yield item
        finally:
            await inner.aclose()
