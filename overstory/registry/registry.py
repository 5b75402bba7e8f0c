"""User id -> conversation actor handle (the client side of the registry).

The registry's state — which conversations are live, on which node, since when — lives
in the :class:`~overstory.supervisors.conversations.ConversationSupervisor` of the app's
supervision tree: it is the one actor that starts and stops conversations, so it is the
one place that cannot disagree with reality. This class finds that supervisor (booting
the tree if there is none) and asks it for a user's conversation; concurrent requests
for one user are serialised there and yield exactly one actor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from ..actors.names import actor_name
from ..agent import Agent
from ..exceptions import ConversationUnavailable
from ..providers import Secret
from ..supervisors import ChildSpec, SupervisorSpec
from ..supervisors.conversations import ConversationSupervisor, Lifecycle
from ..supervisors.named import SUPERVISED, unwrap_task_error
from ..supervisors.tree import CONVERSATIONS, NamedChild, boot

__all__ = ["Registry", "actor_name"]

_RemoteConversations: Any = ray.remote(ConversationSupervisor)

#: How often a request is re-sent after the supervisor itself died under it.
_ATTEMPTS = 3


class Registry:
    """Finds or starts the conversation actor of a user id in ``namespace``."""

    def __init__(
        self,
        *,
        namespace: str,
        agent: Agent,
        store_url: str,
        max_message_chars: int,
        lifecycle: Lifecycle,
        send_agent: bool = True,
    ) -> None:
        self.namespace = namespace
        self.agent = agent
        self.store_url = store_url
        self.max_message_chars = max_message_chars
        self.lifecycle = lifecycle
        self._send_agent = send_agent
        self._supervisor: Any = None

    def tree_spec(self) -> SupervisorSpec:
        conversations = NamedChild(
            _RemoteConversations,
            CONVERSATIONS,
            (self.namespace, self.agent, self.store_url, self.max_message_chars, self.lifecycle),
            SUPERVISED,
        )
        return SupervisorSpec(
            strategy="one_for_one",
            children=(ChildSpec("conversations", start=conversations, restart="permanent"),),
        )

    def supervisor(self) -> Any:
        """The conversation supervisor's handle, booting the tree when it is missing."""
        if self._supervisor is None:
            root = boot(
                self.namespace, self.tree_spec(), timeout_s=self.lifecycle.activation_timeout_s
            )
            try:
                ray.get(root.ready.remote(), timeout=self.lifecycle.activation_timeout_s)
                self._supervisor = ray.get_actor(CONVERSATIONS, namespace=self.namespace)
            except (RayActorError, ValueError, GetTimeoutError) as exc:
                raise ConversationUnavailable(
                    f"the supervision tree in namespace {self.namespace!r} is not available: {exc}"
                ) from exc
        return self._supervisor

    def get_or_start(self, user_id: str, api_keys: Mapping[str, Secret] | None = None) -> Any:
        """A live handle to ``user_id``'s conversation actor, started if needed.

        ``api_keys`` (vendor -> the user's own key) apply when the actor is started.
        """
        last: BaseException | None = None
        for _ in range(_ATTEMPTS):
            supervisor = self.supervisor()
            agent = self.agent if self._send_agent else None
            try:
                return ray.get(
                    supervisor.start_child.remote(user_id, agent, api_keys),
                    timeout=self.lifecycle.activation_timeout_s,
                )
            except RayTaskError as exc:
                raise unwrap_task_error(exc) from None
            except RayActorError as exc:  # the supervisor died: its parent restarts it
                self._supervisor, last = None, exc
            except GetTimeoutError as exc:
                raise self._unavailable(user_id, "it did not become ready in time") from exc
        raise self._unavailable(user_id, f"{type(last).__name__}: {last}") from last

    async def get_or_start_async(
        self, user_id: str, api_keys: Mapping[str, Secret] | None = None
    ) -> Any:
        """Async form of :meth:`get_or_start`."""
        last: BaseException | None = None
        for _ in range(_ATTEMPTS):
            supervisor = self._supervisor or await asyncio.to_thread(self.supervisor)
            agent = self.agent if self._send_agent else None
            try:
                return await asyncio.wait_for(
                    supervisor.start_child.remote(user_id, agent, api_keys),
                    timeout=self.lifecycle.activation_timeout_s,
                )
            except RayTaskError as exc:
                raise unwrap_task_error(exc) from None
            except RayActorError as exc:
                self._supervisor, last = None, exc
            except TimeoutError as exc:
                raise self._unavailable(user_id, "it did not become ready in time") from exc
        raise self._unavailable(user_id, f"{type(last).__name__}: {last}") from last

    def passivate(self, user_id: str, reason: str = "stopped") -> bool:
        """Ask the supervisor to passivate ``user_id``'s conversation (history stays)."""
        return bool(ray.get(self.supervisor().passivate.remote(user_id, reason)))

    def status(self) -> dict[str, Any]:
        """Live conversations, per node, and activation/passivation/restart counters."""
        status: dict[str, Any] = ray.get(self.supervisor().status.remote())
        return status

    def _unavailable(self, user_id: str, why: str) -> ConversationUnavailable:
        return ConversationUnavailable(
            f"cannot reach or start the conversation of user {user_id!r} "
            f"(actor {actor_name(user_id)!r} in namespace {self.namespace!r}): {why}"
        )
