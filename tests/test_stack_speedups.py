"""What we change in the stack's own per-message costs (issue 13) keeps its behaviour.

- eventlet's websocket unmasks with ``app/overrides/eventlet_websocket.apply_mask``: the same
  bytes as eventlet's own ``_apply_mask`` for every payload, length and offset, in frames that
  arrive in pieces, and through the real server.
- python-socketio's ``async_handlers`` is off (``SOCKETIO_ASYNC_HANDLERS``): a connection's
  events are handled one after another, in the order it sent them, and a handler that waits
  (here: for a row lock held by the test, on PostgreSQL) holds up only its own connection.
- The request context of a Socket.IO event (a ``/socket.io/`` environ) is not routed; every
  other request is.
"""
from __future__ import annotations

import hashlib
import inspect
import random
import re
import subprocess
import sys
import warnings
from importlib import metadata

import pytest
from hypothesis import given, settings, strategies as st

from tests.conftest import base_config
from tests.kit.eio import NAMESPACE, RawSocketIO
from tests.kit.pg import ChatRowLock
from tests.kit.rest import new_tenant
from tests.kit.servers import ROOT, server_env, start_server, stop_server
from tests.kit.wait import wait_until

warnings.filterwarnings("ignore", message="\nEventlet is deprecated")

from app.overrides import eventlet_websocket  # noqa: E402
from app.overrides.eventlet_websocket import EXPECTS, apply_mask  # noqa: E402

ORIGINAL = eventlet_websocket.original_apply_mask()
masks = st.lists(st.integers(0, 255), min_size=4, max_size=4)


# --- the mask ------------------------------------------------------------------------------

@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=300), mask=masks, offset=st.integers(0, 1 << 40),
       cut=st.one_of(st.none(), st.integers(0, 300)))
def test_apply_mask_gives_eventlets_bytes_for_every_length_and_offset(data, mask, offset, cut):
    length = None if cut is None else min(cut, len(data))
    assert apply_mask(data, mask, length, offset) == ORIGINAL(data, mask, length, offset)
    assert apply_mask(data, tuple(mask), length, offset) == ORIGINAL(data, tuple(mask), length,
                                                                     offset)


@pytest.mark.parametrize("size", [65_535, 65_536, 70_001])
def test_apply_mask_gives_eventlets_bytes_for_long_frames(size):
    rng = random.Random(size)
    data = rng.randbytes(size)
    for offset in range(5):
        mask = [rng.randrange(256) for _ in range(4)]
        assert apply_mask(data, mask, None, offset) == ORIGINAL(data, mask, None, offset)


def test_apply_mask_refuses_a_length_beyond_the_data_like_eventlet():
    for function in (apply_mask, ORIGINAL):
        with pytest.raises(IndexError):
            function(b"abc", [1, 2, 3, 4], 4)


class _PiecewiseSocket:
    """A socket whose ``recv`` returns at most ``piece`` bytes: frames arrive in parts, so
    eventlet unmasks each part at its offset in the frame."""

    def __init__(self, data: bytes, piece: int):
        self.data, self.piece = data, piece
        self.sent: list[bytes] = []

    def recv(self, size: int) -> bytes:
        chunk, self.data = self.data[:min(size, self.piece)], self.data[min(size, self.piece):]
        return chunk

    def sendall(self, data: bytes) -> None:
        self.sent.append(data)


@pytest.fixture
def fast_mask():
    eventlet_websocket.install()
    yield
    eventlet_websocket.uninstall()


@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
def test_installed_mask_round_trips_frames_that_arrive_in_pieces(fast_mask, piece):
    from eventlet.websocket import RFC6455WebSocket

    assert RFC6455WebSocket._apply_mask is apply_mask
    texts = ["a", "héllo wörld", "x" * 125, "€" * 42, "y" * 126, "z" * 65_536 + "🎉"]
    client = RFC6455WebSocket(_PiecewiseSocket(b"", piece), {}, client=True)
    frames = [client._pack_message(text, masked=True) for text in texts]
    assert all(frame[1] & 0x80 for frame in frames)  # masked, as a client must
    server = RFC6455WebSocket(_PiecewiseSocket(b"".join(frames), piece), {})
    assert [server.wait() for _ in texts] == texts


