"""Looking at a running tree: ``status`` and ``health`` (the CLI's commands and the
gateway's ``/readyz``), and attaching to a running cluster for them.

None of these starts Ray. They attach to a running cluster — ``address``, else
``RAY_ADDRESS``, else the instance ``ray start`` left on this machine (``"auto"``), or
``ray://host:10001`` through Ray Client — and fail with
:class:`~overstory.exceptions.ClusterUnavailable` naming the address when there is none.
That makes ``overstory health`` usable as a liveness probe: it can never "repair" a
dead cluster by quietly starting an empty one.

:func:`status` is a dict assembled from sections, one small function each
(:data:`SECTIONS`); a new concern (e.g. provider endpoints) is one more function in
that list. :func:`health` reads the same sections and turns them into problems.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from .._ray import alive_nodes
from ..config import STORE_ENV
from ..exceptions import ClusterUnavailable, ConversationUnavailable
from ..providers.pool import provider_statuses
from ..rollout import read_split
from ..store import open_store, redact_url
from ..supervisors.named import unwrap_task_error
from ..supervisors.tree import CONVERSATIONS, HOSTS, ROOT, running_placement
from .cluster import init_ray

__all__ = [
    "SECTIONS",
    "Probe",
    "attach_existing",
    "health",
    "named_actor",
    "problems",
    "providers_section",
    "status",
    "store_of_tree",
    "tree_store",
]


@dataclass(frozen=True)
class Probe:
    """What the status sections look at: the app's namespace, and how long to wait."""

    namespace: str
    timeout_s: float = 10.0
    fallback_store: str | None = None
    """Store URL to check when the running tree cannot say which one it uses."""


StatusSection = Callable[[Probe], dict[str, Any]]


def attach_existing(
    address: str | None, namespace: str, runtime_env: dict[str, Any] | None = None
) -> str:
    """Connect this process to a *running* Ray cluster; returns the address it used.

    Never starts Ray: with no ``address`` and no ``RAY_ADDRESS`` it looks for an
    instance started with ``ray start`` on this machine and raises
    :class:`ClusterUnavailable` when there is none.
    """
    target = address or os.environ.get("RAY_ADDRESS") or "auto"
    if ray.is_initialized():
        return target
    _check_listening(target)
    try:
        init_ray(target, namespace=namespace, runtime_env=runtime_env)
    except ClusterUnavailable:
        raise
    except (ConnectionError, RuntimeError, ValueError, RayError) as exc:
        raise ClusterUnavailable(
            f"cannot attach to a running Ray cluster at {target!r} "
            f"({type(exc).__name__}: {exc}); overstory's operator commands never start one"
        ) from exc
    return target


def _check_listening(target: str, timeout_s: float = 5.0) -> None:
    """Fail fast when nothing listens at an explicit ``host:port``: Ray would wait minutes."""
    if target == "auto" or ("://" in target and not target.startswith("ray://")):
        return
    host, _, port = target.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # let Ray judge an address of another form
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ClusterUnavailable(
            f"cannot attach to a running Ray cluster at {target!r}: nothing answers there "
            f"({exc}); overstory's operator commands never start one"
        ) from exc


# --- status sections ----------------------------------------------------------------------


def cluster_section(probe: Probe) -> dict[str, Any]:
    """The Ray cluster: alive nodes (with their addresses) and the app's namespace."""
    nodes = alive_nodes()
    return {
        "namespace": probe.namespace,
        "nodes_alive": len(nodes),
        "node_addresses": sorted(str(n.get("NodeManagerAddress", "?")) for n in nodes),
    }


def _placement(probe: Probe) -> str:
    """Which subtree the running tree has: ``hosted`` (a host supervisor) or ``dedicated``."""
    return running_placement(probe.namespace) or "dedicated"


def _ask_tree(probe: Probe, *, on_host: str, on_supervisor: str) -> tuple[bool, Any]:
    """Ask the running tree: the first host that answers ``on_host`` (hosted), else the
    conversation supervisor ``on_supervisor`` (dedicated)."""
    if _placement(probe) == "hosted":
        return _call_a_host(on_host, probe)
    return _call(CONVERSATIONS, on_supervisor, probe)


