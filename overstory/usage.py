"""Usage and cost per user, from the stored history and a price table.

Prices are per million tokens, per model, in the config::

    [prices]
    "gpt-4.1-mini" = { input = 0.40, output = 1.60 }
    "claude-sonnet-4-5" = { input = 3.00, output = 15.00 }

A model is priced by the name its provider reported (what each stored answer records):
the exact name, else the longest price key it starts with (vendors report dated names,
``gpt-4.1-mini-2025-04-14``); a key may carry a ``provider:`` prefix. A model with no
price counts tokens and no cost (``priced: false``).

:func:`summarize` is the one pure function that counts; :func:`usage` feeds it the
store's conversations (each user's own conversations and the HTTP conversations they
own), and the turn records each answer's cost on its span (``overstory.cost_usd``) and
in the ``overstory_cost_usd_total`` metric {model} through :func:`cost_of`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .access import is_conversation_id, load_record
from .app import split_conversation_id
from .exceptions import ConfigError
from .messages import AssistantMessage, Message, UserMessage
from .store import HistoryStore

__all__ = ["Prices", "cost_of", "price_for", "summarize", "usage", "validate_prices"]

Prices = Mapping[str, Mapping[str, float]]


def validate_prices(prices: Any) -> dict[str, dict[str, float]]:
    """``{model: {"input": $/Mtok, "output": $/Mtok}}``, both >= 0."""
    if not isinstance(prices, Mapping):
        raise ConfigError("prices: a table of model -> {input, output} per million tokens")
    out: dict[str, dict[str, float]] = {}
    for model, price in prices.items():
        if not isinstance(model, str) or not model or not isinstance(price, Mapping):
            raise ConfigError(f"prices: {model!r} needs {{input = ..., output = ...}}")
        if set(price) != {"input", "output"}:
            raise ConfigError(f"prices.{model}: exactly 'input' and 'output', got {sorted(price)}")
        values = {}
        for side in ("input", "output"):
            value = price[side]
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"prices.{model}.{side}: dollars per million tokens >= 0")
            values[side] = float(value)
        out[model] = values
    return out


def price_for(model: str, prices: Prices) -> Mapping[str, float] | None:
    """The price of ``model`` as its provider named it (see the module doc)."""
    if model in prices:
        return prices[model]
    bare = model.partition(":")[2] if ":" in model else model
    best: tuple[int, Mapping[str, float]] | None = None
    for key, price in prices.items():
        name = key.partition(":")[2] if ":" in key and ":" not in model else key
        if (model.startswith(name) or bare.startswith(name)) and (
            best is None or len(name) > best[0]
        ):
            best = (len(name), price)
    return None if best is None else best[1]


def cost_of(model: str, input_tokens: int, output_tokens: int, prices: Prices) -> float | None:
    """Dollars for one answer (``None``: the model has no price)."""
    price = price_for(model, prices)
    if price is None:
        return None
    return (input_tokens * price["input"] + output_tokens * price["output"]) / 1_000_000


def summarize(
    histories: Iterable[tuple[str, Sequence[Message]]], prices: Prices, since: float | None = None
) -> dict[str, Any]:
    """Totals and per-model rows of ``(user, messages)`` pairs, messages from ``since``:
    ``{"turns", "tool_calls", "input_tokens", "output_tokens", "cost_usd", "unpriced",
    "models": {model: {...same, "priced"}}, "users": {user: {...totals}}}``."""

    def zero() -> dict[str, Any]:
        return {"turns": 0, "tool_calls": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}

    total = zero()
    models: dict[str, dict[str, Any]] = {}
    users: dict[str, dict[str, Any]] = {}
    total["unpriced"] = 0
    for user, messages in histories:
        row = users.setdefault(user, zero())
        for m in messages:
            if since is not None and m.created_at < since:
                continue
            if isinstance(m, UserMessage):
                for t in (total, row):
                    t["turns"] += 1
            elif isinstance(m, AssistantMessage):
                model = models.setdefault(m.model, {**zero(), "priced": True})
                cost = cost_of(m.model, m.usage.input_tokens, m.usage.output_tokens, prices)
                if cost is None:
                    model["priced"] = False
                    total["unpriced"] += m.usage.input_tokens + m.usage.output_tokens
                for t in (total, row, model):
                    t["input_tokens"] += m.usage.input_tokens
                    t["output_tokens"] += m.usage.output_tokens
                    t["tool_calls"] += len(m.tool_calls)
                    t["cost_usd"] += cost or 0.0
    for t in (total, *models.values(), *users.values()):
        t["cost_usd"] = round(t["cost_usd"], 6)
    return {**total, "models": models, "users": users}


async def usage(
    store: HistoryStore,
    prices: Prices,
    *,
    user: str | None = None,
    since: float | None = None,
) -> dict[str, Any]:
    """:func:`summarize` over the store: every conversation, or ``user``'s (their own
    conversations with every agent, and the HTTP conversations they own). Reads every
    history it counts: an operator's command, not a per-request one."""
    histories: list[tuple[str, list[Message]]] = []
    for cid in await store.conversation_ids():
        try:
            _, part = split_conversation_id(cid)
        except ConfigError:
            part = cid  # stored before apps: the id is the user's
        owner = part
        if is_conversation_id(part):
            record = await load_record(store, part)
            owner = record.owner if record is not None else part
        if user is not None and owner != user:
            continue
        histories.append((owner, await store.load(cid)))
    return summarize(histories, prices, since)
