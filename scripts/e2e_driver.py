"""A driver for the deployment end-to-end check: talk to one user's conversation.

    python e2e_driver.py USER WORD... [--agent NAME] [--address ray://HOST:10001]

Attaches to the cluster (``--address``, else ``RAY_ADDRESS``, else the local one),
sends the words to USER's conversation with the deployed agent NAME (default: the app's
first) and prints one JSON line: the reply, the agent and version that answered, the
stored history and the actor serving it. It ships no agent: it talks to what
``overstory serve`` deployed. The store comes from ``OVERSTORY_STORE``.
"""

from __future__ import annotations

import argparse
import json

import ray

import overstory


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("user")
    parser.add_argument("words", nargs="+")  # `ray submit` does not quote its arguments
    parser.add_argument("--address")
    parser.add_argument("--agent")
    args = parser.parse_args()
    runtime = overstory.connect(ray_address=args.address)
    try:
        conv = runtime.conversation(args.user, agent=args.agent)
        reply = conv.send(" ".join(args.words))
        history = [m.content for m in conv.history() if m.kind == "user"]
        print(
            json.dumps(
                {
                    "reply": reply.text,
                    "agent": reply.agent,
                    "version": reply.agent_version,
                    "served": sorted(runtime.served()["agents"]),
                    "user_messages": history,
                    "actor": conv.actor_name,
                    "pid": conv.info().get("pid"),
                    "client_mode": ray.util.client.ray.is_connected(),
                }
            )
        )
    finally:
        runtime.close()


if __name__ == "__main__":
    main()
