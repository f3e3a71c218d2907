"""The JavaScript client package (clients/js, npm name workspace-chat-client) on Node, against
the real server: the client rules of contract section 8 (not_connected, reply_pending, the
session's chat, message strings from acks, reconnection with last_message_id and a fresh
connection string)."""
from __future__ import annotations

import pytest

from tests.kit.node import run_js  # noqa: F401 (a fixture)
from tests.kit.sio import connect
from tests.kit.rest import new_tenant

pytestmark = pytest.mark.e2e

@pytest.fixture(scope="module")
def tenant(live_server):
    return new_tenant(live_server.url)


@pytest.fixture
def chat(tenant):
    # A visible stream: the reply is still streaming when the test sends again.
    ws = tenant.workspace("ann", members=("bob",), agent={"kind": "echo", "delay_ms": 40})
    return tenant, tenant.chat("ann", workspace_id=ws)


@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_js_client_sends_streams_and_follows_the_client_rules(live_server, run_js, chat,
                                                              transport):
    tenant, chat_id = chat
    result = run_js({"url": live_server.url, "api_key": tenant.key, "chat_id": chat_id,
                     "scenario": "basics", "transports": [transport]})
    assert result["not_connected"] == "not_connected", result
    assert result["session"]["chatId"] == chat_id and result["session"]["userId"] == "ann"
    assert result["session"]["connected"] is True and result["session"]["sid"]
    assert result["typing"] == {"user_id": "bob", "is_typing": True}
    # send resolves with the stored message object
    message = result["message"]
    assert message["content"] == "hello there world" and message["role"] == "user"
    assert message["chat_id"] == chat_id and message["user_id"] == "ann"
    assert message["id"].isdigit() and message["client_message_id"]
    # its own refusal while its reply streams, distinct from the server's chat_busy
    assert result["reply_pending_flag"] is True
    assert result["second_send"] == "reply_pending"
    assert result["stream_reply_to"] == message["id"]
    assert result["bob_send_while_streaming"] == "chat_busy"
    assert result["stream_content"] == "hello there world" == result["tokens_joined"]
    assert result["after_end_pending"] is False
    assert result["after_end_send"] == "after the reply"
    assert result["stop_when_idle"] is False
    assert result["reconnected_sid_changed"] is True
    # the backend's refusal to hand out a connection string rejects connect()
    assert result["bad_chat"] == "chat_not_found"
    assert result["disconnected"] is False
    history = tenant.history(chat_id)
    stored = [m["content"] for m in history if m["role"] == "user"]
    assert stored.count("hello there world") == 1 and "again" not in stored


def test_js_client_reconnects_by_itself_and_is_replayed_what_it_missed(live_server, run_js,
                                                                        chat):
    tenant, chat_id = chat
    result = run_js({"url": live_server.url, "api_key": tenant.key, "chat_id": chat_id,
                     "scenario": "reconnect"})
    assert result["disconnect_reason"] == "forced close", result  # engine.close() under it
    assert result["missed_replayed"] is True, result
    assert result["no_duplicates"] is True and result["in_order"] is True, result
    assert result["fresh_strings"] >= 2, result  # one per connection attempt
    assert result["send_after_reconnect"] == "back again"


def test_js_client_keeps_reconnecting_while_its_backend_is_down(live_server, run_js, chat):
    tenant, chat_id = chat
    result = run_js({"url": live_server.url, "api_key": tenant.key, "chat_id": chat_id,
                     "scenario": "backendDown"})
    assert result["reconnected"] is True and result["failures_left"] == 0, result
    assert result["errors"].count("not_connected") == 2, result  # said, not fatal
    assert result["sent"] == "after the outage"


def test_the_ack_says_whether_a_reply_will_stream(live_server, chat):
    tenant, chat_id = chat
    silent_ws = tenant.workspace("ann")  # kind none: nothing replies
    silent = tenant.chat("ann", workspace_id=silent_ws)
    for chat, expected in ((silent, False), (chat_id, True)):
        client = connect(live_server.url, {"chat_id": chat, "connection_string":
                                           tenant.connection_string(chat, "ann")})
        try:
            ack = client.send("nobody answers", client.message_string,
                              client_message_id=f"once-{chat}")
            assert ack["ok"] is True and ack["reply_expected"] is expected, ack
            if expected:
                client.wait_for("message_stream_ended")
                again = client.send("nobody answers", ack["next_message_string"],
                                    client_message_id=ack["message"]["client_message_id"])
                # a retry of a stored message starts no second reply
                assert again["ok"] and again["reply_expected"] is False, again
        finally:
            client.disconnect()
