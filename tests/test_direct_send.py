"""A websocket frame goes out from the emitting task when nothing is queued, in order.

app/overrides/eventlet_websocket.py (DirectSender) with app/chat/transport.py (the session's
outgoing queue) and app/chat/packets.py (the writer's websocket wrapper), on a real eventlet
websocket over a real socket pair: frames are eventlet's own bytes, a broadcast frames its
packet once, and when the socket stops taking bytes the rest of the frame and everything after
it go through the writer task, in order, counted as unsent until they are sent. The end-to-end
proofs (slow clients dropped, nothing lost or reordered under load) are in
test_hostile_socketio.py and the realtime tests, which all run through this path.
"""
from __future__ import annotations

import logging
import socket
import struct
import warnings
from types import SimpleNamespace

import pytest

warnings.filterwarnings("ignore", message="\nEventlet is deprecated")

import eventlet  # noqa: E402
from eventlet.green import socket as green_socket  # noqa: E402
from eventlet.websocket import RFC6455WebSocket  # noqa: E402
from engineio import packet as eio_packet  # noqa: E402

from app.chat.packets import _FrameGuard  # noqa: E402
from app.chat.transport import make_outgoing_queue  # noqa: E402
from app.overrides.eventlet_websocket import DirectSender, PendingRest  # noqa: E402


def server_websocket(extensions=None):
    """An eventlet server websocket on one end of a socket pair, and the raw other end."""
    ours, theirs = socket.socketpair()
    ws = RFC6455WebSocket(green_socket.socket(fileno=ours.detach()), {}, extensions=extensions)
    return ws, theirs


def read_frames(sock: socket.socket, count: int, buffer: bytes = b"") -> list[str]:
    """``count`` unmasked text frames from ``sock`` (after ``buffer``), as text."""
    frames = []
    while len(frames) < count:
        while True:
            if len(buffer) >= 2:
                length = buffer[1] & 0x7F
                start = 2
                if length == 126 and len(buffer) >= 4:
                    length, start = struct.unpack("!H", buffer[2:4])[0], 4
                elif length == 127 and len(buffer) >= 10:
                    length, start = struct.unpack("!Q", buffer[2:10])[0], 10
                elif length >= 126:
                    start = None
                if start is not None and len(buffer) >= start + length:
                    assert buffer[0] == 0x81  # final text frame
                    frames.append(buffer[start:start + length].decode())
                    buffer = buffer[start + length:]
                    break
            chunk = sock.recv(1 << 16)
            assert chunk, "the server side closed"
            buffer += chunk
    return frames


def message(text: str) -> eio_packet.Packet:
    return eio_packet.Packet(eio_packet.MESSAGE, text)


def test_a_frame_is_eventlets_own_and_a_broadcast_frames_it_once():
    first, first_peer = server_websocket()
    second, second_peer = server_websocket()
    pkt = message("hello")
    for ws in (first, second):
        assert DirectSender.for_websocket(ws).send_now(pkt) == b""
    assert pkt._ws_frame == first._pack_message("4hello")
    assert read_frames(first_peer, 1) == read_frames(second_peer, 1) == ["4hello"]


def test_no_direct_sender_for_a_compressed_websocket():
    ws, _ = server_websocket(extensions={"permessage-deflate": {}})
    assert DirectSender.for_websocket(ws) is None


def test_a_send_in_progress_keeps_its_socket():
    ws, _ = server_websocket()
    sender = DirectSender.for_websocket(ws)
    ws._sendlock.acquire()
    try:
        assert sender.send_now(message("later")) is None  # it must take the queue
    finally:
        ws._sendlock.release()


@pytest.mark.parametrize("size", [1_000, 70_000])
def test_what_the_socket_does_not_take_follows_through_the_writer_in_order(size):
    ws, peer = server_websocket()
    ws.socket.fd.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    queue_class = make_outgoing_queue(eventlet.queue.Queue, 10_000_000, lambda s: None)
    queue = queue_class()
    session = SimpleNamespace(upgraded=True, closed=False, queue=queue)
    queue.session = session
    guard = _FrameGuard(ws, logging.getLogger("test"), session)
    assert queue.direct is not None
    texts = [f"{n:05d}" + "x" * size for n in range(60)]
    for text in texts[:40]:  # nobody reads yet: the socket's buffers fill up
        queue.put(message(text))
    pending = list(queue.queue)
    assert pending  # the socket stopped taking bytes: the rest waits for the writer
    if size > 65_536:  # a frame bigger than the socket's buffers is cut: its end goes first
        assert isinstance(pending[0], PendingRest)
    assert queue.unsent > 0
    # the client reads a little: the socket has room again, but what is queued goes first
    already = peer.recv(8192)
    for text in texts[40:]:
        queue.put(message(text))
    assert len(queue.queue) == len(pending) + 20

    def writer():  # python-engineio's websocket writer, as it calls the websocket
        while True:
            pkt = queue.get()
            if pkt is None:
                return
            guard.send(pkt.encode())

    task = eventlet.spawn(writer)
    received = []
    reader = eventlet.spawn(lambda: received.extend(
        read_frames(green_socket.socket(fileno=peer.detach()), len(texts), already)))
    reader.wait()
    assert received == ["4" + text for text in texts]
    assert queue.unsent == 0
    queue.put(None)
    task.wait()
