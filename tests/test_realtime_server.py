"""Server settings and concurrency, end to end against the real server process (Procfile web:).

What DESIGN.md "Runtime notes" promises of the server, proved from the outside:

- TCP_NODELAY: a sender that waits for every ack is not slowed by Nagle + delayed ACK;
- more than 1,024 connections at once in one process (eventlet's default pool is 1,024);
- no permessage-deflate unless WS_COMPRESSION=1;
- concurrent senders in many chats: every client gets its chat's messages exactly once, in the
  order of the chat's history, and nothing of other chats;
- a database call blocked in one chat does not stall another chat (green psycopg2).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import resource
import selectors
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import psycopg2
import pytest
import websocket

from tests.kit.rest import new_tenant
from tests.kit.servers import start_server, stop_server
from tests.kit.sio import NAMESPACE, ChatClient, connect
from tests.kit.wait import wait_until

pytestmark = pytest.mark.e2e


def _raise_open_file_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit, before any server of this module starts (the
    server process inherits it), so that 1,100 sockets fit on both ends."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


_raise_open_file_limit()

# Used by the rt_server fixture (one server per async mode for this module). The message rate
# limit is lifted so that senders are bounded by the server, not by the 10/s contract default;
# the connection limit allows the 1,100-client test; the REST limit allows the setup calls.
SERVER_ENV = {
    "RATE_LIMIT_MESSAGES": "100000/second",
    "MAX_CONNECTIONS_PER_TENANT": "2000",
    "RATE_LIMIT_REST": "100000/minute",
}

WAIT = 20  # seconds: the bound of every wait for an event that should come much sooner


def _log_tail(server, chars: int = 4000) -> str:
    return server.log()[-chars:]


# --- 1. Nagle / delayed ACK ---------------------------------------------------------------

def test_sender_waiting_for_each_ack_is_not_slowed_by_nagle_delayed_ack(rt_server):
    tenant = new_tenant(rt_server.url)
    chat = tenant.chat("ann")
    client = connect(rt_server.url, {"chat_id": chat, "api_key": tenant.key, "user_id": "ann"})
    try:
        # Not timed: the first message warms up the limiter and the database session.
        string = client.send("warm-up", client.message_string)["next_message_string"]
        started = time.perf_counter()
        for i in range(200):
            ack = client.send(f"message {i}", string)
            assert ack["ok"] is True, ack
            string = ack["next_message_string"]
        seconds_for_200_acks = time.perf_counter() - started
        # The one coarse time bound of this module, and why it exists: the server writes the
        # broadcast and then the ack to the same socket; without TCP_NODELAY the ack waits
        # for the client's delayed TCP ACK (~40 ms), so 200 acks take 8-10 s (measured 9.7 s
        # here with TCP_NODELAY turned off on the listener). With it they take well under a
        # second here; 2 s leaves room for a slow machine.
        assert seconds_for_200_acks < 2.0, (
            f"200 acked messages took {seconds_for_200_acks:.2f}s "
            f"({seconds_for_200_acks / 200 * 1000:.1f} ms each): TCP_NODELAY missing?")
        stored = tenant.history(chat, offset=200)  # the warm-up, then the 200 timed
        assert [m["content"] for m in stored] == ["message 199"]
    finally:
        client.disconnect()


# --- 2. more than 1,024 connections -------------------------------------------------------

@dataclass
class RawClient:
    """A Socket.IO client on /chat over a raw Engine.IO WebSocket (websocket-client)."""

    ws: websocket.WebSocket
    sid: str
    events: list[tuple[str, Any]] = field(default_factory=list)
    closed: Any = None

    def named(self, name: str) -> list[Any]:
        return [data for event, data in self.events if event == name]


def _record_packet(packet: str, events: list, ws: websocket.WebSocket) -> str | None:
    """Handle one Engine.IO packet; returns the namespace sid when it is the CONNECT reply."""
    if packet == "2":  # Engine.IO ping: answer pong
        ws.send("3")
    elif packet.startswith("42/chat,"):
        name, *args = json.loads(packet[len("42/chat,"):])
        events.append((name, args[0] if len(args) == 1 else args))
    elif packet.startswith("40/chat,"):
        return json.loads(packet[len("40/chat,"):])["sid"]
    elif packet.startswith("44/chat,"):
        raise AssertionError(f"connection refused: {packet}")
    return None


def raw_connect(port: int, auth: dict, timeout: float = 30) -> RawClient:
    """Engine.IO v4 over WebSocket, then CONNECT to /chat with ``auth``; returns once the
    server answered the CONNECT (events emitted during connect come first)."""
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket", timeout=timeout)
    try:
        opening = ws.recv()
        assert opening.startswith("0{") and json.loads(opening[1:])["sid"], opening
        ws.send("40/chat," + json.dumps(auth))
        events: list[tuple[str, Any]] = []
        while True:
            packet = ws.recv()
            if packet == "":
                raise AssertionError(f"closed during connect; events so far {events}")
            sid = _record_packet(packet, events, ws)
            if sid is not None:
                return RawClient(ws, sid, events)
    except BaseException:
        ws.close()
        raise


class Pump:
    """One thread that reads every registered RawClient (select), records its events and
    answers Engine.IO pings, so that any number of sockets stay open and serviced at once."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.incoming: queue.SimpleQueue[RawClient] = queue.SimpleQueue()
        self.cond = threading.Condition()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="raw-pump", daemon=True)
        self.thread.start()

    def add(self, client: RawClient) -> None:
        self.incoming.put(client)

    def _run(self) -> None:
        while not self.stopping.is_set():
            while True:
                try:
                    client = self.incoming.get_nowait()
                except queue.Empty:
                    break
                self.selector.register(client.ws.sock, selectors.EVENT_READ, client)
            for key, _ in self.selector.select(timeout=0.05):
                client: RawClient = key.data
                with self.cond:
                    try:
                        packet = client.ws.recv()
                        if packet == "":
                            raise ConnectionError("closed by the server")
                        _record_packet(packet, client.events, client.ws)
                    except Exception as exc:  # noqa: BLE001 - recorded, asserted on
                        client.closed = exc
                        self.selector.unregister(key.fileobj)
                    self.cond.notify_all()

    def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise AssertionError(f"waited {timeout}s for {what}")

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)
        self.selector.close()


