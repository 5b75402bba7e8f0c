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
from types import TracebackType
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


class _Tries:
    """What the attempts of one get-or-create share: the deadline, the backoff between
    attempts, and the last retryable failure (the final error names it).

    Each attempt runs inside ``with tries:``, which gives up at once on a ``TimeoutError`` (the
    wait for ``ready`` ran out of time) and keeps and swallows a failure another attempt
    may get past (:func:`_retryable`); any other error passes through.
    """

    def __init__(self, name: str, namespace: str, timeout_s: float) -> None:
        self.name, self.namespace = name, namespace
        self.deadline = time.monotonic() + timeout_s
        self.last: BaseException | None = None

    def left(self) -> float:
        """Seconds until the deadline."""
        return max(0.0, self.deadline - time.monotonic())

    def pause(self, attempt: int) -> float | None:
        """How long to back off after failed ``attempt`` (``None``: the deadline passed)."""
        if time.monotonic() >= self.deadline:
            return None
        return min(0.05 * 2.0**attempt, 1.0)

    def gave_up(self) -> ConversationUnavailable:
        return ConversationUnavailable(
            f"cannot reach or start actor {self.name!r} in namespace {self.namespace!r}: "
            f"{type(self.last).__name__}: {self.last}"
        )

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if isinstance(exc, TimeoutError):
            message = f"actor {self.name!r} did not become ready in time"
            raise ConversationUnavailable(message) from exc
        if isinstance(exc, RayTaskError | RayActorError | ValueError):
            self.last = _retryable(exc)
            return True
        return False


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
    tries = _Tries(name, namespace, timeout_s)
    for attempt in range(attempts):
        with tries:
            # GCS lookups and registration block: off the caller's event loop.
            handle = await asyncio.to_thread(
                _lookup_or_create, remote_cls, name, namespace, args, options or {}
            )
            info = await asyncio.wait_for(handle.ready.remote(), timeout=tries.left())
            return handle, info
        if (pause := tries.pause(attempt)) is None:
            break
        await asyncio.sleep(pause)
    raise tries.gave_up() from tries.last


def get_or_create_sync(
    remote_cls: Any, name: str, namespace: str, *args: Any, **kwargs: Any
) -> tuple[Any, Any]:
    """Blocking form of :func:`get_or_create` for drivers: the same tries, on an event
    loop of their own in a thread of their own (so a caller inside an event loop blocks
    only itself, never that loop's other work for good)."""
    with ThreadPoolExecutor(1, thread_name_prefix="overstory-get-or-create") as pool:
        work = pool.submit(asyncio.run, get_or_create(remote_cls, name, namespace, *args, **kwargs))
        return work.result()
