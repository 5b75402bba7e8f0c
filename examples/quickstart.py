"""The README's quickstart: an agent with a typed tool, one user's conversation.

Run: .venv/bin/python examples/quickstart.py   (starts a local Ray if none is running)
"""

from __future__ import annotations

import tempfile

import overstory


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def main() -> None:
    agent = overstory.Agent(
        "helper",
        instructions="Answer briefly.",
        model=overstory.OfflineModel(rules=[overstory.Rule(r"(?P<a>\d+) \+ (?P<b>\d+)", "add")]),
        tools=[add],
    )
    store = f"sqlite:///{tempfile.mkdtemp()}/chat.db"
    with overstory.connect(agent, store=store) as rt:
        conv = rt.conversation("alice")
        print(conv.send("hello").text)
        print(conv.send("what is 2 + 40?").text)
        for message in conv.history():
            print(f"[{message.seq}] {message.kind}: {message.content}")


if __name__ == "__main__":
    main()
