"""Reliability end to end: load without loss, and a server killed with SIGKILL mid-traffic.

Against real server processes (the Procfile's ``web:`` line) on PostgreSQL and on SQLite:

1. Load without loss: 100 clients (python-socketio over WebSocket and over long-polling, and
   plain ``/ws/chat`` WebSocket clients) in 20 chats all send at once, waiting only for their
   acks; a fifth of the chats have the ``echo`` agent, so replies stream between messages
   and senders meet ``chat_busy``. Afterwards every chat's REST history and every client's
   received log agree exactly: each acknowledged message stored once, no duplicate ids or
   client_message_ids, nothing lost, nothing out of order, and every reply's tokens indexed
   0..n-1 without gaps and joining to the stored content.
2. Crash: the server's process group (gunicorn master and worker) is killed with SIGKILL while
   clients send continuously and an agent reply streams, then restarted on the same database.
   Every acknowledged message is stored; clients reconnecting with ``last_message_id`` get
   exactly the stored messages after it; un-acked messages resent with their
   ``client_message_id`` end up stored exactly once; the interrupted reply is ended (not left
   "streaming" forever) and its chat takes new messages. A reply a dead process left
   streaming that a restart could not end is ended by its chat's next reply.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import sqlalchemy
import websocket

from workspace_chat_client.client import OrderedSocketIOClient
from tests import agents
from tests.kit.record import Recorder
from tests.kit.rest import Tenant, new_tenant
from tests.kit.servers import LiveServer, start_server, stop_server
from tests.kit.sio import NAMESPACE

pytestmark = pytest.mark.e2e

SERVER_ENV = {
    "RATE_LIMIT_MESSAGES": "100000/second",
    "RATE_LIMIT_REST": "100000/minute",
    "MAX_CONNECTIONS_PER_TENANT": "1000",
    "PYTHON_AGENTS": agents.ALLOWED,
}
SCRIPTED_AGENT = {"kind": "python", "callable": "tests.agents:scripted"}
WAIT = 20   # seconds: the bound of every wait for something that should come much sooner
PAGE = 200  # the history endpoint's largest page
STREAM_EVENTS = ("message_stream_started", "message_stream_token", "message_stream_ended")


class Disconnected(Exception):
    """The connection ended while a request was waiting for its answer."""


# --- clients of every transport, with one interface ----------------------------------------

class Peer(Recorder):
    """A client of one chat that records what it receives, in arrival order, and sends
    messages one at a time, waiting for each answer."""

    label: str
    transport: str

    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def mark_closed(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def snapshot(self) -> list[tuple[str, Any]]:
        with self.cond:
            return list(self.events)

    def count(self, name: str) -> int:
        return len(self.named(name))

    def established(self) -> dict:
        self.wait_until(lambda: any(e == "connection_established" for e, _ in self.events),
                        WAIT, "connection_established")
        return next(d for e, d in self.snapshot() if e == "connection_established")

    def post(self, content: str, client_message_id: str) -> dict:
        """Send one message; its ack (``ok`` true or false), or Disconnected."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class SioPeer(Peer):
    """python-socketio (its ordered client), over WebSocket or long-polling."""

    def __init__(self, url: str, auth: dict, transport: str, label: str) -> None:
        super().__init__()
        self.label, self.transport = label, transport
        self.string: str | None = None
        self.sio = OrderedSocketIOClient(reconnection=False)
        self.sio.on("*", lambda event, *args: self.record(
            event, args[0] if len(args) == 1 else list(args)), namespace=NAMESPACE)
        self.sio.on("disconnect", lambda *args: self.mark_closed(), namespace=NAMESPACE)
        self.sio.connect(url, namespaces=[NAMESPACE], auth=auth, transports=[transport],
                         wait_timeout=10)
        self.string = self.established()["message_string"]

    def _request(self, event: str, data: dict) -> dict:
        box: list[Any] = []

        def answered(*args: Any) -> None:
            with self.cond:
                box.append(args[0] if args else None)
                self.cond.notify_all()

        try:
            self.sio.emit(event, data, namespace=NAMESPACE, callback=answered)
        except Exception as exc:  # noqa: BLE001 - the connection is gone
            raise Disconnected(repr(exc)) from exc
        with self.cond:
            self.cond.wait_for(lambda: box or self.closed, WAIT)
            if not box:
                if self.closed:
                    raise Disconnected(f"{self.label}: {event} unanswered")
                raise AssertionError(f"{self.label}: no answer to {event} within {WAIT}s")
            return box[0]

    def post(self, content: str, client_message_id: str) -> dict:
        if self.string is None:
            self.string = self._request("get_message_string", {})["message_string"]
        string, self.string = self.string, None
        ack = self._request("message", {"content": content, "message_string": string,
                                        "client_message_id": client_message_id})
        if ack.get("ok"):
            self.string = ack["next_message_string"]
        return ack

    def close(self) -> None:
        try:
            self.sio.disconnect()
        except Exception:  # noqa: BLE001 - best effort: the server may be dead
            pass


