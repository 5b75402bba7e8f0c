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


def test_a_quiet_process_trims_after_quiet_s_then_at_doubling_waits_until_last_s() -> None:
    quiet = QuietTrim(quiet_s=10, last_s=40)
    assert not quiet.due(last_active=100.0, now=105.0)  # still within the spell
    assert quiet.due(last_active=100.0, now=110.0)  # quiet for 10 s
    assert not quiet.due(last_active=100.0, now=115.0)
    assert quiet.due(last_active=100.0, now=121.0)  # 20 s
    assert quiet.due(last_active=100.0, now=141.0)  # 40 s: the last of this spell
    assert not quiet.due(last_active=100.0, now=1000.0)
    assert not quiet.due(last_active=1000.0, now=1005.0)  # a new spell ...
    assert quiet.due(last_active=1000.0, now=1010.0)  # ... starts over
    assert quiet.trims == 4
    with pytest.raises(ValueError, match="quiet_s"):
        QuietTrim(quiet_s=0)
