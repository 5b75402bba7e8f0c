"""The HTTP front door on Ray Serve, driven by the official ``openai`` SDK over real HTTP
(and raw HTTP where a hostile client would not use an SDK)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import kill_namespace, wait_for

import overstory
from overstory import Agent, OfflineModel, Runtime, UsageError
from overstory.cli.demo import add
from overstory.gateway.keys import create_key, revoke_key
from overstory.providers.offline import Rule
from overstory.store import run_on_store as _store

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Door:
    def __init__(
        self, url: str, keys: dict[str, str], rt: Runtime, store: str, signer: Any
    ) -> None:
        self.url, self.keys, self.rt, self.store, self.signer = url, keys, rt, store, signer

    def jwt(self, user: str, **claims: Any) -> str:
        import jwt

        body = {"iss": "https://idp.test", "aud": "overstory", "sub": user}
        body["exp"] = int(time.time()) + 300
        return jwt.encode({**body, **claims}, self.signer, algorithm="RS256")

    def client(self, who: str = "alice", **options: Any) -> openai.OpenAI:
        key = self.keys.get(who, who)
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **options)

    def langchain(self, responses_api: bool, who: str = "alice") -> Any:
        """LangChain's ``ChatOpenAI`` on the door, in either of its modes."""
        from langchain_openai import ChatOpenAI

        return ChatOpenAI(
            model="helper",
            base_url=f"{self.url}/v1",
            api_key=self.keys[who],  # type: ignore[arg-type]
            use_responses_api=responses_api,
            max_retries=0,
        )

    def raw(
        self, method: str, path: str, body: bytes | None = None, who: str | None = "alice"
    ) -> tuple[int, dict[str, str], Any]:
        request = urllib.request.Request(f"{self.url}{path}", data=body, method=method)
        if who is not None:
            request.add_header("authorization", f"Bearer {self.keys.get(who, who)}")
        request.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                status, headers, raw = answer.status, dict(answer.headers), answer.read()
        except urllib.error.HTTPError as exc:
            status, headers, raw = exc.code, dict(exc.headers), exc.read()
        try:
            return status, {k.lower(): v for k, v in headers.items()}, json.loads(raw)
        except ValueError:
            return status, headers, raw


@pytest.fixture(scope="module")
def door(ray_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Door]:
    from ray import serve

    from overstory.gateway.serve import (
        GATEWAY_APP,
        MAX_ONGOING_REQUESTS,
        autoscaling_config,
        serve_http,
    )

    namespace = f"t-door-{uuid.uuid4().hex[:8]}"
    store = f"sqlite:///{tmp_path_factory.mktemp('door')}/history.db"
    rules = [Rule(r"what is (?P<a>-?\d+) \+ (?P<b>-?\d+)", "add")]
    helper = Agent("helper", model=OfflineModel("helper", rules=rules), tools=[add])
    helper_v2 = Agent("helper", version="2", model=OfflineModel("helper"))  # no tools
    slow = Agent("slow", model=OfflineModel("slow", latency_s=3.0))
    rt = overstory.connect([helper, helper_v2, slow], store=store, namespace=namespace)
    keys = {
        who: _store(store, lambda s, w=who, a=admin: create_key(s, w, admin=a))[0]
        for who, admin in (("alice", False), ("bob", False), ("root", True))
    }
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from overstory.gateway.tokens import JwtSettings

    signer = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = signer.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    jwt = JwtSettings("https://idp.test", "overstory", public_key=public.decode())
    port = _free_port()
    # Deployed autoscaled (as `overstory serve --min-replicas ...` does), held at one
    # replica by a target no test reaches: the tests that kill the replica kill the one.
    scaling = autoscaling_config(1, 2, MAX_ONGOING_REQUESTS)
    url = serve_http(namespace, store, "127.0.0.1", port, jwt=jwt, autoscaling=scaling)
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, "the front door did not come up"
        time.sleep(0.5)
    yield Door(url, keys, rt, store, signer)
    serve.delete(GATEWAY_APP)
    serve.shutdown()
    rt.close()
    kill_namespace(namespace)


def test_the_sdk_makes_a_conversation_and_a_response_and_reads_both_back(door: Door) -> None:
    client = door.client()
    conv = client.conversations.create(metadata={"topic": "math"})
    assert conv.id.startswith("conv_")
    assert conv.metadata == {"topic": "math"}
    response = client.responses.create(model="helper", conversation=conv.id, input="what is 2 + 3?")
    assert response.status == "completed"
    assert response.output_text == "add returned 5"
    assert [o.type for o in response.output] == ["mcp_call", "message"]  # run on the server
    assert response.usage is not None
    assert response.usage.input_tokens > 0
    again = client.responses.retrieve(response.id)
    assert again.output_text == "add returned 5"
    assert again.created_at == response.created_at

    second = client.responses.create(model="helper", conversation=conv.id, input="thanks")
    assert second.output_text == "echo #2: thanks"
    items = client.conversations.items.list(conv.id, order="asc", limit=2)
    assert [i.type for i in items.data] == ["message", "mcp_call"]
    assert items.has_more
    rest = client.conversations.items.list(conv.id, order="asc", limit=10, after=items.last_id)
    assert [getattr(i, "role", None) for i in rest.data] == ["assistant", "user", "assistant"]
    every = list(client.conversations.items.list(conv.id, order="asc", limit=2))  # the SDK pages
    assert len(every) == 5

    updated = client.conversations.update(conv.id, metadata={"topic": "sums"})
    assert updated.metadata == {"topic": "sums"}
    # Python reaches the same history: the conversation id is the runtime's user id.
    stored = door.rt.conversation(conv.id, agent="helper").history()
    assert [m.content for m in stored][-2:] == ["thanks", "echo #2: thanks"]
    listed = door.raw("GET", "/v1/conversations?order=desc&limit=100")[2]["data"]
    assert conv.id in [c["id"] for c in listed]
    assert all(
        c["id"] != conv.id for c in door.raw("GET", "/v1/conversations", who="bob")[2]["data"]
    )
    deleted = client.conversations.delete(conv.id)
    assert deleted.deleted
    listed = door.raw("GET", "/v1/conversations?order=desc&limit=100")[2]["data"]
    assert conv.id not in [c["id"] for c in listed]
    # Encryption at rest is on in this session (conftest): the hosts sealed every body,
    # so the answer's text is nowhere in the SQLite file or its write-ahead log.
    path = Path(door.store.removeprefix("sqlite:///"))
    for name in (path, path.with_name(path.name + "-wal")):
        if name.exists():
            assert b"returned 5" not in name.read_bytes()
            assert b"thanks" not in name.read_bytes()
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conv.id)


