"""The HTTP front door: a FastAPI app speaking a subset of OpenAI's Responses and
Conversations APIs, so the official ``openai`` SDK is a working client.

Every route but the probes needs ``Authorization: Bearer <API key>``
(:mod:`overstory.gateway.keys`) or, when configured, a JWT (:mod:`.tokens`). A conversation belongs to the user who created it; an
admin key reaches every one; anyone else gets 404, the same answer as for a conversation
that does not exist. A response is a turn of a conversation: the request only tails the
turn's event log, so a client that drops the connection loses nothing and reads on with
``GET /v1/responses/{id}?stream=true&starting_after=N`` (or ``Last-Event-ID``).

Errors have OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``) and
status codes; ``x-should-retry: false`` marks those a retry cannot fix (the SDK retries
408, 409, 429 and 5xx by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.routing import Match

from ..access import (
    ConversationRecord,
    Need,
    Principal,
    access,
    create_record,
    delete_record,
    load_record,
    new_conversation_id,
    owned_records,
    update_record,
    validate_metadata,
)
from ..agent import Agent
from ..app import App
from ..audit import note
from ..conversation.stateless import StatelessTurns
from ..conversation.turnlog import TurnLog
from ..exceptions import (
    AuthenticationFailed,
    ConfigError,
    InvalidMessage,
    InvalidUserId,
    NotPermitted,
    OverstoryError,
    QuotaExceeded,
    TurnFailed,
    TurnIncomplete,
    UnknownAgent,
    UnknownConversation,
    UnknownTurn,
    UsageError,
    store_failed,
)
from ..jobs import JobBook, JobRecord, is_permanent, new_job
from ..memory import QuietTrim, trim
from ..messages import AssistantMessage, Message, Reply, ToolDefinition, TurnEvent, TurnRequest
from ..store import HistoryStore, open_store
from ..store.settings import IDEMPOTENCY, READYZ, RESPONSE
from ..telemetry import inject, metrics
from ..validation import validate_turn, validate_user_id
from .chat import ChatChunks, chat_completion, chat_request, new_completion_id
from .items import Context, client_tools, conversation_messages, input_context, names
from .keys import KEY_PREFIX, authenticate_key
from .openapi import openapi
from .rates import LocalRates, Rates, RequestRate
from .tokens import JwtSettings, authenticate_jwt
from .wire import (
    DEFAULT_ECHO,
    MAX_JSON_DEPTH,
    ParamError,
    ResponseStream,
    TurnOptions,
    conversation_items,
    conversation_of,
    item_seq,
    items_read,
    new_response_id,
    page,
    sse,
    too_deep,
    turn_options,
)

__all__ = ["ApiError", "DoorLimits", "Gateway", "RequestRate", "app", "install"]

log = logging.getLogger(__name__)

_IDEMPOTENT = IDEMPOTENCY.prefix()
_MAX_IDEMPOTENCY_KEY = 255


@dataclass(frozen=True, slots=True)
class DoorLimits:
    """What the door refuses before anything runs: body size and time, the per-key
    request rate (counted for the cluster: :mod:`.rates`), idempotency claims' life, and
    how many failed authentications each replica writes to the audit trail."""

    max_body_bytes: int = 1 << 20
    requests_per_minute: int = 600  # per API key
    #: How long an ``Idempotency-Key`` is remembered (Stripe's and OpenAI's 24 hours);
    #: expired claims are swept every ``idempotency_sweep_s``.
    idempotency_ttl_s: float = 86_400.0
    idempotency_sweep_s: float = 3_600.0
    #: Failed authentications written to the audit trail per minute (per replica); the
    #: rest are counted and the count goes into the next record written, so a flood of
    #: bad keys cannot turn into a flood of audit writes.
    audit_failures_per_minute: int = 60
    #: How long a request's body may take to arrive once its headers have: a client
    #: that declares more than it sends gets 408 then, not a replica waiting for ever.
    body_timeout_s: float = 5.0
    #: The window ``requests_per_minute`` counts in (seconds; a minute unless told).
    rate_window_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "requests_per_minute", "audit_failures_per_minute"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"door limit {name} must be an integer >= 1")
        for name in ("idempotency_ttl_s", "idempotency_sweep_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"door limit {name} must be > 0")
        if not 0 < self.rate_window_s <= 86_400:
            raise ConfigError("door limit rate_window_s must be in (0, 86400] seconds")


class ApiError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        headers = dict(self.headers)
        if self.status < 500 and self.status not in (408, 409, 429):
            headers["x-should-retry"] = "false"
        body = {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
        return JSONResponse(body, status_code=self.status, headers=headers)


class Gateway:
    """One replica's state: the runtime client (turns, histories), the store (keys and
    conversation records), and the per-key request windows."""

    def __init__(
        self,
        runtime: Any,
        limits: DoorLimits | None = None,
        jwt: JwtSettings | None = None,
        rates: Rates | None = None,
    ) -> None:
        self.runtime = runtime
        self.limits = limits or DoorLimits()
        self.jwt = jwt
        self._store: HistoryStore | None = None
        self._opening = asyncio.Lock()
        #: Where the per-key rate is counted: the cluster's (the Serve deployment passes
        #: :class:`~.rates.ClusterRates`), else this process's own windows.
        self.rates = rates or LocalRates(self.limits.requests_per_minute, self.limits.rate_window_s)
        self._failures = RequestRate(self.limits.audit_failures_per_minute)
        self._unaudited = 0  # failures past that rate since the last one written
        self._sweeper: asyncio.Task[None] | None = None
        self._audited: dict[str, float] = {}  # key -> when its success was last audited
        self._stateless: StatelessTurns | None = None
        self.last_active = 0.0  # monotonic: the latest request's arrival
        self._quiet = QuietTrim()
        self._trimmer: asyncio.Task[None] | None = None

    def stateless(self) -> StatelessTurns:
        """This replica's stateless turns (Chat Completions), made on first use."""
        if self._stateless is None:
            config = self.runtime.config
            registry = self.runtime.registry

            async def fetch_app() -> App:
                app: App = await asyncio.to_thread(registry.served_app)
                return app

            self._stateless = StatelessTurns(config.namespace, config, fetch_app)
        return self._stateless

    async def store(self) -> HistoryStore:
        async with self._opening:
            if self._store is None:
                store = open_store(self.runtime.config.store)
                await store.open()
                self._store = store
                self._sweeper = asyncio.create_task(self._sweep_forever())
                self._trimmer = asyncio.create_task(self._trim_when_quiet())
        return self._store

    async def _trim_when_quiet(self) -> None:
        """A burst's freed memory back to the OS once requests have stopped
        (:mod:`overstory.memory`: after 10 s of quiet, then at doubling waits)."""
        while True:
            await asyncio.sleep(self._quiet.quiet_s / 2)
            if self._quiet.due(self.last_active, time.monotonic()):
                given = trim()
                if given:
                    log.info("the door gave back %.1f MB after a busy spell", given / 2**20)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.limits.idempotency_sweep_s)
            with contextlib.suppress(OverstoryError):  # the store is away: try next time
                await self.sweep_idempotency()

    async def sweep_idempotency(self, now: float | None = None) -> int:
        """Forget ``Idempotency-Key`` claims older than ``idempotency_ttl_s``; returns
        how many. Each is a compare-and-delete, so replicas sweeping at once agree."""
        store = await self.store()
        now = time.time() if now is None else now
        swept, after = 0, ""
        while page_ := await store.settings(_IDEMPOTENT, after=after, limit=500):
            for key, raw in page_:
                if _claim_expired(raw, now, self.limits.idempotency_ttl_s):
                    swept += await store.delete_setting(key, expected=raw)
            after = page_[-1][0]
        return swept

    async def principal(self, request: Request) -> Principal:
        self.last_active = time.monotonic()
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401,
                "You didn't provide an API key: send Authorization: Bearer <key>.",
                code="invalid_api_key",
            )
        token = token.strip()
        scheme = "jwt" if self.jwt is not None and not token.startswith(f"{KEY_PREFIX}_") else "key"
        try:
            if scheme == "jwt":
                principal = await authenticate_jwt(self.jwt, token)  # type: ignore[arg-type]
            else:
                principal = await authenticate_key(await self.store(), token)
        except AuthenticationFailed as exc:
            if self._failures.admit("auth.failed") is None:
                detail: dict[str, Any] = {"scheme": scheme, "reason": str(exc)[:120]}
                if self._unaudited:
                    detail["unaudited_before"] = self._unaudited
                    self._unaudited = 0
                await self.audit(
                    who="anonymous",
                    action="auth.failed",
                    target=request.url.path[:100],
                    outcome="denied",
                    detail=detail,
                )
            else:
                self._unaudited += 1
            raise ApiError(401, str(exc), code="invalid_api_key") from exc
        await self._audit_success(principal, scheme)
        await self._count(principal)
        return principal

    async def audit(self, **fields: Any) -> None:
        """One audit record (:mod:`overstory.audit`; never message text or a secret)."""
        await note(await self.store(), **fields)

    async def _audit_success(self, principal: Principal, scheme: str) -> None:
        """A key's (or token subject's) first success here, then one every 10 minutes:
        every request would make the trail a bottleneck for nothing."""
        who = principal.key_id or f"jwt:{principal.user}"
        now = time.monotonic()
        if now - self._audited.get(who, -1e9) < 600:
            return
        if len(self._audited) > 100_000:
            self._audited.clear()
        self._audited[who] = now
        await self.audit(
            who=principal.user,
            action="auth.ok",
            target=principal.key_id or "jwt",
            outcome="ok",
            detail={"scheme": scheme, "admin": principal.admin},
        )

    async def _count(self, principal: Principal) -> None:
        """The per-key request rate, cluster-wide (429 with ``Retry-After``)."""
        wait = await self.rates.admit(principal.key_id or f"user:{principal.user}")
        if wait is not None:
            window = self.limits.rate_window_s
            per = "minute" if window == 60 else f"{window:g} seconds"
            raise ApiError(
                429,
                f"Rate limit reached: {self.limits.requests_per_minute} requests per {per} "
                "per API key.",
                type_="requests",
                code="rate_limit_exceeded",
                headers={"retry-after": str(max(1, math.ceil(wait)))},
            )

    # -- conversation records -- #

    async def record(self, conversation_id: str) -> ConversationRecord | None:
        return await load_record(await self.store(), conversation_id)

    async def reach(
        self, principal: Principal, conversation_id: str, need: Need
    ) -> ConversationRecord:
        """The conversation, if this principal may do what ``need`` says (:func:`access`);
        404 or 403 otherwise."""
        record = await self.record(conversation_id)
        status = access(record, principal, need)
        if status != 200:
            await self.audit(
                who=principal.user,
                action="access.denied",
                target=str(conversation_id)[:64],
                outcome="denied",
                detail={"need": need, "status": status},
            )
        elif record is not None and principal.admin and record.owner != principal.user:
            await self.audit(
                who=principal.user,
                action="admin.access",
                target=record.id,
                outcome="ok",
                detail={"need": need, "owner": record.owner},
            )
        if status == 404:
            raise ApiError(
                404,
                f"Conversation with id '{str(conversation_id)[:64]}' not found.",
                param="conversation_id",
                code="not_found",
            )
        if status == 403:
            raise ApiError(
                403,
                f"conversation {conversation_id} is shared with you for reading only"
                if need == "write"
                else f"only the owner of conversation {conversation_id} may do this",
                code="permission_denied",
            )
        assert record is not None
        return record

    async def conversation(self, record: ConversationRecord, principal: Principal) -> Any:
        """The runtime's handle of this conversation, acting for ``principal``: where
        the conversation lives, every call is checked again (``check_access``)."""
        conv = await self.runtime.conversation_async(record.id, agent=record.agent)
        return conv.acting_for(principal)

    def jobs(self, store: HistoryStore) -> JobBook:
        return JobBook(store, self.runtime.config.namespace)

    async def background(
        self, record: ConversationRecord, text: str, response_id: str, version: str | None
    ) -> JobRecord:
        """A background response: a job running turn ``response_id`` of the conversation
        (made once however often the request is retried), the runner woken."""
        assert record.agent is not None
        job = new_job(
            record.id,
            record.agent,
            text,
            max_attempts=3,
            webhook="",
            now=time.time(),
            turn_id=response_id,
            version=version or "",
        )
        job = await self.jobs(await self.store()).add_once(job)
        await asyncio.to_thread(self.runtime.jobs.poke)
        return job

    async def cancel_job(self, job: JobRecord) -> JobRecord:
        """Cancel a background response's job if it is still queued; its state after."""
        return (await self.jobs(await self.store()).cancel(job.id, time.time()))[0]

    async def remember(self, response_id: str, echo: dict[str, Any]) -> None:
        """Keep what a stored response repeats of its request (its metadata,
        instructions, tools...: :data:`~.wire.DEFAULT_ECHO` unless set), for whoever
        reads it later; written once (a retried create keeps the first)."""
        store = await self.store()
        await store.put_setting(RESPONSE.key(response_id), json.dumps(echo), expected=None)

    async def recall(self, response_id: str) -> dict[str, Any]:
        """What :meth:`remember` kept of a response's request (the defaults: ``{}``),
        and ``deleted`` once :meth:`forget` marked it."""
        raw = await (await self.store()).get_setting(RESPONSE.key(response_id))
        echo = json.loads(raw) if raw else {}
        return {k: v for k, v in echo.items() if k in DEFAULT_ECHO or k == "deleted"}

    async def forget(self, response_id: str) -> None:
        """Mark a response deleted (its readers get 404 from then on)."""
        store = await self.store()
        key = RESPONSE.key(response_id)
        while True:
            raw = await store.get_setting(key)
            marked = json.dumps({**(json.loads(raw) if raw else {}), "deleted": True})
            if await store.put_setting(key, marked, expected=raw):
                return

    async def job_of(self, response_id: str) -> JobRecord | None:
        """The background job of a response, if it is one."""
        return await self.jobs(await self.store()).for_turn(response_id)

    async def create(
        self,
        principal: Principal,
        agent: str | None,
        metadata: Any,
        conversation_id: str | None = None,
    ) -> ConversationRecord:
        """A new conversation of ``principal`` (or, for a retried create, the one the
        first try made: ``conversation_id``)."""
        made = await create_record(
            await self.store(), principal.user, agent, _metadata(metadata), conversation_id
        )
        if made is None:
            raise ApiError(500, "conversation id collision, try again", type_="server_error")
        return made

    async def owned_by(self, user: str) -> list[ConversationRecord]:
        return await owned_records(await self.store(), user)

    async def update(self, record: ConversationRecord, **changes: Any) -> ConversationRecord:
        return await update_record(await self.store(), record, **changes)

    async def delete(self, record: ConversationRecord) -> None:
        await delete_record(await self.store(), record)

    async def idempotent(
        self, principal: Principal, request: Request, body: dict[str, Any], new_id: str
    ) -> str:
        """The id this create makes: ``new_id``, or — when an ``Idempotency-Key`` this
        user sent before for the same route and body comes again — the id the first
        request made (so a retried POST never starts a second turn). The same key with
        another body is refused."""
        key = request.headers.get("idempotency-key")
        if key is None:
            return new_id
        if not key or len(key) > _MAX_IDEMPOTENCY_KEY or not key.isprintable():
            raise ApiError(
                400,
                f"Idempotency-Key: 1 to {_MAX_IDEMPOTENCY_KEY} printable characters",
                param="Idempotency-Key",
            )
        scope = hashlib.sha256(f"{principal.user}\0{request.url.path}\0{key}".encode())
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        store = await self.store()
        slot = _IDEMPOTENT + scope.hexdigest()
        now = time.time()
        claim = json.dumps({"id": new_id, "body": digest, "at": now})
        if await store.put_setting(slot, claim, expected=None):
            return new_id
        raw = await store.get_setting(slot) or claim
        if _claim_expired(raw, now, self.limits.idempotency_ttl_s):
            if await store.put_setting(slot, claim, expected=raw):
                return new_id  # the key is a new one now; a racing replica's claim wins
            raw = await store.get_setting(slot) or claim
        first = json.loads(raw)
        if first["body"] != digest:
            raise ApiError(
                400,
                "Idempotency-Key was used with another request body",
                param="Idempotency-Key",
                code="idempotency_key_reused",
            )
        return str(first["id"])

    async def only_agent(self) -> str:
        """The agent a conversation that names none talks to when it must have one now
        (items stored before its first response): the app's only agent; a 400 when it
        serves several."""
        served = list((await asyncio.to_thread(self.runtime.served))["agents"])
        if len(served) != 1:  # the conversation's state, not the request, is wanting
            raise ApiError(
                409,
                f"the conversation has no agent yet and this door serves {len(served)} "
                f"({', '.join(served[:5])}): name it when creating the conversation "
                "(extra_body={'agent': NAME}), or send a response first",
                param="agent",
                code="conversation_has_no_agent",
            )
        return str(served[0])

    async def agent_of(self, model: Any, param: str = "model") -> tuple[str, str | None]:
        """``(agent, version)`` of ``model``: a served agent's name, or ``name/version``
        for one of its served versions (``None``: the rollout chooses)."""
        if not isinstance(model, str) or not model:
            raise ApiError(400, f"{param}: the name of a served agent is required", param=param)
        name, slash, version = model.partition("/")
        if slash and (not version or "/" in version):
            raise ApiError(400, f"{param}: 'AGENT' or 'AGENT/VERSION'", param=param)
        registry = self.runtime.registry
        try:  # a name not cached asks the tree again: not on the event loop
            name = str(await asyncio.to_thread(registry.agent_name, name))
            if slash:
                versions = registry.served()["agents"][name]
                if version not in versions:  # deployed since? ask once more
                    served = await asyncio.to_thread(registry.served, True)
                    versions = served["agents"].get(name, [])
                if version not in versions:
                    raise UnknownAgent(model, [f"{name}/{v}" for v in versions])
        except UnknownAgent as exc:
            raise ApiError(400, str(exc), param=param, code="model_not_found") from exc
        return name, (version or None)


