"""Scale-out, end to end: several server processes on one PostgreSQL and one Redis are one service.

CONTRACT.md section 6: with ``REDIS_URL`` set, Redis carries the Socket.IO traffic between
processes, the REST rate-limit counters and the shared state (spent message strings, busy
chats, connection counts). Every test here talks to at least two real server processes (the
Procfile's ``web:`` line, run by ``tests.conftest.start_server``) and proves, from the outside,
that what one process knows the other knows too:

1. a message sent on one process reaches the chat's clients on the other, exactly once;
2. two senders on two processes: every client sees the chat in the order of its history;
3. a message string spent on one process is ``message_string_reused`` on the other;
4. ``chat_busy`` and ``stop_generation`` work across processes;
5. the REST rate limit is one counter for the tenant across processes;
6. the connection limit is one count for the tenant across processes;
7. deleting a chat through one process disconnects its clients on every process;
8. a process killed with SIGKILL leaves none of its connections counted (leases run out);
9. SIGTERM mid-stream: the reply ends ``cancelled``, is stored, clients are disconnected,
   the process exits, and a client reconnecting elsewhere misses nothing.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests import agents
from tests.kit.rest import Tenant, new_tenant
from tests.kit.servers import LiveServer, start_server, stop_server, two_servers
from tests.kit.sio import ChatClient, refusal_code
from tests.kit.wait import wait_until

pytestmark = pytest.mark.e2e

#: Its own Redis database, flushed when the module's servers start. Pub/sub channels ignore
#: database numbers; the server names its channel after the database (workspace-chat-11).
REDIS_URL = "redis://127.0.0.1:6379/11"

REST_LIMIT = 30
CONNECTION_LIMIT = 4
LEASE_SECONDS = 5  # short, so the SIGKILL test is quick; renewed every third of it

SCALE_ENV = {
    "RATE_LIMIT_REST": f"{REST_LIMIT}/minute",
    "MAX_CONNECTIONS_PER_TENANT": str(CONNECTION_LIMIT),
    "CONNECTION_LEASE_SECONDS": str(LEASE_SECONDS),
    "AGENT_TIMEOUT": "10",
    "PYTHON_AGENTS": agents.ALLOWED,
    "RATE_LIMIT_MESSAGES": "1000/second",
    "GRACEFUL_TIMEOUT": "5",
}

SCRIPTED_AGENT = {"kind": "python", "callable": "tests.agents:scripted"}

WAIT = 15  # seconds: the bound of every wait for something that should come much sooner


@dataclass
class Cluster:
    """Two server processes sharing one database and one Redis, and how to start more."""

    a: LiveServer
    b: LiveServer
    env: dict[str, str]
    tmp: Path

    def start_another(self) -> LiveServer:
        return start_server(self.tmp, **self.env)


@pytest.fixture(scope="module", params=["eventlet", "gevent"])
def cluster(request, tmp_path_factory, pg_database_factory):
    env = {**SCALE_ENV, "ASYNC_MODE": request.param, "DATABASE_URL": pg_database_factory(),
           "REDIS_URL": REDIS_URL}
    tmp = tmp_path_factory.mktemp(f"scale-{request.param}")
    with two_servers(tmp, **env) as (a, b):
        yield Cluster(a, b, env, tmp)


def received_ids(client: ChatClient) -> list[str]:
    return [m["id"] for m in client.named("message_received")]


def stream_tokens(client: ChatClient, message_id: str) -> list[dict]:
    return [t for t in client.named("message_stream_token") if t["message_id"] == message_id]


def assert_whole_stream(client: ChatClient, ended: dict) -> None:
    """The client got the stream's tokens, index 0.. without gaps, joining to its content."""
    tokens = stream_tokens(client, ended["message_id"])
    assert [t["index"] for t in tokens] == list(range(len(tokens))), tokens
    assert "".join(t["token"] for t in tokens) == ended["content"], (tokens, ended)