def test_model_agent_slash_version_runs_that_turn_on_that_version(door: Door) -> None:
    client = door.client()
    conv = client.conversations.create()
    asked = client.responses.create(model="helper/2", conversation=conv.id, input="what is 2 + 3?")
    assert (asked.model, asked.output_text) == ("helper/2", "echo #1: what is 2 + 3?")
    streamed = client.responses.create(
        model="helper/2", conversation=conv.id, input="what is 1 + 1?", stream=True
    )
    assert [e.response.output_text for e in streamed if e.type == "response.completed"] == [
        "echo #2: what is 1 + 1?"
    ]
    # the next response without a version is the rollout's (live: version 1, with its tool)
    plain = client.responses.create(model="helper", conversation=conv.id, input="what is 2 + 3?")
    assert plain.output_text == "add returned 5"
    history = door.rt.conversation(conv.id, agent="helper").history()
    assert len(history) == 8  # two echo turns of two messages, a tool turn of four
    for bad, match in (("helper/9", r"'helper/9'.*'helper/1', 'helper/2'"), ("helper/", "AGENT")):
        with pytest.raises(openai.BadRequestError, match=match):
            client.responses.create(model=bad, conversation=conv.id, input="hi")
    with pytest.raises(openai.BadRequestError, match="per response"):
        client.conversations.create(extra_body={"agent": "helper/2"})
    assert len(door.rt.conversation(conv.id, agent="helper").history()) == len(history)


def test_a_stream_reads_like_openais_and_resumes_after_any_event(door: Door) -> None:
    client = door.client()
    conv = client.conversations.create()
    with client.responses.create(
        model="helper", conversation=conv.id, input="stream these words to me", stream=True
    ) as stream:
        events = list(stream)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1
    final = events[-1].response
    assert "".join(deltas) == final.output_text == "echo #1: stream these words to me"
    # A reader that lost the connection after event N reads on from there: the same events.
    for n in (0, 3, len(events) - 2):
        with client.responses.retrieve(final.id, stream=True, starting_after=n) as resumed:
            assert [e.model_dump() for e in resumed] == [e.model_dump() for e in events[n + 1 :]]


def test_cancel_stops_a_running_response_and_the_stream_ends_incomplete(door: Door) -> None:
    client = door.client()
    conv = client.conversations.create()
    seen: list[Any] = []
    with client.responses.create(
        model="slow",
        conversation=conv.id,
        input="a slow answer of many words that takes three seconds to come",
        stream=True,
    ) as stream:
        for event in stream:
            seen.append(event)
            if event.type == "response.output_text.delta" and len(seen) < 6:
                cancelled = client.responses.cancel(seen[0].response.id)
                assert cancelled.status == "cancelled"
    assert seen[-1].type == "response.incomplete"
    assert seen[-1].response.status == "cancelled"
    shown = "".join(e.delta for e in seen if e.type == "response.output_text.delta")
    assert 0 < len(shown) < len("echo #1: a slow answer of many words that takes three seconds")
    stored = client.conversations.items.list(conv.id, order="asc")
    assert stored.data[-1].content[0].text == shown  # what was shown is what is stored


def test_an_idempotency_key_makes_a_retried_create_land_once(door: Door) -> None:
    client = door.client()
    once = {"Idempotency-Key": f"c-{uuid.uuid4().hex}"}
    conv = client.conversations.create(extra_headers=once)
    assert client.conversations.create(extra_headers=once).id == conv.id
    assert door.client("bob").conversations.create(extra_headers=once).id != conv.id  # per user

    key = {"Idempotency-Key": f"r-{uuid.uuid4().hex}"}
    first = client.responses.create(
        model="helper", conversation=conv.id, input="once", extra_headers=key
    )
    retried = client.responses.create(
        model="helper", conversation=conv.id, input="once", extra_headers=key
    )
    assert retried.id == first.id
    assert retried.output_text == first.output_text == "echo #1: once"
    history = door.rt.conversation(conv.id, agent="helper").history()
    assert [m.content for m in history] == ["once", "echo #1: once"]  # one turn, not two
    with pytest.raises(openai.BadRequestError, match="another request body"):
        client.responses.create(
            model="helper", conversation=conv.id, input="twice", extra_headers=key
        )

    solo = {"Idempotency-Key": f"s-{uuid.uuid4().hex}"}
    a = client.responses.create(model="helper", input="on my own", extra_headers=solo)
    b = client.responses.create(model="helper", input="on my own", extra_headers=solo)
    assert a.id == b.id
    assert a.conversation is not None
    assert b.conversation is not None
    assert a.conversation.id == b.conversation.id  # one new conversation, however many tries


