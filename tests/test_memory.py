"""Giving freed memory back to the OS (overstory.memory): no Ray."""

from __future__ import annotations

import psutil
import pytest

from overstory.memory import QuietTrim, _malloc_trim, trim

MB = 1 << 20


def test_trim_gives_a_freed_heap_back_to_the_os() -> None:
    if _malloc_trim() is None:
        pytest.skip("malloc_trim is glibc's: nothing to give back with elsewhere")
    me = psutil.Process()
    blocks = [bytearray(4096) for _ in range(50_000)]  # 200 MB in malloc's heap
    top = bytearray(4096)  # allocated last: the heap cannot shrink from its end
    del blocks  # freed, and still resident: free() only trims the heap's top
    before = me.memory_info().rss
    given = trim()
    after = me.memory_info().rss
    assert before - after > 100 * MB, (before // MB, after // MB)
    assert given is not None
    assert abs(given - (before - after)) < 10 * MB  # what it says it gave back
    assert len(top) == 4096


def test_a_busy_spell_is_trimmed_once_after_it_has_been_quiet_for_quiet_s() -> None:
    quiet = QuietTrim(quiet_s=10)
    assert not quiet.due(last_active=float("-inf"), now=0.0)  # never busy: nothing to give
    assert not quiet.due(last_active=100.0, now=105.0)  # still within the spell
    assert quiet.due(last_active=100.0, now=110.0)
    assert not quiet.due(last_active=100.0, now=140.0)  # idle since: once, not every tick
    assert not quiet.due(last_active=150.0, now=155.0)  # a new spell ...
    assert quiet.due(last_active=150.0, now=170.0)  # ... trimmed once it is over
    assert quiet.trims == 2
    with pytest.raises(ValueError, match="quiet_s must be > 0"):
        QuietTrim(quiet_s=0)
