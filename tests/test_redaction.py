"""PII redaction (no Ray): recall on a generated corpus, exact restoration, placeholders
split across streamed pieces, and a turn whose provider — the official OpenAI SDK over
real HTTP to the loopback server — never receives the original text."""

from __future__ import annotations

import asyncio
import json
import random
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from overstory import Agent
from overstory.conversation.turn import run_turn
from overstory.messages import AssistantMessage, Message, ToolReturn, UserMessage
from overstory.providers import Endpoint, Secret
from overstory.providers.pool import vendor_model
from overstory.redaction import Placeholders, Restorer, redactor
from overstory.store import open_store
from overstory.testing import DEFAULT_RULES, OpenAIServer

# --- a seeded corpus --------------------------------------------------------------------------

_NAMES = ["john.doe", "maria_garcia", "li.wei+news", "o'brien", "anna-karin", "x9", "dev.ops.team"]
_DOMAINS = ["example.com", "mail.co.uk", "uni-heidelberg.de", "corp.io", "posteo.net", "gmail.com"]


def _luhn_complete(digits: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            d -= 9 if d > 9 else 0
        total += d
    return digits + str((10 - total % 10) % 10)


def _card(rng: random.Random) -> str:
    prefix, length = rng.choice(
        [("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("37", 15), ("6011", 16)]
    )
    number = _luhn_complete(
        prefix + "".join(rng.choices(string.digits, k=length - len(prefix) - 1))
    )
    style = rng.choice(["plain", "spaces", "dashes"])
    if style == "plain" or length == 15:
        return number
    sep = " " if style == "spaces" else "-"
    return sep.join(number[i : i + 4] for i in range(0, 16, 4))


def _iban(rng: random.Random) -> str:
    country, length = rng.choice([("DE", 18), ("FR", 23), ("NL", 14), ("ES", 20)])
    if country == "NL":
        bban = "".join(rng.choices(string.ascii_uppercase, k=4)) + "".join(
            rng.choices(string.digits, k=10)
        )
    else:
        bban = "".join(rng.choices(string.digits, k=length))
    numeric = "".join(str(int(c, 36)) for c in bban + country + "00")
    check = 98 - int(numeric) % 97
    return f"{country}{check:02d}{bban}"


def _phone(rng: random.Random) -> str:
    area = rng.choice(["212", "415", "312", "617", "206"])
    line = f"{rng.randint(200, 999)}-{rng.randint(1000, 9999)}"
    return rng.choice(
        [
            f"+1 {area}-{line}",
            f"({area}) {line}",
            f"+1 ({area}) {line}",
            f"+44 20 {rng.randint(7000, 8999)} {rng.randint(1000, 9999)}",
            f"+49 30 {rng.randint(1000000, 9999999)}",
            f"+33 1 {rng.randint(10, 99)} {rng.randint(10, 99)} {rng.randint(10, 99)} {rng.randint(10, 99)}",
        ]
    )


def _token(rng: random.Random, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(rng.choices(alphabet, k=n))


def _secret(rng: random.Random) -> str:
    kind = rng.randrange(7)
    if kind == 0:
        return "sk-" + _token(rng, 48)
    if kind == 1:
        return "sk-proj-" + _token(rng, 40, string.ascii_letters + string.digits + "_-")
    if kind == 2:
        return "sk-ant-api03-" + _token(rng, 60, string.ascii_letters + string.digits + "_-")
    if kind == 3:
        return "AKIA" + _token(rng, 16, string.ascii_uppercase + string.digits)
    if kind == 4:
        return rng.choice(["ghp_", "gho_", "ghs_"]) + _token(rng, 36)
    if kind == 5:
        return (
            "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiI"
            + _token(rng, 20)
            + "."
            + _token(rng, 43, string.ascii_letters + string.digits + "_-")
        )
    return "Bearer " + _token(rng, 32, string.ascii_letters + string.digits + "._-")


_MAKERS: dict[str, Callable[[random.Random], str]] = {
    "EMAIL": lambda rng: f"{rng.choice(_NAMES)}@{rng.choice(_DOMAINS)}",
    "CARD": _card,
    "IBAN": _iban,
    "PHONE": _phone,
    "SECRET": _secret,
}
_TEMPLATES = [
    "Please reach me at {v} tomorrow.",
    "my {k} is {v}, thanks!",
    "{v}",
    "Can you check ({v}) for me?",
    "Here it is: {v}. Nothing else.",
    "Ich habe {v} angegeben — bitte prüfen.",
    "Line one\n{v}\nline three",
]


def corpus(n: int, seed: int = 2026) -> list[tuple[str, str, str]]:
    """``n`` texts, each with one value of a kind: ``(kind, value, text)``."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        kind = list(_MAKERS)[i % len(_MAKERS)]
        value = _MAKERS[kind](rng)
        items.append((kind, value, rng.choice(_TEMPLATES).format(v=value, k=kind.lower())))
    return items


def test_recall_on_a_generated_corpus_and_restoration_is_exact() -> None:
    finder = redactor()
    items = corpus(1500)
    hits: dict[str, list[bool]] = {kind: [] for kind in _MAKERS}
    for kind, value, text in items:
        placeholders = Placeholders(finder)
        redacted = placeholders.redact(text)
        secret_part = value.removeprefix("Bearer ")
        hits[kind].append(secret_part not in redacted and f"<{kind}_1>" in redacted)
        assert placeholders.restore(redacted) == text  # 100 % restoration
    recall = {kind: sum(h) / len(h) for kind, h in hits.items()}
    print("recall", recall)
    assert min(recall["EMAIL"], recall["CARD"], recall["SECRET"]) >= 0.99, recall
    assert recall["PHONE"] >= 0.95, recall
    assert recall["IBAN"] >= 0.95, recall


def test_ordinary_text_is_left_alone() -> None:
    finder = redactor()
    for text in (
        "The meeting is at 10:30 in room 4.",
        "Order #1234 shipped; total 99.90 EUR.",
        "Version 2.3.4 fixed it, see the changelog.",
        "4111 apples and 1111 pears",
        "sketch-ant-colony is a project name",
    ):
        assert Placeholders(finder).redact(text) == text


def test_placeholders_are_stable_per_value_and_numbered_by_first_appearance() -> None:
    p = Placeholders(redactor())
    a = p.redact("mail ann@example.com and bob@example.com")
    b = p.redact("again ann@example.com, card 4111 1111 1111 1111")
    assert a == "mail <EMAIL_1> and <EMAIL_2>"
    assert b == "again <EMAIL_1>, card <CARD_1>"
    assert p.restore("to <EMAIL_2> and <EMAIL_9>") == "to bob@example.com and <EMAIL_9>"
    args = {"to": ["<EMAIL_1>"], "note": {"card": "<CARD_1>"}, "n": 3}
    assert p.restore_value(args) == {
        "to": ["ann@example.com"],
        "note": {"card": "4111 1111 1111 1111"},
        "n": 3,
    }


def test_a_placeholder_split_across_streamed_pieces_is_restored_whole() -> None:
    p = Placeholders(redactor())
    p.redact("ann@example.com and +1 415-555-0199")
    text = "Write to <EMAIL_1> or call <PHONE_1>; <notes> and a < b stay. <EMAIL_1>"
    expected = p.restore(text)
    assert "ann@example.com" in expected
    assert "<notes> and a < b" in expected
    for size in (1, 2, 3, 5, 7, 11):
        restorer = Restorer(p)
        pieces = [restorer.feed(text[i : i + size]) for i in range(0, len(text), size)]
        pieces.append(restorer.flush())
        assert "".join(pieces) == expected, size
        assert not any("<EMAIL" in piece or "<PHONE" in piece for piece in pieces)


# --- a turn through the official SDK to the loopback server -----------------------------------


def send_email(to: str, body: str) -> str:
    """Send an e-mail."""
    sent_mail.append((to, body))
    return f"sent to {to}"


sent_mail: list[tuple[str, str]] = []
RULES = (*DEFAULT_RULES, (r"mail (?P<to>\S+) saying (?P<body>.+)$", "send_email"))


@pytest.mark.parametrize("streamed", [False, True])
def test_the_provider_sees_placeholders_and_the_user_and_tools_see_originals(
    tmp_path: Path, streamed: bool
) -> None:
    sent_mail.clear()
    email, card = "ann.lee@example.com", "4111-1111-1111-1111"
    key = "sk-ant-api03-" + "k" * 40
    with OpenAIServer(rules=RULES, piece_chars=3) as server:
        model = vendor_model(Endpoint("openai", "gpt-test", server.base_url, key=Secret("sk-test")))
        agent = Agent("private", model=model, tools=[send_email], redact_pii=True)
        plain = Agent("plain", model=model)

        async def body() -> tuple[list[Message], list[str], list[str], list[str]]:
            store = open_store(f"sqlite:///{tmp_path}/h.db", data_keys=None)
            await store.open()
            history: list[Message] = []
            deltas: list[str] = []

            def emit(kind: str, /, **fields: Any) -> None:
                if kind == "delta":
                    deltas.append(fields["text"])

            options: dict[str, Any] = {"emit": emit} if streamed else {}
            await run_turn(
                agent, store, "private:u", history, "t1", f"my card is {card}, key {key}", **options
            )
            first_turn = list(deltas)
            await run_turn(
                agent,
                store,
                "private:u",
                history,
                "t2",
                f"mail {email} saying hi from {email}",
                **options,
            )
            private = [json.dumps(r.body) for r in server.requests]
            plain_history: list[Message] = []
            await run_turn(plain, store, "plain:u", plain_history, "t3", f"mail {email}")
            await store.close()
            return history, first_turn, private, [json.dumps(r.body) for r in server.requests]

        history, deltas, private, sent = asyncio.run(body())
    # The provider got placeholders only, stable across the turns of the conversation.
    assert len(private) == 3  # turn 1: one call; turn 2: the tool call, then the answer
    assert all(card not in r and key not in r and email not in r for r in private)
    assert any("<CARD_1>" in r and "<SECRET_1>" in r for r in private)
    assert any("<EMAIL_1>" in r for r in private)
    assert email in sent[-1]  # without redact_pii nothing changes
    # The user sees the originals: the echo of turn 1, restored; streamed pieces too.
    answer = history[1]
    assert isinstance(answer, AssistantMessage)
    assert answer.content == f"echo: my card is {card}, key {key}"
    if streamed:  # pieces of 3 characters: placeholders were split across them
        assert "".join(deltas) == answer.content
        assert len(deltas) > 5
        assert not any("<CARD" in d or "<SECRET" in d or "_1>" in d for d in deltas)
    # The tool ran with the original address in its arguments, stored as such.
    assert sent_mail == [(email, f"hi from {email}")]
    calls = [m for m in history if isinstance(m, AssistantMessage) and m.tool_calls]
    assert calls[0].tool_calls[0].arguments == {"to": email, "body": f"hi from {email}"}
    assert any(isinstance(m, ToolReturn) and m.content == f"sent to {email}" for m in history)
    # The stored history keeps the original text.
    assert isinstance(history[0], UserMessage)
    assert card in history[0].content
