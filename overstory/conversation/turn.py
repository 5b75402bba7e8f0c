"""One conversation turn, as pure logic over a history list and a store.

No Ray here: the conversation actor is a thin shell that serialises turns and calls
:func:`run_turn`. Every message is stored *before* the turn goes on: the user's message
before the first model call, each model reply and tool return before the next step.

A turn is identified by its ``turn_id`` (chosen by the caller). Sending the same
turn again is safe: a completed turn returns its stored reply, and a turn interrupted
part-way (the actor died) resumes from its last stored message instead of storing the
user's message twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from ..agent import Agent
from ..cache import CachingModel
from ..compaction import Compact, Trim
from ..context import RunContext
from ..exceptions import (
    Fenced,
    InvalidMessage,
    MaxRoundTripsExceeded,
    ModelError,
    QuotaExceeded,
    SequenceConflict,
    StoreError,
    TurnFailed,
    TurnIncomplete,
    UsageError,
    store_failed,
)
from ..messages import (
    AssistantMessage,
    Message,
    ModelResponse,
    Reply,
    ToolCall,
    ToolDefinition,
    ToolOutput,
    ToolReturn,
    TurnEventType,
    TurnRequest,
    Usage,
    UserMessage,
    placed,
)
from ..output import OutputInvalid, parse_output, retry_prompt
from ..providers import Model
from ..providers.base import FallThrough, ModelRequest, ModelSettings
from ..quota import Ticket, call_texts
from ..redaction import RedactingModel
from ..store import HistoryStore
from ..telemetry import (
    capture_content,
    execute_tool_span,
    invoke_agent_span,
    mark_error,
    metrics,
    record_tool_content,
    set_turn_usage,
)
from ..usage import Prices, cost_of
from ..vault import DataVault
from .window import Memory, is_overflow

__all__ = [
    "Emit",
    "append_messages",
    "awaiting",
    "continued",
    "hide_messages",
    "is_complete",
    "reply_of",
    "restarted",
    "run_turn",
]

log = logging.getLogger(__name__)

#: The most times one call is fitted and sent again after a ``context_overflow`` whose
#: error names no window (halving what is sent each time); a named window: once.
MAX_SHRINKS = 4


class Emit(Protocol):
    """Where a streamed turn reports what happens (a turn's event log appends it)."""

    def __call__(self, type: TurnEventType, /, **fields: Any) -> object: ...


def awaiting(messages: Sequence[Message]) -> tuple[ToolCall, ...]:
    """The client tools' calls ``messages`` (a turn, or a history) end on: the last
    answer's calls that have no output yet, when every one of them is a client's (the
    agent's own calls run first); else none."""
    for i in range(len(messages) - 1, -1, -1):
        message = messages[i]
        if isinstance(message, AssistantMessage):
            returned = {m.tool_call_id for m in messages[i + 1 :] if isinstance(m, ToolReturn)}
            open_calls = tuple(c for c in message.tool_calls if c.id not in returned)
            return open_calls if open_calls and all(c.client for c in open_calls) else ()
        if not isinstance(message, ToolReturn):
            return ()
    return ()


def is_complete(turn: Sequence[Message]) -> bool:
    """A turn is complete when its last message is a reply asking for no tools, or it
    ended on client tools' calls (:func:`awaiting`): the caller runs those."""
    if not turn:
        return False
    last = turn[-1]
    if isinstance(last, AssistantMessage) and not last.tool_calls:
        return True
    return bool(awaiting(turn))


def reply_of(turn_id: str, turn: Sequence[Message], agent: str, version: str) -> Reply:
    """The :class:`Reply` of a complete turn, from its stored messages."""
    last = next(m for m in reversed(turn) if isinstance(m, AssistantMessage))
    usage = sum((m.usage for m in turn if isinstance(m, AssistantMessage)), Usage())
    return Reply(
        text=last.content,
        turn_id=turn_id,
        messages=tuple(turn),
        usage=usage,
        agent=agent,
        agent_version=version,
        incomplete=last.incomplete,
        awaiting=awaiting(turn),
    )


def continued(history: Sequence[Message], outputs: Sequence[ToolOutput]) -> list[ToolReturn]:
    """The tool returns a turn continuing from ``outputs`` stores: one per client call
    the history ends on (:func:`awaiting`), in the calls' order. Outputs for calls that
    are not awaited, given twice, or missing one of the calls are refused (nothing is
    stored): the model must see a result for every call it made."""
    pending = {c.id: c for c in awaiting(history)}
    if not pending:
        raise InvalidMessage("no client tool call awaits an output in this conversation")
    given: dict[str, ToolOutput] = {}
    for output in outputs:
        if output.call_id not in pending:
            raise InvalidMessage(
                f"tool output for {output.call_id!r:.80}: no such call awaits an output "
                f"(awaiting: {', '.join(pending)})"
            )
        if output.call_id in given:
            raise InvalidMessage(f"tool output for {output.call_id!r:.80} is given twice")
        given[output.call_id] = output
    missing = [call_id for call_id in pending if call_id not in given]
    if missing:
        raise InvalidMessage(f"no output given for the call(s) {', '.join(missing)}")
    return [
        ToolReturn(
            tool_call_id=call.id,
            tool_name=call.name,
            content=given[call.id].output,
            is_error=given[call.id].is_error,
        )
        for call in pending.values()
    ]


def restarted(turn_id: str, turn: Sequence[Message]) -> TurnRequest:
    """The request that starts stored ``turn`` again (its process died mid-turn): its
    user message, or the tool outputs it continued from."""
    first = turn[0]
    if isinstance(first, UserMessage):
        return TurnRequest(turn_id, first.content)
    outputs = []
    for m in turn:
        if not isinstance(m, ToolReturn):
            break
        outputs.append(ToolOutput(m.tool_call_id, m.content, m.is_error))
    return TurnRequest(turn_id, "", tool_outputs=tuple(outputs))


def _same_outputs(turn: Sequence[Message], outputs: Sequence[ToolOutput]) -> bool:
    """Whether stored ``turn`` began with exactly ``outputs`` (a retried continuation)."""
    head = turn[: len(outputs)]
    stored = {(m.tool_call_id, m.content) for m in head if isinstance(m, ToolReturn)}
    return len(stored) == len(outputs) == len(head) and stored == {
        (o.call_id, o.output) for o in outputs
    }


def _marked(agent: Agent, calls: Sequence[ToolCall]) -> tuple[ToolCall, ...]:
    """The model's calls, those of the turn's client tools marked ``client``."""
    return tuple(
        dataclasses.replace(c, client=True) if c.name in agent.client_tools else c for c in calls
    )


def _ended(agent: Agent, conversation_id: str, turn_id: str, turn: list[Message]) -> Reply:
    """The reply of a turn that has ended (with its structured output, when the agent
    asks for one); :class:`TurnIncomplete` if it ended cut short."""
    reply = reply_of(turn_id, turn, agent.name, agent.version)
    if reply.incomplete:
        raise TurnIncomplete(conversation_id, turn_id, reply.incomplete, reply)
    if agent.output_type is not None:
        try:
            reply = dataclasses.replace(reply, output=parse_output(agent.output_type, reply.text))
        except OutputInvalid as exc:  # stored before the type changed: the text stands
            log.warning(
                "turn %r of %r: the stored answer does not parse: %s", turn_id, conversation_id, exc
            )
    return reply


async def _structured(
    agent: Agent,
    ask: Callable[[ModelRequest], Awaitable[ModelResponse]],
    req: ModelRequest,
    response: ModelResponse,
    turn_id: str,
    conversation_id: str,
) -> ModelResponse:
    """``response`` if its text is a valid ``agent.output_type``; else the model is
    asked again — shown its answer and the validation error, neither stored — up to
    ``agent.output_retries`` times. The answer returned carries every attempt's usage."""
    assert agent.output is not None
    spent = Usage()
    for attempt in range(agent.output_retries + 1):
        try:
            parse_output(agent.output_type, response.content)
            return dataclasses.replace(response, usage=spent + response.usage)
        except OutputInvalid as exc:
            if attempt == agent.output_retries:
                raise TurnFailed(
                    conversation_id,
                    turn_id,
                    f"the model's answer is not a valid {agent.output.name} after "
                    f"{attempt + 1} attempt(s): {exc}",
                    exc,
                ) from exc
            spent += response.usage
            seq = req.messages[-1].seq + 1 if req.messages else 0
            again = (
                AssistantMessage(content=response.content, seq=seq, turn_id=turn_id),
                UserMessage(content=retry_prompt(agent.output, exc), seq=seq + 1, turn_id=turn_id),
            )
            req = dataclasses.replace(req, messages=req.messages + again)
            response = await ask(req)
    raise AssertionError("unreachable")


async def append_messages(
    store: HistoryStore,
    conversation_id: str,
    history: list[Message],
    turn_id: str,
    messages: Sequence[Message],
    *,
    epoch: int | None = None,
) -> Reply:
    """Store ``messages`` after ``history`` (extended in place) as turn ``turn_id``,
    with no model call: a caller's items. Sent again, the stored turn is returned
    (:class:`InvalidMessage` if it held other messages)."""
    turn = [m for m in history if m.turn_id == turn_id]
    if not turn and history and history[0].seq > 0:  # a tail: ask the store
        turn = await store.load_turn(conversation_id, turn_id)
    if turn:
        if [(m.kind, m.content) for m in turn] != [(m.kind, m.content) for m in messages]:
            raise InvalidMessage(
                f"turn id {turn_id!r} was already used for other messages in "
                f"conversation {conversation_id!r}"
            )
    else:
        for message in messages:
            stored = placed(message, seq=history[-1].seq + 1 if history else 0, turn_id=turn_id)
            await store.append(conversation_id, stored, epoch=epoch)
            history.append(stored)
            turn.append(stored)
    return Reply(text="", turn_id=turn_id, messages=tuple(turn), usage=Usage())


async def hide_messages(
    store: HistoryStore,
    conversation_id: str,
    history: list[Message],
    turn_id: str,
    seqs: Sequence[int],
    *,
    epoch: int | None = None,
) -> Reply:
    """Hide stored messages ``seqs`` (tombstones: their records stay for audit, the
    model and the item lists never see them again), those ``history`` holds marked in
    place; :class:`InvalidMessage` naming a seq the conversation does not have (those
    before it are hidden already: hiding is idempotent)."""
    hidden = []
    for seq in seqs:
        if not await store.hide(conversation_id, seq, epoch=epoch):
            raise InvalidMessage(f"conversation {conversation_id!r} has no message {seq}")
        for i, m in enumerate(history):
            if m.seq == seq:
                history[i] = dataclasses.replace(m, hidden=True)
                hidden.append(history[i])
    return Reply(text="", turn_id=turn_id, messages=tuple(hidden), usage=Usage())


def _never() -> bool:
    return False


async def run_turn(
    agent: Agent,
    store: HistoryStore,
    conversation_id: str,
    history: list[Message],
    turn_id: str,
    text: str,
    *,
    epoch: int | None = None,
    emit: Emit | None = None,
    should_stop: Callable[[], bool] | None = None,
    ticket: Ticket | None = None,
    owner: str | None = None,
    prices: Prices | None = None,
    memory: Memory | None = None,
    model: str | None = None,
    settings: Mapping[str, Any] | None = None,
    output_type: Any = None,
    persist: bool = True,
    client_tools: Sequence[ToolDefinition] = (),
    tool_outputs: Sequence[ToolOutput] = (),
    instructions: str = "",
) -> Reply:
    """Run (or resume, or replay) turn ``turn_id``; ``history`` — all of it, or its most
    recent part (the entity's tail; a turn older than it is looked up in the store) — is
    extended in place.

    Every write carries ``epoch`` (see :meth:`HistoryStore.acquire`), so a superseded
    incarnation gets :class:`~overstory.exceptions.Fenced` instead of writing. Raises
    :class:`TurnFailed` when the model fails or the round-trip limit is hit; the
    messages stored so far stay stored. The turn is one ``invoke_agent {agent}`` span.

    With ``emit``, the model is streamed (:meth:`~overstory.providers.Model.stream`) and
    each delta, fall-through, tool call and tool result is emitted as it happens. A
    streamed answer cut short — the model failed after its first delta, or
    ``should_stop()`` turned true at a safe point (between deltas, after a tool
    returned) — is stored as the turn's incomplete answer and raised as
    :class:`~overstory.exceptions.TurnIncomplete` (a replay raises it again).

    ``ticket``: the user's quota admitted the turn (:mod:`overstory.quota`); each model
    call reserves its estimate first and commits its real usage after. A call the quota
    refuses fails the turn (:class:`~overstory.exceptions.QuotaExceeded` as its cause).
    The caller frees what the ticket still holds when the turn ends (``finish``).
    ``owner``: the user the conversation belongs to — the scope of the agent's response
    cache (:mod:`overstory.cache`; no cache without it). ``prices``: the price table
    the turn's cost is recorded by (``overstory.cost_usd`` on its span, the
    ``overstory_cost_usd_total`` metric per model; :mod:`overstory.usage`).

    ``memory``: the conversation's context state (:class:`~.window.Memory`): each call
    sends what ``agent.context`` fits into the model's window; a prompt the provider
    still refuses as too long is fitted to the window its error names and sent again
    once, or halved up to :data:`MAX_SHRINKS` times when it names none (``None``: a
    fresh one, compacting inline). ``model``: the name of one of the
    agent's ``models`` the caller chose for this turn — an unknown one is refused before
    anything is stored — else ``agent.route`` chooses, else the agent's own model.
    ``settings``: this turn's :class:`~overstory.providers.ModelSettings` fields, over
    the agent's. ``output_type``: this turn's structured output (else the agent's;
    :mod:`overstory.output`): the answer is asked for whole (a streamed turn gets it as
    one delta, once valid), validated, and asked for again on a mismatch.
    ``persist=False``: a stateless turn (:mod:`.stateless`): its messages go into
    ``history`` only, nothing is written to the store's history.

    ``client_tools``: tools the caller offers beside the agent's own. A call to one
    is stored marked ``client`` and ends the turn (once the agent's own calls of the
    same answer have run): :attr:`Reply.awaiting` holds the calls for the caller to
    run. ``tool_outputs``: the caller's results for the calls the history ends on
    (:func:`continued`); the turn starts from them instead of a user message (``text``
    is empty) and goes on as any turn does. ``instructions``: this turn's own, with the
    agent's as its ``caller_instructions`` says (:meth:`Agent.with_instructions`).
    """
    started = time.monotonic()
    outcome = "error"
    try:
        with invoke_agent_span(agent.name, conversation_id, agent.version) as span:
            reply = await _run_turn(
                agent,
                store,
                conversation_id,
                history,
                turn_id,
                text,
                epoch,
                emit,
                should_stop,
                ticket,
                owner,
                memory or Memory(),
                model,
                settings,
                output_type,
                persist,
                client_tools,
                tool_outputs,
                instructions,
            )
            set_turn_usage(span, reply.usage.input_tokens, reply.usage.output_tokens)
            if prices:
                _record_cost(span, reply.messages, prices)
            outcome = "ok"
            return reply
    except StoreError as exc:
        if store_failed(exc):
            outcome = "store_error"
            metrics().store_error("turn")
        raise
    finally:
        metrics().turn(agent.name, outcome, time.monotonic() - started, agent.version)


async def _routed(agent: Agent, context: RunContext, text: str) -> Model:
    """The model ``agent.route`` chooses for this turn; a route that fails, or names a
    model the agent does not allow, fails the turn (the agent's code is at fault)."""
    try:
        name = agent.route(context, text)  # type: ignore[misc]
        if inspect.isawaitable(name):
            name = await name
        if name is not None and not isinstance(name, str):
            raise TypeError(f"it returned {type(name).__name__}, not a model's name or None")
        return agent.choose(name)
    except Exception as exc:
        reason = f"the agent's route failed: {type(exc).__name__}: {exc}"[:300]
        raise TurnFailed(context.conversation_id, context.turn_id, reason, exc) from exc


async def _request(
    agent: Agent,
    store: HistoryStore,
    conversation_id: str,
    history: list[Message],
    turn: list[Message],
    context: RunContext,
    memory: Memory,
) -> ModelRequest:
    """The next call's request (:meth:`Memory.request`); a context processor that fails
    fails the turn, naming it (the agent's code, not the conversation, is at fault)."""
    start = len(history) - len(turn)  # the turn is the history's tail
    while start > 0 and not isinstance(history[start], UserMessage):
        start -= 1  # a turn continuing from tool outputs: sent with the calls it answers
    try:
        return await memory.request(agent, store, conversation_id, history, start, context)
    except (ModelError, Fenced, SequenceConflict):
        raise
    except Exception as exc:
        if isinstance(agent.context, Trim | Compact):
            raise
        reason = f"the agent's context processor failed: {type(exc).__name__}: {exc}"[:300]
        raise TurnFailed(conversation_id, context.turn_id, reason, exc) from exc


class _CutShort(Exception):
    """A streamed answer ended part-way: ``text`` was shown, ``reason`` says why."""

    def __init__(self, text: str, reason: str) -> None:
        super().__init__(reason)
        self.text = text
        self.reason = reason


async def _streamed(
    agent: Agent,
    model: Model,
    req: ModelRequest,
    emit: Emit,
    should_stop: Callable[[], bool],
) -> ModelResponse:
    """One model call, streamed: its deltas and fall-throughs emitted as they come, the
    time to its first delta in the ``time_to_first_token`` metric. Raises
    :class:`_CutShort` when it fails after a delta or a stop is asked between deltas."""
    started: float | None = time.monotonic()
    shown: list[str] = []
    stream = model.stream(req)
    try:
        async for item in stream:
            if isinstance(item, str):
                if started is not None:
                    metrics().time_to_first_token(agent.name, time.monotonic() - started)
                    started = None
                shown.append(item)
                emit("delta", text=item)
                if should_stop():
                    raise _CutShort("".join(shown), "cancelled")
            elif isinstance(item, FallThrough):
                emit("fallback", text=str(item.error), model=item.model)
            else:
                return item
    except ModelError as exc:
        if shown:  # never retried nor continued: what was shown is what there is
            raise _CutShort(
                "".join(shown), f"the model failed mid-answer ({exc.kind}): {exc}"
            ) from exc
        raise
    finally:
        await stream.aclose()
    raise RuntimeError(f"{model.name}'s stream ended without a response")


def _user_part(conversation_id: str) -> str:
    """The user of an ``agent:user`` id (the id itself when it has no agent part)."""
    return conversation_id.partition(":")[2] or conversation_id


def _record_cost(span: Any, messages: Sequence[Message], prices: Prices) -> None:
    """The turn's cost on its span and, per model, in the cost metric."""
    total, priced = 0.0, False
    for m in messages:
        if isinstance(m, AssistantMessage):
            cost = cost_of(m.model, m.usage.input_tokens, m.usage.output_tokens, prices)
            if cost is not None:
                total, priced = total + cost, True
                metrics().cost(m.model, cost)
    if priced:
        span.set_attribute("overstory.cost_usd", round(total, 8))


def _failure(exc: Exception) -> str:
    return "quota" if isinstance(exc, QuotaExceeded) else "model error"


async def _run_tool(agent: Agent, call: ToolCall, context: RunContext) -> ToolReturn:
    """One tool call in an ``execute_tool {tool}`` span (an error return marks it failed)."""
    with execute_tool_span(call.name, call.id) as span:
        result = await agent.run_tool(call, context)
        # An agent that redacts never puts the original text in a span, opt-in or not.
        if not agent.redact_pii:
            record_tool_content(span, arguments=call.arguments, result=result.content)
        if result.is_error:
            # The error text may quote the user's data: it is content, recorded on opt-in.
            shown = capture_content() and not agent.redact_pii
            detail = result.content[:200] if shown else "the tool returned an error"
            mark_error(span, "tool_error", detail)
        metrics().tool_call(
            call.name if call.name in agent.tools else "unknown",
            "error" if result.is_error else "ok",
        )
        return result


async def _run_turn(
    agent: Agent,
    store: HistoryStore,
    conversation_id: str,
    history: list[Message],
    turn_id: str,
    text: str,
    epoch: int | None,
    emit: Emit | None,
    should_stop: Callable[[], bool] | None,
    ticket: Ticket | None,
    owner: str | None,
    memory: Memory,
    model_name: str | None,
    settings: Mapping[str, Any] | None,
    output_type: Any,
    persist: bool = True,
    client_tools: Sequence[ToolDefinition] = (),
    tool_outputs: Sequence[ToolOutput] = (),
    instructions: str = "",
) -> Reply:
    # The caller's choices are checked before anything is stored (UsageError).
    agent = agent.with_output(output_type).with_client_tools(client_tools)
    agent = agent.with_instructions(instructions)
    chosen = agent.choose(model_name) if model_name is not None else None
    per_turn = None if settings is None else ModelSettings.of(settings)
    forced = (per_turn or ModelSettings()).over(agent.model_settings).forced()
    offered = {t.name for t in agent.tool_definitions}
    if forced not in (None, "required", *offered):
        raise UsageError(
            f"tool_choice {forced!r}: no such tool is offered to the model "
            f"(offered: {', '.join(sorted(offered)) or 'none'})"
        )
    turn = [m for m in history if m.turn_id == turn_id]
    if persist and not turn and history and history[0].seq > 0:  # a tail: ask the store
        turn = await store.load_turn(conversation_id, turn_id)
    stop = should_stop or _never

    async def commit(message: Message) -> Message:
        stored = placed(message, seq=history[-1].seq + 1 if history else 0, turn_id=turn_id)
        if persist:
            await store.append(conversation_id, stored, epoch=epoch)
        history.append(stored)
        turn.append(stored)
        return stored

    if turn:
        first = turn[0]
        if (
            not _same_outputs(turn, tool_outputs)
            if tool_outputs
            else not isinstance(first, UserMessage) or first.content != text
        ):
            raise InvalidMessage(
                f"turn id {turn_id!r} was already used for a different message in "
                f"conversation {conversation_id!r}"
            )
        if is_complete(turn):
            return _ended(agent, conversation_id, turn_id, turn)
        if history[-1] is not turn[-1]:
            raise TurnFailed(
                conversation_id,
                turn_id,
                "the turn was interrupted and later turns have run since; send the message again",
            )
    elif tool_outputs:
        for result in continued(history, tool_outputs):
            await commit(result)
    else:
        await commit(UserMessage(content=text))

    memory.cap = None  # an overflow's cap holds for the turn it happened in
    round_trips = sum(isinstance(m, AssistantMessage) for m in turn)
    progress = None if emit is None else (lambda text: emit("progress", text=text))
    user = owner if owner is not None else _user_part(conversation_id)
    loop = asyncio.get_running_loop()
    context = RunContext(
        user,
        conversation_id,
        agent.name,
        agent.version,
        turn_id,
        DataVault(store, agent.name, user, agent.vault_shared, loop),
        progress,
        loop,
    )
    if chosen is None and agent.route is not None:
        chosen = await _routed(agent, context, text)
    agent = agent.for_turn(chosen or agent.model, per_turn)
    model = agent.model
    if agent.cache_ttl_s is not None and owner is not None:  # keyed on what is sent
        model = CachingModel(
            model,
            store,
            owner,
            agent.name,
            agent.version,
            agent.cache_ttl_s,
            tool_calls=agent.cache_tool_calls,
        )
    # With redact_pii the model sees placeholders and its answers come back restored.
    if agent.redact_pii:
        model = RedactingModel(model)

    cap = agent.output_cap(model="default")  # the turn's model: what an answer may take

    async def ask(req: ModelRequest) -> ModelResponse:
        if ticket is not None:
            await ticket.before_call(call_texts(req.instructions, req.messages), cap)
        if emit is None or agent.output is not None:  # structured: asked for whole
            return await model.call(req)
        return await _streamed(agent, model, req, emit, stop)

    while True:
        last = turn[-1]
        if isinstance(last, AssistantMessage) and last.tool_calls:
            done = {m.tool_call_id for m in turn if isinstance(m, ToolReturn)}
            for call in last.tool_calls:
                if call.id not in done and not call.client:
                    if emit is not None:
                        emit("tool_call", tool_call=call)
                    stored = await commit(await _run_tool(agent, call, context))
                    if emit is not None:
                        emit("tool_result", tool_call=call, tool_return=stored)
                    if stop():
                        await commit(AssistantMessage(incomplete="cancelled"))
                        return _ended(agent, conversation_id, turn_id, turn)
            calls = awaiting(turn)
            if calls:  # the caller runs these: the turn ends on them
                for call in calls:
                    if emit is not None:
                        emit("tool_call", tool_call=call)
                return _ended(agent, conversation_id, turn_id, turn)
        if round_trips >= agent.max_round_trips:
            reason = MaxRoundTripsExceeded(
                f"the model asked for tools on all {agent.max_round_trips} round trips "
                f"allowed by agent {agent.name!r}"
            )
            raise TurnFailed(conversation_id, turn_id, str(reason), reason) from reason
        try:
            req = await _request(agent, store, conversation_id, history, turn, context, memory)
            try:
                response = await ask(req)
            except ModelError as exc:
                if not is_overflow(exc):
                    raise
                # Too long for the model after all: fitted to the window the error
                # names and sent again once; an error naming none halves what is sent,
                # up to MAX_SHRINKS times.
                for attempt in range(1, MAX_SHRINKS + 1):
                    named = memory.overflowed(exc, req, agent.model.budget())
                    if ticket is not None:
                        await ticket.after_call(None)
                    req = await _request(
                        agent, store, conversation_id, history, turn, context, memory
                    )
                    try:
                        response = await ask(req)
                        break
                    except ModelError as again:
                        if named or attempt == MAX_SHRINKS or not is_overflow(again):
                            raise
                        exc = again
            if agent.output is not None and not response.tool_calls:
                response = await _structured(agent, ask, req, response, turn_id, conversation_id)
                if emit is not None:
                    emit("delta", text=response.content)
        except _CutShort as cut:
            if ticket is not None:  # what it used is unknown: its estimate counts
                await ticket.after_call(ticket.estimate_of_open())
            await commit(AssistantMessage(content=cut.text, incomplete=cut.reason))
            return _ended(agent, conversation_id, turn_id, turn)
        except (ModelError, QuotaExceeded) as exc:
            raise TurnFailed(conversation_id, turn_id, f"{_failure(exc)}: {exc}", exc) from exc
        if ticket is not None:
            await ticket.after_call(response.usage.input_tokens + response.usage.output_tokens)
        round_trips += 1
        if agent.model_settings.forced() is not None:  # the first call only: the turn can end
            agent = agent.for_turn(agent.model, ModelSettings(tool_choice="auto"))
        await commit(
            AssistantMessage(
                content=response.content,
                tool_calls=_marked(agent, response.tool_calls),
                usage=response.usage,
                model=response.model,
            )
        )
        if isinstance(turn[-1], AssistantMessage) and not turn[-1].tool_calls:
            return _ended(agent, conversation_id, turn_id, turn)
