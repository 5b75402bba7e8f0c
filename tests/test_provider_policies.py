"""The provider policies as pure logic: taxonomy, retry, circuit breaker, rate limiter,
endpoints and keys. No Ray and no network: scripted models and an injected clock."""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
import random
import time

import pytest

from overstory.exceptions import AllModelsFailed, ConfigError, ModelError, ModelErrorKind
from overstory.messages import ModelResponse, Usage, UserMessage
from overstory.providers import (
    BreakerModel,
    BreakerPolicy,
    CircuitBreaker,
    Endpoint,
    FallbackModel,
    LimitedModel,
    Limits,
    Model,
    ModelRequest,
    RateLimiter,
    RetryingModel,
    RetryPolicy,
    Secret,
    api_keys,
    parse_model,
    resolve_model,
)
from overstory.providers.lease import Gate, renew_every
from overstory.providers.pool import RemoteModel, provider_actor_name
from overstory.providers.retry import backoff_s
from overstory.providers.taxonomy import (
    is_context_overflow,
    kind_of_aws_error,
    kind_of_error_type,
    kind_of_status,
    parse_retry_after,
    policy,
)
from overstory.tools import ToolDefinition

HI = [UserMessage(content="hi", seq=0)]


class Scripted(Model):
    """Fails with the scripted kinds, in order, then answers."""

    def __init__(
        self, *kinds: ModelErrorKind, retry_after: float | None = None, label: str = "s"
    ) -> None:
        self.kinds = list(kinds)
        self.retry_after = retry_after
        self.calls = 0
        self.label = label

    @property
    def name(self) -> str:
        return f"scripted:{self.label}"

    async def request(self, req: ModelRequest) -> ModelResponse:
        self.calls += 1
        if self.kinds:
            kind = self.kinds.pop(0)
            raise ModelError(f"{kind} #{self.calls}", kind=kind, retry_after=self.retry_after)
        return ModelResponse(content="ok", usage=Usage(10, 5), model=self.name)


def run(model: Model) -> ModelResponse:
    return asyncio.run(model.request(ModelRequest("", HI)))


def test_a_model_request_is_a_frozen_value_that_crosses_ray() -> None:
    add = ToolDefinition("add", "Add.", {"type": "object"})
    req = ModelRequest("be brief", HI, [add])  # lists in, tuples kept
    assert req.messages == tuple(HI)
    assert req.tools == (add,)
    assert ModelRequest("be brief", HI).tools == ()
    assert pickle.loads(pickle.dumps(req)) == req  # to the provider actor
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.instructions = "ramble"  # type: ignore[misc]
    redacted = dataclasses.replace(req, instructions="<REDACTED>")
    assert (redacted.instructions, redacted.messages, redacted.tools) == (
        "<REDACTED>",
        req.messages,
        req.tools,
    )


# --- taxonomy --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (429, "rate_limited"),
        (529, "overloaded"),
        (503, "overloaded"),
        (500, "server_error"),
        (502, "server_error"),
        (504, "timeout"),
        (401, "auth"),
        (403, "auth"),
        (400, "bad_request"),
        (404, "bad_request"),
        (422, "bad_request"),
    ],
)
def test_status_kinds(status: int, kind: str) -> None:
    assert kind_of_status(status) == kind


def test_context_overflow_is_recognised_from_either_vendor() -> None:
    assert is_context_overflow("context_length_exceeded", "")
    assert is_context_overflow(None, "This model's maximum context length is 128000 tokens")
    assert is_context_overflow(None, "prompt is too long: 250000 tokens > 200000 maximum")
    assert not is_context_overflow("invalid_value", "temperature must be <= 2")
    assert is_context_overflow(None, "Input is too long for requested model.")  # Bedrock


def test_aws_error_names_are_kinds_in_the_header_and_in_a_stream() -> None:
    header = "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/"
    assert kind_of_aws_error({"X-Amzn-ErrorType": header}) == "rate_limited"
    assert kind_of_aws_error({"x-amzn-errortype": "ModelErrorException"}) == "server_error"
    assert kind_of_aws_error({"x-amzn-errortype": "SomethingNewException"}) is None
    assert kind_of_aws_error({}) is None
    assert kind_of_error_type(["throttlingException"]) == "rate_limited"
    assert kind_of_error_type(["serviceUnavailableException"]) == "overloaded"
    assert kind_of_error_type(["modelStreamErrorException"]) == "server_error"
    assert kind_of_error_type(["overloaded_error"]) == "overloaded"


