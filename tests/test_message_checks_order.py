"""CONTRACT.md section 3: the ORDER of the ``message`` checks, in process (no server).

payload shape and content -> chat_id -> message string genuine -> unexpired -> unused -> this
connection's -> client_message_id idempotency -> per-connection rate -> chat busy.

Each test sends a message that is wrong in two adjacent ways and gets the earlier check's code
(or, for idempotency, the original message); a control shows the later check alone does fire.
Only events and acks are used, through Flask-SocketIO's test client on the ``app`` fixture
(SQLite and PostgreSQL).
"""
from __future__ import annotations

import time
from datetime import datetime

import pytest

from tests.kit.inprocess import InProcessClient
from tests.kit.wait import wait_until

#: An echo agent this slow keeps its chat busy (streaming) until the test stops it.
SLOW_AGENT = {"kind": "echo", "delay_ms": 1000}
SLOW_REPLY = " ".join(f"w{i}" for i in range(60))


@pytest.fixture
def connect(app, tenant):
    """connect(chat_id, user_id="alice"): a joined in-process client, disconnected at the end."""
    clients: list[InProcessClient] = []

    def open_client(chat_id: str, user_id: str = "alice") -> InProcessClient:
        client = InProcessClient(app, {"chat_id": chat_id, "api_key": tenant.key,
                                       "user_id": user_id})
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        client.disconnect()


@pytest.fixture
def chat(tenant) -> str:
    """Alice's chat in a workspace without an agent, bob a member of it."""
    workspace = tenant.workspace("alice")["id"]
    assert tenant.api.put(f"/api/v1/workspaces/{workspace}/members/bob").status_code == 204
    return tenant.chat("alice", workspace)["id"]


@pytest.fixture
def busy_chat(tenant, connect):
    """(chat id, client): a chat whose agent reply is streaming; stopped at the end."""
    chat_id = tenant.chat("alice", tenant.workspace("alice", agent=SLOW_AGENT)["id"])["id"]
    client = connect(chat_id)
    ack = client.send(SLOW_REPLY, client.message_string, client_message_id="first")
    assert ack["ok"] is True and ack["reply_expected"] is True, ack
    yield chat_id, client
    assert client.call("stop_generation")["ok"] is True
    wait_until(lambda: client.received("message_stream_ended"), 15,
               "the stopped reply's message_stream_ended")


def code(ack: dict) -> str:
    assert ack["ok"] is False, ack
    return ack["error"]["code"]


def expiry(ack: dict) -> float:
    return datetime.fromisoformat(ack["expires_at"].replace("Z", "+00:00")).timestamp()


def test_content_is_checked_before_chat_id(chat, connect):
    client = connect(chat)
    assert code(client.send("   ", client.message_string, chat_id="another")) == \
        "validation_error"
    assert code(client.send("hi", client.message_string, chat_id="another")) == "chat_mismatch"


def test_chat_id_is_checked_before_the_message_string(chat, connect):
    client = connect(chat)
    assert code(client.send("hi", "forged", chat_id="another")) == "chat_mismatch"
    assert code(client.send("hi", "forged", chat_id=chat)) == "invalid_message_string"


def test_a_string_is_checked_genuine_before_unexpired(app, chat, connect, monkeypatch):
    client = connect(chat)
    monkeypatch.setitem(app.config, "MESSAGE_STRING_TTL", -10)  # issued already expired
    expired = client.new_message_string()
    tampered = expired[:-2] + ("AA" if not expired.endswith("AA") else "BB")
    assert code(client.send("hi", tampered)) == "invalid_message_string"
    assert code(client.send("hi", expired)) == "message_string_expired"


def test_a_string_is_checked_unexpired_before_unused(app, chat, connect, monkeypatch):
    client = connect(chat)
    monkeypatch.setitem(app.config, "MESSAGE_STRING_TTL", 1)
    ack = client.call("get_message_string")
    string = ack["message_string"]
    assert client.send("first", string)["ok"] is True
    assert code(client.send("again", string)) == "message_string_reused"
    wait_until(lambda: time.time() > expiry(ack) + 0.05, 10, "the message string to expire")
    assert code(client.send("again", string)) == "message_string_expired"


def test_a_string_is_checked_unused_before_this_connections(chat, connect):
    owner, other = connect(chat), connect(chat, "bob")
    spent, unspent = owner.message_string, owner.new_message_string()
    assert owner.send("first", spent)["ok"] is True
    assert code(other.send("hi", spent)) == "message_string_reused"
    assert code(other.send("hi", unspent)) == "invalid_message_string"


def test_the_message_string_is_checked_before_client_message_id_idempotency(chat, connect):
    owner, other = connect(chat), connect(chat, "bob")
    first = owner.send("first", owner.message_string, client_message_id="m1")
    assert first["ok"] is True, first
    # another connection's string, and this connection's string already spent, with a
    # client_message_id the chat has: refused for the string, not answered with the original
    assert code(other.send("first", owner.new_message_string(),
                           client_message_id="m1")) == "invalid_message_string"
    assert code(owner.send("first", owner.message_string,
                           client_message_id="m1")) == "message_string_reused"
    retry = other.send("first", other.message_string, client_message_id="m1")
    assert retry["ok"] is True and retry["message"] == first["message"], retry


def test_client_message_id_idempotency_is_checked_before_the_rate(chat, connect):
    client = connect(chat)
    first = client.send("first", client.message_string, client_message_id="m1")
    string = first["next_message_string"]
    for attempt in range(200):
        ack = client.send(f"more {attempt}", string)
        if not ack["ok"]:
            break
        string = ack["next_message_string"]
    assert code(ack) == "rate_limited", ack
    retry = client.send("first", client.new_message_string(), client_message_id="m1")
    assert retry["ok"] is True and retry["message"] == first["message"], retry


def test_the_rate_is_checked_before_the_chat_busy(busy_chat):
    _, client = busy_chat
    codes = []
    while "rate_limited" not in codes and len(codes) < 200:
        codes.append(code(client.send("more", client.new_message_string())))
    assert codes[0] == "chat_busy", codes
    assert codes[-1] == "rate_limited" and set(codes) == {"chat_busy", "rate_limited"}, codes


def test_client_message_id_idempotency_is_checked_before_the_chat_busy(busy_chat):
    _, client = busy_chat
    assert code(client.send("other", client.new_message_string())) == "chat_busy"
    retry = client.send(SLOW_REPLY, client.new_message_string(), client_message_id="first")
    assert retry["ok"] is True and retry["message"]["client_message_id"] == "first", retry
    assert retry["message"]["content"] == SLOW_REPLY
