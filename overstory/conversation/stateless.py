"""Stateless turns: an agent answers a context the caller sends, and nothing is stored.

What an OpenAI Chat Completions client expects: each request carries the whole
conversation (``messages``), and the server keeps nothing. :class:`StatelessTurns` runs
such a turn in the process that took the request (the HTTP door's replica) with the same
turn code every conversation runs (:func:`~.turn.run_turn`, ``persist=False``):

- the agent's tools, fallback chain, context budget, settings and structured output;
- the user's quota admits the turn and is charged for it.

What differs from a conversation's turn:

- **Nothing goes into the store's history.** The context is the caller's, and the
  answer is returned.
- **No response cache.** It would store the answer.
- **`Compact` runs as `Trim`.** A summary is a stored record.
- **System messages are added to the agent's instructions.**
- **The version** is the one the caller names, else the rollout's live (or canary)
  choice, and nothing is pinned.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..agent import Agent
from ..app import App
from ..compaction import Compact, Trim
from ..config import Config
from ..messages import Message, Reply, ToolDefinition, ToolOutput
from ..providers import ModelSettings
from ..providers.pool import provider_namespace
from ..quota import finish
from ..rollout import choose_version, read_deployment
from ..telemetry import attached
from .entity import Services
from .serving import Serving
from .turn import Emit, run_turn
from .window import Memory

__all__ = ["StatelessTurns"]


class StatelessTurns:
    """The stateless turns of one process: its own store client, served app and quota
    book (:class:`~.entity.Services`). The app is the deployed one (its record in the
    store), else the one ``fetch_app`` gets from the running tree (a driver's local
    app); it is read again once the deployment changes, checked every
    ``rollouts.refresh_s``."""

    def __init__(
        self, namespace: str, config: Config, fetch_app: Callable[[], Awaitable[App]]
    ) -> None:
        self.namespace, self.config, self._fetch_app = namespace, config, fetch_app
        self._services: Services | None = None
        self._generation = -1
        self._checked = 0.0
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()  # replaced stores, closed later

    async def services(self) -> Services:
        """The services, with the app the tree serves now."""
        async with self._lock:
            current = self._services
            now = time.monotonic()
            if current is not None and now - self._checked < self.config.rollouts.refresh_s:
                return current
            self._checked = now
            if current is not None:
                record = await read_deployment(current.store, self.namespace)
                if (0 if record is None else record.generation) == self._generation:
                    return current
            made = Services.of(self.namespace, None, self.config)
            await made.store.open()
            record = await read_deployment(made.store, self.namespace)
            if record is None:  # a driver's local app: the tree has it
                made = dataclasses.replace(
                    made, serving=Serving(self.namespace, made.store, await self._fetch_app())
                )
            await made.serving.load()
            self._services, self._generation = made, 0 if record is None else record.generation
            if current is not None:  # turns still running on it finish first
                task = asyncio.create_task(self._close_later(current))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            return made

    async def _close_later(self, old: Services) -> None:
        await asyncio.sleep(self.config.conversations.turn_timeout_s)
        await old.store.close()

    async def agent(self, name: str, version: str | None) -> Agent:
        """Agent ``name`` at ``version`` (else the rollout's choice for a new
        conversation: the live version, or the canary's share); nothing is pinned."""
        serving = (await self.services()).serving
        versions = serving.app.versions(name)  # UnknownAgent when it is not served
        split = await serving.split(name)
        chosen, _pin = choose_version(split, None, uuid.uuid4().hex, False, versions, version)
        return serving.app.get(name, chosen)

    async def run(
        self,
        user: str,
        agent: Agent,
        context: Sequence[Message],
        text: str,
        *,
        system: str = "",
        emit: Emit | None = None,
        should_stop: Callable[[], bool] | None = None,
        settings: dict[str, Any] | None = None,
        output_type: Any = None,
        carrier: dict[str, str] | None = None,
        client_tools: Sequence[ToolDefinition] = (),
        tool_outputs: Sequence[ToolOutput] = (),
    ) -> Reply:
        """``agent``'s answer to ``text`` after ``context`` (earlier messages, oldest
        first), as ``user`` — whose quota admits and pays for it. ``system`` is added
        to the agent's instructions (as its ``caller_instructions`` says). ``client_tools`` and ``tool_outputs``: as for
        :func:`~.turn.run_turn` (``text`` is then empty, the context ending on the
        calls answered). Raises as a conversation's turn does (``TurnFailed``,
        ``QuotaExceeded``, ``UsageError``)."""
        services = await self.services()
        agent = _stateless(agent)
        conversation_id = f"stateless:{user}"  # a user part for tools; never stored
        turn_id = uuid.uuid4().hex
        history = list(context)
        cap = agent.output_cap(None if settings is None else ModelSettings.of(settings))
        ticket = await services.quotas.admit_turn(
            user, conversation_id, turn_id, text, history, agent.instructions, cap
        )
        timeout_s = services.config.conversations.turn_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                with attached(carrier), provider_namespace(services.namespace):
                    return await run_turn(
                        agent,
                        services.store,
                        conversation_id,
                        history,
                        turn_id,
                        text,
                        emit=emit,
                        should_stop=should_stop,
                        ticket=ticket,
                        owner=None,  # no response cache: it would store the answer
                        prices=services.config.usage.prices,
                        memory=Memory(),
                        settings=settings,
                        output_type=output_type,
                        persist=False,
                        client_tools=client_tools,
                        tool_outputs=tool_outputs,
                        instructions=system,
                    )
        finally:
            if ticket is not None:
                await finish(ticket)

    async def close(self) -> None:
        if self._services is not None:
            await self._services.store.close()
            self._services = None


def _stateless(agent: Agent) -> Agent:
    """``agent`` as a stateless turn runs it: a :class:`~overstory.compaction.Compact`
    policy as :class:`Trim` (a summary would be stored)."""
    if not isinstance(agent.context, Compact):
        return agent
    clone = copy.copy(agent)
    clone.context = Trim()
    return clone