def test_retry_after_forms_and_garbage() -> None:
    now = time.time()
    assert parse_retry_after({"Retry-After": "2"}, now) == 2.0
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}, now) == 1.5
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 30))
    assert parse_retry_after({"retry-after": date}, now) == pytest.approx(30, abs=1.5)
    for bad in ("soon", "-3", "1e9", "nan", ""):
        assert parse_retry_after({"retry-after": bad}, now) is None
    assert parse_retry_after({}, now) is None


def test_the_taxonomy_table() -> None:
    never = ("auth", "bad_request", "context_overflow", "circuit_open", "limit_wait")
    for kind in never:
        assert not policy(kind).retry, kind
    assert policy("auth").trip
    assert not policy("rate_limited").breaker
    assert policy("overloaded").breaker
    assert not policy("bad_request").breaker
    assert not policy("context_overflow").breaker


# --- retry -----------------------------------------------------------------------------


def _retrying(model: Model, **config: float) -> tuple[RetryingModel, list[float]]:
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    policy_ = RetryPolicy(**config)  # type: ignore[arg-type]
    return RetryingModel(model, policy_, sleep=sleep, rng=random.Random(7)), slept


@pytest.mark.parametrize("kind", ["server_error", "timeout", "connection", "malformed"])
def test_transient_failures_are_retried_with_jittered_backoff(kind: ModelErrorKind) -> None:
    inner = Scripted(kind, kind)
    model, slept = _retrying(inner, attempts=3, base_s=0.5, max_backoff_s=4)
    assert run(model).content == "ok"
    assert inner.calls == 3
    assert len(slept) == 2
    assert 0 <= slept[0] <= 0.5
    assert 0 <= slept[1] <= 1.0


def test_retries_stop_after_the_configured_attempts() -> None:
    inner = Scripted("server_error", "server_error", "server_error")
    model, slept = _retrying(inner, attempts=2)
    with pytest.raises(ModelError, match="server_error #2"):
        run(model)
    assert inner.calls == 2
    assert len(slept) == 1


@pytest.mark.parametrize("kind", ["auth", "bad_request", "context_overflow", "limit_wait"])
def test_never_retried(kind: ModelErrorKind) -> None:
    inner = Scripted(kind)
    model, slept = _retrying(inner, attempts=5)
    with pytest.raises(ModelError) as info:
        run(model)
    assert info.value.kind == kind
    assert inner.calls == 1
    assert slept == []


def test_retry_after_is_honoured_when_short_and_falls_through_when_long() -> None:
    inner = Scripted("rate_limited", retry_after=1.25)
    model, slept = _retrying(inner, max_retry_after_s=5)
    assert run(model).content == "ok"
    assert slept == [1.25]
    inner = Scripted("overloaded", retry_after=30)
    model, slept = _retrying(inner, max_retry_after_s=5)
    with pytest.raises(ModelError, match="overloaded"):
        run(model)
    assert slept == []
    assert inner.calls == 1


def test_429_without_retry_after_falls_through_at_once_but_529_backs_off() -> None:
    assert (
        backoff_s(RetryPolicy(), 1, ModelError("x", kind="rate_limited"), random.Random()) is None
    )
    delay = backoff_s(
        RetryPolicy(base_s=0.2), 1, ModelError("x", kind="overloaded"), random.Random()
    )
    assert delay is not None
    assert 0 <= delay <= 0.2


# --- circuit breaker -------------------------------------------------------------------


def test_breaker_states_closed_open_half_open_closed() -> None:
    b = CircuitBreaker(BreakerPolicy(failures=3, window_s=10, cooldown_s=5))
    assert b.state(0) == "closed"
    b.failure(0)
    b.failure(1)
    assert b.state(1) == "closed"
    assert b.allow(1)
    b.failure(2)
    assert b.state(2) == "open"
    assert not b.allow(3)
    assert b.retry_in(3) == pytest.approx(4)
    assert b.state(7.1) == "half_open"
    assert b.allow(7.1)  # the probe
    assert not b.allow(7.2)  # only one probe at a time
    b.success(7.3)
    assert b.state(7.3) == "closed"
    assert b.allow(7.4)


def test_breaker_failures_outside_the_window_do_not_add_up() -> None:
    b = CircuitBreaker(BreakerPolicy(failures=3, window_s=10, cooldown_s=5))
    for t in (0, 6, 12, 18, 24):
        b.failure(t)
    assert b.state(24) == "closed"


