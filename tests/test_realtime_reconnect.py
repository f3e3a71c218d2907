"""Reconnecting with ``last_message_id`` (CONTRACT.md section 3, "Reconnecting"), end to end.

A client that reconnects with the id of the newest message it has gets, right after
``connection_established``, every message stored after it, oldest first (at most 500, then
``history_truncated: true``), then live traffic; nothing is lost or duplicated, even while
other clients keep sending.
"""
from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tests.kit.rest import Tenant, new_tenant
from tests.kit.servers import REDIS_TEST_URL, service_missing, start_server, stop_server
from tests.kit.sio import ChatClient, connect, refusal_code

pytestmark = pytest.mark.e2e

# The senders below post hundreds of messages as fast as the acks come back.
SERVER_ENV = {"RATE_LIMIT_MESSAGES": "100000/second"}

MAX_REPLAY = 500
PAGE = 200  # the history endpoint's largest page


@pytest.fixture(scope="module", params=["eventlet", "gevent"])
def scaled_server(request, tmp_path_factory, pg_database_factory):
    """The real server as it is scaled out: PostgreSQL (whose reads yield to other green
    threads, unlike SQLite's) and REDIS_URL (broadcasts travel through Redis pub/sub)."""
    import redis

    try:
        redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        service_missing("Redis", exc)
    env = {"ASYNC_MODE": request.param, "DATABASE_URL": pg_database_factory(),
           "REDIS_URL": REDIS_TEST_URL, **SERVER_ENV}
    server = start_server(tmp_path_factory.mktemp(f"scaled-{request.param}"), **env)
    yield server
    stop_server(server.process)


# --- helpers -------------------------------------------------------------------------------

class Sender:
    """A connected client that sends messages one after another, chaining message strings."""

    def __init__(self, client: ChatClient):
        self.client = client
        self.string = client.message_string

    def send(self, content: str) -> dict:
        ack = self.client.send(content, self.string, timeout=15)
        assert ack["ok"] is True, ack
        self.string = ack["next_message_string"]
        return ack["message"]


def api_auth(tenant: Tenant, chat: str, user: str = "ann", **extra: Any) -> dict:
    return {"chat_id": chat, "api_key": tenant.key, "user_id": user, **extra}


def string_auth(tenant: Tenant, chat: str, user: str = "ann", **extra: Any) -> dict:
    return {"chat_id": chat, "connection_string": tenant.connection_string(chat, user), **extra}


def full_history(tenant: Tenant, chat: str, **params: Any) -> list[dict]:
    """Every message of the chat (within ``params``' bounds), paging the REST history."""
    messages: list[dict] = []
    while True:
        page = tenant.history(chat, offset=len(messages), limit=PAGE, **params)
        messages += page
        if len(page) < PAGE:
            return messages


def ids(messages: list[dict]) -> list[int]:
    return [int(m["id"]) for m in messages]


def received_ids(events: list[tuple[str, Any]]) -> list[int]:
    return [int(data["id"]) for event, data in events if event == "message_received"]


# --- replay --------------------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_reconnect_replays_missed_messages_oldest_first_then_live(rt_server, transport):
    tenant = new_tenant(rt_server.url)
    ws = tenant.workspace("ann", members=("bob",))
    chat = tenant.chat("ann", ws)
    ann = connect(rt_server.url, api_auth(tenant, chat))
    sender = Sender(ann)
    reader = connect(rt_server.url, string_auth(tenant, chat, "bob"), transport)
    again = None
    try:
        reader.wait_for("connection_established")
        seen = sender.send("before the drop")
        assert reader.wait_for("message_received") == [seen]
        reader.disconnect()

        missed = [sender.send(f"missed {i}") for i in range(5)]
        again = connect(rt_server.url, string_auth(tenant, chat, "bob",
                                                   last_message_id=seen["id"]), transport)
        assert again.connect_error is None, again.connect_error
        established = again.wait_for("connection_established")[0]
        assert established["history_truncated"] is False
        assert established["chat_id"] == chat and established["user_id"] == "bob"
        assert again.wait_for("message_received", len(missed)) == missed

        live = [sender.send("live 1"), sender.send("live 2")]
        got = again.wait_for("message_received", len(missed) + 2)
        # The second live message is the sentinel: a duplicate would have to arrive before it.
        assert got == missed + live, ids(got)
        assert again.names() == ["connection_established"] + ["message_received"] * 7
        assert full_history(tenant, chat) == [seen] + missed + live
    finally:
        for client in (ann, reader, again):
            if client is not None:
                client.disconnect()


