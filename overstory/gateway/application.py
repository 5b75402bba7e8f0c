"""The front door as a Ray Serve application builder: what a Serve config names as its
``import_path`` (``serve deploy``, KubeRay's RayService ``serveConfigV2``)::

    applications:
      - name: overstory-gateway
        import_path: overstory.gateway.application:build
        route_prefix: /
        args: {namespace: overstory}

The door reaches the tree by its named actors, so it must run in the tree's Ray cluster
(``deploy/k8s/rayservice.yaml`` boots the tree on the same head). ``args`` (all
optional): ``namespace`` (the tree's, default ``overstory``), ``store`` (default
``$OVERSTORY_STORE``; there is no SQLite fallback, a file on one node is not the tree's
store), ``limits`` (:class:`~overstory.gateway.app.DoorLimits` fields) and ``jwt``
(:class:`~overstory.gateway.tokens.JwtSettings` fields; none: API keys only). Replicas
and autoscaling belong to the config's ``deployments`` entry for ``GatewayDeployment``.
``overstory serve --http`` deploys the same deployment without a config file.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from ray import serve

from ..config import DEFAULT_NAMESPACE, STORE_ENV, Config
from ..exceptions import ConfigError
from .app import DoorLimits
from .serve import GatewayDeployment
from .tokens import JwtSettings

__all__ = ["ARGS", "build"]

#: The ``args`` a Serve config may give :func:`build`.
ARGS = ("namespace", "store", "limits", "jwt")


def build(args: dict[str, Any]) -> serve.Application:
    """The door bound to the tree in ``args['namespace']``; raises ``ConfigError``
    naming any unknown or bad argument, before Serve deploys anything."""
    unknown = sorted(set(args) - set(ARGS))
    if unknown:
        raise ConfigError(f"the door's args: unknown {unknown}; known: {', '.join(ARGS)}")
    store = args.get("store") or os.environ.get(STORE_ENV)
    if not store:
        raise ConfigError(
            f"the door needs the tree's store: set {STORE_ENV} on the cluster's nodes "
            "or give args.store"
        )
    config = Config.from_mapping(
        {"namespace": args.get("namespace") or DEFAULT_NAMESPACE, "store": store},
        source="the door's args",
    )
    limits = args.get("limits")
    if limits is not None:
        limits = dataclasses.asdict(_fields(DoorLimits, "limits", limits))
    jwt = None if args.get("jwt") is None else _fields(JwtSettings, "jwt", args["jwt"])
    deployment: Any = GatewayDeployment
    app: serve.Application = deployment.bind(config.namespace, config.store, limits, jwt)
    return app


def _fields(cls: Any, name: str, value: object) -> Any:
    if not isinstance(value, Mapping):
        raise ConfigError(f"the door's args.{name} must be a mapping, got {value!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"the door's args.{name}: unknown {unknown}; known: {sorted(known)}")
    if isinstance(value.get("algorithms"), list):  # YAML has lists, JwtSettings tuples
        value = {**value, "algorithms": tuple(value["algorithms"])}
    return cls(**value)
