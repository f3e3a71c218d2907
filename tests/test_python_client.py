"""The Python client ``ChatClient`` (CONTRACT.md section 8) against the real server process.

Everything goes through what the server exposes: REST with the tenant's key, Socket.IO on
``/chat``. Waits are bounded (conditions with deadlines), never fixed sleeps.
"""
from __future__ import annotations

import functools
import socket
import threading
from typing import Any

import pytest
import requests
from engineio.payload import Payload

from workspace_chat_client import (
    ChatClient,
    ChatError,
    ChatTimeoutError,
    ConnectionRefused,
    NotConnectedError,
    ReplyPendingError,
)
from tests import agents
from tests.kit import record as kit_record
from tests.kit.rest import Tenant, new_tenant
from tests.kit.servers import restart_server, start_server, stop_server

pytestmark = pytest.mark.e2e

# Many messages in a row; connection strings short-lived, so that a reconnect can only work
# with a fresh one (see the reconnect test).
CONNECTION_STRING_TTL = 3
SERVER_ENV = {"RATE_LIMIT_MESSAGES": "100000/second",
              "CONNECTION_STRING_TTL": str(CONNECTION_STRING_TTL), "PYTHON_AGENTS": agents.ALLOWED}
SCRIPTED = {"kind": "python", "callable": "tests.agents:scripted"}


# --- helpers -------------------------------------------------------------------------------

class Recorder(kit_record.Recorder):
    """Collects what a client's callbacks are given, in order, and waits for it."""

    timeout = 15

    def __init__(self, client: ChatClient | None = None):
        super().__init__()
        if client is not None:
            self.attach(client)

    def attach(self, client: ChatClient) -> None:
        for name in ("message", "token", "stream_start", "stream_end", "error", "connect",
                     "disconnect"):
            getattr(client, f"on_{name}")(functools.partial(self.record, name))


def team(tenant: Tenant, owner: str = "ann", members: tuple[str, ...] = ("bob",),
         agent: dict | None = None) -> str:
    """A workspace (with ``agent``) and a chat in it; returns the chat id."""
    body = {"agent": agent} if agent else {}
    return tenant.chat(owner, tenant.workspace(owner, members=members, **body))


def client(server, tenant: Tenant, user: str, **options: Any) -> ChatClient:
    return ChatClient(server.url, tenant.key, user, **options)


def agent_messages(tenant: Tenant, chat_id: str) -> list[dict]:
    return [m for m in tenant.history(chat_id) if m["role"] == "agent"]


def drop(chat_client: ChatClient) -> None:
    """Cut the client's WebSocket under it, as a network failure would (not a disconnect
    the client asked for)."""
    chat_client._conn.sio.eio.ws.sock.shutdown(socket.SHUT_RDWR)




@pytest.fixture
def own_server(tmp_path):
    """A server of the test's own, which it may restart (``servers[0]`` is the current one)."""
    servers = [start_server(tmp_path, **SERVER_ENV)]
    yield servers
    stop_server(servers[0].process)


# --- connect, send, receive ----------------------------------------------------------------

def test_two_clients_talk_and_the_session_follows(live_server):
    tenant = new_tenant(live_server.url)
    chat_id = team(tenant)
    with client(live_server, tenant, "ann") as ann, client(live_server, tenant, "bob") as bob:
        bob_seen = Recorder(bob)
        session = ann.connect(chat_id)
        assert session.connected and session.chat_id == chat_id and session.user_id == "ann"
        assert session.message_string and session.sid and session.last_message_id is None
        assert session.agent_kind == "none"
        bob.connect(chat_id)
        assert bob_seen.wait_for("connect")[0]["chat_id"] == chat_id

        sent = ann.send("hello bob")
        assert sent.message["content"] == "hello bob" and sent.message["user_id"] == "ann"
        assert sent.expects_reply is False and sent.wait() is None and list(sent) == []
        # the ack's next_message_string is stored for the next send
        assert ann.session.message_string and ann.session.message_string != session.message_string
        assert ann.last_message_id == sent.id

        # callbacks, the inbox and the iterator all see it once
        assert bob_seen.wait_for("message")[0] == sent.message
        assert bob.receive(timeout=10) == sent.message
        answer = bob.send("hi ann")
        received = []
        for message in ann.messages(timeout=10):
            received.append(message)
            if message["id"] == answer.id:
                break
        assert received == [sent.message, answer.message]
        assert ann.last_message_id == bob.last_message_id == answer.id
        assert [m["id"] for m in tenant.history(chat_id)] == [sent.id, answer.id]
    assert not ann.connected and not bob.connected


