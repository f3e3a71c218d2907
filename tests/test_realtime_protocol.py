"""The /chat Socket.IO protocol end to end (CONTRACT.md section 3), under eventlet and gevent.

Connecting (every credential form and every refusal code), the ``message`` rules and the
ORDER in which they are checked, client_message_id idempotency, message strings, typing,
stop_generation, chat deletion, secret key rotation, and that none of it hurts the server.

Strings that a real server would not hand out (expired, cross-chat, cross-user, cross-tenant,
cross-connection) are forged with the test server's SECRET_KEY, so nothing here sleeps for a
time-to-live to pass.
"""
from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import urlencode

import pytest
import requests
from itsdangerous import URLSafeSerializer

from app.tokens import CONNECTION_SALT, MESSAGE_SALT
from tests.kit.rest import Tenant, new_tenant
from tests.kit.servers import start_server, stop_server
from tests.kit.sio import NAMESPACE, ChatClient, connect, refusal_code
from tests.kit.wait import wait_until

pytestmark = pytest.mark.e2e

SECRET = "live-secret"  # conftest.server_env's SECRET_KEY
REFUSAL_CODES = {"invalid_connection_string", "connection_string_expired", "invalid_api_key",
                 "chat_not_found", "forbidden", "too_many_connections", "validation_error"}


# --- helpers -------------------------------------------------------------------------------

def forge(salt: str, payload: dict[str, Any], secret: str = SECRET) -> str:
    """A string signed the way app/tokens.py signs, with any payload we like."""
    return URLSafeSerializer([secret], salt=salt).dumps(payload)


def forge_connection_string(tenant_id: str, user_id: str, chat_id: str, *,
                            exp: float | None = None, secret: str = SECRET) -> str:
    return forge(CONNECTION_SALT, {"t": tenant_id, "u": user_id, "c": chat_id,
                                   "exp": time.time() + 300 if exp is None else exp}, secret)


def forge_message_string(tenant_id: str, user_id: str, chat_id: str, sid: str, *,
                         exp: float | None = None, secret: str = SECRET) -> str:
    return forge(MESSAGE_SALT, {"t": tenant_id, "u": user_id, "c": chat_id, "s": sid,
                                "j": uuid.uuid4().hex[:16],
                                "exp": time.time() + 60 if exp is None else exp}, secret)


def string_auth(tenant: Tenant, chat_id: str, user_id: str = "ann") -> dict[str, str]:
    return {"chat_id": chat_id, "connection_string": tenant.connection_string(chat_id, user_id)}


def received_ids(client: ChatClient) -> list[str]:
    return [m["id"] for m in client.named("message_received")]


def wait_for_message(client: ChatClient, message_id: str) -> None:
    client.wait_event("message_received", lambda m: m["id"] == message_id, 10)


def fresh_string(client: ChatClient) -> str:
    ack = client.call("get_message_string")
    assert isinstance(ack, dict) and ack.get("message_string"), ack
    return ack["message_string"]


def send_ok(client: ChatClient, content: str, message_string: str | None = None,
            **extra: Any) -> dict:
    ack = client.send(content, message_string or fresh_string(client), **extra)
    assert isinstance(ack, dict) and ack.get("ok") is True, ack
    assert isinstance(ack.get("next_message_string"), str) and ack["next_message_string"], ack
    return ack


def sync(observer: ChatClient) -> None:
    """Return once everything the server sent ``observer`` before now has arrived.

    The observer posts a message and waits for its broadcast: anything emitted to it earlier
    is ahead of that broadcast on its connection.
    """
    wait_for_message(observer, send_ok(observer, "sync")["message"]["id"])


def established(client: ChatClient) -> dict:
    assert client.connect_error is None, client.connect_error
    assert client.sio.connected
    return client.wait_for("connection_established")[0]


def assert_refused(client: ChatClient, code: str) -> None:
    """A refused connection: python-socketio's connect_error {message, data: {code, message}}."""
    assert code in REFUSAL_CODES, code
    error = client.connect_error
    assert error is not None, f"expected refusal {code!r}, but connected: {client.names()}"
    assert refusal_code(client) == code, error
    assert isinstance(error, dict), error
    text = error.get("message")
    assert isinstance(text, str) and text.strip(), error
    assert text != code and " " in text.strip(), f"not human-readable: {text!r}"
    assert error.get("data") == {"code": code, "message": text}, error
    assert not client.sio.connected
    assert "connection_established" not in client.names()


def assert_failed(client: ChatClient, ack: Any, code: str) -> dict:
    """A failed ack {ok: false, error: {code, message, details}}, and the same body as an
    ``error`` event to the sender."""
    assert isinstance(ack, dict), ack
    assert set(ack) == {"ok", "error"} and ack["ok"] is False, ack
    body = ack["error"]
    assert set(body) == {"code", "message", "details"}, body
    assert body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"].strip(), body
    assert isinstance(body["details"], dict), body
    expected = getattr(client, "expected_errors", [])
    expected.append(body)
    client.expected_errors = expected
    # Each event is handled on its own client thread, so compare regardless of order.
    got = client.wait_for("error", len(expected))
    canon = sorted(json.dumps(e, sort_keys=True) for e in got)
    assert canon == sorted(json.dumps(e, sort_keys=True) for e in expected), (got, expected)
    return body


