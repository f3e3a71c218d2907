"""simple-websocket (and wsproto under it): a server socket read on our own terms, the
reader that python-engineio's gevent/threading driver starts made to apply back-pressure,
and the response of a request whose socket a WebSocket took over.

simple-websocket's server starts a reader thread as soon as the handshake is done; that thread
reads everything the client sends into an unbounded list, whatever the size of a message and
however fast frames come, and before the route has checked any credentials. ``PlainSocket``
reads nothing until the caller asks for the next message (so a flood waits in the client's
TCP buffers: back-pressure), refuses a message over ``max_message_size`` with close code 1009
as its bytes arrive (never buffered), and answers a refused connection without reading at
all. Writes use ``sendall`` (a partial ``send`` would cut a frame short).
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Any, Iterator

from flask import Response
from simple_websocket import Server
from wsproto.events import (BytesMessage, CloseConnection, Message, Ping, TextMessage)
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from app.overrides import Needed

REQUIRES = (
    Needed("simple-websocket", "simple_websocket:Server.__init__", params=(
        "environ", "subprotocols", "receive_bytes", "ping_interval", "max_message_size",
        "thread_class", "event_class", "selector_class")),
    Needed("simple-websocket", "simple_websocket.ws:Base.sock", assigned=True),
    Needed("simple-websocket", "simple_websocket.ws:Base.ws", assigned=True),
    Needed("simple-websocket", "simple_websocket.ws:Base.connected", assigned=True),
    Needed("simple-websocket", "simple_websocket.ws:Base.receive_bytes", assigned=True),
    Needed("simple-websocket", "simple_websocket.ws:Base.max_message_size", assigned=True),
    Needed("simple-websocket", "simple_websocket.ws:Base.input_buffer", assigned=True),
    Needed("simple-websocket", "simple_websocket.ws:Base._thread", params=()),
    Needed("simple-websocket", "simple_websocket.ws:Base._handle_events", params=()),
    Needed("simple-websocket", "simple_websocket.ws:Server.mode", assigned=True),
    Needed("wsproto", "wsproto:WSConnection.send", params=("event",)),
    Needed("wsproto", "wsproto:WSConnection.receive_data", params=("data",)),
    Needed("wsproto", "wsproto:WSConnection.events", params=()),
)

#: After refusing an oversized message: how long the rest of it is read and discarded, so that
#: the client sees the close frame rather than a reset connection.
DISCARD_SECONDS = 5.0


class TooBig(Exception):
    """A client message passed ``max_message_size``."""


class _NoReader:
    """Stands in for simple-websocket's reader thread, which is never started."""

    def __init__(self, target=None, **_):
        self.name = "plain-websocket-no-reader"

    def start(self) -> None:
        pass


