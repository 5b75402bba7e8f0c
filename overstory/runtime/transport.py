"""How a :class:`~overstory.runtime.client.Conversation` reaches its conversation: one
typed transport per placement, chosen once when the handle is made.

A transport resolves a *target* (:meth:`Transport.target`: a host route, or the
dedicated actor's handle) and makes each call of the conversation entity's interface on
it, returning the Ray ``ObjectRef``. The handle owns retries and deadlines; a transport
owns only how a placement is addressed and what to do when its target is lost
(:meth:`Transport.lost`). Nothing here branches on a placement's name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ray.exceptions import ActorDiedError

from ..actors.names import actor_name
from ..agent import Placement
from ..exceptions import ConversationUnavailable
from ..messages import TurnRequest
from ..providers import Secret
from ..wire import request_wire

if TYPE_CHECKING:
    from ..access import Principal
    from ..registry.registry import Registry

__all__ = ["DedicatedTransport", "HostedTransport", "Transport", "transport_for"]


class Transport(ABC):
    """The calls of one conversation, as its placement addresses them."""

    placement: Placement
    #: Whether each call carries the user's own vendor keys (a host serves many users;
    #: a dedicated actor was started with its user's).
    carries_keys: bool = False

    def __init__(
        self, registry: Registry, conversation_id: str, api_keys: Mapping[str, Secret] | None
    ) -> None:
        self.registry = registry
        self.conversation_id = conversation_id
        self.api_keys = api_keys

    @abstractmethod
    async def target(self) -> Any:
        """What the next call goes to."""

    @abstractmethod
    def target_now(self) -> Any:
        """:meth:`target`, blocking the calling thread where it must ask the GCS."""

    @abstractmethod
    async def lost(self, target: Any, exc: BaseException) -> bool:
        """A call to ``target`` failed with ``exc`` in a way a re-send may fix: forget
        what is stale. ``True`` when the next target is ready at once (no back-off)."""

    @abstractmethod
    def actor(self) -> str:
        """The Ray actor serving it, as the dashboard shows it (its host, if hosted)."""

    def _at(
        self, target: Any, principal: Principal | None
    ) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
        """How ``target`` is called: the actor handle, the arguments every call to it
        starts with, and its keywords: only those that are set, since each argument
        costs a Ray call its own serialization (the actors default them to ``None``)."""
        handle, head = self._address(target)
        keywords: dict[str, Any] = {}
        if principal is not None:
            keywords["principal"] = principal
        if self.api_keys is not None and self.carries_keys:
            keywords["api_keys"] = self.api_keys
        return handle, head, keywords

    @abstractmethod
    def _address(self, target: Any) -> tuple[Any, tuple[Any, ...]]:
        """The actor handle of ``target`` and the arguments every call to it starts with."""

    def send(self, target: Any, request: TurnRequest, *, principal: Principal | None = None) -> Any:
        handle, head, keywords = self._at(target, principal)
        return handle.send.remote(*head, request_wire(request), **keywords)

    def start_turn(
        self, target: Any, request: TurnRequest, after: int, *, principal: Principal | None = None
    ) -> Any:
        handle, head, keywords = self._at(target, principal)
        return handle.start_turn.remote(*head, request_wire(request), after, **keywords)

    def start_and_read(
        self,
        target: Any,
        request: TurnRequest,
        after: int,
        wait_s: float,
        *,
        principal: Principal | None = None,
    ) -> Any:
        handle, head, keywords = self._at(target, principal)
        return handle.start_and_read.remote(*head, request_wire(request), after, wait_s, **keywords)

    def events(
        self,
        target: Any,
        turn_id: str,
        after: int,
        wait_s: float,
        *,
        principal: Principal | None = None,
    ) -> Any:
        handle, head, keywords = self._at(target, principal)
        return handle.events.remote(*head, turn_id, after, wait_s, **keywords)

    def cancel(self, target: Any, turn_id: str, *, principal: Principal | None = None) -> Any:
        handle, head, keywords = self._at(target, principal)
        return handle.cancel.remote(*head, turn_id, **keywords)

    def history(
        self,
        target: Any,
        after: int = -1,
        limit: int | None = None,
        before: int | None = None,
        turn: str | None = None,
        *,
        principal: Principal | None = None,
    ) -> Any:
        handle, head, keywords = self._at(target, principal)
        return handle.history.remote(*head, after, limit, before, turn, **keywords)

    @abstractmethod
    def info(self, target: Any) -> Any:
        """The conversation's description (placement, where it runs, its size)."""


class HostedTransport(Transport):
    """An entity in the host its shard maps to: every call carries the route's shard
    table version and the conversation id; a host that refuses a stale route has
    already told the router the newer table (see the handle's retry)."""

    placement: Placement = "hosted"
    carries_keys = True

    async def target(self) -> Any:
        return await self.registry.hosts.route_async(self.conversation_id)

    def target_now(self) -> Any:
        return self.registry.hosts.route(self.conversation_id)

    async def lost(self, target: Any, exc: BaseException) -> bool:
        if isinstance(exc, ActorDiedError | ConversationUnavailable):
            # The host is gone for good, or not there: read the table again (a tree booted
            # again may have other hosts) and look the host up again, once for all the
            # calls that failed on the same handle.
            self.registry.hosts.refresh(None if target is None else target[2])
        return False

    def actor(self) -> str:
        return self.registry.hosts.table.host_for(self.conversation_id)

    def _address(self, target: Any) -> tuple[Any, tuple[Any, ...]]:
        version, _, host = target
        return host, (version, self.conversation_id)

    def info(self, target: Any) -> Any:
        version, _, host = target
        return host.info.remote(version, self.conversation_id, api_keys=self.api_keys)


class DedicatedTransport(Transport):
    """A named actor of its own: calls go to its handle; a handle whose actor died is
    replaced by asking the registry again (which restarts it from the store)."""

    placement: Placement = "dedicated"

    def __init__(
        self,
        registry: Registry,
        conversation_id: str,
        api_keys: Mapping[str, Secret] | None,
        handle: Any,
    ) -> None:
        super().__init__(registry, conversation_id, api_keys)
        self.handle = handle

    async def target(self) -> Any:
        return self.handle

    def target_now(self) -> Any:
        return self.handle

    async def lost(self, target: Any, exc: BaseException) -> bool:
        """The actor is gone: get (or start) it again; concurrent callers that lost the
        same handle start it once (the supervisor serialises starts per user)."""
        if self.handle is target:
            handle = await self.registry.get_or_start(self.conversation_id, self.api_keys)
            if self.handle is target:
                self.handle = handle
        return True

    def actor(self) -> str:
        return actor_name(self.conversation_id)

    def _address(self, target: Any) -> tuple[Any, tuple[Any, ...]]:
        return target, ()  # the actor holds its conversation and its user's keys

    def info(self, target: Any) -> Any:
        return target.ready.remote()


def transport_for(
    registry: Registry, conversation_id: str, api_keys: Mapping[str, Secret] | None, handle: Any
) -> Transport:
    """The transport of the registry's placement (``handle``: the dedicated actor)."""
    if handle is None:
        return HostedTransport(registry, conversation_id, api_keys)
    return DedicatedTransport(registry, conversation_id, api_keys, handle)