def _claim_expired(raw: str, now: float, ttl_s: float) -> bool:
    """Whether an ``Idempotency-Key`` claim is past its time (a claim without one, from
    before claims had it, is kept)."""
    try:
        at = json.loads(raw).get("at")
    except (ValueError, AttributeError):
        return False
    return isinstance(at, (int, float)) and now - at > ttl_s


def _metadata(value: Any) -> dict[str, str]:
    try:
        return validate_metadata(value)
    except UsageError as exc:
        raise ApiError(400, str(exc), param="metadata") from exc


def _only(body: dict[str, Any], *allowed: str) -> dict[str, Any]:
    """``body`` if it has no field but ``allowed``; a 400 naming the first other one."""
    for key in body:
        if key not in allowed:
            raise ApiError(400, f"unknown parameter {key!r:.60}", param=str(key)[:60])
    return body


async def _json(request: Request, gateway: Gateway) -> dict[str, Any]:
    limit = gateway.limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body larger than {limit} bytes", code="body_too_large")
    raw = b""
    try:
        async with asyncio.timeout(gateway.limits.body_timeout_s):
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > limit:
                    raise ApiError(
                        413, f"request body larger than {limit} bytes", code="body_too_large"
                    )
    except TimeoutError as exc:
        raise ApiError(
            408,
            f"the request body did not arrive within {gateway.limits.body_timeout_s:g} s "
            f"({len(raw)} bytes came; the Content-Length was {declared})",
            code="body_timeout",
        ) from exc
    if too_deep(raw, MAX_JSON_DEPTH):  # before the parser recurses into it
        raise ApiError(
            400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json"
        )
    try:
        body = json.loads(raw) if raw else {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


app = FastAPI(title="overstory", docs_url=None, redoc_url=None, openapi_url=None)


@app.get("/openapi.json")
async def openapi_document(request: Request) -> Response:
    """The OpenAPI 3.1 document of this door (:mod:`.openapi`), for its served agents."""
    gateway = _gateway(request)
    served = await asyncio.to_thread(gateway.runtime.served)
    limit = gateway.runtime.config.limits.max_message_chars
    return JSONResponse(openapi(list(served["agents"]), limit))


@app.get("/docs")
async def api_docs() -> Response:
    """Swagger UI over ``/openapi.json`` (its scripts come from a CDN)."""
    return get_swagger_ui_html(openapi_url="/openapi.json", title="overstory API")


#: The replica's gateway. A module global, not ``app.state``: Serve runs a copy of the
#: app object in the replica, while the route functions (and this global) are the module's.
_INSTALLED: list[Gateway] = []


def install(gateway: Gateway) -> None:
    """Make ``gateway`` the one this process's routes use."""
    _INSTALLED[:] = [gateway]


def _gateway(request: Request) -> Gateway:
    if not _INSTALLED:
        raise ApiError(503, "the gateway is starting", type_="server_error")
    return _INSTALLED[0]


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> Response:
    return exc.response()


@app.exception_handler(OverstoryError)
async def _overstory_error(request: Request, exc: OverstoryError) -> Response:
    # Raised where the conversation lives, if its own check refuses what the door let by.
    if isinstance(exc, UnknownConversation):
        return ApiError(404, str(exc), code="not_found").response()
    if isinstance(exc, NotPermitted):
        return ApiError(403, str(exc), code="permission_denied").response()
    if isinstance(exc, QuotaExceeded):
        headers = {"retry-after": str(max(1, math.ceil(exc.retry_after_s)))}
        if exc.limit == "tokens_per_day":  # hours away: a client's quick retry cannot help
            headers["x-should-retry"] = "false"
        return ApiError(
            429, str(exc), type_="insufficient_quota", code="quota_exceeded", headers=headers
        ).response()
    if isinstance(exc, UsageError):
        return ApiError(400, str(exc)).response()
    if store_failed(exc):
        metrics().store_error("door")
    return ApiError(503, f"{type(exc).__name__}: {exc}", type_="server_error").response()


@app.exception_handler(404)
async def _not_found(request: Request, exc: Exception) -> Response:
    return ApiError(404, f"no route {request.method} {request.url.path[:100]}").response()


@app.exception_handler(405)
async def _not_allowed(request: Request, exc: Exception) -> Response:
    # Starlette's own Allow names the first matching route's methods only: every route
    # on this path counts (GET and DELETE of one resource are two routes).
    scope = {"type": "http", "path": request.url.path, "method": request.method}
    methods = sorted(
        {
            method
            for route in request.app.routes
            if isinstance(route, APIRoute) and route.matches(scope)[0] != Match.NONE
            for method in route.methods or ()
            if method != "HEAD"
        }
    )
    headers = {"allow": ", ".join(methods)} if methods else None
    return ApiError(405, f"method {request.method} not allowed here", headers=headers).response()


@app.get("/")
async def chat_page() -> Response:
    """A minimal chat page (static HTML and JS, no build step): paste a key, pick or
    start a conversation, watch replies stream, reload mid-turn and read on."""
    page_file = resources.files("overstory.gateway").joinpath("static/index.html")
    return HTMLResponse(page_file.read_text(encoding="utf-8"))


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/readyz")
async def readyz(request: Request) -> Response:
    gateway = _gateway(request)
    problems: list[str] = []
    try:
        await (await gateway.store()).get_setting(READYZ.key())
    except OverstoryError as exc:
        problems.append(f"store: {exc}")
    try:
        from ..runtime import ops

        probe = ops.Probe(gateway.runtime.config.namespace, timeout_s=5.0)
        problems += await asyncio.wait_for(asyncio.to_thread(ops.health, probe), 15)
    except (OverstoryError, TimeoutError) as exc:
        problems.append(f"tree: {type(exc).__name__}: {exc}")
    status = 503 if problems else 200
    return JSONResponse({"ready": not problems, "problems": problems}, status_code=status)


# --- conversations ------------------------------------------------------------------------


@app.post("/v1/conversations")
async def create_conversation(request: Request) -> Response:
    gateway = _gateway(request)
    principal = await gateway.principal(request)
    body = _only(await _json(request, gateway), "metadata", "items", "agent")
    messages: list[Message] = []
    if body.get("items"):
        try:
            messages = conversation_messages(body["items"])
        except ParamError as exc:
            raise ApiError(400, str(exc), param=exc.param) from exc
    agent = None
    if body.get("agent") is not None:
        agent, version = await gateway.agent_of(body.get("agent"), "agent")
        if version is not None:
            raise ApiError(
                400,
                "agent: a conversation talks to an agent by name; choose a version per "
                "response (model='AGENT/VERSION')",
                param="agent",
            )
    chosen = await gateway.idempotent(principal, request, body, new_conversation_id())
    if messages and agent is None:
        agent = await gateway.only_agent()
    record = await gateway.create(principal, agent, body.get("metadata"), chosen)
    if messages:  # its first items, stored once however often this is retried
        await _append(await gateway.conversation(record, principal), messages, f"{record.id}:items")
    return JSONResponse(record.public())


@app.get("/v1/models")
async def list_models(request: Request) -> Response:
    """The served agents, as OpenAI lists models (``model`` of a response names one)."""
    gateway = _gateway(request)
    await gateway.principal(request)
    served = await asyncio.to_thread(gateway.runtime.served)
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": "overstory"}
        for name in served["agents"]
    ]
    return JSONResponse({"object": "list", "data": data})


