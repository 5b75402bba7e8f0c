"""Amazon Bedrock endpoints (``bedrock:MODEL_ID``): configuration, AWS signing, the
invoke and invoke-with-response-stream paths, Bedrock's errors and the event-stream
framing, through the official SDK's ``AsyncAnthropicBedrock`` over real HTTP to the
loopback :class:`~overstory.testing.BedrockServer`.

No Ray here. The suites every vendor runs (answers, tool calls, every fault kind, stream
cuts, retries, breaker, limiter, fallback) run for Bedrock too, in test_vendor_models.py
and test_vendor_streams.py; this file holds what only Bedrock has.
"""

from __future__ import annotations

import base64
import json
import pickle
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.eventstream import ChecksumMismatch, EventStreamBuffer
from conftest import run_in_module_loop

from overstory.exceptions import ConfigError, ModelError
from overstory.messages import ModelResponse, UserMessage
from overstory.providers import (
    Endpoint,
    Model,
    RemoteModel,
    RetryPolicy,
    api_keys,
    aws_secret,
    parse_model,
    resolve_model,
)
from overstory.providers.base import ModelRequest, StreamItem
from overstory.providers.breaker import BreakerModel
from overstory.providers.endpoint import BreakerPolicy, aws_credentials
from overstory.providers.pool import provider_actor_name, vendor_model
from overstory.providers.retry import RetryingModel
from overstory.testing import BedrockServer, Fault
from overstory.testing._anthropic import _anthropic_answer, _anthropic_stream
from overstory.testing._bedrock import _bedrock_chunk, _bedrock_exception

MODEL = "anthropic.claude-sonnet-4-5-v1:0"
KEY_ID = "AKIATESTBEDROCK0123"
SECRET = "bedrock/Secret+Access0123456789abcdKEY"
TOKEN = "FwoGZXIvYXdzEBYaDTestSessionToken+0123456789/abc=="
REGION = "eu-central-1"
HISTORY = [UserMessage(content="hello there", seq=0)]
FAST = RetryPolicy(attempts=3, base_s=0.001, max_backoff_s=0.002, max_retry_after_s=1.0)

pytestmark = pytest.mark.usefixtures("module_loop")
run = run_in_module_loop


@pytest.fixture(scope="module")
def server() -> Iterator[BedrockServer]:
    with BedrockServer() as srv:
        yield srv


@pytest.fixture(autouse=True)
def _clean(request: pytest.FixtureRequest) -> None:
    if "server" in request.fixturenames:
        request.getfixturevalue("server").reset()


def raw_client(server: BedrockServer) -> anthropic.AsyncAnthropicBedrock:
    """The SDK's Bedrock client itself (no overstory in between), signed with our test
    credentials for REGION, against the loopback server."""
    return anthropic.AsyncAnthropicBedrock(
        aws_access_key=KEY_ID,
        aws_secret_key=SECRET,
        aws_region=REGION,
        base_url=server.base_url,
        max_retries=0,
    )


def endpoint_for(server: BedrockServer, model: str = MODEL, **kw: Any) -> Endpoint:
    key = aws_secret(KEY_ID, SECRET, kw.pop("token", None))
    return Endpoint("bedrock", model, server.base_url, key=key, region=REGION, **kw)


def collect(model: Model) -> tuple[list[StreamItem], ModelError | None]:
    async def go() -> tuple[list[StreamItem], ModelError | None]:
        items: list[StreamItem] = []
        stream = model.stream(ModelRequest("", HISTORY))
        try:
            async for item in stream:
                items.append(item)
        except ModelError as exc:
            return items, exc
        finally:
            await stream.aclose()
        return items, None

    result: tuple[list[StreamItem], ModelError | None] = run(go())
    return result


def failure(model: Model) -> ModelError:
    with pytest.raises(ModelError) as info:
        run(model.request(ModelRequest("", HISTORY)))
    return info.value


# --- configuration ---------------------------------------------------------------------------