def test_credentials_are_checked_and_other_users_conversations_do_not_exist(door: Door) -> None:
    conv = door.client("alice").conversations.create()
    answer = door.client("alice").responses.create(model="helper", conversation=conv.id, input="hi")
    for bad in ("ovs_000000000000_" + "A" * 43, "sk-something-else", ""):
        with pytest.raises(openai.AuthenticationError):
            door.client(bad or "x").conversations.retrieve(conv.id)
    status, headers, body = door.raw("GET", f"/v1/conversations/{conv.id}", who=None)
    assert status == 401
    assert body["error"]["code"] == "invalid_api_key"
    assert headers["x-should-retry"] == "false"

    bob = door.client("bob")
    for call in (
        lambda: bob.conversations.retrieve(conv.id),
        lambda: bob.conversations.items.list(conv.id),
        lambda: bob.conversations.update(conv.id, metadata={"x": "y"}),
        lambda: bob.conversations.delete(conv.id),
        lambda: bob.responses.retrieve(answer.id),
        lambda: bob.responses.cancel(answer.id),
        lambda: bob.responses.create(model="helper", conversation=conv.id, input="mine now"),
        lambda: bob.conversations.retrieve("conv_" + "0" * 24),  # the same 404 as a real one
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert door.client("root").conversations.retrieve(conv.id).id == conv.id  # an admin
    history = door.rt.conversation(conv.id, agent="helper").history()
    assert [m.content for m in history] == ["hi", "echo #1: hi"]  # bob changed nothing

    revoked_key, record = _store(door.store, lambda s: create_key(s, "carol"))
    carol = door.client(revoked_key)
    carol.conversations.create()
    _store(door.store, lambda s: revoke_key(s, record.key_id))
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        carol.conversations.create()


def test_an_owner_shares_for_reading_or_writing_and_takes_it_back(door: Door) -> None:
    alice, bob = door.client("alice"), door.client("bob")
    conv = alice.conversations.create()
    answer = alice.responses.create(model="helper", conversation=conv.id, input="shared hi")

    def share(who: str, level: str, client: openai.OpenAI = alice) -> Any:
        return client.post(
            f"/conversations/{conv.id}/shares",
            body={"user": who, "access": level},
            cast_to=object,
        )

    assert share("bob", "read")["data"] == [{"user": "bob", "access": "read"}]
    assert bob.conversations.retrieve(conv.id).id == conv.id
    assert len(bob.conversations.items.list(conv.id).data) == 2
    assert bob.responses.retrieve(answer.id).output_text == "echo #1: shared hi"
    with pytest.raises(openai.PermissionDeniedError, match="reading only"):
        bob.responses.create(model="helper", conversation=conv.id, input="may I?")
    with pytest.raises(openai.PermissionDeniedError, match="only the owner"):
        bob.conversations.update(conv.id, metadata={"x": "y"})
    with pytest.raises(openai.PermissionDeniedError):
        share("mallory", "write", client=bob)  # a reader cannot share further

    share("bob", "write")
    assert bob.responses.create(model="helper", conversation=conv.id, input="now I may").status == (
        "completed"
    )
    with pytest.raises(openai.NotFoundError):  # a share is for one user: nobody else
        door.client(door.jwt("mallory")).conversations.retrieve(conv.id)
    share("bob", "none")
    with pytest.raises(openai.NotFoundError):
        bob.conversations.retrieve(conv.id)
    with pytest.raises(openai.BadRequestError, match="access"):
        share("bob", "admin")
    history = door.rt.conversation(conv.id, agent="helper").history()
    assert [m.content for m in history if m.kind == "user"] == ["shared hi", "now I may"]


def test_a_jwt_speaks_for_its_sub_as_an_api_key_does(door: Door) -> None:
    conv = door.client("alice").conversations.create()
    as_alice = door.client(door.jwt("alice"))
    assert as_alice.conversations.retrieve(conv.id).id == conv.id  # the same user
    with pytest.raises(openai.NotFoundError):
        door.client(door.jwt("bob")).conversations.retrieve(conv.id)
    with pytest.raises(openai.AuthenticationError, match="expired"):
        door.client(door.jwt("alice", exp=int(time.time()) - 3600)).conversations.create()
    with pytest.raises(openai.AuthenticationError, match="audience"):
        door.client(door.jwt("alice", aud="elsewhere")).conversations.create()


def test_bad_requests_get_openai_shaped_errors_and_change_nothing(door: Door) -> None:
    client = door.client()
    conv = client.conversations.create()
    with pytest.raises(openai.BadRequestError, match="no agent"):
        client.responses.create(model="nobody", conversation=conv.id, input="hi")
    with pytest.raises(openai.BadRequestError, match="input"):
        client.responses.create(model="helper", conversation=conv.id, input="   ")
    status, headers, body = door.raw("POST", "/v1/responses", b"{not json")
    assert (status, body["error"]["code"]) == (400, "invalid_json")
    assert headers["x-should-retry"] == "false"
    status, _, body = door.raw("POST", "/v1/conversations", b"x" * (2 << 20))
    assert (status, body["error"]["code"]) == (413, "body_too_large")
    status, _, body = door.raw("GET", "/v1/conversations/..%2F..%2Fetc%2Fpasswd")
    assert status == 404
    status, _, body = door.raw("GET", "/v1/responses/resp_nope")
    assert status == 404
    assert door.rt.conversation(conv.id, agent="helper").history() == []


def test_probes_answer_without_credentials(door: Door) -> None:
    assert door.raw("GET", "/healthz", who=None)[:3:2] == (200, {"status": "ok"})
    status, _, body = door.raw("GET", "/readyz", who=None)
    assert (status, body["ready"]) == (200, True), body


def test_a_dropped_stream_leaves_the_turn_running(door: Door) -> None:
    """Closing the HTTP stream early (the client went away) does not stop the turn."""
    client = door.client()
    conv = client.conversations.create()
    stream = client.responses.create(
        model="slow", conversation=conv.id, input="keep going without me", stream=True
    )
    first = next(iter(stream))
    stream.close()
    response_id = first.response.id
    deadline = time.monotonic() + 20
    while client.responses.retrieve(response_id).status != "completed":
        assert time.monotonic() < deadline, "the turn stopped with its reader"
        time.sleep(0.3)
    assert client.responses.retrieve(response_id).output_text == "echo #1: keep going without me"


def test_serving_the_door_on_another_address_is_refused_naming_the_one_in_use(
    door: Door,
) -> None:
    from overstory.exceptions import ConfigError
    from overstory.gateway.serve import serve_http

    port = int(door.url.rsplit(":", 1)[1])
    with pytest.raises(ConfigError, match=f"already serves plain HTTP on 127.0.0.1:{port}"):
        serve_http("elsewhere", door.store, "127.0.0.1", _free_port())
    assert door.raw("GET", "/healthz", who=None)[0] == 200  # the running door is untouched


def test_where_the_conversation_lives_the_principal_is_checked_again(door: Door) -> None:
    """Past the door: a handle acting for a principal (as the gateway's are) is refused
    by the host itself, whatever the caller asks for."""
    from overstory.access import Principal
    from overstory.exceptions import NotPermitted, UnknownConversation

    alice = door.client("alice")
    conv = alice.conversations.create()
    alice.responses.create(model="helper", conversation=conv.id, input="mine")
    handle = door.rt.conversation(conv.id, agent="helper")
    assert len(handle.acting_for(Principal("alice")).history()) == 2
    as_bob = handle.acting_for(Principal("bob"))
    with pytest.raises(UnknownConversation):
        as_bob.history()
    with pytest.raises(UnknownConversation):
        as_bob.send("taking over")
    with pytest.raises(UnknownConversation):
        list(as_bob.stream("taking over"))
    alice.post(
        f"/conversations/{conv.id}/shares", body={"user": "bob", "access": "read"}, cast_to=object
    )
    assert len(as_bob.history()) == 2
    with pytest.raises(NotPermitted):
        as_bob.send("still not mine")
    assert len(handle.acting_for(Principal("root", admin=True)).history()) == 2
    # A user's own (Python) conversation: that user or an admin, nobody else.
    own = door.rt.conversation("carol", agent="helper")
    own.send("hello")
    with pytest.raises(UnknownConversation):
        own.acting_for(Principal("bob")).history()
    assert len(own.acting_for(Principal("carol")).history()) == 2
    # In-cluster Python callers are trusted as before; nothing above was stored.
    assert [m.content for m in handle.history()] == ["mine", "echo #1: mine"]


def test_a_dedicated_conversation_checks_the_principal_too(door: Door) -> None:
    from overstory.access import Principal
    from overstory.exceptions import UnknownConversation

    namespace = f"t-door-ded-{uuid.uuid4().hex[:8]}"
    solo = Agent("solo", model=OfflineModel("solo"), placement="dedicated")
    rt = overstory.connect(solo, store=door.store, namespace=namespace)
    try:
        conv = door.client("alice").conversations.create()  # its record, in the same store
        handle = rt.conversation(conv.id, agent="solo")
        with pytest.raises(UnknownConversation):
            handle.acting_for(Principal("bob")).send("not mine")
        assert handle.acting_for(Principal("alice")).send("hi").text == "echo #1: hi"
    finally:
        rt.close()
        kill_namespace(namespace)


def test_the_chat_page_streams_a_reply_and_reads_on_after_a_reload(
    door: Door, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The page at / in a real headless Chromium: paste a key, start a conversation with
    the slow agent, send, reload while the reply streams, and the page reads on to the
    end; a screenshot is kept in the test's output directory."""
    from cdp import Browser, chromium

    executable = chromium()
    if executable is None:
        pytest.skip("no chromium here (scripts/test installs Debian's chromium package)")
    text = "a reply that streams while the page reloads"
    expected = f"echo #1: {text}"
    shots = tmp_path_factory.mktemp("chat-page")

    async def run() -> tuple[str, bytes]:
        async with Browser(executable) as page:
            await page.goto(f"{door.url}/")
            await page.js(
                f"document.getElementById('key').value = {json.dumps(door.keys['alice'])}"
            )
            await page.js("document.getElementById('connect').click()")
            await page.wait_for("document.getElementById('agent').options.length >= 2")
            await page.js("document.getElementById('agent').value = 'slow'")
            await page.js("document.getElementById('create').click()")
            await page.wait_for("localStorage.getItem('overstory.conversation')")
            await page.js(f"document.getElementById('input').value = {json.dumps(text)}")
            await page.js("document.getElementById('send').click()")
            # Some of the reply is on screen, not all of it: reload now.
            await page.wait_for(
                "[...document.querySelectorAll('.assistant')].some(e => e.textContent.length > 3)"
            )
            partial = await page.js("document.querySelector('.assistant').textContent")
            assert partial != expected
            await page.reload()
            await page.wait_for(
                f"[...document.querySelectorAll('.assistant')].some(e => e.textContent === {json.dumps(expected)})",
                timeout_s=30,
            )
            shot = await page.screenshot()
            return str(await page.js("document.getElementById('messages').innerText")), shot

    shown, shot = asyncio.run(run())
    (shots / "chat-page.png").write_bytes(shot)
    print(f"screenshot: {shots / 'chat-page.png'}")
    assert shown.count(expected) == 1  # read on, not doubled
    assert shown.count(text) == 2  # the user's message once, and inside the reply
    assert (shots / "chat-page.png").stat().st_size > 1000
    conversations = door.client("alice").get("/conversations", cast_to=object)
    newest = conversations["data"][0]["id"]
    stored = door.rt.conversation(newest, agent="slow").history()
    assert [m.content for m in stored] == [text, expected]  # one turn, stored once


def test_a_killed_replica_mid_stream_is_replaced_and_the_client_reads_on(door: Door) -> None:
    """SIGKILL-equivalent (ray.kill) of the front door's replica while a reply streams:
    the client's stream breaks, Serve starts a new replica, and the client resumes from
    the last event it saw; the turn ran in its conversation all along, once."""
    import ray

    client = door.client(timeout=30)
    conv = client.conversations.create()
    text = "keep streaming while the door falls over"
    seen: list[Any] = []
    stream = client.responses.create(model="slow", conversation=conv.id, input=text, stream=True)
    for event in stream:
        seen.append(event)
        if event.type == "response.output_text.delta":
            break
    replicas = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::overstory-gateway#")
    ]
    assert len(replicas) == 1, replicas
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]))
    with contextlib.suppress(openai.APIError):  # a cut connection, or a stream cut short
        seen.extend(stream)
    assert seen[-1].type != "response.completed"  # the door fell before the reply's end
    response_id, last = seen[0].response.id, seen[-1].sequence_number
    deadline = time.monotonic() + 60
    rest: list[Any] = []
    while True:  # the replacement replica takes a moment to come up
        try:
            with client.responses.retrieve(response_id, stream=True, starting_after=last) as more:
                rest = list(more)
            break
        except (openai.APIConnectionError, openai.InternalServerError, openai.NotFoundError):
            assert time.monotonic() < deadline, "no replica came back"
            time.sleep(0.5)
    events = seen + rest
    assert [e.sequence_number for e in events] == list(range(len(events)))  # nothing missed
    assert events[-1].type == "response.completed"
    shown = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert shown == f"echo #1: {text}"
    stored = door.rt.conversation(conv.id, agent="slow").history()
    assert [m.content for m in stored] == [text, shown]  # the turn ran once


