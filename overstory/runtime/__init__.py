"""The client layer: :func:`connect`, :class:`Runtime` and its conversations and jobs
(:mod:`.client`), its sub-clients ``rt.jobs``, ``rt.quotas``, ``rt.rollouts`` and
``rt.vault`` (:mod:`.jobs`, :mod:`.quotas`, :mod:`.rollouts`, :mod:`.vault`), attaching to or starting Ray (:mod:`.cluster`), and the status and
health probes of a running tree (:mod:`.ops`). The CLI is :mod:`overstory.cli`; the
configuration is :mod:`overstory.config` (re-exported here)."""

from ..config import Config, load_config
from .client import Conversation, Runtime, connect
from .jobs import Job, Jobs
from .quotas import Quotas
from .rollouts import Rollouts
from .vault import Vault

__all__ = [
    "Config",
    "Conversation",
    "Job",
    "Jobs",
    "Quotas",
    "Rollouts",
    "Runtime",
    "Vault",
    "connect",
    "load_config",
]