def test_failed_probe_reopens_and_auth_trips_for_the_long_cooldown() -> None:
    b = CircuitBreaker(BreakerPolicy(failures=1, window_s=10, cooldown_s=5, auth_cooldown_s=100))
    b.failure(0)
    assert b.allow(5.5)
    b.failure(5.6)
    assert b.state(6) == "open"
    assert b.state(10.5) == "open"
    assert b.state(10.7) == "half_open"
    b.success(11)
    b.trip(20, "auth: 401")
    assert b.state(119) == "open"
    assert b.state(120.1) == "half_open"
    assert "401" in b.snapshot(30)["reason"]


def test_breaker_model_opens_then_fails_fast_without_calling_then_probes() -> None:
    now = [0.0]
    inner = Scripted("server_error", "server_error")
    model = BreakerModel(
        inner, BreakerPolicy(failures=2, window_s=10, cooldown_s=5), clock=lambda: now[0]
    )
    for _ in range(2):
        with pytest.raises(ModelError, match="server_error"):
            run(model)
    with pytest.raises(ModelError) as info:
        run(model)
    assert info.value.kind == "circuit_open"
    assert inner.calls == 2
    now[0] = 6
    assert run(model).content == "ok"  # the half-open probe succeeds
    assert model.breaker.state(6) == "closed"


def test_not_counted_failures_leave_the_breaker_closed() -> None:
    inner = Scripted("bad_request", "rate_limited", "context_overflow", "limit_wait")
    model = BreakerModel(inner, BreakerPolicy(failures=1))
    for _ in range(4):
        with pytest.raises(ModelError):
            run(model)
    assert model.breaker.state(time.monotonic()) == "closed"


# --- rate limiter ----------------------------------------------------------------------


def test_rpm_sliding_window_admits_exactly_the_limit_in_any_window() -> None:
    r = RateLimiter(Limits(rpm=3, window_s=60))
    for t in (0, 10, 20):
        assert r.delay(t, 1) == 0
        r.admit(t, 1)
    assert r.delay(30, 1) == pytest.approx(30)  # the one at t=0 leaves the window at 60
    assert r.delay(60.01, 1) == 0


def test_tpm_counts_estimates_then_the_reported_usage() -> None:
    r = RateLimiter(Limits(tpm=100, window_s=60))
    entry = r.admit(0, 30)
    r.settle(entry, 90)  # the provider reported 90 tokens in all
    assert r.delay(1, 20) == pytest.approx(59)
    assert r.delay(1, 10) == 0
    assert not r.fits_ever(101)


def test_in_flight_limit_waits_for_a_release() -> None:
    r = RateLimiter(Limits(max_in_flight=1))
    entry = r.admit(0, 1)
    assert r.delay(0, 1) == float("inf")
    r.settle(entry, 1)
    assert r.delay(0, 1) == 0


def test_pause_holds_every_admission() -> None:
    r = RateLimiter(Limits())
    r.pause(0, 2.5)
    assert r.delay(1, 1) == pytest.approx(1.5)


def test_waiters_are_served_in_arrival_order_and_a_bounded_wait_falls_through() -> None:
    async def main() -> tuple[list[int], list[str]]:
        model = LimitedModel(Scripted(), Limits(rpm=2, window_s=0.8, max_wait_s=2.0))
        order: list[int] = []
        errors: list[str] = []

        async def call(i: int) -> None:
            await asyncio.sleep(i * 0.01)  # arrive in order 0, 1, 2, ...
            try:
                await model.request(ModelRequest("", HI))
                order.append(i)
            except ModelError as exc:
                errors.append(exc.kind)

        await asyncio.gather(*(call(i) for i in range(7)))
        return order, errors

    order, errors = asyncio.run(main())
    # 2 per 0.8 s within a 2 s wait: 0,1 now; 2,3 at 0.8 s; 4,5 at 1.6 s (0.45 s to spare);
    # 6 would wait until 2.4 s, past its bound (a stall only makes that later).
    assert order == [0, 1, 2, 3, 4, 5]
    assert errors == ["limit_wait"]


def test_in_flight_limit_with_concurrent_callers() -> None:
    class Slow(Scripted):
        peak = 0
        now = 0

        async def request(self, req: ModelRequest) -> ModelResponse:
            Slow.now += 1
            Slow.peak = max(Slow.peak, Slow.now)
            await asyncio.sleep(0.02)
            Slow.now -= 1
            return await super().request(req)

    async def main() -> None:
        model = LimitedModel(Slow(), Limits(max_in_flight=3, max_wait_s=5))
        await asyncio.gather(*(model.request(ModelRequest("", HI)) for _ in range(20)))

    asyncio.run(main())
    assert Slow.peak == 3


