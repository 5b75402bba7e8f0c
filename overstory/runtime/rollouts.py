"""``rt.rollouts``: which version of an agent new and existing conversations get.

Canary rollouts are sticky per conversation; promote and rollback are blue-green
switches (:mod:`overstory.rollout` holds the rules; this is the operator's client).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..audit import note
from ..rollout import Split, promote, read_split, rollback, rollout, update_split
from ..store import run_on_store

if TYPE_CHECKING:
    from .client import Runtime

__all__ = ["Rollouts"]


class Rollouts:
    """A runtime's rollout commands (``rt.rollouts``)."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def _versions(self, agent: str) -> list[str]:
        name = self._runtime.registry.agent_name(agent)
        return list(self._runtime.registry.served()["agents"][name])

    def _change_split(self, agent: str, change: Callable[[Split], Split]) -> dict[str, Any]:
        versions = self._versions(agent)

        async def go(store: Any) -> Split:
            split = await update_split(
                store, self._runtime.config.namespace, agent, versions, change
            )
            await note(
                store,
                who="operator",
                action="rollout.changed",
                target=f"{self._runtime.config.namespace}/{agent}",
                outcome="ok",
                detail={
                    "live": split.live,
                    "canary": split.canary,
                    "percent": split.percent,
                    "generation": split.generation,
                },
            )
            return split

        split: Split = run_on_store(self._runtime.config.store, go)
        self._runtime.registry.splits_changed()
        return split.describe()

    def split(self, agent: str) -> dict[str, Any]:
        """Agent ``agent``'s rollout split: ``live``, ``previous``, ``canary``, ``percent``,
        ``generation`` and the share of new conversations each version gets."""
        versions = self._versions(agent)
        split: Split = run_on_store(
            self._runtime.config.store,
            lambda s: read_split(s, self._runtime.config.namespace, agent, versions),
        )
        return split.describe()

    def start(self, agent: str, version: str, percent: float) -> dict[str, Any]:
        """``percent`` % of *new* conversations of ``agent`` get ``version``; every
        conversation keeps the version it started with while the rollout runs (also
        across passivation and restarts). Idempotent; returns the split."""
        versions = self._versions(agent)
        return self._change_split(agent, lambda s: rollout(s, version, percent, versions))

    def promote(self, agent: str, version: str) -> dict[str, Any]:
        """``version`` is live for everyone: existing conversations move to it at their
        next turn (a blue-green switch). Idempotent; returns the split."""
        versions = self._versions(agent)
        return self._change_split(agent, lambda s: promote(s, version, versions))

    def rollback(self, agent: str) -> dict[str, Any]:
        """Back to the previously promoted version, for everyone, at their next turn.
        Idempotent; returns the split."""
        return self._change_split(agent, rollback)