@app.get("/v1/conversations")
async def list_conversations(request: Request) -> Response:
    """The caller's own conversations (not in OpenAI's API: its Conversations API has no
    listing), paged as items are: ``after``, ``limit``, ``order`` (default ``desc``)."""
    gateway = _gateway(request)
    principal = await gateway.principal(request)
    query = request.query_params
    limit, order = _paging(query)
    records = await gateway.owned_by(principal.user)
    objects = [{**r.public(), "agent": r.agent} for r in records]
    try:
        return JSONResponse(page(objects, after=query.get("after"), limit=limit, order=order))
    except UsageError as exc:
        raise ApiError(400, str(exc), param="after") from exc


def _paging(query: Any) -> tuple[int, str]:
    raw_limit = query.get("limit", "20")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 100:
        raise ApiError(400, "limit: an integer from 1 to 100", param="limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ApiError(400, "order: 'asc' or 'desc'", param="order")
    return int(raw_limit), order


@app.get("/v1/conversations/{conversation_id}")
async def get_conversation(conversation_id: str, request: Request) -> Response:
    gateway = _gateway(request)
    record = await gateway.reach(await gateway.principal(request), conversation_id, "read")
    return JSONResponse(record.public())


@app.post("/v1/conversations/{conversation_id}")
async def update_conversation(conversation_id: str, request: Request) -> Response:
    gateway = _gateway(request)
    record = await gateway.reach(await gateway.principal(request), conversation_id, "own")
    body = _only(await _json(request, gateway), "metadata")
    record = await gateway.update(record, metadata=_metadata(body.get("metadata")))
    return JSONResponse(record.public())


@app.delete("/v1/conversations/{conversation_id}")
async def delete_conversation(conversation_id: str, request: Request) -> Response:
    gateway = _gateway(request)
    record = await gateway.reach(await gateway.principal(request), conversation_id, "own")
    await gateway.delete(record)
    return JSONResponse({"id": record.id, "object": "conversation.deleted", "deleted": True})


@app.get("/v1/conversations/{conversation_id}/shares")
async def list_shares(conversation_id: str, request: Request) -> Response:
    """Who else reaches the conversation, and how (owner and admins only)."""
    gateway = _gateway(request)
    record = await gateway.reach(await gateway.principal(request), conversation_id, "own")
    return JSONResponse(_shares(record))


@app.post("/v1/conversations/{conversation_id}/shares")
async def share(conversation_id: str, request: Request) -> Response:
    """``{"user": ID, "access": "read" | "write" | "none"}``: share the conversation
    with a user, change how, or stop (``none``). Owner and admins only."""
    gateway = _gateway(request)
    principal = await gateway.principal(request)
    record = await gateway.reach(principal, conversation_id, "own")
    body = _only(await _json(request, gateway), "user", "access")
    user, level = body.get("user"), body.get("access")
    try:
        user = validate_user_id(user)
    except InvalidUserId as exc:
        raise ApiError(400, f"user: {exc}", param="user") from exc
    if level not in ("read", "write", "none"):
        raise ApiError(400, "access: 'read', 'write' or 'none'", param="access")
    if user == record.owner:
        raise ApiError(400, "user: the owner has every right already", param="user")
    shares = {k: v for k, v in record.shares.items() if k != user}
    if level != "none":
        shares[user] = level
    record = await gateway.update(record, shares=shares)
    await gateway.audit(
        who=principal.user,
        action="share.changed",
        target=record.id,
        outcome="ok",
        detail={"user": user, "access": level},
    )
    return JSONResponse(_shares(record))


def _shares(record: ConversationRecord) -> dict[str, Any]:
    data = [{"user": u, "access": a} for u, a in sorted(record.shares.items())]
    return {"object": "conversation.shares", "conversation_id": record.id, "data": data}


@app.get("/v1/conversations/{conversation_id}/items")
async def list_items(conversation_id: str, request: Request) -> Response:
    gateway = _gateway(request)
    principal = await gateway.principal(request)
    record = await gateway.reach(principal, conversation_id, "read")
    query = request.query_params
    limit, order = _paging(query)
    items: list[dict[str, Any]] = []
    try:
        if record.agent is not None:  # one page read from the store, not the history
            conv = await gateway.conversation(record, principal)
            read = items_read(query.get("after"), limit, order)
            items = conversation_items(await conv.history_async(**read))  # type: ignore[arg-type]
        listed = page(items, after=query.get("after"), limit=limit, order=order)
    except UsageError as exc:  # a cursor naming no item of this conversation
        raise ApiError(404, str(exc), param="after", code="not_found") from exc
    return JSONResponse(listed)


async def _holding(
    gateway: Gateway, principal: Principal, record: ConversationRecord
) -> tuple[ConversationRecord, Any]:
    """A conversation that is to hold items, and its handle: one with no agent yet
    talks to the app's only agent (:meth:`Gateway.only_agent`)."""
    if record.agent is None:
        record = await gateway.update(record, agent=await gateway.only_agent())
    return record, await gateway.conversation(record, principal)


@app.post("/v1/conversations/{conversation_id}/items")
async def create_items(conversation_id: str, request: Request) -> Response:
    """Append up to 20 items (messages, tool calls and their outputs) with no model
    call; answers them as stored (their ids)."""
    gateway = _gateway(request)
    principal = await gateway.principal(request)
    record = await gateway.reach(principal, conversation_id, "write")
    body = _only(await _json(request, gateway), "items")
    try:
        messages = conversation_messages(body.get("items"))
    except ParamError as exc:
        raise ApiError(400, str(exc), param=exc.param) from exc
    record, conv = await _holding(gateway, principal, record)
    turn_id = await gateway.idempotent(principal, request, body, f"items_{uuid.uuid4().hex}")
    try:
        reply = await conv.append_async(messages, turn_id=turn_id)
    except InvalidMessage as exc:
        raise ApiError(400, f"items: {exc}", param="items") from exc
    data = conversation_items(reply.messages)
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": False,
        }
    )


