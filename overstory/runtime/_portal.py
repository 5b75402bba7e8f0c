"""The client's sync face: one event loop on a daemon thread runs the async core.

The client is written once, async (:meth:`Conversation.send_async`, ...); a sync method
hands its coroutine to the :class:`Portal` and waits for it. A call that is one actor
call with retries (``send``, ``history``, ``info``, ``cancel``) is written once as steps
instead (:mod:`._steps`) and runs on the caller's thread, blocking in ``ray.get``. The caller's context
variables (the current span, above all) travel with the call: the loop starts the task
in a copy of the caller's context. An async generator (a streamed turn) is driven step
by step on the portal's loop and closed there when the caller stops reading.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

__all__ = ["Portal"]

T = TypeVar("T")


class Portal:
    """An event loop on a daemon thread, started on first use."""

    def __init__(self, name: str = "overstory-client") -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _running(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name=self._name, daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def refuse_own_thread(self) -> None:
        """Raise if called on the portal's own thread: a sync method there would wait on
        the loop it blocks."""
        if threading.current_thread() is self._thread:
            raise RuntimeError(
                "a sync client method was called from the client's own event loop: "
                "await its async form (..._async) instead"
            )

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` on the portal's loop and return its result (or raise its error)."""
        loop = self._running()
        try:
            self.refuse_own_thread()
        except RuntimeError:
            work.close()
            raise
        # run_coroutine_threadsafe schedules the task from this thread: it starts in a
        # copy of this thread's context (contextvars), so the caller's span is its parent.
        future = asyncio.run_coroutine_threadsafe(work, loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # KeyboardInterrupt while waiting: stop the work too
            raise

    def iterate(self, source: AsyncIterator[T]) -> Iterator[T]:
        """``source``'s items, each step run on the portal's loop; closing the iterator
        (or leaving it unfinished) closes ``source`` there."""

        async def step() -> tuple[bool, T | None]:
            try:
                return True, await anext(source)
            except StopAsyncIteration:
                return False, None

        async def close() -> None:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                await aclose()

        try:
            while True:
                more, item = self.run(step())
                if not more:
                    return
                yield item  # type: ignore[misc]  # more is True: item is a T
        finally:
            self.run(close())

    def close(self) -> None:
        """Stop the loop (what is still running there is abandoned) and its thread."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if thread is not threading.current_thread():
            thread.join(timeout=5)
        if not loop.is_running():
            loop.close()
