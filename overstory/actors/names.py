"""Names of conversation actors: readable on the Ray dashboard, unique by a digest.

``conversation:<label>:<digest>``. The digest (sha256 of the user id, 96 bits) makes the
name unique; the label lets an operator see whose conversation an actor is without the
name leaking personal data:

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


def actor_name(user_id: str) -> str:
    """The Ray actor name of ``user_id``'s conversation."""
    digest = hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:24]
    return f"{NAME_PREFIX}{label(user_id)}:{digest}"