async def _item(
    request: Request, conversation_id: str, item_id: str, need: Need
) -> tuple[Gateway, ConversationRecord, Any, dict[str, Any], int]:
    """``(gateway, record, handle, the item, its message's seq)``; 404 for an item the
    conversation does not have (or has deleted)."""
    gateway = _gateway(request)
    principal = await gateway.principal(request)
    record = await gateway.reach(principal, conversation_id, need)
    missing = ApiError(404, f"Item with id '{item_id[:64]}' not found.", code="not_found")
    seq = item_seq(item_id)
    if seq is None or record.agent is None:
        raise missing
    conv = await gateway.conversation(record, principal)
    messages = await conv.history_async(after=seq - 1, limit=_ITEM_READ)
    found = [i for i in conversation_items(messages) if i["id"] == item_id]
    if not found:
        raise missing
    return gateway, record, conv, found[0], seq


#: Messages read to find one item: its message and the returns an mcp_call shows.
_ITEM_READ = 17


@app.get("/v1/conversations/{conversation_id}/items/{item_id}")
async def get_item(conversation_id: str, item_id: str, request: Request) -> Response:
    item = (await _item(request, conversation_id, item_id, "read"))[3]
    return JSONResponse(item)


@app.delete("/v1/conversations/{conversation_id}/items/{item_id}")
async def delete_item(conversation_id: str, item_id: str, request: Request) -> Response:
    """Delete an item: its message becomes a tombstone (its record stays, for audit;
    the model and the lists see it no more). A tool call's item takes the whole answer
    that made it (its text and every call) with it."""
    _, record, conv, _, seq = await _item(request, conversation_id, item_id, "write")
    await conv.hide_async([seq])
    return JSONResponse(record.public())


