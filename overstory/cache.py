"""A response cache, opt-in per agent (``Agent(..., cache_ttl_s=600)``), scoped to the
conversation's owner.

A model call is answered from the cache when everything that changes its answer is the
same: the owner, the agent's name and version, the model (the chain's names), the
instructions, the tools offered, and the history as the model sees it (redacted when the
agent redacts, without seq numbers, turn ids or times). The owner is part of the key,
so one user's answer is never served to another, however identical their prompts.

Answers that call tools are not cached (a tool may act on the world) unless the agent
says ``cache_tool_calls=True``. A hit spends no tokens: its usage is zero, so quotas
and stored usage count nothing. Hits and misses are the ``overstory_cache_total``
metric {agent, outcome} and an ``overstory.cache`` event (``outcome``) on the turn's span.

Entries are store settings (one per key, sealed with the data keys when history is
encrypted at rest: a cached answer is message text), each with its expiry; an expired
entry is replaced when its key is next missed, or dropped by :func:`sweep`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import AsyncGenerator
from typing import Any

from opentelemetry import trace

from .exceptions import DataKeyError, StoreError
from .messages import AssistantMessage, ModelResponse, ToolCall, ToolReturn, Usage
from .providers.base import Model, ModelRequest, StreamItem
from .store import HistoryStore
from .store.settings import CACHE
from .telemetry import metrics

__all__ = ["CachingModel", "cache_key", "sweep"]

_PREFIX = CACHE.prefix()


def cache_key(owner: str, agent: str, version: str, model: str, req: ModelRequest) -> str:
    """The setting that caches ``req``'s answer (a digest of all that changes it)."""
    history: list[list[Any]] = []
    for m in req.messages:  # what the model reads of each: never its usage, seq or time
        if isinstance(m, AssistantMessage):
            calls = [[c.id, c.name, c.arguments] for c in m.tool_calls]
            history.append(["assistant", m.content, calls, m.incomplete])
        elif isinstance(m, ToolReturn):
            history.append(["tool", m.tool_call_id, m.tool_name, m.content, m.is_error])
        else:
            history.append([m.kind, m.content])
    what: dict[str, Any] = {
        "agent": agent,
        "version": version,
        "model": model,
        "instructions": req.instructions,
        "tools": [[t.name, t.description, t.parameters] for t in req.tools],
        "history": history,
    }
    if req.settings.as_dict():  # absent when unset: keys made before settings existed hold
        what["settings"] = req.settings.as_dict()
    if req.output is not None:
        what["output"] = req.output.digest
    material = json.dumps(
        what,
        sort_keys=True,
        ensure_ascii=False,
        default=str,
    )
    owner_part = hashlib.sha256(owner.encode()).hexdigest()[:32]
    return f"{_PREFIX}{owner_part}:{hashlib.sha256(material.encode()).hexdigest()}"


def _dump(response: ModelResponse, expires: float) -> str:
    return json.dumps(
        {
            "content": response.content,
            "tool_calls": [[c.id, c.name, c.arguments] for c in response.tool_calls],
            "model": response.model,
            "expires": expires,
        },
        ensure_ascii=False,
    )


def _load(raw: str) -> tuple[ModelResponse, float]:
    data = json.loads(raw)
    calls = tuple(ToolCall(i, n, a) for i, n, a in data["tool_calls"])
    response = ModelResponse(
        content=data["content"], tool_calls=calls, usage=Usage(), model=data["model"]
    )
    return response, float(data["expires"])


class CachingModel(Model):
    """``inner`` behind the owner's cache (see the module doc). Made per turn by the
    turn when the agent caches; ``agent`` and ``version`` name it in the key."""

    def __init__(
        self,
        inner: Model,
        store: HistoryStore,
        owner: str,
        agent: str,
        version: str,
        ttl_s: float,
        *,
        tool_calls: bool = False,
    ) -> None:
        self.inner, self.store, self.owner = inner, store, owner
        self.agent, self.version, self.ttl_s, self.tool_calls = agent, version, ttl_s, tool_calls

    @property
    def name(self) -> str:
        return self.inner.name

    def _key(self, req: ModelRequest) -> str:
        return cache_key(self.owner, self.agent, self.version, self.inner.name, req)

    def _seal(self, key: str, value: str) -> str:
        keys = self.store.data_keys
        return value if keys is None else keys.seal(value, key, 0)

    def _open(self, key: str, value: str) -> str:
        keys = self.store.data_keys
        return value if keys is None else keys.open(value, key, 0)

    async def _lookup(self, key: str) -> tuple[ModelResponse | None, str | None]:
        """The cached answer (None: a miss) and the raw entry (to replace it by CAS)."""
        try:
            raw = await self.store.get_setting(key)
        except StoreError:
            return None, None  # the cache is an optimisation: a store hiccup is a miss
        if raw is None:
            return None, None
        try:
            response, expires = _load(self._open(key, raw))
        except (DataKeyError, ValueError, KeyError, TypeError):
            return None, raw  # sealed with a key gone since, or unreadable: a miss
        if expires <= time.time():
            return None, raw
        return response, raw

    async def _keep(self, key: str, response: ModelResponse, old: str | None) -> None:
        if response.tool_calls and not self.tool_calls:
            return
        value = self._seal(key, _dump(response, time.time() + self.ttl_s))
        with contextlib.suppress(StoreError):  # not kept this time
            await self.store.put_setting(key, value, expected=old)

    def _outcome(self, outcome: str) -> None:
        metrics().cache(self.agent, "hit" if outcome == "hit" else "miss")
        trace.get_current_span().add_event("overstory.cache", {"outcome": outcome})

    async def request(self, req: ModelRequest) -> ModelResponse:
        return await self.call(req)

    async def call(self, req: ModelRequest) -> ModelResponse:
        key = self._key(req)
        cached, raw = await self._lookup(key)
        if cached is not None:
            self._outcome("hit")
            return cached
        self._outcome("miss")
        response = await self.inner.call(req)
        await self._keep(key, response, raw)
        return response

    async def stream(self, req: ModelRequest) -> AsyncGenerator[StreamItem, None]:
        key = self._key(req)
        cached, raw = await self._lookup(key)
        if cached is not None:
            self._outcome("hit")
            if cached.content:
                yield cached.content
            yield cached
            return
        self._outcome("miss")
        inner = self.inner.stream(req)
        try:
            async for item in inner:
                if isinstance(item, ModelResponse):
                    await self._keep(key, item, raw)
                yield item
        finally:
            await inner.aclose()


async def sweep(store: HistoryStore, now: float | None = None) -> int:
    """Drop expired entries (each by compare-and-delete); returns how many."""
    now = time.time() if now is None else now
    swept, after = 0, ""
    while page := await store.settings(_PREFIX, after=after, limit=500):
        for key, raw in page:
            try:
                value = raw if store.data_keys is None else store.data_keys.open(raw, key, 0)
                expired = _load(value)[1] <= now
            except (DataKeyError, ValueError, KeyError, TypeError):
                expired = True  # unreadable now (an old key): of no use to anyone
            if expired:
                swept += await store.delete_setting(key, expected=raw)
        after = page[-1][0]
    return swept