class PlainPeer(Peer):
    """A plain WebSocket client of ``/ws/chat`` (websocket-client); a reader thread records
    its frames. The adapter keeps its message strings, so a message is ``{content, ...}``."""

    transport = "plain"

    def __init__(self, url: str, params: dict, label: str) -> None:
        super().__init__()
        self.label = label
        self.ws = websocket.create_connection(
            url.replace("http://", "ws://") + "/ws/chat?" + urlencode(params), timeout=WAIT)
        self.reader = threading.Thread(target=self._read, name=f"plain-{label}", daemon=True)
        self.reader.start()
        self.established()

    def _read(self) -> None:
        try:
            while True:
                raw = self.ws.recv()
                if not raw:
                    break
                frame = json.loads(raw)
                self.record(frame["event"], frame["data"])
        except Exception:  # noqa: BLE001 - closed (by either side) or timed out
            pass
        finally:
            self.mark_closed()

    def post(self, content: str, client_message_id: str) -> dict:
        answered = self.count("message")
        try:
            self.ws.send(json.dumps({"content": content, "client_message_id": client_message_id}))
        except Exception as exc:  # noqa: BLE001 - the connection is gone
            raise Disconnected(repr(exc)) from exc
        with self.cond:
            self.cond.wait_for(lambda: self.closed or sum(
                1 for e, _ in self.events if e == "message") > answered, WAIT)
            acks = [d for e, d in self.events if e == "message"]
            if len(acks) > answered:
                return acks[answered]
            if self.closed:
                raise Disconnected(f"{self.label}: message unanswered")
            raise AssertionError(f"{self.label}: no answer within {WAIT}s")

    def close(self) -> None:
        # A close frame, then the reader sees the server's answer: websocket-client's own
        # close() would race the reader thread for that answer and wait out its timeout.
        try:
            self.ws.send_close()
        except Exception:  # noqa: BLE001 - best effort: the server may be dead
            pass
        self.reader.join(timeout=WAIT)
        self.ws.shutdown()


def open_peer(url: str, tenant: Tenant, chat: str, transport: str, label: str,
              **extra: Any) -> Peer:
    """A client of ``chat`` as ann (API key) over ``transport``: websocket, polling, plain."""
    auth = {"chat_id": chat, "api_key": tenant.key, "user_id": "ann", **extra}
    if transport == "plain":
        return PlainPeer(url, auth, label)
    return SioPeer(url, auth, transport, label)


def close_all(peers) -> None:
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda peer: peer.close(), peers))


# --- what a client received, and the history ------------------------------------------------

def full_history(tenant: Tenant, chat: str, **params: Any) -> list[dict]:
    """Every message of the chat, paging the REST history (200 a page)."""
    messages: list[dict] = []
    while True:
        page = tenant.history(chat, offset=len(messages), limit=PAGE, **params)
        messages += page
        if len(page) < PAGE:
            return messages


@dataclass
class Stream:
    started: dict
    tokens: list[dict] = field(default_factory=list)
    ended: dict | None = None


