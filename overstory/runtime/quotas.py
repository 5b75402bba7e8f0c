"""``rt.quotas``: per-user quotas, set and read by operators (:mod:`overstory.quota`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..quota import UNSET, Quota, Unset, change_quota, report
from ..store import run_on_store
from ..validation import validate_user_id

if TYPE_CHECKING:
    from .client import Runtime

__all__ = ["Quotas"]


class Quotas:
    """A runtime's quota commands (``rt.quotas``)."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def set(
        self,
        user_id: str,
        *,
        tokens_per_day: int | Unset | None = UNSET,
        requests_per_minute: int | Unset | None = UNSET,
        concurrent_turns: int | Unset | None = UNSET,
    ) -> dict[str, Any]:
        """Set ``user_id``'s own quota (:mod:`overstory.quota`): the limits given change
        (``None``: no limit of that kind), the others keep their current value (the
        configured default, for a user without a quota of their own). It holds across
        every conversation of the user, on every host and node, within 5 s (hosts read a
        user's quota again after that). Returns :meth:`get`."""
        validate_user_id(user_id, max_chars=self._runtime.config.limits.max_user_id_chars)
        changes = {
            name: value
            for name, value in (
                ("tokens_per_day", tokens_per_day),
                ("requests_per_minute", requests_per_minute),
                ("concurrent_turns", concurrent_turns),
            )
            if not isinstance(value, Unset)
        }
        namespace, default = self._runtime.config.namespace, self.default()
        run_on_store(
            self._runtime.config.store,
            lambda st: change_quota(st, namespace, user_id, default, changes),
        )
        return self.get(user_id)

    def default(self) -> Quota:
        """The quota of users without one of their own (``quota_*`` in the config)."""
        return self._runtime.config.quotas.quota()

    def get(self, user_id: str) -> dict[str, Any]:
        """``user_id``'s quota and where they stand: ``{"user", "quota", "own" (whether
        it is theirs or the default), "usage": {"day", "tokens", "reserved_tokens",
        "running_turns", "turns_last_minute"}}``."""
        validate_user_id(user_id, max_chars=self._runtime.config.limits.max_user_id_chars)
        namespace, default = self._runtime.config.namespace, self.default()
        result: dict[str, Any] = run_on_store(
            self._runtime.config.store, lambda st: report(st, namespace, user_id, default)
        )
        return result
