"""The chat session layer in-process (app/chat/session.py): its registry of open connections,
joining and leaving, lease renewal, the kept message string, typing across transports and error
counting, through Flask-SocketIO's test client and a /ws/chat-style session joined the way
app/ws/routes.py joins one.
"""
from __future__ import annotations

import uuid

import pytest
import redis

from app.chat import session
from app.chat.connections import authorize_connection, shared_state
from app.errors import ApiError
from app.extensions import socketio
from tests.kit.servers import service_missing

NAMESPACE = "/chat"
REDIS_URL = "redis://127.0.0.1:6379/9"


def metric(app, name: str, **labels: str) -> float:
    return app.extensions["metrics"].registry.get_sample_value(name, labels) or 0.0


def socketio_client(app, tenant, chat_id: str):
    client = socketio.test_client(app, namespace=NAMESPACE, auth={
        "chat_id": chat_id, "api_key": tenant.key, "user_id": "alice"})
    assert client.is_connected(NAMESPACE)
    return client


def established(client) -> dict:
    events = client.get_received(NAMESPACE)
    return next(e["args"][0] for e in events if e["name"] == "connection_established")


class PlainSession:
    """A /ws/chat-style connection joined as app/ws/routes.py joins one: a manager listener
    whose frames are recorded."""

    def __init__(self, tenant, chat_id: str) -> None:
        self.sid = "ws:" + uuid.uuid4().hex
        self.frames: list[tuple[str, object]] = []
        self.closed = False
        self.connection, first = authorize_connection(self.sid, None, {
            "chat_id": chat_id, "api_key": tenant.key, "user_id": "alice"})
        manager = socketio.server.manager

        def subscribe(room: str):
            manager.add_listener(room, self.sid, self.deliver, self.close)
            return lambda: manager.remove_listener(room, self.sid)

        self.session = session.join(self.connection, first, session.WEBSOCKET,
                                    subscribe=subscribe, send=self.deliver,
                                    fills_in_string=True)

    def deliver(self, event: str, data: object) -> None:
        self.frames.append((event, data))

    def close(self) -> None:
        self.closed = True

    def named(self, event: str) -> list:
        return [data for name, data in self.frames if name == event]


def test_a_socketio_connection_is_registered_and_counted_until_it_disconnects(app, tenant):
    chat_id = tenant.chat("alice")["id"]
    gauge = metric(app, "workspace_chat_socket_connections")
    connects = metric(app, "workspace_chat_socket_connects_total")
    client = socketio_client(app, tenant, chat_id)
    sid = established(client)["sid"]
    registered = session.get(sid)
    assert registered.transport == session.SOCKETIO
    assert session.connections[sid].chat_id == chat_id and sid in session.sids(session.SOCKETIO)
    assert metric(app, "workspace_chat_socket_connections") == gauge + 1
    assert metric(app, "workspace_chat_socket_connects_total") == connects + 1
    assert shared_state().connection_count(tenant.id) == 1

    client.disconnect(namespace=NAMESPACE)
    assert session.get(sid) is None and sid not in session.connections
    assert metric(app, "workspace_chat_socket_connections") == gauge
    assert shared_state().connection_count(tenant.id) == 0


def test_the_kept_message_string_follows_connection_established_acks_and_requests(app, tenant):
    chat_id = tenant.chat("alice")["id"]
    client = socketio_client(app, tenant, chat_id)
    first = established(client)
    kept = session.get(first["sid"])
    try:
        assert kept.message_string == first["message_string"]
        ack = client.emit("message", {"content": "hi", "message_string": kept.message_string},
                          namespace=NAMESPACE, callback=True)
        assert ack["ok"] is True and kept.message_string == ack["next_message_string"]
        fresh = client.emit("get_message_string", {}, namespace=NAMESPACE, callback=True)
        assert kept.message_string == fresh["message_string"]
        # Socket.IO does not fill a missing string in (only /ws/chat does)
        refused = client.emit("message", {"content": "hi"}, namespace=NAMESPACE, callback=True)
        assert refused["ok"] is False and refused["error"]["code"] == "invalid_message_string"
    finally:
        client.disconnect(namespace=NAMESPACE)


def test_a_plain_session_fills_in_its_kept_string_and_replaces_it_after_a_string_error(
        app, tenant):
    chat_id = tenant.chat("alice")["id"]
    with app.test_request_context():
        plain = PlainSession(tenant, chat_id)
        try:
            assert [e for e, _ in plain.frames] == ["user_created", "connection_established"]
            ack = session.handle(plain.sid, "message", {"content": "first"})
            assert ack["ok"] is True and plain.session.message_string == ack["next_message_string"]
            spent = ack["next_message_string"]
            session.handle(plain.sid, "message", {"content": "second"})
            with pytest.raises(ApiError) as reused:
                session.handle(plain.sid, "message", {"content": "again",
                                                      "message_string": spent})
            assert reused.value.code == "message_string_reused"
            assert plain.session.message_string not in (None, spent)
            assert session.handle(plain.sid, "message", {"content": "third"})["ok"] is True
            assert [m["content"] for m in plain.named("message_received")] == \
                ["first", "second", "third"]
        finally:
            session.leave(plain.sid)
        assert session.get(plain.sid) is None
        assert shared_state().connection_count(tenant.id) == 0