def test_create_chat_and_connect_to_it(live_server):
    tenant = new_tenant(live_server.url)
    ws = tenant.workspace("ann")
    with client(live_server, tenant, "ann") as ann:
        default_chat = ann.create_chat()
        titled = ann.create_chat(title="Plans", workspace_id=ws, metadata={"k": 1})
        assert titled["workspace_id"] == ws and titled["title"] == "Plans"
        assert titled["user_id"] == "ann" and titled["metadata"] == {"k": 1}
        assert default_chat["workspace_id"] != ws
        ann.connect(titled["id"])
        assert ann.send("first").message["chat_id"] == titled["id"]
        with pytest.raises(ChatError) as refused:
            ann.create_chat(workspace_id="nope")
        assert refused.value.code == "workspace_not_found" and refused.value.status == 404


def test_send_is_refused_when_not_connected(live_server):
    tenant = new_tenant(live_server.url)
    chat_id = team(tenant)
    ann = client(live_server, tenant, "ann")
    with pytest.raises(NotConnectedError, match="connect"):
        ann.send("nobody listens")
    ann.connect(chat_id)
    ann.send("now it works")
    ann.disconnect()
    assert not ann.connected and ann.session.chat_id == chat_id
    with pytest.raises(NotConnectedError):
        ann.send("gone")
    assert [m["content"] for m in tenant.history(chat_id)] == ["now it works"]


def test_send_is_refused_while_the_reply_is_awaited(live_server):
    tenant = new_tenant(live_server.url)
    chat_id = team(tenant, agent=SCRIPTED)
    with client(live_server, tenant, "ann") as ann, client(live_server, tenant, "bob") as bob:
        ann.connect(chat_id)
        bob.connect(chat_id)
        sent = ann.send("tokens 20 0.05")
        assert sent.expects_reply and ann.reply_pending
        # at once (the stream may not have started yet) and while it streams
        with pytest.raises(ReplyPendingError) as refused:
            ann.send("too early")
        assert refused.value.code == "reply_pending"  # the client's own rule, not the server's chat_busy
        next(iter(sent.tokens(timeout=10)))
        with pytest.raises(ReplyPendingError):
            ann.send("still streaming")
        # another user's client sees the stream too, and refuses as well
        next(iter(bob.stream_reply(timeout=10)))
        assert bob.reply_pending and bob.wait_idle(timeout=0) is False
        with pytest.raises(ReplyPendingError):
            bob.send("me neither")

        assert sent.wait(timeout=10) == "".join(f"t{i} " for i in range(20))
        assert sent.reply_done and sent.finish_reason == "stop" and not ann.reply_pending
        assert bob.wait_idle(timeout=10)
        after = ann.send("after the reply")
        assert [m["content"] for m in tenant.history(chat_id) if m["role"] == "user"] == \
            ["tokens 20 0.05", "after the reply"]
        after.wait(timeout=10)


