"""User id -> where the conversation lives (the client side of the registry).

Two placements (:data:`overstory.agent.Placement`):

* ``hosted`` (default): the conversation is an entity in the host its shard maps to
  (:mod:`overstory.sharding`, :mod:`.hosts`). The registry holds a :class:`~.hosts.HostRouter`;
  there is nothing to start — the host activates the entity on its first call.
* ``dedicated``: the conversation is a named actor of its own. The registry's state —
  which are live, on which node, since when — lives in the
  :class:`~overstory.supervisors.conversations.ConversationSupervisor`, the one actor that
  starts and stops them; concurrent requests for one user are serialised there.

Either way the registry boots the supervision tree when there is none (its shape
follows the agent's placement) and refuses a tree of the other placement by name.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from ..actors.jobs import JOBS, JobRunner, OpenTurns
from ..actors.names import actor_name
from ..agent import Placement
from ..app import App
from ..config import Config
from ..exceptions import ConfigError, ConversationUnavailable, StaleShardTable, UnknownAgent
from ..providers import Secret
from ..supervisors import ChildSpec, SupervisorSpec
from ..supervisors.conversations import ConversationSupervisor
from ..supervisors.named import SUPERVISED, unwrap_task_error
from ..supervisors.tree import CONVERSATIONS, HOSTS, NamedChild, boot, running_placement
from .hosts import HostRouter, hosts_child, resize_hosts

__all__ = ["Registry", "actor_name"]

_RemoteConversations: Any = ray.remote(ConversationSupervisor)
_RemoteJobRunner: Any = ray.remote(JobRunner)

#: How often a request is re-sent after the supervisor itself died under it.
_ATTEMPTS = 3


class _Placed(ABC):
    """What differs between the placements where the registry meets them, chosen once
    (:data:`_PLACED`): the actor supervising the conversations, how the tree's child
    for them is made, who says which app is served, passivation, status, the serving
    processes, rebalancing, and what a new handle targets."""

    placement: Placement
    supervisor: str  # the named actor supervising the conversations

    @abstractmethod
    def child(self, registry: Registry) -> ChildSpec: ...

    @abstractmethod
    def app_sources(
        self, registry: Registry, whole: bool = False
    ) -> list[tuple[str, Callable[[], Any]]]:
        """``(actor name, ask)`` pairs whose ``ask()`` gives an ``ObjectRef`` of the app
        the tree serves (its description; ``whole``: the app itself), in the order to
        ask them."""

    @abstractmethod
    def passivate(self, registry: Registry, user_id: str, reason: str) -> bool: ...

    @abstractmethod
    def status(self, registry: Registry) -> dict[str, Any]: ...

    @abstractmethod
    def serving_pids(self, registry: Registry) -> list[int]:
        """The processes serving conversations now (what a chaos monkey strikes)."""

    def rebalance(self, registry: Registry, hosts: int | None) -> dict[str, Any]:
        raise ConfigError(f"rebalance applies to hosted placement; this tree is {self.placement}")

    async def handle(
        self, registry: Registry, cid: str, api_keys: Mapping[str, Secret] | None
    ) -> Any:
        """What a new conversation handle holds to reach ``cid`` (its transport's
        ``handle``): the dedicated actor, started if needed; ``None`` when hosted."""
        return None


class _Hosted(_Placed):
    placement: Placement = "hosted"
    supervisor = HOSTS

    def child(self, registry: Registry) -> ChildSpec:
        return hosts_child(registry.namespace, registry.app, registry.config)

    def app_sources(
        self, registry: Registry, whole: bool = False
    ) -> list[tuple[str, Callable[[], Any]]]:
        route = registry.hosts.route_host
        return [
            (n, partial(lambda n: route(n).app.remote(whole), n))
            for n in registry.hosts.table.hosts
        ]

    def passivate(self, registry: Registry, user_id: str, reason: str) -> bool:
        return bool(registry.call_host(user_id, "passivate", reason))

    def rebalance(self, registry: Registry, hosts: int | None) -> dict[str, Any]:
        registry.boot()
        timeout_s = registry.config.conversations.activation_timeout_s
        table = resize_hosts(registry.namespace, hosts, timeout_s)
        registry.hosts.refresh()
        return table

    def serving_pids(self, registry: Registry) -> list[int]:
        return [h["pid"] for h in registry.host_statuses() if h.get("pid")]

    def status(self, registry: Registry) -> dict[str, Any]:
        registry.boot()
        hosts = registry.host_statuses()
        per_node: dict[str, int] = {}
        totals = dict.fromkeys(
            ("activations", "passivations", "evictions", "restarts", "quarantined", "fenced"), 0
        )
        for host in hosts:
            if "error" in host:
                continue
            per_node[host["node_id"]] = per_node.get(host["node_id"], 0) + host["live"]
            for key in totals:
                totals[key] += host.get(key, 0)
        live = sum(h.get("live", 0) for h in hosts)
        try:
            supervisor = ray.get_actor(HOSTS, namespace=registry.namespace)
            supervisor_status: Any = ray.get(supervisor.status.remote(), timeout=30)
        except (ValueError, RayActorError, GetTimeoutError) as exc:
            raise ConversationUnavailable(
                f"the host supervisor of namespace {registry.namespace!r} does not answer: "
                f"{type(exc).__name__}"
            ) from exc
        host_restarts = int(supervisor_status["restarts"])
        totals["entity_restarts"] = totals["restarts"]
        totals["host_restarts"] = host_restarts
        totals["restarts"] += host_restarts
        return {
            "placement": self.placement,
            "live": live,
            "live_conversations": live,
            "per_node": per_node,
            "shard_table_version": registry.hosts.table.version,
            "hosts": hosts,
            **totals,
        }


class _Dedicated(_Placed):
    placement: Placement = "dedicated"
    supervisor = CONVERSATIONS

    def child(self, registry: Registry) -> ChildSpec:
        start = NamedChild(
            _RemoteConversations,
            CONVERSATIONS,
            (registry.namespace, registry.app, registry.config),
            SUPERVISED,
        )
        return ChildSpec("conversations", start=start, restart="permanent")

    def app_sources(
        self, registry: Registry, whole: bool = False
    ) -> list[tuple[str, Callable[[], Any]]]:
        return [(CONVERSATIONS, lambda: registry.supervisor().app_info.remote(whole))]

    def passivate(self, registry: Registry, user_id: str, reason: str) -> bool:
        return bool(ray.get(registry.supervisor().passivate.remote(user_id, reason)))

    def serving_pids(self, registry: Registry) -> list[int]:
        children = ray.get(registry.supervisor().children.remote(), timeout=10)
        return [c["pid"] for c in children if c["pid"]]

    def status(self, registry: Registry) -> dict[str, Any]:
        status: dict[str, Any] = ray.get(registry.supervisor().status.remote())
        return {"placement": self.placement, "live_conversations": status["live"], **status}

    async def handle(
        self, registry: Registry, cid: str, api_keys: Mapping[str, Secret] | None
    ) -> Any:
        return await registry.get_or_start(cid, api_keys)


_PLACED: dict[str, _Placed] = {p.placement: p for p in (_Hosted(), _Dedicated())}


class Registry:
    """Finds (and for dedicated placement starts) the conversation of an id.

    ``app`` is the local app a tree booted from here serves (``connect(agent)`` from a
    driver); ``None`` when the app is deployed (``overstory serve MODULE:ATTR``): its
    hosts import it from the store's record, and ``placement`` is the record's. With
    ``adopt=True`` (``connect()`` without an agent) the registry takes whichever
    placement the running tree has. ``job_turns`` is how the tree's job runner runs a
    job's turn (the client's :class:`~overstory.runtime.client.ClientTurns`): the
    registry and the runner sit below the client and never import it.
    """

    def __init__(
        self,
        *,
        config: Config,
        app: App | None,
        placement: Placement | None = None,
        adopt: bool = False,
        job_turns: OpenTurns,
    ) -> None:
        self.config = config
        self.job_turns = job_turns
        self.namespace = config.namespace
        self.app = app
        self.adopt = adopt
        if placement is None:
            if app is None:
                raise ConfigError("a registry needs an app or a placement")
            placement = app.placement
        self.placed = _PLACED[placement]
        self.store_url = config.store
        self.max_message_chars = config.limits.max_message_chars
        self._supervisor: Any = None
        self._booted = False
        self._served: dict[str, Any] | None = None
        self.hosts = HostRouter(self.namespace, config.conversations.activation_timeout_s)

    @property
    def placement(self) -> Placement:
        """The placement of the conversations this registry reaches."""
        return self.placed.placement

    def tree_spec(self) -> SupervisorSpec:
        child = self.placed.child(self)
        # Started after the conversations' supervisor: it sends their turns.
        runner = NamedChild(
            _RemoteJobRunner,
            JOBS,
            (self.namespace, self.config, self.placement, self.job_turns),
            SUPERVISED,
        )
        jobs = ChildSpec("jobs", start=runner, restart="permanent")
        return SupervisorSpec(strategy="one_for_one", children=(child, jobs))

    def boot(self) -> None:
        """Boot the supervision tree, or attach to the running one (of this placement)."""
        if self._booted:
            return
        timeout = self.config.conversations.activation_timeout_s
        if self.adopt:
            running = running_placement(self.namespace)
            if running is not None:
                self.placed = _PLACED[running]
        root = boot(self.namespace, self.tree_spec(), timeout_s=timeout)
        try:
            ray.get(root.ready.remote(), timeout=timeout)
        except (RayActorError, GetTimeoutError) as exc:
            raise ConversationUnavailable(
                f"the supervision tree in namespace {self.namespace!r} is not available: {exc}"
            ) from exc
        try:
            ray.get_actor(self.placed.supervisor, namespace=self.namespace)
        except ValueError as exc:
            other = running_placement(self.namespace) or "another"
            raise ConfigError(
                f"the tree running in namespace {self.namespace!r} serves {other} placement; "
                f"this app asks for {self.placement}: use another namespace"
            ) from exc
        self._booted = True

    # --- the app the tree serves ------------------------------------------------------------

    def served(self, refresh: bool = False) -> dict[str, Any]:
        """What the running tree serves (:meth:`~overstory.app.App.describe`): asked of
        the first host that answers (hosted: one may be restarting) or of the
        conversation supervisor (dedicated), then cached."""
        if self._served is None or refresh:
            self._served = self._ask_app(whole=False)
        assert self._served is not None
        return self._served

    def served_app(self) -> App:
        """The :class:`~overstory.app.App` the running tree serves (its agents, tools
        and all), asked as :meth:`served` is: for a process that runs its agents without
        a conversation (the door's stateless turns). Not cached: ask again after a
        deployment."""
        app: App = self._ask_app(whole=True)
        return app

    def _ask_app(self, whole: bool) -> Any:
        self.boot()
        last: BaseException | None = None
        for name, ask in self.placed.app_sources(self, whole):
            try:
                return ray.get(ask(), timeout=self.config.conversations.activation_timeout_s)
            except RayTaskError as exc:  # it answered: the app cannot be served
                cause = unwrap_task_error(exc)
                raise cause from cause.__cause__
            except (RayActorError, GetTimeoutError, ConversationUnavailable) as exc:
                last = exc
                self.hosts.forget(name)
        raise ConversationUnavailable(
            f"cannot ask the tree of {self.namespace!r} which app it serves: "
            f"none answered (last: {type(last).__name__}: {last})"
        )

    def known_agent(self, agent: str | None) -> str | None:
        """:meth:`agent_name`'s answer when it needs no call (what the tree serves is
        cached and names ``agent``); else ``None``."""
        served = self._served
        if served is None:
            return None
        if agent is None:
            return str(served["default"])
        return agent if agent in served["agents"] else None

    def agent_name(self, agent: str | None) -> str:
        """``agent`` if the tree serves it (default: the app's first), else
        :class:`UnknownAgent` listing the served ones (asked again once, in case the
        app was re-deployed since)."""
        known = self.known_agent(agent)
        if known is not None:
            return known
        served = self.served()
        if agent is None:
            return str(served["default"])
        if agent not in served["agents"]:
            served = self.served(refresh=True)
            if agent not in served["agents"]:
                raise UnknownAgent(agent, list(served["agents"]))
        return agent

    def supervisor(self) -> Any:
        """The conversation supervisor's handle (dedicated placement), booting the tree."""
        if self._supervisor is None:
            self.boot()
            try:
                self._supervisor = ray.get_actor(CONVERSATIONS, namespace=self.namespace)
            except ValueError as exc:
                raise ConversationUnavailable(
                    f"no conversation supervisor in namespace {self.namespace!r}: {exc}"
                ) from exc
        return self._supervisor

    async def get_or_start(self, user_id: str, api_keys: Mapping[str, Secret] | None = None) -> Any:
        """A live handle to conversation ``user_id``'s actor, started if needed (dedicated
        placement). ``api_keys`` (vendor -> the user's own key) apply when the actor is
        started."""
        last: BaseException | None = None
        for _ in range(_ATTEMPTS):
            supervisor = self._supervisor or await asyncio.to_thread(self.supervisor)
            try:
                return await asyncio.wait_for(
                    supervisor.start_child.remote(user_id, api_keys),
                    timeout=self.config.conversations.activation_timeout_s,
                )
            except RayTaskError as exc:
                cause = unwrap_task_error(exc)
                raise cause from cause.__cause__
            except RayActorError as exc:
                self._supervisor, last = None, exc
            except TimeoutError as exc:
                raise self._unavailable(user_id, "it did not become ready in time") from exc
        raise self._unavailable(user_id, f"{type(last).__name__}: {last}") from last

    def redeploy(self) -> dict[str, Any]:
        """A new app was recorded in the store: move the running tree onto it (hosts are
        replaced one by one; dedicated conversations passivate and restart on it)."""
        self.boot()
        target = self.placed.supervisor
        try:
            supervisor: Any = ray.get_actor(target, namespace=self.namespace)
            result: dict[str, Any] = ray.get(supervisor.redeploy.remote(), timeout=600)
        except RayTaskError as exc:
            cause = unwrap_task_error(exc)
            raise cause from cause.__cause__
        except (ValueError, RayActorError, GetTimeoutError) as exc:
            raise ConversationUnavailable(
                f"the supervisor {target!r} of {self.namespace!r} did not redeploy: "
                f"{type(exc).__name__}"
            ) from exc
        self._served = None
        self.hosts.refresh()
        return result

    def splits_changed(self) -> int:
        """Tell whatever serves conversations that a rollout split changed (they would
        read it again within ``rollouts.refresh_s`` anyway). Returns how many heard."""
        self.boot()
        try:
            supervisor: Any = ray.get_actor(self.placed.supervisor, namespace=self.namespace)
            heard: int = ray.get(supervisor.forget_splits.remote(), timeout=60)
            return heard
        except (ValueError, RayActorError, RayTaskError, GetTimeoutError):
            return 0  # each reads the split again within rollouts.refresh_s

    def passivate(self, user_id: str, reason: str = "stopped") -> bool:
        """Passivate ``user_id``'s conversation (history stays)."""
        return self.placed.passivate(self, user_id, reason)

    def call_host(self, conversation_id: str, method: str, *args: Any) -> Any:
        """One call to the host of ``conversation_id``, following a newer shard table."""
        for _ in range(_ATTEMPTS):
            version, name, handle = self.hosts.route(conversation_id)
            try:
                return ray.get(
                    getattr(handle, method).remote(version, conversation_id, *args),
                    timeout=self.config.conversations.activation_timeout_s,
                )
            except RayTaskError as exc:
                cause = unwrap_task_error(exc)
                if not isinstance(cause, StaleShardTable):
                    raise cause from cause.__cause__
                self.hosts.update(cause)
            except (RayActorError, GetTimeoutError) as exc:
                self.hosts.refresh()
                raise ConversationUnavailable(
                    f"host {name!r} of {conversation_id!r} did not answer "
                    f"({type(exc).__name__}); it is restarting or gone"
                ) from exc
        raise ConversationUnavailable(
            f"no host of namespace {self.namespace!r} takes {conversation_id!r}"
        )

    def rebalance(self, hosts: int | None = None) -> dict[str, Any]:
        """Grow the hosts to ``hosts`` (default: what the cluster holds now); the shard
        table that results (``version``, ``shards``, ``hosts``). Hosted placement only."""
        return self.placed.rebalance(self, hosts)

    def host_statuses(self) -> list[dict[str, Any]]:
        """Each host's status (an ``error`` entry for a host that does not answer)."""
        refs: dict[str, Any] = {}
        for name in self.hosts.table.hosts:
            try:
                refs[name] = self.hosts.route_host(name).status.remote()
            except ConversationUnavailable as exc:  # not running (being started again)
                refs[name] = exc
        out = []
        for name, ref in refs.items():
            if isinstance(ref, ConversationUnavailable):
                out.append({"host": name, "error": str(ref)})
                continue
            try:
                out.append(ray.get(ref, timeout=self.config.conversations.activation_timeout_s))
            except (RayActorError, RayTaskError, GetTimeoutError) as exc:
                self.hosts.forget(name)
                out.append({"host": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
        return out

    def status(self) -> dict[str, Any]:
        """Live conversations (total, per node, per host) and lifecycle counters."""
        return self.placed.status(self)

    def serving_pids(self) -> list[int]:
        """The processes serving conversations now: the hosts, or the dedicated actors."""
        return self.placed.serving_pids(self)

    def _unavailable(self, user_id: str, why: str) -> ConversationUnavailable:
        return ConversationUnavailable(
            f"cannot reach or start the conversation of user {user_id!r} "
            f"(actor {actor_name(user_id)!r} in namespace {self.namespace!r}): {why}"
        )
