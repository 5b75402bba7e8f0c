"""Attach to / start Ray, configuration, the client API and the CLI."""

from ..config import Config, load_config
from .client import Conversation, Job, Runtime, connect

__all__ = ["Config", "Conversation", "Job", "Runtime", "connect", "load_config"]