def test_streamed_reply_through_callbacks_and_iterators_equals_the_stored_message(live_server):
    tenant = new_tenant(live_server.url)
    chat_id = team(tenant, agent=SCRIPTED)
    with client(live_server, tenant, "ann") as ann, client(live_server, tenant, "bob") as bob:
        seen = Recorder(ann)
        ann.connect(chat_id)
        bob.connect(chat_id)
        bob_tokens: list[str] = []
        # bob iterates over the next reply from another thread, before it starts
        reader = threading.Thread(target=lambda: bob_tokens.extend(bob.stream_reply(timeout=15)))
        reader.start()
        sent = ann.send("tokens 30 0.01")
        iterated = list(ann.stream_reply(timeout=15))
        reader.join(20)
        assert not reader.is_alive()

        stored = agent_messages(tenant, chat_id)
        assert len(stored) == 1 and stored[0]["reply_to"] == sent.id
        content = stored[0]["content"]
        assert content == "".join(f"t{i} " for i in range(30))
        assert "".join(iterated) == "".join(bob_tokens) == content
        assert "".join(sent.tokens()) == sent.wait() == content  # replayable once ended
        assert sent.reply_id == stored[0]["id"]

        ended = seen.wait_for("stream_end")[0]
        assert ended == {"message_id": stored[0]["id"], "chat_id": chat_id, "content": content,
                         "finish_reason": "stop"}
        started = seen.named("stream_start")[0]
        assert started["message_id"] == stored[0]["id"] and started["reply_to"] == sent.id
        tokens = seen.named("token")
        # STREAM_FLUSH_MS may join tokens that come within 20 ms: gap-free, not one per token
        assert 1 <= len(tokens) <= 30
        assert [t["index"] for t in tokens] == list(range(len(tokens)))
        assert "".join(t["token"] for t in tokens) == content
        # the agent's reply counts as seen once it has ended
        assert ann.last_message_id == stored[0]["id"]


def test_agent_failure_reaches_on_error_and_ends_the_stream(live_server):
    tenant = new_tenant(live_server.url)
    chat_id = team(tenant, agent=SCRIPTED)
    with client(live_server, tenant, "ann") as ann:
        seen = Recorder(ann)
        ann.connect(chat_id)
        sent = ann.send("fail 2")
        assert sent.wait(timeout=15) == "t0 t1 "
        assert sent.finish_reason == "error"
        error = seen.wait_for("error")[0]
        assert isinstance(error, ChatError) and error.code == "agent_error"
        assert "hunter2" not in error.message
        assert seen.wait_for("stream_end")[0]["finish_reason"] == "error"


def test_connect_to_another_chat_leaves_the_first(live_server):
    tenant = new_tenant(live_server.url)
    first, second = team(tenant), team(tenant)
    with client(live_server, tenant, "ann") as ann, client(live_server, tenant, "bob") as bob:
        seen = Recorder(ann)
        ann.connect(first)
        bob.connect(first)
        ann.connect(second)
        assert seen.wait_for("disconnect")[0] == {"reason": "client disconnect",
                                                  "reconnecting": False}
        assert len(seen.wait_for("connect", 2)) == 2
        assert ann.session.chat_id == second and ann.connected

        in_first = bob.send("only for the first chat")
        with pytest.raises(ChatError) as mismatch:
            ann.send("wrong chat", chat_id=first)
        assert mismatch.value.code == "chat_mismatch"
        mine = ann.send("in the second chat", chat_id=second)
        # ann's own message in the second chat comes after bob's (sent earlier) would have
        assert ann.receive(timeout=10) == mine.message
        assert in_first.id not in [m["id"] for m in seen.named("message")]
        assert [m["content"] for m in tenant.history(first)] == ["only for the first chat"]
        assert [m["content"] for m in tenant.history(second)] == ["in the second chat"]


def test_refusals_raise_chat_errors_with_the_contract_codes(live_server):
    tenant = new_tenant(live_server.url)
    chat_id = team(tenant)
    with client(live_server, tenant, "ann") as ann:
        ann.connect(chat_id)
        for content in ("x" * 4001, "   "):
            with pytest.raises(ChatError) as invalid:
                ann.send(content)
            assert invalid.value.code == "validation_error", invalid.value
            assert invalid.value.message and isinstance(invalid.value.details, dict)
        assert ann.send("x" * 4000).message["content"] == "x" * 4000

    outsider = client(live_server, tenant, "mallory")
    with pytest.raises(ConnectionRefused) as forbidden:
        outsider.connect(chat_id)
    assert forbidden.value.code == "forbidden" and not outsider.connected
    with pytest.raises(ConnectionRefused) as missing:
        client(live_server, tenant, "ann").connect("no-such-chat")
    assert missing.value.code == "chat_not_found"
    with pytest.raises(ConnectionRefused) as bad_key:
        ChatClient(live_server.url, "wc_not_a_key", "ann").connect(chat_id)
    assert bad_key.value.code == "invalid_api_key"