def test_python_and_http_reach_the_same_several_conversations_of_a_user(door: Door) -> None:
    rt = door.rt
    made = rt.new_conversation("alice", agent="helper", metadata={"from": "python"})
    assert made.user_id.startswith("conv_")
    assert made.send("hello from python").text == "echo #1: hello from python"
    other = rt.new_conversation("alice", agent="helper")  # a second one, its own history
    assert other.send("hi").text == "echo #1: hi"
    client = door.client()
    over_http = client.conversations.create(metadata={"from": "http"})
    mine = [c["id"] for c in rt.conversations("alice")]
    assert mine[-3:] == [made.user_id, other.user_id, over_http.id]  # oldest first
    assert made.user_id not in [c["id"] for c in rt.conversations("bob")]
    items = client.conversations.items.list(made.user_id, order="asc")
    assert [i.content[0].text for i in items.data] == [  # type: ignore[union-attr]
        "hello from python",
        "echo #1: hello from python",
    ]
    assert client.conversations.retrieve(made.user_id).metadata == {"from": "python"}
    with pytest.raises(openai.NotFoundError):
        door.client("bob").conversations.items.list(made.user_id)
    with pytest.raises(UsageError, match="metadata"):
        rt.new_conversation("alice", metadata={"k": "v" * 513})
    # the user's default conversation stays what it was, apart from these
    assert rt.conversation("alice", agent="helper").user_id == "alice"


def test_a_quota_refusal_is_a_429_with_retry_after_and_stores_nothing(door: Door) -> None:
    key, _ = _store(door.store, lambda s: create_key(s, "frank"))
    door.rt.quotas.set("frank", requests_per_minute=1, tokens_per_day=10**6)
    client = door.client(key)
    conv = client.conversations.create()
    assert client.responses.create(model="helper", conversation=conv.id, input="hi").status == (
        "completed"
    )
    with pytest.raises(openai.RateLimitError) as refused:
        client.responses.create(model="helper", conversation=conv.id, input="again", stream=True)
    answer = refused.value.response
    assert 1 <= int(answer.headers["retry-after"]) <= 60
    assert "x-should-retry" not in answer.headers  # it frees within a minute: retrying helps
    assert refused.value.code == "quota_exceeded"
    assert "requests_per_minute = 1" in refused.value.message
    assert len(client.conversations.items.list(conv.id).data) == 2  # the refused turn: nothing
    from overstory.audit import records

    refused_ = [r for r in _store(door.store, records) if r.action == "quota.refused"]
    assert refused_[-1].who == "frank"
    assert refused_[-1].detail["limit"] == "requests_per_minute"
    door.rt.quotas.set("frank", requests_per_minute=None, tokens_per_day=0)
    answers: list[tuple[int, dict[str, str], dict[str, Any]]] = []

    def refused_for_the_day() -> bool:
        # Hosts read a user's quota again after 5 s; until then the per-minute refusal.
        answers.append(
            door.raw(
                "POST",
                "/v1/responses",
                json.dumps(
                    {"model": "helper", "conversation": conv.id, "input": "and now?"}
                ).encode(),
                who=key,
            )
        )
        return "tokens_per_day" in answers[-1][2]["error"]["message"]

    wait_for(refused_for_the_day, 30, "the new quota (tokens per day) to be read")
    status, headers, body = answers[-1]
    assert all(a[0] == 429 for a in answers)  # refused throughout: nothing ran
    assert (status, body["error"]["code"]) == (429, "quota_exceeded")
    assert headers["x-should-retry"] == "false"  # tokens per day: hours away


def test_the_door_audits_failures_denials_and_share_changes(door: Door) -> None:
    from overstory.audit import records, verify

    before = len(_store(door.store, records))
    forged = "ovs_0123456789ab_" + "x" * 43
    assert door.raw("GET", "/v1/conversations", who=forged)[0] == 401
    conv = door.client().conversations.create()
    with pytest.raises(openai.NotFoundError):
        door.client("bob").conversations.retrieve(conv.id)
    assert (
        door.raw(
            "POST",
            f"/v1/conversations/{conv.id}/shares",
            json.dumps({"user": "bob", "access": "read"}).encode(),
        )[0]
        == 200
    )
    assert door.client("root").conversations.retrieve(conv.id).id == conv.id
    new = _store(door.store, records)[before:]
    seen = {(r.action, r.who, r.outcome) for r in new}
    assert ("auth.failed", "anonymous", "denied") in seen
    assert ("access.denied", "bob", "denied") in seen
    assert ("share.changed", "alice", "ok") in seen
    assert ("admin.access", "root", "ok") in seen
    assert all(forged not in json.dumps(r.detail) and "x" * 20 not in r.target for r in new)
    assert _store(door.store, verify) == []