def exchange_across(first: ChatClient, second: ChatClient, first_text: str,
                    second_text: str) -> list[str]:
    """``first`` sends, then ``second``, then ``first`` again (through the chat's one channel:
    anything doubled would come before that last one); both clients get all three once, in
    that order. Returns the three ids."""
    from_first = first.send(first_text, first.message_string)
    assert from_first["ok"] is True, from_first
    from_second = second.send(second_text, second.message_string)
    assert from_second["ok"] is True, from_second
    last = first.send("last", from_first["next_message_string"])
    assert last["ok"] is True, last
    expected = [from_first["message"]["id"], from_second["message"]["id"], last["message"]["id"]]
    for client in (first, second):
        client.wait_for("message_received", 3, timeout=WAIT)
        assert received_ids(client) == expected, client.names()
    return expected


def shared_chat(tenant: Tenant, members: tuple[str, ...] = ("bob",), **workspace) -> str:
    """A chat of a workspace owned by ann with ``members``."""
    workspace_id = tenant.workspace("ann", members=members, **workspace)
    return tenant.chat("ann", workspace_id=workspace_id)


# --- 1. delivery across processes ---------------------------------------------------------

def test_a_message_sent_on_one_process_reaches_the_chat_clients_on_the_other_exactly_once(
        cluster, clients):
    tenant = new_tenant(cluster.a.url)
    chat = shared_chat(tenant)
    ann_on_a = clients.open(cluster.a.url, tenant.key_auth(chat, "ann"))
    bob_on_b = clients.open(cluster.b.url, tenant.key_auth(chat, "bob"))

    expected = exchange_across(ann_on_a, bob_on_b, "hello from A", "hello from B")
    for client in (ann_on_a, bob_on_b):
        got = {m["id"]: m for m in client.named("message_received")}
        assert got[expected[0]]["content"] == "hello from A"
        assert got[expected[0]]["user_id"] == "ann"
        assert got[expected[1]]["content"] == "hello from B"
        assert got[expected[1]]["user_id"] == "bob"


# --- 2. one order for every client ----------------------------------------------------------

