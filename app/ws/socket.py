"""The /ws/chat socket: simple-websocket's handshake, then reading on our own terms.

simple-websocket's server starts a reader thread as soon as the handshake is done; that thread
reads everything the client sends into an unbounded list, whatever the size of a message and
however fast frames come, and before the route has checked any credentials. Here nothing is
read until the caller asks for the next message (so a flood waits in the client's TCP buffers:
back-pressure), a message over ``max_message_size`` is refused with close code 1009 as its
bytes arrive (never buffered), and a refused connection is answered without reading at all.
Writes use ``sendall`` (a partial ``send`` would cut a frame short).
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Iterator

from simple_websocket import Server
from wsproto.events import (BytesMessage, CloseConnection, Message, Ping, TextMessage)
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

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


class TokenBucket:
    """``rate`` tokens a second, up to ``burst`` saved."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> float:
        """Take a token: 0 when one was there, else the seconds until one is."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


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
