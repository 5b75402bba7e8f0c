"""The provider actor pool: one Ray actor per endpoint, and the handle models use.

A :class:`ProviderActor` owns one endpoint's rate limiter and circuit breaker; it is
named after the endpoint's id (vendor + model + base URL + a one-way fingerprint of the
key), detached and restarted in place by Ray, so every conversation in the cluster that
uses the endpoint goes through the same limiter and breaker. How a call reaches the
vendor depends on the process making it (:func:`call_vendors_here`):

    host actor ── RemoteModel ── admit / settle ──> ProviderActor  [Gate: breaker, limiter]
        └── the vendor's SDK, called here, under the lease (:mod:`.lease`)
    dedicated conversation actor ── RemoteModel ──> ProviderActor
                                         [Breaker(Retrying(Limited(vendor)))], the call whole

:class:`RemoteModel` is the :class:`~overstory.providers.base.Model` the agent holds: a
small picklable value (the endpoint) that finds or starts its provider actor on first
use. A vendor SDK is imported by provider actors and by the processes that call vendors
themselves (hosts, the door's replicas); never by a dedicated conversation actor.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Mapping
from contextlib import aclosing, contextmanager
from contextvars import ContextVar
from typing import Any

import ray
from opentelemetry import trace
from ray.exceptions import RayActorError, RayTaskError

from ..batching import TurnBatch
from ..exceptions import ConversationUnavailable, ModelError
from ..messages import ModelResponse
from ..telemetry import (
    attached,
    inject,
    metrics,
    record_retry,
    setup_telemetry,
)
from .base import FallThrough, Model, ModelRequest, StreamItem, traced_request, traced_stream
from .breaker import BreakerModel
from .endpoint import KEY_ENV, Endpoint, Secret
from .lease import Gate, LeasedModel, Note, renew_every
from .limits import LimitedModel
from .retry import RetryingModel
from .windows import Budget, known_window

__all__ = [
    "PROVIDER_PREFIX",
    "ProviderActor",
    "RemoteModel",
    "call_vendors_here",
    "chain_of",
    "coalesced",
    "provider_actor_name",
    "provider_namespace",
    "provider_statuses",
    "vendor_model",
]

#: Named actors of the provider pool start with this (the dashboard shows them so).
PROVIDER_PREFIX = "provider:"

#: Many conversations wait on one endpoint at once (queued for the limiter, or on the
#: vendor's answer): each waiting call is a coroutine, not a thread.
_MAX_CONCURRENCY = 10_000


_NAMESPACE: ContextVar[str | None] = ContextVar("overstory_provider_namespace", default=None)


@contextmanager
def provider_namespace(namespace: str | None) -> Iterator[None]:
    """Within the block, provider actors are found or started in ``namespace`` (the
    app's; default: the caller's job namespace)."""
    token = _NAMESPACE.set(namespace)
    try:
        yield
    finally:
        _NAMESPACE.reset(token)


def provider_actor_name(endpoint: Endpoint) -> str:
    """``provider:<vendor>:<model>:<id>`` — readable on the dashboard, no key in it."""
    return f"{PROVIDER_PREFIX}{endpoint.vendor}:{endpoint.model}:{endpoint.id}"


def chain_of(model: Model) -> list[Model]:
    """The models of a fallback chain, in order (a single model is a chain of one)."""
    from .fallback import FallbackModel

    if isinstance(model, FallbackModel):
        return [m for inner in model.models for m in chain_of(inner)]
    return [model]


def chain_rows(model: Model) -> list[dict[str, Any]]:
    """A model chain in fallback order: each model's name and, for a vendor endpoint, its
    provider actor's name (for status and health checks)."""
    return [
        {
            "model": m.name,
            "actor": provider_actor_name(m.endpoint) if isinstance(m, RemoteModel) else None,
        }
        for m in chain_of(model)
    ]


