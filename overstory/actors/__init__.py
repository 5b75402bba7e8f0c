"""The Ray actors: thin shells around the conversation entity (:mod:`overstory.conversation`)."""

from .conversation import ConversationActor

__all__ = ["ConversationActor"]
