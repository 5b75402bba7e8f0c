"""The front door's pure parts, without Ray: API keys over a real SQLite store, and the
Responses / Conversations shapes built from turn events, checked against the official
``openai`` SDK's own models."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from overstory.access import new_conversation_id
from overstory.exceptions import AuthenticationFailed, UnknownKey, UsageError
from overstory.gateway.keys import (
    authenticate_key,
    create_key,
    list_keys,
    parse_key,
    revoke_key,
)
from overstory.gateway.wire import (
    ResponseStream,
    conversation_items,
    conversation_of,
    items_read,
    new_response_id,
    page,
    sse,
)
from overstory.messages import (
    AssistantMessage,
    Reply,
    ToolCall,
    ToolReturn,
    TurnEvent,
    Usage,
    UserMessage,
)
from overstory.store import run_on_store as with_store

# --- API keys ---------------------------------------------------------------------------------


def test_a_key_is_shown_once_kept_as_a_hash_and_checked(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/keys.db"
    key, record = with_store(url, lambda s: create_key(s, "alice"))
    _, admin = with_store(url, lambda s: create_key(s, "root", admin=True))
    key_id, secret = parse_key(key)
    assert key_id == record.key_id
    assert record.hash != secret
    assert secret not in (tmp_path / "keys.db").read_bytes().decode("latin-1")  # never stored

    principal = with_store(url, lambda s: authenticate_key(s, key))
    assert (principal.user, principal.admin, principal.key_id) == ("alice", False, key_id)
    assert [r.user for r in with_store(url, list_keys)] == ["alice", "root"]
    assert "hash" not in with_store(url, list_keys)[0].public()
    assert admin.admin

    wrong = f"ovs_{key_id}_{'A' * 43}"
    with pytest.raises(AuthenticationFailed, match="unknown API key") as caught:
        with_store(url, lambda s: authenticate_key(s, wrong))
    assert "A" * 43 not in str(caught.value)
    with pytest.raises(AuthenticationFailed, match="malformed") as caught:
        with_store(url, lambda s: authenticate_key(s, "sk-not-ours-secret-value"))
    assert "secret-value" not in str(caught.value)

    revoked = with_store(url, lambda s: revoke_key(s, key_id))
    assert revoked.revoked_at is not None
    assert with_store(url, lambda s: revoke_key(s, key_id)).revoked_at == revoked.revoked_at
    with pytest.raises(AuthenticationFailed, match="revoked"):
        with_store(url, lambda s: authenticate_key(s, key))
    with pytest.raises(UnknownKey, match="no API key"):
        with_store(url, lambda s: revoke_key(s, "0123456789ab"))
    with pytest.raises(UnknownKey, match="12 hex"):
        with_store(url, lambda s: revoke_key(s, "../../etc"))


# --- responses from turn events ---------------------------------------------------------------

CONV = "conv_" + "ab" * 12
CALL = ToolCall(id="call_1", name="add", arguments={"a": 2, "b": 3})


def turn(response_id: str) -> list[TurnEvent]:
    reply = Reply(
        text="add returned 5",
        turn_id=response_id,
        messages=(),
        usage=Usage(12, 7),
    )
    kinds: list[tuple[str, dict[str, Any]]] = [
        ("started", {}),
        ("tool_call", {"tool_call": CALL}),
        (
            "tool_result",
            {
                "tool_call": CALL,
                "tool_return": ToolReturn(tool_call_id="call_1", tool_name="add", content="5"),
            },
        ),
        ("delta", {"text": "add "}),
        ("delta", {"text": "returned 5"}),
        ("completed", {"reply": reply}),
    ]
    return [TurnEvent(response_id, i, k, **f) for i, (k, f) in enumerate(kinds)]  # type: ignore[arg-type]


def test_a_turn_becomes_the_sdks_response_and_stream_events_numbered_in_order() -> None:
    rid = new_response_id(CONV, now=1_800_000_000)
    assert conversation_of(rid) == CONV
    reader = ResponseStream(rid, "helper")
    out = [e for event in turn(rid) for e in reader.feed(event)]
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    types = [e["type"] for e in out]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert types.count("response.output_text.delta") == 2
    # The SDK's own models accept every event and the final response.
    adapter: Any = pydantic.TypeAdapter(ResponseStreamEvent)
    for event in out:
        adapter.validate_python(event)
    response = Response.model_validate(reader.snapshot())
    assert response.status == "completed"
    assert response.created_at == 1_800_000_000
    assert response.output_text == "add returned 5"
    assert response.usage is not None
    assert response.usage.total_tokens == 19
    # The agent's own call ran here: an MCP call holding its result (a function_call
    # would ask the client to run it).
    assert [o.type for o in response.output] == ["mcp_call", "message"]
    call = response.output[0]
    assert (call.name, call.output, call.status, call.server_label) == (
        "add",
        "5",
        "completed",
        "overstory",
    )
    # A second reader of the same events gets the same bytes (resume is a replay).
    again = ResponseStream(rid, "helper")
    assert [sse(e) for event in turn(rid) for e in again.feed(event)] == [sse(e) for e in out]


def test_restarted_voids_the_open_message_and_endings_map_to_statuses() -> None:
    rid = new_response_id(CONV)
    reader = ResponseStream(rid, "helper")
    for event in [
        TurnEvent(rid, 0, "started"),
        TurnEvent(rid, 1, "delta", text="half an ans"),
        TurnEvent(rid, 2, "restarted", text="the host died"),
        TurnEvent(rid, 3, "delta", text="a whole answer"),
        TurnEvent(rid, 4, "incomplete", text="cancelled"),
    ]:
        reader.feed(event)
    snapshot = reader.snapshot()
    assert snapshot["status"] == "cancelled"
    [message] = snapshot["output"]
    assert message["content"][0]["text"] == "a whole answer"
    assert message["status"] == "incomplete"
    Response.model_validate(snapshot)

    failed = ResponseStream(rid, "helper")
    failed.feed(TurnEvent(rid, 0, "started"))
    last = failed.feed(TurnEvent(rid, 1, "failed", text="model error: all failed"))
    assert last[-1]["type"] == "response.failed"
    assert failed.snapshot()["error"] == {
        "code": "server_error",
        "message": "model error: all failed",
    }


def test_ids_are_checked_and_new_ones_do_not_repeat() -> None:
    ids = {new_conversation_id() for _ in range(100)}
    assert len(ids) == 100
    for bad in ("resp_x", "conv_" + "ab" * 12, "resp_../../etc", 7):
        with pytest.raises(UsageError):
            conversation_of(bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        new_response_id("alice")


# --- conversation items ---------------------------------------------------------------------


def history() -> list[Any]:
    return [
        UserMessage(content="what is 2 + 3?", seq=0, turn_id="t"),
        AssistantMessage(content="", tool_calls=(CALL,), seq=1, turn_id="t"),
        ToolReturn(tool_call_id="call_1", tool_name="add", content="5", seq=2, turn_id="t"),
        AssistantMessage(content="add returned 5", seq=3, turn_id="t"),
        UserMessage(content="thanks", seq=4, turn_id="u"),
        AssistantMessage(content="echo", seq=5, turn_id="u", incomplete="cancelled"),
    ]


def test_items_are_the_stored_messages_and_pages_walk_them_both_ways() -> None:
    items = conversation_items(history())
    # The agent's own call and its return are one mcp_call item (the return makes none).
    assert [i["id"] for i in items] == ["item_0", "item_1_0", "item_3", "item_4", "item_5"]
    assert [i["type"] for i in items][:3] == ["message", "mcp_call", "message"]
    assert json.loads(items[1]["arguments"]) == {"a": 2, "b": 3}
    assert items[1]["output"] == "5"
    assert items[-1]["status"] == "incomplete"

    first = page(items, after=None, limit=3, order="asc")
    assert [i["id"] for i in first["data"]] == ["item_0", "item_1_0", "item_3"]
    assert first["has_more"] is True
    rest = page(items, after=first["last_id"], limit=3, order="asc")
    assert [i["id"] for i in rest["data"]] == ["item_4", "item_5"]
    assert rest["has_more"] is False
    newest = page(items, after=None, limit=2, order="desc")
    assert [i["id"] for i in newest["data"]] == ["item_5", "item_4"]
    with pytest.raises(UsageError, match="no item"):
        page(items, after="item_99", limit=2, order="asc")


def history_at(start: int) -> list[Any]:
    """Six messages from seq ``start``; one answer has both text and a call (2 items)."""
    turn = f"t{start}"
    return [
        UserMessage(content="what is 2 + 3?", seq=start, turn_id=turn),
        AssistantMessage(content="let me add", tool_calls=(CALL,), seq=start + 1, turn_id=turn),
        ToolReturn(
            tool_call_id="call_1", tool_name="add", content="5", seq=start + 2, turn_id=turn
        ),
        AssistantMessage(content="add returned 5", seq=start + 3, turn_id=turn),
        UserMessage(content="thanks", seq=start + 4, turn_id=turn + "u"),
        AssistantMessage(content="echo", seq=start + 5, turn_id=turn + "u"),
    ]


def test_an_items_page_is_read_from_the_store_not_the_whole_history() -> None:
    """``items_read`` names the messages one page needs; walking every page both ways
    over just those gives what paging the whole history gives."""
    stored = [m for n in range(7) for m in history_at(6 * n)]

    def read(after: int, limit: int, before: int | None) -> list[Any]:  # the store's pages
        if before is not None:
            return [m for m in stored if m.seq < before][-limit:]
        return [m for m in stored if m.seq > after][:limit]

    everything = conversation_items(stored)
    for order in ("asc", "desc"):
        seen, after = [], None
        while True:
            wanted = items_read(after, 4, order)
            assert wanted["limit"] == 10  # two pages and a bit, never the history
            part = page(conversation_items(read(**wanted)), after=after, limit=4, order=order)  # type: ignore[arg-type]
            whole = page(everything, after=after, limit=4, order=order)
            assert part == whole
            seen += [i["id"] for i in part["data"]]
            if not part["has_more"]:
                break
            after = part["last_id"]
        expected = [i["id"] for i in everything]
        assert seen == (expected if order == "asc" else expected[::-1])
    with pytest.raises(UsageError, match="no item"):
        items_read("msg_3", 4, "asc")


# --- JWT bearer tokens ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[Any, str, Any]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return private, public_pem, other


def token(private: Any, **claims: Any) -> str:
    import time as _time

    import jwt

    now = int(_time.time())
    body = {"iss": "https://idp.test", "aud": "overstory", "sub": "dana", "exp": now + 300}
    body.update(claims)
    return jwt.encode({k: v for k, v in body.items() if v is not None}, private, algorithm="RS256")


def test_jwts_are_accepted_only_when_signed_issued_and_addressed_right(
    rsa_keys: tuple[Any, str, Any],
) -> None:
    import base64
    import hmac
    import time as _time

    import jwt

    from overstory.exceptions import ConfigError
    from overstory.gateway.tokens import JwtSettings, authenticate_jwt

    private, public_pem, other = rsa_keys
    settings = JwtSettings(
        "https://idp.test", "overstory", public_key=public_pem, admin_claim="adm"
    )

    def check(raw: str) -> Any:
        return asyncio.run(authenticate_jwt(settings, raw))

    dana = check(token(private))
    assert (dana.user, dana.admin, dana.via) == ("dana", False, "jwt")
    assert check(token(private, adm=True)).admin
    assert not check(token(private, adm="yes")).admin  # only a real true

    now = int(_time.time())
    refused = {
        "expired": token(private, exp=now - 3600),
        "another audience": token(private, aud="someone-else"),
        "another issuer": token(private, iss="https://evil.test"),
        "'sub'": token(private, sub=None),
        "does not verify": token(other),
        "not a usable user id": token(private, sub="bad\u0000id"),
    }
    for reason, raw in refused.items():
        with pytest.raises(AuthenticationFailed, match=reason) as caught:
            check(raw)
        assert raw not in str(caught.value)

    # alg=none: an unsigned token claiming to be anyone.
    def b64(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    claims = {"iss": "https://idp.test", "aud": "overstory", "sub": "root", "exp": now + 300}
    unsigned = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."
    with pytest.raises(AuthenticationFailed, match="not allowed"):
        check(unsigned)
    # Algorithm confusion: HS256 "signed" with the public key as the shared secret.
    head = f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{b64(claims)}"
    mac = hmac.new(public_pem.encode(), head.encode(), "sha256").digest()
    confused = f"{head}.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"
    with pytest.raises(AuthenticationFailed, match="not allowed"):
        check(confused)
    with pytest.raises(AuthenticationFailed, match="malformed"):
        check("not.a.jwt")
    assert jwt.__version__ >= "2.13"

    with pytest.raises(ConfigError, match="asymmetric"):
        JwtSettings("i", "a", public_key=public_pem, algorithms=("HS256",))
    with pytest.raises(ConfigError, match="exactly one"):
        JwtSettings("i", "a")
    with pytest.raises(ConfigError, match="PEM"):
        JwtSettings("i", "a", public_key="-----BEGIN nonsense")


def test_a_jwks_url_supplies_the_signing_key(rsa_keys: tuple[Any, str, Any]) -> None:
    import http.server
    import threading

    import jwt

    from overstory.gateway.tokens import JwtSettings, authenticate_jwt

    private, _, _ = rsa_keys
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    jwks = json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(jwks)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
        settings = JwtSettings("https://idp.test", "overstory", jwks_url=url)
        import time as _time

        claims = {
            "iss": "https://idp.test",
            "aud": "overstory",
            "sub": "erin",
            "exp": int(_time.time()) + 60,
        }
        signed = jwt.encode(claims, private, algorithm="RS256", headers={"kid": "k1"})
        assert asyncio.run(authenticate_jwt(settings, signed)).user == "erin"
        unknown = jwt.encode(claims, private, algorithm="RS256", headers={"kid": "k9"})
        with pytest.raises(AuthenticationFailed, match="no signing key"):
            asyncio.run(authenticate_jwt(settings, unknown))
    finally:
        server.shutdown()


def test_the_request_rate_slides_per_key_and_forgets_idle_keys() -> None:
    from overstory.gateway.app import RequestRate

    now = [0.0]
    rate = RequestRate(3, window_s=60, clock=lambda: now[0])
    assert [rate.admit("k") for _ in range(3)] == [None, None, None]
    now[0] = 10.0
    assert rate.admit("k") == pytest.approx(50.0)  # room when the first leaves the window
    assert rate.admit("other") is None  # per key
    now[0] = 60.5
    assert rate.admit("k") is None
    for i in range(100):
        rate.admit(f"burst-{i}")
    now[0] = 200.0
    rate.admit("k")
    assert len(rate) == 1  # the idle keys were swept


def test_access_is_owner_admin_or_a_share_and_others_learn_nothing() -> None:
    from overstory.access import ConversationRecord, Principal, access

    record = ConversationRecord(CONV, "alice", "helper", shares={"bob": "read", "carol": "write"})
    who = {
        name: Principal(name, admin=name == "root")
        for name in ("alice", "bob", "carol", "mallory", "root")
    }
    table = {
        name: tuple(access(record, p, need) for need in ("read", "write", "own"))  # type: ignore[arg-type]
        for name, p in who.items()
    }
    assert table == {
        "alice": (200, 200, 200),
        "root": (200, 200, 200),
        "bob": (200, 403, 403),
        "carol": (200, 200, 403),
        "mallory": (404, 404, 404),  # the same as for a conversation that does not exist
    }
    gone = ConversationRecord(CONV, "alice", "helper", deleted_at=1.0)
    assert access(gone, who["alice"], "read") == 404
    assert access(None, who["root"], "read") == 404


def test_the_keys_command_prints_a_key_once_lists_and_revokes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from overstory.cli.main import main

    store = f"sqlite:///{tmp_path}/keys.db"
    assert main(["keys", "create", "--user", "alice", "--json", "--store", store]) == 0
    made = json.loads(capsys.readouterr().out)
    assert set(made) == {"key", "key_id", "user"}
    assert made["user"] == "alice"
    assert parse_key(made["key"])[0] == made["key_id"]
    assert main(["keys", "create", "--user", "root", "--admin", "--store", store]) == 0
    assert "shown once" in capsys.readouterr().out
    assert main(["keys", "list", "--json", "--store", store]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(k["user"], k["admin"], k["revoked_at"]) for k in listed] == [
        ("alice", False, None),
        ("root", True, None),
    ]
    assert made["key"] not in json.dumps(listed)
    assert main(["keys", "revoke", made["key_id"], "--store", store]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["keys", "list", "--store", store]) == 0
    assert f"{made['key_id']}  revoked" in capsys.readouterr().out
    assert main(["keys", "revoke", "0123456789ab", "--store", store]) == 2
    assert "no API key" in capsys.readouterr().err
    assert main(["keys", "create", "--user", " ", "--store", store]) == 2
    assert "user id" in capsys.readouterr().err


def test_serve_http_wants_host_and_port(capsys: pytest.CaptureFixture[str]) -> None:
    from overstory.cli.main import main

    for bad in ("8000", "host:", ":80", "h:99999", "h:port"):
        with pytest.raises(SystemExit):
            main(["serve", "--http", bad])
        assert "HOST:PORT" in capsys.readouterr().err


def test_the_doors_replicas_are_a_count_or_serves_autoscaling_never_both(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from overstory.cli.main import main
    from overstory.exceptions import ConfigError
    from overstory.gateway.serve import autoscaling_config

    assert autoscaling_config(2, 6, 300) == {
        "min_replicas": 2,
        "initial_replicas": 2,
        "max_replicas": 6,
        "target_ongoing_requests": 300,
    }
    assert autoscaling_config()["max_replicas"] == 2
    with pytest.raises(ConfigError, match="below min_replicas"):
        autoscaling_config(3, 2)
    with pytest.raises(ConfigError, match="target_ongoing_requests"):
        autoscaling_config(1, 2, 10**6)
    # Refused before anything is deployed (no cluster is reached: the options fail first).
    assert main(["serve", "--replicas", "2", "--max-replicas", "4", "--http", "h:80"]) == 2
    assert "--replicas is a fixed count" in capsys.readouterr().err
    assert main(["serve", "--min-replicas", "2"]) == 2
    assert "need --http" in capsys.readouterr().err
    assert main(["serve", "--min-replicas", "3", "--max-replicas", "2", "--http", "h:80"]) == 2
    assert "below min_replicas" in capsys.readouterr().err
    for bad in ("0", "-1", "x"):
        with pytest.raises(SystemExit):
            main(["serve", "--max-replicas", bad])
        assert "positive integer" in capsys.readouterr().err


def test_the_record_cache_serves_a_read_for_its_ttl_then_reads_again(tmp_path: Path) -> None:
    from overstory.access import RECORD_PREFIX, ConversationRecord, RecordCache

    now = [0.0]
    cache = RecordCache(ttl_s=2.0, size=2, clock=lambda: now[0])
    record = ConversationRecord(CONV, "alice", "helper")
    other = "conv_" + "cd" * 12

    async def go(store: Any) -> list[Any]:
        seen = [await cache.get(store, CONV)]  # not there yet: None, cached
        await store.put_setting(RECORD_PREFIX + CONV, record.dumps(), expected=None)
        seen.append(await cache.get(store, CONV))  # within the ttl: still None
        now[0] = 2.5
        seen.append(await cache.get(store, CONV))  # read again
        await cache.get(store, other)
        await cache.get(store, "conv_" + "ef" * 12)  # a third: the least recent goes
        seen.append(len(cache._items))
        return seen

    first, cached, fresh, size = with_store(f"sqlite:///{tmp_path}/c.db", go)
    assert (first, cached, size) == (None, None, 2)
    assert fresh == record


def _request(path: str, idempotency_key: str) -> Any:
    from starlette.requests import Request

    headers = [(b"idempotency-key", idempotency_key.encode())]
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    return Request(scope)


def test_idempotency_keys_expire_are_swept_and_a_users_list_is_in_creation_order(
    tmp_path: Path,
) -> None:
    import time as _time
    from types import SimpleNamespace

    from overstory.access import Principal
    from overstory.gateway.app import _IDEMPOTENT, ApiError, DoorLimits, Gateway

    url = f"sqlite:///{tmp_path}/door.db"
    alice, bob = Principal("alice"), Principal("bob")

    async def body() -> None:
        limits = DoorLimits(idempotency_ttl_s=0.5)
        door = Gateway(SimpleNamespace(config=SimpleNamespace(store=url)), limits)
        made = await door.idempotent(alice, _request("/v1/x", "k"), {"a": 1}, "id-1")
        assert await door.idempotent(alice, _request("/v1/x", "k"), {"a": 1}, "id-2") == made
        assert await door.idempotent(bob, _request("/v1/x", "k"), {"a": 1}, "id-3") == "id-3"
        with pytest.raises(ApiError, match="another request body"):
            await door.idempotent(alice, _request("/v1/x", "k"), {"a": 2}, "id-4")
        await asyncio.sleep(0.6)  # the key expired: it is a new one now
        assert await door.idempotent(alice, _request("/v1/x", "k"), {"a": 2}, "id-5") == "id-5"
        store = await door.store()
        assert len(await store.settings(_IDEMPOTENT)) == 2
        assert await door.sweep_idempotency(now=_time.time()) == 1  # bob's claim
        assert await door.sweep_idempotency(now=_time.time() + 1) == 1  # and alice's new one
        assert await store.settings(_IDEMPOTENT) == []

        ids = [new_conversation_id() for _ in range(5)]
        for cid in ids:
            await door.create(alice, "helper", None, cid)
        await door.create(alice, "helper", None, ids[2])  # a retried create: listed once
        await door.create(bob, "helper", None)
        listed = await door.owned_by("alice")
        assert [r.id for r in listed] == ids
        await door.delete(listed[1])
        assert [r.id for r in await door.owned_by("alice")] == ids[:1] + ids[2:]
        assert len(await door.owned_by("bob")) == 1
        assert door._sweeper is not None
        door._sweeper.cancel()
        await store.close()

    asyncio.run(body())


def test_a_flood_of_bad_keys_is_audited_at_a_bounded_rate_and_counted(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from starlette.requests import Request

    from overstory.audit import records
    from overstory.gateway.app import ApiError, DoorLimits, Gateway, RequestRate

    url = f"sqlite:///{tmp_path}/door.db"
    now = [0.0]

    def bad_request() -> Any:
        headers = [(b"authorization", b"Bearer ovs_0123456789ab_" + b"x" * 43)]
        return Request(
            {"type": "http", "method": "GET", "path": "/v1/conversations", "headers": headers}
        )

    async def body() -> list[Any]:
        door = Gateway(SimpleNamespace(config=SimpleNamespace(store=url)), DoorLimits())
        door._failures = RequestRate(3, 60.0, clock=lambda: now[0])
        for _ in range(10):
            with pytest.raises(ApiError):
                await door.principal(bad_request())
        now[0] = 61.0  # a minute later: the next one is written, with the count missed
        with pytest.raises(ApiError):
            await door.principal(bad_request())
        store = await door.store()
        trail = await records(store)
        assert door._sweeper is not None
        door._sweeper.cancel()
        await store.close()
        return trail

    trail = asyncio.run(body())
    assert [r.action for r in trail] == ["auth.failed"] * 4
    assert [r.detail.get("unaudited_before") for r in trail] == [None, None, None, 7]


def test_deep_json_is_caught_before_parsing_and_strings_do_not_count() -> None:
    from overstory.gateway.wire import too_deep

    assert too_deep(b"[" * 65 + b"]" * 65, 64)
    assert not too_deep(b"[" * 64 + b"]" * 64, 64)
    assert not too_deep(b'{"a": "' + b"[" * 500 + b'"}', 64)  # inside a string
    assert not too_deep(b'{"a": "\\"' + b"[" * 100 + b'"}', 64)  # an escaped quote


def test_turn_options_map_what_they_can_and_refuse_the_rest_by_name() -> None:
    from overstory.gateway.wire import ParamError, turn_options

    options = turn_options(
        {"model": "m", "input": "hi", "temperature": 0.5, "max_output_tokens": 100, "store": True}
    )
    assert options.settings == {"temperature": 0.5, "max_output_tokens": 100}
    assert options.output is None
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    fmt = {"format": {"type": "json_schema", "name": "P", "schema": schema}}
    assert turn_options({"text": fmt}).output.schema == schema  # type: ignore[union-attr]
    assert turn_options({"text": {"format": {"type": "text"}}}).output is None
    chosen = turn_options(
        {
            "tool_choice": {"type": "function", "name": "f"},
            "parallel_tool_calls": False,
            "instructions": "Be brief.",
            "include": ["reasoning.encrypted_content"],
        }
    )
    assert chosen.settings == {"tool_choice": "f", "parallel_tool_calls": False}
    assert chosen.instructions == "Be brief."
    for body, param in (
        ({"tool_choice": {"type": "web_search"}}, "tool_choice"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"instructions": 3}, "instructions"),
        ({"store": "no"}, "store"),
        ({"truncation": "disabled"}, "truncation"),
        ({"parallel_tool_calls": 1}, "parallel_tool_calls"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"frequency_penalty": 1}, "frequency_penalty"),
    ):
        with pytest.raises(ParamError) as info:
            turn_options(body)
        assert info.value.param == param


def test_a_chat_request_is_its_context_its_text_and_its_options() -> None:
    from overstory.gateway.chat import chat_request
    from overstory.gateway.wire import ParamError

    chat = chat_request(
        {
            "model": "helper",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": [{"type": "text", "text": "and now?"}]},
            ],
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0.3,
            "max_tokens": 50,
            "stop": "END",
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "P", "schema": {"type": "object"}},
            },
        }
    )
    assert [(m.kind, m.content, m.seq) for m in chat.context.messages] == [
        ("user", "hi", 0),
        ("assistant", "hello", 1),
    ]
    assert (chat.context.text, chat.context.system) == ("and now?", "Be brief.")
    assert (chat.stream, chat.include_usage) == (True, True)
    assert chat.settings == {"temperature": 0.3, "max_output_tokens": 50, "stop": ["END"]}
    assert chat.output is not None
    assert chat.output.name == "P"
    for body, param in (
        ({"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
        ({"messages": []}, "messages"),
        (
            {"messages": [{"role": "tool", "content": "4", "tool_call_id": "c"}]},
            "messages[0].call_id",
        ),
        ({"tools": [{"type": "function"}]}, "tools[0].name"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tool_choice": "always"}, "tool_choice"),
        ({"n": 2}, "n"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "P"}}},
            "response_format.schema",
        ),
        ({"functions": []}, "functions"),
    ):
        full = {"model": "m", "messages": [{"role": "user", "content": "q"}], **body}
        with pytest.raises(ParamError) as info:
            chat_request(full)
        assert info.value.param == param


def test_chat_chunks_end_with_usage_and_done() -> None:
    from overstory.gateway.chat import ChatChunks, chat_completion
    from overstory.messages import Usage

    reply = Reply("hi there", "t", (), Usage(7, 3))
    chunks = ChatChunks("chatcmpl-1", "helper", include_usage=True)
    lines = chunks.start() + chunks.delta("hi ") + chunks.delta("there") + chunks.end(reply)
    events = [line[len(b"data: ") :] for line in lines.split(b"\n\n") if line]
    assert events[-1] == b"[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert "".join(p["choices"][0]["delta"].get("content", "") for p in parsed if p["choices"]) == (
        "hi there"
    )
    assert parsed[-2]["choices"][0]["finish_reason"] == "stop"
    assert parsed[-1]["choices"] == []
    assert parsed[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    whole = chat_completion("chatcmpl-2", "helper", reply, 1)
    assert whole["choices"][0]["message"]["content"] == "hi there"
    assert whole["usage"]["total_tokens"] == 10


def test_the_doors_ingress_is_haproxy_when_installed_and_named_when_asked_for(
    tmp_path: Path,
) -> None:
    from overstory.exceptions import ConfigError
    from overstory.runtime.cluster import (
        HIGH_THROUGHPUT_SERVE,
        INGRESS_ENV,
        haproxy_binary,
        serve_ingress_env,
    )

    # ray[serve] bundles a binary on Linux (what a fresh install of overstory gets).
    assert haproxy_binary({}) is not None
    binary = tmp_path / "haproxy"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    found = {"RAY_SERVE_HAPROXY_BINARY_PATH": str(binary)}
    chosen = serve_ingress_env(found)
    assert HIGH_THROUGHPUT_SERVE.items() <= chosen.items()
    # HAProxy's files in a directory of this user's, not Serve's /tmp/haproxy-serve
    # (owned by whoever made it first on the machine).
    assert chosen["RAY_SERVE_HAPROXY_SOCKET_PATH"].endswith(
        f"overstory-haproxy-{os.getuid()}/admin.sock"
    )
    assert serve_ingress_env({**found, INGRESS_ENV: "proxy"}) == {}
    # Serve's own variables, set already, win.
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in serve_ingress_env(
        {**found, "RAY_SERVE_ENABLE_HA_PROXY": "0"}
    )
    missing = {"RAY_SERVE_HAPROXY_BINARY_PATH": str(tmp_path / "nowhere")}
    assert haproxy_binary(missing) is None
    with pytest.raises(ConfigError, match="no HAProxy binary"):
        serve_ingress_env(missing)  # an explicit path that names nothing is named
    with pytest.raises(ConfigError, match="auto, haproxy or proxy"):
        serve_ingress_env({**found, INGRESS_ENV: "nginx"})
