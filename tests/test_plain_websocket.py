"""/ws/chat end to end with websocket-client, beside Socket.IO clients in the same chats."""

import pytest
import requests
import websocket

from tests.kit.plain import PlainClient
from tests.kit.rest import new_tenant
from tests.kit.sio import connect

pytestmark = pytest.mark.e2e


def test_quick_start_with_api_key_in_the_url_and_content_frames(rt_server):
    tenant = new_tenant(rt_server.url)
    chat = tenant.chat("ann")
    plain = PlainClient(rt_server, api_key=tenant.key, user_id="ann", chat_id=chat)
    try:
        assert [plain.next()["event"], plain.next()["event"]] == ["user_created",
                                                                  "connection_established"]
        for text in ("first", "second"):  # the adapter keeps the message strings
            plain.send({"content": text})
        acks = plain.until("message", 2)
        assert all(ack["ok"] for ack in acks)
        received = plain.until("message_received", 2)
        assert [m["content"] for m in received] == ["first", "second"]
        assert received == tenant.history(chat)
    finally:
        plain.close()


def test_connection_string_and_explicit_message_strings(rt_server):
    tenant = new_tenant(rt_server.url)
    chat = tenant.chat("ann")
    plain = PlainClient(rt_server, chat_id=chat,
                        connection_string=tenant.connection_string(chat))
    try:
        string = plain.until("connection_established")[0]["message_string"]
        plain.send({"content": "with a string", "message_string": string,
                    "client_message_id": "c-1"})
        ack = plain.until("message")[0]
        assert ack["ok"] and ack["message"]["client_message_id"] == "c-1"
        plain.send({"content": "again", "message_string": string})
        error = plain.until("error")[0]
        assert error["code"] == "message_string_reused"
        assert plain.until("message", 2)[1]["error"]["code"] == "message_string_reused"
        plain.send({"event": "get_message_string", "data": {}})
        fresh = plain.until("get_message_string")[0]
        plain.send({"content": "fresh", "message_string": fresh["message_string"]})
        assert plain.until("message", 3)[2]["ok"]
    finally:
        plain.close()


@pytest.mark.parametrize("params, code", [
    ({"api_key": "wc_wrong", "user_id": "ann"}, "invalid_api_key"),
    ({"connection_string": "forged"}, "invalid_connection_string"),
    ({"user_id": "ann"}, "validation_error"),
    ({"api_key": "KEY", "user_id": "mallory"}, "forbidden"),
])
def test_bad_credentials_get_an_error_frame_and_a_closed_socket(rt_server, params, code):
    tenant = new_tenant(rt_server.url)
    chat = tenant.chat("ann")
    params = {k: (tenant.key if v == "KEY" else v) for k, v in params.items()}
    plain = PlainClient(rt_server, chat_id=chat, **params)
    try:
        frame = plain.next()
        assert frame == {"event": "error", "data": frame["data"]}
        assert frame["data"]["code"] == code and frame["data"]["message"]
        with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError,
                            OSError)):
            plain.next()
    finally:
        plain.close()


def test_frames_that_are_not_json_objects_are_answered_and_the_connection_survives(rt_server):
    tenant = new_tenant(rt_server.url)
    chat = tenant.chat("ann")
    plain = PlainClient(rt_server, api_key=tenant.key, user_id="ann", chat_id=chat)
    try:
        plain.until("connection_established")
        for bad in ("not json", "[1, 2]", '"text"', "null", '{"event": "dance"}',
                    '{"content": ""}', '{"content": 5}'):
            plain.send(bad)
        errors = plain.until("error", 7)
        assert {e["code"] for e in errors} == {"validation_error"}
        plain.send({"content": "still here"})
        assert plain.until("message", 3)[-1]["ok"]
        assert requests.get(rt_server.url + "/healthz", timeout=5).status_code == 200
    finally:
        plain.close()


def test_plain_and_socketio_clients_share_a_chat_typing_and_streams(rt_server):
    tenant = new_tenant(rt_server.url)
    chat = tenant.chat("ann", tenant.workspace("ann", members=("bob",), agent={"kind": "echo"}))
    plain = PlainClient(rt_server, api_key=tenant.key, user_id="ann", chat_id=chat)
    bob = connect(rt_server.url, {"chat_id": chat, "api_key": tenant.key, "user_id": "bob"})
    try:
        plain.until("connection_established")
        bob.wait_for("connection_established")
        plain.send({"event": "typing", "data": {"is_typing": True}})
        assert bob.wait_for("typing")[0] == {"user_id": "ann", "is_typing": True}
        plain.send({"content": "hello from plain"})
        assert bob.wait_for("message_received")[0]["content"] == "hello from plain"
        ended = plain.until("message_stream_ended")[0]
        tokens = [d["token"] for d in plain.until("message_stream_token")]
        assert "".join(tokens) == ended["content"] == "hello from plain"
        assert bob.wait_for("message_stream_ended")[0] == ended
        reply = bob.send("hello from socket.io", bob.message_string)
        assert reply["ok"]
        assert plain.until("message_received", 2)[1] == reply["message"]
        assert "typing" not in [f["event"] for f in plain.frames]  # not to the sender
        plain.until("message_stream_ended", 2)  # the echo of bob's message
        plain.send({"event": "stop_generation", "data": {}})
        assert plain.until("stop_generation")[0] == {"ok": True, "stopped": False}
    finally:
        plain.close()
        bob.disconnect()


def test_reconnect_with_last_message_id_replays_what_was_missed(rt_server):
    tenant = new_tenant(rt_server.url)
    chat = tenant.chat("ann")
    ann = connect(rt_server.url, {"chat_id": chat, "api_key": tenant.key, "user_id": "ann"})
    try:
        first = ann.send("before", ann.message_string)
        missed = [ann.send("missed 1", first["next_message_string"])]
        missed.append(ann.send("missed 2", missed[0]["next_message_string"]))
        plain = PlainClient(rt_server, api_key=tenant.key, user_id="ann", chat_id=chat,
                            last_message_id=first["message"]["id"])
        try:
            established = plain.until("connection_established")[0]
            assert established["history_truncated"] is False
            assert plain.until("message_received", 2) == [m["message"] for m in missed]
        finally:
            plain.close()
    finally:
        ann.disconnect()


def test_deleting_the_chat_sends_chat_deleted_and_closes_the_socket(rt_server):
    tenant = new_tenant(rt_server.url)
    chat = tenant.chat("ann")
    plain = PlainClient(rt_server, api_key=tenant.key, user_id="ann", chat_id=chat)
    try:
        plain.until("connection_established")
        assert requests.delete(f"{rt_server.url}/api/v1/chats/{chat}", headers=tenant.headers,
                               timeout=10).status_code == 204
        assert plain.until("chat_deleted")[0] == {"chat_id": chat}
        with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError,
                            OSError)):
            plain.next()
    finally:
        plain.close()