# --- chat completions (stateless) -------------------------------------------------------------


@app.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    """OpenAI's Chat Completions: the request's ``messages`` are the context and nothing
    is stored (:mod:`overstory.conversation.stateless`); ``model`` is an agent (or
    ``agent/version``)."""
    gateway = _gateway(request)
    principal = await gateway.principal(request)
    body = await _json(request, gateway)
    name, version = await gateway.agent_of(body.get("model"))
    model = name if version is None else f"{name}/{version}"
    try:
        chat = chat_request(body)
    except ParamError as exc:
        raise ApiError(400, str(exc), param=exc.param) from exc
    context = _checked(gateway, chat.context, chat.tools, "messages")
    turns = gateway.stateless()
    agent = await turns.agent(name, version)
    completion_id = new_completion_id()
    options = _stateless_options(context, chat.tools, chat.settings, chat.output, context.system)
    if not chat.stream:
        reply = await turns.run(principal.user, agent, context.messages, context.text, **options)
        return JSONResponse(chat_completion(completion_id, model, reply, int(time.time())))
    run = _StatelessRun(
        turns,
        principal.user,
        agent,
        context,
        completion_id,
        gateway.runtime.config.conversations.turn_timeout_s,
        options,
    )
    await run.primed()  # what fails before the first delta is an HTTP error
    chunks = ChatChunks(completion_id, model, chat.include_usage)

    def chunk_of(event: TurnEvent) -> bytes:
        if event.type == "delta":
            return chunks.delta(event.text)
        if event.type == "tool_call" and event.tool_call and event.tool_call.client:
            return chunks.tool_call(event.tool_call)
        if event.type in ("completed", "incomplete") and isinstance(event.reply, Reply):
            return chunks.end(event.reply)  # cut short: what was shown, finish "length"
        if event.type == "failed":
            return ChatChunks.error(event.text[:300]) + b"data: [DONE]\n\n"
        return b""

    async def body_of() -> AsyncIterator[bytes]:
        yield chunks.start()
        async for batch in run.batches():  # what arrived together goes out in one write
            chunk = b"".join(chunk_of(event) for event in batch)
            if chunk:
                yield chunk

    return _sse(body_of())


