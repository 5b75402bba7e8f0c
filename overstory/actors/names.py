"""Names of conversation actors: readable on the Ray dashboard, unique by a digest.

``conversation:<agent>:<label>:<digest>`` for conversation id ``<agent>:<user id>``. The
digest (sha256 of the conversation id, 96 bits) makes the name unique; the agent name
and the label let an operator see whose conversation with which agent an actor is,
without the name leaking personal data:

* an opaque id — letters, digits, ``_`` and ``-`` only, at most 24 characters, such as
  ``u_18274``, ``7f3a9c2e-…`` or ``alice`` — is shown as it is;
* anything else (an e-mail address, a name with spaces, a long or non-ASCII id) shows
  only its first two safe characters and a mask: ``jo***`` for ``john.doe@example.com``.
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["NAME_PREFIX", "actor_name", "label"]

NAME_PREFIX = "conversation:"

_OPAQUE = re.compile(r"[A-Za-z0-9_-]{1,24}")
_SAFE = re.compile(r"[A-Za-z0-9_-]")


def label(user_id: str) -> str:
    """The readable part of ``user_id``'s actor name (see the module doc)."""
    if _OPAQUE.fullmatch(user_id):
        return user_id
    return "".join(_SAFE.findall(user_id))[:2] + "***"


def actor_name(conversation_id: str) -> str:
    """The Ray actor name of conversation ``conversation_id`` (``agent:user``)."""
    digest = hashlib.sha256(conversation_id.encode("utf-8")).hexdigest()[:24]
    agent, sep, user_id = conversation_id.partition(":")
    if not sep:  # not an agent's conversation id: label all of it
        return f"{NAME_PREFIX}{label(conversation_id)}:{digest}"
    return f"{NAME_PREFIX}{agent}:{label(user_id)}:{digest}"
