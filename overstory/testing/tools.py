"""Tools and output types for tests and chaos runs, importable wherever overstory is
installed (hosts too: a type a turn asks for crosses Ray by reference).

``block`` is a *sync* tool that holds its thread: overstory runs sync tools off the
event loop, so a blocking tool delays only its own conversation. ``Forecast`` is a
structured output type.
"""

from __future__ import annotations

import time

import pydantic

__all__ = ["Forecast", "block"]


class Forecast(pydantic.BaseModel):
    """A structured answer: a city's weather."""

    city: str
    celsius: float
    sunny: bool


def block(seconds: float) -> str:
    """Block the calling thread for ``seconds`` (at most 600), then say so."""
    time.sleep(max(0.0, min(float(seconds), 600.0)))
    return f"blocked {seconds:g} s"