def fail(client: ChatClient, payload: Any, code: str) -> dict:
    return assert_failed(client, client.call("message", payload), code)


def watch_disconnect(client: ChatClient) -> None:
    """Record the server-side disconnect of /chat as an event called 'disconnect'."""
    client.sio.on("disconnect", lambda *args: client._record("disconnect"), namespace=NAMESPACE)


def wait_disconnected(client: ChatClient, timeout: float = 10) -> None:
    client.wait_for("disconnect", timeout=timeout)
    client.wait_disconnected(timeout)  # set just after the handler ran


def disconnect_all(clients: list[ChatClient]) -> None:
    for client in clients:
        try:
            client.disconnect()
        except Exception:  # a client the server already dropped
            pass


def extra_server_env(rt_server) -> dict[str, str]:
    """Environment for a server a test starts itself: the same async mode as ``rt_server``.

    A short GRACEFUL_TIMEOUT only bounds how long stopping it may take (an eventlet worker
    sometimes waits out the whole grace period); shutdown is not what these tests are about.
    """
    return {"ASYNC_MODE": rt_server.env["ASYNC_MODE"], "GRACEFUL_TIMEOUT": "5"}


@pytest.fixture
def sockets():
    """Opens clients and always disconnects them at the end of the test."""
    opened: list[ChatClient] = []

    def open_(url: str, auth: Any = None, transport: str = "websocket",
              query: str = "") -> ChatClient:
        client = connect(url, auth, transport, query)
        opened.append(client)
        return client

    try:
        yield open_
    finally:
        disconnect_all(opened)


@pytest.fixture
def room(rt_server, sockets):
    """A chat of a fresh tenant with owner ann and member bob both connected."""
    tenant = new_tenant(rt_server.url)
    ws = tenant.workspace("ann", members=("bob",))
    chat = tenant.chat("ann", ws)
    ann = sockets(rt_server.url, tenant.key_auth(chat, "ann"))
    bob = sockets(rt_server.url, string_auth(tenant, chat, "bob"), "polling")
    established(ann)
    established(bob)
    return tenant, ws, chat, ann, bob


def iso(text: str) -> datetime:
    assert text.endswith("Z"), text
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


# --- connecting ----------------------------------------------------------------------------

@pytest.mark.parametrize("who", ["owner", "member"])
def test_connect_with_api_key_and_user_id_as_owner_or_member(rt_server, sockets, who):
    tenant = new_tenant(rt_server.url)
    ws = tenant.workspace("ann", members=("bob",))
    chat = tenant.chat("ann", ws)
    user = "ann" if who == "owner" else "bob"
    client = sockets(rt_server.url, {"chat_id": chat, "api_key": tenant.key, "user_id": user})
    info = established(client)
    assert client.names()[:2] == ["user_created", "connection_established"]
    assert client.named("user_created") == [{"user_id": user}]
    assert info["chat_id"] == chat and info["user_id"] == user
    assert info["sid"] and info["message_string"]
    ack = send_ok(client, f"hello from the {who}", info["message_string"])
    assert ack["message"]["user_id"] == user and ack["message"]["chat_id"] == chat


@pytest.mark.parametrize("credential", ["api_key", "connection_string"])
@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_connect_with_credentials_as_query_parameters_instead_of_auth_payload(
        rt_server, sockets, credential, transport):
    tenant = new_tenant(rt_server.url)
    chat = tenant.chat("ann")
    fields = tenant.key_auth(chat) if credential == "api_key" else string_auth(tenant, chat)
    client = sockets(rt_server.url, None, transport, query=urlencode(fields))
    info = established(client)
    assert info["chat_id"] == chat and info["user_id"] == "ann"
    send_ok(client, "sent over a query-string connection", info["message_string"])
    if credential == "connection_string":  # the query's string was issued for another chat
        refused = sockets(rt_server.url, None, transport,
                          query=urlencode({**fields, "chat_id": tenant.chat("ann")}))
        assert_refused(refused, "invalid_connection_string")
    else:  # the query's API key is checked like an auth payload's
        refused = sockets(rt_server.url, None, transport,
                          query=urlencode({**fields, "api_key": "wrong-key"}))
        assert_refused(refused, "invalid_api_key")


# --- refusals ------------------------------------------------------------------------------

def _tamper_signature(token: str) -> str:
    payload, signature = token.rsplit(".", 1)
    return f"{payload}.{'B' if signature[0] == 'A' else 'A'}{signature[1:]}"


def _tamper_payload(token: str) -> str:
    payload, signature = token.rsplit(".", 1)
    return f"{'B' if payload[0] == 'A' else 'A'}{payload[1:]}.{signature}"


INVALID_CONNECTION_STRINGS: dict[str, Callable[[Tenant, str, str], str]] = {
    "garbage": lambda tenant, chat, other: "not-a-connection-string",
    "tampered_signature": lambda tenant, chat, other: _tamper_signature(
        tenant.connection_string(chat)),
    "tampered_payload": lambda tenant, chat, other: _tamper_payload(
        tenant.connection_string(chat)),
    "issued_for_another_chat": lambda tenant, chat, other: tenant.connection_string(other),
    "signed_with_another_secret": lambda tenant, chat, other: forge_connection_string(
        tenant.id, "ann", chat, secret="not-the-server-secret"),
    "a_message_string_instead": lambda tenant, chat, other: forge_message_string(
        tenant.id, "ann", chat, "some-sid"),
    "unknown_tenant": lambda tenant, chat, other: forge_connection_string(
        "no-such-tenant", "ann", chat),
}


