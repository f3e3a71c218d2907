"""A raw Socket.IO v5 / Engine.IO v4 client over websocket-client, for frames that no client
library would produce (invalid JSON, lone-surrogate escapes, truncated packets, binary frames,
wrong namespaces, ack ids where none are expected).

Packets on the wire (Engine.IO type digit, then Socket.IO type digit, namespace, ack id, JSON):
``0{...}`` open, ``2``/``3`` ping/pong, ``40/chat,{auth}`` connect, ``40/chat,{sid}``
connected, ``44/chat,{message, data}`` refused, ``42/chat,7["event", data]`` event with ack id
7, ``43/chat,7[ack]`` its ack, ``41/chat,`` disconnect.
"""
from __future__ import annotations

import json
import time
from typing import Any

import requests
import websocket

NAMESPACE = "/chat"


class Closed(websocket.WebSocketConnectionClosedException):
    """The server closed the connection (raw Engine.IO, raw WebSocket and /ws/chat alike)."""


class RawSocketIO:
    """One Engine.IO websocket session; ``recv`` answers pings and returns other packets."""

    def __init__(self, url: str, query: str = "", timeout: float = 10):
        ws_url = url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
        if query:
            ws_url += "&" + query
        self.ws = websocket.create_connection(ws_url, timeout=timeout)
        self.timeout = timeout
        self.packets: list[str | bytes] = []  # every non-ping packet received, in order
        opening = self.recv()
        assert isinstance(opening, str) and opening.startswith("0{"), opening
        self.handshake = json.loads(opening[1:])
        self.next_ack_id = 1

    # -- the wire ---------------------------------------------------------------------------

    def send_raw(self, frame: str | bytes) -> None:
        """Send one websocket frame (binary for bytes); Closed when the server closed."""
        try:
            if isinstance(frame, bytes):
                self.ws.send_binary(frame)
            else:
                self.ws.send(frame)
        except (websocket.WebSocketConnectionClosedException, ConnectionError):
            raise Closed() from None

    def recv(self, timeout: float | None = None) -> str | bytes:
        """The next packet other than a ping (answered with a pong); Closed when closed."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            self.ws.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                opcode, data = self.ws.recv_data()
            except (websocket.WebSocketConnectionClosedException, ConnectionError):
                raise Closed() from None
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                raise Closed()
            packet: str | bytes = data.decode("utf-8") if opcode == websocket.ABNF.OPCODE_TEXT \
                else data
            if packet == "2":
                self.ws.send("3")
                continue
            if packet == "1":  # Engine.IO close
                raise Closed()
            self.packets.append(packet)
            return packet

    # -- Socket.IO on /chat -----------------------------------------------------------------

    def connect(self, auth: Any = None, raw: str | None = None) -> tuple[str, Any, list]:
        """Send a CONNECT to /chat; returns ("connected", {sid}, events) or
        ("refused", {message, data}, events), events being those that came before."""
        self.send_raw(raw if raw is not None else
                      f"40{NAMESPACE}," + ("" if auth is None else json.dumps(auth)))
        events = []
        while True:
            packet = self.recv()
            if not isinstance(packet, str):
                continue
            if packet.startswith(f"42{NAMESPACE},"):
                events.append(json.loads(packet[len(NAMESPACE) + 3:]))
            elif packet.startswith(f"40{NAMESPACE},"):
                return "connected", json.loads(packet[len(NAMESPACE) + 3:]), events
            elif packet.startswith(f"44{NAMESPACE},"):
                return "refused", json.loads(packet[len(NAMESPACE) + 3:]), events

    def emit_raw(self, body: str, with_ack: bool = True) -> int | None:
        """Send ``42/chat,<id><body>`` where body is JSON text (possibly malformed)."""
        ack_id = None
        if with_ack:
            ack_id = self.next_ack_id
            self.next_ack_id += 1
        self.send_raw(f"42{NAMESPACE}," + (str(ack_id) if ack_id is not None else "") + body)
        return ack_id

    def emit(self, event: str, *args: Any, with_ack: bool = True) -> int | None:
        return self.emit_raw(json.dumps([event, *args]), with_ack)

    def wait_ack(self, ack_id: int, timeout: float | None = None) -> list:
        """The arguments of the ack with this id (events before it are kept in .packets)."""
        prefix = f"43{NAMESPACE},{ack_id}["
        while True:
            packet = self.recv(timeout)
            if isinstance(packet, str) and packet.startswith(prefix):
                return json.loads(packet[len(prefix) - 1:])

    def events(self, name: str | None = None, since: int = 0) -> list[list]:
        """The event packets received on /chat (from packet number ``since``), as
        [name, *args]."""
        found = []
        for packet in self.packets[since:]:
            if isinstance(packet, str) and packet.startswith(f"42{NAMESPACE},["):
                event = json.loads(packet[len(NAMESPACE) + 3:])
                if name is None or event[0] == name:
                    found.append(event)
        return found

    def call(self, event: str, *args: Any, timeout: float | None = None) -> list:
        return self.wait_ack(self.emit(event, *args), timeout)

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass


def polling_session(url: str) -> str:
    """An Engine.IO long-polling session's id (the handshake only)."""
    r = requests.get(url + "/socket.io/", params={"EIO": "4", "transport": "polling"},
                     timeout=10)
    assert r.status_code == 200 and r.text.startswith("0{"), r.text
    return json.loads(r.text[1:])["sid"]
