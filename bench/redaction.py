"""PII redaction: what it costs per KB of text (issue 14).

Texts of ~1 KB (prose with an e-mail address, a phone number, a card number and an API
key in each, every text different so the redactor's cache never answers), redacted the
way a model call's input is (:class:`overstory.redaction.Placeholders`), then restored.
Also: the same texts again (the cache answers: what a conversation's older messages
cost at each later call), and text without PII.

Run: .venv/bin/python bench/redaction.py [--texts 300] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import string
import time
from typing import Any

from overstory.redaction import Placeholders, Redactor

PROSE = (
    "Thanks for getting back to me about the order. As discussed on the phone, the "
    "delivery should go to the warehouse rather than the office, and the invoice to "
    "accounts. I have attached the spreadsheet with the quantities for each site. "
)


def texts(n: int, with_pii: bool, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = PROSE * 3
        if with_pii:
            key = "sk-" + "".join(rng.choices(string.ascii_letters + string.digits, k=40))
            pii = (
                f" Write to buyer{i}@example.com or call +1 415-{rng.randint(200, 999)}-"
                f"{rng.randint(1000, 9999)}; card 4111 1111 1111 1111; key {key}."
            )
            out.append(words[: 1024 - len(pii)] + pii)
        else:
            out.append(words[:1000] + f" ref {i}")
    return out


def per_kb_us(fn: Any, items: list[str]) -> float:
    start = time.perf_counter()
    for text in items:
        fn(text)
    elapsed = time.perf_counter() - start
    return elapsed / (sum(len(t) for t in items) / 1024) * 1e6


def run(n: int) -> dict[str, Any]:
    finder = Redactor()
    finder.find("warm up: ann@example.com +1 415-555-0100")
    pii, plain = texts(n, True), texts(n, False)
    cold = per_kb_us(lambda t: Placeholders(finder).redact(t), pii)
    warm = per_kb_us(lambda t: Placeholders(finder).redact(t), pii)
    clean = per_kb_us(lambda t: Placeholders(finder).redact(t), plain)
    placeholders = Placeholders(finder)
    redacted = [placeholders.redact(t) for t in pii]
    restore = per_kb_us(placeholders.restore, redacted)
    assert all(placeholders.restore(r) == t for r, t in zip(redacted, pii, strict=True))
    return {
        "texts": n,
        "redact_us_per_kb": round(cold, 1),
        "redact_cached_us_per_kb": round(warm, 1),
        "redact_no_pii_us_per_kb": round(clean, 1),
        "restore_us_per_kb": round(restore, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.texts)
    if args.json:
        print(json.dumps(result))
        return
    print(f"PII redaction, {result['texts']} texts of ~1 KB each")
    print(f"  redact (4 values per text): {result['redact_us_per_kb']} µs per KB")
    print(f"  redact again (cached):      {result['redact_cached_us_per_kb']} µs per KB")
    print(f"  redact text without PII:    {result['redact_no_pii_us_per_kb']} µs per KB")
    print(f"  restore:                    {result['restore_us_per_kb']} µs per KB")


if __name__ == "__main__":
    main()