def _checked(
    gateway: Gateway, context: Context, tools: tuple[ToolDefinition, ...], param: str
) -> Context:
    """A request's context once its turn is checked as any turn is (its text a message,
    or its tool outputs well formed; its tools well formed): a 400 naming ``param``."""
    limit = gateway.runtime.config.limits.max_message_chars
    request = TurnRequest("", context.text, tools=tools, tool_outputs=context.outputs)
    try:
        validate_turn(request, max_chars=limit)
    except InvalidMessage as exc:
        raise ApiError(400, f"{param}: {exc}", param=param) from exc
    for i, message in enumerate(context.messages):
        if len(message.content) > limit:
            raise ApiError(400, f"{param}: message {i} is over {limit} characters", param=param)
    if len(context.system) > limit:
        raise ApiError(400, f"{param}: the system text is over {limit} characters", param=param)
    return context


def _stateless_options(
    context: Context,
    tools: tuple[ToolDefinition, ...],
    settings: dict[str, Any] | None,
    output: Any,
    system: str,
) -> dict[str, Any]:
    """The keyword options of a stateless turn (:meth:`StatelessTurns.run`): ``system``
    is the text added to the agent's instructions."""
    return {
        "system": system,
        "settings": settings,
        "output_type": output,
        "carrier": inject(),
        "client_tools": tools,
        "tool_outputs": context.outputs,
    }


class _StatelessRun:
    """A stateless turn running in this replica (:mod:`overstory.conversation.stateless`),
    its events in a :class:`~overstory.conversation.turnlog.TurnLog` as a conversation's
    streamed turn has them: what both APIs' readers translate."""

    def __init__(
        self,
        turns: StatelessTurns,
        user: str,
        agent: Agent,
        context: Context,
        turn_id: str,
        timeout_s: float,
        options: dict[str, Any],
    ) -> None:
        """Start ``user``'s turn of ``agent`` on ``context`` (its messages, then its text
        or tool outputs; :meth:`~overstory.conversation.stateless.StatelessTurns.run`,
        its keyword ``options``), its events logged under ``turn_id``."""
        self.log = TurnLog(turn_id)
        self.log.emit("started")
        self.timeout_s = timeout_s
        self.batch_s = turns.config.streams.batch_s
        run = turns.run(
            user,
            agent,
            context.messages,
            context.text,
            emit=self.log.emit,
            should_stop=self._stopping,
            **options,
        )
        self.task = asyncio.create_task(run)
        self.task.add_done_callback(self._ended)

    def _stopping(self) -> bool:
        return self.log.cancelled

    def _ended(self, task: asyncio.Task[Reply]) -> None:
        if task.cancelled():
            self.log.emit("failed", text="cancelled")
            return
        exc = task.exception()
        if exc is None:
            self.log.emit("completed", reply=task.result())
        elif isinstance(exc, TurnIncomplete):
            self.log.emit("incomplete", text=exc.reason, reply=exc.reply)
        else:
            self.log.emit("failed", text=str(exc)[:500], retryable=not is_permanent(exc))

    async def primed(self) -> None:
        """Wait for its first news; a turn that could not start (quota, bad input)
        raises here, where the request can still be answered with an error status."""
        while not await self.log.wait_after(0, self.timeout_s) and not self.log.finished:
            pass
        exc = self.task.exception() if self.task.done() else None
        if exc is not None and not isinstance(exc, TurnFailed):
            raise exc

    async def batches(self) -> AsyncIterator[list[TurnEvent]]:
        """Its events as they come, in the groups they arrived in, until the last; a
        reader that stops early asks the turn to stop at its next safe point."""
        after = -1
        try:
            while True:
                events = await self.log.wait_after(after, self.timeout_s, self.batch_s)
                if events:
                    after = events[-1].seq
                    yield events
                if self.log.finished and after >= self.log.last_seq:
                    return
        finally:
            if not self.task.done():
                self.log.cancelled = True


# --- responses ------------------------------------------------------------------------------


@app.post("/v1/responses")
async def create_response(request: Request) -> Response:
    gateway = _gateway(request)
    principal = await gateway.principal(request)
    body = await _json(request, gateway)
    agent, version = await gateway.agent_of(body.get("model"))
    model = agent if version is None else f"{agent}/{version}"
    stream = False if body.get("stream") is None else body["stream"]
    if not isinstance(stream, bool):
        raise ApiError(400, "stream: a boolean", param="stream")
    background = False if body.get("background") is None else body["background"]
    if not isinstance(background, bool):
        raise ApiError(400, "background: a boolean", param="background")
    try:
        options = turn_options(body)
        tools = client_tools(body.get("tools"))
        context = input_context(
            body.get("input"), names(tools), stored=body.get("store") is not False
        )
    except ParamError as exc:
        raise ApiError(400, str(exc), param=exc.param) from exc
    context = _checked(gateway, context, tools, "input")
    instructions = "\n\n".join(t for t in (options.instructions, context.system) if t)
    metadata = _metadata(body.get("metadata"))
    shown = _echo(body, instructions, tools, metadata)
    if background and (options.any or tools or instructions or context.outputs):
        raise ApiError(
            400,
            "a background response takes a user message only (no tools, instructions, "
            "temperature, max_output_tokens or text.format yet): send it in the foreground",
            param="background",
        )
    if background and stream:
        raise ApiError(
            400,
            "background with stream is not supported: create it, then stream it with "
            "GET /v1/responses/{id}?stream=true",
            param="stream",
        )
    if body.get("store") is False:  # stateless: the input is the context, nothing stored
        return await _stateless_response(
            request, gateway, principal, body, (agent, version), context, tools, options, shown
        )
    record, response_id = await _conversation_for(gateway, principal, request, body, agent)
    if record.agent is None:
        record = await gateway.update(record, agent=agent)
    elif record.agent != agent:
        raise ApiError(
            400,
            f"conversation {record.id} talks to agent {record.agent!r}, not {agent!r}",
            param="model",
        )
    if tools:  # a name the agent's own tool has is refused now, not once the turn runs
        try:
            (await gateway.stateless().agent(agent, version)).with_client_tools(tools)
        except UsageError as exc:
            raise ApiError(400, f"tools: {exc}", param="tools") from exc
    conv = await gateway.conversation(record, principal)
    if context.messages:  # the caller's history first: appended as items are
        await _append(conv, context.messages, f"{response_id}:input")
    if shown != DEFAULT_ECHO:  # what its readers repeat later, as this one does
        await gateway.remember(response_id, shown)
    if background:  # a durable job runs the turn; the caller polls the response
        job = await gateway.background(record, context.text, response_id, version)
        return JSONResponse(_job_snapshot(response_id, model, job))
    # The turn starts (or is refused, as an HTTP error) before any byte is sent.
    batches = await _primed(
        conv.stream_batches_async(
            context.text,
            turn_id=response_id,
            version=version,
            settings=options.settings,
            output_type=options.output,
            tools=tools,
            tool_outputs=context.outputs,
            instructions=instructions,
        )
    )
    if stream:
        return _sse(_translated(ResponseStream(response_id, model, echo=shown), batches, -1))
    reader = ResponseStream(response_id, model, echo=shown)
    async for batch in batches:
        for event in batch:
            reader.feed(event)
    return JSONResponse(reader.snapshot())


