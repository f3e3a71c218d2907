"""Library overrides (app/overrides/, workspace_chat_client/_overrides.py): the versions they
were written for, the private names they rely on, and what each public hook does.

When a library is bumped, the first two tests say which library, which version and what to
re-check; the shape checks catch a changed private name even if the version table was edited.
"""
from __future__ import annotations

import threading
import types
import uuid

import engineio
import pytest
import redis
from engineio.payload import Payload
from flask import Flask, request
from flask_socketio import Namespace, SocketIO

import app.overrides as overrides
from app.overrides import Needed, check_requirements, check_versions
from app.overrides.engineio import (allow_batched_packets, end_session, guard_websockets,
                                    refused_origin, use_queue_class, use_session_table)
from app.overrides.flask_socketio import handle_event
from app.overrides.simple_websocket import HandledResponse
from app.overrides.socketio import RedisRelayManager
from workspace_chat_client import _overrides as client_overrides

from tests.conftest import base_config
from tests.kit.wait import wait_until

#: Redis database of this module's tests (the suite's others use 10-13).
REDIS_URL = "redis://127.0.0.1:6379/15"


# --- versions and shapes -------------------------------------------------------------------

def test_the_installed_libraries_are_the_versions_the_server_overrides_were_written_for():
    problems = check_versions()
    assert not problems, "\n".join(problems)


def test_every_private_name_the_server_overrides_use_still_has_the_shape_they_expect():
    problems = check_requirements()
    assert not problems, "\n".join(problems)


def test_the_installed_libraries_are_the_versions_the_client_override_was_written_for():
    problems = client_overrides.check_versions()
    assert not problems, "\n".join(problems)


def test_every_private_name_the_client_override_uses_still_has_the_shape_it_expects():
    problems = client_overrides.check_requirements()
    assert not problems, "\n".join(problems)


def test_every_override_module_lists_what_it_relies_on():
    for module in overrides.MODULES:
        assert overrides.requirements(module), f"app/overrides/{module}.py has no REQUIRES"


def test_a_version_other_than_the_table_names_the_library_both_versions_and_what_to_recheck():
    installed = overrides.installed_version("python-socketio")
    [problem] = check_versions({"python-socketio": "0.0.1"})
    assert problem.startswith(f"python-socketio is {installed}, the overrides were written "
                              f"for 0.0.1")
    assert "REQUIRES" in problem and "tests/test_overrides.py" in problem
    [missing] = check_versions({"no-such-distribution-here": "1.0"})
    assert "not installed" in missing


@pytest.mark.parametrize("needed, expected", [
    (Needed("python-socketio", "socketio.packet:Packet.decode", params=("data",)),
     "parameters are now ('encoded_packet',), not ('data',)"),
    (Needed("python-socketio", "socketio.packet:Packet._gone_since"), "_gone_since is gone"),
    (Needed("python-socketio", "socketio.base_server:BaseServer._never_set", assigned=True),
     "no longer assigns self._never_set"),
    (Needed("python-socketio", "socketio.redis_manager:RedisManager._listen",
            source_sha="000000000000"), "its source changed"),
    (Needed("python-socketio", "no_such_module_here:Thing"), "cannot import"),
])
def test_a_private_name_that_changed_shape_is_reported(needed, expected):
    problem = needed.problem()
    assert problem is not None and expected in problem, problem


def test_the_app_logs_a_warning_at_start_when_a_library_is_not_the_version_expected(
        monkeypatch, capsys):
    from app import create_app

    create_app(base_config("sqlite://"))
    assert "library overrides" not in capsys.readouterr().err
    monkeypatch.setitem(overrides.VERSIONS, "python-engineio", "0.0.1")
    create_app(base_config("sqlite://"))
    err = capsys.readouterr().err
    assert "WARNING" in err and "library overrides: python-engineio is " in err
    assert "written for 0.0.1" in err


def test_a_client_library_of_another_version_is_named_with_what_to_recheck(monkeypatch):
    monkeypatch.setitem(client_overrides.VERSIONS, "python-engineio", "0.0.1")
    [problem] = client_overrides.check_versions()
    assert problem.startswith("python-engineio is ") and "_trigger_event" in problem


# --- python-engineio -----------------------------------------------------------------------

