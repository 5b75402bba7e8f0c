"""The client layer: :func:`connect`, :class:`Runtime` and its conversations and jobs
(:mod:`.client`), attaching to or starting Ray (:mod:`.cluster`), and the status and
health probes of a running tree (:mod:`.ops`). The CLI is :mod:`overstory.cli`; the
configuration is :mod:`overstory.config` (re-exported here)."""

from ..config import Config, load_config
from .client import Conversation, Job, Runtime, connect

__all__ = ["Config", "Conversation", "Job", "Runtime", "connect", "load_config"]