def vendor_model(endpoint: Endpoint) -> Model:
    """The vendor's :class:`Model` for ``endpoint`` (imports that vendor's SDK)."""
    if endpoint.vendor == "anthropic":
        from .anthropic import AnthropicModel

        return AnthropicModel(endpoint)
    if endpoint.vendor == "bedrock":
        from .bedrock import BedrockModel

        return BedrockModel(endpoint)
    from .openai import OpenAIModel

    return OpenAIModel(endpoint)


class ProviderActor:
    """One endpoint's client and policies (the Ray actor class is built below)."""

    def __init__(self, endpoint: Endpoint, model: Model | None = None) -> None:
        self.endpoint = endpoint
        self.started_at = time.time()
        self.calls = 0
        self.failures: dict[str, int] = {}
        setup_telemetry()  # exports spans when the OTEL_* variables reached this process
        base = model if model is not None else vendor_model(endpoint)
        label = endpoint.name
        self.limited = LimitedModel(
            base,
            endpoint.limits,
            on_wait=lambda s, ok: metrics().rate_limit_wait(label, s, ok),
        )
        self.retrying = RetryingModel(self.limited, endpoint.retry, on_retry=_record_retry)
        self.breaker = BreakerModel(
            self.retrying,
            endpoint.breaker,
            on_change=lambda state: metrics().circuit_state(label, state),
        )
        self.gate = Gate(
            self.breaker,
            self.limited,
            ttl_s=endpoint.limits.lease_ttl_s,
            on_failure=self._count_failure,
        )
        self._sweeper: asyncio.Task[None] | None = None

    def _count_failure(self, exc: ModelError) -> None:
        self.failures[exc.kind] = self.failures.get(exc.kind, 0) + 1

    def ready(self) -> dict[str, Any]:
        return {"name": self.endpoint.name, "id": self.endpoint.id}

    async def request(
        self, req: ModelRequest, carrier: Mapping[str, str] | None = None
    ) -> ModelResponse | ModelError:
        """One call through breaker, retries and limiter, in a ``chat {model}`` span
        whose parent is the caller's span (``carrier``).

        A failure is *returned*, not raised: a Ray task error costs milliseconds to
        build and ship (a traceback per call), and a fall-through past an open circuit
        should cost one actor round trip.
        """
        self.calls += 1
        endpoint = self.endpoint
        host, port = endpoint.server
        try:
            with attached(carrier):
                return await traced_request(
                    self.breaker.request, endpoint.vendor, endpoint.model, req, host, port
                )
        except ModelError as exc:
            self._count_failure(exc)
            return exc

    async def stream(
        self, req: ModelRequest, carrier: Mapping[str, str] | None = None
    ) -> AsyncGenerator[StreamItem | ModelError, None]:
        """One streamed call through breaker, retries and limiter: a Ray streaming
        generator of text deltas, then the answer or the :class:`ModelError` (returned as
        the last item, as :meth:`request` returns it).

        The vendor's stream is read by a task of its own, so a slow reader never holds
        the HTTP response; the deltas that arrived while the reader was away travel as
        one (:func:`coalesced`: fewer Ray objects under load, the same text). A reader
        that cancels this generator cancels that task: the response is closed, the
        limiter's slot freed, and a half-open probe abandoned.
        """
        self.calls += 1
        buffer: deque[StreamItem | ModelError] = deque()
        arrived = asyncio.Event()

        def put(item: StreamItem | ModelError) -> None:
            buffer.append(item)
            arrived.set()

        reader = asyncio.create_task(self._read_stream(put, req, carrier))
        try:
            while True:
                await arrived.wait()
                arrived.clear()
                batch = list(buffer)
                buffer.clear()
                for item in coalesced(batch):
                    yield item
                    if not isinstance(item, str):
                        return
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _read_stream(
        self,
        put: Callable[[StreamItem | ModelError], None],
        req: ModelRequest,
        carrier: Mapping[str, str] | None,
    ) -> None:
        endpoint = self.endpoint
        host, port = endpoint.server
        try:
            with attached(carrier):
                async with aclosing(
                    traced_stream(
                        self.breaker.stream, endpoint.vendor, endpoint.model, req, host, port
                    )
                ) as items:
                    async for item in items:
                        put(item)
                        if isinstance(item, ModelResponse):
                            return
            raise ModelError(  # a model's stream must end with its answer
                "the stream ended without an answer", model=endpoint.name, kind="server_error"
            )
        except ModelError as exc:
            self._count_failure(exc)
            put(exc)
        except Exception as exc:  # a bug here must still end the reader's stream
            put(
                ModelError(
                    f"provider actor failed: {type(exc).__name__}: {exc}",
                    model=endpoint.name,
                    kind="server_error",
                )
            )

    async def admit_many(self, calls: list[tuple[str, int]]) -> list[ModelError | None]:
        """Lease one attempt of each ``(call, tokens)``, calls made in the caller's
        process (:mod:`.lease`; one process's, gathered): ``None`` for one that may go
        out, else its refusal."""
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_leases())
        self.calls += sum(1 for call, _ in calls if call not in self.gate.leases)
        return list(
            await asyncio.gather(*(self.gate.admit(call, tokens) for call, tokens in calls))
        )

    def settle(self, notes: list[Note]) -> None:
        """One process's releases and judgments, gathered (:meth:`Gate.settle`)."""
        self.gate.settle(notes)

    async def _sweep_leases(self) -> None:
        while True:
            await asyncio.sleep(self.gate.ttl_s / 4)
            self.gate.sweep()

    def status(self) -> dict[str, Any]:
        """Circuit state, limiter headroom and counters (for ``overstory status``)."""
        now = time.monotonic()
        return {
            "endpoint": self.endpoint.name,
            "id": self.endpoint.id,
            "key": repr(self.endpoint.key),
            "circuit": self.breaker.breaker.snapshot(now),
            "limits": self.limited.limiter.snapshot(),
            "calls": self.calls,
            "retries": self.retrying.retries,
            "failures": dict(self.failures),
            "leases": len(self.gate.leases),
            "leases_expired": self.gate.expired,
            "started_at": self.started_at,
        }