def test_two_senders_on_two_processes_every_client_gets_all_messages_once_in_history_order(
        cluster, clients):
    tenant = new_tenant(cluster.a.url)
    chat = shared_chat(tenant)
    sender_a = clients.open(cluster.a.url, tenant.key_auth(chat, "ann"))
    sender_b = clients.open(cluster.b.url, tenant.key_auth(chat, "bob"))
    reader_a = clients.open(cluster.a.url, tenant.key_auth(chat, "bob"))
    reader_b = clients.open(cluster.b.url, tenant.key_auth(chat, "ann"))
    per_sender = 30
    barrier = threading.Barrier(2)
    failures: list[Any] = []
    last_strings: dict[str, str] = {}

    def send_all(client: ChatClient, name: str) -> None:
        try:
            string = client.message_string
            barrier.wait(timeout=WAIT)
            for i in range(per_sender):
                ack = client.send(f"{name} {i}", string, client_message_id=f"{name}-{i}")
                if not ack.get("ok"):
                    failures.append((name, i, ack))
                    return
                string = ack["next_message_string"]
            last_strings[name] = string
        except Exception as exc:  # reported by the main thread
            failures.append((name, repr(exc)))

    threads = [threading.Thread(target=send_all, args=(sender_a, "A")),
               threading.Thread(target=send_all, args=(sender_b, "B"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures, failures
    assert not any(thread.is_alive() for thread in threads)

    total = 2 * per_sender
    # A closing message through the same channel: anything doubled would have come before it.
    end = sender_a.send("end", last_strings["A"])
    assert end["ok"] is True, end

    history = tenant.history(chat)
    history_ids = [m["id"] for m in history]
    assert len(history_ids) == total + 1, history
    assert [int(i) for i in history_ids] == sorted(int(i) for i in history_ids)
    assert history_ids[-1] == end["message"]["id"]
    assert sorted(m["content"] for m in history[:-1]) == sorted(
        [f"A {i}" for i in range(per_sender)] + [f"B {i}" for i in range(per_sender)])

    for client in (reader_a, reader_b, sender_a, sender_b):
        client.wait_for("message_received", total + 1, timeout=WAIT)
        assert received_ids(client) == history_ids, (client.sio.get_sid("/chat"),
                                                     received_ids(client), history_ids)
    # each sender's own messages in the order it sent them (acks were awaited)
    for name in ("A", "B"):
        mine = [m["content"] for m in history if m["content"].startswith(f"{name} ")]
        assert mine == [f"{name} {i}" for i in range(per_sender)]


# --- 3. message strings spent through Redis -----------------------------------------------

def test_a_message_string_spent_on_one_process_is_refused_as_reused_on_the_other(
        cluster, clients):
    tenant = new_tenant(cluster.a.url)
    chat = tenant.chat("ann")
    on_a = clients.open(cluster.a.url, tenant.key_auth(chat, "ann"))
    on_b = clients.open(cluster.b.url, tenant.key_auth(chat, "ann"))
    string = on_a.message_string

    first = on_a.send("first use", string)
    assert first["ok"] is True, first
    # The same (genuine, unexpired) string from the same user in the same chat, on the other
    # process: "unused" is checked before "issued to this connection", so only a spend that
    # B can see (through Redis) answers message_string_reused.
    again = on_b.send("second use", string)
    assert again["ok"] is False, again
    assert again["error"]["code"] == "message_string_reused", again
    error = on_b.wait_for("error")[0]
    assert error["code"] == "message_string_reused", error
    assert [m["content"] for m in tenant.history(chat)] == ["first use"]


# --- 4. busy chats and stop_generation across processes -----------------------------------

def test_chat_busy_and_stop_generation_work_across_processes(cluster, clients):
    tenant = new_tenant(cluster.a.url)
    chat = shared_chat(tenant, agent=SCRIPTED_AGENT)
    on_a = clients.open(cluster.a.url, tenant.key_auth(chat, "ann"))
    on_b = clients.open(cluster.b.url, tenant.key_auth(chat, "bob"))

    ack = on_a.send("tokens 40 0.05", on_a.message_string)
    assert ack["ok"] is True, ack
    started = on_b.wait_for("message_stream_started")[0]
    assert started["reply_to"] == ack["message"]["id"]
    on_b.wait_for("message_stream_token", 2)

    busy = on_b.send("may I?", on_b.message_string)
    assert busy["ok"] is False, busy
    assert busy["error"]["code"] == "chat_busy", busy

    stop = on_b.call("stop_generation")
    assert stop == {"ok": True, "stopped": True}, stop
    ended = []
    for client in (on_a, on_b):
        end = client.wait_for("message_stream_ended", timeout=WAIT)[0]
        assert end["message_id"] == started["message_id"]
        assert end["finish_reason"] == "cancelled", end
        assert_whole_stream(client, end)
        ended.append(end)
    assert ended[0] == ended[1]
    assert len(stream_tokens(on_b, started["message_id"])) < 40  # it did stop early

    string = on_b.call("get_message_string")["message_string"]
    after = on_b.send("now it is free", string)
    assert after["ok"] is True, after
    # the agent echoes it; let that reply end so the chat is left idle
    on_b.wait_for("message_stream_ended", 2, timeout=WAIT)
    agent = [m for m in tenant.history(chat) if m["role"] == "agent"]
    assert agent[0]["id"] == started["message_id"]
    assert agent[0]["content"] == ended[0]["content"]


# --- 5. the REST rate limit -----------------------------------------------------------------

def test_the_rest_rate_limit_is_one_counter_for_the_tenant_across_processes(cluster):
    tenant = new_tenant(cluster.a.url)
    remaining = []
    for n in range(REST_LIMIT):
        server = cluster.a if n % 2 == 0 else cluster.b
        r = requests.get(f"{server.url}/api/v1/chats/user/ann", headers=tenant.headers,
                         timeout=10)
        assert r.status_code == 200, (n, server.url, r.status_code, r.text)
        assert r.headers["X-RateLimit-Limit"] == str(REST_LIMIT), r.headers
        remaining.append(int(r.headers["X-RateLimit-Remaining"]))
    # each request, whichever process answered, counted against the same counter
    assert remaining == list(range(REST_LIMIT - 1, -1, -1)), remaining

    for server in (cluster.b, cluster.a):  # the 31st and 32nd, on either process
        r = requests.get(f"{server.url}/api/v1/chats/user/ann", headers=tenant.headers,
                         timeout=10)
        assert r.status_code == 429, (server.url, r.status_code, r.text)
        assert r.json()["error"]["code"] == "rate_limited", r.text
        assert r.headers["X-RateLimit-Remaining"] == "0", r.headers


# --- 6. the connection limit ------------------------------------------------------------------

def test_the_connection_limit_counts_the_tenant_connections_of_every_process(cluster, clients):
    tenant = new_tenant(cluster.a.url)
    chat = tenant.chat("ann")
    auth = tenant.key_auth(chat, "ann")
    on_a = [clients.open(cluster.a.url, auth) for _ in range(2)]
    on_b = [clients.open(cluster.b.url, auth) for _ in range(2)]
    assert len(on_a) + len(on_b) == CONNECTION_LIMIT

    for server in (cluster.a, cluster.b):
        fifth = clients.try_connect(server.url, auth)
        assert refusal_code(fifth) == "too_many_connections", (server.url, fifth.connect_error,
                                                              fifth.names())
        assert not fifth.sio.connected

    # Live connections keep counting past their lease (each process renews its own), so the
    # limit still holds well after CONNECTION_LEASE_SECONDS.
    deadline = time.monotonic() + LEASE_SECONDS * 1.5
    servers = (cluster.a, cluster.b)
    tries = 0
    while time.monotonic() < deadline:
        fifth = clients.try_connect(servers[tries % 2].url, auth)
        tries += 1
        assert refusal_code(fifth) == "too_many_connections", (tries, fifth.connect_error)
        time.sleep(0.5)  # polling over the lease period: nothing else to wait on
    assert all(client.sio.connected for client in on_a + on_b)

    # a connection that ends on A frees its place for a connection on B
    on_a[0].disconnect()
    attempt: list[ChatClient] = []

    def fifth_fits_on_b() -> bool:
        client = clients.try_connect(cluster.b.url, auth)
        attempt.append(client)
        return client.connect_error is None

    wait_until(fifth_fits_on_b, 5, "a freed place to be usable on B")
    attempt[-1].wait_for("connection_established")


# --- 7. deleting a chat -------------------------------------------------------------------------

def test_deleting_a_chat_through_one_process_disconnects_its_clients_on_every_process(
        cluster, clients):
    tenant = new_tenant(cluster.a.url)
    chat = shared_chat(tenant)
    other_chat = tenant.chat("ann")
    in_chat = [clients.open(cluster.b.url, tenant.key_auth(chat, "bob")),
               clients.open(cluster.b.url, tenant.key_auth(chat, "ann")),
               clients.open(cluster.a.url, tenant.key_auth(chat, "ann"))]
    bystander = clients.open(cluster.b.url, tenant.key_auth(other_chat, "ann"))

    r = requests.delete(f"{cluster.a.url}/api/v1/chats/{chat}", headers=tenant.headers,
                        timeout=10)
    assert r.status_code == 204, r.text

    for client in in_chat:
        assert client.wait_for("chat_deleted", timeout=WAIT)[0] == {"chat_id": chat}
        client.wait_disconnected(WAIT)
    assert bystander.sio.connected
    assert "chat_deleted" not in bystander.names()
    assert requests.get(f"{cluster.b.url}/api/v1/chats/{chat}", headers=tenant.headers,
                        timeout=10).status_code == 404


# --- 8. a process that dies -----------------------------------------------------------------------

def test_a_process_killed_with_sigkill_leaves_no_connection_counted(cluster, clients):
    c = cluster.start_another()
    try:
        tenant = new_tenant(cluster.a.url)
        chat = tenant.chat("ann")
        auth = tenant.key_auth(chat, "ann")
        for _ in range(CONNECTION_LIMIT):
            clients.open(c.url, auth)
        # C's connections count for the other processes too
        refused = clients.try_connect(cluster.a.url, auth)
        assert refusal_code(refused) == "too_many_connections", refused.connect_error

        os.killpg(c.process.pid, signal.SIGKILL)
        c.process.wait(timeout=10)
        killed_at = time.monotonic()

        # Nobody released C's connections; their leases run out (CONNECTION_LEASE_SECONDS).
        def all_fit() -> list[ChatClient] | None:
            batch = [clients.try_connect(cluster.a.url, auth) for _ in range(CONNECTION_LIMIT)]
            refused = [client for client in batch if client.connect_error is not None]
            if not refused:
                return batch
            assert all(refusal_code(client) == "too_many_connections" for client in refused), \
                [client.connect_error for client in refused]
            for client in batch:
                client.disconnect()
            return None

        # the retry loop: leases run out on their own time
        batch = wait_until(all_fit, 15, "the killed process's connections to stop counting",
                           interval=0.5)
        recovered_after = time.monotonic() - killed_at
        for client in batch:
            client.wait_for("connection_established")
        assert recovered_after < LEASE_SECONDS + 10, recovered_after
    finally:
        if c.process.poll() is None:
            os.killpg(c.process.pid, signal.SIGKILL)
            c.process.wait(timeout=10)


# --- 9. graceful shutdown -------------------------------------------------------------------

def test_sigterm_mid_stream_ends_the_reply_cancelled_stored_and_nothing_is_missed_elsewhere(
        cluster, clients):
    d = cluster.start_another()
    try:
        tenant = new_tenant(cluster.a.url)
        chat = tenant.chat("ann", workspace_id=tenant.workspace("ann", agent=SCRIPTED_AGENT))
        on_d = clients.open(d.url, tenant.key_auth(chat, "ann"))
        ack = on_d.send("tokens 200 0.05", on_d.message_string)
        assert ack["ok"] is True, ack
        user_message_id = ack["message"]["id"]
        started = on_d.wait_for("message_stream_started")[0]
        agent_message_id = started["message_id"]
        on_d.wait_for("message_stream_token", 5)

        os.kill(d.process.pid, signal.SIGTERM)  # bash exec'd gunicorn: this is its master
        terminated_at = time.monotonic()

        ended = on_d.wait_for("message_stream_ended", timeout=WAIT)[0]
        assert ended["message_id"] == agent_message_id
        assert ended["finish_reason"] == "cancelled", ended
        assert_whole_stream(on_d, ended)
        assert 5 <= len(stream_tokens(on_d, agent_message_id)) < 200
        on_d.wait_disconnected(WAIT)
        d.process.wait(timeout=max(0.1, 10 - (time.monotonic() - terminated_at)))

        history = tenant.history(chat)  # through A
        assert [m["id"] for m in history] == [user_message_id, agent_message_id], history
        assert history[1]["role"] == "agent"
        assert history[1]["reply_to"] == user_message_id
        assert history[1]["content"] == ended["content"]

        # The client reconnects elsewhere with the newest message it has: nothing is missing,
        # nothing is replayed, and no reply is said to be streaming.
        newest = clients.open(cluster.a.url, tenant.key_auth(chat, "ann",
                                                      last_message_id=agent_message_id))
        newest.call("get_message_string")  # acked after the connect handler's replay
        assert newest.named("connection_established")[0]["history_truncated"] is False
        assert newest.named("message_received") == []
        assert newest.named("message_stream_started") == []
        known = received_ids(on_d) + [agent_message_id]
        assert known == [m["id"] for m in history]

        # A client that had only the user's message gets the stored reply, whole.
        behind = clients.open(cluster.a.url, tenant.key_auth(chat, "ann",
                                                      last_message_id=user_message_id))
        behind.call("get_message_string")
        replayed = behind.named("message_received")
        assert [m["id"] for m in replayed] == [agent_message_id], behind.names()
        assert replayed[0]["content"] == ended["content"]
        assert behind.named("message_stream_started") == []
    finally:
        stop_server(d.process)
