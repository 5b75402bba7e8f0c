"""User id -> conversation actor handle (get-or-start through the supervision tree)."""

from ..actors.names import NAME_PREFIX, actor_name
from .registry import Registry

__all__ = ["NAME_PREFIX", "Registry", "actor_name"]
