"""A /ws/chat client (CONTRACT.md section 4) over websocket-client: JSON frames
``{event, data}`` read in order, with bounded waits."""
from __future__ import annotations

import json
import socket
import threading
from typing import Any
from urllib.parse import urlencode

import websocket

from tests.kit.eio import Closed
from tests.kit.record import Recorder


class PlainClient:
    """One /ws/chat connection; ``frames`` holds every frame read so far, in order.

    ``server`` is a live server or its URL; the query is ``params`` (or ``query``, already
    encoded, for queries no dict can hold)."""

    def __init__(self, server: Any, query: str | None = None, timeout: float = 10,
                 **params: str):
        url = server if isinstance(server, str) else server.url
        self.ws = websocket.create_connection(
            url.replace("http://", "ws://") + "/ws/chat?" + (query or urlencode(params)),
            timeout=timeout)
        self.frames: list[dict] = []
        self.closed = False

    def next(self) -> dict:
        """The next frame; Closed once the server closed the connection."""
        try:
            opcode, data = self.ws.recv_data()
        except (websocket.WebSocketConnectionClosedException, ConnectionError, OSError):
            self.closed = True
            raise Closed("closed by the server") from None
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            self.closed = True
            raise Closed("closed by the server")
        frame = json.loads(data.decode("utf-8"))
        assert isinstance(frame, dict) and set(frame) == {"event", "data"}, frame
        self.frames.append(frame)
        return frame

    def named(self, event: str) -> list[Any]:
        return [f["data"] for f in self.frames if f["event"] == event]

    def until(self, event: str, count: int = 1) -> list[Any]:
        """Read frames until ``count`` frames named ``event`` arrived; return their data.
        Each read is bounded by the connection's timeout."""
        while len(self.named(event)) < count:
            try:
                self.next()
            except Closed:
                raise AssertionError(f"closed before {count} x {event!r}; got "
                                     f"{[f['event'] for f in self.frames]}") from None
        return self.named(event)

    def wait_closed(self) -> None:
        """Read to the server's close (each read bounded by the connection's timeout)."""
        while not self.closed:
            try:
                self.next()
            except Closed:
                return

    def send(self, frame: Any) -> None:
        """Send a frame (a dict as JSON, a str as it is); Closed if the server closed."""
        try:
            self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))
        except (websocket.WebSocketConnectionClosedException, ConnectionError, OSError):
            self.closed = True
            raise Closed("closed by the server") from None

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:  # already closed by the server
            pass


class RecordingPlainClient(Recorder):
    """A /ws/chat connection whose frames a reader thread records as they arrive, so that a
    test waits on it as on a Socket.IO ChatClient (``events``, ``wait_for``, ``wait_until``);
    ``closed`` once the server closed it (the waiters are woken)."""

    def __init__(self, url: str, params: dict[str, Any], timeout: float = 10):
        super().__init__()
        ws_url = url.replace("http://", "ws://") + "/ws/chat?" + urlencode(params)
        self.ws = websocket.create_connection(ws_url, timeout=timeout)
        self.ws.settimeout(None)
        self.closed = False
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        try:
            while True:
                raw = self.ws.recv()
                if not raw:  # websocket-client's answer to a close frame
                    break
                frame = json.loads(raw)
                self.record(frame["event"], frame["data"])
        except Exception:  # the socket closed under the reader
            pass
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def send(self, frame: Any) -> None:
        self.ws.send(json.dumps(frame))

    def close(self) -> None:
        try:
            self.ws.sock.shutdown(socket.SHUT_RDWR)
        except Exception:
            pass
        try:
            self.ws.close()
        except Exception:
            pass
        self.reader.join(5)