def test_a_429_with_retry_after_pauses_the_limiter() -> None:
    model = LimitedModel(Scripted("rate_limited", retry_after=3), Limits())
    with pytest.raises(ModelError):
        run(model)
    assert model.limiter.snapshot()["paused_s"] > 2.5


# --- fallback ----------------------------------------------------------------------------


def test_fallback_falls_through_every_kind_and_lists_each_failure() -> None:
    seen: list[tuple[str, str, str | None]] = []
    chain = FallbackModel(
        Scripted("circuit_open", label="a"),
        Scripted("context_overflow", label="b"),
        Scripted(label="c"),
        on_fallback=lambda m, e, n: seen.append((m.name, e.kind, n and n.name)),
    )
    assert run(chain).model == "scripted:c"
    assert seen == [
        ("scripted:a", "circuit_open", "scripted:b"),
        ("scripted:b", "context_overflow", "scripted:c"),
    ]
    dead = FallbackModel(Scripted("auth", label="x"), Scripted("bad_request", label="y"))
    with pytest.raises(AllModelsFailed) as info:
        run(dead)
    text = str(info.value)
    assert "scripted:x: [auth]" in text
    assert "scripted:y: [bad_request]" in text


# --- endpoints, keys, model specs -----------------------------------------------------------


def test_parse_model_specs() -> None:
    assert parse_model("openai:gpt-4.1-mini") == ("openai", "gpt-4.1-mini", None)
    assert parse_model("anthropic:claude-sonnet-4-5") == ("anthropic", "claude-sonnet-4-5", None)
    assert parse_model("vllm:meta/llama@http://127.0.0.1:8000/v1") == (
        "openai",
        "meta/llama",
        "http://127.0.0.1:8000/v1",
    )
    assert parse_model("ollama:llama3.1:8b@http://h:11434/v1")[1] == "llama3.1:8b"
    assert parse_model("offline:demo") == ("offline", "demo", None)
    assert parse_model("anthropic:claude-3-5@20240620")[1:] == ("claude-3-5@20240620", None)
    assert parse_model("bedrock:anthropic.claude-sonnet-4-5-v1:0@http://h:1") == (
        "bedrock",
        "anthropic.claude-sonnet-4-5-v1:0",
        "http://h:1",
    )


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("gpt-4", "must be written"),
        ("nope:x", "unknown provider 'nope'"),
        ("openai:", "must be written"),
        ("openai:m@http://", "must be http"),
        ("openai:m@http://u:p@host/v1", "must not carry credentials"),
        ("openai:m@http://host:99999/v1", "bad port"),
        ("openai:two words", "whitespace"),
        ("offline:x@http://127.0.0.1:1", "no base URL"),
    ],
)
def test_bad_model_specs_are_named(spec: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        resolve_model(spec)


def test_keys_come_from_the_environment_and_never_show(monkeypatch: pytest.MonkeyPatch) -> None:
    key = "sk-test-0123456789abcdef"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    model = resolve_model("openai:gpt-4.1-mini")
    assert isinstance(model, RemoteModel)
    assert model.endpoint.key == Secret(key)
    for text in (repr(model), repr(model.endpoint), str(model.endpoint.key), model.name):
        assert key not in text
    assert key not in provider_actor_name(model.endpoint)
    assert pickle.loads(pickle.dumps(model)).endpoint.key == Secret(key)


def test_a_missing_key_is_an_auth_error_at_call_time_not_a_crash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    model = resolve_model("anthropic:claude-sonnet-4-5")
    with pytest.raises(ModelError, match="ANTHROPIC_API_KEY") as info:
        run(model)
    assert info.value.kind == "auth"
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY"):
        Endpoint("anthropic", "claude").resolved({})


def test_byok_gives_each_key_its_own_endpoint_id() -> None:
    base = Endpoint("openai", "gpt-4.1-mini", "http://127.0.0.1:9/v1", key=Secret("operator-key-1"))
    alice = base.with_key("alice-key-000001")
    bob = base.with_key("bob-key-00000001")
    assert len({base.id, alice.id, bob.id}) == 3
    chain = FallbackModel(RemoteModel(base), Scripted())
    swapped = chain.with_api_keys(api_keys({"openai": "alice-key-000001"}))
    assert isinstance(swapped, FallbackModel)
    first = swapped.models[0]
    assert isinstance(first, RemoteModel)
    assert first.endpoint.id == alice.id
    with pytest.raises(ConfigError, match="unknown vendor 'google'"):
        api_keys({"google": "k"})
    with pytest.raises(ConfigError, match="whitespace"):
        api_keys({"openai": "sk bad"})


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda: Limits(rpm=0), "rpm must be a positive integer"),
        (lambda: Limits(max_wait_s=-1), "max_wait_s"),
        (lambda: Limits(lease_ttl_s=0.5), "lease_ttl_s must be in"),
        (lambda: BreakerPolicy(failures=0), "failures"),
        (lambda: RetryPolicy(attempts=0), "attempts"),
        (lambda: Endpoint("openai", "m", timeout_s=0), "timeout_s"),
        (lambda: Endpoint("gemini", "m"), "unknown vendor"),  # type: ignore[arg-type]
    ],
)
def test_bad_policies_are_refused_when_built(make: object, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        make()  # type: ignore[operator]


# --- the gate: leases for calls made in other processes ------------------------------------


def test_a_call_abandoned_while_it_queued_never_holds_a_slot() -> None:
    limited = LimitedModel(Scripted(), Limits(max_in_flight=1, max_wait_s=30))
    gate = Gate(BreakerModel(limited, BreakerPolicy()), limited)

    async def go() -> ModelError | None:
        assert await gate.admit("first", 1) is None
        queued = asyncio.ensure_future(gate.admit("second", 1))
        await asyncio.sleep(0.01)
        assert not queued.done()  # waits for the one slot
        gate.judge("second", None, abandoned=True)  # its caller went away
        gate.release("first", 1, None)
        gate.judge("first", None, abandoned=False)
        return await queued

    refused = asyncio.run(go())
    assert refused is not None  # granted after its caller left: given back at once
    assert limited.limiter.core.in_flight == 0
    assert gate.leases == {}


def test_a_lease_whose_caller_died_is_freed_after_its_ttl_with_its_probe() -> None:
    now = [0.0]
    limited = LimitedModel(Scripted(), Limits(max_in_flight=1))
    breaker = BreakerModel(
        limited, BreakerPolicy(failures=1, window_s=60, cooldown_s=5), clock=lambda: now[0]
    )
    gate = Gate(breaker, limited, ttl_s=100, clock=lambda: now[0])

    async def go() -> None:
        assert await gate.admit("a", 1) is None
        gate.release("a", 1, ModelError("boom", model="m", kind="server_error"))
        gate.judge("a", ModelError("boom", model="m", kind="server_error"))  # opens
        now[0] = 10.0  # past the cooldown: the next call is the half-open probe
        assert await gate.admit("probe", 1) is None  # its caller dies holding it
        assert breaker.breaker.state(now[0]) == "half_open"
        assert await gate.admit("other", 1) is not None  # one probe at a time

    asyncio.run(go())
    assert gate.sweep(now[0] + 50) == 0
    assert gate.sweep(now[0] + 101) == 1
    assert limited.limiter.core.in_flight == 0
    assert gate.leases == {}

    async def again() -> ModelError | None:
        return await gate.admit("next", 1)

    assert asyncio.run(again()) is None  # the probe was given back: a new one may go out


def test_a_renewed_lease_outlives_its_ttl_and_a_lapsed_one_is_freed() -> None:
    now = [0.0]
    limited = LimitedModel(Scripted(), Limits(max_in_flight=2))
    gate = Gate(BreakerModel(limited, BreakerPolicy()), limited, ttl_s=30, clock=lambda: now[0])

    async def go() -> None:
        assert await gate.admit("long", 1) is None  # a stream that runs for minutes
        assert await gate.admit("orphan", 1) is None  # its process dies now

    asyncio.run(go())
    for t in range(10, 130, 10):  # the live process renews every third of the ttl
        now[0] = float(t)
        gate.settle([("renew", ("long", "unknown-call"))])
        gate.sweep()
    assert set(gate.leases) == {"long"}  # the orphan lapsed 30 s after its admission
    assert gate.expired == 1
    assert limited.limiter.core.in_flight == 1
    now[0] += 31  # its process died too: nothing renews it
    assert gate.sweep() == 1
    assert gate.leases == {}
    assert limited.limiter.core.in_flight == 0
    assert renew_every(30) == 10  # two renewals may be late before a lease lapses
