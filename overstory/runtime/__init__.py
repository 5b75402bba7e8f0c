"""Attach to / start Ray, configuration, the client API and the CLI."""

from .client import Conversation, Job, Runtime, connect
from .config import Config, load_config

__all__ = ["Config", "Conversation", "Job", "Runtime", "connect", "load_config"]