def test_a_background_response_is_a_durable_job_the_sdk_polls(door: Door) -> None:
    """``background=True`` (OpenAI's long-running responses): the request returns at
    once, queued; a job runs the turn (the response id is its turn id); the SDK polls the
    response, or streams it, until it completes. A queued one is cancelled; another user
    never sees it; a retried create makes one job."""
    client = door.client()
    conv = client.conversations.create()
    first = client.responses.create(
        model="slow", conversation=conv.id, input="take your time", background=True
    )
    # Not completed: the create returned before the slow agent's 3 s answer.
    assert first.status in ("queued", "in_progress")
    assert first.background is True
    second = client.responses.create(
        model="slow", conversation=conv.id, input="and then this", background=True
    )
    assert second.status == "queued"  # one job per conversation at a time
    cancelled = client.responses.cancel(second.id)
    assert cancelled.status == "cancelled"
    with pytest.raises(openai.NotFoundError):
        door.client("bob").responses.retrieve(first.id)
    deadline = time.monotonic() + 60
    while (polled := client.responses.retrieve(first.id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert polled.status == "completed"
    assert polled.output_text == "echo #1: take your time"
    assert client.responses.retrieve(second.id).status == "cancelled"
    # The conversation holds the completed turn once, and nothing of the cancelled one.
    history = door.rt.conversation(conv.id, agent="slow").history()
    assert [(m.kind, m.turn_id) for m in history] == [
        ("user", first.id),
        ("assistant", first.id),
    ]
    jobs = door.rt.jobs.list(conv.id)
    assert sorted(j["state"] for j in jobs) == ["cancelled", "succeeded"]

    # Streamed while it runs: GET ?stream=true waits for the turn, then tails it.
    third = client.responses.create(model="slow", input="stream me later", background=True)
    streamed = client.responses.retrieve(third.id, stream=True)
    events = list(streamed)
    assert events[-1].type == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "echo #1: stream me later"

    # A retried create (same Idempotency-Key and body) is the same response, one job.
    body = json.dumps({"model": "helper", "input": "once only", "background": True}).encode()
    made, key = [], f"bg-{uuid.uuid4().hex[:8]}"
    for _ in range(2):
        request = urllib.request.Request(f"{door.url}/v1/responses", data=body, method="POST")
        request.add_header("authorization", f"Bearer {door.keys['alice']}")
        request.add_header("content-type", "application/json")
        request.add_header("idempotency-key", key)
        with urllib.request.urlopen(request, timeout=30) as answer:
            made.append(json.loads(answer.read()))
    assert made[0]["id"] == made[1]["id"]
    conv_id = made[0]["conversation"]["id"]
    assert len(door.rt.jobs.list(conv_id)) == 1
    # Refused: background with stream, and a non-boolean background.
    status, _, error = door.raw(
        "POST",
        "/v1/responses",
        json.dumps({"model": "helper", "input": "x", "background": True, "stream": True}).encode(),
    )
    assert status == 400
    assert error["error"]["param"] == "stream"
    status, _, error = door.raw(
        "POST",
        "/v1/responses",
        json.dumps({"model": "helper", "input": "x", "background": "yes"}).encode(),
    )
    assert status == 400
    assert error["error"]["param"] == "background"


def test_responses_take_settings_and_text_format_and_refuse_what_they_cannot_do(
    door: Door,
) -> None:
    """temperature, max_output_tokens and text.format have their effect; a parameter the
    door does not support is a 400 naming it, never accepted and ignored."""
    client = door.client()
    capped = client.responses.create(
        model="helper", input="x" * 200, max_output_tokens=16, temperature=0.2
    )
    assert len(capped.output_text) == 64  # 16 tokens of 4 characters: the cap held
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "rank": {"type": "integer"}},
        "required": ["city", "rank"],
        "additionalProperties": False,
    }
    structured = client.responses.create(
        model="helper",
        input="best city?",
        text={"format": {"type": "json_schema", "name": "Ranking", "schema": schema}},
    )
    value = json.loads(structured.output_text)
    assert set(value) == {"city", "rank"}
    assert isinstance(value["rank"], int)
    for extra, param in (
        ({"top_k": 3}, "top_k"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"truncation": "disabled"}, "truncation"),
        ({"temperature": 5}, "temperature"),
        (
            {"text": {"format": {"type": "json_schema", "name": "X", "schema": {"type": 7}}}},
            "text.format.schema",
        ),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(model="helper", input="hi", extra_body=extra)
        assert info.value.body["param"] == param  # type: ignore[index]
    # what asks for nothing the door does not do anyway is accepted
    plain = client.responses.create(model="helper", input="hi", store=True, truncation="auto")
    assert plain.status == "completed"
    one = [{"role": "user", "content": [{"type": "input_text", "text": "one item"}]}]
    assert client.responses.create(model="helper", input=one).output_text == "echo #1: one item"
    # A longer input is the caller's history: stored first, then answered after it.
    context = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "ok"}]
    both = client.responses.create(model="helper", input=[*context, *one])  # type: ignore[list-item]
    assert both.output_text == "echo #2: one item"
    items = client.conversations.items.list(both.conversation.id, order="asc")  # type: ignore[union-attr]
    assert [i.content[0].text for i in items.data] == [  # type: ignore[union-attr]
        "earlier",
        "ok",
        "one item",
        "echo #2: one item",
    ]


def test_hostile_bodies_and_wrong_methods_get_clear_answers(door: Door) -> None:
    deep = b'{"model": "helper", "input": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    status, _, body = door.raw("POST", "/v1/responses", deep)
    assert status == 400
    assert body["error"]["code"] == "invalid_json"
    assert "deeper than 64" in body["error"]["message"]
    status, headers, body = door.raw("PUT", "/v1/responses")
    assert status == 405
    assert "POST" in headers["allow"]
    assert body["error"]["message"].startswith("method PUT")


def test_a_background_response_cancelled_right_after_create_never_completes(
    door: Door,
) -> None:
    """Cancel at once, wherever the job is — queued, claimed, its turn just started:
    the answer is never ``in_progress`` with the turn left to run."""
    client = door.client()
    for i in range(3):
        made = client.responses.create(model="slow", input=f"cancel me {i}", background=True)
        try:
            cancelled = client.responses.cancel(made.id)
        except openai.ConflictError:  # "could not cancel yet": said, not pretended
            continue
        assert cancelled.status in ("cancelled", "incomplete"), cancelled.status
        later = client.responses.retrieve(made.id)
        assert later.status != "completed"


def test_a_body_shorter_than_its_content_length_times_out_at_the_door(door: Door) -> None:
    host, port = door.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/responses HTTP/1.1\r\nHost: door\r\n"
            + f"Authorization: Bearer {door.keys['alice']}\r\n".encode()
            + b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            + b'{"model": "helper",'
        )
        started = time.monotonic()
        answer = sock.recv(65536)
        waited = time.monotonic() - started
        while b"}" not in answer.partition(b"\r\n\r\n")[2]:  # the body, in its own segment
            more = sock.recv(65536)
            if not more:
                break
            answer += more
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"did not arrive within" in answer
    assert waited < 15