def test_a_spent_message_string_is_replaced_by_a_fresh_one(live_server):
    tenant = new_tenant(live_server.url)
    chat_id = team(tenant)
    with client(live_server, tenant, "ann") as ann:
        ann.connect(chat_id)
        spent = ann.session.message_string
        ann.send("one")
        # put the string already used back (as if the client had lost track): the server
        # answers message_string_reused, the client asks for a fresh one and sends again
        ann._conn.message_string = spent
        assert ann.send("two").message["content"] == "two"
        ann._conn.message_string = None
        assert ann.send("three").message["content"] == "three"
        assert [m["content"] for m in tenant.history(chat_id)] == ["one", "two", "three"]
        assert ann.get_message_string() == ann.session.message_string


def test_connect_with_last_message_id_replays_what_came_after(live_server):
    tenant = new_tenant(live_server.url)
    chat_id = team(tenant)
    with client(live_server, tenant, "ann") as ann, client(live_server, tenant, "bob") as bob:
        ann.connect(chat_id)
        sent = [ann.send(f"m{i}") for i in range(5)]
        seen = Recorder(bob)
        session = bob.connect(chat_id, last_message_id=sent[1].id)
        assert session.history_truncated is False
        replayed = seen.wait_for("message", 3)
        assert [m["id"] for m in replayed] == [s.id for s in sent[2:]]
        assert bob.last_message_id == sent[-1].id


# --- reconnecting --------------------------------------------------------------------------

def test_reconnects_after_a_drop_with_a_fresh_string_and_gets_the_missed_messages_once(
        live_server):
    tenant = new_tenant(live_server.url)
    chat_id = team(tenant)
    # It comes back after longer than a connection string lives: only a fresh one works.
    delay = CONNECTION_STRING_TTL + 1.5
    with client(live_server, tenant, "ann") as ann, \
            client(live_server, tenant, "bob", reconnect_delay=delay) as bob:
        seen = Recorder(bob)
        ann.connect(chat_id)
        bob.connect(chat_id)
        before = ann.send("before the drop")
        seen.wait_for("message")
        first_sid = bob.session.sid

        drop(bob)
        gone = seen.wait_for("disconnect")[0]
        assert gone["reconnecting"] is True and not bob.connected
        assert bob.session.reconnecting
        missed = [ann.send(f"missed {i}") for i in range(5)]
        seen.wait_for("connect", 2, timeout=30)
        assert bob.connected and bob.session.sid != first_sid and bob.session.connects == 2
        assert bob.session.history_truncated is False  # it sent last_message_id

        live = ann.send("after the reconnect")
        messages = seen.wait_for("message", 7)
        assert [m["id"] for m in messages] == [before.id] + [m.id for m in missed] + [live.id]
        # nothing more comes: bob sends a sentinel and sees it right after ann's last
        sentinel = bob.send("back")
        assert [m["id"] for m in seen.wait_for("message", 8)][-2:] == [live.id, sentinel.id]
        assert bob.last_message_id == sentinel.id


def test_a_reply_keeps_streaming_to_the_iterator_across_a_reconnect(live_server):
    tenant = new_tenant(live_server.url)
    chat_id = team(tenant, agent=SCRIPTED)
    with client(live_server, tenant, "ann") as ann, \
            client(live_server, tenant, "bob", reconnect_delay=0.2) as bob:
        seen = Recorder(bob)
        ann.connect(chat_id)
        bob.connect(chat_id)
        sent = ann.send("tokens 30 0.05")
        got: list[str] = []
        for token in bob.stream_reply(timeout=15):
            got.append(token)
            if len(got) == 5:
                drop(bob)
        content = sent.wait(timeout=15)
        assert content == "".join(f"t{i} " for i in range(30))
        assert "".join(got) == content
        assert len(seen.wait_for("connect", 2)) == 2
        assert agent_messages(tenant, chat_id)[0]["content"] == content
        # the stream went on in the same chat; bob may send again once it ended
        assert bob.wait_idle(timeout=10)
        bob.send("thanks").wait(timeout=15)


