"""``rt.vault``: the DataVault's documents, for operators (:mod:`overstory.vault`)."""

from __future__ import annotations

import builtins
from typing import TYPE_CHECKING, Any

from .. import vault as vault_ops
from ..store import run_on_store
from ..validation import validate_user_id

if TYPE_CHECKING:
    from .client import Runtime

__all__ = ["Vault"]


class Vault:
    """A runtime's DataVault commands (``rt.vault``)."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def list(self, agent: str, user_id: str | None = None) -> builtins.list[dict[str, Any]]:
        """``agent``'s vault collections with their document counts: ``user_id``'s, or
        (``None``) every owner's (owner ``""``: the shared collections)."""
        if user_id:
            validate_user_id(user_id, max_chars=self._runtime.config.limits.max_user_id_chars)
        listed: builtins.list[dict[str, Any]] = run_on_store(
            self._runtime.config.store, lambda st: vault_ops.listing(st, agent, user_id)
        )
        return listed

    def get(
        self, agent: str, collection: str, key: str, user_id: str = ""
    ) -> dict[str, Any] | None:
        """One document of ``user_id``'s (``""``: a shared collection)."""
        got: dict[str, Any] | None = run_on_store(
            self._runtime.config.store,
            lambda st: vault_ops.fetch(st, agent, user_id, collection, key),
        )
        return got

    def clear(self, agent: str, collection: str, key: str | None = None, user_id: str = "") -> int:
        """Delete one document of ``user_id``'s (``""``: shared) or the whole collection."""
        gone: int = run_on_store(
            self._runtime.config.store,
            lambda st: vault_ops.clear(st, agent, user_id, collection, key),
        )
        return gone