def test_refused_origin_is_engineio_s_own_400_for_an_origin_outside_its_cors_rules():
    eio = engineio.Server(async_mode="threading",
                          cors_allowed_origins=["https://good.example"])
    environ = {"wsgi.url_scheme": "http", "HTTP_HOST": "127.0.0.1:5000"}
    refusal = refused_origin(eio, {**environ, "HTTP_ORIGIN": "https://evil.example"})
    assert refusal["status"] == "400 BAD REQUEST"
    assert b"Not an accepted origin." in refusal["response"]
    assert refused_origin(eio, {**environ, "HTTP_ORIGIN": "https://good.example"}) is None
    assert refused_origin(eio, environ) is None  # no Origin: not a browser
    default = engineio.Server(async_mode="threading")  # same origin as the host only
    assert refused_origin(default, {**environ, "HTTP_ORIGIN": "http://127.0.0.1:5000"}) is None
    assert refused_origin(default, {**environ, "HTTP_ORIGIN": "http://other:5000"})
    everyone = engineio.Server(async_mode="threading", cors_allowed_origins=[])
    assert refused_origin(everyone, {**environ, "HTTP_ORIGIN": "https://any.example"}) is None


def test_end_session_closes_at_once_without_waiting_for_the_queue():
    eio = engineio.Server(async_mode="threading")
    closed = []
    eio.sockets["abc"] = types.SimpleNamespace(close=lambda **kwargs: closed.append(kwargs))
    end_session(eio, "abc")
    end_session(eio, "abc")  # already gone: nothing happens
    assert "abc" not in eio.sockets
    assert closed == [{"wait": False, "reason": eio.reason.SERVER_DISCONNECT}]


def test_guarded_websockets_reach_their_session_through_the_wrapper_on_this_server_only():
    eio = engineio.Server(async_mode="threading")
    other = engineio.Server(async_mode="threading")
    driver_class = eio._async["websocket"]
    seen = []

    class Session:
        def handle(self, ws):
            seen.append(ws)

    session = Session()
    guard_websockets(eio, wrap=lambda ws, s: ("wrapped", ws, s),
                     configure_reader=lambda args, s: args.update(max_message_size=7))
    guarded = eio._async["websocket"]
    assert issubclass(guarded, driver_class) and guarded is not driver_class
    assert other._async["websocket"] is driver_class
    websocket = guarded(session.handle, eio)
    assert websocket.server_args == {"max_message_size": 7}
    websocket.app("the socket")
    assert seen == [("wrapped", "the socket", session)]


def test_new_sessions_get_our_queue_class_and_our_session_table():
    eio = engineio.Server(async_mode="threading")
    driver_queue = eio._async["queue"]
    use_queue_class(eio, lambda base: type("Counted", (base,), {}))
    assert type(eio.create_queue()).__name__ == "Counted"
    assert isinstance(eio.create_queue(), driver_queue)
    assert type(eio.create_queue(5)) is driver_queue  # with arguments: the driver's own

    class Table(dict):
        pass

    use_session_table(eio, Table())
    assert type(eio.sockets) is Table


def test_allow_batched_packets_raises_the_limit_and_never_lowers_it(monkeypatch):
    monkeypatch.setattr(Payload, "max_decode_packets", 16)
    allow_batched_packets(100)
    assert Payload.max_decode_packets == 100
    allow_batched_packets(50)
    assert Payload.max_decode_packets == 100


# --- Flask-SocketIO ------------------------------------------------------------------------

def test_handle_event_runs_our_handler_in_the_client_s_request_context():
    app = Flask(__name__)
    sio = SocketIO(app, async_mode="threading")

    class Probe(Namespace):
        def trigger_event(self, event, *args):
            if event in ("connect", "disconnect"):
                return super().trigger_event(event, *args)
            return handle_event(self.socketio, self.answer, event, self.namespace, *args)

        def answer(self, *args):
            return {"event": request.event["message"], "args": list(args),
                    "sid": request.sid, "namespace": request.namespace}

    sio.on_namespace(Probe("/probe"))
    client = sio.test_client(app, namespace="/probe")
    ack = client.emit("anything", {"a": 1}, 2, namespace="/probe", callback=True)
    assert ack["event"] == "anything" and ack["args"] == [{"a": 1}, 2]
    assert ack["namespace"] == "/probe" and ack["sid"] == sio.server.manager.sid_from_eio_sid(
        client.eio_sid, "/probe")
    client.disconnect(namespace="/probe")