AWS_ENV = {
    "AWS_ACCESS_KEY_ID": KEY_ID,
    "AWS_SECRET_ACCESS_KEY": SECRET,
    "AWS_SESSION_TOKEN": TOKEN,
    "AWS_REGION": REGION,
}


def test_model_ids_with_colons_and_a_base_url_parse() -> None:
    assert parse_model(f"bedrock:{MODEL}") == ("bedrock", MODEL, None)
    assert parse_model(f"bedrock:{MODEL}@http://127.0.0.1:8123") == (
        "bedrock",
        MODEL,
        "http://127.0.0.1:8123",
    )
    arn = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-x-v1:0"
    assert parse_model(f"bedrock:{arn}")[1] == arn


def test_credentials_and_region_come_from_the_aws_variables_and_never_show(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var, value in AWS_ENV.items():
        monkeypatch.setenv(var, value)
    model = resolve_model(f"bedrock:{MODEL}")
    assert isinstance(model, RemoteModel)
    endpoint = model.endpoint
    assert endpoint.region == REGION
    assert endpoint.key is not None
    assert aws_credentials(endpoint.key) == (KEY_ID, SECRET, TOKEN)
    assert endpoint.server == (f"bedrock-runtime.{REGION}.amazonaws.com", 443)
    shown = (repr(model), repr(endpoint), str(endpoint.key), model.name)
    for text in (*shown, provider_actor_name(endpoint)):
        assert SECRET not in text
        assert TOKEN not in text
    assert pickle.loads(pickle.dumps(model)).endpoint == endpoint
    # AWS_DEFAULT_REGION is the fallback; another region is another endpoint (actor).
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    other = resolve_model(f"bedrock:{MODEL}")
    assert isinstance(other, RemoteModel)
    assert other.endpoint.region == "us-west-2"
    assert other.endpoint.id != endpoint.id


def test_missing_credentials_or_region_are_named() -> None:
    bare = Endpoint("bedrock", MODEL)
    with pytest.raises(ConfigError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        bare.resolved({"AWS_REGION": REGION})
    with pytest.raises(ConfigError, match="set AWS_SECRET_ACCESS_KEY in") as info:
        bare.resolved({"AWS_REGION": REGION, "AWS_ACCESS_KEY_ID": KEY_ID})
    assert "AWS_ACCESS_KEY_ID and" not in str(info.value)
    with pytest.raises(ConfigError, match="AWS_REGION or AWS_DEFAULT_REGION"):
        bare.resolved({"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET})
    # A base URL (a proxy, the loopback server) does not make the signature optional.
    with pytest.raises(ConfigError, match="AWS_ACCESS_KEY_ID"):
        Endpoint("bedrock", MODEL, "http://127.0.0.1:9").resolved({"AWS_REGION": REGION})
    # A bad value in the environment is named by its variable, never shown if secret.
    with pytest.raises(ConfigError, match="AWS_REGION must be an AWS region"):
        bare.resolved({**AWS_ENV, "AWS_REGION": "Frankfurt"})
    with pytest.raises(ConfigError, match="access key id") as info:
        bare.resolved({**AWS_ENV, "AWS_ACCESS_KEY_ID": "not-a-key-id"})
    with pytest.raises(ConfigError, match="secret access key") as info:
        bare.resolved({**AWS_ENV, "AWS_SECRET_ACCESS_KEY": "semi;colon" + SECRET})
    assert SECRET not in str(info.value)


def test_without_a_region_resolving_fails_and_without_credentials_the_call_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in (*AWS_ENV, "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="AWS_REGION"):
        resolve_model(f"bedrock:{MODEL}")
    monkeypatch.setenv("AWS_REGION", REGION)
    model = resolve_model(f"bedrock:{MODEL}")  # users may bring their own credentials
    with pytest.raises(ModelError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") as info:
        run(model.request(ModelRequest("", HISTORY)))
    assert info.value.kind == "auth"
    own = model.with_api_keys(api_keys({"bedrock": f"{KEY_ID}:{SECRET}"}))
    assert isinstance(own, RemoteModel)
    assert own.endpoint.key is not None
    assert aws_credentials(own.endpoint.key) == (KEY_ID, SECRET, None)


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda: resolve_model("bedrock:"), "must be written"),
        (lambda: resolve_model("bedrock:two words"), "whitespace"),
        (lambda: resolve_model("bedrock: "), "must be written|1-200 characters"),
        (lambda: Endpoint("bedrock", MODEL, region="us_east_1"), "AWS region"),
        (lambda: Endpoint("bedrock", MODEL, region=""), "AWS region"),
        (lambda: Endpoint("anthropic", "claude", region="us-east-1"), "only Bedrock"),
        (lambda: api_keys({"bedrock": "no-colon-here"}), "ACCESS_KEY_ID:SECRET"),
        (lambda: api_keys({"bedrock": f"{KEY_ID}:{SECRET}:{TOKEN}:x"}), "got 4 part"),
        (lambda: aws_secret("lowercase-id-0123", SECRET), "access key id"),
    ],
)
def test_bad_bedrock_configuration_is_named(make: Any, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as info:
        make()
    assert SECRET not in str(info.value)


# --- signing and paths -----------------------------------------------------------------------


def signature_of(server: BedrockServer, index: int, secret: str, body: bytes | None = None) -> str:
    """The SigV4 signature botocore computes for recorded request ``index`` with
    ``secret``: over the headers the request says it signed, its path and its body."""
    recorded = server.requests[index]
    authorization = recorded.headers["authorization"]
    signed = authorization.split("SignedHeaders=")[1].split(",")[0].split(";")
    token = recorded.headers.get("x-amz-security-token")
    request = AWSRequest(
        method="POST",
        url=server.base_url + recorded.path,
        headers={name: recorded.headers[name] for name in signed},
        data=recorded.raw if body is None else body,
    )
    signer = SigV4Auth(Credentials(KEY_ID, secret, token), "bedrock", REGION)
    request.context["timestamp"] = recorded.headers["x-amz-date"]
    canonical = signer.canonical_request(request)
    return str(signer.signature(signer.string_to_sign(request, canonical), request))


def test_requests_are_signed_for_bedrock_in_the_region_over_the_invoke_path(
    server: BedrockServer,
) -> None:
    response = run(
        vendor_model(endpoint_for(server, token=TOKEN)).request(ModelRequest("Be brief.", HISTORY))
    )
    assert response.content == "echo: hello there"
    assert response.model == MODEL
    (recorded,) = server.requests
    assert recorded.path == f"/model/{MODEL}/invoke"
    assert recorded.api_key == KEY_ID
    assert recorded.body["anthropic_version"] == "bedrock-2023-05-31"
    assert "model" not in recorded.body
    assert recorded.body["system"] == "Be brief."
    authorization = recorded.headers["authorization"]
    assert authorization.startswith(f"AWS4-HMAC-SHA256 Credential={KEY_ID}/")
    assert f"/{REGION}/bedrock/aws4_request" in authorization
    assert recorded.headers["x-amz-security-token"] == TOKEN
    assert SECRET not in json.dumps(dict(recorded.headers))
    # The signature is SigV4 over this very request with our secret: botocore, signing
    # it again, agrees; another secret or another body would not.
    sent = authorization.rsplit("Signature=", 1)[1]
    assert signature_of(server, 0, SECRET) == sent
    assert signature_of(server, 0, SECRET[::-1]) != sent
    assert signature_of(server, 0, SECRET, body=b'{"max_tokens": 1}') != sent


def test_an_unsigned_request_is_refused_as_aws_refuses_it(server: BedrockServer) -> None:
    url = f"{server.base_url}/model/{MODEL}/invoke"
    body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 5, "messages": []}
    for headers in ({}, {"authorization": "Bearer sk-not-aws"}):
        reply = httpx.post(url, json=body, headers=headers)
        assert reply.status_code == 403
        assert reply.json() == {"message": "Missing Authentication Token"}
        assert reply.headers["x-amzn-errortype"].startswith("AccessDeniedException:")
    assert [r.api_key for r in server.requests] == ["", ""]


def test_a_model_id_is_percent_encoded_in_the_path_and_decoded_by_the_server(
    server: BedrockServer,
) -> None:
    arn = "arn:aws:bedrock:eu-central-1:123456789012:inference-profile/eu.anthropic.claude-v1:0"
    response = run(vendor_model(endpoint_for(server, arn)).request(ModelRequest("", HISTORY)))
    assert response.model == arn  # the server read the id back out of one path segment
    assert server.requests[0].path == f"/model/{arn}/invoke"


def test_bedrock_refuses_what_bedrock_refuses(server: BedrockServer) -> None:
    async def post(body: dict[str, Any]) -> Any:
        client = raw_client(server)
        try:
            return await client.post(f"/model/{MODEL}/invoke", body=body, cast_to=object)
        finally:
            await client.close()

    ok = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 9, "messages": []}
    for body, message in [
        ({**ok, "model": MODEL}, "extraneous key [model]"),
        ({**ok, "stream": True}, "extraneous key [stream]"),
        ({k: v for k, v in ok.items() if k != "anthropic_version"}, "anthropic_version"),
        (ok, "at least one message"),  # then Anthropic's own checks
    ]:
        with pytest.raises(anthropic.BadRequestError, match=message.replace("[", r"\[")):
            run(post(body))


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "name", "kind"),
    [
        (429, "ThrottlingException", "rate_limited"),
        (503, "ServiceUnavailableException", "overloaded"),
        (500, "InternalServerException", "server_error"),
        (424, "ModelErrorException", "server_error"),  # by its name: 424 alone says 4xx
        (408, "ModelTimeoutException", "timeout"),
        (403, "AccessDeniedException", "auth"),
        (400, "ValidationException", "bad_request"),
    ],
)
def test_each_bedrock_error_is_its_kind(
    server: BedrockServer, status: int, name: str, kind: str
) -> None:
    server.script(Fault(status=status))
    error = failure(vendor_model(endpoint_for(server)))
    assert error.kind == kind, error
    assert error.status == status
    assert len(server.requests) == 1
    assert server.requests[0].api_key == KEY_ID  # a signed request was refused, not a bad one


