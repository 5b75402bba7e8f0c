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
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray.exceptions import ActorAlreadyExistsError, RayActorError, RayTaskError

from ..exceptions import ConversationUnavailable, Passivated

__all__ = ["SUPERVISED", "get_or_create", "get_or_create_sync", "unwrap_task_error"]

#: Ray options of every actor in the tree: outlives its driver, restarted in place by Ray
#: (the supervisor decides what a restart means), never retries a call on its own, and
#: holds no CPU (they wait on I/O; a 2-core node would otherwise fit two of them).
SUPERVISED: dict[str, Any] = {
    "lifetime": "detached",
    "max_restarts": -1,
    "max_task_retries": 0,
    "num_cpus": 0,
}


def unwrap_task_error(exc: RayTaskError) -> BaseException:
    """The exception an actor method raised, as its own type (not Ray's wrapper)."""
    cause = exc.cause
    return cause if isinstance(cause, BaseException) else exc


def _retryable(exc: BaseException) -> BaseException:
    """The failure of one attempt if another attempt may succeed; raises it otherwise.

    A dead handle (or a name freed between lookup and use) and an actor that is
    passivating (it still holds the name) are worth another attempt; an error the
    actor's ``ready`` raised itself (e.g. its store is down) is not.
    """
    if isinstance(exc, RayTaskError):
        cause = unwrap_task_error(exc)
        if not isinstance(cause, Passivated):
            raise cause from exc
        return cause
    if isinstance(exc, RayActorError | ValueError):
        return exc
    raise exc


def _gave_up(name: str, namespace: str, last: BaseException | None) -> ConversationUnavailable:
    return ConversationUnavailable(
        f"cannot reach or start actor {name!r} in namespace {namespace!r}: "
        f"{type(last).__name__}: {last}"
    )


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
            # GCS lookups and registration block: off the caller's event loop.
            handle = await asyncio.to_thread(
                _lookup_or_create, remote_cls, name, namespace, args, options or {}
            )
            info = await asyncio.wait_for(
                handle.ready.remote(), timeout=max(0.0, deadline - time.monotonic())
            )
            return handle, info
        except TimeoutError as exc:
            raise ConversationUnavailable(f"actor {name!r} did not become ready in time") from exc
        except (RayTaskError, RayActorError, ValueError) as exc:
            last = _retryable(exc)
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
    raise _gave_up(name, namespace, last) from last


def get_or_create_sync(
    remote_cls: Any, name: str, namespace: str, *args: Any, **kwargs: Any
) -> tuple[Any, Any]:
    """Blocking form of :func:`get_or_create` for drivers: the same tries, on an event
    loop of their own in a thread of their own (so a caller inside an event loop blocks
    only itself, never that loop's other work for good)."""
    with ThreadPoolExecutor(1, thread_name_prefix="overstory-get-or-create") as pool:
        work = pool.submit(asyncio.run, get_or_create(remote_cls, name, namespace, *args, **kwargs))
        return work.result()