def test_chat_completions_are_stateless_run_the_agents_tools_and_stream(door: Door) -> None:
    """POST /v1/chat/completions with the official SDK: the request's messages are the
    context (the offline model numbers its answer by the user messages it was sent),
    nothing is stored, the agent's tools run on the server, and a stream ends with the
    usage when asked."""
    client = door.client()
    stored = _store(door.store, lambda s: s.count())
    messages: list[Any] = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "echo #1: first"},
        {"role": "user", "content": "second"},
    ]
    done = client.chat.completions.create(model="helper", messages=messages)
    assert done.choices[0].message.content == "echo #2: second"
    assert done.choices[0].finish_reason == "stop"
    assert done.usage is not None
    assert done.usage.prompt_tokens > 0
    chunks = list(
        client.chat.completions.create(
            model="helper", messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo #2: second"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens > 0
    tool = client.chat.completions.create(
        model="helper", messages=[{"role": "user", "content": "what is 2 + 3?"}]
    )
    assert tool.choices[0].message.content == "add returned 5"  # run server-side
    capped = client.chat.completions.create(
        model="helper", messages=[{"role": "user", "content": "y" * 100}], max_tokens=4
    )
    assert len(capped.choices[0].message.content or "") == 16
    shaped = client.chat.completions.create(
        model="helper",
        messages=[{"role": "user", "content": "a point"}],
        response_format={
            "type": "json_schema",
            "json_schema": {
                "name": "Point",
                "schema": {
                    "type": "object",
                    "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                    "required": ["x", "y"],
                },
            },
        },
    )
    assert json.loads(shaped.choices[0].message.content or "") == {"x": 1, "y": 1}
    assert _store(door.store, lambda s: s.count()) == stored  # nothing was stored
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="helper",
            messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "web_search"}],  # type: ignore[list-item]
        )
    assert info.value.body["param"] == "tools[0].type"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="nobody", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        door.client("nobody-key").chat.completions.create(
            model="helper", messages=[{"role": "user", "content": "x"}]
        )


def test_langchain_chat_completions_mode_invokes_and_streams(door: Door) -> None:
    """LangChain's ``ChatOpenAI(use_responses_api=False)`` — its default mode, which
    failed with a 404 before the door had /v1/chat/completions."""

    llm = door.langchain(responses_api=False)
    answer = llm.invoke(
        [("system", "be brief"), ("human", "first"), ("ai", "echo #1: first"), ("human", "second")]
    )
    assert answer.content == "echo #2: second"
    streamed = "".join(str(chunk.content) for chunk in llm.stream("hello there"))
    assert streamed == "echo #1: hello there"


def test_a_store_false_response_is_stateless_its_input_the_context(door: Door) -> None:
    """``store=false``: the input items are the context (the offline model numbers its
    answer by the user messages sent), nothing is stored, and the response is in no
    conversation, so it cannot be retrieved later (404, as OpenAI answers)."""
    client = door.client()
    stored = _store(door.store, lambda s: s.count())
    owned = len(client.get("/conversations", cast_to=object)["data"])  # type: ignore[index]
    context: list[Any] = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "echo #1: first"}]},
        {"role": "user", "content": [{"type": "input_text", "text": "second"}]},
    ]
    done = client.responses.create(model="helper", input=context, store=False)
    assert done.status == "completed"
    assert done.output_text == "echo #2: second"
    assert done.store is False
    assert done.conversation is None
    streamed = client.responses.create(model="helper", input="just this", store=False, stream=True)
    kinds = [event.type for event in streamed]
    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    tool = client.responses.create(model="helper", input="what is 2 + 3?", store=False)
    assert tool.output_text == "add returned 5"
    assert _store(door.store, lambda s: s.count()) == stored  # nothing stored
    assert len(client.get("/conversations", cast_to=object)["data"]) == owned  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(done.id)
    calls: list[Any] = [{"type": "function_call_output", "call_id": "c1", "output": "4"}]
    for extra, param in (
        ({"input": calls}, "input[0].call_id"),
        ({"input": [{"role": "assistant", "content": "hi"}]}, "input"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
        ({"background": True, "input": "x"}, "background"),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(model="helper", store=False, **extra)
        assert info.value.body["param"] == param  # type: ignore[index]


# --- client tools, chaining, items: what real clients do --------------------------------------

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "name": "weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
ASK_WEATHER = '!tool weather {"city": "Paris"}'


def test_chat_completions_end_on_a_client_tool_and_continue_from_its_output(door: Door) -> None:
    """A request's own function tools: the model's call ends the completion
    (``finish_reason: tool_calls``), and the next request with the ``tool`` message
    continues the turn; streamed, the call arrives as a ``tool_calls`` delta."""
    client = door.client()
    tools: Any = [
        {"type": "function", "function": {k: v for k, v in WEATHER_TOOL.items() if k != "type"}}
    ]
    asked: Any = [{"role": "user", "content": ASK_WEATHER}]
    first = client.chat.completions.create(model="helper", messages=asked, tools=tools)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "weather",
        {"city": "Paris"},
    )
    answered = [
        *asked,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    second = client.chat.completions.create(model="helper", messages=answered, tools=tools)
    assert second.choices[0].message.content == "weather returned sunny"
    assert second.choices[0].finish_reason == "stop"
    chunks = list(
        client.chat.completions.create(model="helper", messages=asked, tools=tools, stream=True)
    )
    deltas = [
        c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls
    ]
    assert [(d[0].function.name, d[0].index) for d in deltas] == [("weather", 0)]  # type: ignore[union-attr]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    none = client.chat.completions.create(
        model="helper", messages=asked, tools=tools, tool_choice="none"
    )
    assert none.choices[0].message.tool_calls is None  # tool_choice had its effect
    with pytest.raises(openai.BadRequestError) as info:  # an output for no call
        client.chat.completions.create(
            model="helper",
            messages=[*asked, {"role": "tool", "tool_call_id": "call_x", "content": "?"}],
            tools=tools,
        )
    assert info.value.body["param"] == "messages[1].call_id"  # type: ignore[index]


def test_responses_end_on_a_client_tool_and_chain_with_previous_response_id(door: Door) -> None:
    """The model's call to a request's tool ends the response with a ``function_call``
    item (status completed); ``previous_response_id`` with its ``function_call_output``
    continues that conversation's turn. The agent's own calls are ``mcp_call`` items."""
    client = door.client()
    first = client.responses.create(
        model="helper",
        input=ASK_WEATHER,
        tools=[WEATHER_TOOL],
        instructions="Answer in French.",
        metadata={"ticket": "42"},
    )
    assert first.status == "completed"
    assert [o.type for o in first.output] == ["function_call"]
    call = first.output[0]
    assert (call.name, call.status) == ("weather", "completed")  # type: ignore[union-attr]
    assert (first.instructions, first.metadata) == ("Answer in French.", {"ticket": "42"})
    assert [t.name for t in first.tools] == ["weather"]  # type: ignore[union-attr]
    again = client.responses.retrieve(first.id)
    assert again.metadata == {"ticket": "42"}  # stored and returned
    output: Any = [{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]  # type: ignore[union-attr]
    second = client.responses.create(
        model="helper", previous_response_id=first.id, input=output, tools=[WEATHER_TOOL]
    )
    assert second.output_text == "weather returned sunny"
    assert second.conversation.id == first.conversation.id  # type: ignore[union-attr]
    assert second.previous_response_id == first.id
    chained = client.responses.create(model="helper", previous_response_id=second.id, input="and?")
    assert chained.output_text == "echo #2: and?"  # the history carried on
    with pytest.raises(openai.BadRequestError) as info:  # an older response: would branch
        client.responses.create(model="helper", previous_response_id=first.id, input="x")
    assert info.value.body["param"] == "previous_response_id"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):  # another user's response does not exist
        door.client("bob").responses.create(
            model="helper", previous_response_id=chained.id, input="x"
        )
    # Streamed, the call arrives as a whole function_call item and the response ends.
    with client.responses.create(
        model="helper", input=ASK_WEATHER, tools=[WEATHER_TOOL], stream=True
    ) as stream:
        events = list(stream)
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    assert added == ["function_call"]
    assert events[-1].type == "response.completed"


def test_stateless_responses_take_a_client_tool_round_trip_as_input(door: Door) -> None:
    client = door.client()
    stored = _store(door.store, lambda s: s.count())
    first = client.responses.create(
        model="helper", input=ASK_WEATHER, tools=[WEATHER_TOOL], store=False
    )
    call = first.output[0]
    context: Any = [
        {"role": "user", "content": ASK_WEATHER},
        call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "rain"},  # type: ignore[union-attr]
    ]
    second = client.responses.create(
        model="helper", input=context, tools=[WEATHER_TOOL], store=False
    )
    assert second.output_text == "weather returned rain"
    server = client.responses.create(model="helper", input="what is 2 + 3?", store=False)
    replayed: Any = [
        {"role": "user", "content": "what is 2 + 3?"},
        *[o.model_dump(exclude_none=True) for o in server.output],
        {"role": "user", "content": "thanks"},
    ]
    third = client.responses.create(model="helper", input=replayed, store=False)
    assert third.output_text == "echo #2: thanks"  # mcp_call items read back as context
    assert _store(door.store, lambda s: s.count()) == stored