def tree_section(probe: Probe) -> dict[str, Any]:
    """Whether the root supervisor and the supervisor of the conversations answer."""
    root = _answer(ROOT, probe)
    placement = _placement(probe)
    name, key = (
        (HOSTS, "hosts_supervisor")
        if placement == "hosted"
        else (CONVERSATIONS, "conversations_supervisor")
    )
    child = _answer(name, probe)
    root_info = {"alive": root[0], **({"restarts": root[1].get("restarts")} if root[0] else {})}
    if not root[0]:
        root_info["error"] = root[1]
    child_info: dict[str, Any] = {"alive": child[0]}
    if child[0]:
        child_info["restarts"] = child[1].get("restarts", 0)
    else:
        child_info["error"] = child[1]
    return {"placement": placement, "root": root_info, key: child_info}


def _host_names(probe: Probe) -> list[str]:
    """The hosts of the running tree's shard table (empty when its supervisor is silent)."""
    alive, info = _answer(HOSTS, probe)
    table = info["meta"].get("shard_table") if alive else None  # None: it is starting
    return list(table.hosts) if table is not None else []


def _call_a_host(method: str, probe: Probe) -> tuple[bool, Any]:
    """``method`` on the first host that answers (a model chain, a store URL: every host
    has the same)."""
    found: tuple[bool, Any] = (False, "no host answers")
    for name in _host_names(probe):
        found = _call(name, method, probe)
        if found[0]:
            break
    return found


def _host_rows(probe: Probe) -> list[dict[str, Any]]:
    """Each host's status (an ``error`` row for one that does not answer)."""
    refs: dict[str, Any] = {}
    for name in _host_names(probe):
        handle = named_actor(name, probe.namespace)
        refs[name] = None if handle is None else handle.status.remote()
    rows = []
    for name, ref in refs.items():
        if ref is None:
            rows.append({"host": name, "error": "not running"})
            continue
        try:
            rows.append(ray.get(ref, timeout=probe.timeout_s))
        except (GetTimeoutError, RayActorError, RayTaskError) as exc:
            rows.append({"host": name, "error": f"{type(exc).__name__}"})
    return rows


def conversations_section(probe: Probe) -> dict[str, Any]:
    """Live conversations (total, per node, per host) and the lifecycle counters."""
    counters = ("activations", "passivations", "restarts", "evictions")
    if _placement(probe) == "hosted":
        rows = _host_rows(probe)
        if not rows:
            return {"error": _answer(HOSTS, probe)[1] or "no hosts"}
        ok = [r for r in rows if "error" not in r]
        per_node: dict[str, int] = {}
        for r in ok:
            per_node[r["node_id"]] = per_node.get(r["node_id"], 0) + r["live"]
        hosts = [
            {
                "host": r["host"],
                "node_id": r["node_id"],
                "pid": r["pid"],
                "live": r["live"],
                "busy": r["busy"],
                "memory_uss_mb": round(r["memory"]["uss"] / 2**20, 1),
                "memory_rss_mb": round(r["memory"]["rss"] / 2**20, 1),
                "quarantined": r["quarantined"],
            }
            if "error" not in r
            else r
            for r in rows
        ]
        live = sum(r["live"] for r in ok)
        return {
            "placement": "hosted",
            "live": live,
            "live_conversations": live,
            "per_node": per_node,
            "hosts": hosts,
            **{k: sum(r.get(k, 0) for r in ok) for k in counters},
        }
    alive, info = _answer(CONVERSATIONS, probe)
    if not alive:
        return {"error": info}
    return {
        "placement": "dedicated",
        "live": info.get("live", 0),
        "live_conversations": info.get("live", 0),
        "per_node": info.get("per_node", {}),
        **{k: info.get(k, 0) for k in counters},
    }


def apps_section(probe: Probe) -> dict[str, Any]:
    """The app the tree serves — its source, agents and versions — and each agent's
    rollout split (read from the tree's store, from inside the cluster)."""
    alive, app = _ask_tree(probe, on_host="app", on_supervisor="app_info")
    if not alive:
        return {"error": app}
    url = tree_store(probe) or probe.fallback_store
    splits: dict[str, Any] = {}
    if url is not None:
        ref = _read_splits.remote(url, probe.namespace, app["agents"])
        try:
            splits = ray.get(ref, timeout=probe.timeout_s)
        except (GetTimeoutError, RayError) as exc:
            splits = {"error": f"{type(exc).__name__}"}
    return {
        "source": app.get("source") or "local (connect(agent) from a driver)",
        "deployment": app.get("deployment", 0),
        "default": app["default"],
        "agents": [
            {"name": name, "versions": versions, "split": splits.get(name)}
            for name, versions in app["agents"].items()
        ],
    }


