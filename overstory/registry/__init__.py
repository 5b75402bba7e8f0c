"""User id -> conversation actor handle (get-or-start)."""

from .registry import ActorOptions, Registry, actor_name

__all__ = ["ActorOptions", "Registry", "actor_name"]