def coalesced(items: Iterable[StreamItem | ModelError]) -> list[StreamItem | ModelError]:
    """``items`` with each run of consecutive text deltas joined into one delta."""
    out: list[StreamItem | ModelError] = []
    for item in items:
        if isinstance(item, str) and out and isinstance(out[-1], str):
            out[-1] += item
        else:
            out.append(item)
    return out


def _record_retry(attempt: int, error: ModelError, delay_s: float) -> None:
    record_retry(trace.get_current_span(), attempt=attempt, error_type=error.kind, delay_s=delay_s)


_RemoteProvider: Any = ray.remote(ProviderActor)

#: Whether this process calls vendors itself, under leases from the provider actors
#: (:func:`call_vendors_here`), or sends each call to them.
_CALLS_HERE = False
_VENDORS_KEPT = 64


class _Here:
    """What one event loop of this process keeps for its leased calls: a vendor client
    per endpoint (its connection pool; most recent last) and a gate client per endpoint.
    Both are bound to the loop (connections, futures), so each loop has its own."""

    def __init__(self) -> None:
        self.vendors: OrderedDict[str, Model] = OrderedDict()
        self.building: dict[str, asyncio.Future[Model]] = {}
        self.gates: dict[str, _ActorGate] = {}


_LOOPS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Here] = weakref.WeakKeyDictionary()


def _here() -> _Here:
    loop = asyncio.get_running_loop()
    here = _LOOPS.get(loop)
    if here is None:
        here = _LOOPS[loop] = _Here()
    return here


def call_vendors_here(enabled: bool = True) -> None:
    """Make this process's vendor calls itself, under leases (:mod:`.lease`).

    A host actor does: it serves many conversations, so one SDK client per endpoint is
    shared by all of them, and a streamed answer's pieces no longer cross a provider
    actor. A dedicated conversation actor does not: one conversation per process, where
    loading a vendor SDK would cost more memory than the hop saves. The limiter and the
    breaker stay in the provider actor either way.
    """
    global _CALLS_HERE
    _CALLS_HERE = enabled


