"""Booting the tree and deploying an app (``overstory serve [MODULE:ATTR]``), moving its versions
(``overstory rollout | promote | rollback``), on a running cluster.

Serving an app is check first, then change: the path is imported here (a typo fails in
a second, naming the reason), then on every alive node as the hosts will import it
(inside the ``--working-dir`` package when there is one). Only when both work is the
deployment recorded in the store and the running tree moved onto it
(:meth:`~overstory.registry.Registry.redeploy`) — so a bad path changes nothing that
runs. Each rollout command changes one agent's split by compare-and-set in the store,
then tells whatever serves conversations to read it again, and returns the split.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .._ray import actor_id, alive_nodes
from ..agent import is_plain_name
from ..app import App, AppLoadError, conversation_id, load_app
from ..config import Config
from ..exceptions import ConfigError, ConversationUnavailable, UsageError
from ..rollout import read_deployment, read_split, write_deployment
from ..runtime.client import Runtime, connect
from ..runtime.ops import Probe, attach_existing, named_actor, tree_store
from ..store import HistoryStore, redact_url, run_on_store
from ..supervisors.named import unwrap_task_error
from ..supervisors.tree import ROOT, is_running, running_placement

__all__ = [
    "adopt_histories",
    "change_split",
    "check_on_nodes",
    "import_here",
    "serve",
    "serve_app",
    "splits",
    "unprefixed",
    "working_dir_env",
]

#: How long importing the app on one node may take (a working dir is fetched first).
PROBE_TIMEOUT_S = 120.0


def working_dir_env(working_dir: str | None) -> dict[str, Any] | None:
    """The job's ``runtime_env`` for ``--working-dir`` (checked: an existing directory)."""
    if working_dir is None:
        return None
    path = Path(working_dir).expanduser().resolve()
    if not path.is_dir():
        raise UsageError(f"--working-dir {working_dir!r} is not a directory")
    return {"working_dir": str(path)}


def _uploaded_working_dir() -> str | None:
    """The ``gcs://`` URI Ray gave this job's working dir (the hosts are started with it)."""
    env = ray.get_runtime_context().runtime_env
    uri = env.get("working_dir") if env else None
    return str(uri) if uri else None


@ray.remote(num_cpus=0, max_retries=0, max_calls=1)
def _describe_app(source: str) -> dict[str, Any]:
    """Import the app on a node, as its hosts will, and describe it. In a fresh worker
    (``max_calls=1``): a pooled one may hold an earlier import of the same module."""
    return load_app(source).describe()


def check_on_nodes(source: str, working_dir: str | None) -> dict[str, Any]:
    """Import ``source`` on every alive node; :class:`AppLoadError` naming the node and
    the reason when one cannot. Returns the app's description."""
    options: dict[str, Any] = {}
    if working_dir is not None:
        options["runtime_env"] = {"working_dir": working_dir}
    refs = {}
    for node in alive_nodes():
        strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        address = node.get("NodeManagerAddress", node["NodeID"][:12])
        refs[address] = _describe_app.options(scheduling_strategy=strategy, **options).remote(
            source
        )
    described: dict[str, Any] = {}
    for address, ref in refs.items():
        try:
            described = ray.get(ref, timeout=PROBE_TIMEOUT_S)
        except RayTaskError as exc:
            cause = unwrap_task_error(exc)
            if not isinstance(cause, AppLoadError):  # Ray's error shows the remote traceback
                raise AppLoadError(f"on node {address}: {type(cause).__name__}: {cause}") from exc
            # Not chained: the cause crossed Ray with its own cause's traceback written
            # into its message (AppLoadError.__reduce__), so chaining prints it twice.
            raise AppLoadError(f"on node {address}: {cause}") from None
        except GetTimeoutError as exc:
            ray.cancel(ref, force=True)
            raise AppLoadError(
                f"app {source!r} did not import on node {address} within {PROBE_TIMEOUT_S:g} s"
            ) from exc
        except RayError as exc:  # e.g. the working dir could not be set up there
            raise AppLoadError(
                f"app {source!r} cannot run on node {address}: {type(exc).__name__}: {exc}"
            ) from exc
    return described


def import_here(source: str, working_dir: str | None) -> App:
    """Import ``source`` in this process (from ``working_dir`` when given): a bad path
    fails here, in a second, before anything on the cluster is touched."""
    if working_dir is not None:
        sys.path.insert(0, str(Path(working_dir).expanduser().resolve()))
    return load_app(source)


def serve_app(config: Config, app: App, shipped: bool) -> dict[str, Any]:
    """Deploy ``app`` (imported by :func:`import_here`) to the namespace; this process
    is attached to the cluster already, with the working dir as its job's
    ``runtime_env`` when ``shipped``.

    Raises :class:`AppLoadError` (nothing changed) when it does not import on a node,
    :class:`ConfigError` when the running tree has the other placement.
    """
    source = app.source
    assert source is not None
    uri = _uploaded_working_dir() if shipped else None
    check_on_nodes(source, uri)
    namespace = config.namespace
    running = running_placement(namespace)
    if running is not None and running != app.placement:
        raise ConfigError(
            f"the tree running in namespace {namespace!r} serves {running} placement; "
            f"app {source!r} asks for {app.placement}: use another namespace"
        )
    existed = is_running(ROOT, namespace)
    record = run_on_store(config.store, lambda s: write_deployment(s, namespace, source, app, uri))
    runtime = connect(config=config)  # boots the tree from the record if none runs
    try:
        moved = runtime.registry.redeploy() if existed else {}
        served = runtime.served()
    finally:
        runtime.close()
    return {
        "source": source,
        "deployment": record.generation,
        "working_dir": uri,
        "app": served,
        "redeployed": moved,
        "splits": {name: splits(config, name) for name in app.names},
    }