async def _conversation_for(
    gateway: Gateway,
    principal: Principal,
    request: Request,
    body: dict[str, Any],
    agent: str,
) -> tuple[ConversationRecord, str]:
    """The conversation a stored response goes into and the response's id: the one
    ``conversation`` names, the one ``previous_response_id`` is the latest response of,
    or a new one (made once however often the request is retried)."""
    target, previous = body.get("conversation"), body.get("previous_response_id")
    if target is not None and previous is not None:
        raise ApiError(
            400,
            "conversation and previous_response_id: send one of them",
            param="previous_response_id",
        )
    if isinstance(target, dict):
        if set(target) != {"id"} or not isinstance(target["id"], str):
            raise ApiError(400, "conversation: an id, or {'id': ID}", param="conversation")
        target = target["id"]
    if previous is not None:
        record = await _previous(gateway, principal, previous)
    elif target is None:
        response_id = await gateway.idempotent(
            principal, request, body, new_response_id(new_conversation_id())
        )
        return await gateway.create(principal, agent, None, conversation_of(response_id)), (
            response_id
        )
    elif isinstance(target, str):
        record = await gateway.reach(principal, target, "write")
    else:
        raise ApiError(400, "conversation: a conversation id", param="conversation")
    return record, await gateway.idempotent(principal, request, body, new_response_id(record.id))


async def _append(conv: Any, messages: Sequence[Message], turn_id: str) -> None:
    """Store a caller's messages in the conversation (no model call), once however
    often ``turn_id`` comes; a 400 when that id stored other messages."""
    try:
        await conv.append_async(messages, turn_id=turn_id)
    except InvalidMessage as exc:
        raise ApiError(400, f"input: {exc}", param="input") from exc


async def _previous(gateway: Gateway, principal: Principal, response_id: Any) -> ConversationRecord:
    """The conversation ``previous_response_id`` continues: the response must be its
    latest (404 for a response the caller cannot reach, as for any other id; a 400 for
    an older one: continuing it would branch the conversation, which the door does not
    do)."""
    missing = ApiError(
        404,
        f"Response with id '{str(response_id)[:64]}' not found.",
        param="previous_response_id",
        code="not_found",
    )
    try:
        conversation_id = conversation_of(response_id)
    except UsageError as exc:
        raise missing from exc
    try:
        record = await gateway.reach(principal, conversation_id, "write")
    except ApiError as exc:
        if exc.status == 404:
            raise missing from exc
        raise
    if record.agent is None:
        raise missing
    conv = await gateway.conversation(record, principal)
    last = await conv.history_async(after=-1, limit=1, before=2**62)
    if not last or last[-1].turn_id != response_id:
        try:
            await conv.events_async(response_id)
        except UnknownTurn as exc:
            raise missing from exc
        raise ApiError(
            400,
            f"previous_response_id: {response_id} is not the latest response of its "
            "conversation; continuing an older one would branch it, which this door does "
            "not do (continue the latest, or start a new conversation)",
            param="previous_response_id",
        )
    return record


def _echo(
    body: dict[str, Any],
    instructions: str,
    tools: tuple[ToolDefinition, ...],
    metadata: dict[str, str],
) -> dict[str, Any]:
    """What a response object repeats of its request (OpenAI's echo of its settings)."""
    text = body.get("text")
    return {
        "instructions": instructions or None,
        "metadata": metadata,
        "previous_response_id": body.get("previous_response_id"),
        "tools": [
            {
                "type": "function",
                "name": t.name,
                "description": t.description,
                "parameters": t.parameters,
                "strict": False,
            }
            for t in tools
        ],
        "tool_choice": body.get("tool_choice") or "auto",
        "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
        "temperature": body.get("temperature"),
        "max_output_tokens": body.get("max_output_tokens"),
        "text": text if isinstance(text, dict) else {"format": {"type": "text"}},
        "truncation": body.get("truncation") or "auto",
    }


async def _stateless_response(
    request: Request,
    gateway: Gateway,
    principal: Principal,
    body: dict[str, Any],
    chosen: tuple[str, str | None],
    context: Context,
    tools: tuple[ToolDefinition, ...],
    options: TurnOptions,
    shown: dict[str, Any],
) -> Response:
    """``store=false``: the response runs as a stateless turn (as a Chat Completion
    does) on ``input`` as its context; nothing is stored, so it cannot be retrieved,
    continued, cancelled or resumed later (404, as OpenAI answers for one it did not
    store)."""
    for param, refused in (
        ("conversation", body.get("conversation") is not None),
        ("previous_response_id", body.get("previous_response_id") is not None),
        ("background", body.get("background") is True),
        ("metadata", bool(shown["metadata"])),
    ):
        if refused:
            raise ApiError(400, f"{param}: not with store=false (it would be stored)", param=param)
    if request.headers.get("idempotency-key"):
        raise ApiError(
            400, "Idempotency-Key: not with store=false (its claim would be stored)", param="store"
        )
    turns = gateway.stateless()
    name, version = chosen
    agent = await turns.agent(name, version)
    model = name if version is None else f"{name}/{version}"
    response_id = new_response_id(new_conversation_id())  # a conversation never made
    run = _StatelessRun(
        turns,
        principal.user,
        agent,
        context,
        response_id,
        gateway.runtime.config.conversations.turn_timeout_s,
        _stateless_options(
            context, tools, options.settings, options.output, shown["instructions"] or ""
        ),
    )
    await run.primed()
    reader = ResponseStream(response_id, model, store=False, echo=shown)
    if body.get("stream", False):
        return _sse(_translated(reader, run.batches(), -1))
    async for batch in run.batches():
        for event in batch:
            reader.feed(event)
    return JSONResponse(reader.snapshot())


async def _response_target(
    request: Request, response_id: str, need: Need
) -> tuple[Gateway, Any, str]:
    gateway = _gateway(request)
    principal = await gateway.principal(request)
    try:
        conversation_id = conversation_of(response_id)
    except UsageError as exc:
        raise ApiError(404, f"Response with id '{response_id[:64]}' not found.") from exc
    record = await gateway.reach(principal, conversation_id, need)
    if record.agent is None:
        raise ApiError(404, f"Response with id '{response_id[:64]}' not found.")
    conv = await gateway.conversation(record, principal)
    return gateway, conv, record.agent


@app.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request) -> Response:
    gateway, conv, agent = await _response_target(request, response_id, "read")
    echo = await gateway.recall(response_id)
    if echo.pop("deleted", False):
        raise ApiError(404, f"Response with id '{response_id[:64]}' not found.")
    query = request.query_params
    streamed = query.get("stream", "false").lower()
    if streamed not in ("true", "false"):
        raise ApiError(400, "stream: 'true' or 'false'", param="stream")
    raw = query.get("starting_after") or request.headers.get("last-event-id") or "-1"
    try:
        after = int(raw)
    except ValueError as exc:
        raise ApiError(400, "starting_after: a sequence number", param="starting_after") from exc
    if after < -1:
        raise ApiError(400, "starting_after: a sequence number", param="starting_after")
    if streamed == "true":
        await _started(gateway, conv, response_id)
        reader = ResponseStream(response_id, agent, echo=echo)
        return _sse(_translated(reader, _one_by_one(conv.resume_async(response_id)), after))
    events, job = await _known_or_queued(gateway, conv, response_id)
    if events is None:
        assert job is not None
        return JSONResponse(_job_snapshot(response_id, agent, job))
    reader = ResponseStream(response_id, agent, echo=echo)
    for event in events:
        reader.feed(event)
    shown = reader.snapshot()
    if job is not None:
        shown["background"] = True
    return JSONResponse(shown)