def test_more_than_1024_clients_connected_at_once_all_receive_a_chat_message(rt_server):
    count = 1100
    tenant = new_tenant(rt_server.url)
    chat = tenant.chat("ann")
    auth = {"chat_id": chat, "api_key": tenant.key, "user_id": "ann"}
    clients: list[RawClient] = []
    pump = Pump()
    sender: ChatClient | None = None
    try:
        with ThreadPoolExecutor(max_workers=32) as pool:
            futures = [pool.submit(raw_connect, rt_server.port, auth) for _ in range(count)]
            failures = []
            for future in futures:
                try:
                    client = future.result(timeout=120)
                except Exception as exc:  # noqa: BLE001 - collected, reported below
                    if not failures:  # fail fast: do not start the connections still queued
                        for queued in futures:
                            queued.cancel()
                    failures.append(repr(exc))
                    continue
                clients.append(client)
                pump.add(client)
        assert not failures, (f"{len(failures)} of {count} connections failed or were not tried "
                              f"after the first failure, first: "
                              f"{failures[:3]}\nserver log:\n{_log_tail(rt_server)}")
        assert len(clients) == count

        with pump.cond:
            established = [c.named("connection_established") for c in clients]
        assert all(len(e) == 1 for e in established), "every client gets connection_established"
        assert all(e[0]["chat_id"] == chat and e[0]["sid"] == c.sid
                   for e, c in zip(established, clients))
        assert len({c.sid for c in clients}) == count

        # One message in the chat reaches every one of the 1,100 sockets: all are joined to
        # the room at the same moment (a closed socket leaves it).
        sender = connect(rt_server.url, auth)
        ack = sender.send("to all 1100", sender.message_string)
        assert ack["ok"] is True, ack
        message_id = ack["message"]["id"]

        def everyone_has_it() -> bool:
            return all(any(d["id"] == message_id for d in c.named("message_received"))
                       or c.closed is not None for c in clients)

        pump.wait_until(everyone_has_it, 60, f"message {message_id} on {count} sockets")
        with pump.cond:
            closed = [c.closed for c in clients if c.closed is not None]
            received = [c.named("message_received") for c in clients]
        assert not closed, f"{len(closed)} sockets were closed: {closed[:3]}"
        assert all(r == [ack["message"]] for r in received)
    finally:
        if sender is not None:
            sender.disconnect()
        pump.stop()
        for client in clients:
            try:
                client.ws.send_close()  # a WebSocket close frame, without waiting for the reply
            except Exception:  # noqa: BLE001 - best effort: the socket may be gone already
                pass
            client.ws.shutdown()


# --- 3. permessage-deflate ----------------------------------------------------------------

@dataclass
class Upgrade:
    status_line: str
    headers: dict[str, list[str]]
    key: str
    first_frame: tuple[int, int, bytes] | None  # (FIN/RSV/opcode byte, length, payload)

    def header(self, name: str) -> list[str]:
        return self.headers.get(name.lower(), [])


def _read_exact(sock: socket.socket, buffer: bytearray, size: int) -> bytes:
    while len(buffer) < size:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buffer += chunk
    data = bytes(buffer[:size])
    del buffer[:size]
    return data