@pytest.mark.parametrize("case", list(INVALID_CONNECTION_STRINGS))
def test_refused_invalid_connection_string(rt_server, sockets, case):
    tenant = new_tenant(rt_server.url)
    chat, other = tenant.chat("ann"), tenant.chat("ann")
    token = INVALID_CONNECTION_STRINGS[case](tenant, chat, other)
    client = sockets(rt_server.url, {"chat_id": chat, "connection_string": token})
    assert_refused(client, "invalid_connection_string")


def test_refused_connection_string_expired(rt_server, sockets):
    tenant = new_tenant(rt_server.url)
    chat = tenant.chat("ann")
    expired = forge_connection_string(tenant.id, "ann", chat, exp=time.time() - 5)
    assert_refused(sockets(rt_server.url, {"chat_id": chat, "connection_string": expired}),
                   "connection_string_expired")
    # The same claims, unexpired, are accepted: only the expiry was wrong.
    fine = forge_connection_string(tenant.id, "ann", chat)
    established(sockets(rt_server.url, {"chat_id": chat, "connection_string": fine}))


def test_refused_invalid_api_key(rt_server, sockets):
    tenant = new_tenant(rt_server.url)
    chat = tenant.chat("ann")
    for key in ("wrong-key", tenant.key + "x"):
        client = sockets(rt_server.url, {"chat_id": chat, "api_key": key, "user_id": "ann"})
        assert_refused(client, "invalid_api_key")


def test_refused_chat_not_found_for_unknown_chat_and_another_tenants_chat(rt_server, sockets):
    acme = new_tenant(rt_server.url)
    globex = new_tenant(rt_server.url, "Globex")
    acme.chat("ann")
    globex_chat = globex.chat("ann")
    assert_refused(sockets(rt_server.url, acme.key_auth("no-such-chat")), "chat_not_found")
    # Another tenant's chat is invisible through this tenant's API key...
    assert_refused(sockets(rt_server.url, acme.key_auth(globex_chat)), "chat_not_found")
    # ...and through a (forged) string of this tenant naming it.
    forged = forge_connection_string(acme.id, "ann", globex_chat)
    assert_refused(sockets(rt_server.url, {"chat_id": globex_chat, "connection_string": forged}),
                   "chat_not_found")
    forged = forge_connection_string(acme.id, "ann", "no-such-chat")
    assert_refused(sockets(rt_server.url, {"chat_id": "no-such-chat",
                                           "connection_string": forged}), "chat_not_found")


def test_refused_forbidden_for_user_neither_owner_nor_member(rt_server, sockets):
    tenant = new_tenant(rt_server.url)
    ws = tenant.workspace("ann", members=("bob",))
    chat = tenant.chat("ann", ws)
    tenant.chat("mallory")  # mallory exists in the tenant, in her own workspace
    for user in ("mallory", "never-seen-before"):
        assert_refused(sockets(rt_server.url, tenant.key_auth(chat, user)), "forbidden")
        forged = forge_connection_string(tenant.id, user, chat)
        assert_refused(sockets(rt_server.url, {"chat_id": chat, "connection_string": forged}),
                       "forbidden")
    r = requests.post(f"{rt_server.url}/api/v1/chats/{chat}/connection-string",
                      json={"user_id": "mallory"}, headers=tenant.headers, timeout=10)
    assert r.status_code == 403, r.text


def test_refused_forbidden_for_member_removed_after_the_string_was_issued(rt_server, sockets):
    tenant = new_tenant(rt_server.url)
    ws = tenant.workspace("ann", members=("bob",))
    chat = tenant.chat("ann", ws)
    issued = tenant.connection_string(chat, "bob")
    r = requests.delete(f"{rt_server.url}/api/v1/workspaces/{ws}/members/bob",
                        headers=tenant.headers, timeout=10)
    assert r.status_code == 204, r.text
    assert_refused(sockets(rt_server.url, {"chat_id": chat, "connection_string": issued}),
                   "forbidden")
    assert_refused(sockets(rt_server.url, tenant.key_auth(chat, "bob")), "forbidden")
    established(sockets(rt_server.url, tenant.key_auth(chat, "ann")))


