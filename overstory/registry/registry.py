"""User id -> conversation actor: get-or-start, exactly one actor per user.

Ray's GCS is the registry's storage: a conversation actor is *named* after its user id
(a hash, so the name is fixed-length and reveals nothing) in the app's namespace, and
name registration in the GCS is atomic. Get-or-start therefore is:

1. look the name up; if absent, create the actor under that name — when two drivers
   race, exactly one creation wins and the others get ``ActorAlreadyExistsError`` and
   look the name up again;
2. wait until the actor is ready (its history loaded). A handle that turns out dead
   (ray#44083: ``get_if_exists`` can return an actor that is dying) is dropped and the
   loop goes round again, so callers are never handed a dead actor.

The loop is bounded by ``attempts`` and by a deadline; between attempts it backs off
briefly because the GCS frees a dead actor's name asynchronously and offers nothing to
await.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import (
    ActorAlreadyExistsError,
    GetTimeoutError,
    RayActorError,
    RayTaskError,
)

from ..actors.conversation import ConversationActor
from ..agent import Agent
from ..exceptions import ConversationUnavailable

__all__ = ["ActorOptions", "Registry", "actor_name", "unwrap_task_error"]

NAME_PREFIX = "conversation-"

_RemoteConversation: Any = ray.remote(ConversationActor)


def unwrap_task_error(exc: RayTaskError) -> BaseException:
    """The exception an actor method raised, as its own type (not Ray's wrapper)."""
    cause = exc.cause
    return cause if isinstance(cause, BaseException) else exc


def actor_name(user_id: str) -> str:
    """The Ray actor name of ``user_id``'s conversation (the user id is not readable in it)."""
    return NAME_PREFIX + hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class ActorOptions:
    """How conversation actors are started."""

    max_restarts: int = -1
    activation_timeout_s: float = 60.0
    attempts: int = 6
    num_cpus: float = 0.0


class Registry:
    """Finds or starts the conversation actor of a user id in ``namespace``."""

    def __init__(
        self,
        *,
        namespace: str,
        agent: Agent,
        store_url: str,
        max_message_chars: int,
        options: ActorOptions = ActorOptions(),
    ) -> None:
        self.namespace = namespace
        self.agent = agent
        self.store_url = store_url
        self.max_message_chars = max_message_chars
        self.options = options

    def _lookup_or_create(self, user_id: str) -> Any:
        name = actor_name(user_id)
        try:
            return ray.get_actor(name, namespace=self.namespace)
        except ValueError:
            pass
        try:
            return _RemoteConversation.options(
                name=name,
                namespace=self.namespace,
                lifetime="detached",
                max_restarts=self.options.max_restarts,
                max_task_retries=0,
                num_cpus=self.options.num_cpus,
            ).remote(user_id, self.agent, self.store_url, self.max_message_chars)
        except ActorAlreadyExistsError:
            return ray.get_actor(name, namespace=self.namespace)

    def get_or_start(self, user_id: str) -> Any:
        """A live handle to ``user_id``'s conversation actor, started if needed."""
        deadline = time.monotonic() + self.options.activation_timeout_s
        last: BaseException | None = None
        for attempt in range(self.options.attempts):
            try:
                handle = self._lookup_or_create(user_id)
                ray.get(handle.ready.remote(), timeout=max(0.0, deadline - time.monotonic()))
                return handle
            except RayTaskError as exc:  # ready() itself failed, e.g. the store is down
                raise unwrap_task_error(exc) from None
            except (RayActorError, ValueError) as exc:
                last = exc
            except GetTimeoutError as exc:
                raise self._unavailable(user_id, "it did not become ready in time") from exc
            if time.monotonic() >= deadline:
                break
            time.sleep(min(0.05 * 2**attempt, 1.0))
        raise self._unavailable(user_id, f"{type(last).__name__}: {last}") from last

    async def get_or_start_async(self, user_id: str) -> Any:
        """Async form of :meth:`get_or_start`."""
        deadline = time.monotonic() + self.options.activation_timeout_s
        last: BaseException | None = None
        for attempt in range(self.options.attempts):
            try:
                handle = self._lookup_or_create(user_id)
                await asyncio.wait_for(
                    handle.ready.remote(), timeout=max(0.0, deadline - time.monotonic())
                )
                return handle
            except RayTaskError as exc:  # ready() itself failed, e.g. the store is down
                raise unwrap_task_error(exc) from None
            except (RayActorError, ValueError) as exc:
                last = exc
            except TimeoutError as exc:
                raise self._unavailable(user_id, "it did not become ready in time") from exc
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
        raise self._unavailable(user_id, f"{type(last).__name__}: {last}") from last

    def _unavailable(self, user_id: str, why: str) -> ConversationUnavailable:
        return ConversationUnavailable(
            f"cannot reach or start the conversation of user {user_id!r} "
            f"(actor {actor_name(user_id)!r} in namespace {self.namespace!r}): {why}"
        )