def store_section(probe: Probe) -> dict[str, Any]:
    """Whether the tree's store answers, checked from inside the cluster."""
    url = tree_store(probe) or probe.fallback_store
    if url is None:
        return {"reachable": False, "error": "no running tree to ask for its store URL"}
    result: dict[str, Any] = {"url": redact_url(url)}
    ref = _probe_store.remote(url)
    try:
        ray.get(ref, timeout=probe.timeout_s)
    except GetTimeoutError:
        ray.cancel(ref, force=True)
        return {**result, "reachable": False, "error": f"no answer within {probe.timeout_s} s"}
    except RayTaskError as exc:
        cause = unwrap_task_error(exc)
        return {**result, "reachable": False, "error": f"{type(cause).__name__}: {cause}"}
    except RayError as exc:
        return {**result, "reachable": False, "error": f"{type(exc).__name__}: {exc}"}
    return {**result, "reachable": True}


def providers_section(probe: Probe) -> dict[str, Any]:
    """The default chain in fallback order — each endpoint's circuit and limiter headroom
    — and every other provider actor (users' own keys)."""
    alive, chain = _ask_tree(probe, on_host="models", on_supervisor="models")
    if not alive:
        return {"error": chain}
    endpoints = {s["actor"]: s for s in provider_statuses(probe.namespace, probe.timeout_s)}
    rows = []
    for entry in chain:
        actor = entry["actor"]
        row: dict[str, Any] = {"model": entry["model"]}
        if actor is None:
            row["state"] = "in-process"  # the offline model: no endpoint, always there
        elif actor not in endpoints:
            row["state"] = "not started"  # no call yet: its actor starts on the first one
        else:
            row.update(_endpoint_row(endpoints.pop(actor)))
        rows.append(row)
    return {"chain": rows, "other_endpoints": [_endpoint_row(s) for s in endpoints.values()]}


def _endpoint_row(status: dict[str, Any]) -> dict[str, Any]:
    if "error" in status:
        return {"actor": status["actor"], "state": "unreachable", "error": status["error"]}
    circuit, limits = status["circuit"], status["limits"]
    headroom = {
        "rpm_left": None
        if limits["rpm_limit"] is None
        else limits["rpm_limit"] - limits["rpm_used"],
        "tpm_left": None
        if limits["tpm_limit"] is None
        else limits["tpm_limit"] - limits["tpm_used"],
        "in_flight": limits["in_flight"],
        "waiting": limits.get("waiting", 0),
    }
    return {
        "endpoint": status["endpoint"],
        "state": circuit["state"],
        "reason": circuit["reason"],
        "headroom": headroom,
        "calls": status["calls"],
        "failures": status["failures"],
    }


#: The sections of :func:`status`, in order. Add a concern by adding a function here.
SECTIONS: list[tuple[str, StatusSection]] = [
    ("cluster", cluster_section),
    ("tree", tree_section),
    ("apps", apps_section),
    ("conversations", conversations_section),
    ("store", store_section),
    ("providers", providers_section),
]


def status(
    probe: Probe, sections: Sequence[tuple[str, StatusSection]] | None = None
) -> dict[str, Any]:
    """Every section's report, keyed by section name (JSON-serialisable)."""
    return {name: section(probe) for name, section in sections or SECTIONS}


# --- health -------------------------------------------------------------------------------

_HEALTH_SECTIONS: list[tuple[str, StatusSection]] = [
    ("tree", tree_section),
    ("apps", apps_section),
    ("store", store_section),
    ("providers", providers_section),
]