VALIDATION_REFUSALS: dict[str, Callable[[Tenant, str], Any]] = {
    "missing_chat_id": lambda tenant, chat: {"api_key": tenant.key, "user_id": "ann"},
    "missing_chat_id_with_connection_string": lambda tenant, chat: {
        "connection_string": tenant.connection_string(chat)},
    "missing_credential": lambda tenant, chat: {"chat_id": chat},
    "api_key_without_user_id": lambda tenant, chat: {"chat_id": chat, "api_key": tenant.key},
    "user_id_without_api_key": lambda tenant, chat: {"chat_id": chat, "user_id": "ann"},
    "empty_auth_object": lambda tenant, chat: {},
    "auth_is_a_list": lambda tenant, chat: [chat, tenant.key, "ann"],
    "auth_is_a_string": lambda tenant, chat: "chat_id=" + chat,
    "auth_is_a_number": lambda tenant, chat: 42,
    "chat_id_not_a_string": lambda tenant, chat: {"chat_id": 12345, "api_key": tenant.key,
                                                  "user_id": "ann"},
    "invalid_user_id": lambda tenant, chat: {"chat_id": chat, "api_key": tenant.key,
                                             "user_id": "ann smith/<script>"},
    "last_message_id_not_an_id": lambda tenant, chat: {
        "chat_id": chat, "api_key": tenant.key, "user_id": "ann", "last_message_id": "abc"},
}


@pytest.mark.parametrize("case", list(VALIDATION_REFUSALS))
def test_refused_validation_error_for_malformed_connect(rt_server, sockets, case):
    tenant = new_tenant(rt_server.url)
    chat = tenant.chat("ann")
    client = sockets(rt_server.url, VALIDATION_REFUSALS[case](tenant, chat))
    assert_refused(client, "validation_error")


def test_refused_too_many_connections_per_tenant_and_freed_on_disconnect(rt_server, tmp_path):
    server = start_server(tmp_path, MAX_CONNECTIONS_PER_TENANT="3", **extra_server_env(rt_server))
    opened: list[ChatClient] = []

    def sockets(url: str, auth: Any, transport: str = "websocket") -> ChatClient:
        client = connect(url, auth, transport)
        opened.append(client)
        return client

    try:
        acme = new_tenant(server.url)
        globex = new_tenant(server.url, "Globex")
        chat1, chat2 = acme.chat("ann"), acme.chat("ann")
        held = [sockets(server.url, acme.key_auth(chat1)),
                sockets(server.url, string_auth(acme, chat1), "polling"),
                sockets(server.url, acme.key_auth(chat2))]
        for client in held:
            established(client)
        # The 4th of the tenant is refused, whatever the chat or credential.
        assert_refused(sockets(server.url, acme.key_auth(chat2)), "too_many_connections")
        assert_refused(sockets(server.url, string_auth(acme, chat1)), "too_many_connections")
        # Another tenant is unaffected.
        other_chat = globex.chat("gus")
        for _ in range(3):
            established(sockets(server.url, globex.key_auth(other_chat, "gus")))
        # Refusals did not count: one disconnect frees exactly one place.
        held[0].disconnect()
        def freed() -> ChatClient | None:
            client = sockets(server.url, acme.key_auth(chat2))
            if client.connect_error is None:
                return client
            assert refusal_code(client) == "too_many_connections", client.connect_error
            return None

        # the server processes the disconnect asynchronously: retry, bounded
        established(wait_until(freed, 15, "the disconnect to free a place"))
        assert_refused(sockets(server.url, acme.key_auth(chat1)), "too_many_connections")
        assert server.process.poll() is None
        assert "Traceback" not in server.log()
    finally:
        disconnect_all(opened)
        stop_server(server.process)


# --- message: each error code --------------------------------------------------------------

VALIDATION_PAYLOADS: dict[str, Any] = {
    "missing_content": {},
    "content_none": {"content": None},
    "content_a_number": {"content": 42},
    "content_a_list": {"content": ["hello"]},
    "content_an_object": {"content": {"text": "hello"}},
    "content_empty": {"content": ""},
    "content_whitespace_only": {"content": " \t\n  \r\n "},
    "content_4001_after_trimming": {"content": "  " + "x" * 4001 + "\n"},
    "content_4001_plain": {"content": "y" * 4001},
    "payload_a_string": "hello",
    "payload_a_list": ["hello"],
    "payload_a_number": 7,
}


@pytest.mark.parametrize("case", list(VALIDATION_PAYLOADS))
def test_message_validation_error_acked_and_emitted_to_sender_only(room, case):
    tenant, _, chat, ann, bob = room
    payload = VALIDATION_PAYLOADS[case]
    if isinstance(payload, dict):
        payload = {**payload, "message_string": ann.message_string}
    fail(ann, payload, "validation_error")
    sync(bob)
    assert bob.named("error") == []
    assert [m["content"] for m in tenant.history(chat)] == ["sync"]


def test_message_without_any_payload_is_a_validation_error(room):
    _, _, _, ann, _ = room
    ack = ann.sio.call("message", namespace=NAMESPACE, timeout=10)
    assert_failed(ann, ack, "validation_error")


def test_message_content_of_4000_chars_after_trimming_is_accepted(room):
    tenant, _, chat, ann, bob = room
    ack = send_ok(ann, "   " + "z" * 4000 + " \n", ann.message_string)
    assert ack["message"]["content"].strip() == "z" * 4000
    wait_for_message(bob, ack["message"]["id"])
    ack = send_ok(ann, "w" * 4000, ack["next_message_string"])
    assert ack["message"]["content"] == "w" * 4000
    assert [m["id"] for m in tenant.history(chat)] == [
        m["id"] for m in bob.named("message_received")]


def test_message_chat_mismatch_when_chat_id_is_not_the_connected_chat(room):
    tenant, _, chat, ann, bob = room
    other = tenant.chat("ann")
    fail(ann, {"content": "hi", "message_string": ann.message_string, "chat_id": other},
         "chat_mismatch")
    fail(ann, {"content": "hi", "message_string": fresh_string(ann),
               "chat_id": "no-such-chat"}, "chat_mismatch")
    # The connected chat's own id is fine, and the failed attempt did not spend the string.
    ack = send_ok(ann, "right chat", ann.message_string, chat_id=chat)
    assert ack["message"]["chat_id"] == chat
    sync(bob)
    assert bob.named("error") == []
    assert tenant.history(other) == []


def test_message_invalid_message_string_when_missing_or_not_genuine(room):
    tenant, _, chat, ann, bob = room
    sid = established(ann)["sid"]
    fail(ann, {"content": "hi"}, "invalid_message_string")
    for bad in ("", None, 123, ["x"], "garbage", _tamper_signature(ann.message_string),
                _tamper_payload(ann.message_string),
                forge_message_string(tenant.id, "ann", chat, sid, secret="wrong-secret"),
                tenant.connection_string(chat)):  # genuine, but another kind of string
        fail(ann, {"content": "hi", "message_string": bad}, "invalid_message_string")
    sync(bob)
    assert bob.named("error") == []
    assert [m["content"] for m in tenant.history(chat)] == ["sync"]
    send_ok(ann, "the original string was never spent", ann.message_string)


def test_message_invalid_message_string_when_issued_to_another_connection(room, rt_server,
                                                                          sockets):
    tenant, _, chat, ann, bob = room
    ann2 = sockets(rt_server.url, tenant.key_auth(chat, "ann"))  # same user, same chat
    other_chat = tenant.chat("ann")
    ann3 = sockets(rt_server.url, tenant.key_auth(other_chat, "ann"))  # same user, other chat
    sid = established(ann)["sid"]
    established(ann2)
    established(ann3)
    for stolen in (ann2.message_string, fresh_string(ann2), ann3.message_string,
                   bob.message_string,
                   forge_message_string(tenant.id, "ann", chat, "another-sid"),
                   forge_message_string(tenant.id, "bob", chat, sid),
                   forge_message_string(tenant.id, "ann", other_chat, sid),
                   forge_message_string("another-tenant", "ann", chat, sid)):
        fail(ann, {"content": "hi", "message_string": stolen}, "invalid_message_string")
    # Refusing them did not spend them: their own connections still can use them.
    send_ok(ann2, "mine", ann2.message_string)
    send_ok(ann3, "mine too", ann3.message_string)
    send_ok(bob, "and mine", bob.message_string)
    # A forged string that is right in every claim is accepted (the claims are what count).
    send_ok(ann, "forged but right", forge_message_string(tenant.id, "ann", chat, sid))
    assert ann2.named("error") == [] and ann3.named("error") == [] and bob.named("error") == []


def test_message_string_expired(room):
    tenant, _, chat, ann, bob = room
    sid = established(ann)["sid"]
    expired = forge_message_string(tenant.id, "ann", chat, sid, exp=time.time() - 1)
    fail(ann, {"content": "too late", "message_string": expired}, "message_string_expired")
    sync(bob)
    assert bob.named("error") == []
    assert [m["content"] for m in tenant.history(chat)] == ["sync"]


def test_message_string_reused(room):
    tenant, _, chat, ann, bob = room
    string = ann.message_string
    first = send_ok(ann, "once", string)
    fail(ann, {"content": "twice", "message_string": string}, "message_string_reused")
    # Also with a client_message_id: the string check comes before idempotency.
    send_ok(ann, "with id", first["next_message_string"], client_message_id="cm-1")
    fail(ann, {"content": "with id", "message_string": first["next_message_string"],
               "client_message_id": "cm-1"}, "message_string_reused")
    sync(bob)
    assert bob.named("error") == []
    assert [m["content"] for m in tenant.history(chat)] == ["once", "with id", "sync"]


def test_message_rate_limited_at_10_per_second_per_connection(room, rt_server, sockets):
    tenant, _, chat, ann, bob = room
    string, accepted, started = ann.message_string, 0, time.monotonic()
    attempts: list[float] = []
    ack = None
    for i in range(40):
        attempts.append(time.monotonic())
        ack = ann.send(f"burst {i}", string)
        if not ack.get("ok"):
            break
        accepted += 1
        string = ack["next_message_string"]
    body = assert_failed(ann, ack, "rate_limited")
    assert accepted >= 10, accepted
    if attempts[10] - started < 0.9:  # 11 messages within one second: the 11th is refused
        assert accepted == 10, accepted
    retry_after = body["details"].get("retry_after")
    assert isinstance(retry_after, (int, float)) and not isinstance(retry_after, bool), body
    assert 0 <= retry_after <= 1, body
    # The limit is per connection: the same user's other connection and bob may send.
    ann2 = sockets(rt_server.url, tenant.key_auth(chat, "ann"))
    send_ok(ann2, "another connection", ann2.message_string)
    send_ok(bob, "another user")
    # It ends: a bounded retry with fresh strings gets through.
    def got_through() -> bool:
        string = ann.call("get_message_string")  # its own window, as limited as messages
        if string.get("message_string") is None:
            assert_failed(ann, string, "rate_limited")
            return False
        ack = ann.send("after the burst", string["message_string"])
        if ack.get("ok"):
            return True
        assert_failed(ann, ack, "rate_limited")
        return False

    wait_until(got_through, 5, "the rate limit to end")
    assert bob.named("error") == []


# --- message: the order of the checks ------------------------------------------------------

def test_message_check_order_validation_before_everything_else(room):
    tenant, _, chat, ann, _ = room
    string = ann.message_string
    other = tenant.chat("ann")
    fail(ann, {"content": "", "message_string": "garbage"}, "validation_error")
    fail(ann, {"content": "   ", "chat_id": other, "message_string": "garbage"},
         "validation_error")
    fail(ann, {"content": 5, "chat_id": other}, "validation_error")
    fail(ann, {"content": "x" * 4001, "message_string": string}, "validation_error")
    # A validation failure did not look at (so did not spend) the message string.
    ack = send_ok(ann, "now valid", string)
    fail(ann, {"content": "", "message_string": string}, "validation_error")  # spent string
    fail(ann, {"content": "ok", "message_string": string}, "message_string_reused")
    assert ack["message"]["content"] == "now valid"


def test_message_check_order_chat_mismatch_before_message_string(room):
    tenant, _, chat, ann, _ = room
    other = tenant.chat("ann")
    used = ann.message_string
    ack = send_ok(ann, "spend it", used)
    sid = established(ann)["sid"]
    for string in (used,  # reused
                   None, "garbage",  # missing, not genuine
                   forge_message_string(tenant.id, "ann", chat, sid, exp=time.time() - 1)):
        payload = {"content": "hi", "chat_id": other}
        if string is not None:
            payload["message_string"] = string
        fail(ann, payload, "chat_mismatch")
    # A good string sent with a mismatched chat_id is not spent.
    fail(ann, {"content": "hi", "chat_id": other,
               "message_string": ack["next_message_string"]}, "chat_mismatch")
    send_ok(ann, "still good", ack["next_message_string"])


def test_message_check_order_within_the_message_string(room, rt_server, sockets):
    tenant, _, chat, ann, _ = room
    sid = established(ann)["sid"]
    # genuine before expiry: a forged, expired string signed with the wrong key is invalid
    fail(ann, {"content": "hi", "message_string": forge_message_string(
        tenant.id, "ann", chat, sid, exp=time.time() - 1, secret="wrong")},
        "invalid_message_string")
    # unexpired before "issued to this connection": an expired string of another connection
    fail(ann, {"content": "hi", "message_string": forge_message_string(
        tenant.id, "ann", chat, "another-sid", exp=time.time() - 1)}, "message_string_expired")
    # unused before "issued to this connection": a string spent by another connection
    ann2 = sockets(rt_server.url, tenant.key_auth(chat, "ann"))
    theirs = ann2.message_string
    send_ok(ann2, "spent by ann2", theirs)
    fail(ann, {"content": "hi", "message_string": theirs}, "message_string_reused")


def test_message_check_order_string_and_idempotency_before_rate_limit(room):
    tenant, _, chat, ann, bob = room
    sid = established(ann)["sid"]
    string, first = ann.message_string, None
    spent: list[str] = []
    for i in range(40):
        ack = ann.send(f"burst {i}", string, client_message_id=f"burst-{i}")
        if not ack.get("ok"):
            break
        first = first or ack["message"]
        spent.append(string)
        string = ack["next_message_string"]
    assert_failed(ann, ack, "rate_limited")
    # While rate limited, each earlier check still answers with its own code:
    fail(ann, {"content": "hi", "message_string": forge_message_string(
        tenant.id, "ann", chat, sid, exp=time.time() - 1)}, "message_string_expired")
    fail(ann, {"content": "hi", "message_string": spent[0]}, "message_string_reused")
    fail(ann, {"content": "hi", "message_string": "garbage"}, "invalid_message_string")
    fail(ann, {"content": "hi", "message_string": bob.message_string},
         "invalid_message_string")
    fail(ann, {"content": "", "message_string": fresh_string(ann)}, "validation_error")
    fail(ann, {"content": "hi", "chat_id": tenant.chat("ann"),
               "message_string": fresh_string(ann)}, "chat_mismatch")
    # A repeated client_message_id is answered before the rate check...
    again = ann.send("burst 0", fresh_string(ann), client_message_id="burst-0")
    assert again.get("ok") is True and again["message"] == first, again
    assert again["next_message_string"]
    # ...and the connection was still rate limited all along.
    assert_failed(ann, ann.send("new", fresh_string(ann)), "rate_limited")


# --- client_message_id idempotency ---------------------------------------------------------

def test_repeated_client_message_id_returns_original_and_stores_or_broadcasts_nothing(room):
    tenant, _, chat, ann, bob = room
    first = send_ok(ann, "only once", ann.message_string, client_message_id="cm-42")
    original = first["message"]
    wait_for_message(bob, original["id"])
    before = tenant.history(chat)
    for content in ("only once", "different words, same id"):
        again = send_ok(ann, content, fresh_string(ann), client_message_id="cm-42")
        assert again["message"] == original
        assert again["message"]["id"] == original["id"]
        assert again["next_message_string"] != first["next_message_string"]
    # The ack's next string works; the ack of the repeat included one too.
    after = send_ok(ann, "a new message", again["next_message_string"],
                    client_message_id="cm-43")
    assert after["message"]["id"] != original["id"]
    wait_for_message(bob, after["message"]["id"])
    wait_for_message(ann, after["message"]["id"])
    assert received_ids(bob) == [original["id"], after["message"]["id"]]
    assert received_ids(ann) == [original["id"], after["message"]["id"]]
    history = tenant.history(chat)
    assert len(before) == 1 and history[:1] == before and len(history) == 2
    assert history[0] == original


def test_client_message_id_is_scoped_to_the_chat(room, rt_server, sockets):
    tenant, _, chat, ann, _ = room
    other_chat = tenant.chat("ann")
    elsewhere = sockets(rt_server.url, tenant.key_auth(other_chat, "ann"))
    here = send_ok(ann, "here", ann.message_string, client_message_id="same-id")
    there = send_ok(elsewhere, "there", elsewhere.message_string, client_message_id="same-id")
    assert there["message"]["id"] != here["message"]["id"]
    assert there["message"]["chat_id"] == other_chat and there["message"]["content"] == "there"
    assert len(tenant.history(other_chat)) == 1


# --- message strings -----------------------------------------------------------------------

def test_get_message_string_ack_and_next_message_string_from_every_ack(room):
    tenant, _, chat, ann, bob = room
    before = datetime.now(timezone.utc)
    ack = ann.call("get_message_string")
    assert set(ack) == {"message_string", "expires_at"}, ack
    assert isinstance(ack["message_string"], str) and ack["message_string"]
    ttl = (iso(ack["expires_at"]) - before).total_seconds()
    assert 30 < ttl <= 61, ack  # MESSAGE_STRING_TTL default 60 s
    second = ann.call("get_message_string")
    assert second["message_string"] != ack["message_string"]
    # Each string stands alone: the newer one does not void the older one.
    seen = {ann.message_string, ack["message_string"], second["message_string"]}
    result = send_ok(ann, "with the second", second["message_string"])
    result = send_ok(ann, "with the first", ack["message_string"])
    for i in range(3):  # a chain of next_message_string
        assert result["next_message_string"] not in seen
        seen.add(result["next_message_string"])
        result = send_ok(ann, f"chained {i}", result["next_message_string"])
    send_ok(ann, "connection_established's string", ann.message_string)
    assert [m["content"] for m in tenant.history(chat)] == [
        "with the second", "with the first", "chained 0", "chained 1", "chained 2",
        "connection_established's string"]
    assert bob.named("error") == [] and ann.named("error") == []


# --- typing and stop_generation ------------------------------------------------------------

def test_typing_reaches_other_clients_not_the_sender(room):
    _, _, _, ann, bob = room
    ann.sio.emit("typing", {"is_typing": True}, namespace=NAMESPACE)
    assert bob.wait_for("typing")[0] == {"user_id": "ann", "is_typing": True}
    ann.sio.emit("typing", {"is_typing": False}, namespace=NAMESPACE)
    assert bob.wait_for("typing", 2)[1] == {"user_id": "ann", "is_typing": False}
    bob.sio.emit("typing", {"is_typing": True}, namespace=NAMESPACE)
    assert ann.wait_for("typing")[0] == {"user_id": "bob", "is_typing": True}
    sync(ann)
    sync(bob)
    assert ann.named("typing") == [{"user_id": "bob", "is_typing": True}]
    assert len(bob.named("typing")) == 2
    assert ann.named("error") == [] and bob.named("error") == []


@pytest.mark.parametrize("payload", [{}, {"is_typing": "yes"}, {"is_typing": 1},
                                     {"is_typing": None}, "typing", ["is_typing"], 1],
                         ids=["empty", "string", "number", "null", "payload_string",
                              "payload_list", "payload_number"])
def test_typing_with_bad_payload_emits_validation_error_to_sender(room, payload):
    _, _, _, ann, bob = room
    ann.sio.emit("typing", payload, namespace=NAMESPACE)
    body = ann.wait_for("error")[0]
    assert set(body) == {"code", "message", "details"}, body
    assert body["code"] == "validation_error" and body["message"].strip(), body
    assert isinstance(body["details"], dict)
    sync(bob)
    assert bob.named("typing") == [] and bob.named("error") == []


def test_stop_generation_with_nothing_streaming_answers_not_stopped(room):
    _, _, _, ann, bob = room
    assert ann.call("stop_generation") == {"ok": True, "stopped": False}
    assert bob.call("stop_generation", {}) == {"ok": True, "stopped": False}
    send_ok(ann, "still works", ann.message_string)


# --- chat deletion -------------------------------------------------------------------------

def test_deleting_a_chat_over_rest_tells_its_clients_then_disconnects_them(rt_server, sockets):
    tenant = new_tenant(rt_server.url)
    ws = tenant.workspace("ann", members=("bob",))
    doomed, kept = tenant.chat("ann", ws), tenant.chat("ann", ws)
    ann = sockets(rt_server.url, tenant.key_auth(doomed, "ann"))
    bob = sockets(rt_server.url, string_auth(tenant, doomed, "bob"), "polling")
    ann_elsewhere = sockets(rt_server.url, tenant.key_auth(kept, "ann"))
    bob_elsewhere = sockets(rt_server.url, string_auth(tenant, kept, "bob"), "polling")
    for client in (ann, bob, ann_elsewhere, bob_elsewhere):
        established(client)
        watch_disconnect(client)
    r = requests.delete(f"{rt_server.url}/api/v1/chats/{doomed}", headers=tenant.headers,
                        timeout=10)
    assert r.status_code == 204, r.text
    for client in (ann, bob):
        wait_disconnected(client)
        assert client.wait_for("chat_deleted", timeout=1) == [{"chat_id": doomed}]
        names = client.names()
        assert names.index("chat_deleted") < names.index("disconnect"), names
    # Clients of the other chat are unaffected.
    ack = send_ok(ann_elsewhere, "still here", ann_elsewhere.message_string)
    wait_for_message(bob_elsewhere, ack["message"]["id"])
    for client in (ann_elsewhere, bob_elsewhere):
        assert client.sio.connected
        assert "chat_deleted" not in client.names() and "disconnect" not in client.names()
    # The chat is gone for good.
    assert_refused(sockets(rt_server.url, tenant.key_auth(doomed, "ann")), "chat_not_found")
    r = requests.get(f"{rt_server.url}/api/v1/chats/{doomed}/messages", headers=tenant.headers,
                     timeout=10)
    assert r.status_code == 404, r.text


# --- key rotation --------------------------------------------------------------------------

def test_key_rotation_fallback_secret_accepts_old_connection_strings(rt_server, tmp_path):
    tenant = new_tenant(rt_server.url)
    chat = tenant.chat("ann")
    old_string = tenant.connection_string(chat)  # signed by SECRET_KEY=live-secret
    common = {**extra_server_env(rt_server), "DATABASE_URL": rt_server.env["DATABASE_URL"]}
    servers = []
    opened: list[ChatClient] = []

    def sockets(url: str, auth: Any) -> ChatClient:
        client = connect(url, auth)
        opened.append(client)
        return client

    try:
        rotated = start_server(tmp_path, SECRET_KEY="rotated-secret",
                               SECRET_KEY_FALLBACKS=f"ancient-secret, {SECRET}", **common)
        servers.append(rotated)
        replaced = start_server(tmp_path, SECRET_KEY="rotated-secret", **common)
        servers.append(replaced)

        client = sockets(rotated.url, {"chat_id": chat, "connection_string": old_string})
        info = established(client)
        send_ok(client, "after the rotation", info["message_string"])
        # The rotated server signs with its new key: the old-key-only server refuses that.
        new_string = Tenant(rotated.url, tenant.id, tenant.key).connection_string(chat)
        assert_refused(sockets(rt_server.url, {"chat_id": chat,
                                               "connection_string": new_string}),
                       "invalid_connection_string")
        established(sockets(replaced.url, {"chat_id": chat, "connection_string": new_string}))
        # Without the fallback, the old string is refused.
        assert_refused(sockets(replaced.url, {"chat_id": chat,
                                              "connection_string": old_string}),
                       "invalid_connection_string")
        for server in servers:
            assert "Traceback" not in server.log()
    finally:
        disconnect_all(opened)
        for server in servers:
            stop_server(server.process)


# --- the server after all of the above -----------------------------------------------------

def test_abuse_of_event_payloads_never_breaks_the_connection(room):
    tenant, _, chat, ann, bob = room
    weird = [
        {"content": "nul \x00 inside", "message_string": fresh_string(ann)},
        {"content": "ok", "message_string": fresh_string(ann), "client_message_id": 5},
        {"content": "ok", "message_string": fresh_string(ann), "client_message_id": ""},
        {"content": "ok", "message_string": fresh_string(ann), "client_message_id": "c" * 129},
        {"content": "ok", "message_string": fresh_string(ann), "chat_id": 12},
        {"content": "ok", "message_string": "x" * 100_000},
        {"content": "ok", "message_string": {"nested": ["object"]}},
        {"content": "x" * 200_000, "message_string": fresh_string(ann)},
    ]
    for payload in weird:
        ack = ann.call("message", payload)
        assert isinstance(ack, dict) and ack.get("ok") is False, ack
        assert ack["error"]["code"] in ("validation_error", "invalid_message_string"), ack
    ack = ann.sio.call("message", ("two", "arguments"), namespace=NAMESPACE, timeout=10)
    assert isinstance(ack, dict) and ack.get("ok") is False, ack
    for event in ("get_message_string", "stop_generation"):
        ann.sio.call(event, ["unexpected", "payload"], namespace=NAMESPACE, timeout=10)
    ann.sio.emit("no_such_event", {"x": 1}, namespace=NAMESPACE)
    ann.sio.emit("typing", namespace=NAMESPACE)
    send_ok(ann, "still alive")
    sync(bob)
    assert [m["content"] for m in tenant.history(chat)] == ["still alive", "sync"]


def test_server_still_alive_and_healthy_with_no_traceback_after_all_the_abuse(rt_server):
    assert rt_server.process.poll() is None
    r = requests.get(rt_server.url + "/healthz", timeout=10)
    assert r.status_code == 200, r.text
    log = rt_server.log()
    assert "Traceback" not in log, log[-5000:]