def test_last_message_id_is_accepted_as_a_number_and_as_a_query_parameter(rt_server):
    tenant = new_tenant(rt_server.url)
    chat = tenant.chat("ann")
    ann = connect(rt_server.url, api_auth(tenant, chat))
    sender = Sender(ann)
    clients = [ann]
    try:
        first = sender.send("one")
        rest = [sender.send("two"), sender.send("three")]
        as_number = connect(rt_server.url, api_auth(tenant, chat,
                                                    last_message_id=int(first["id"])))
        clients.append(as_number)
        assert as_number.wait_for("connection_established")[0]["history_truncated"] is False
        assert as_number.wait_for("message_received", 2) == rest

        in_query = connect(rt_server.url, string_auth(tenant, chat), "polling",
                           query=f"last_message_id={first['id']}")
        clients.append(in_query)
        assert in_query.connect_error is None, in_query.connect_error
        assert in_query.wait_for("connection_established")[0]["history_truncated"] is False
        assert in_query.wait_for("message_received", 2) == rest
        assert in_query.names() == ["connection_established", "message_received",
                                    "message_received"]
    finally:
        for client in clients:
            client.disconnect()


@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_last_message_id_of_the_newest_message_replays_nothing(rt_server, transport):
    tenant = new_tenant(rt_server.url)
    chat = tenant.chat("ann")
    ann = connect(rt_server.url, api_auth(tenant, chat))
    sender = Sender(ann)
    reader = None
    try:
        sent = [sender.send(f"m{i}") for i in range(3)]
        reader = connect(rt_server.url, string_auth(tenant, chat,
                                                    last_message_id=sent[-1]["id"]), transport)
        established = reader.wait_for("connection_established")[0]
        assert established["history_truncated"] is False
        live = sender.send("live")
        assert reader.wait_for("message_received") == [live]
        assert reader.names() == ["connection_established", "message_received"]
    finally:
        for client in (ann, reader):
            if client is not None:
                client.disconnect()


@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_more_than_500_missed_replays_the_newest_500_and_says_history_truncated(
        rt_server, transport):
    tenant = new_tenant(rt_server.url)
    chat = tenant.chat("ann")
    ann = connect(rt_server.url, api_auth(tenant, chat))
    sender = Sender(ann)
    reader = None
    try:
        anchor = sender.send("the last one the reader has")
        sent = [sender.send(f"missed {i}") for i in range(MAX_REPLAY + 10)]

        reader = connect(rt_server.url, string_auth(tenant, chat,
                                                    last_message_id=anchor["id"]), transport)
        established = reader.wait_for("connection_established")[0]
        assert established["history_truncated"] is True
        replayed = reader.wait_for("message_received", MAX_REPLAY, timeout=60)
        assert len(replayed) == MAX_REPLAY
        assert ids(replayed) == sorted(ids(replayed))
        assert replayed == sent[-MAX_REPLAY:]  # the newest 500, oldest first

        # Nothing more is replayed: a live sentinel is the very next event.
        live = sender.send("live")
        assert reader.wait_for("message_received", MAX_REPLAY + 1)[-1] == live
        assert reader.names() == (["connection_established"]
                                  + ["message_received"] * (MAX_REPLAY + 1))

        # The client pages the REST history for the gap the replay left.
        gap = full_history(tenant, chat, after_id=anchor["id"], before_id=replayed[0]["id"])
        assert gap == sent[:10]
        assert gap + replayed == full_history(tenant, chat, after_id=anchor["id"],
                                              before_id=live["id"])
        assert full_history(tenant, chat) == [anchor] + sent + [live]
    finally:
        for client in (ann, reader):
            if client is not None:
                client.disconnect()


# --- replay racing live traffic ------------------------------------------------------------

@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_reconnecting_while_messages_keep_coming_loses_and_duplicates_nothing(
        rt_server, transport):
    reconnect_while_messages_keep_coming(rt_server, transport)


@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_reconnecting_while_messages_keep_coming_on_postgresql_and_redis(
        scaled_server, transport):
    reconnect_while_messages_keep_coming(scaled_server, transport)