@app.post("/v1/responses/{response_id}/cancel")
async def cancel_response(response_id: str, request: Request) -> Response:
    gateway, conv, agent = await _response_target(request, response_id, "write")
    events, job = await _known_or_queued(gateway, conv, response_id)
    if events is None:  # a background response not started: its job is cancelled
        assert job is not None
        job = await gateway.cancel_job(job)
        if job.state != "running":  # cancelled now, or it ended before it could start
            return JSONResponse(_job_snapshot(response_id, agent, job))
        # A runner claimed it: its turn starts in a moment; cancel that turn instead of
        # answering in_progress and letting it run.
        events = await _turn_started(gateway, conv, response_id)
        if events is None:
            raise ApiError(
                409,
                f"Response {response_id[:64]} is starting and could not be cancelled yet: "
                "try again",
                code="cancel_conflict",
            )
    await conv.cancel_async(response_id)
    events, ended = await conv.events_async(response_id)
    deadline = time.monotonic() + 5.0
    while not ended and time.monotonic() < deadline:  # the turn stops at its next safe point
        more, ended = await conv.events_async(
            response_id, after=events[-1].seq if events else -1, wait_s=1.0
        )
        events += more
    reader = ResponseStream(response_id, agent, echo=await gateway.recall(response_id))
    for event in events:
        reader.feed(event)
    return JSONResponse(reader.snapshot())


@app.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> Response:
    """Delete a response: its messages (its input and its output) become tombstones —
    kept for audit, never shown to the model or listed again — and it is a 404 after."""
    gateway, conv, _ = await _response_target(request, response_id, "write")
    await _known_or_queued(gateway, conv, response_id)  # 404 for one that does not exist
    if (await gateway.recall(response_id)).get("deleted"):
        raise ApiError(404, f"Response with id '{response_id[:64]}' not found.")
    messages = [
        *await conv.history_async(turn=f"{response_id}:input"),
        *await conv.history_async(turn=response_id),
    ]
    if messages:
        await conv.hide_async([m.seq for m in messages])
    await gateway.forget(response_id)
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})


@app.get("/v1/responses/{response_id}/input_items")
async def list_input_items(response_id: str, request: Request) -> Response:
    """A response's input as items: the history it was sent with (an input list) and
    its user message, or the tool outputs it continued from."""
    gateway, conv, _ = await _response_target(request, response_id, "read")
    await _known_or_queued(gateway, conv, response_id)
    if (await gateway.recall(response_id)).get("deleted"):
        raise ApiError(404, f"Response with id '{response_id[:64]}' not found.")
    query = request.query_params
    limit, order = _paging(query)
    turn = await conv.history_async(turn=response_id)
    answered = next((i for i, m in enumerate(turn) if isinstance(m, AssistantMessage)), len(turn))
    given = [*await conv.history_async(turn=f"{response_id}:input"), *turn[:answered]]
    try:
        listed = page(conversation_items(given), after=query.get("after"), limit=limit, order=order)
    except UsageError as exc:  # a cursor naming no item of this response
        raise ApiError(404, str(exc), param="after", code="not_found") from exc
    return JSONResponse(listed)


def _job_snapshot(response_id: str, model: str, job: JobRecord) -> dict[str, Any]:
    """The response object of a background response whose turn has not started (or
    never will): queued, in progress (claimed), failed or cancelled."""
    reader = ResponseStream(response_id, model)
    shown = reader.snapshot()
    shown["background"] = True
    shown["status"] = _JOB_STATUS.get(job.state, "in_progress")
    if job.state == "failed":
        shown["error"] = {"code": "server_error", "message": job.error}
    if job.state == "cancelled":
        shown["incomplete_details"] = {"reason": None}
    return shown


#: A background response's status while its turn has not started, by its job's state.
_JOB_STATUS = {"queued": "queued", "failed": "failed", "cancelled": "cancelled"}


async def _known_or_queued(
    gateway: Gateway, conv: Any, response_id: str
) -> tuple[list[Any] | None, JobRecord | None]:
    """``(its events, its job)``: the events of a turn that has started (its job too,
    for a background response), or ``(None, job)`` for a background response whose turn
    has not started; 404 for neither."""
    job = await gateway.job_of(response_id)
    try:
        events, _ = await conv.events_async(response_id)
    except UnknownTurn as exc:
        if job is None:
            raise ApiError(404, f"Response with id '{response_id[:64]}' not found.") from exc
        return None, job
    return list(events), job


async def _turn_started(
    gateway: Gateway, conv: Any, response_id: str, within_s: float = 10.0
) -> list[Any] | None:
    """The events of a claimed background response once its turn has started (polling
    the store, the only thing the door shares with the runner), ``None`` when it did
    not within ``within_s`` or its job ended first."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        events, job = await _known_or_queued(gateway, conv, response_id)
        if events is not None:
            return events
        if job is None or job.state != "running":
            return None
        await asyncio.sleep(0.05)
    return None


async def _started(gateway: Gateway, conv: Any, response_id: str) -> None:
    """Before streaming a response: wait (up to 60 s) for a background response's turn
    to start; 404 for an unknown response, 409 for one that ended without starting."""
    deadline = time.monotonic() + 60.0
    while True:
        events, job = await _known_or_queued(gateway, conv, response_id)
        if events is not None:
            return
        assert job is not None
        if job.state in ("failed", "cancelled") or time.monotonic() > deadline:
            raise ApiError(
                409,
                f"Response {response_id[:64]} is {_JOB_STATUS.get(job.state, job.state)} "
                "and has nothing to stream: GET it without stream",
            )
        await asyncio.sleep(0.2)


async def _primed(events: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """``events`` with its first item already read: what raises while the turn starts
    raises here, where the request can still be answered with an error status."""
    first = await anext(events)

    async def chained() -> AsyncIterator[Any]:
        yield first
        async for event in events:
            yield event

    return chained()


async def _translated(
    reader: ResponseStream, batches: AsyncIterator[list[TurnEvent]], after: int
) -> AsyncIterator[bytes]:
    """The turn's events as the response's stream events, those after ``after`` only.
    What one group of turn events becomes (a first delta: the item, its content part and
    the delta) goes out as one chunk: under Serve each chunk is an object the proxy
    fetches, so a group that arrived together is written together."""
    async for batch in batches:
        chunk = b"".join(
            sse(out)
            for event in batch
            for out in reader.feed(event)
            if out["sequence_number"] > after
        )
        if chunk:
            yield chunk


async def _one_by_one(events: AsyncIterator[TurnEvent]) -> AsyncIterator[list[TurnEvent]]:
    """``events`` as groups of one."""
    async for event in events:
        yield [event]


def _sse(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(
        body,
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )
