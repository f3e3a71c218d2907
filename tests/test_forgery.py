"""Forged and borrowed credentials, and one tenant's reach into another's, against one real server.

What this module proves, over Socket.IO (/chat, auth payload and query parameters) and the
plain WebSocket endpoint /ws/chat alike:

- Connection strings that are tampered (a character of the payload or of the signature
  changed, truncated, extended, one string's payload under another's signature, claims
  rewritten under the old signature), signed with another secret or for another purpose,
  expired, presented for another chat, for another tenant's chat, or for a user who lost access
  since, are refused with the contract's code; a string decides who the client is, whatever
  else the client claims; a connection string is reusable within its time-to-live (by design).
- Message strings that are tampered, signed with another secret, expired, replayed, or belong to
  another connection, chat, user or tenant, or are connection strings, are refused with the
  contract's code, store nothing, and are not spent by the refusal.
- Tenant A's API key reaches nothing of tenant B's on any REST route the server exposes (the
  routes are read from the server itself, so a new route without an attack here fails the
  suite): 404 with a contract code, and B's data reads back identical. The admin API refuses
  tenant keys and wrong bearer tokens.
- No event or frame sent with A's credentials reaches B's chat: B's clients, connected all along,
  receive nothing caused by A, and A's clients receive none of B's traffic.

Strings a real server would never hand out (expired, rewritten claims) are minted here with the
live server's SECRET_KEY exactly as app/tokens.py mints them, so no test waits for a TTL.
"""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlencode

import pytest
import requests
from itsdangerous import URLSafeSerializer
from itsdangerous.encoding import base64_encode

from app.tokens import CONNECTION_SALT, MESSAGE_SALT
from tests import agents
from tests.kit.plain import RecordingPlainClient
from tests.kit.rest import Tenant, new_tenant
from tests.kit.servers import ADMIN_TOKEN, ROOT
from tests.kit.sio import NAMESPACE, ChatClient, connect, refusal_code

pytestmark = pytest.mark.e2e

SECRET = "live-secret"  # conftest.server_env's SECRET_KEY
# The rates and the per-tenant connection cap are not under test here; the attacks are many.
SERVER_ENV = {"RATE_LIMIT_REST": "100000/minute", "RATE_LIMIT_MESSAGES": "1000/second",
              "MAX_CONNECTIONS_PER_TENANT": "1000", "RATE_LIMIT_AUTH_FAILURES": "100000/minute",
              "PYTHON_AGENTS": agents.ALLOWED,
              "AGENT_ALLOW_PRIVATE_NETWORKS": "1"}  # an openai agent at 127.0.0.1:9

ATTACK = "ATTACK"  # in every text tenant A sends; tenant B's clients must never see it
B_SECRET = "B-SECRET"  # in every text of tenant B's; tenant A must never see it
TRANSPORTS = ["socketio", "socketio-query", "ws"]
SCRIPTED = {"kind": "python", "callable": "tests.agents:scripted"}


# --- strings: minting and tampering as an attacker with (or without) the secret would ------------

def mint(salt: str, claims: dict[str, Any], secret: str = SECRET) -> str:
    """A string signed exactly the way app/tokens.py signs."""
    return URLSafeSerializer([secret], salt=salt).dumps(claims)


def read_claims(token: str, salt: str) -> dict[str, Any]:
    return URLSafeSerializer([SECRET], salt=salt).loads(token)


def parts(token: str) -> tuple[str, str]:
    payload, _, signature = token.rpartition(".")
    assert payload and signature, token
    return payload, signature


def flip(text: str, index: int) -> str:
    """Change one base64 character to one with other high bits (a change of the low two bits
    of a string's *last* character may decode to the same bytes, which is no forgery)."""
    old = text[index]
    return text[:index] + ("Q" if old != "Q" else "g") + text[index + 1:]


def flip_payload(token: str) -> str:
    payload, signature = parts(token)
    return flip(payload, len(payload) // 2) + "." + signature


def flip_signature(token: str) -> str:
    payload, signature = parts(token)
    return payload + "." + flip(signature, len(signature) // 2)


def swap(payload_of: str, signature_of: str) -> str:
    return parts(payload_of)[0] + "." + parts(signature_of)[1]


def rewrite(token: str, **changes: Any) -> str:
    """The same signature over claims the attacker rewrote."""
    payload, signature = parts(token)
    codec = URLSafeSerializer("no key needed to encode")
    claims = codec.load_payload(payload.encode())
    claims.update(changes)
    if payload.startswith("."):  # itsdangerous's own form: JSON, zlib when shorter, base64
        encoded = codec.dump_payload(claims)
    else:  # the server's (app/tokens.py): JSON, base64
        encoded = base64_encode(codec.serializer.dumps(claims, **codec.serializer_kwargs))
    return encoded.decode() + "." + signature


def tampered_variants(token: str, other: str) -> dict[str, str]:
    """Every way of damaging a genuine string; ``other`` is another genuine string."""
    payload, _ = parts(token)
    return {
        "payload_char_flipped": flip_payload(token),
        "signature_char_flipped": flip_signature(token),
        "truncated_by_one": token[:-1],
        "cut_to_payload_only": payload,
        "cut_to_payload_and_dot": payload + ".",
        "one_char_appended": token + "A",
        "garbage_appended": token + ".x",
        "payload_with_another_strings_signature": swap(other, token),
    }


# --- clients: one interface over Socket.IO and /ws/chat ------------------------------------------

@dataclass
class Client:
    """A connection attempt over one transport, and what to do with it once connected."""

    transport: str
    sio: ChatClient | None = None
    plain: RecordingPlainClient | None = None
    acks: int = 0

    # -- connecting -------------------------------------------------------------------------

    @property
    def refusal(self) -> str | None:
        if self.sio is not None:
            return refusal_code(self.sio)
        self.plain.wait_until(lambda: self.plain.events or self.plain.closed, 10,
                              "the first frame")
        first = self.plain.events[0] if self.plain.events else None
        if first is None or first[0] != "error":
            return None
        return first[1].get("code")

    def assert_refused(self, code: str) -> None:
        """Refused with ``code``: no session, nothing of the chat, the socket closed."""
        assert self.refusal == code, self.events()
        if self.sio is not None:
            data = self.sio.connect_error.get("data")
            assert data["code"] == code and data["message"], self.sio.connect_error
            assert not self.sio.sio.connected
            assert self.sio.events == [], self.sio.events
        else:
            self.plain.wait_until(lambda: self.plain.closed, 10, "the server to close the socket")
            assert len(self.plain.events) == 1, self.plain.events
            assert set(self.plain.events[0][1]) == {"code", "message", "details"}

    @property
    def established(self) -> dict:
        assert self.refusal is None, self.events()
        return self.wait_for("connection_established")[0]

    # -- events -----------------------------------------------------------------------------

    def events(self) -> list[tuple[str, Any]]:
        if self.sio is not None:
            with self.sio.cond:
                return list(self.sio.events)
        with self.plain.cond:
            return list(self.plain.events)

    def named(self, name: str) -> list[Any]:
        return [data for event, data in self.events() if event == name]

    def wait_for(self, name: str, count: int = 1, timeout: float = 10) -> list[Any]:
        return (self.sio or self.plain).wait_for(name, count, timeout)

    def wait_until(self, predicate: Callable[[list], bool], what: str,
                   timeout: float = 10) -> None:
        (self.sio or self.plain).wait_until(lambda: predicate(self.events()), timeout, what)

    # -- acting -----------------------------------------------------------------------------

    def message(self, payload: dict[str, Any]) -> dict:
        """Send a ``message`` (an event with an ack, or a frame answered by a ``message`` frame)."""
        if self.sio is not None:
            return self.sio.call("message", payload)
        self.acks += 1
        self.plain.send(payload)
        return self.wait_for("message", self.acks)[self.acks - 1]

    def message_string(self) -> str:
        if self.sio is not None:
            return self.sio.call("get_message_string", {})["message_string"]
        count = len(self.named("get_message_string")) + 1
        self.plain.send({"event": "get_message_string", "data": {}})
        return self.wait_for("get_message_string", count)[-1]["message_string"]

    def emit(self, event: str, data: Any) -> None:
        """An event without waiting for any answer."""
        if self.sio is not None:
            self.sio.sio.emit(event, data, namespace=NAMESPACE)
        else:
            self.plain.send({"event": event, "data": data})

    def send_ok(self, content: str, message_string: str | None = None) -> dict:
        ack = self.message({"content": content,
                            "message_string": message_string or self.message_string()})
        assert ack.get("ok") is True, ack
        return ack["message"]

    def assert_message_refused(self, payload: dict[str, Any], code: str) -> dict:
        """The failed ack and the ``error`` event to the sender, both with ``code``."""
        errors_before = len(self.named("error"))
        ack = self.message(payload)
        assert ack.get("ok") is False and set(ack) == {"ok", "error"}, ack
        assert ack["error"]["code"] == code, ack
        assert set(ack["error"]) == {"code", "message", "details"}, ack
        got = self.wait_for("error", errors_before + 1)
        assert ack["error"] in got[errors_before:], got
        return ack["error"]

    def close(self) -> None:
        if self.sio is not None:
            try:
                self.sio.disconnect()
            except Exception:  # already dropped by the server
                pass
        else:
            self.plain.close()


def open_client(url: str, transport: str, params: dict[str, Any]) -> Client:
    if transport == "socketio":
        return Client(transport, sio=connect(url, params))
    if transport == "socketio-query":
        return Client(transport, sio=connect(url, None, query=urlencode(params)))
    return Client(transport, plain=RecordingPlainClient(url, params))


@pytest.fixture
def clients(live_server):
    """Opens clients on the live server and always closes them at the end of the test."""
    opened: list[Client] = []

    def open_(transport: str, params: dict[str, Any]) -> Client:
        client = open_client(live_server.url, transport, params)
        opened.append(client)
        return client

    yield open_
    for client in opened:
        client.close()


# --- the two tenants -----------------------------------------------------------------------------

@dataclass
class World:
    url: str
    a: Tenant
    b: Tenant
    ids: dict[str, str]
    b_second_key: tuple[str, str]  # (key id, key) of a second API key of B's
    b_message_ids: list[str]
    b_snapshot: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> str:
        return self.ids[name]

    def a_string(self, chat: str = "chat_a1", user: str = "alice") -> str:
        return self.a.connection_string(self.ids[chat], user)

    def b_string(self, chat: str = "chat_b_live", user: str = "alice") -> str:
        return self.b.connection_string(self.ids[chat], user)


def rest(tenant_key: str | None, method: str, url: str, **kwargs) -> requests.Response:
    headers = dict(kwargs.pop("headers", {}))
    if tenant_key is not None:
        headers["X-API-Key"] = tenant_key
    return requests.request(method, url, headers=headers, timeout=10, **kwargs)


def snapshot_b(world: World) -> dict[str, Any]:
    """Everything of tenant B's readable with B's key, but the live chat's growing history."""
    b, url = world.b, world.url
    got: dict[str, Any] = {}
    for name in ("ws_b1", "ws_b2"):
        got[name] = rest(b.key, "GET", f"{url}/api/v1/workspaces/{world[name]}").json()
    for name in ("chat_b1", "chat_b2", "chat_b_live", "chat_b_yuki"):
        got[name] = rest(b.key, "GET", f"{url}/api/v1/chats/{world[name]}").json()
    for name in ("chat_b1", "chat_b2"):
        got[name + " messages"] = b.history(world[name])
    for user in ("alice", "bob", "zed", "yuki"):
        got["workspaces of " + user] = rest(
            b.key, "GET", f"{url}/api/v1/workspaces/user/{user}").json()
        got["chats of " + user] = rest(b.key, "GET", f"{url}/api/v1/chats/user/{user}").json()
    return got


@pytest.fixture(scope="module")
def world(live_server) -> World:
    """Tenant A (Acme) and tenant B (Globex), both with an `alice` and a `bob`.

    A: workspace ws_a (alice, member bob) with chats chat_a1, chat_a2; ws_a_carol (carol) with
    chat_a3. B: ws_b1 (alice, member bob, a scripted agent) with chat_b1 (holding a few
    messages and replies) and chat_b_live (B's clients stay connected to it); ws_b2 (zed, an
    openai agent with a key) with chat_b2; yuki, a user only B has, with a chat of hers.
    """
    url = live_server.url
    a, b = new_tenant(url, "Acme"), new_tenant(url, "Globex")
    ids: dict[str, str] = {}
    ids["ws_a"] = a.workspace("alice", members=("bob",))
    ids["chat_a1"] = a.chat("alice", ids["ws_a"], title="A one")
    ids["chat_a2"] = a.chat("alice", ids["ws_a"], title="A two")
    ids["ws_a_carol"] = a.workspace("carol")
    ids["chat_a3"] = a.chat("carol", ids["ws_a_carol"])
    ids["ws_b1"] = b.workspace("alice", members=("bob",), agent=SCRIPTED)
    ids["chat_b1"] = b.chat("alice", ids["ws_b1"], title=f"{B_SECRET} plans",
                            metadata={"note": f"{B_SECRET} metadata"})
    ids["chat_b_live"] = b.chat("alice", ids["ws_b1"], title=f"{B_SECRET} live")
    ids["ws_b2"] = b.workspace("zed", agent={"kind": "openai", "base_url": "http://127.0.0.1:9/v1",
                                             "model": "m", "api_key": f"{B_SECRET}-openai-key"})
    ids["chat_b2"] = b.chat("zed", ids["ws_b2"], title=f"{B_SECRET} zed")
    ids["chat_b_yuki"] = b.chat("yuki", title=f"{B_SECRET} yuki")  # in yuki's Personal one

    writer = Client("socketio", sio=connect(url, {"chat_id": ids["chat_b1"],
                                                  "connection_string": b.connection_string(
                                                      ids["chat_b1"], "alice")}))
    try:
        for i in range(2):
            writer.send_ok(f"{B_SECRET} message {i}")
            writer.wait_for("message_stream_ended", i + 1)
    finally:
        writer.close()
    b_message_ids = [m["id"] for m in b.history(ids["chat_b1"])]
    assert len(b_message_ids) == 4  # two messages, two replies

    r = requests.post(f"{url}/admin/tenants/{b.id}/api-keys", timeout=10,
                      headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert r.status_code == 201, r.text
    result = World(url, a, b, ids, (r.json()["id"], r.json()["api_key"]), b_message_ids)
    result.b_snapshot = snapshot_b(result)
    return result


@dataclass
class Watchers:
    """Clients of both tenants kept connected for the whole module."""

    b_sio: Client  # B's alice on chat_b_live over Socket.IO
    b_ws: Client  # B's bob on chat_b_live over /ws/chat
    a_sio: Client  # A's alice on chat_a1 over Socket.IO
    a_ws: Client  # A's bob on chat_a1 over /ws/chat
    b_sent: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def watchers(world):
    w = Watchers(
        open_client(world.url, "socketio", {"chat_id": world["chat_b_live"],
                                            "connection_string": world.b_string()}),
        open_client(world.url, "ws", {"chat_id": world["chat_b_live"], "api_key": world.b.key,
                                      "user_id": "bob"}),
        open_client(world.url, "socketio", {"chat_id": world["chat_a1"],
                                            "connection_string": world.a_string()}),
        open_client(world.url, "ws", {"chat_id": world["chat_a1"], "api_key": world.a.key,
                                      "user_id": "bob"}))
    for client in (w.b_sio, w.b_ws, w.a_sio, w.a_ws):
        assert client.established
    yield w
    for client in (w.b_sio, w.b_ws, w.a_sio, w.a_ws):
        client.close()


B_EVENTS = {"user_created", "connection_established", "message_received",
            "message_stream_started", "message_stream_token", "message_stream_ended",
            "get_message_string", "message"}


def b_talks(world: World, watchers: Watchers, content: str) -> dict:
    """B's alice posts in chat_b_live and both B clients see the whole reply."""
    message = watchers.b_sio.send_ok(content)
    watchers.b_sent.append(content)
    ended = len(watchers.b_sent)
    for client in (watchers.b_sio, watchers.b_ws):
        client.wait_until(lambda events: any(e == "message_received" and d["id"] == message["id"]
                                             for e, d in events), "B's own message")
        client.wait_for("message_stream_ended", ended)
    return message


def assert_quarantine(world: World, watchers: Watchers) -> None:
    """Nothing of A reached B's clients or data, and nothing of B reached A's clients.

    Each side posts a message and waits for it: anything sent to a client earlier arrived first.
    """
    b_talks(world, watchers, f"{B_SECRET} sync {uuid.uuid4().hex[:6]}")
    sync = watchers.a_sio.send_ok(f"A sync {uuid.uuid4().hex[:6]}")
    for client in (watchers.a_sio, watchers.a_ws):
        client.wait_until(lambda events: any(e == "message_received" and d["id"] == sync["id"]
                                             for e, d in events), "A's sync message")

    a_ids = [world.a.id, world.a.key] + [v for k, v in world.ids.items() if "_a" in k]
    for client in (watchers.b_sio, watchers.b_ws):
        events = client.events()
        text = json.dumps(events)
        assert ATTACK not in text and not any(i in text for i in a_ids), events
        assert {e for e, _ in events} <= B_EVENTS, events  # no error, no typing from A
        for event, data in events:
            if isinstance(data, dict) and "chat_id" in data:
                assert data["chat_id"] == world["chat_b_live"], (event, data)
            if event == "message_received":
                assert (data["role"], data["user_id"]) in (("user", "alice"), ("agent", None))
                assert data["role"] == "agent" or B_SECRET in data["content"], data
            if event == "message_stream_ended":
                assert data["finish_reason"] == "stop", data  # nobody of A's stopped it
    for client in (watchers.a_sio, watchers.a_ws):
        events = client.events()
        text = json.dumps(events)
        assert B_SECRET not in text and world.b.id not in text, events
        assert not any(world[k] in text for k in world.ids if "_b" in k), events
        for event, data in events:
            if isinstance(data, dict) and "chat_id" in data:
                assert data["chat_id"] == world["chat_a1"], (event, data)

    assert snapshot_b(world) == world.b_snapshot
    live = world.b.history(world["chat_b_live"])
    assert [m["content"] for m in live if m["role"] == "user"] == watchers.b_sent
    assert all(ATTACK not in m["content"] for m in live), live
    # B's keys all still work.
    for key in (world.b.key, world.b_second_key[1]):
        assert rest(key, "GET", f"{world.url}/api/v1/chats/{world['chat_b1']}").status_code == 200


# --- 1. connection strings -----------------------------------------------------------------------

def _with_user_removed(world: World) -> dict[str, str]:
    ws = world.a.workspace("alice", members=("dave",))
    chat = world.a.chat("alice", ws)
    issued = world.a.connection_string(chat, "dave")
    r = rest(world.a.key, "DELETE", f"{world.url}/api/v1/workspaces/{ws}/members/dave")
    assert r.status_code == 204, r.text
    return {"chat_id": chat, "connection_string": issued}


def _with_chat_deleted(world: World) -> dict[str, str]:
    chat = world.a.chat("alice", world["ws_a"])
    issued = world.a.connection_string(chat, "alice")
    assert rest(world.a.key, "DELETE", f"{world.url}/api/v1/chats/{chat}").status_code == 204
    return {"chat_id": chat, "connection_string": issued}


def _with_workspace_deleted(world: World) -> dict[str, str]:
    ws = world.a.workspace("alice")
    chat = world.a.chat("alice", ws)
    issued = world.a.connection_string(chat, "alice")
    assert rest(world.a.key, "DELETE", f"{world.url}/api/v1/workspaces/{ws}").status_code == 204
    return {"chat_id": chat, "connection_string": issued}


def _claims(world: World, chat: str = "chat_a1", user: str = "alice",
            tenant: str | None = None, **extra: Any) -> dict[str, Any]:
    chat_id = world.ids.get(chat, chat)
    return {"t": tenant or world.a.id, "u": user, "c": chat_id, "exp": time.time() + 300,
            **extra}


def _cs(world: World, claims: dict[str, Any], chat: str | None = None, **kw) -> dict[str, str]:
    return {"chat_id": chat or claims["c"], "connection_string": mint(CONNECTION_SALT, claims,
                                                                      **kw)}


# name -> (params for the attempt, expected refusal code)
CONNECTION_CASES: dict[str, Callable[[World], tuple[dict[str, str], str]]] = {
    # tampered: one real string of A's alice for chat_a1, damaged; the other chat's as donor
    **{f"tampered_{name}": (lambda name: lambda w: (
        {"chat_id": w["chat_a1"],
         "connection_string": tampered_variants(w.a_string(), w.a_string("chat_a2"))[name]},
        "invalid_connection_string"))(name)
       for name in tampered_variants("p.s", "q.t")},
    "claims_rewritten_to_another_user_under_the_old_signature": lambda w: (
        {"chat_id": w["chat_a1"],
         "connection_string": rewrite(w.a_string(user="bob"), u="alice")},
        "invalid_connection_string"),
    "claims_rewritten_to_another_chat_under_the_old_signature": lambda w: (
        {"chat_id": w["chat_a3"], "connection_string": rewrite(w.a_string(), c=w["chat_a3"])},
        "invalid_connection_string"),
    "claims_rewritten_to_tenant_b_under_the_old_signature": lambda w: (
        {"chat_id": w["chat_b_live"], "connection_string": rewrite(
            w.a_string(), t=w.b.id, c=w["chat_b_live"])}, "invalid_connection_string"),
    "expiry_extended_under_the_old_signature": lambda w: (
        {"chat_id": w["chat_a1"], "connection_string": rewrite(
            w.a_string(), exp=time.time() + 10 ** 6)}, "invalid_connection_string"),
    "signed_with_a_wrong_secret": lambda w: (
        _cs(w, _claims(w), secret="not-the-server-secret"), "invalid_connection_string"),
    "signed_with_the_secret_but_as_a_message_string": lambda w: (
        {"chat_id": w["chat_a1"], "connection_string": mint(
            MESSAGE_SALT, _claims(w, s="sid", j="0123456789abcdef"))},
        "invalid_connection_string"),
    "claims_of_the_wrong_types": lambda w: (
        _cs(w, {**_claims(w), "u": ["alice"]}), "invalid_connection_string"),
    "claims_without_an_expiry": lambda w: (
        _cs(w, {k: v for k, v in _claims(w).items() if k != "exp"}),
        "invalid_connection_string"),
    "claims_of_an_unknown_tenant": lambda w: (
        _cs(w, _claims(w, tenant="no-such-tenant")), "invalid_connection_string"),
    "expired_a_second_ago": lambda w: (
        _cs(w, _claims(w, exp=time.time() - 1)), "connection_string_expired"),
    "expired_long_ago": lambda w: (_cs(w, _claims(w, exp=1.0)), "connection_string_expired"),
    "cross_chat_same_tenant": lambda w: (
        {"chat_id": w["chat_a2"], "connection_string": w.a_string()},
        "invalid_connection_string"),
    "cross_chat_into_a_workspace_the_user_cannot_enter": lambda w: (
        {"chat_id": w["chat_a3"], "connection_string": w.a_string()},
        "invalid_connection_string"),
    "cross_user_member_removed_after_issue": lambda w: (_with_user_removed(w), "forbidden"),
    "cross_user_genuine_claims_of_a_user_without_access": lambda w: (
        _cs(w, _claims(w, chat="chat_a3", user="alice")), "forbidden"),
    "chat_deleted_after_issue": lambda w: (_with_chat_deleted(w), "chat_not_found"),
    "workspace_deleted_after_issue": lambda w: (_with_workspace_deleted(w), "chat_not_found"),
    "cross_tenant_a_string_for_b_chat": lambda w: (
        {"chat_id": w["chat_b_live"], "connection_string": w.a_string()},
        "invalid_connection_string"),
    "cross_tenant_b_string_for_a_chat": lambda w: (
        {"chat_id": w["chat_a1"], "connection_string": w.b_string()},
        "invalid_connection_string"),
    "cross_tenant_genuine_a_claims_naming_b_chat": lambda w: (
        _cs(w, _claims(w, chat="chat_b_live")), "chat_not_found"),
    "cross_tenant_a_key_for_b_chat_as_a_user_both_have": lambda w: (
        {"chat_id": w["chat_b_live"], "api_key": w.a.key, "user_id": "alice"},
        "chat_not_found"),
    "cross_tenant_a_key_for_b_chat_as_b_only_user": lambda w: (
        {"chat_id": w["chat_b2"], "api_key": w.a.key, "user_id": "zed"}, "chat_not_found"),
    "a_key_altered": lambda w: (
        {"chat_id": w["chat_a1"], "api_key": flip(w.a.key, 10), "user_id": "alice"},
        "invalid_api_key"),
    "tampered_string_is_not_rescued_by_a_valid_api_key_beside_it": lambda w: (
        {"chat_id": w["chat_a1"], "connection_string": flip_signature(w.a_string()),
         "api_key": w.a.key, "user_id": "alice"}, "invalid_connection_string"),
    "expired_string_is_not_rescued_by_a_valid_api_key_beside_it": lambda w: (
        {**_cs(w, _claims(w, exp=time.time() - 1)), "api_key": w.a.key, "user_id": "alice"},
        "connection_string_expired"),
}


def test_the_tamper_helpers_really_damage_the_strings(world):
    """Guard: each damaged string differs from the original and fails itsdangerous' check."""
    token, other = world.a_string(), world.a_string("chat_a2")
    assert read_claims(token, CONNECTION_SALT)["c"] == world["chat_a1"]
    for name, damaged in tampered_variants(token, other).items():
        assert damaged != token, name
        with pytest.raises(Exception):
            read_claims(damaged, CONNECTION_SALT)
    # and a rewrite that changes nothing keeps a valid string (the helper itself is sound)
    assert read_claims(rewrite(token), CONNECTION_SALT) == read_claims(token, CONNECTION_SALT)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", list(CONNECTION_CASES))
def test_forged_or_borrowed_connection_credentials_are_refused(world, clients, transport,
                                                               case):
    params, code = CONNECTION_CASES[case](world)
    clients(transport, params).assert_refused(code)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_connection_string_is_reusable_within_its_ttl_by_design(world, watchers, clients,
                                                                  transport):
    # CONTRACT: a connection string is time-limited, not single-use (a browser reconnects
    # with it); each connection gets its own sid and its own message strings.
    params = {"chat_id": world["chat_a1"], "connection_string": world.a_string()}
    first, second = clients(transport, params), clients(transport, params)
    one, two = first.established, second.established
    assert one["user_id"] == two["user_id"] == "alice"
    assert one["sid"] != two["sid"]
    third = clients(transport, params)  # after both are established, again
    assert third.established["sid"] not in (one["sid"], two["sid"])
    # The message strings are not interchangeable between those connections.
    first.assert_message_refused({"content": f"{ATTACK} borrowed",
                                  "message_string": two["message_string"]},
                                 "invalid_message_string")
    second.send_ok("second's own string", two["message_string"])
    assert_quarantine(world, watchers)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_connection_string_decides_who_you_are_whatever_else_you_claim(world, watchers,
                                                                         clients, transport):
    bobs = world.a_string(user="bob")
    for extra in ({"user_id": "alice"}, {"api_key": world.a.key, "user_id": "alice"},
                  {"api_key": world.b.key, "user_id": "alice"}):
        client = clients(transport, {"chat_id": world["chat_a1"], "connection_string": bobs,
                                     **extra})
        assert client.established["user_id"] == "bob"
        stored = client.send_ok(f"who am I {transport}")
        assert stored["user_id"] == "bob" and stored["chat_id"] == world["chat_a1"]
        claims = read_claims(client.message_string(), MESSAGE_SALT)
        assert (claims["t"], claims["u"], claims["c"]) == (world.a.id, "bob", world["chat_a1"])
        client.close()
    # B's string beside A's key: B's own chat as B's alice (A's key adds nothing to it).
    client = clients(transport, {"chat_id": world["chat_b_live"],
                                 "connection_string": world.b_string(),
                                 "api_key": world.a.key, "user_id": "bob"})
    assert client.established["user_id"] == "alice"
    assert read_claims(client.message_string(), MESSAGE_SALT)["t"] == world.b.id
    client.close()
    assert_quarantine(world, watchers)


# --- 2. message strings --------------------------------------------------------------------------

@dataclass
class Senders:
    """Connections of one transport in tenant A, plus B's live Socket.IO client."""

    me: Client  # A's alice on chat_a1: the attacker's own connection
    me_sid: str
    twin: Client  # A's alice on chat_a1 again: same user, same chat, another connection
    twin_other_transport: Client
    other_chat: Client  # A's alice on chat_a2
    other_user: Client  # A's bob on chat_a1
    tenant_b: Client  # B's alice on chat_b_live (the watcher)


MESSAGE_CASES: dict[str, Callable[[World, Senders], tuple[str, str, Client | None]]] = {
    # name -> (message string, expected code, the connection that owns it: still usable after)
    **{f"tampered_{name}": (lambda name: lambda w, s: (
        tampered_variants(s.me.message_string(), s.me.message_string())[name],
        "invalid_message_string", None))(name)
       for name in tampered_variants("p.s", "q.t")},
    "claims_rewritten_to_this_connection_under_a_twins_signature": lambda w, s: (
        rewrite(s.twin.message_string(), s=s.me_sid), "invalid_message_string", None),
    "claims_rewritten_to_unspend_under_the_old_signature": lambda w, s: (
        rewrite(s.me.message_string(), j="f" * 16), "invalid_message_string", None),
    "signed_with_a_wrong_secret": lambda w, s: (
        mint(MESSAGE_SALT, _claims(w, s=s.me_sid, j=uuid.uuid4().hex[:16]),
             secret="not-the-server-secret"), "invalid_message_string", None),
    "expired": lambda w, s: (
        mint(MESSAGE_SALT, _claims(w, s=s.me_sid, j=uuid.uuid4().hex[:16],
                                   exp=time.time() - 1)), "message_string_expired", None),
    "another_connection_same_user_same_chat": lambda w, s: (
        s.twin.message_string(), "invalid_message_string", s.twin),
    "another_connection_same_user_same_chat_other_transport": lambda w, s: (
        s.twin_other_transport.message_string(), "invalid_message_string",
        s.twin_other_transport),
    "another_chat_same_user": lambda w, s: (
        s.other_chat.message_string(), "invalid_message_string", s.other_chat),
    "another_user_same_chat": lambda w, s: (
        s.other_user.message_string(), "invalid_message_string", s.other_user),
    "another_tenant": lambda w, s: (
        s.tenant_b.message_string(), "invalid_message_string", s.tenant_b),
    "genuine_claims_of_another_tenant": lambda w, s: (
        mint(MESSAGE_SALT, _claims(w, tenant=w.b.id, s=s.me_sid, j=uuid.uuid4().hex[:16])),
        "invalid_message_string", None),
    "a_connection_string": lambda w, s: (
        w.a_string(), "invalid_message_string", None),
    "a_connection_string_minted_with_this_connections_claims": lambda w, s: (
        mint(CONNECTION_SALT, _claims(w, s=s.me_sid, j=uuid.uuid4().hex[:16])),
        "invalid_message_string", None),
}


@pytest.fixture(scope="module", params=["socketio", "ws"])
def senders(request, world, watchers):
    transport = request.param
    other = "ws" if transport == "socketio" else "socketio"
    key = {"api_key": world.a.key}
    opened = [
        open_client(world.url, transport, {"chat_id": world["chat_a1"],
                                           "connection_string": world.a_string()}),
        open_client(world.url, transport, {"chat_id": world["chat_a1"], "user_id": "alice",
                                           **key}),
        open_client(world.url, other, {"chat_id": world["chat_a1"], "user_id": "alice", **key}),
        open_client(world.url, transport, {"chat_id": world["chat_a2"], "user_id": "alice",
                                           **key}),
        open_client(world.url, transport, {"chat_id": world["chat_a1"], "user_id": "bob",
                                           **key}),
    ]
    me = opened[0]
    yield Senders(me, me.established["sid"], *opened[1:], watchers.b_sio)
    for client in opened:
        client.close()


@pytest.mark.parametrize("case", list(MESSAGE_CASES))
def test_forged_or_borrowed_message_strings_are_refused_store_nothing_and_spend_nothing(
        world, watchers, senders, case):
    string, code, owner = MESSAGE_CASES[case](world, senders)
    content = f"{ATTACK} {case} {senders.me.transport}"
    senders.me.assert_message_refused({"content": content, "message_string": string}, code)
    if owner is not None:  # refusing it did not spend it: its own connection still can
        sent = owner.send_ok(f"{B_SECRET} owner" if owner is senders.tenant_b else "owner",
                             string)
        if owner is senders.tenant_b:
            watchers.b_sent.append(sent["content"])
            for client in (watchers.b_sio, watchers.b_ws):
                client.wait_for("message_stream_ended", len(watchers.b_sent))
    for chat in ("chat_a1", "chat_a2"):
        assert all(ATTACK not in m["content"] for m in world.a.history(world[chat]))
    assert_quarantine(world, watchers)


def test_a_replayed_message_string_is_refused_and_stored_once(world, watchers, senders):
    string = senders.me.message_string()
    first = senders.me.send_ok(f"once {senders.me.transport}", string)
    senders.me.assert_message_refused({"content": f"{ATTACK} replay", "message_string": string},
                                      "message_string_reused")
    # Replayed from another connection of the same user too: spent is spent.
    senders.twin.assert_message_refused({"content": f"{ATTACK} replay elsewhere",
                                         "message_string": string}, "message_string_reused")
    history = world.a.history(world["chat_a1"])
    assert [m["id"] for m in history if m["content"] == first["content"]] == [first["id"]]
    assert all(ATTACK not in m["content"] for m in history)
    assert_quarantine(world, watchers)


# --- 3. cross-tenant: every REST route, every event ----------------------------------------------

@dataclass
class Attempt:
    path: str  # formatted with the world's ids
    json: Any = None
    status: int = 404
    code: str | None = None
    auth: str = "a_key"  # a_key | none | a_key_as_bearer | wrong_bearer | basic_admin_token
    check: Callable[[World, requests.Response], None] | None = None


def _only_a_objects(key: str) -> Callable[[World, requests.Response], None]:
    def check(world: World, r: requests.Response) -> None:
        items = r.json()[key]
        assert B_SECRET not in r.text and world.b.id not in r.text, r.text
        b_ids = {world[k] for k in world.ids if "_b" in k}
        assert not b_ids & {item["id"] for item in items}, items
    return check


def _empty_page(key: str) -> Callable[[World, requests.Response], None]:
    def check(world: World, r: requests.Response) -> None:
        assert r.json() == {key: [], "total": 0, "offset": 0, "limit": 50, "has_more": False}
    return check


def _a_messages_only(world: World, r: requests.Response) -> None:
    messages = r.json()["messages"]
    assert all(m["chat_id"] == world["chat_a1"] for m in messages), messages
    assert B_SECRET not in r.text, r.text


def _created_for_a_only(kind: str) -> Callable[[World, requests.Response], None]:
    def check(world: World, r: requests.Response) -> None:
        created = r.json()["id"]
        assert rest(world.a.key, "GET", f"{world.url}/api/v1/{kind}/{created}").status_code == 200
        hidden = rest(world.b.key, "GET", f"{world.url}/api/v1/{kind}/{created}")
        assert hidden.status_code == 404, hidden.text
    return check


ADMIN_REFUSALS = [("none", "missing_api_key"), ("a_key", "missing_api_key"),
                  ("a_key_as_bearer", "invalid_api_key"), ("wrong_bearer", "invalid_api_key"),
                  ("basic_admin_token", "missing_api_key")]

#: Every route the server documents, and how tenant A (or a tenant key) attacks it.
ROUTE_ATTACKS: dict[tuple[str, str], list[Attempt]] = {
    ("POST", "/api/v1/workspaces"): [
        # No foreign id can be named here: what A creates is A's, invisible to B.
        Attempt("/api/v1/workspaces", {"owner_id": "zed", "name": f"{ATTACK} ws"}, 201,
                check=_created_for_a_only("workspaces")),
    ],
    ("GET", "/api/v1/workspaces/user/{user_id}"): [
        Attempt("/api/v1/workspaces/user/yuki", status=200, check=_empty_page("workspaces")),
        Attempt("/api/v1/workspaces/user/bob", status=200,
                check=_only_a_objects("workspaces")),
    ],
    ("GET", "/api/v1/workspaces/{workspace_id}"): [
        Attempt("/api/v1/workspaces/{ws_b1}", code="workspace_not_found"),
        Attempt("/api/v1/workspaces/{ws_b2}", code="workspace_not_found"),
    ],
    ("PATCH", "/api/v1/workspaces/{workspace_id}"): [
        Attempt("/api/v1/workspaces/{ws_b1}", {"name": ATTACK, "agent": {"kind": "echo"}},
                code="workspace_not_found"),
        Attempt("/api/v1/workspaces/{ws_b2}",
                {"agent": {"kind": "openai", "base_url": "http://attacker.example/v1",
                           "model": "m"}}, code="workspace_not_found"),
    ],
    ("DELETE", "/api/v1/workspaces/{workspace_id}"): [
        Attempt("/api/v1/workspaces/{ws_b1}", code="workspace_not_found"),
        Attempt("/api/v1/workspaces/{ws_b2}", code="workspace_not_found"),
    ],
    ("PUT", "/api/v1/workspaces/{workspace_id}/members/{user_id}"): [
        Attempt("/api/v1/workspaces/{ws_b1}/members/mallory", code="workspace_not_found"),
        Attempt("/api/v1/workspaces/{ws_b2}/members/alice", code="workspace_not_found"),
    ],
    ("DELETE", "/api/v1/workspaces/{workspace_id}/members/{user_id}"): [
        Attempt("/api/v1/workspaces/{ws_b1}/members/bob", code="workspace_not_found"),
        Attempt("/api/v1/workspaces/{ws_b1}/members/alice", code="workspace_not_found"),
    ],
    ("POST", "/api/v1/chats/"): [
        Attempt("/api/v1/chats/", {"user_id": "alice", "workspace_id": "{ws_b1}",
                                   "title": ATTACK}, code="workspace_not_found"),
        Attempt("/api/v1/chats/", {"user_id": "zed", "workspace_id": "{ws_b2}"},
                code="workspace_not_found"),
        Attempt("/api/v1/chats/", {"user_id": "zed", "title": ATTACK}, 201,
                check=_created_for_a_only("chats")),
    ],
    ("POST", "/chat"): [
        Attempt("/chat", {"user_id": "alice", "workspace_id": "{ws_b1}"},
                code="workspace_not_found"),
        Attempt("/chat", {"user_id": "zed", "workspace_id": "{ws_b2}", "title": ATTACK},
                code="workspace_not_found"),
    ],
    ("GET", "/api/v1/chats/user/{user_id}"): [
        Attempt("/api/v1/chats/user/alice", status=200, check=_only_a_objects("chats")),
        Attempt("/api/v1/chats/user/yuki", status=200, check=_empty_page("chats")),
    ],
    ("GET", "/api/v1/chats/{chat_id}"): [
        Attempt("/api/v1/chats/{chat_b1}", code="chat_not_found"),
        Attempt("/api/v1/chats/{chat_b_live}", code="chat_not_found"),
    ],
    ("DELETE", "/api/v1/chats/{chat_id}"): [
        Attempt("/api/v1/chats/{chat_b1}", code="chat_not_found"),
        Attempt("/api/v1/chats/{chat_b_live}", code="chat_not_found"),
    ],
    ("GET", "/api/v1/chats/{chat_id}/messages"): [
        Attempt("/api/v1/chats/{chat_b1}/messages", code="chat_not_found"),
        Attempt("/api/v1/chats/{chat_b1}/messages?order=desc&limit=1", code="chat_not_found"),
        Attempt("/api/v1/chats/{chat_b1}/messages?after_id=0", code="chat_not_found"),
        # A's own chat bounded by B's message ids: still only A's messages.
        Attempt("/api/v1/chats/{chat_a1}/messages?after_id={b_message_0}", status=200,
                check=_a_messages_only),
        Attempt("/api/v1/chats/{chat_a1}/messages?before_id={b_message_last}&order=desc",
                status=200, check=_a_messages_only),
    ],
    ("POST", "/api/v1/chats/{chat_id}/connection-string"): [
        Attempt("/api/v1/chats/{chat_b_live}/connection-string", {"user_id": "alice"},
                code="chat_not_found"),
        Attempt("/api/v1/chats/{chat_b1}/connection-string", {"user_id": "bob"},
                code="chat_not_found"),
        Attempt("/api/v1/chats/{chat_b2}/connection-string", {"user_id": "zed"},
                code="chat_not_found"),
    ],
    ("POST", "/admin/tenants"): [
        Attempt("/admin/tenants", {"name": ATTACK}, 401, code, auth)
        for auth, code in ADMIN_REFUSALS],
    ("POST", "/admin/tenants/{tenant_id}/api-keys"): [
        Attempt("/admin/tenants/{tenant_b}/api-keys", None, 401, code, auth)
        for auth, code in ADMIN_REFUSALS],
    ("DELETE", "/admin/tenants/{tenant_id}/api-keys/{key_id}"): [
        *[Attempt("/admin/tenants/{tenant_b}/api-keys/{b_key_id}", None, 401, code, auth)
          for auth, code in ADMIN_REFUSALS],
        # Even the operator cannot revoke B's key through A's tenant.
        Attempt("/admin/tenants/{tenant_a}/api-keys/{b_key_id}", code="not_found",
                auth="admin"),
    ],
}

#: Routes outside the tenant API: (method, rule) -> where their safety is proven.
OTHER_ROUTES = {
    ("GET", "/healthz"): "public, no tenant data (test_public_routes_show_nothing_of_a_tenant)",
    ("GET", "/readyz"): "public, no tenant data (test_public_routes_show_nothing_of_a_tenant)",
    ("GET", "/metrics"): "public, no tenant data (test_public_routes_show_nothing_of_a_tenant)",
    ("GET", "/openapi.json"): "public (test_public_routes_show_nothing_of_a_tenant)",
    ("GET", "/docs"): "public (test_public_routes_show_nothing_of_a_tenant)",
    ("GET", "/docs/static/{filename}"): "Swagger UI's files for /docs (tests/test_hardening.py)",
    ("GET", "/static/{filename}"): "Flask's static files",
    ("GET", "/ws/chat"): "the plain WebSocket door: every test here with transport 'ws'",
    # DEMO=1 only: the demo tenant's own page, seat and JS client; never takes a tenant key.
    ("GET", "/"): "demo page (tests/test_demo_browser.py)",
    ("POST", "/demo/join"): "demo seat, demo tenant only (tests/test_demo_browser.py)",
    ("GET", "/demo/{filename}"): "demo's socket.io client file",
    ("GET", "/demo/static/{filename}"): "demo's static files",
}


def _names(world: World) -> dict[str, str]:
    return {**world.ids, "tenant_a": world.a.id, "tenant_b": world.b.id,
            "b_key_id": world.b_second_key[0], "b_message_0": world.b_message_ids[0],
            "b_message_last": world.b_message_ids[-1]}


def _unknown_names(world: World) -> dict[str, str]:
    """B's object ids swapped for ids that exist nowhere (same length, same alphabet)."""
    return {**_names(world), **{k: uuid.uuid4().hex[:len(v)].rjust(len(v), "0")
                                for k, v in world.ids.items() if "_b" in k}}


def _fill(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**names)
    if isinstance(value, dict):
        return {k: _fill(v, names) for k, v in value.items()}
    return value


def _headers(auth: str, world: World) -> tuple[str | None, dict[str, str]]:
    return {
        "a_key": (world.a.key, {}),
        "none": (None, {}),
        "a_key_as_bearer": (None, {"Authorization": f"Bearer {world.a.key}"}),
        "wrong_bearer": (world.a.key, {"Authorization": f"Bearer {ADMIN_TOKEN}x"}),
        "basic_admin_token": (None, {"Authorization": f"Basic {ADMIN_TOKEN}"}),
        "admin": (None, {"Authorization": f"Bearer {ADMIN_TOKEN}"}),
    }[auth]


def _server_url_rules(live_server, tmp_path) -> set[tuple[str, str]]:
    """(method, rule) of every URL rule of the server's app, with the demo switched on,
    read from create_app in a child process (this process must not build a second app)."""
    script = ("import json\nfrom app import create_app\napp = create_app()\n"
              "print(json.dumps(sorted({(m, r.rule) for r in app.url_map.iter_rules() "
              "for m in r.methods - {'HEAD', 'OPTIONS'}})))")
    env = {**live_server.env, "DEMO": "1",
           "DATABASE_URL": "sqlite:///" + str(tmp_path / "rules.db")}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return {(m, re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule))
            for m, rule in json.loads(out.splitlines()[-1])}


def test_every_route_the_server_exposes_is_attacked_here(live_server, tmp_path):
    spec = requests.get(live_server.url + "/openapi.json", timeout=10).json()
    documented = {(method.upper(), path) for path, ops in spec["paths"].items()
                  for method in ops if method in ("get", "post", "put", "patch", "delete")}
    assert documented == set(ROUTE_ATTACKS), (
        "routes without an attack here:", documented - set(ROUTE_ATTACKS),
        "attacks on routes that are gone:", set(ROUTE_ATTACKS) - documented)
    rules = _server_url_rules(live_server, tmp_path)
    assert rules - documented <= set(OTHER_ROUTES), rules - documented - set(OTHER_ROUTES)
    assert set(OTHER_ROUTES) <= rules, set(OTHER_ROUTES) - rules
    assert documented <= rules


@pytest.mark.parametrize("route", list(ROUTE_ATTACKS), ids=" ".join)
def test_tenant_a_reaches_nothing_of_tenant_b_on_every_route(world, watchers, route):
    method = route[0]
    for attempt in ROUTE_ATTACKS[route]:
        key, headers = _headers(attempt.auth, world)
        path = _fill(attempt.path, _names(world))
        kwargs = {"json": _fill(attempt.json, _names(world))} if attempt.json is not None else {}
        r = rest(key, method, world.url + path, headers=headers, **kwargs)
        assert r.status_code == attempt.status, (path, attempt.auth, r.status_code, r.text)
        if attempt.code is not None:
            body = r.json()
            assert set(body) == {"error"} and body["error"]["code"] == attempt.code, body
            assert set(body["error"]) == {"code", "message", "details"}, body
        if attempt.status == 404:
            # Invisible, not hidden: the answer for B's object is the answer for no object.
            unknown = _unknown_names(world)
            kwargs = ({"json": _fill(attempt.json, unknown)} if attempt.json is not None
                      else {})
            nothing = rest(key, method, world.url + _fill(attempt.path, unknown),
                           headers=headers, **kwargs)
            expected = nothing.text
            for name, value in _names(world).items():
                if unknown[name] != value:
                    expected = expected.replace(unknown[name], value)
            assert (r.status_code, r.text) == (nothing.status_code, expected), path
        assert B_SECRET not in r.text and world.b.key not in r.text, r.text
        for leak in (world.b_second_key[1], '"connection_string":', '"api_key":'):
            assert leak not in r.text, (leak, r.text)
        if attempt.check is not None:
            attempt.check(world, r)
    assert_quarantine(world, watchers)


def test_public_routes_show_nothing_of_a_tenant(world, watchers, live_server):
    secrets = [B_SECRET, world.b.key, world.a.key, world.b.id] + [
        world[k] for k in world.ids if "_b" in k]
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
        for key in (None, world.a.key):
            r = rest(key, "GET", world.url + path)
            assert r.status_code == 200, (path, r.text)
            assert not any(s in r.text for s in secrets), path
    assert_quarantine(world, watchers)


@pytest.mark.parametrize("transport", ["socketio", "ws"])
def test_every_event_with_tenant_a_credentials_stays_out_of_tenant_b_chat(
        world, watchers, clients, transport):
    me = clients(transport, {"chat_id": world["chat_a1"], "connection_string": world.a_string()})
    assert me.established["chat_id"] == world["chat_a1"]
    b_chat = world["chat_b_live"]

    # B's reply streams for a while; meanwhile A throws every event at B's chat id.
    before = len(watchers.b_sio.named("message_stream_ended"))
    # (the scripted agent reads "tokens COUNT DELAY" and ignores the words after them)
    watchers.b_sio.send_ok(f"tokens 20 0.02 {B_SECRET}")
    watchers.b_sent.append(f"tokens 20 0.02 {B_SECRET}")
    watchers.b_sio.wait_for("message_stream_started", before + 1)

    me.assert_message_refused({"content": f"{ATTACK} into B", "chat_id": b_chat,
                               "message_string": me.message_string()}, "chat_mismatch")
    assert me.named("error")[-1]["details"] == {"chat_id": world["chat_a1"]}
    for event, data in [
        ("typing", {"is_typing": True, "chat_id": b_chat}),
        ("stop_generation", {"chat_id": b_chat}),
        ("get_message_string", {"chat_id": b_chat, "user_id": "alice"}),
        ("join", {"chat_id": b_chat, "room": f"chat:{b_chat}"}),
        ("join_room", {"room": f"chat:{b_chat}"}),
        ("subscribe", {"chat_id": b_chat, "api_key": world.a.key, "user_id": "alice"}),
    ]:
        me.emit(event, data)
    # A's stop in its own chat stops nothing; the busy chat is B's, not A's.
    if transport == "socketio":
        assert me.sio.call("stop_generation", {"chat_id": b_chat}) == {"ok": True,
                                                                       "stopped": False}
    else:
        me.plain.send({"event": "stop_generation", "data": {"chat_id": b_chat}})
        me.wait_for("stop_generation", 2)
        assert me.named("stop_generation") == [{"ok": True, "stopped": False}] * 2
    claims = read_claims(me.message_string(), MESSAGE_SALT)
    assert (claims["t"], claims["c"]) == (world.a.id, world["chat_a1"])
    me.send_ok("A's own chat is not busy while B's is")

    # B's stream ran to its end, untouched by A's stop_generation.
    ended = watchers.b_sio.wait_for("message_stream_ended", before + 1)[-1]
    assert ended["finish_reason"] == "stop" and ended["content"].count("t") == 20, ended
    watchers.b_ws.wait_for("message_stream_ended", before + 1)
    # A reconnecting with a last_message_id older than all of B's messages gets only A's.
    replay = clients(transport, {"chat_id": world["chat_a1"], "api_key": world.a.key,
                                 "user_id": "alice", "last_message_id": "0"})
    assert replay.established
    me.send_ok("A after the replay")
    replay.wait_until(lambda events: any(e == "message_received" and
                                         d["content"] == "A after the replay"
                                         for e, d in events), "the live message")
    replayed = replay.named("message_received")
    assert replayed and all(m["chat_id"] == world["chat_a1"] for m in replayed), replayed
    assert B_SECRET not in json.dumps(replay.events())
    assert not me.named("typing") and all(
        e not in ("message_stream_started", "message_stream_token") for e, _ in me.events())
    assert_quarantine(world, watchers)


@pytest.mark.parametrize("event,args", [
    ("connect", lambda w: ({}, {"chat_id": w["chat_b_live"], "api_key": w.a.key,
                                "user_id": "alice"})),
    ("connect", lambda w: ({}, {"chat_id": w["chat_a2"], "api_key": w.a.key,
                                "user_id": "alice"})),
    ("disconnect", lambda w: "client namespace disconnect"),
], ids=["connect_to_b_chat", "connect_to_another_own_chat", "disconnect"])
def test_reserved_event_names_from_a_client_neither_move_nor_detach_its_connection(
        world, watchers, clients, event, args):
    """python-socketio would hand an *event* called ``connect`` or ``disconnect`` to the
    connect and disconnect handlers: re-authorising the open connection into another chat, or
    forgetting it while it stays in its chat's room. The server may close such a connection;
    if it keeps it, the connection stays exactly what it was."""
    me = clients("socketio", {"chat_id": world["chat_a1"], "api_key": world.a.key,
                              "user_id": "alice"})
    assert me.established
    me.sio.sio.emit(event, args(world), namespace=NAMESPACE)
    other_chat = clients("socketio", {"chat_id": world["chat_a2"], "api_key": world.a.key,
                                      "user_id": "alice"})
    elsewhere = other_chat.send_ok("in chat_a2, for its members only")
    sync = watchers.a_sio.send_ok("in chat_a1 after the reserved event")
    me.wait_until(lambda events: not me.sio.sio.connected or any(
        e == "message_received" and d["id"] == sync["id"] for e, d in events),
        "the sync message or the server closing the connection")
    received = [m["id"] for m in me.named("message_received")]
    assert elsewhere["id"] not in received, me.events()
    assert all(m["chat_id"] == world["chat_a1"] for m in me.named("message_received"))
    if sync["id"] in received and me.sio.sio.connected:
        try:
            ack = me.sio.call("message", {"content": "still me",
                                          "message_string": me.message_string()}, timeout=5)
        except Exception:  # closed meanwhile: also fine
            assert not me.sio.sio.connected
        else:
            assert ack["ok"] and ack["message"]["chat_id"] == world["chat_a1"], ack
    assert_quarantine(world, watchers)


def test_server_survived_every_attack_without_a_traceback(live_server):
    assert live_server.process.poll() is None
    assert requests.get(live_server.url + "/healthz", timeout=10).status_code == 200
    log = live_server.log()
    assert "Traceback" not in log and "internal_error" not in log, log[-4000:]
