"""The /chat namespace end to end: a real server process (eventlet and gevent), real clients."""
import pytest

from tests.kit.rest import new_tenant
from tests.kit.sio import connect, refusal_code

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_connect_with_connection_string_sends_user_created_then_connection_established(
        rt_server, transport):
    tenant = new_tenant(rt_server.url)
    chat = tenant.chat("ann")
    client = connect(rt_server.url, {"chat_id": chat,
                                     "connection_string": tenant.connection_string(chat)},
                     transport)
    try:
        established = client.wait_for("connection_established")[0]
        assert client.names()[:2] == ["user_created", "connection_established"]
        assert client.named("user_created") == [{"user_id": "ann"}]
        assert established["chat_id"] == chat and established["user_id"] == "ann"
        assert established["sid"] and established["message_string"]
        assert established["message_string_expires_at"].endswith("Z")
        assert established["server_time"].endswith("Z")
    finally:
        client.disconnect()

    again = connect(rt_server.url, {"chat_id": chat,
                                    "connection_string": tenant.connection_string(chat)},
                    transport)
    try:
        again.wait_for("connection_established")
        assert "user_created" not in again.names()
    finally:
        again.disconnect()


def test_message_is_stored_then_broadcast_to_every_client_in_the_chat(rt_server):
    tenant = new_tenant(rt_server.url)
    ws = tenant.workspace("ann", members=("bob",))
    chat = tenant.chat("ann", ws)
    ann = connect(rt_server.url, {"chat_id": chat, "api_key": tenant.key, "user_id": "ann"})
    bob = connect(rt_server.url, {"chat_id": chat,
                                  "connection_string": tenant.connection_string(chat, "bob")},
                  "polling")
    try:
        ack = ann.send("hello bob", ann.message_string, client_message_id="m1")
        assert ack["ok"] is True and ack["next_message_string"]
        message = ack["message"]
        assert message["content"] == "hello bob" and message["role"] == "user"
        assert message["user_id"] == "ann" and message["client_message_id"] == "m1"
        assert bob.wait_for("message_received")[0] == message
        assert ann.wait_for("message_received")[0] == message
        assert tenant.history(chat) == [message]
    finally:
        ann.disconnect()
        bob.disconnect()


def test_refused_connection_carries_the_contract_code(rt_server):
    tenant = new_tenant(rt_server.url)
    chat = tenant.chat("ann")
    client = connect(rt_server.url, {"chat_id": chat, "connection_string": "forged"})
    assert refusal_code(client) == "invalid_connection_string"
    assert client.connect_error["message"]
    assert not client.sio.connected
