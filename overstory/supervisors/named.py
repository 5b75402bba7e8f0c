"""Get-or-create of a named Ray actor that never hands back a dead handle.

GCS name registration is atomic, so of several concurrent creators exactly one wins and
the others look the name up. A handle that turns out dead (ray#44083: ``get_if_exists``
can return an actor that is dying) is dropped and the loop goes round again, bounded by
``attempts`` and a deadline; between attempts it backs off briefly because the GCS frees
a dead actor's name asynchronously and offers nothing to await.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray
from ray.exceptions import ActorAlreadyExistsError, GetTimeoutError, RayActorError, RayTaskError

from ..exceptions import ConversationUnavailable, Passivated

__all__ = ["get_or_create", "get_or_create_sync", "unwrap_task_error"]


def unwrap_task_error(exc: RayTaskError) -> BaseException:
    """The exception an actor method raised, as its own type (not Ray's wrapper)."""
    cause = exc.cause
    return cause if isinstance(cause, BaseException) else exc


def _lookup_or_create(
    remote_cls: Any, name: str, namespace: str, args: tuple[Any, ...], options: dict[str, Any]
) -> Any:
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        pass
    try:
        return remote_cls.options(name=name, namespace=namespace, **options).remote(*args)
    except ActorAlreadyExistsError:
        return ray.get_actor(name, namespace=namespace)


async def get_or_create(
    remote_cls: Any,
    name: str,
    namespace: str,
    args: tuple[Any, ...] = (),
    options: dict[str, Any] | None = None,
    *,
    timeout_s: float = 60.0,
    attempts: int = 8,
) -> tuple[Any, Any]:
    """``(handle, handle.ready())`` of the live actor ``name``, created if absent."""
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    for attempt in range(attempts):
        try:
            handle = _lookup_or_create(remote_cls, name, namespace, args, options or {})
            info = await asyncio.wait_for(
                handle.ready.remote(), timeout=max(0.0, deadline - time.monotonic())
            )
            return handle, info
        except RayTaskError as exc:
            cause = unwrap_task_error(exc)
            if not isinstance(cause, Passivated):  # a dying actor still holds the name
                raise cause from None
            last = cause
        except (RayActorError, ValueError) as exc:
            last = exc
        except TimeoutError as exc:
            raise ConversationUnavailable(f"actor {name!r} did not become ready in time") from exc
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
    raise ConversationUnavailable(
        f"cannot reach or start actor {name!r} in namespace {namespace!r}: "
        f"{type(last).__name__}: {last}"
    ) from last


def get_or_create_sync(
    remote_cls: Any,
    name: str,
    namespace: str,
    args: tuple[Any, ...] = (),
    options: dict[str, Any] | None = None,
    *,
    timeout_s: float = 60.0,
    attempts: int = 8,
) -> tuple[Any, Any]:
    """Blocking form of :func:`get_or_create` for drivers."""
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    for attempt in range(attempts):
        try:
            handle = _lookup_or_create(remote_cls, name, namespace, args, options or {})
            info = ray.get(handle.ready.remote(), timeout=max(0.0, deadline - time.monotonic()))
            return handle, info
        except RayTaskError as exc:
            cause = unwrap_task_error(exc)
            if not isinstance(cause, Passivated):
                raise cause from None
            last = cause
        except (RayActorError, ValueError) as exc:
            last = exc
        except GetTimeoutError as exc:
            raise ConversationUnavailable(f"actor {name!r} did not become ready in time") from exc
        if time.monotonic() >= deadline:
            break
        time.sleep(min(0.05 * 2**attempt, 1.0))
    raise ConversationUnavailable(
        f"cannot reach or start actor {name!r} in namespace {namespace!r}: "
        f"{type(last).__name__}: {last}"
    ) from last