# --- simple-websocket and eventlet ---------------------------------------------------------

def test_handled_response_writes_nothing_more_on_a_socket_taken_over():
    from eventlet.wsgi import WSGI_LOCAL

    started = []
    WSGI_LOCAL.already_handled = False
    eventlet_ws = types.SimpleNamespace(mode="eventlet")
    assert HandledResponse(eventlet_ws)({}, lambda *a: started.append(a)) == []
    assert WSGI_LOCAL.already_handled is True and not started
    with pytest.raises(StopIteration):
        HandledResponse(types.SimpleNamespace(mode="gunicorn"))({}, started.append)
    body = HandledResponse(types.SimpleNamespace(mode="werkzeug"))(
        {"REQUEST_METHOD": "GET"}, lambda *a: started.append(a))
    assert list(body) == [] and started and started[0][0] == "200 OK"


def test_bound_message_size_fails_an_eventlet_message_made_of_many_small_frames():
    from eventlet.websocket import FailedConnectionError, RFC6455WebSocket

    from app.overrides.eventlet import bound_message_size

    ws = types.SimpleNamespace(Message=RFC6455WebSocket.Message)
    bound_message_size(ws, 10)
    message = ws.Message(1, 8)
    message.push(b"123456")
    with pytest.raises(FailedConnectionError) as failed:
        message.push(b"123456", final=True)
    assert failed.value.status == 1009
    not_eventlet = types.SimpleNamespace()
    bound_message_size(not_eventlet, 10)
    assert not hasattr(not_eventlet, "Message")


# --- python-socketio's Redis manager -------------------------------------------------------

def _redis_or_skip() -> redis.Redis:
    connection = redis.Redis.from_url(REDIS_URL)
    try:
        connection.ping()
    except redis.ConnectionError as exc:
        from tests.conftest import service_missing

        service_missing("Redis", exc)
    return connection


def test_relay_says_whether_this_process_will_hear_its_message_back():
    connection = _redis_or_skip()
    channel = f"overrides-test-{uuid.uuid4().hex}"
    manager = RedisRelayManager(REDIS_URL, channel=channel, write_only=True)
    listener = connection.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(channel)
    message = manager.emit_message("hello", ("a", 1), None, "chat:x", None, "relay-host")
    assert message["namespace"] == "/" and message["data"] == ["a", 1]
    assert manager.relay(message) is False  # not listening: deliver it yourself
    manager.listening = True
    assert manager.relay(message) is True  # someone (this test) is subscribed
    received: list = []
    wait_until(lambda: received.append(listener.get_message(timeout=0.1)) or
               len([m for m in received if m]) == 2, 10, "the two published messages")
    assert [manager.json.loads(m["data"])["event"] for m in received if m] == ["hello"] * 2
    listener.close()
    assert manager.relay(message) is False  # nobody subscribed any more


def test_messages_heard_on_the_channel_reach_the_public_hooks():
    heard = []

    class Recording(RedisRelayManager):
        def on_emit(self, message):
            heard.append(("emit", message["event"]))

        def on_close_room(self, message):
            heard.append(("close_room", message["room"]))

    manager = Recording(REDIS_URL, channel="unused", write_only=True)
    manager._handle_emit({"method": "emit", "event": "e", "data": [1]})  # python-socketio
    manager._handle_close_room(manager.close_room_message("r", "/", "h", disconnect=True))
    assert heard == [("emit", "e"), ("close_room", "r")]


# --- the client ----------------------------------------------------------------------------

def test_the_client_handles_received_packets_in_the_order_they_arrived():
    sio = client_overrides.OrderedSocketIOClient(reconnection=False)
    eio = sio.eio
    received = []
    done = threading.Event()
    threads = set()

    def on_message(data):
        received.append(data)
        threads.add(threading.current_thread().name)
        if len(received) == 300:
            done.set()

    eio.on("message", on_message)
    for number in range(300):  # what python-engineio does with each packet it reads
        eio._trigger_event("message", number, run_async=True)
    assert done.wait(10), f"{len(received)} of 300 packets handled"
    assert received == list(range(300))
    assert threads == {"chat-client-packets"}