def test_uninstall_puts_eventlets_mask_back(fast_mask):
    from eventlet.websocket import RFC6455WebSocket

    eventlet_websocket.uninstall()
    assert RFC6455WebSocket._apply_mask is ORIGINAL
    eventlet_websocket.install()
    eventlet_websocket.install()  # twice: still the original is remembered
    eventlet_websocket.uninstall()
    assert RFC6455WebSocket._apply_mask is ORIGINAL
    eventlet_websocket.install()


def test_mask_override_names_the_eventlet_it_was_written_for():
    """Fails on an eventlet other than the one the override was checked against: re-read
    eventlet's ``_apply_mask`` (and rerun the equivalence tests) before raising it."""
    from eventlet.websocket import RFC6455WebSocket

    pinned = re.search(r"^eventlet==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M)
    assert EXPECTS["library"] == "eventlet"
    assert pinned and pinned.group(1) == EXPECTS["version"] == metadata.version("eventlet")
    for name in EXPECTS["names"]:
        assert name["target"] == "eventlet.websocket:RFC6455WebSocket._apply_mask"
        assert list(inspect.signature(ORIGINAL).parameters) == list(name["params"])
        digest = hashlib.sha256(inspect.getsource(ORIGINAL).encode()).hexdigest()[:12]
        assert digest == name["source_sha"]
    assert isinstance(RFC6455WebSocket.__dict__["_apply_mask"], staticmethod)


def test_entry_point_installs_the_mask_under_eventlet_only(tmp_path):
    check = ("import wsgi; from eventlet.websocket import RFC6455WebSocket as W; "
             "from app.overrides.eventlet_websocket import apply_mask; "
             "print(W._apply_mask is apply_mask)")
    for mode, expected in (("eventlet", "True"), ("gevent", "False")):
        env = server_env(ASYNC_MODE=mode,
                         DATABASE_URL=f"sqlite:///{tmp_path}/entry-{mode}.db")
        out = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, timeout=120,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().splitlines()[-1] == expected, (mode, out.stdout)


# --- the request context of a Socket.IO event -----------------------------------------------

def test_socketio_event_contexts_are_not_routed_and_other_requests_are():
    from flask import globals as flask_globals
    from flask import request

    from app import create_app

    app = create_app(base_config("sqlite://"))
    with app.test_request_context("/socket.io/", query_string="EIO=4&transport=websocket"):
        assert flask_globals.request_ctx.url_adapter is None
        assert request.url_rule is None and request.routing_exception is None
    with app.test_request_context("/api/v1/chats/", method="POST"):
        assert flask_globals.request_ctx.url_adapter is not None
        assert request.url_rule is not None and request.url_rule.rule == "/api/v1/chats/"
    with app.test_request_context("/socket.iox"):  # only the Engine.IO path is left out
        assert flask_globals.request_ctx.url_adapter is not None
        assert request.routing_exception is not None


# --- one connection's events, in order, without holding up the others ----------------------

SERVER_ENV = {"RATE_LIMIT_MESSAGES": "1000/second"}


@pytest.fixture(scope="module", params=["eventlet", "gevent"])
def pg_server(request, tmp_path_factory, pg_database_factory):
    """The Procfile server on PostgreSQL (whose waits yield to the event loop, so a handler
    can be made slow with a row lock), under each async mode."""
    database_url = pg_database_factory()
    server = start_server(tmp_path_factory.mktemp(f"stack-{request.param}"),
                          ASYNC_MODE=request.param, DATABASE_URL=database_url, **SERVER_ENV)
    server.database_url = database_url
    yield server
    stop_server(server.process)


def _joined(server, tenant, chat_id: str, user: str = "ann") -> tuple[RawSocketIO, str]:
    client = RawSocketIO(server.url, timeout=20)
    outcome, _, events = client.connect({"chat_id": chat_id, "connection_string":
                                         tenant.connection_string(chat_id, user)})
    assert outcome == "connected", events
    established = [data for name, data in events if name == "connection_established"]
    return client, established[0]["message_string"]


def test_a_waiting_handler_holds_up_its_own_connection_only(pg_server):
    tenant = new_tenant(pg_server.url)
    chat_a, chat_b = tenant.chat("ann"), tenant.chat("bob")
    a, a_string = _joined(pg_server, tenant, chat_a, "ann")
    b, b_string = _joined(pg_server, tenant, chat_b, "bob")
    try:
        with ChatRowLock(pg_server.database_url, chat_a) as lock:
            slow = a.emit("message", {"content": "waits for the lock",
                                      "message_string": a_string})
            wait_until(lambda: lock.waiters() >= 1, 20, "the server's insert to wait",
                       interval=0.02)  # PostgreSQL's view of locks: no event to wait on
            behind = a.emit("get_message_string", {})
            # another connection is served while A's handler waits: a message stored and
            # broadcast in another chat, and a message string
            ack = b.call("message", {"content": "not held up", "message_string": b_string})[0]
            assert ack["ok"] is True, ack
            assert b.call("get_message_string", {})[0]["message_string"]
            assert [e[1]["content"] for e in b.events("message_received")] == ["not held up"]
            lock.release()
            first = a.wait_ack(slow)[0]
            assert first["ok"] is True and first["message"]["content"] == "waits for the lock"
            # A's second event was handled after its first, as sent (with a green thread
            # per event, its ack came first, while the lock was held)
            acks = [p for p in a.packets if p.startswith(f"43{NAMESPACE},")]
            assert [int(p[len(NAMESPACE) + 3:].split("[", 1)[0]) for p in acks] == [slow]
            assert a.wait_ack(behind)[0]["message_string"]
    finally:
        a.close()
        b.close()


def test_one_connections_burst_is_handled_in_the_order_sent(pg_server):
    tenant = new_tenant(pg_server.url)
    chat = tenant.chat("ann")
    client, string = _joined(pg_server, tenant, chat, "ann")
    try:
        strings = [string] + [client.call("get_message_string", {})[0]["message_string"]
                              for _ in range(29)]
        ids = [client.emit("message", {"content": f"m{i}", "message_string": s})
               for i, s in enumerate(strings)]  # all sent before any answer is read
        acks = [client.wait_ack(ack_id)[0] for ack_id in ids]
        assert all(ack["ok"] for ack in acks), acks
        assert [ack["message"]["content"] for ack in acks] == [f"m{i}" for i in range(30)]
        stored = [int(ack["message"]["id"]) for ack in acks]
        assert stored == sorted(stored)  # stored in the order sent
        received = [e[1]["content"] for e in client.events("message_received")]
        assert received == [f"m{i}" for i in range(30)]
        assert [m["content"] for m in tenant.history(chat)] == [f"m{i}" for i in range(30)]
    finally:
        client.close()


def test_long_messages_arrive_unmasked_through_the_server(pg_server):
    """websocket-client masks every frame with a random key; the server's unmasking (ours
    under eventlet) must give back exactly what was sent, at every frame-length boundary."""
    tenant = new_tenant(pg_server.url)
    chat = tenant.chat("ann")
    client, string = _joined(pg_server, tenant, chat, "ann")
    try:
        contents = ["é" * 30, "x" * 125, "y" * 126, "€" * 1000, "🎉z" * 1333, "q" * 4000]
        for content in contents:
            ack = client.call("message", {"content": content, "message_string": string})[0]
            assert ack["ok"] is True, ack
            assert ack["message"]["content"] == content
            string = ack["next_message_string"]
    finally:
        client.close()