async def _vendor_here(endpoint: Endpoint) -> Model:
    """This loop's client for ``endpoint`` (at most ``_VENDORS_KEPT`` kept, the least
    recently used closed first). The first is built off the event loop: importing a
    vendor SDK takes a while, and no other conversation's stream should wait on it."""
    here = _here()
    model = here.vendors.get(endpoint.id)
    if model is None:
        building = here.building.get(endpoint.id)
        if building is None:
            building = here.building[endpoint.id] = asyncio.ensure_future(
                asyncio.to_thread(vendor_model, endpoint)
            )
        try:
            model = await asyncio.shield(building)
        finally:
            if building.done():
                here.building.pop(endpoint.id, None)
        model = here.vendors.setdefault(endpoint.id, model)
        while len(here.vendors) > _VENDORS_KEPT:
            _, old = here.vendors.popitem(last=False)
            closing = getattr(old, "aclose", None)
            if closing is not None:
                asyncio.get_running_loop().create_task(closing())
    here.vendors.move_to_end(endpoint.id)
    return model


class _ActorGate:
    """A :class:`~.lease.GateClient` over one endpoint's provider actor, shared by every
    call of this process: what its calls say in one event-loop turn goes as one message
    (a burst of streams starting together is admitted in one round trip). While any of
    its calls holds a lease, one message every :func:`~.lease.renew_every` renews them
    all, so only a process that died loses its leases."""

    def __init__(self, model: RemoteModel) -> None:
        self.model = model
        self._admits: TurnBatch[tuple[str, int], ModelError | None] = TurnBatch(self._send)
        self._notes: list[Note] = []
        self._open: set[str] = set()  # calls admitted and not yet judged
        self._renewer: asyncio.Task[None] | None = None

    async def admit(self, call: str, tokens: int) -> ModelError | None:
        refused = await self._admits.ask((call, tokens))
        if refused is None:
            self._open.add(call)
            if self._renewer is None:
                self._renewer = asyncio.get_running_loop().create_task(self._renew())
        return refused

    async def _renew(self) -> None:
        every = renew_every(self.model.endpoint.limits.lease_ttl_s)
        while True:
            await asyncio.sleep(every)
            if not self._open:  # checked and cleared in one step: admit starts another
                self._renewer = None
                return
            self._note(("renew", tuple(self._open)))

    async def _send(self, asked: list[tuple[str, int]]) -> list[ModelError | None]:
        try:
            handle = await self.model.handle()
            answers: list[ModelError | None] = await handle.admit_many.remote(asked)
        except Exception as exc:  # every caller waiting on this batch gets it
            raise self._failure(exc) from None
        return answers

    def _failure(self, exc: Exception) -> ModelError:
        if isinstance(exc, ModelError):
            return exc
        if isinstance(exc, RayTaskError):
            return self.model._task_error(exc)
        if isinstance(exc, RayActorError):
            self.model._handle = None  # it died: looked up (restarted) on the next call
            return ModelError(
                f"provider actor unavailable: {type(exc).__name__}",
                model=self.model.name,
                kind="connection",
            )
        return ModelError(
            f"asking the provider actor failed: {type(exc).__name__}: {exc}",
            model=self.model.name,
            kind="server_error",
        )

    def release(self, call: str, used: int, error: ModelError | None) -> None:
        self._note(("release", call, used, error))

    def judge(self, call: str, error: ModelError | None, abandoned: bool, used: int | None) -> None:
        self._open.discard(call)
        self._note(("judge", call, error, abandoned, used))

    def _note(self, note: Note) -> None:
        """A message that needs no answer, sent with the others of this loop turn."""
        if not self._notes:
            asyncio.get_running_loop().call_soon(self._send_notes)
        self._notes.append(note)

    def _send_notes(self) -> None:
        notes, self._notes = self._notes, []
        handle = self.model._handle  # a provider actor that restarted has no lease to settle
        if handle is not None and notes:
            with contextlib.suppress(RayActorError):
                handle.settle.remote(notes)


