"""Supervision with OTP semantics: pure decisions (``core``), thin Ray shells around them.

``spec``          strategies, restart types, intensity defaults, validated child specs
``core``          which children restart, in what order, and when to give up — pure
``tree``          the root supervisor and :func:`boot` (one named tree per namespace)
``conversations`` the dynamic supervisor of conversation actors (and the live registry)

The package exports what ``spec`` and ``core`` export (their ``__all__``); the Ray shells
are imported from their own modules.
"""

from . import core, spec
from .core import *  # noqa: F403
from .spec import *  # noqa: F403

__all__: list[str] = []
__all__ += core.__all__
__all__ += spec.__all__