def problems(report: dict[str, Any]) -> list[str]:
    """What makes a status report unhealthy, one sentence each (empty: healthy)."""
    found = []
    tree = report.get("tree", {})
    for key, label in (
        ("root", "root supervisor"),
        ("hosts_supervisor", "host supervisor"),
        ("conversations_supervisor", "conversation supervisor"),
    ):
        if key != "root" and key not in tree:
            continue  # the other placement's supervisor
        part = tree.get(key, {})
        if not part.get("alive", False):
            found.append(f"{label} is not running: {part.get('error', 'unknown')}")
    apps = report.get("apps", {})
    if "error" in apps:  # e.g. the hosts cannot import the deployed app
        found.append(f"the app cannot be served: {apps['error']}")
    store = report.get("store", {})
    if not store.get("reachable", False):
        found.append(
            f"store {store.get('url', '?')} does not answer: {store.get('error', 'unknown')}"
        )
    chain = report.get("providers", {}).get("chain")
    usable = ("in-process", "not started", "closed", "half_open")
    if chain is not None and not any(row["state"] in usable for row in chain):
        states = "; ".join(
            f"{row['model']}: {row['state']} {row.get('reason', '')}".strip() for row in chain
        )
        found.append(f"no model of the chain can answer: {states}")
    return found


def health(probe: Probe) -> list[str]:
    """Problems of the tree, the store and the model chain (empty: healthy): unhealthy
    when no model of the default chain can answer. Attach first."""
    return problems(status(probe, _HEALTH_SECTIONS))


# --- helpers ------------------------------------------------------------------------------


def named_actor(name: str, namespace: str) -> Any:
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def _answer(name: str, probe: Probe) -> tuple[bool, Any]:
    """``(True, status dict)`` when the named supervisor answers, else ``(False, why)``."""
    return _call(name, "status", probe)


def _call(name: str, method: str, probe: Probe) -> tuple[bool, Any]:
    """``(True, result)`` of ``method`` on a named actor, else ``(False, why)``."""
    handle = named_actor(name, probe.namespace)
    if handle is None:
        return False, f"no actor {name!r} in namespace {probe.namespace!r}"
    try:
        return True, ray.get(getattr(handle, method).remote(), timeout=probe.timeout_s)
    except GetTimeoutError:
        return False, f"{name!r} did not answer within {probe.timeout_s} s"
    except RayTaskError as exc:  # it answered with an error: say which
        cause = unwrap_task_error(exc)
        return False, f"{name!r} failed: {type(cause).__name__}: {cause}"[:500]
    except RayActorError as exc:
        return False, f"{name!r} is dead or restarting ({type(exc).__name__})"


def _store_url_of(supervisor: Any) -> str:
    return str(supervisor.store_url)


def store_of_tree(namespace: str, fallback: str | None) -> str:
    """The store URL the running tree uses (the operator's commands must write there)."""
    url = tree_store(Probe(namespace)) or fallback or os.environ.get(STORE_ENV)
    if url is None:
        raise ConversationUnavailable(
            f"cannot tell which store the tree in {namespace!r} uses; pass --store"
        )
    return url


def tree_store(probe: Probe) -> str | None:
    """The store URL the running tree writes to (``None``: unknown)."""
    if _placement(probe) == "hosted":
        alive, url = _call_a_host("store_url", probe)
        return str(url) if alive else None
    handle = named_actor(CONVERSATIONS, probe.namespace)
    if handle is None:
        return None
    try:
        found: str = ray.get(handle.__ray_call__.remote(_store_url_of), timeout=probe.timeout_s)
    except (RayError, AttributeError):
        return None
    return found


@ray.remote(num_cpus=0, max_retries=0)
def _read_splits(url: str, namespace: str, agents: dict[str, list[str]]) -> dict[str, Any]:
    """Each agent's stored split (:meth:`~overstory.rollout.Split.describe`)."""

    async def go() -> dict[str, Any]:
        store = open_store(url)
        await store.open()
        try:
            return {
                name: (await read_split(store, namespace, name, versions)).describe()
                for name, versions in agents.items()
            }
        finally:
            await store.close()

    return asyncio.run(go())


@ray.remote(num_cpus=0, max_retries=0)
def _probe_store(url: str) -> bool:
    """Open the store, read one count, close it — on a cluster node, as the actors do."""

    async def go() -> bool:
        store = open_store(url)
        await store.open()
        try:
            await store.count("\x00probe")
        finally:
            await store.close()
        return True

    return asyncio.run(go())