class RemoteModel(Model):
    """The model an agent holds for a vendor endpoint: calls the endpoint's provider actor.

    Pickled into every conversation actor of the agent; the handle is looked up (or the
    actor started) there, on first use, in the caller's Ray namespace.
    """

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._handle: Any = None
        # The provider actor owns the breaker; when it says "open for N s" this caller
        # falls through locally until then instead of asking again.
        self._open_until = 0.0

    @property
    def name(self) -> str:
        return self.endpoint.name

    async def call(self, req: ModelRequest) -> ModelResponse:
        """The ``chat`` span is made where the request goes out: in the provider actor."""
        return await self.request(req)

    def budget(self) -> Budget | None:
        """The endpoint's window (its own ``context_window``, else the built-in table),
        ``max_tokens`` of it kept for the answer, counted with the vendor's tokenizer."""
        endpoint = self.endpoint
        window = endpoint.context_window or known_window(endpoint.model)
        return Budget.of(self.name, window, endpoint.max_tokens, endpoint.vendor, endpoint.model)

    def with_api_keys(self, keys: Mapping[str, Secret]) -> Model:
        key = keys.get(self.endpoint.vendor)
        return self if key is None else RemoteModel(self.endpoint.with_key(key))

    def __getstate__(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.endpoint, self._handle, self._open_until = state["endpoint"], None, 0.0

    async def handle(self) -> Any:
        """The provider actor's handle, started if it is not running."""
        if self._handle is None:
            # Imported here: the supervisors package imports this one.
            from ..supervisors.named import SUPERVISED, get_or_create

            namespace = _NAMESPACE.get() or ray.get_runtime_context().namespace
            try:
                self._handle, _ = await get_or_create(
                    _RemoteProvider,
                    provider_actor_name(self.endpoint),
                    namespace,
                    (self.endpoint,),
                    {**SUPERVISED, "max_concurrency": _MAX_CONCURRENCY},
                    timeout_s=60.0,
                )
            except ConversationUnavailable as exc:
                raise ModelError(
                    f"provider actor unavailable: {exc}", model=self.name, kind="connection"
                ) from exc
        return self._handle

    async def _leased(self) -> LeasedModel:
        """The call made in this process under the provider actor's leases."""
        gates = _here().gates
        gate = gates.get(self.endpoint.id)
        if gate is None:
            gate = gates[self.endpoint.id] = _ActorGate(self)
        return LeasedModel(
            await _vendor_here(self.endpoint),
            gate,
            self.endpoint.retry,
            on_retry=_record_retry,
        )

    async def request(self, req: ModelRequest) -> ModelResponse:
        self._refuse_early()
        if _CALLS_HERE:
            endpoint = self.endpoint
            host, port = endpoint.server
            leased = await self._leased()
            try:
                return await traced_request(
                    leased.request, endpoint.vendor, endpoint.model, req, host, port
                )
            except ModelError as exc:
                self._remember_open(exc)
                raise
        for attempt in (1, 2):
            handle = await self.handle()
            try:
                result: ModelResponse | ModelError = await handle.request.remote(req, inject())
                return self._answered(result)
            except RayTaskError as exc:
                raise self._task_error(exc) from exc
            except RayActorError as exc:
                # The provider actor died under the call (Ray restarts it): look it up
                # again once; the call may or may not have reached the vendor.
                self._handle = None
                if attempt == 2:
                    raise ModelError(
                        f"provider actor died during the call: {type(exc).__name__}",
                        model=self.name,
                        kind="connection",
                    ) from exc
        raise AssertionError("unreachable")

    async def stream(self, req: ModelRequest) -> AsyncGenerator[StreamItem, None]:
        """The provider actor's stream (a Ray streaming generator), item by item.

        A provider actor that dies before the first delta is asked again once (Ray
        restarts it); after it, the stream is cut (``connection``): the text shown
        stays what it is. Closing this generator cancels the actor's side.
        """
        self._refuse_early()
        if _CALLS_HERE:
            endpoint = self.endpoint
            host, port = endpoint.server
            leased = await self._leased()
            try:
                async with aclosing(
                    traced_stream(leased.stream, endpoint.vendor, endpoint.model, req, host, port)
                ) as items:
                    async for piece in items:
                        yield piece
            except ModelError as exc:
                self._remember_open(exc)
                raise
            return
        for attempt in (1, 2):
            handle = await self.handle()
            shown = ended = False
            refs = handle.stream.remote(req, inject())
            try:
                async for ref in refs:
                    item: StreamItem | ModelError = await ref
                    if not isinstance(item, str):
                        ended = True
                        yield self._answered(item)
                        return
                    shown = True
                    yield item
                ended = True
                raise ModelError(
                    "the provider actor's stream ended without an answer",
                    model=self.name,
                    kind="server_error",
                )
            except RayTaskError as exc:
                ended = True
                raise self._task_error(exc) from exc
            except RayActorError as exc:
                ended = True
                self._handle = None
                if shown or attempt == 2:
                    raise ModelError(
                        f"provider actor died during the stream: {type(exc).__name__}",
                        model=self.name,
                        kind="connection",
                    ) from exc
            finally:
                if not ended:  # the reader stopped: stop the vendor call too
                    ray.cancel(refs)
        raise AssertionError("unreachable")

    def _refuse_early(self) -> None:
        """Refuse without a round trip: no key, or a circuit known to be open."""
        if self.endpoint.key is None:
            raise ModelError(
                f"no API key: set {KEY_ENV[self.endpoint.vendor]} where the runtime is "
                "started, or give the user's own key (api_keys=...)",
                model=self.name,
                kind="auth",
            )
        if self.endpoint.vendor == "bedrock" and self.endpoint.region is None:
            raise ModelError(
                "no AWS region: set AWS_REGION where the runtime is started, or give "
                "Endpoint(region=...)",
                model=self.name,
                kind="auth",
            )
        if time.monotonic() < self._open_until:
            raise ModelError(
                f"circuit open; next probe in {self._open_until - time.monotonic():.1f} s",
                model=self.name,
                kind="circuit_open",
            )

    def _remember_open(self, error: ModelError) -> None:
        """An open circuit is remembered here until its probe time."""
        if error.kind == "circuit_open" and error.retry_after:
            self._open_until = time.monotonic() + error.retry_after

    def _answered(self, result: ModelResponse | FallThrough | ModelError) -> ModelResponse:
        """The provider actor's last word: its answer, or its error raised (an open
        circuit remembered here until its probe time)."""
        if isinstance(result, ModelError):
            self._remember_open(result)
            raise result
        if not isinstance(result, ModelResponse):
            raise ModelError(
                f"provider actor answered {type(result).__name__}",
                model=self.name,
                kind="server_error",
            )
        return result

    def _task_error(self, exc: RayTaskError) -> ModelError:
        cause = exc.cause
        if isinstance(cause, ModelError):
            return cause
        return ModelError(
            f"provider actor failed: {type(cause).__name__}: {cause}",
            model=self.name,
            kind="server_error",
        )


def provider_statuses(namespace: str, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """Every provider actor's :meth:`ProviderActor.status` in ``namespace`` (driver side).

    An actor that does not answer in time is listed with its ``error``.
    """
    names = sorted(
        entry["name"]
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry["namespace"] == namespace and entry["name"].startswith(PROVIDER_PREFIX)
    )
    # Ask every actor first, then collect: one deadline for all, not one per actor.
    asked: dict[str, Any] = {}
    out: list[dict[str, Any]] = []
    for name in names:
        try:
            asked[name] = ray.get_actor(name, namespace=namespace).status.remote()
        except ValueError as exc:  # gone since it was listed
            out.append({"actor": name, "error": f"{type(exc).__name__}: {exc}"})
    deadline = time.monotonic() + timeout_s
    for name, ref in asked.items():
        try:
            status: dict[str, Any] = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            out.append({"actor": name, **status})
        except (RayActorError, RayTaskError, ray.exceptions.GetTimeoutError) as exc:
            out.append({"actor": name, "error": f"{type(exc).__name__}: {exc}"})
    return sorted(out, key=lambda s: str(s["actor"]))