def reconnect_while_messages_keep_coming(server, transport: str, total: int = 150,
                                         min_cycles: int = 15) -> None:
    """A sender posts ``total`` messages (each after the previous ack) while a reader keeps
    dropping and reconnecting with the newest id it has; over all its connections the
    reader must get every message exactly once, in id order, equal to the REST history."""
    rt_server = server
    tenant = new_tenant(rt_server.url)
    ws = tenant.workspace("ann", members=("bob",))
    chat = tenant.chat("ann", ws)
    ann = connect(rt_server.url, api_auth(tenant, chat))
    sender = Sender(ann)
    acked: list[dict] = []
    failure: list[BaseException] = []
    done = threading.Event()

    def send_all() -> None:
        try:
            for i in range(total):
                acked.append(sender.send(f"concurrent {i}"))
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)
        finally:
            done.set()
            with current[0].cond:  # wake the reader if it is waiting for more messages
                current[0].cond.notify_all()

    # Each connection: (the last_message_id it presented, the events it received).
    connections: list[tuple[str | None, list[tuple[str, Any]]]] = []
    reader = connect(rt_server.url, string_auth(tenant, chat, "bob"), transport)
    current = [reader]
    last_id: str | None = None
    thread = threading.Thread(target=send_all, daemon=True)
    try:
        reader.wait_for("connection_established")
        thread.start()
        # Stay on the first connection until something arrived, so there is an id to present.
        reader.wait_for("message_received", timeout=15)
        deadline = time.monotonic() + 120
        cycle = racing = 0
        while cycle < min_cycles or not done.is_set():
            assert time.monotonic() < deadline, "the reconnect loop took over 120s"
            # Vary how long each connection lives: none (drop right after the replay was
            # sent, while the gate may still hold live traffic) up to a few live messages.
            extra = cycle % 4
            if extra and not done.is_set():
                base = len(received_ids(reader.events))
                try:
                    reader.wait_until(lambda: len(received_ids(reader.events)) >= base + extra
                                      or done.is_set(), 15, f"{extra} more messages")
                except AssertionError:
                    if not done.is_set():
                        raise
            racing += not done.is_set()
            reader.disconnect()
            connections.append((last_id, list(reader.events)))
            got = received_ids(reader.events)
            if got:
                last_id = str(max(got))
            reader = connect(rt_server.url, string_auth(tenant, chat, "bob",
                                                        last_message_id=last_id), transport)
            with current[0].cond:
                current[0] = reader
            assert reader.connect_error is None, reader.connect_error
            reader.wait_for("connection_established")
            cycle += 1

        thread.join(timeout=60)
        assert not thread.is_alive(), "the sender did not finish"
        assert not failure, failure
        assert len(acked) == total
        # A last message, sent once the reader is connected for good, must reach it; anything
        # duplicated on this connection would have arrived before it.
        sentinel = sender.send("sentinel")
        reader.wait_until(lambda: int(sentinel["id"]) in received_ids(reader.events), 30,
                          f"message {sentinel['id']} on the last connection")
        reader.disconnect()
        connections.append((last_id, list(reader.events)))
    finally:
        reader.disconnect()
        ann.disconnect()
        done.wait(timeout=60)

    sequence = [(presented, received_ids(events)) for presented, events in connections]
    report = "\n".join(f"  connection {n}: last_message_id={presented} -> received {got}"
                       for n, (presented, got) in enumerate(sequence))
    for n, (presented, events) in enumerate(connections):
        names = [event for event, _ in events]
        expected_head = ["user_created", "connection_established"] if n == 0 else \
            ["connection_established"]
        assert names[:len(expected_head)] == expected_head, (n, names[:5])
        assert set(names[len(expected_head):]) <= {"message_received"}, (n, names)
        if presented is not None:
            established = events[len(expected_head) - 1][1]
            assert established["history_truncated"] is False, (n, established)
    everything = [data for _, events in connections
                  for event, data in events if event == "message_received"]
    got_ids = ids(everything)
    duplicates = sorted({i for i in got_ids if got_ids.count(i) > 1})
    out_of_order = [(a, b) for a, b in zip(got_ids, got_ids[1:]) if b <= a]
    history = full_history(tenant, chat)
    missing = sorted(set(ids(history)) - set(got_ids))
    assert not duplicates and not out_of_order and not missing, (
        f"duplicates={duplicates} out_of_order={out_of_order} missing={missing}\n{report}")
    assert everything == history
    assert history == acked + [sentinel]
    assert len(connections) >= min_cycles + 1
    # The point of the test: reconnects really did race the sender.
    assert racing >= 5, f"only {racing} reconnects happened while messages were being sent"
    print(f"{racing} of {cycle} reconnects raced the sender")


# --- invalid last_message_id ---------------------------------------------------------------

@pytest.mark.parametrize("value", ["abc", -1, "-1", {"id": 1}, "1.5", True, [1]],
                         ids=["text", "negative", "negative-text", "object", "decimal", "bool",
                              "list"])
def test_invalid_last_message_id_is_refused_with_validation_error(rt_server, value):
    tenant = new_tenant(rt_server.url)
    chat = tenant.chat("ann")
    client = connect(rt_server.url, string_auth(tenant, chat, last_message_id=value))
    try:
        assert refusal_code(client) == "validation_error", client.connect_error
        assert client.connect_error["message"]
        assert client.connect_error["data"]["message"] == client.connect_error["message"]
        assert not client.sio.connected
    finally:
        client.disconnect()


def test_invalid_last_message_id_in_the_query_is_refused_with_validation_error(rt_server):
    tenant = new_tenant(rt_server.url)
    chat = tenant.chat("ann")
    client = connect(rt_server.url, api_auth(tenant, chat), query="last_message_id=abc")
    try:
        assert refusal_code(client) == "validation_error", client.connect_error
    finally:
        client.disconnect()
