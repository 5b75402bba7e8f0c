"""The conversation entity, written once: state, turn gate, the turn, turn logs.

Both placements run this code; the Ray actors in :mod:`overstory.actors` are thin shells
around it that own activation, passivation and transport only.
"""

from .turn import is_complete, run_turn

__all__ = ["is_complete", "run_turn"]