def test_the_agents_sdk_runs_a_function_tool_round_trip_through_the_door(door: Door) -> None:
    """The OpenAI Agents SDK's Runner against the door: a ``@function_tool`` the model
    calls is run by the SDK and the turn continues — by conversation, by
    ``previous_response_id``, and stateless (the SDK sends the history itself)."""
    from agents import Agent as SdkAgent
    from agents import OpenAIResponsesModel, RunConfig, Runner, function_tool

    ran: list[str] = []

    @function_tool
    def weather(city: str) -> str:
        """The weather in a city."""
        ran.append(city)
        return f"sunny in {city}"

    async def go() -> list[str]:
        client = openai.AsyncOpenAI(
            base_url=f"{door.url}/v1", api_key=door.keys["alice"], max_retries=0
        )
        model = OpenAIResponsesModel(model="helper", openai_client=client)
        agent = SdkAgent(name="a", instructions="Be helpful.", model=model, tools=[weather])
        config = RunConfig(tracing_disabled=True)
        conv = await client.conversations.create()
        out = []
        first = await Runner.run(agent, ASK_WEATHER, conversation_id=conv.id, run_config=config)
        out.append(str(first.final_output))
        chained = await Runner.run(
            agent, ASK_WEATHER, previous_response_id=first.last_response_id, run_config=config
        )
        out.append(str(chained.final_output))
        stateless = await Runner.run(agent, ASK_WEATHER, run_config=config)
        out.append(str(stateless.final_output))
        return out

    finals = asyncio.run(go())
    assert finals == ["weather returned sunny in Paris"] * 3
    assert ran == ["Paris"] * 3


def test_langchain_bind_tools_completes_a_tool_round_trip(door: Door) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def weather(city: str) -> str:
        """The weather in a city."""
        return f"windy in {city}"

    for responses_api in (False, True):
        llm = door.langchain(responses_api=responses_api).bind_tools([weather])
        history: list[Any] = [HumanMessage(ASK_WEATHER)]
        asked = llm.invoke(history)
        (call,) = asked.tool_calls  # type: ignore[attr-defined]
        assert (call["name"], call["args"]) == ("weather", {"city": "Paris"})
        history += [asked, ToolMessage(weather.invoke(call["args"]), tool_call_id=call["id"])]
        answer = llm.invoke(history)
        assert answer.text == "weather returned windy in Paris"


def test_conversation_items_are_created_read_and_deleted_as_tombstones(door: Door) -> None:
    """items.create appends with no model call; retrieve reads one; delete hides it
    (kept in the store for audit, never shown to the model or listed again);
    conversations.create(items=...) starts a conversation with them."""
    client = door.client()
    conv = client.conversations.create(
        items=[
            {"type": "message", "role": "user", "content": "my name is Ada"},
            {"type": "message", "role": "assistant", "content": "noted"},
        ],
        extra_body={"agent": "helper"},
    )
    added = client.conversations.items.create(
        conv.id,
        items=[
            {"type": "message", "role": "user", "content": "secret: 1234"},
            {"type": "message", "role": "assistant", "content": "ok"},
        ],
    )
    assert [i.type for i in added.data] == ["message", "message"]
    secret = added.data[0]
    got = client.conversations.items.retrieve(secret.id, conversation_id=conv.id)
    assert got.content[0].text == "secret: 1234"  # type: ignore[union-attr]
    answer = client.responses.create(model="helper", conversation=conv.id, input="hello")
    assert answer.output_text == "echo #3: hello"  # two user messages came before it
    client.conversations.items.delete(secret.id, conversation_id=conv.id)
    listed = [i.id for i in client.conversations.items.list(conv.id, order="asc", limit=100).data]
    assert secret.id not in listed
    assert len(listed) == 5
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.retrieve(secret.id, conversation_id=conv.id)
    after = client.responses.create(model="helper", conversation=conv.id, input="again")
    assert after.output_text == "echo #3: again"  # the model no longer sees the deleted one
    stored = door.rt.conversation(conv.id, agent="helper").history()
    kept = [m for m in stored if m.hidden]
    assert [m.content for m in kept] == ["secret: 1234"]  # the record stays, marked
    with pytest.raises(openai.NotFoundError):  # another user's items do not exist
        door.client("bob").conversations.items.retrieve(listed[0], conversation_id=conv.id)
    with pytest.raises(openai.BadRequestError) as info:
        client.conversations.items.create(conv.id, items=[])
    assert info.value.body["param"] == "items"  # type: ignore[index]


def test_a_response_is_deleted_and_its_input_items_listed(door: Door) -> None:
    client = door.client()
    context: Any = [
        {"role": "user", "content": "earlier"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "now"},
    ]
    response = client.responses.create(model="helper", input=context)
    listed = client.responses.input_items.list(response.id, order="asc")
    assert [i.content[0].text for i in listed.data] == ["earlier", "ok", "now"]  # type: ignore[union-attr]
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(response.id)
    conversation = response.conversation.id  # type: ignore[union-attr]
    assert client.conversations.items.list(conversation).data == []  # every message hidden


