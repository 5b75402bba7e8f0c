"""Conversation actors and the pure logic of a turn."""

from .conversation import ConversationActor
from .turn import is_complete, run_turn

__all__ = ["ConversationActor", "is_complete", "run_turn"]
