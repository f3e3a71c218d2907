"""eventlet: unmask websocket frames with one big-integer XOR instead of a byte at a time; send
a server frame straight from the task that emits it when the socket can take it at once.

eventlet's ``RFC6455WebSocket._apply_mask`` builds a one-byte ``bytes`` object per payload
byte in a Python generator and joins them; every frame a client sends is masked (RFC 6455
section 5.3), so every incoming Socket.IO packet pays it. A py-spy profile of our worker at
1,000 messages/s across 100 chats put it at 10.8 % of the worker's CPU (bench/RESULTS.md,
"Stack costs"). ``apply_mask`` gives the same bytes for every payload, length and offset
(tests/test_stack_speedups.py compares the two with hypothesis) at a small fraction of the
cost: the payload and the mask, repeated to its length, are read as two integers and XORed.

Installed by the entry point (wsgi.py) under eventlet only; gevent serves websockets with
simple-websocket/wsproto, which already unmask this way.

``DirectSender``: python-engineio hands every packet for a websocket client to a writer task
of that client through a queue (put, a hub timer to wake the writer, a green-thread switch,
get, then eventlet's locked ``sendall``). A broadcast to a chat of 200 pays that 200 times: it
was about half of our worker's CPU in ``bench/run.py --scenario busy``. When nothing is queued
for the client and nothing is being written to its socket, the frame can go out from the
emitting task with one non-blocking ``send``, in the same order, with no switch; a broadcast
frames its packet once for all its recipients (the frame of an uncompressed, unmasked server
message depends on its data only). What the socket does not take at once goes back to the
writer (app/chat/transport.py), so a slow reader never blocks the emitter.
"""
from __future__ import annotations

from typing import Any, Sequence

from app.overrides import Needed

#: What this override was written for: the library, its version (requirements.txt), and the
#: private names it touches, as ``module:Qualified.name`` with the parameters it relies on.
#: ``source_sha`` is the first 12 hex digits of the SHA-256 of the replaced function's source:
#: a new eventlet that changes it must be compared with ``apply_mask`` again.
EXPECTS: dict[str, Any] = {
    "library": "eventlet",
    "version": "0.41.3",
    "names": (
        {"target": "eventlet.websocket:RFC6455WebSocket._apply_mask",
         "params": ("data", "mask", "length", "offset"), "source_sha": "f6ac2b9da0f0"},
    ),
}

#: The same, as the version check of app/overrides reads it (the source's hash is checked
#: against eventlet's original by tests/test_stack_speedups.py, installed or not).
REQUIRES = (
    Needed("eventlet", "eventlet.websocket:RFC6455WebSocket._apply_mask",
           params=("data", "mask", "length", "offset")),
    # DirectSender: the frame builder, the lock every send takes, the closed flag, extensions
    Needed("eventlet", "eventlet.websocket:RFC6455WebSocket._pack_message",
           params=("message", "masked", "continuation", "final", "control_code")),
    Needed("eventlet", "eventlet.websocket:RFC6455WebSocket._send", params=("frame",)),
    Needed("eventlet", "eventlet.websocket:WebSocket._sendlock", assigned=True),
    Needed("eventlet", "eventlet.websocket:WebSocket.websocket_closed", assigned=True),
    Needed("eventlet", "eventlet.websocket:RFC6455WebSocket.extensions", assigned=True),
    Needed("eventlet", "eventlet.greenio.base:GreenSocket.fd", assigned=True),
)

_ORIGINAL: Any = None


