"""An example app: a help desk with two agents, one of them in two versions.

Serve it on a running cluster, every host importing this module itself::

    overstory serve helpdesk:app --working-dir examples/apps

then talk to an agent by name::

    rt = overstory.connect()
    rt.conversation("alice", agent="billing").send("how much is a refund of 20 EUR?")

and move ``support`` from version 1 to 2 (sticky canary, then everyone)::

    overstory rollout support 2 --percent 10
    overstory promote support 2
    overstory rollback support

Its models are the offline scripted model (no key, no network): a message matching a
rule becomes a tool call, anything else is echoed.
"""

from __future__ import annotations

import overstory
from overstory import OfflineModel, Rule

#: Orders this help desk knows, so the tool's answer is deterministic.
ORDERS = {"A100": "shipped on Monday", "B200": "waiting for stock"}


def order_status(order_id: str) -> str:
    """Where an order is, by its id (e.g. A100)."""
    return ORDERS.get(order_id.upper(), f"no order {order_id!r} is known")


def refund_estimate(amount: float, currency: str = "EUR") -> str:
    """The refund for an amount: the full amount less a 2 % fee."""
    if amount <= 0:
        raise ValueError(f"amount must be positive, got {amount}")
    return f"{amount * 0.98:.2f} {currency.upper()}"


_ORDER_RULE = Rule(r"where is (?:my )?order (?P<order_id>\w+)", "order_status")

support_v1 = overstory.Agent(
    "support",
    version="1",
    instructions="You answer questions about orders. Be brief.",
    model=OfflineModel("support-v1", rules=(_ORDER_RULE,)),
    tools=[order_status],
)

support_v2 = overstory.Agent(
    "support",
    version="2",
    instructions="You answer questions about orders. Be brief and greet the customer.",
    model=OfflineModel("support-v2", rules=(_ORDER_RULE,)),
    tools=[order_status],
)

billing = overstory.Agent(
    "billing",
    instructions="You answer questions about refunds.",
    model=OfflineModel(
        "billing",
        rules=(
            Rule(
                r"refund of (?P<amount>\d+(?:\.\d+)?) (?P<currency>[A-Za-z]{3})", "refund_estimate"
            ),
        ),
    ),
    tools=[refund_estimate],
)

#: The app: ``support`` (version 1 live, version 2 ready to roll out) and ``billing``.
app = overstory.App([support_v1, support_v2, billing])