def raw_upgrade(port: int, extensions: str) -> Upgrade:
    """A WebSocket upgrade on a plain socket: the raw response headers and the first frame."""
    key = base64.b64encode(os.urandom(16)).decode()
    request = (f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\n"
               f"Host: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
               f"Sec-WebSocket-Extensions: {extensions}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request.encode("ascii"))
        buffer = bytearray()
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buffer += chunk
        head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        frame = None
        if " 101 " in lines[0] + " ":
            buffer = bytearray(rest)
            first, second = _read_exact(sock, buffer, 2)
            length = second & 0x7F
            if length == 126:
                length = struct.unpack("!H", _read_exact(sock, buffer, 2))[0]
            elif length == 127:
                length = struct.unpack("!Q", _read_exact(sock, buffer, 8))[0]
            assert not second & 0x80, "a server frame is never masked"
            frame = (first, length, _read_exact(sock, buffer, length))
    return Upgrade(lines[0], headers, key, frame)


def _expected_accept(key: str) -> str:
    digest = hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
    return base64.b64encode(digest).decode()


OFFER = "permessage-deflate; client_max_window_bits"


def test_websocket_upgrade_declines_permessage_deflate_by_default(rt_server):
    upgrade = raw_upgrade(rt_server.port, OFFER)
    assert upgrade.status_line.startswith("HTTP/1.1 101"), (upgrade.status_line, upgrade.headers)
    assert upgrade.header("Sec-WebSocket-Accept") == [_expected_accept(upgrade.key)]
    assert upgrade.header("Sec-WebSocket-Extensions") == [], upgrade.headers
    first, _, payload = upgrade.first_frame
    assert first == 0x81, f"FIN + text, no RSV1 (compressed) bit: {first:#x}"
    assert payload.startswith(b"0{") and json.loads(payload[1:])["sid"]


def test_ws_compression_setting_negotiates_permessage_deflate_under_eventlet(tmp_path):
    server = start_server(tmp_path, ASYNC_MODE="eventlet", WS_COMPRESSION="1")
    try:
        upgrade = raw_upgrade(server.port, OFFER)
        assert upgrade.status_line.startswith("HTTP/1.1 101"), upgrade.status_line
        assert upgrade.header("Sec-WebSocket-Accept") == [_expected_accept(upgrade.key)]
        extensions = upgrade.header("Sec-WebSocket-Extensions")
        assert len(extensions) == 1 and extensions[0].startswith("permessage-deflate"), \
            upgrade.headers
        first, _, payload = upgrade.first_frame
        if first & 0x40:  # RSV1: this frame is compressed (RFC 7692)
            payload = zlib.decompressobj(-zlib.MAX_WBITS).decompress(payload + b"\x00\x00\xff\xff")
        assert payload.startswith(b"0{") and json.loads(payload[1:])["sid"]
    finally:
        stop_server(server.process)


# --- 4. concurrent senders in many chats ---------------------------------------------------

def test_concurrent_senders_in_10_chats_each_client_gets_its_chat_exactly_once_in_history_order(
        rt_server):
    chats_count, per_chat, per_client = 10, 5, 10
    tenant = new_tenant(rt_server.url)
    chats = [tenant.chat("ann") for _ in range(chats_count)]
    members: dict[str, list[ChatClient]] = {chat: [] for chat in chats}
    try:
        for chat in chats:
            for _ in range(per_chat):
                client = connect(rt_server.url,
                                 {"chat_id": chat, "api_key": tenant.key, "user_id": "ann"})
                assert client.connect_error is None, client.connect_error
                members[chat].append(client)
        everyone = [(chat, c) for chat in chats for c in members[chat]]
        start = threading.Barrier(len(everyone))
        errors: list[str] = []

        def send_all(index: int, client: ChatClient) -> None:
            try:
                string = client.message_string
                start.wait(timeout=WAIT)
                for i in range(per_client):
                    ack = client.send(f"client {index} message {i}", string, timeout=WAIT)
                    assert ack["ok"] is True, ack
                    string = ack["next_message_string"]
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(f"client {index}: {exc!r}")

        threads = [threading.Thread(target=send_all, args=(i, c), daemon=True)
                   for i, (_, c) in enumerate(everyone)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "senders did not finish within 60 s"
        assert not errors, errors[:5]

        # A last message per chat, sent after every ack above: a client's events arrive in
        # order on its one socket, so once it has the sentinel it has everything sent before
        # it, duplicates and strays from other chats included.
        expected_total = per_chat * per_client + 1
        for chat in chats:
            sentinel = members[chat][0]
            ack = sentinel.call("get_message_string")
            assert sentinel.send("sentinel", ack["message_string"])["ok"] is True
        for chat in chats:
            for client in members[chat]:
                client.wait_for("message_received", expected_total, timeout=WAIT)

        for chat in chats:
            history = tenant.history(chat)
            assert len(history) == expected_total
            ids = [int(m["id"]) for m in history]
            assert ids == sorted(ids) and len(set(ids)) == len(ids)
            assert history[-1]["content"] == "sentinel"
            for client in members[chat]:
                received = client.named("message_received")
                assert [m["id"] for m in received] == [m["id"] for m in history], (
                    "each message of the chat once, in history order, nothing else")
                assert received == history
    finally:
        for clients in members.values():
            for client in clients:
                client.disconnect()


# --- 5. a blocked database call in one chat does not stall another ------------------------

@pytest.mark.parametrize("mode", ["eventlet", "gevent"])
def test_database_call_blocked_in_one_chat_does_not_stall_another_chat(
        mode, tmp_path, pg_database_factory):
    database_url = pg_database_factory()
    database_name = database_url.rsplit("/", 1)[1]
    server = start_server(tmp_path, ASYNC_MODE=mode, DATABASE_URL=database_url,
                          RATE_LIMIT_MESSAGES="100000/second", RATE_LIMIT_REST="100000/minute")
    locker = psycopg2.connect(database_url, connect_timeout=5)
    watcher = psycopg2.connect(database_url, connect_timeout=5)
    watcher.autocommit = True
    a = b = None
    try:
        tenant = new_tenant(server.url)
        chat_a, chat_b = tenant.chat("ann"), tenant.chat("ann")
        a = connect(server.url, {"chat_id": chat_a, "api_key": tenant.key, "user_id": "ann"})
        b = connect(server.url, {"chat_id": chat_b, "api_key": tenant.key, "user_id": "ann"})
        a_string, b_string = a.message_string, b.message_string

        def lock_waiters() -> int:
            with watcher.cursor() as cur:
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                            "AND wait_event_type = 'Lock'", (database_name,))
                return cur.fetchone()[0]

        # Hold chat A's row: the server's INSERT into messages for chat A needs a KEY SHARE
        # lock on it for the foreign key check, so it waits until we roll back.
        with locker.cursor() as cur:
            cur.execute("SELECT id FROM chats WHERE id = %s FOR UPDATE", (chat_a,))
            assert cur.fetchone() is not None

        arrivals: list[tuple[str, dict]] = []
        arrived = threading.Condition()

        def on_ack(label: str) -> Callable[[dict], None]:
            def record(ack: dict) -> None:
                with arrived:
                    arrivals.append((label, ack))
                    arrived.notify_all()
            return record

        def wait_arrivals(count: int, what: str) -> None:
            with arrived:
                assert arrived.wait_for(lambda: len(arrivals) >= count, WAIT), (
                    f"waited {WAIT}s for {what}; arrivals {[l for l, _ in arrivals]}\n"
                    f"server log:\n{_log_tail(server)}")

        a.sio.emit("message", {"content": "from A", "message_string": a_string},
                   namespace=NAMESPACE, callback=on_ack("A"))
        # polling PostgreSQL: there is no event to wait on
        wait_until(lambda: lock_waiters() != 0, WAIT,
                   lambda: f"the server's INSERT for chat A to wait on the row lock; acks "
                   f"{arrivals}\nserver log:\n{_log_tail(server)}")

        for i in range(5):
            b.sio.emit("message", {"content": f"from B {i}", "message_string": b_string},
                       namespace=NAMESPACE, callback=on_ack(f"B{i}"))
            wait_arrivals(i + 1, f"B's ack {i} while chat A is blocked")
            label, ack = arrivals[-1]
            assert label == f"B{i}" and ack["ok"] is True, (label, ack)
            b_string = ack["next_message_string"]
        b_received = b.wait_for("message_received", 5, timeout=WAIT)
        assert [m["content"] for m in b_received] == [f"from B {i}" for i in range(5)]

        # A was blocked the whole time: its INSERT still waits, its ack has not arrived.
        assert lock_waiters() >= 1
        with arrived:
            assert [label for label, _ in arrivals] == [f"B{i}" for i in range(5)]

        locker.rollback()
        wait_arrivals(6, "A's ack after the lock was released")
        with arrived:
            assert [label for label, _ in arrivals] == [f"B{i}" for i in range(5)] + ["A"]
            a_ack = arrivals[-1][1]
        assert a_ack["ok"] is True, a_ack
        assert a.wait_for("message_received")[0] == a_ack["message"]
        assert tenant.history(chat_a) == [a_ack["message"]]
        assert [m["content"] for m in tenant.history(chat_b)] == [f"from B {i}"
                                                                  for i in range(5)]
    finally:
        locker.rollback()
        locker.close()
        watcher.close()
        for client in (a, b):
            if client is not None:
                client.disconnect()
        stop_server(server.process)