def received_log(label: str, events: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The messages a client learnt of, in order: ("message", message_received data) or
    ("stream", Stream) for a reply, whose tokens and end are attached to it."""
    log: list[tuple[str, Any]] = []
    streams: dict[str, Stream] = {}
    for event, data in events:
        if event == "message_received":
            log.append(("message", data))
        elif event == "message_stream_started":
            assert data["message_id"] not in streams, f"{label}: stream started twice {data}"
            streams[data["message_id"]] = Stream(data)
            log.append(("stream", streams[data["message_id"]]))
        elif event in ("message_stream_token", "message_stream_ended"):
            stream = streams.get(data["message_id"])
            assert stream is not None and stream.ended is None, (
                f"{label}: {event} outside its stream: {data}")
            if event == "message_stream_token":
                stream.tokens.append(data)
            else:
                stream.ended = data
    return log


def log_ids(log: list[tuple[str, Any]]) -> list[str]:
    return [data["id"] if kind == "message" else data.started["message_id"]
            for kind, data in log]


def assert_log_matches_history(label: str, log: list[tuple[str, Any]],
                               history: list[dict]) -> None:
    """The client's log is the history exactly: same messages, same order, same contents;
    each reply's tokens indexed 0..n-1 and joining to the stored content."""
    assert log_ids(log) == [m["id"] for m in history], (
        f"{label}: received ids differ from the history\n received {log_ids(log)}\n"
        f" history  {[m['id'] for m in history]}")
    for (kind, data), stored in zip(log, history):
        if kind == "message":
            assert data == stored, (label, data, stored)
            continue
        assert stored["role"] == "agent" and stored["reply_to"] == data.started["reply_to"], (
            label, data.started, stored)
        indexes = [token["index"] for token in data.tokens]
        assert indexes == list(range(len(indexes))), f"{label}: token indexes {indexes}"
        assert data.ended is not None, f"{label}: reply {stored['id']} never ended"
        assert data.ended["finish_reason"] == "stop", (label, data.ended)
        joined = "".join(token["token"] for token in data.tokens)
        assert joined == data.ended["content"] == stored["content"], (
            label, joined, data.ended["content"], stored["content"])


# --- 1. load without loss --------------------------------------------------------------------

CHATS, PER_CHAT, PER_CLIENT = 20, 5, 10
TRANSPORTS = ("websocket", "polling", "plain", "websocket", "websocket")


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def load_server(request, tmp_path_factory, pg_database_factory):
    """One server per backend: PostgreSQL under eventlet (the Procfile's default), the SQLite
    file under gevent."""
    tmp = tmp_path_factory.mktemp(f"load-{request.param}")
    if request.param == "postgresql":
        env = {"DATABASE_URL": pg_database_factory(), "ASYNC_MODE": "eventlet"}
    else:
        env = {"DATABASE_URL": "sqlite:///" + str(tmp / "load.db"), "ASYNC_MODE": "gevent"}
    server = start_server(tmp, **SERVER_ENV, **env)
    yield server
    stop_server(server.process)


def send_until_acked(peer: Peer, content: str, client_message_id: str,
                     deadline: float) -> dict:
    """Send a message; on ``chat_busy`` wait for the streaming reply to end, then resend it
    (same client_message_id). Returns the successful ack."""
    while True:
        assert time.monotonic() < deadline, f"{peer.label}: {client_message_id} never accepted"
        ended_before = peer.count("message_stream_ended")
        ack = peer.post(content, client_message_id)
        if ack.get("ok"):
            return ack
        assert ack["error"]["code"] == "chat_busy", (peer.label, ack)
        # The chat is free again by the time that reply's message_stream_ended is sent.
        peer.wait_until(lambda: sum(1 for e, _ in peer.events
                                    if e == "message_stream_ended") > ended_before,
                        WAIT, "the end of the reply that kept the chat busy")


def test_many_clients_in_many_chats_sending_at_once_lose_duplicate_and_reorder_nothing(
        load_server):
    server = load_server
    tenant = new_tenant(server.url)
    echo_ws = tenant.workspace("ann", agent={"kind": "echo"})
    chats = [tenant.chat("ann", echo_ws if n % 5 == 0 else None) for n in range(CHATS)]
    echo_chats = set(chats[::5])
    plan = [(chat, TRANSPORTS[(k + n) % len(TRANSPORTS)], f"c{n}p{k}")
            for n, chat in enumerate(chats) for k in range(PER_CHAT)]
    peers: list[Peer] = []
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(max_workers=16) as pool:
            peers = list(pool.map(lambda p: open_peer(server.url, tenant, *p), plan))
        by_chat = {chat: [peer for (c, _, _), peer in zip(plan, peers) if c == chat]
                   for chat in chats}
        connected = time.monotonic()

        acks: dict[str, list[dict]] = {peer.label: [] for peer in peers}
        errors: list[str] = []
        barrier = threading.Barrier(len(peers))
        deadline = time.monotonic() + 60

        def send_all(peer: Peer) -> None:
            try:
                barrier.wait(timeout=WAIT)
                for i in range(PER_CLIENT):
                    content = f"{peer.label} ({peer.transport}) says {i}"
                    ack = send_until_acked(peer, content, f"{peer.label}-{i}", deadline)
                    assert ack["message"]["content"] == content, ack
                    assert ack["message"]["client_message_id"] == f"{peer.label}-{i}", ack
                    acks[peer.label].append(ack["message"])
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(f"{peer.label} ({peer.transport}): {exc!r}")
                barrier.abort()

        threads = [threading.Thread(target=send_all, args=(peer,), daemon=True)
                   for peer in peers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(1.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in threads), "senders did not finish within 60 s"
        assert not errors, errors[:5]
        sent = time.monotonic()

        # A last message per chat, after every ack above: once a client has it (and, with
        # the echo agent, the end of its reply) it has everything sent before it.
        for chat in chats:
            last = by_chat[chat][0]
            sentinel = send_until_acked(last, "sentinel", f"sentinel-{chat}",
                                        time.monotonic() + WAIT)["message"]
            acks[last.label].append(sentinel)
        histories = {chat: full_history(tenant, chat) for chat in chats}
        for chat in chats:
            history = histories[chat]
            for peer in by_chat[chat]:
                peer.wait_until(
                    lambda: len(received_log(peer.label, peer.events)) >= len(history)
                    and peer.count("message_stream_ended") == peer.count(
                        "message_stream_started"), WAIT, f"all {len(history)} messages")

        for chat in chats:
            history = histories[chat]
            ids = [int(m["id"]) for m in history]
            assert ids == sorted(ids) and len(set(ids)) == len(ids), ids
            users = [m for m in history if m["role"] == "user"]
            agents = [m for m in history if m["role"] == "agent"]
            client_ids = [m["client_message_id"] for m in users]
            assert len(set(client_ids)) == len(client_ids), "a client_message_id stored twice"
            acked = [m for peer in by_chat[chat] for m in acks[peer.label]]
            assert len(acked) == PER_CHAT * PER_CLIENT + 1
            assert sorted(users, key=lambda m: int(m["id"])) == users
            assert sorted(acked, key=lambda m: int(m["id"])) == users, (
                "the user messages stored are exactly the acknowledged ones")
            for peer in by_chat[chat]:  # each client's own messages stored in its send order
                own = [m["client_message_id"] for m in users if m["client_message_id"]
                       in {a["client_message_id"] for a in acks[peer.label]}]
                assert own == [a["client_message_id"] for a in acks[peer.label]]
            if chat in echo_chats:
                # Every message got its reply right after it: the chat was busy meanwhile.
                assert [m["role"] for m in history] == ["user", "agent"] * len(users)
                assert all(a["reply_to"] == u["id"] and a["content"] == u["content"]
                           for u, a in zip(users, agents))
            else:
                assert not agents
            for peer in by_chat[chat]:
                events = peer.snapshot()
                names = {e for e, _ in events}
                assert names <= {"user_created", "connection_established", "message_received",
                                 "message", "get_message_string", "error", *STREAM_EVENTS}, (
                    peer.label, names)
                assert {d["code"] for e, d in events if e == "error"} <= {"chat_busy"}
                assert_log_matches_history(f"{peer.label} ({peer.transport})",
                                           received_log(peer.label, events), history)
        busy_refusals = sum(1 for peer in peers for e, d in peer.snapshot() if e == "error")
        assert busy_refusals > 0, "no sender ever met chat_busy: the echo chats did not race"
        print(f"connect {connected - started:.1f}s, send {sent - connected:.1f}s, "
              f"{busy_refusals} chat_busy refusals retried")
    finally:
        close_all(peers)


# --- 2. SIGKILL mid-traffic, then restart on the same database -------------------------------

CRASH_CHATS = 4
CRASH_TRANSPORTS = ("websocket", "polling", "plain")
ACKS_BEFORE_KILL = 15   # every sender has this many acks when the server is killed
LONG_REPLY = "tokens 2000 0.01"  # the scripted agent streams 2,000 tokens over ~20 s
TOKENS_BEFORE_KILL = 5


@dataclass
class SenderRecord:
    """What one client knew when the server died."""

    label: str
    transport: str
    chat: str
    acked: list[dict] = field(default_factory=list)
    pending: tuple[str, str] | None = None  # (content, client_message_id) sent, never acked
    events: list[tuple[str, Any]] = field(default_factory=list)

    def last_received_id(self) -> str | None:
        ids = [int(d["id"]) for e, d in self.events if e == "message_received"]
        return str(max(ids)) if ids else None


@dataclass
class Crash:
    database_url: str
    server: LiveServer  # the restarted one
    tenant: Tenant      # bound to the restarted server
    chats: list[str]
    agent_chat: str
    senders: list[SenderRecord]
    watchers: list[SenderRecord]  # the agent chat's clients
    reply_id: str                 # the reply streaming when the server was killed
    reply_to: str
    tokens_seen: int


def kill_process_group(server: LiveServer) -> None:
    """SIGKILL gunicorn's master and worker at once (start_server gives them a session)."""
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=WAIT)


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def crash(request, tmp_path_factory, pg_database_factory):
    """Clients send continuously in several chats while an agent reply streams in another;
    the server's process group is killed with SIGKILL; a new server starts on the same
    database. Yields what every client knew at the moment of the kill."""
    tmp: Path = tmp_path_factory.mktemp(f"crash-{request.param}")
    database_url = (pg_database_factory() if request.param == "postgresql"
                    else "sqlite:///" + str(tmp / "crash.db"))
    env = {**SERVER_ENV, "DATABASE_URL": database_url}
    server = start_server(tmp, **env)
    peers: list[Peer] = []
    try:
        tenant = new_tenant(server.url)
        agent_ws = tenant.workspace("ann", agent=SCRIPTED_AGENT)
        chats = [tenant.chat("ann") for _ in range(CRASH_CHATS)]
        agent_chat = tenant.chat("ann", agent_ws)
        plan = [(chat, transport, f"k{n}-{transport}") for n, chat in enumerate(chats)
                for transport in CRASH_TRANSPORTS]
        with ThreadPoolExecutor(max_workers=16) as pool:
            senders = list(pool.map(lambda p: open_peer(server.url, tenant, *p), plan))
        watchers = [open_peer(server.url, tenant, agent_chat, "websocket", "agent-websocket"),
                    open_peer(server.url, tenant, agent_chat, "polling", "agent-polling")]
        peers = senders + watchers
        records = {peer.label: SenderRecord(peer.label, peer.transport, chat)
                   for peer, (chat, _, _) in zip(senders, plan)}
        watcher_records = [SenderRecord(p.label, p.transport, agent_chat) for p in watchers]

        long_reply = watchers[0].post(LONG_REPLY, "long-reply")
        assert long_reply["ok"] is True, long_reply
        watcher_records[0].acked.append(long_reply["message"])
        for watcher in watchers:
            watcher.wait_until(lambda: watcher.count("message_stream_token")
                               >= TOKENS_BEFORE_KILL, WAIT, "the reply's first tokens")

        progress = threading.Condition()
        failures: list[str] = []
        deadline = time.monotonic() + 60

        def send_until_killed(peer: Peer) -> None:
            record = records[peer.label]
            i = 0
            try:
                while time.monotonic() < deadline:
                    content = f"{peer.label} message {i}"
                    record.pending = (content, f"{peer.label}-{i}")
                    ack = peer.post(*record.pending)
                    assert ack.get("ok") is True, ack
                    record.acked.append(ack["message"])
                    record.pending = None
                    i += 1
                    with progress:
                        progress.notify_all()
                failures.append(f"{peer.label}: still sending at the deadline")
            except Disconnected:
                pass  # the server died under it: what it knows is recorded
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                failures.append(f"{peer.label}: {exc!r}")
            finally:
                with progress:
                    progress.notify_all()

        threads = [threading.Thread(target=send_until_killed, args=(p,), daemon=True)
                   for p in senders]
        for thread in threads:
            thread.start()
        with progress:
            assert progress.wait_for(lambda: failures or all(
                len(r.acked) >= ACKS_BEFORE_KILL for r in records.values()), WAIT), (
                {label: len(r.acked) for label, r in records.items()})
        assert not failures, failures
        assert all(w.count("message_stream_ended") == 0 for w in watchers), \
            "the long reply must still be streaming when the server is killed"

        kill_process_group(server)
        for peer in peers:  # whatever still waits for an answer gets Disconnected now
            peer.mark_closed()
        for thread in threads:
            thread.join(timeout=WAIT)
        assert not any(t.is_alive() for t in threads)
        assert not failures, failures
        close_all(peers)
        for peer in senders:
            records[peer.label].events = peer.snapshot()
        for peer, record in zip(watchers, watcher_records):
            record.events = peer.snapshot()
        started = next(d for e, d in watcher_records[0].events if e == "message_stream_started")

        server = start_server(tmp, **env)  # a new port, the same database
        yield Crash(database_url, server, Tenant(server.url, tenant.id, tenant.key), chats,
                    agent_chat, list(records.values()), watcher_records,
                    started["message_id"], started["reply_to"],
                    watchers[0].count("message_stream_token"))
    finally:
        close_all(peers)
        if server.process.poll() is None:  # no need for a graceful stop here
            kill_process_group(server)


def client_ids(messages: list[dict]) -> list[str]:
    return [m["client_message_id"] for m in messages if m["role"] == "user"]


def test_every_message_acknowledged_before_sigkill_is_stored_after_restart(crash):
    assert sum(len(r.acked) for r in crash.senders) >= ACKS_BEFORE_KILL * len(crash.senders)
    histories = {chat: full_history(crash.tenant, chat)
                 for chat in crash.chats + [crash.agent_chat]}
    for record in crash.senders + crash.watchers:
        stored = {m["id"]: m for m in histories[record.chat]}
        for message in record.acked:  # acked ⊆ stored, exactly as acknowledged
            assert stored.get(message["id"]) == message, (record.label, message)
        # What a client was told before the crash is the start of the stored history, in
        # order, nothing skipped, nothing twice.
        received = [d for e, d in record.events if e == "message_received"]
        history = histories[record.chat]
        assert received == history[:len(received)], (
            record.label, [m["id"] for m in received], [m["id"] for m in history])


def test_reconnecting_with_last_message_id_after_restart_replays_exactly_what_was_stored_after_it(
        crash):
    for record in crash.senders + crash.watchers:
        last = record.last_received_id()
        assert last is not None, record.label
        expected = full_history(crash.tenant, record.chat, after_id=last)
        peer = open_peer(crash.server.url, crash.tenant, record.chat, record.transport,
                         f"{record.label}-again", last_message_id=last)
        try:
            assert peer.established()["history_truncated"] is False
            # A live message of its own after the replay: anything replayed twice, or
            # missing, shows before it.
            ack = peer.post("back after the crash", f"again-{record.label}")
            assert ack["ok"] is True, (record.label, ack)
            sentinel = ack["message"]
            peer.wait_until(lambda: any(e == "message_received" and d["id"] == sentinel["id"]
                                        for e, d in peer.events), WAIT, "its own message")
            events = peer.snapshot()
            received = [d for e, d in events if e == "message_received"]
            assert received == expected + [sentinel], (
                record.label, last, [m["id"] for m in received], [m["id"] for m in expected])
            before_sentinel = [e for e, d in events[:events.index(("message_received",
                                                                     sentinel))]]
            assert not set(before_sentinel) & set(STREAM_EVENTS), (
                f"{record.label}: a reply of the dead server is still streaming after the "
                f"restart: {before_sentinel}")
            if record.chat == crash.agent_chat:  # the agent answers the sentinel too
                peer.wait_until(lambda: peer.count("message_stream_ended") == 1, WAIT,
                                "the reply to its message")
        finally:
            peer.close()


def test_unacknowledged_messages_resent_after_restart_with_their_client_message_id_are_stored_once(
        crash):
    pending = [r for r in crash.senders if r.pending is not None]
    assert pending, "no message was in flight when the server was killed"
    stored_before = {chat: client_ids(full_history(crash.tenant, chat)) for chat in crash.chats}
    committed_unacked = 0
    for record in crash.senders:
        peer = open_peer(crash.server.url, crash.tenant, record.chat, record.transport,
                         f"{record.label}-resend")
        try:
            if record.pending is not None:
                content, client_message_id = record.pending
                committed_unacked += client_message_id in stored_before[record.chat]
                ack = peer.post(content, client_message_id)
                assert ack["ok"] is True, (record.label, ack)
                assert (ack["message"]["content"], ack["message"]["client_message_id"]) == \
                    record.pending
            # An acked message sent again is the original, not a new one.
            again = peer.post(record.acked[-1]["content"], record.acked[-1]["client_message_id"])
            assert again["ok"] is True and again["message"] == record.acked[-1], again
        finally:
            peer.close()
    for chat in crash.chats:
        stored = [c for c in client_ids(full_history(crash.tenant, chat))
                  if not c.startswith("again-")]
        sent = [m["client_message_id"] for r in crash.senders if r.chat == chat
                for m in r.acked] + [r.pending[1] for r in crash.senders
                                     if r.chat == chat and r.pending is not None]
        assert sorted(stored) == sorted(sent), "each message stored exactly once, none extra"
    print(f"{len(pending)} messages were in flight at the kill; {committed_unacked} of them "
          f"had been stored without their ack arriving")


def test_reply_streaming_at_sigkill_is_ended_after_restart_and_its_chat_takes_new_messages(
        crash):
    assert crash.tokens_seen >= TOKENS_BEFORE_KILL
    engine = sqlalchemy.create_engine(crash.database_url)
    try:
        with engine.connect() as db:
            row = db.execute(sqlalchemy.text(
                "SELECT role, reply_to, finish_reason FROM messages WHERE id = :id"),
                {"id": int(crash.reply_id)}).one()
            assert (row.role, str(row.reply_to)) == ("agent", crash.reply_to)
            # NULL means "still streaming": nothing will ever end it after a SIGKILL.
            assert row.finish_reason == "error", row
    finally:
        engine.dispose()
    history = full_history(crash.tenant, crash.agent_chat)
    reply = next(m for m in history if m["id"] == crash.reply_id)
    assert reply["role"] == "agent" and reply["reply_to"] == crash.reply_to

    peer = open_peer(crash.server.url, crash.tenant, crash.agent_chat, "websocket",
                     "agent-after-restart")
    try:
        ack = peer.post("tokens 3", "after-restart")
        assert ack["ok"] is True, ack  # not chat_busy: nothing holds the chat
        peer.wait_until(lambda: peer.count("message_stream_ended") == 1, WAIT, "the reply")
        ended = [d for e, d in peer.snapshot() if e == "message_stream_ended"][0]
        assert (ended["finish_reason"], ended["content"]) == ("stop", "t0 t1 t2 ")
    finally:
        peer.close()


def test_reply_left_streaming_by_a_dead_process_is_ended_when_its_chat_next_gets_a_reply(crash):
    """With several processes a restart may not end a dead process's reply (its chat's busy
    mark outlives it in Redis); the chat's next reply ends it instead. Simulated here by a
    reply row written as a dead process leaves it: stored, never ended."""
    tenant = crash.tenant
    chat = tenant.chat("ann", tenant.workspace("ann", agent=SCRIPTED_AGENT))
    peer = open_peer(crash.server.url, tenant, chat, "websocket", "next-reply")
    engine = sqlalchemy.create_engine(crash.database_url)
    try:
        first = peer.post("tokens 1", "first")["message"]
        peer.wait_until(lambda: peer.count("message_stream_ended") == 1, WAIT, "a reply")
        with engine.begin() as db:
            dead = db.execute(sqlalchemy.text(
                "INSERT INTO messages (chat_id, role, content, reply_to, created_at) "
                "VALUES (:chat, 'agent', 'half a repl', :reply_to, :now) RETURNING id"),
                {"chat": chat, "reply_to": int(first["id"]),
                 "now": time.strftime("%Y-%m-%d %H:%M:%S")}).scalar_one()
        ack = peer.post("tokens 2", "second")
        assert ack["ok"] is True, ack
        peer.wait_until(lambda: peer.count("message_stream_ended") == 2, WAIT, "the next reply")
        with engine.connect() as db:
            finish = db.execute(sqlalchemy.text(
                "SELECT finish_reason FROM messages WHERE id = :id"), {"id": dead}).scalar_one()
        assert finish == "error"
    finally:
        peer.close()
        engine.dispose()
    # Now ended, it is replayed like any stored message.
    again = open_peer(crash.server.url, tenant, chat, "websocket", "next-reply-again",
                      last_message_id=first["id"])
    try:
        history = full_history(tenant, chat, after_id=first["id"])
        assert str(dead) in [m["id"] for m in history]
        again.wait_until(lambda: again.count("message_received") >= len(history), WAIT,
                         "the replay")
        assert [d for e, d in again.snapshot() if e == "message_received"] == history
    finally:
        again.close()