def test_throttling_is_the_sdks_rate_limit_error_and_the_taxonomys_rate_limited(
    server: BedrockServer,
) -> None:
    async def raw() -> None:
        client = raw_client(server)
        try:
            await client.messages.create(
                model=MODEL, max_tokens=9, messages=[{"role": "user", "content": "hi"}]
            )
        finally:
            await client.close()

    server.script(Fault.rate_limited(retry_after=None))
    with pytest.raises(anthropic.RateLimitError) as info:
        run(raw())
    assert info.value.response.headers["x-amzn-errortype"].startswith("ThrottlingException:")
    assert "Too many requests" in str(info.value)

    # The one retry loop: a throttled call without Retry-After falls through at once; one
    # with a short Retry-After is retried; a throttled endpoint's circuit stays closed.
    retrying = RetryingModel(vendor_model(endpoint_for(server)), FAST)
    breaker = BreakerModel(retrying, BreakerPolicy(failures=1, window_s=60, cooldown_s=60))
    server.reset()
    server.script(Fault.rate_limited(retry_after=None))
    error = failure(breaker)
    assert (error.kind, error.retry_after, len(server.requests)) == ("rate_limited", None, 1)
    server.reset()
    server.script(Fault.rate_limited(retry_after=0.01))
    assert run(breaker.request(ModelRequest("", HISTORY))).content == "echo: hello there"
    assert len(server.requests) == 2
    assert breaker.breaker.snapshot(0.0)["recent_failures"] == 0