def test_typing_reaches_the_other_transport_and_never_its_sender(app, tenant):
    chat_id = tenant.chat("alice")["id"]
    client = socketio_client(app, tenant, chat_id)
    client.get_received(NAMESPACE)
    with app.test_request_context():
        plain = PlainSession(tenant, chat_id)
        try:
            client.emit("typing", {"is_typing": True}, namespace=NAMESPACE)
            assert plain.named("typing") == [{"user_id": "alice", "is_typing": True}]
            assert client.get_received(NAMESPACE) == []  # not sent back to its sender

            assert session.handle(plain.sid, "typing", {"is_typing": False}) is None
            received = client.get_received(NAMESPACE)
            assert [(e["name"], e["args"][0]) for e in received] == [
                ("typing", {"user_id": "alice", "is_typing": False})]
            assert len(plain.named("typing")) == 1
        finally:
            session.leave(plain.sid)
            client.disconnect(namespace=NAMESPACE)


def test_unknown_events_are_one_error_counted_by_transport(app, tenant):
    chat_id = tenant.chat("alice")["id"]
    socketio_errors = metric(app, "workspace_chat_errors_total", code="validation_error",
                             transport="socketio")
    client = socketio_client(app, tenant, chat_id)
    try:
        ack = client.emit("wave", {}, namespace=NAMESPACE, callback=True)
    finally:
        client.disconnect(namespace=NAMESPACE)
    assert ack["error"]["message"] == "Unknown event 'wave'."
    assert metric(app, "workspace_chat_errors_total", code="validation_error",
                  transport="socketio") == socketio_errors + 1

    websocket_errors = metric(app, "workspace_chat_errors_total", code="validation_error",
                              transport="websocket")
    with app.test_request_context():
        with pytest.raises(ApiError) as unknown:
            session.handle("ws:nobody", "wave", {})  # the event is checked first
        body, reply = session.error_reply(session.WEBSOCKET, unknown.value)
    assert body == ack["error"] and reply == ack
    assert metric(app, "workspace_chat_errors_total", code="validation_error",
                  transport="websocket") == websocket_errors + 1


def test_a_join_that_fails_leaves_nothing_registered_or_counted(app, tenant):
    chat_id = tenant.chat("alice")["id"]
    gauge = metric(app, "workspace_chat_socket_connections")
    with app.test_request_context():
        sid = "ws:" + uuid.uuid4().hex
        connection, first = authorize_connection(sid, None, {
            "chat_id": chat_id, "api_key": tenant.key, "user_id": "alice"})

        def subscribe(room: str):
            raise RuntimeError("no room today")

        with pytest.raises(RuntimeError):
            session.join(connection, first, session.WEBSOCKET, subscribe=subscribe,
                         send=lambda event, data: None)
        assert session.get(sid) is None
        assert shared_state().connection_count(tenant.id) == 0
    assert metric(app, "workspace_chat_socket_connections") == gauge


@pytest.fixture
def redis_state(app):
    """The app's shared state on Redis database 9 for one test (the app's own afterwards)."""
    from app.state.redis import RedisState

    state = RedisState(REDIS_URL, connection_lease=3)
    try:
        state.redis.flushdb()
    except redis.RedisError as exc:
        service_missing("Redis", exc)
    own = app.extensions["chat_state"]
    app.extensions["chat_state"] = state
    yield state
    app.extensions["chat_state"] = own
    state.redis.flushdb()


def test_lease_renewal_renews_the_connections_of_both_transports(app, tenant, redis_state):
    chat_id = tenant.chat("alice")["id"]
    key = f"wc:conn:{tenant.id}"
    client = socketio_client(app, tenant, chat_id)
    socketio_sid = established(client)["sid"]
    with app.test_request_context():
        plain = PlainSession(tenant, chat_id)
        try:
            sids = (socketio_sid, plain.sid)
            # both leases lapsed (as when renewal stops): renewal brings them back
            redis_state.redis.zadd(key, {sid: 0 for sid in sids})
            assert redis_state.connection_count(tenant.id) == 0
            session.renew_leases()
            assert redis_state.connection_count(tenant.id) == 2
            assert all(redis_state.redis.zscore(key, sid) > 0 for sid in sids)
        finally:
            session.leave(plain.sid)
            client.disconnect(namespace=NAMESPACE)
    assert redis_state.connection_count(tenant.id) == 0  # both released