# --- serve --------------------------------------------------------------------------------


def serve(
    config: Config, source: str | None = None, working_dir: str | None = None
) -> dict[str, Any]:
    """Boot the supervision tree on the running cluster, or attach to the one running;
    with ``source`` (``module:attr``), deploy that app to it
    (:func:`serve_app`).

    Idempotent: the root is a named detached actor, created atomically by the GCS, so
    running this twice (or on two machines at once) leaves exactly one tree. The
    process may exit afterwards; the tree stays. Returns what it found and did.
    """
    if working_dir is not None and source is None:
        raise UsageError("--working-dir needs an app to serve (MODULE:ATTR)")
    runtime_env = working_dir_env(working_dir)
    app = None if source is None else import_here(source, working_dir)  # fails fast
    attach_existing(config.ray_address, config.namespace, runtime_env)
    existed = named_actor(ROOT, config.namespace) is not None
    deployed: dict[str, Any] = {}
    if app is not None:
        deployed = serve_app(config, app, working_dir is not None)
    # ray is initialised now, so connect() attaches and never starts a local Ray; it
    # also opens the store once, so an unreachable store fails here, on the head.
    runtime = connect(config=config)
    root = named_actor(ROOT, config.namespace)
    result: dict[str, Any] = {
        "namespace": config.namespace,
        "booted": not existed,
        "root_actor_id": actor_id(root) if root is not None else None,
        "store": redact_url(tree_store(Probe(config.namespace)) or runtime.config.store),
        **deployed,
    }
    if not deployed:
        result["app"] = runtime.served()
    runtime.close()
    return result


def splits(config: Config, agent: str) -> dict[str, Any]:
    """Agent ``agent``'s split as stored (the first version listed is live before any
    rollout)."""
    namespace = config.namespace

    async def read(store: Any) -> dict[str, Any]:
        record = await read_deployment(store, namespace)
        versions = (record.app["agents"] if record else {}).get(agent) or ["?"]
        return (await read_split(store, namespace, agent, versions)).describe()

    result: dict[str, Any] = run_on_store(config.store, read)
    return result


def change_split(
    config: Config, verb: str, change: Callable[[Runtime], dict[str, Any]]
) -> dict[str, Any]:
    """Run a split change (``rt.rollouts.start``, ``.promote``, ``.rollback``) against the
    tree running in the namespace; never boots one."""
    if not is_running(ROOT, config.namespace):
        raise ConversationUnavailable(
            f"no overstory tree runs in namespace {config.namespace!r}: nothing to {verb}; "
            "`overstory serve MODULE:ATTR` first"
        )
    runtime = connect(config=config)
    try:
        return change(runtime)
    finally:
        runtime.close()


# --- histories from before apps ---------------------------------------------------------


def unprefixed(ids: list[str]) -> tuple[list[str], list[str]]:
    """``(to_copy, ambiguous)`` among stored conversation ids: ids written before
    conversations were ``agent:user`` (no ``:``, or a prefix no agent could be named)
    are copied; an id that *looks* like ``agent:user`` cannot be told apart from a
    user id with a colon, so it is reported, never moved."""
    to_copy, ambiguous = [], []
    for cid in ids:
        prefix, sep, rest = cid.partition(":")
        if not sep or not rest or not is_plain_name(prefix):
            to_copy.append(cid)
        else:
            ambiguous.append(cid)
    return to_copy, ambiguous


async def adopt_histories(
    store: HistoryStore, agent: str, *, dry_run: bool = False
) -> dict[str, Any]:
    """Copy every history stored under a bare user id (before apps) to that user's
    conversation with ``agent``, so it answers with its past. The old records stay (a
    store never deletes). A target that holds other messages is left alone; one that
    holds the start of the same history (a run cut short) is completed, so running it
    again is safe and copies nothing twice."""
    if not is_plain_name(agent):
        raise UsageError(f"{agent!r} is not an agent name")
    to_copy, ambiguous = unprefixed(await store.conversation_ids())
    copied, skipped, messages = [], [], 0
    for old in to_copy:
        new = conversation_id(agent, old)
        history = await store.load(old)
        there = await store.load(new)
        if there != history[: len(there)] or len(there) == len(history):
            skipped.append(old)  # in use, or copied already
            continue
        copied.append(old)
        messages += len(history) - len(there)
        if dry_run:
            continue
        epoch = await store.acquire(new)  # fences any entity that raced us to it
        for message in history[len(there) :]:
            await store.append(new, message, epoch=epoch)
    return {
        "agent": agent,
        "dry_run": dry_run,
        "copied": copied,
        "messages": messages,
        "already_there_or_in_use": skipped,
        "ambiguous_not_moved": ambiguous,
    }