def test_an_unavailable_service_counts_against_the_endpoint(server: BedrockServer) -> None:
    breaker = BreakerModel(
        vendor_model(endpoint_for(server)), BreakerPolicy(failures=1, window_s=60, cooldown_s=60)
    )
    server.script(Fault.overloaded())
    assert failure(breaker).kind == "overloaded"
    assert failure(breaker).kind == "circuit_open"
    assert len(server.requests) == 1


def test_a_too_long_input_is_a_context_overflow(server: BedrockServer) -> None:
    server.script(Fault.context_overflow())
    error = failure(vendor_model(endpoint_for(server)))
    assert error.kind == "context_overflow"
    assert "Input is too long" in str(error)


# --- streams ---------------------------------------------------------------------------------


def test_a_stream_arrives_as_event_stream_frames_and_assembles(server: BedrockServer) -> None:
    items, error = collect(vendor_model(endpoint_for(server)))
    assert error is None
    *deltas, answer = items
    assert isinstance(answer, ModelResponse)
    assert "".join(d for d in deltas if isinstance(d, str)) == answer.content
    assert answer.content == "echo: hello there"
    assert len(deltas) == 5  # piece_chars=4: the server's cut, delta by delta
    assert answer.usage.input_tokens > 0
    assert answer.usage.output_tokens > 0
    assert server.requests[0].path == f"/model/{MODEL}/invoke-with-response-stream"


