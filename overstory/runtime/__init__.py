"""Attach to / start Ray, configuration, the client API and the CLI."""

from .client import Conversation, Runtime, connect
from .config import Config, load_config

__all__ = ["Config", "Conversation", "Runtime", "connect", "load_config"]
