"""/ws/chat against hostile clients (contract §9): oversized frames, refused credentials,
foreign origins, frame floods, clients that stop reading, JSON nested too deeply.

Raw sockets speak the WebSocket protocol here (a client library would buffer, mask and
frame for us, which is what these tests must control). Client frames are masked with the
all-zero key (legal, and the payload goes on the wire as is, so a 200 MB frame is streamed
without building it).
"""
from __future__ import annotations

import base64
import json
import os
import select
import socket
import struct
import threading
import time
import zlib
from urllib.parse import urlencode

import pytest
import requests

from app.ws.socket import TokenBucket
from tests.kit.plain import PlainClient
from tests.kit.rest import new_tenant
from tests.kit.servers import start_server, stop_server

pytestmark = pytest.mark.e2e

CONNECT_TIMEOUT = 20
SERVER_ENV = {
    "CONNECT_TIMEOUT": str(CONNECT_TIMEOUT),
    # the slow-client test pushes a few hundred messages from one connection
    "RATE_LIMIT_MESSAGES": "10000/second",
}
MB = 1024 * 1024
ALLOWED_ORIGIN = "http://allowed.example"


# --- a raw WebSocket client -----------------------------------------------------------------

class Closed(Exception):
    """The server ended the connection."""


class RawWebSocket:
    """One WebSocket connection over a bare socket."""

    def __init__(self, server, path: str = "/ws/chat", params: dict | None = None,
                 origin: str | None = None, rcvbuf: int | None = None,
                 timeout: float = 10, extra_headers: str = "") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:  # before connect, so that the window is small from the start
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", server.port))
        target = path + ("?" + urlencode(params) if params else "")
        key = base64.b64encode(os.urandom(16)).decode()
        head = (f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n")
        if origin:
            head += f"Origin: {origin}\r\n"
        self.sock.sendall((head + extra_headers + "\r\n").encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        response, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = response.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.strip().lower(): v.strip()
                        for k, v in (line.split(":", 1) for line in lines[1:])}
        self.body = b""
        if self.status == 101:
            return
        if self.headers.get("transfer-encoding") == "chunked":  # Socket.IO's answers
            while True:
                while b"\r\n" not in self.buffer:
                    self._fill()
                size = int(self.buffer.split(b"\r\n", 1)[0], 16)
                self._take(self.buffer.index(b"\r\n") + 2)
                self.body += self._take(size + 2)[:size]
                if not size:
                    break
        else:
            self.body = self._take(int(self.headers.get("content-length", "0")))

    def _fill(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (ConnectionError, socket.timeout) as exc:
            raise Closed(repr(exc)) from None
        if not data:
            raise Closed("end of stream")
        self.buffer += data

    def _take(self, count: int) -> bytes:
        while len(self.buffer) < count:
            self._fill()
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def frame(self) -> tuple[int, bytes]:
        """The next server frame: (opcode, payload)."""
        first, second = self._take(2)
        length = second & 0x7F
        if length == 126:
            length = struct.unpack("!H", self._take(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self._take(8))[0]
        payload = self._take(length)
        if first & 0x40:  # compressed (permessage-deflate): one context for the connection
            if not hasattr(self, "inflater"):
                self.inflater = zlib.decompressobj(-15)
            payload = self.inflater.decompress(payload + b"\0\0\xff\xff")
        return first & 0x0F, payload

    def next(self) -> dict:
        """The next JSON frame; Closed on a close frame (its code in ``close_code``)."""
        opcode, payload = self.frame()
        if opcode == 8:
            self.close_code = struct.unpack("!H", payload[:2])[0] if payload else None
            raise Closed(f"close frame {self.close_code}")
        assert opcode == 1, opcode
        return json.loads(payload)

    def until(self, event: str) -> dict:
        while True:
            frame = self.next()
            if frame["event"] == event:
                return frame["data"]

    def close_code_at_end(self) -> int | None:
        """Read to the server's close frame; its code."""
        self.close_code = None
        try:
            while True:
                self.next()
        except Closed:
            return self.close_code

    @staticmethod
    def header(length: int, opcode: int = 1, fin: bool = True, rsv1: bool = False) -> bytes:
        first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
        if length < 126:
            head = struct.pack("!BB", first, 0x80 | length)
        elif length < 65536:
            head = struct.pack("!BBH", first, 0x80 | 126, length)
        else:
            head = struct.pack("!BBQ", first, 0x80 | 127, length)
        return head + b"\0\0\0\0"  # the all-zero mask: the payload is sent as is

    @classmethod
    def encode(cls, text: str) -> bytes:
        payload = text.encode()
        return cls.header(len(payload)) + payload

    def send_text(self, text: str) -> None:
        self.sock.sendall(self.encode(text))

    def readable(self) -> bool:
        return bool(self.buffer) or bool(select.select([self.sock], [], [], 0)[0])

    def stream(self, parts, limit: int) -> int:
        """Send byte strings until the server answers, closes, or ``limit`` bytes went;
        the number of bytes sent."""
        sent = 0
        for part in parts:
            if sent >= limit or self.readable():
                break
            try:
                self.sock.sendall(part)
            except OSError:
                break
            sent += len(part)
        return sent

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def worker_rss(server) -> int:
    """The gunicorn worker's resident memory, in bytes."""
    pid = server.process.pid
    children = open(f"/proc/{pid}/task/{pid}/children").read().split()
    assert len(children) == 1, children
    for line in open(f"/proc/{children[0]}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def healthy(server) -> bool:
    return requests.get(server.url + "/healthz", timeout=5).status_code == 200


def big_frame(total: int, chunk: int = MB):
    """One text frame of ``total`` bytes, as its header then ``chunk``-byte parts."""
    yield RawWebSocket.header(total)
    part = b"a" * chunk
    for _ in range(total // chunk):
        yield part


def fragments(total: int, size: int = 64 * 1024):
    """One text message of ``total`` bytes in ``size``-byte fragments (never finished)."""
    part = b"a" * size
    yield RawWebSocket.header(size, opcode=1, fin=False) + part
    for _ in range(total // size - 1):
        yield RawWebSocket.header(size, opcode=0, fin=False) + part


@pytest.fixture(scope="module")
def tenant(rt_server):
    return new_tenant(rt_server.url)


def joined(server, tenant, chat: str, user: str = "ann", **kwargs) -> RawWebSocket:
    ws = RawWebSocket(server, params={"api_key": tenant.key, "user_id": user, "chat_id": chat},
                      **kwargs)
    assert ws.status == 101, (ws.status, ws.body)
    ws.until("connection_established")
    return ws


# --- 1. frame size --------------------------------------------------------------------------

def test_a_200_mb_frame_is_refused_with_1009_and_not_buffered(rt_server, tenant):
    chat = tenant.chat("ann")
    healthy(rt_server)
    before = worker_rss(rt_server)
    ws = joined(rt_server, tenant, chat)
    try:
        sent = ws.stream(big_frame(200 * MB), 200 * MB)
        assert ws.close_code_at_end() == 1009
        assert sent < 100 * MB, sent  # the server answered long before the end
    finally:
        ws.close()
    assert worker_rss(rt_server) - before < 30 * MB
    assert healthy(rt_server)
    plain = PlainClient(rt_server, api_key=tenant.key, user_id="ann", chat_id=chat)
    try:
        plain.until("connection_established")
        plain.send({"content": "after the big frame"})
        assert plain.until("message")[0]["ok"]
    finally:
        plain.close()


def test_a_fragmented_message_over_1_mb_is_refused_with_1009(rt_server, tenant):
    ws = joined(rt_server, tenant, tenant.chat("ann"))
    try:
        ws.stream(fragments(50 * MB), 50 * MB)
        assert ws.close_code_at_end() == 1009
    finally:
        ws.close()
    assert healthy(rt_server)


def test_a_message_of_just_under_1_mb_is_read(rt_server, tenant):
    ws = joined(rt_server, tenant, tenant.chat("ann"))
    try:
        ws.send_text(json.dumps({"content": "x", "pad": "a" * (MB - 100)}))
        assert ws.until("message")["ok"]
    finally:
        ws.close()


def test_200_mb_frames_on_refused_connections_are_never_read(rt_server, tenant):
    chat = tenant.chat("ann")
    healthy(rt_server)
    before = worker_rss(rt_server)
    for _ in range(4):
        ws = RawWebSocket(rt_server, params={"api_key": "wc_wrong", "user_id": "ann",
                                             "chat_id": chat})
        try:
            assert ws.status == 101
            ws.stream(big_frame(200 * MB), 200 * MB)
        finally:
            ws.close()
    assert worker_rss(rt_server) - before < 30 * MB
    assert healthy(rt_server)


# --- 2. refused credentials, CONNECT_TIMEOUT ------------------------------------------------

@pytest.mark.parametrize("params, code", [
    ({"api_key": "wc_wrong", "user_id": "ann"}, "invalid_api_key"),
    ({"connection_string": "forged"}, "invalid_connection_string"),
    ({"user_id": "ann"}, "validation_error"),
])
def test_refused_credentials_get_the_error_frame_and_are_closed_at_once(rt_server, tenant,
                                                                        params, code):
    chat = tenant.chat("ann")
    started = time.monotonic()
    ws = RawWebSocket(rt_server, params={"chat_id": chat, **params})
    try:
        error = ws.next()
        assert error["event"] == "error" and error["data"]["code"] == code
        assert error["data"]["message"]
        assert ws.close_code_at_end() == 1000
        with pytest.raises(Closed):  # then the end of the stream
            ws.frame()
        latency = time.monotonic() - started
        assert latency < CONNECT_TIMEOUT / 2, latency  # not left to the timeout
    finally:
        ws.close()


def test_an_upgrade_request_never_completed_is_closed(rt_server):
    sock = socket.create_connection(("127.0.0.1", rt_server.port), timeout=CONNECT_TIMEOUT * 3)
    try:
        sock.sendall(b"GET /ws/chat?chat_id=x HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Upgrade: websocket\r\n")  # and never the rest
        started = time.monotonic()
        data = sock.recv(65536)  # the end of the stream (or a reset) when closed
        assert data == b"" or data.startswith(b"HTTP/1.1 4")
        latency = time.monotonic() - started
        assert latency < CONNECT_TIMEOUT * 2, latency
    except ConnectionResetError:
        pass
    finally:
        sock.close()


# --- 3. origins -----------------------------------------------------------------------------

def upgrade_status(server, path: str, origin: str | None) -> tuple[int, bytes]:
    params = ({"EIO": "4", "transport": "websocket"} if path == "/socket.io/" else
              {"chat_id": "none", "user_id": "ann"})  # refused credentials still upgrade
    ws = RawWebSocket(server, path=path, params=params, origin=origin)
    ws.close()
    return ws.status, ws.body


def check_origins(server, cases: dict) -> None:
    for origin, expected in cases.items():
        plain = upgrade_status(server, "/ws/chat", origin)
        sio = upgrade_status(server, "/socket.io/", origin)
        assert plain == sio, (origin, plain, sio)
        assert plain[0] == expected, (origin, plain)
        if expected == 400:
            assert json.loads(plain[1]) == "Not an accepted origin."


def test_origins_are_checked_as_socketio_checks_them(rt_server):
    check_origins(rt_server, {
        None: 101,  # non-browser clients send no Origin
        f"http://127.0.0.1:{rt_server.port}": 101,  # the same origin
        "http://evil.example": 400,
        f"http://127.0.0.1:{rt_server.port + 1}": 400,
        ALLOWED_ORIGIN: 400,
    })


@pytest.fixture(scope="module")
def cors_server(tmp_path_factory):
    """A second server: CORS_ORIGINS set, and WebSocket compression on (WS_COMPRESSION=1)."""
    server = start_server(tmp_path_factory.mktemp("cors"), CORS_ORIGINS=ALLOWED_ORIGIN,
                          WS_COMPRESSION="1")
    yield server
    stop_server(server.process)


def test_configured_origins_are_checked_as_socketio_checks_them(cors_server):
    check_origins(cors_server, {
        None: 101,
        ALLOWED_ORIGIN: 101,
        "http://evil.example": 400,
        f"http://127.0.0.1:{cors_server.port}": 400,  # only CORS_ORIGINS, as Socket.IO
    })


def test_a_compressed_message_inflating_past_1_mb_is_refused_with_1009(cors_server):
    compressor = zlib.compressobj(wbits=-15)
    block = b"a" * MB
    payload = b"".join(compressor.compress(block) for _ in range(200))
    payload += compressor.flush(zlib.Z_SYNC_FLUSH)[:-4]  # permessage-deflate drops 00 00 ff ff
    tenant = new_tenant(cors_server.url)
    chat = tenant.chat("ann")
    healthy(cors_server)
    before = worker_rss(cors_server)
    ws = joined(cors_server, tenant, chat,
                extra_headers="Sec-WebSocket-Extensions: permessage-deflate\r\n")
    try:
        assert "permessage-deflate" in ws.headers.get("sec-websocket-extensions", "")
        frame = RawWebSocket.header(len(payload), rsv1=True) + payload  # 200 MB inflated
        ws.stream([frame[i:i + 65536] for i in range(0, len(frame), 65536)], len(frame))
        assert ws.close_code_at_end() == 1009
    finally:
        ws.close()
    assert worker_rss(cors_server) - before < 30 * MB
    assert healthy(cors_server)


# --- 4. event floods ------------------------------------------------------------------------

def test_a_typing_flood_delays_neither_healthz_nor_other_chats(rt_server, tenant):
    flooded = tenant.chat("ann")
    quiet = tenant.chat("ann", tenant.workspace("ann", members=("bob",)))
    flooder = joined(rt_server, tenant, flooded)
    flooder.sock.settimeout(1)
    # padded (the server ignores the extra field), so that TCP buffers cannot hold 100,000
    typing = {"event": "typing", "data": {"is_typing": True, "pad": "p" * 200}}
    batch = RawWebSocket.encode(json.dumps(typing)) * 1000
    stop = threading.Event()
    sent = [0]

    def flood():
        while not stop.is_set() and sent[0] < 100_000:
            try:
                flooder.sock.sendall(batch)
            except socket.timeout:
                continue  # back-pressure: the server is not reading us
            except OSError:
                return
            sent[0] += 1000

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    ann = PlainClient(rt_server, api_key=tenant.key, user_id="ann", chat_id=quiet)
    bob = PlainClient(rt_server, api_key=tenant.key, user_id="bob", chat_id=quiet)
    try:
        ann.until("connection_established")
        bob.until("connection_established")
        latencies = []
        for i in range(60):
            started = time.monotonic()
            assert healthy(rt_server)
            latencies.append(time.monotonic() - started)
            if i % 3 == 0:
                ann.send({"content": f"quiet {i}"})
        latencies.sort()
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        assert p99 < 1.0, latencies[-5:]
        received = bob.until("message_received", 20)
        assert [m["content"] for m in received] == [f"quiet {i}" for i in range(0, 60, 3)]
        assert sent[0] < 100_000  # the flood was held back, not swallowed
    finally:
        stop.set()
        thread.join(10)
        flooder.close()
        ann.close()
        bob.close()
    assert healthy(rt_server)


def test_the_frame_budget_is_a_burst_of_200_then_100_a_second(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("app.ws.socket.time.monotonic", lambda: clock[0])
    bucket = TokenBucket(100, 200)
    assert [bucket.take() for _ in range(200)] == [0.0] * 200
    assert bucket.take() == pytest.approx(0.01)
    clock[0] += 0.5  # 50 frames' worth
    assert [bucket.take() for _ in range(50)] == [0.0] * 50
    assert bucket.take() > 0
    clock[0] += 3600  # never more than the burst saved
    assert [bucket.take() for _ in range(200)] == [0.0] * 200
    assert bucket.take() > 0


# --- 5. slow clients ------------------------------------------------------------------------

def test_a_client_that_stops_reading_is_disconnected_and_replayed_on_return(rt_server, tenant):
    chat = tenant.chat("ann", tenant.workspace("ann", members=("bob",)))
    sender = PlainClient(rt_server, api_key=tenant.key, user_id="ann", chat_id=chat)
    sender.until("connection_established")
    sender.send({"content": "anchor"})
    anchor = sender.until("message")[0]["message"]["id"]
    healthy(rt_server)
    before = worker_rss(rt_server)
    # bob joins, then never reads again
    bob = joined(rt_server, tenant, chat, user="bob", rcvbuf=4096)
    content = "\U0001F600" * 4000  # 48 KB of JSON escapes per message_received
    pushed = 0
    try:
        acks = 1
        while pushed < 15 * MB and "slow client" not in rt_server.log():
            for _ in range(10):
                sender.send({"content": content})
                pushed += 48_000
            acks += 10
            assert all(a["ok"] for a in sender.until("message", acks))
        assert "slow client" in rt_server.log(), f"pushed {pushed} bytes"
        assert worker_rss(rt_server) - before < 30 * MB
        for _ in range(5):  # missed while disconnected
            sender.send({"content": "after the drop"})
        acks += 5
        assert all(a["ok"] for a in sender.until("message", acks))
        # bob's socket was closed under him: what it holds ends without a clean close
        with pytest.raises(Closed):
            while True:
                bob.frame()
    finally:
        bob.close()
        sender.close()
    back = PlainClient(rt_server, api_key=tenant.key, user_id="bob", chat_id=chat,
                       last_message_id=anchor)
    try:
        established = back.until("connection_established")[0]
        assert established.get("disconnect_reason") == "slow_client"
        history = [m for m in tenant.history(chat, limit=200) if m["id"] != anchor]
        replayed = back.until("message_received", len(history))
        assert [m["id"] for m in replayed] == [m["id"] for m in history]
    finally:
        back.close()


# --- 6. JSON depth --------------------------------------------------------------------------

def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_json_nested_deeper_than_64_levels_is_a_validation_error(rt_server, tenant):
    ws = joined(rt_server, tenant, tenant.chat("ann"))
    try:
        # the frame object is level 1: 63 lists inside it make 64 levels, accepted
        ws.send_text('{"content": "deep enough", "extra": %s}' % nested(63))
        assert ws.until("message")["ok"]
        ws.send_text('{"content": "too deep", "extra": %s}' % nested(64))
        assert ws.until("error")["code"] == "validation_error"
        assert ws.until("message")["error"]["code"] == "validation_error"  # and the nack
        ws.send_text('{"event": "typing", "data": {"is_typing": true, "x": %s}}' % nested(70))
        assert ws.until("error")["code"] == "validation_error"
        ws.send_text('{"content": %s}' % ("[" * 200_000))  # too deep for the json module
        assert ws.until("error")["code"] == "validation_error"
        ws.send_text(json.dumps({"content": "still here"}))
        assert ws.until("message")["ok"]
    finally:
        ws.close()
    assert "Traceback" not in rt_server.log()
