"""Attaching to Ray, or starting a local instance when there is none."""

from __future__ import annotations

import logging
import os

import ray

__all__ = ["attach", "detach"]


def attach(
    address: str | None,
    namespace: str,
    *,
    dashboard: bool = False,
    env_vars: dict[str, str] | None = None,
) -> bool:
    """Make sure this process is connected to Ray; ``True`` if it started a local Ray.

    Uses ``address``, else ``RAY_ADDRESS``, else an instance started with ``ray start``
    on this machine, else starts a local one (which :func:`detach` stops again) — with
    the dashboard only when ``dashboard`` is true. ``env_vars`` reach every worker of
    this job (and the actors it starts): the telemetry settings travel this way.
    """
    if ray.is_initialized():
        return False
    ray.init(
        address=address or os.environ.get("RAY_ADDRESS") or None,
        namespace=namespace,
        logging_level=logging.WARNING,
        log_to_driver=False,
        configure_logging=False,
        include_dashboard=dashboard,
        runtime_env={"env_vars": dict(env_vars)} if env_vars else None,
    )
    node = getattr(ray._private.worker, "_global_node", None)
    return bool(getattr(node, "head", False))


def detach() -> None:
    """Disconnect; if this process started Ray, that also stops every Ray process it ran."""
    if ray.is_initialized():
        ray.shutdown()
