"""The join gate's filter settles, and a settled filter costs a broadcast nothing.

A joining client's room events are held behind a gate and then filtered against what its
catch-up already sent (app/chat/catchup.py, CatchUpFilter). The filter is needed only while
an event it would drop can still arrive; the manager (app/chat/delivery.py, GateMixin) stops
looking at a connection once its filter has settled. These are unit tests of both; the
end-to-end proofs that nothing is lost, doubled or reordered around a join are in
test_realtime_reconnect.py, test_agents_e2e.py (joining mid-stream) and test_chat_channels.py.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import socketio

from app.chat.catchup import STREAM_EVENTS, CatchUpFilter
from app.chat import delivery
from app.chat.delivery import ChatManager
from app.state import StreamProgress

NS = "/chat"
ROOM = "chat:c1"


def connection(last_message_id=None):
    return SimpleNamespace(last_message_id=last_message_id)


def progress(message_id="50", tokens=3):
    return StreamProgress(message_id=message_id, reply_to="49", content="a b c ",
                          tokens=tokens)


def test_a_fresh_connection_needs_no_message_filter():
    keep = CatchUpFilter(connection(None), [], None)
    assert keep.events == set(STREAM_EVENTS)
    assert keep("message_received", {"id": "1"})


def test_the_message_filter_drops_what_the_replay_sent_then_settles():
    keep = CatchUpFilter(connection(10), [{"id": "11"}, {"id": "12"}], None)
    assert "message_received" in keep.events
    assert not keep("message_received", {"id": "9"})
    assert not keep("message_received", {"id": "12"})
    assert keep("message_received", {"id": "13"})
    # ids reach a room in order: after a newer one, the filter no longer looks
    assert "message_received" not in keep.events


def test_tokens_of_the_stream_joined_mid_way_are_dropped_up_to_content_so_far():
    keep = CatchUpFilter(connection(None), [], progress(tokens=3))
    assert not keep("message_stream_token", {"message_id": "50", "index": 2})
    assert keep("message_stream_token", {"message_id": "50", "index": 3})
    assert STREAM_EVENTS <= keep.events
    assert keep("message_stream_ended", {"message_id": "50"})
    assert not keep.events  # the stream it joined in the middle of is over: settled


def test_a_stream_never_seen_starting_is_dropped_until_one_starts():
    keep = CatchUpFilter(connection(None), [], None)
    assert not keep("message_stream_token", {"message_id": "7", "index": 4})
    assert not keep("message_stream_ended", {"message_id": "7"})
    assert keep("message_stream_started", {"message_id": "8"})
    assert not keep.events
    assert keep("message_stream_token", {"message_id": "8", "index": 0})


def test_a_replayed_reply_does_not_start_again():
    keep = CatchUpFilter(connection(5), [{"id": "6"}], None)
    assert not keep("message_stream_started", {"message_id": "6"})
    assert STREAM_EVENTS <= keep.events


@pytest.fixture()
def manager(monkeypatch):
    """A ChatManager on a real socketio.Server that records what would go to each client
    (a broadcast hands each Engine.IO session its packet: delivery.send_to_session)."""
    chat_manager = ChatManager()
    server = socketio.Server(client_manager=chat_manager, async_mode="threading")
    chat_manager.sent = []

    def record(eio_sid, pkt):
        event, data = json.loads(pkt.data[len(NS) + 2:])
        chat_manager.sent.append((eio_sid, event, data["id"]))

    server._send_eio_packet = record
    monkeypatch.setattr(delivery, "send_to_session",
                        lambda session, pkt: record(session.sid, pkt))
    return chat_manager


def join(manager, eio_sid, keep):
    manager.server.eio.sockets[eio_sid] = SimpleNamespace(sid=eio_sid)
    sid = manager.connect(eio_sid, NS)
    manager.gate(sid, ROOM)
    manager.enter_room(sid, NS, ROOM)
    return sid


def test_the_gate_holds_then_the_filter_settles_and_is_dropped(manager):
    old = join(manager, "e-old", None)
    manager.open_gate(old, NS, CatchUpFilter(connection(None), [], None))
    new = join(manager, "e-new", None)
    manager.emit("message_received", {"id": "3"}, NS, room=ROOM)  # held for e-new
    keep = CatchUpFilter(connection(2), [{"id": "3"}], None)
    manager.open_gate(new, NS, keep)
    assert manager.sent == [("e-old", "message_received", "3")]  # e-new: replayed it
    manager.sent.clear()
    manager.emit("message_received", {"id": "3"}, NS, room=ROOM)  # still on its way
    manager.emit("message_received", {"id": "4"}, NS, room=ROOM)
    assert manager.sent == [("e-old", "message_received", "3"),
                            ("e-old", "message_received", "4"),
                            ("e-new", "message_received", "4")]
    # settled for messages: a message broadcast no longer looks at either connection
    assert "message_received" not in manager._watching.get(ROOM, {})
    assert ROOM not in manager._gated


def test_a_settled_filter_is_forgotten_and_so_is_a_dropped_connection(manager):
    sid = join(manager, "e1", None)
    manager.open_gate(sid, NS, CatchUpFilter(connection(None), [], None))
    assert sid in manager._filters
    manager.emit("message_stream_started", {"id": "9", "message_id": "9"}, NS, room=ROOM)
    assert sid not in manager._filters and ROOM not in manager._watching
    other = join(manager, "e2", None)
    manager.open_gate(other, NS, CatchUpFilter(connection(None), [], None))
    manager.drop_gate(other)
    assert ROOM not in manager._watching and other not in manager._room_of


def test_a_filter_without_events_is_applied_for_the_connection_s_life(manager):
    sid = join(manager, "e1", None)
    manager.open_gate(sid, NS, lambda event, data: data["id"] != "odd")
    for message_id in ("a", "odd", "b"):
        manager.emit("message_received", {"id": message_id}, NS, room=ROOM)
    assert [m for _, _, m in manager.sent] == ["a", "b"]