@pytest.mark.parametrize(
    ("status", "kind"),
    [(429, "rate_limited"), (503, "overloaded"), (424, "server_error"), (408, "timeout")],
)
def test_an_exception_mid_stream_is_its_kind_after_the_deltas_sent(
    server: BedrockServer, status: int, kind: str
) -> None:
    server.script(Fault.stream_error(after=2, status=status))
    items, error = collect(vendor_model(endpoint_for(server)))
    assert items == ["echo", ": he"]
    assert error is not None
    assert error.kind == kind
    assert "mid-stream" in str(error)


def test_a_throttled_stream_before_its_first_delta_is_retried(server: BedrockServer) -> None:
    retrying = RetryingModel(vendor_model(endpoint_for(server)), FAST)
    server.script(Fault.stream_error(after=0, status=503))
    items, error = collect(retrying)
    assert error is None
    assert retrying.retries == 1
    assert "".join(i for i in items if isinstance(i, str)) == "echo: hello there"


# --- the framing, read by botocore -------------------------------------------------------------


def test_the_servers_frames_are_what_botocore_decodes() -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9}
    events = _anthropic_stream(_anthropic_answer(body, MODEL, (), 1), 3)
    buffer = EventStreamBuffer()
    wire = b"".join(_bedrock_chunk(e) for e in events) + _bedrock_exception(
        Fault.stream_error(after=0, status=429)
    )
    for i in range(0, len(wire), 7):  # fed in pieces that cut frames anywhere
        buffer.add_data(wire[i : i + 7])
    *chunks, exception = list(buffer)
    assert len(chunks) == len(events)
    for chunk, event in zip(chunks, events, strict=True):
        assert chunk.headers == {
            ":event-type": "chunk",
            ":content-type": "application/json",
            ":message-type": "event",
        }
        assert json.loads(base64.b64decode(json.loads(chunk.payload)["bytes"])) == event.data
    assert exception.headers[":message-type"] == "exception"
    assert exception.headers[":exception-type"] == "throttlingException"
    assert exception.to_response_dict()["status_code"] == 400
    assert json.loads(exception.payload)["message"].startswith("Too many requests")

    corrupt = bytearray(_bedrock_chunk(events[0]))
    corrupt[-5] ^= 0xFF  # one payload byte: the message's CRC no longer matches
    broken = EventStreamBuffer()
    broken.add_data(bytes(corrupt))
    with pytest.raises(ChecksumMismatch):
        list(broken)