def test_the_agents_sdk_conversations_session_carries_history(door: Door) -> None:
    """The Agents SDK's ``OpenAIConversationsSession`` keeps the history in a door
    conversation (items create and list); two runs, the second sees the first."""
    from agents import Agent as SdkAgent
    from agents import OpenAIConversationsSession, OpenAIResponsesModel, RunConfig, Runner

    async def go() -> tuple[str, str, int]:
        client = openai.AsyncOpenAI(
            base_url=f"{door.url}/v1", api_key=door.keys["alice"], max_retries=0
        )
        conv = await client.conversations.create(extra_body={"agent": "helper"})
        session = OpenAIConversationsSession(conversation_id=conv.id, openai_client=client)
        model = OpenAIResponsesModel(model="helper", openai_client=client)
        agent = SdkAgent(name="a", model=model)
        config = RunConfig(tracing_disabled=True)
        first = await Runner.run(agent, "hello", session=session, run_config=config)
        second = await Runner.run(agent, "again", session=session, run_config=config)
        items = await session.get_items()
        return str(first.final_output), str(second.final_output), len(items)

    first, second, kept = asyncio.run(go())
    assert first == "echo #1: hello"
    assert second == "echo #2: again"  # the first run's messages were its context
    assert kept == 4


@pytest.mark.slow
def test_the_openapi_document_describes_the_door_and_schemathesis_finds_nothing(
    door: Door, tmp_path: Path
) -> None:
    """``/openapi.json`` (3.1) and ``/docs`` are served; schemathesis runs every check
    over the document for a bounded number of examples per operation: no 5xx, no answer
    that breaks the document."""
    import subprocess
    import sys

    status, _, document = door.raw("GET", "/openapi.json", who=None)
    assert status == 200
    assert document["openapi"] == "3.1.0"
    assert document["paths"]["/v1/responses"]["post"]["requestBody"]
    assert door.raw("GET", "/docs", who=None)[0] == 200
    # The run reads the document as served, but for the slow agent (3 s an answer) left
    # out of the models it may choose: it would only make the run slower.
    for schema in document["paths"].values():
        for operation in schema.values():
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            model = (body or {}).get("schema", {}).get("properties", {}).get("model")
            if model is not None:
                model["enum"] = ["helper"]
    served = tmp_path / "openapi.json"
    served.write_text(json.dumps(document))
    st = str(Path(sys.executable).with_name("st"))
    # A body over the door's size limit is refused with 413, a rejection schemathesis does
    # not count by default: a generated invalid body that long must not read as accepted.
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        "[checks.negative_data_rejection]\n"
        "expected-statuses = ['400', '401', '403', '404', '405', '406', '409', '413', '415',"
        " '422', '428', '429', '5xx']\n"  # schemathesis's own list, and 413
    )
    common = [
        "--url",
        door.url,
        "--max-examples",
        os.environ.get("OVERSTORY_SCHEMATHESIS_EXAMPLES", "4"),  # more: a longer run
        "--workers",
        "1",
        "--phases",
        "examples,coverage,fuzzing",
        "-H",
        f"Authorization: Bearer {door.keys['alice']}",
        "--no-color",
    ]
    # Every check on every operation but creating a response; that one without the two
    # checks of which bodies are taken: the document gives its input in the common form
    # (a text, one user message) while the door takes a whole history, and it cannot say
    # that tool names must differ (docs/guides/compatibility.md).
    # The two runs at once: each mostly waits on the door.
    runs = []
    for i, checks in enumerate(
        (
            ["--checks", "all", "--exclude-path-regex", "^/v1/responses$"],
            [
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance,negative_data_rejection",
                "--include-path-regex",
                "^/v1/responses$",
            ],
        )
    ):
        where = tmp_path / f"run{i}"  # its cache (.schemathesis/) goes there, not the tree
        where.mkdir()
        runs.append(
            subprocess.Popen(
                [st, "--config-file", str(config), "run", str(served), *checks, *common],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=where,
            )
        )
    for run in runs:
        out, _ = run.communicate(timeout=600)
        assert run.returncode == 0, out[out.find("FAILURES") :][:5000]
        assert " generated" in out
        print(out[out.rfind("Test cases:") :][:120])  # the run's size


def test_tls_is_refused_by_name_where_serve_cannot_give_it(door: Door, tmp_path: Path) -> None:
    """Serve's HTTP settings are the cluster's: asking a cluster whose Serve runs plain
    HTTP (or runs the HAProxy ingress, which cannot terminate TLS) for HTTPS is refused,
    naming why, and the door already deployed keeps serving."""
    from tls_certs import make_certificates

    from overstory._ray import serve_haproxy_ingress
    from overstory.exceptions import ConfigError
    from overstory.gateway.serve import Tls, serve_http

    certs = make_certificates(tmp_path)
    host, port = door.url.removeprefix("http://").rsplit(":", 1)
    tls = Tls(str(certs["cert"]), str(certs["key"]))
    why = "HAProxy ingress" if serve_haproxy_ingress() else "already serves plain HTTP"
    with pytest.raises(ConfigError, match=why):
        serve_http("t-unused", door.store, host, int(port), tls=tls)
    assert door.raw("GET", "/healthz", who=None)[0] == 200


def test_the_per_key_rate_holds_across_two_replicas(door: Door) -> None:
    """Two replicas of the door behind Serve's balancer refuse a key at the count one
    replica would: the windows are the cluster's (one rates actor), not each replica's."""
    from concurrent.futures import ThreadPoolExecutor

    import ray
    from ray import serve

    from overstory.gateway.rates import rates_actor
    from overstory.gateway.serve import GatewayDeployment

    namespace = door.rt.config.namespace
    limit, window = 40, 30.0
    deployment: Any = GatewayDeployment.options(num_replicas=2, name="rates-door")
    limits = {"requests_per_minute": limit, "rate_window_s": window}
    serve.run(
        deployment.bind(namespace, door.store, limits, None),
        name="rates-door",
        route_prefix="/two",
        blocking=False,
    )
    secret, _ = _store(door.store, lambda s: create_key(s, "rita"))
    warm, _ = _store(door.store, lambda s: create_key(s, "rita"))  # another key: own window

    def ask(key: str) -> int:
        request = urllib.request.Request(
            f"{door.url}/two/v1/models", headers={"authorization": f"Bearer {key}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as e:
            return e.code

    try:
        deadline = time.monotonic() + 120
        while serve.status().applications["rates-door"].status != "RUNNING":
            assert time.monotonic() < deadline, "the two-replica door did not come up"
            time.sleep(0.5)
        counter = rates_actor(namespace)
        first = ray.get(counter.status.remote())["requests_by_replica"]
        with ThreadPoolExecutor(16) as pool:
            # Until the balancer routes to both replicas (each has counted a request).
            while True:
                list(pool.map(ask, [warm] * 4))
                seen = ray.get(counter.status.remote())["requests_by_replica"]
                if sum(n > first.get(r, 0) for r, n in seen.items()) == 2:
                    break
                assert time.monotonic() < deadline, f"one replica took every request: {seen}"
                time.sleep(0.5)
            before = seen
            started = time.monotonic()
            answers = list(pool.map(ask, [secret] * (3 * limit)))
        took = time.monotonic() - started
        after = ray.get(counter.status.remote())["requests_by_replica"]
    finally:
        serve.delete("rates-door")
    assert took < window, f"the burst took {took:.1f} s, longer than the window"
    assert sorted(set(answers)) == [200, 429]
    assert answers.count(200) == limit  # exactly: one window for the cluster
    asked = {r: n - before.get(r, 0) for r, n in after.items() if n > before.get(r, 0)}
    assert len(asked) == 2, asked  # both replicas took some of the burst
    assert sum(asked.values()) == 3 * limit