class PlainSocket(Server):
    """A server-side WebSocket whose client input is read only on demand, bounded in size."""

    def __init__(self, environ, max_message_size: int = 1024 * 1024,
                 receive_bytes: int = 4096, **_ignored) -> None:
        self.send_lock = threading.Lock()
        super().__init__(environ, receive_bytes=receive_bytes,
                         max_message_size=max_message_size, thread_class=_NoReader)

    # -- output -----------------------------------------------------------------------------

    def send(self, data) -> None:
        """Send a message (text unless ``data`` is bytes), all of it."""
        message = Message(data=data) if isinstance(data, bytes) else TextMessage(data=str(data))
        with self.send_lock:
            if not self.connected:
                raise ConnectionError("the WebSocket is closed")
            self.sock.sendall(self.ws.send(message))

    def close(self, reason=None, message=None) -> None:
        """Send a close frame (once) and end our side of the stream."""
        with self.send_lock:
            if not self.connected:
                return
            self.connected = False
            try:
                self.sock.sendall(self.ws.send(CloseConnection(
                    reason or CloseReason.NORMAL_CLOSURE, message)))
            except (OSError, LocalProtocolError):
                pass
        self.shutdown(socket.SHUT_WR)

    def abort(self) -> None:
        """Cut the connection now, without a close frame: wakes a reader and a writer
        blocked on it (a client that stopped reading)."""
        self.connected = False
        self.shutdown(socket.SHUT_RDWR)

    def shutdown(self, how: int) -> None:
        try:
            self.sock.shutdown(how)
        except OSError:
            pass

    # -- input ------------------------------------------------------------------------------

    def messages(self) -> Iterator[str | bytes]:
        """The client's messages, each read from the socket only when asked for.

        Ends when the client closes or the connection ends; a message over
        ``max_message_size`` ends it with close code 1009.
        """
        parts: list = []
        size = 0
        while True:
            try:
                data = self.sock.recv(self.receive_bytes)
            except OSError:
                data = b""
            if not data:
                self.connected = False
                return
            try:
                self.ws.receive_data(data)
                for event in self.ws.events():
                    if isinstance(event, (TextMessage, BytesMessage)):
                        chunk = event.data
                        size += len(chunk.encode() if isinstance(chunk, str) else chunk)
                        if self.max_message_size and size > self.max_message_size:
                            raise TooBig()
                        parts.append(chunk)
                        if event.message_finished:
                            message = parts[0][:0].join(parts)
                            parts, size = [], 0
                            yield message
                    elif isinstance(event, Ping):
                        self._send_raw(self.ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        self.close_reason, self.close_message = event.code, event.reason
                        if self.connected:
                            self.connected = False
                            self._send_raw(self.ws.send(event.response()))
                        self.shutdown(socket.SHUT_WR)
                        return
            except TooBig:
                self.close(CloseReason.MESSAGE_TOO_BIG, "Message is too big")
                self._discard()
                return
            except (LocalProtocolError, RemoteProtocolError):
                self.abort()
                return

    def _send_raw(self, data: bytes) -> None:
        with self.send_lock:
            if data:
                try:
                    self.sock.sendall(data)
                except OSError:
                    pass

    def _discard(self) -> None:
        """Read and drop what the client is still sending, for a bounded time, so that it can
        read our close frame before the connection is closed under it."""
        deadline = time.monotonic() + DISCARD_SECONDS
        previous = self.sock.gettimeout()
        try:
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if not self.sock.recv(65536):
                    break
        except OSError:
            pass
        finally:
            try:
                self.sock.settimeout(previous)
            except OSError:
                pass


class HandledResponse(Response):
    """The response of a request whose socket the WebSocket ``ws`` (a simple-websocket
    Server) took over: tells the WSGI server to write nothing more (as flask-sock's)."""

    def __init__(self, ws: Server) -> None:
        super().__init__()
        self.ws = ws

    def __call__(self, environ, start_response):
        if self.ws.mode == "eventlet":
            from app.overrides.eventlet import handled_response_body

            return handled_response_body()
        if self.ws.mode == "gunicorn":
            raise StopIteration()  # gunicorn: the connection is done, nothing more to write
        if self.ws.mode == "werkzeug":
            return super().__call__(environ, start_response)
        return []


def limit_reader(server_args: dict, max_message: int, sleep: Any, session: Any,
                 max_buffered: int) -> None:
    """Bound what the simple-websocket server made from ``server_args`` (python-engineio's
    gevent and threading drivers) reads: messages over ``max_message`` bytes are refused,
    and its reader thread stops reading its socket while ``max_buffered`` frames wait for
    the Engine.IO reader, so that a flooder's TCP buffers fill instead of the process's
    memory."""
    server_args["max_message_size"] = max_message
    thread_class = server_args.get("thread_class")
    if thread_class is not None:
        server_args["thread_class"] = _reader_with_backpressure(thread_class, sleep, session,
                                                                max_buffered)


def _reader_with_backpressure(thread_class: type, sleep: Any, session: Any,
                              max_buffered: int) -> Any:
    def start_reader(target: Any, *args: Any, **kwargs: Any) -> Any:
        ws = getattr(target, "__self__", None)
        if ws is not None and hasattr(ws, "_handle_events"):
            handle_events = ws._handle_events

            def handle_events_then_wait() -> bool:
                keep_going = handle_events()
                while keep_going and ws.connected and not getattr(session, "closed", False) \
                        and len(ws.input_buffer) > max_buffered:
                    sleep(0.01)
                return keep_going

            ws._handle_events = handle_events_then_wait
        return thread_class(target, *args, **kwargs)

    return start_reader
