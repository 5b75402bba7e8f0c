"""Giving freed memory back to the operating system once a busy process goes quiet.

A burst of 500 streams leaves a host or the door's replica holding memory it has freed:
CPython returns its small-object arenas only when they are wholly empty, and glibc's
allocator keeps freed pages in its heaps, so the resident size stays at the burst's
high-water mark long after the burst (measured on this machine: +20 MB over two hosts,
+26 MB on the replica, flat 330 s later). ``malloc_trim(0)`` hands glibc's free pages
back (``madvise(MADV_DONTNEED)`` on every free page of every heap, not only the top
one); Dask's workers do the same. It costs a few milliseconds for a heap of a few hundred
megabytes, so a process calls it a few times per busy spell, once it has gone quiet
(:class:`QuietTrim`), never per request. What CPython's arenas still hold (a page with
one live object keeps its arena) stays: that part of a burst is not given back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable

__all__ = ["QuietTrim", "trim"]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim with
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn  # type: ignore[no-any-return]


def _resident() -> int:
    """This process's resident set in bytes (``/proc/self/statm``; 0 where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def trim() -> int | None:
    """Give the allocator's free pages back to the OS: the bytes the resident set fell
    by (0: nothing to give), ``None`` where it cannot (no glibc)."""
    fn = _malloc_trim()
    if fn is None:
        return None
    before = _resident()
    fn(0)
    return max(0, before - _resident())


class QuietTrim:
    """When to :func:`trim`: after ``quiet_s`` without activity, then again each time the
    quiet has lasted twice as long (memory freed late, a connection closed, a cache
    aged out, is given back too), up to ``last_s``; a new spell of activity starts over.

    ``due(last_active, now)`` is asked on a timer (a host's sweep, the door's upkeep) with
    the time of the process's latest activity (both monotonic seconds).
    """

    def __init__(self, quiet_s: float = 10.0, last_s: float = 640.0) -> None:
        if not 0 < quiet_s <= last_s:
            raise ValueError(f"0 < quiet_s <= last_s, got quiet_s={quiet_s!r}, last_s={last_s!r}")
        self.quiet_s, self.last_s = quiet_s, last_s
        self._spell = float("-inf")  # the activity the waits count from
        self._wait = quiet_s
        self.trims = 0

    def due(self, last_active: float, now: float) -> bool:
        if last_active != self._spell:
            self._spell, self._wait = last_active, self.quiet_s
        if self._wait > self.last_s or now - last_active < self._wait:
            return False
        self._wait *= 2
        self.trims += 1
        return True