def test_reconnects_after_a_server_restart_and_gets_what_was_sent_meanwhile(own_server):
    server = own_server[0]
    tenant = new_tenant(server.url)
    chat_id = team(tenant)
    # ann comes back as soon as the new server is up (the client's first attempt after the
    # server closed the connection waits 3 s, until the old process is gone), bob some
    # seconds later
    with client(server, tenant, "ann", reconnect_delay=0.1, reconnect_delay_max=0.5) as ann, \
            client(server, tenant, "bob", reconnect_delay=10, reconnect_delay_max=10) as bob:
        ann_seen, bob_seen = Recorder(ann), Recorder(bob)
        ann.connect(chat_id)
        bob.connect(chat_id)
        before = ann.send("before the restart")
        bob_seen.wait_for("message")

        own_server[0] = restart_server(server)
        assert bob_seen.wait_for("disconnect")[0]["reconnecting"] is True
        assert ann_seen.wait_for("disconnect")[0]["reconnecting"] is True
        ann_seen.wait_for("connect", 2, timeout=30)
        meanwhile = [ann.send(f"while bob was away {i}") for i in range(3)]
        bob_seen.wait_for("connect", 2, timeout=60)
        after = ann.send("after")
        got = bob_seen.wait_for("message", 5)
        assert [m["id"] for m in got] == [before.id] + [m.id for m in meanwhile] + [after.id]
        assert bob.send("bob is back").message["content"] == "bob is back"


def test_a_deleted_chat_ends_the_session_without_reconnecting(live_server):
    import requests

    tenant = new_tenant(live_server.url)
    chat_id = team(tenant)
    with client(live_server, tenant, "ann", reconnect_delay=0.1) as ann:
        seen = Recorder(ann)
        ann.connect(chat_id)
        r = requests.delete(f"{live_server.url}/api/v1/chats/{chat_id}", headers=tenant.headers,
                            timeout=10)
        assert r.status_code == 204
        assert seen.wait_for("disconnect")[0] == {"reason": "chat deleted",
                                                  "reconnecting": False}
        assert not ann.connected and not ann.session.reconnecting
        with pytest.raises(NotConnectedError):
            ann.send("anyone?")


# --- polling -------------------------------------------------------------------------------

def test_polling_carries_a_reply_longer_than_16_packets_and_a_long_replay(live_server,
                                                                           monkeypatch):
    # python-engineio's default: a polling response with more than 16 packets is dropped
    monkeypatch.setattr(Payload, "max_decode_packets", 16)
    tenant = new_tenant(live_server.url)
    chat_id = team(tenant, agent=SCRIPTED)
    with client(live_server, tenant, "ann", transports=("polling",)) as ann, \
            client(live_server, tenant, "bob", transports="polling") as bob:
        assert Payload.max_decode_packets > 16
        seen = Recorder(ann)
        ann.connect(chat_id)
        sent = ann.send("tokens 200 0")  # a burst: hundreds of packets per polling response
        content = sent.wait(timeout=20)
        assert content == "".join(f"t{i} " for i in range(200))
        seen.wait_for("stream_end")
        assert "".join(t["token"] for t in seen.named("token")) == content
        assert seen.named("disconnect") == [] and ann.session.connects == 1

        first = sent.id
        for i in range(30):
            ann.send(f"hello {i}").wait(timeout=15)
        bob_seen = Recorder(bob)
        bob.connect(chat_id, last_message_id=first)
        replayed = bob_seen.wait_for("message", 61)  # 30 questions, 31 replies
        assert [m["id"] for m in replayed] == [m["id"] for m in tenant.history(chat_id)][1:]
        assert bob_seen.named("disconnect") == [] and bob.session.connects == 1


def test_iterators_time_out_instead_of_hanging(live_server):
    tenant = new_tenant(live_server.url)
    chat_id = team(tenant)
    with client(live_server, tenant, "ann") as ann:
        ann.connect(chat_id)
        with pytest.raises(ChatTimeoutError):
            next(iter(ann.stream_reply(timeout=0.2)))
        with pytest.raises(ChatTimeoutError):
            ann.receive(timeout=0.2)
        assert list(ann.messages(timeout=0.2)) == []
