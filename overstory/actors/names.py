"""Names of conversation actors: derived from the user id, revealing nothing of it."""

from __future__ import annotations

import hashlib

__all__ = ["NAME_PREFIX", "actor_name"]

NAME_PREFIX = "conversation-"


def actor_name(user_id: str) -> str:
    """The Ray actor name of ``user_id``'s conversation (the user id is not readable in it)."""
    return NAME_PREFIX + hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:32]
