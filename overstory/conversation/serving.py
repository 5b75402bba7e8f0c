"""What a process that serves conversations serves: the app, and each turn's agent version.

A host (or a dedicated conversation actor) holds one :class:`Serving`. It takes the app
from the store's deployment record when there is one (``overstory serve MODULE:ATTR``:
this process imports the module itself, so tools run the deployed code) and otherwise
from the local app it was started with (``connect(agent)`` from a driver). Before each
turn, :meth:`Serving.agent_for` asks the pure :func:`~overstory.rollout.choose_version`
which version serves the conversation, storing the conversation's pin first when the
answer is a canary. Splits are cached for ``refresh_s`` and dropped at once when an
operator command says they changed (:meth:`Serving.forget_splits`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from ..agent import Agent
from ..app import App, load_app, split_conversation_id
from ..exceptions import ConfigError
from ..providers import Secret
from ..rollout import (
    Deployment,
    Pin,
    Split,
    choose_version,
    read_deployment,
    read_pin,
    read_split,
    write_pin,
)
from ..store import HistoryStore

__all__ = ["Binding", "Serving"]


@dataclass(slots=True)
class Binding:
    """One conversation's agent: its name, the user's own vendor keys, the version that
    served its last turn and its stored pin (read once, when a rollout first needs it).
    ``keyed`` is that version's agent bound to the keys, kept so its provider handles
    are made once, not at every turn."""

    agent: str
    api_keys: Mapping[str, Secret] | None = None
    version: str | None = None
    pin: Pin | None = None
    pin_loaded: bool = False
    keyed: Agent | None = None

    @classmethod
    def of(cls, conversation_id: str, api_keys: Mapping[str, Secret] | None = None) -> Binding:
        return cls(split_conversation_id(conversation_id)[0], api_keys)


class Serving:
    """The app one process serves and the rollout state it reads (see the module doc)."""

    def __init__(
        self,
        namespace: str,
        store: HistoryStore,
        local: App | None,
        refresh_s: float = 5.0,
    ) -> None:
        self.namespace = namespace
        self.store = store
        self.local = local
        self.refresh_s = refresh_s
        self.record: Deployment | None = None  # the deployment this process imported
        self._app: App | None = None
        self._read = False
        self._splits: dict[str, tuple[Split, float]] = {}

    @property
    def app(self) -> App:
        """The app (after :meth:`load`); before it, the local one if any."""
        app = self._app or self.local
        if app is None:
            raise ConfigError(
                f"no app is deployed in namespace {self.namespace!r}: "
                "run `overstory serve MODULE:ATTR`"
            )
        return app

    async def load(self) -> App:
        """Read the deployment record (the store must be open, once per process) and
        import its app; a deployment always wins over the local app. Import errors
        propagate (:class:`~overstory.app.AppLoadError`) and the next call tries again."""
        if not self._read:
            record = await read_deployment(self.store, self.namespace)
            if record is not None:
                self._app = load_app(record.source)
                self.record = record
            self._read = True  # once per process: a new deployment replaces the process
        return self.app

    @property
    def deployment(self) -> int:
        """Generation of the deployment this process imported (0: the local app)."""
        return 0 if self.record is None else self.record.generation

    def forget_splits(self) -> None:
        """An operator changed a split: read them again before the next turn."""
        self._splits.clear()

    async def split(self, name: str) -> Split:
        cached = self._splits.get(name)
        now = time.monotonic()
        if cached is not None and now - cached[1] < self.refresh_s:
            return cached[0]
        split = await read_split(self.store, self.namespace, name, self.app.versions(name))
        self._splits[name] = (split, now)
        return split

    async def agent_for(
        self,
        conversation_id: str,
        binding: Binding,
        has_history: bool,
        requested: str | None = None,
    ) -> Agent:
        """The agent (at the version the rollout gives, or the caller ``requested``)
        that runs the next turn."""
        app = self.app
        versions = app.versions(binding.agent)  # UnknownAgent when it is not served
        split = await self.split(binding.agent)
        if split.canary is not None and requested is None and not binding.pin_loaded:
            binding.pin = await read_pin(self.store, self.namespace, conversation_id)
            binding.pin_loaded = True
        version, pin = choose_version(
            split, binding.pin, conversation_id, has_history, versions, requested
        )
        if pin is not None and pin != binding.pin:
            await write_pin(self.store, self.namespace, conversation_id, pin, binding.pin)
            binding.pin = pin
        agent = app.get(binding.agent, version)
        if binding.api_keys:
            if binding.keyed is None or binding.version != version:
                binding.keyed = agent.with_api_keys(binding.api_keys)
            agent = binding.keyed
        binding.version = version
        return agent