def apply_mask(data: bytes, mask: Sequence[int], length: int | None = None,
               offset: int = 0) -> bytes:
    """``data[:length]`` XORed with the 4-byte ``mask``, starting at mask byte ``offset % 4``
    (eventlet's ``_apply_mask``, whose arguments and results it keeps)."""
    if length is None:
        length = len(data)
    elif length > len(data):
        # eventlet's generator indexes past the end of data
        raise IndexError("mask length is beyond the data")
    if length <= 0:
        return b""
    key = bytes(mask[:4])
    turn = offset % 4
    stream = (key[turn:] + key[:turn]) * (length // 4 + 1)
    value = int.from_bytes(data[:length], "big") ^ int.from_bytes(stream[:length], "big")
    return value.to_bytes(length, "big")


def install() -> None:
    """Make eventlet's websocket (client and server side) mask and unmask with
    ``apply_mask``. Idempotent."""
    global _ORIGINAL
    from eventlet.websocket import RFC6455WebSocket

    if _ORIGINAL is None:
        _ORIGINAL = RFC6455WebSocket.__dict__["_apply_mask"]
    RFC6455WebSocket._apply_mask = staticmethod(apply_mask)


def uninstall() -> None:
    """Put eventlet's own ``_apply_mask`` back (for tests)."""
    global _ORIGINAL
    if _ORIGINAL is None:
        return
    from eventlet.websocket import RFC6455WebSocket

    RFC6455WebSocket._apply_mask = _ORIGINAL
    _ORIGINAL = None


def original_apply_mask() -> Any:
    """eventlet's own ``_apply_mask``, whether or not ``install`` has run."""
    from eventlet.websocket import RFC6455WebSocket

    found = _ORIGINAL if _ORIGINAL is not None else RFC6455WebSocket.__dict__["_apply_mask"]
    return found.__func__


class RestOfFrame(bytes):
    """The unsent end of a frame that ``DirectSender.send_now`` began to send."""


class PendingRest:
    """A queue item for a session's writer task: ``encode()`` gives the RestOfFrame, which
    the writer's websocket sends as it is (``DirectSender.send_rest``)."""

    __slots__ = ("data",)

    def __init__(self, rest: bytes):
        self.data = RestOfFrame(rest)

    def encode(self) -> "RestOfFrame":
        return self.data


class DirectSender:
    """Send server frames on eventlet websocket ``ws`` without its writer task, when possible.

    ``send_now(packet)`` frames the Engine.IO packet (once per packet object: a broadcast's
    recipients share it) and writes it with one non-blocking ``send`` if no other send holds
    the socket; it returns the bytes that are still to be sent (``b""``: all went out), or
    None when it sent nothing and the packet must take the queue. ``send_rest(rest)`` writes
    such a rest from the writer task, blocking it (only it) until the client reads.
    """

    __slots__ = ("_ws", "_lock", "_fd")

    def __init__(self, ws: Any):
        self._ws = ws
        self._lock = ws._sendlock
        self._fd = ws.socket.fd

    @classmethod
    def for_websocket(cls, ws: Any) -> "DirectSender | None":
        """A DirectSender for ``ws`` if it is an eventlet server websocket without
        compression (a compressed frame depends on the connection's deflate state)."""
        try:
            from eventlet.websocket import RFC6455WebSocket
        except ImportError:  # pragma: no cover - eventlet is a requirement
            return None
        if not isinstance(ws, RFC6455WebSocket) or ws.client or ws.extensions:
            return None
        fd = getattr(getattr(ws, "socket", None), "fd", None)
        if fd is None or fd.gettimeout() != 0.0:  # GreenSocket keeps its fd non-blocking
            return None
        return cls(ws)

    def send_now(self, packet: Any) -> bytes | None:
        ws = self._ws
        if ws.websocket_closed or not self._lock.acquire(blocking=False):
            return None
        try:
            frame = packet.__dict__.get("_ws_frame")
            if frame is None:
                frame = packet._ws_frame = ws._pack_message(packet.encode())
            try:
                sent = self._fd.send(frame)
            except BlockingIOError:
                return None
            except OSError:  # gone: the writer finds out and ends the session
                return None
            return frame[sent:]
        finally:
            self._lock.release()

    def send_rest(self, rest: bytes) -> None:
        self._ws._send(rest)
