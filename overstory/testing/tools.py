"""Tools for tests and chaos runs, importable wherever overstory is installed (hosts too).

``block`` is a *sync* tool that holds its thread: overstory runs sync tools off the
event loop, so a blocking tool delays only its own conversation.
"""

from __future__ import annotations

import time

__all__ = ["block"]


def block(seconds: float) -> str:
    """Block the calling thread for ``seconds`` (at most 600), then say so."""
    time.sleep(max(0.0, min(float(seconds), 600.0)))
    return f"blocked {seconds:g} s"
