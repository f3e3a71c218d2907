"""A Redis channel per chat (issue 13, "scale-out that scales"), end to end on two real server
processes sharing PostgreSQL and Redis.

A process listens to a chat's channel (sharded pub/sub, SSUBSCRIBE) only while it has a client
in the chat, so it spends nothing on the chats of the others; what Redis says about each
process's listener connection (CLIENT LIST's ``ssub``, PUBSUB SHARDNUMSUB) proves it:

1. a chat whose clients are all on A is not heard by B, and A stops hearing it when they leave;
2. clients joining on B while messages stream in from A get every message after their
   ``last_message_id``, once, in order (the subscription is confirmed before the replay read);
3. after Redis drops the listener connections, every process subscribes again;
4. a join whose subscription Redis does not confirm fails rather than losing messages.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from app.chat.relay import ChatRelay, SubscribeTimeout
from tests.kit.plain import PlainClient
from tests.kit.rest import Tenant, new_tenant
from tests.kit.servers import LiveServer, service_missing, start_server, stop_server
from tests.kit.sio import ChatClient
from tests.kit.clients import Clients
from tests.kit.wait import wait_until
from tests.test_scale_out import exchange_across, received_ids, shared_chat

pytestmark = pytest.mark.e2e

#: This module's own Redis database; the servers' channels are named after it.
REDIS_URL = "redis://127.0.0.1:6379/7"
CHANNEL = "workspace-chat-7"

ENV = {"RATE_LIMIT_MESSAGES": "1000/second", "RATE_LIMIT_REST": "10000/minute"}

WAIT = 15  # seconds: the bound of every wait for something that should come much sooner


@pytest.fixture(scope="module")
def store():
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2,
                                      decode_responses=True)
        client.flushdb()
    except redis.RedisError as exc:
        service_missing("Redis", exc)
    return client


@pytest.fixture(scope="module", params=["eventlet", "gevent"])
def cluster(request, store, tmp_path_factory, pg_database_factory):
    env = {**ENV, "ASYNC_MODE": request.param, "DATABASE_URL": pg_database_factory(),
           "REDIS_URL": REDIS_URL}
    tmp = tmp_path_factory.mktemp(f"channels-{request.param}")
    a = start_server(tmp, **env)
    try:
        b = start_server(tmp, **env)
    except BaseException:
        stop_server(a.process)
        raise
    yield a, b
    stop_server(b.process)
    stop_server(a.process)


# --- what Redis knows about each process ------------------------------------------------------

def worker_pid(server: LiveServer) -> int:
    """The pid of the server's one gunicorn worker (the process that talks to Redis)."""
    master = server.process.pid
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def listener(store: redis.Redis, server: LiveServer) -> dict[str, str] | None:
    """The server's pub/sub connection as CLIENT LIST shows it (None while it has none)."""
    name = f"{CHANNEL}:relay:{worker_pid(server)}"
    found = [c for c in store.client_list(_type="pubsub") if c.get("name") == name]
    assert len(found) <= 1, found
    return found[0] if found else None


def chats_heard(store: redis.Redis, server: LiveServer) -> int | None:
    """How many chat channels the server listens to (None while it has no connection)."""
    connection = listener(store, server)
    return int(connection["ssub"]) if connection else None


def subscribers(store: redis.Redis, chat_id: str) -> int:
    """How many processes listen to the chat's channel."""
    return dict(store.pubsub_shardnumsub(f"{CHANNEL}:chat:{chat_id}"))[
        f"{CHANNEL}:chat:{chat_id}"]


# --- 1. a process hears only its own chats -------------------------------------------------------

def test_a_process_listens_to_a_chat_only_while_it_has_a_client_in_it(cluster, store,
                                                                     clients):
    a, b = cluster
    tenant = new_tenant(a.url)
    chat = shared_chat(tenant)
    elsewhere = tenant.chat("bob")
    bystander = clients.open(b.url, tenant.key_auth(elsewhere, "bob"))  # B is busy elsewhere
    # (A starts listening at its first connection: until then it has no connection at all)
    wait_until(lambda: chats_heard(store, b) == 1 and chats_heard(store, a) in (0, None),
               message="B to hear its one chat and A none (earlier tests' clients are gone)")
    assert subscribers(store, chat) == 0

    ann = clients.open(a.url, tenant.key_auth(chat, "ann"))
    # subscribed before the connect handler read the history: no waiting here
    assert subscribers(store, chat) == 1
    assert (chats_heard(store, a), chats_heard(store, b)) == (1, 1)  # A's, not B's
    bob = clients.open(a.url, tenant.key_auth(chat, "bob"))
    string = ann.message_string
    sent = []
    for i in range(20):
        ack = ann.send(f"on A only {i}", string)
        assert ack["ok"] is True, ack
        sent.append(ack["message"]["id"])
        string = ack["next_message_string"]
    for client in (bob, ann):  # ann's acks may come before her own messages through Redis
        client.wait_for("message_received", len(sent), timeout=WAIT)
    assert received_ids(bob) == received_ids(ann) == sent
    # B never listened: Redis sent it none of those messages
    assert subscribers(store, chat) == 1
    assert chats_heard(store, b) == 1
    assert bystander.named("message_received") == []

    ann.disconnect()
    assert subscribers(store, chat) == 1  # bob is still there
    bob.disconnect()
    wait_until(lambda: subscribers(store, chat) == 0 and chats_heard(store, a) == 0,
               message="A to unsubscribe once its last client of the chat left")
    assert chats_heard(store, b) == 1


# --- 2. joining mid-stream loses nothing ---------------------------------------------------------

class Sender(threading.Thread):
    """Sends messages to a chat, each after the previous one's ack, until stopped."""

    def __init__(self, client: ChatClient) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.stopped = threading.Event()
        self.acked: list[str] = []  # the acknowledged message ids, in order
        self.cond = threading.Condition()
        self.failure: Any = None

    def run(self) -> None:
        string = self.client.message_string
        i = 0
        try:
            while not self.stopped.is_set():
                ack = self.client.send(f"stream {i}", string)
                if not ack.get("ok"):
                    self.failure = ack
                    return
                string = ack["next_message_string"]
                with self.cond:
                    self.acked.append(ack["message"]["id"])
                    self.cond.notify_all()
                i += 1
        except Exception as exc:  # reported by the test
            self.failure = repr(exc)
        finally:
            with self.cond:
                self.stopped.set()
                self.cond.notify_all()

    def stored_from_now(self) -> str:
        """The id of a message that was sent (so stored) after this call began: the second
        ack from now (the first may answer a message sent before)."""
        with self.cond:
            start = len(self.acked)
            assert self.cond.wait_for(lambda: len(self.acked) >= start + 2
                                      or self.stopped.is_set(), WAIT), "no acks"
            assert self.failure is None and len(self.acked) >= start + 2, self.failure
            return self.acked[start + 1]


def join_socketio(clients: Clients, b: LiveServer, tenant: Tenant, chat: str,
                  sender: Sender, after: str) -> tuple[list[str], str]:
    """Join on B with ``last_message_id=after``, stay until a message stored after the join
    (after its replay was read) arrived, leave; the ids of the messages it got, and that
    message's."""
    client = clients.open(b.url, tenant.key_auth(chat, "bob", last_message_id=after))
    later = sender.stored_from_now()  # connection_established came after the replay read
    deadline = time.monotonic() + WAIT
    while later not in received_ids(client):
        assert time.monotonic() < deadline, (later, received_ids(client))
        client.wait_for("message_received", len(received_ids(client)) + 1, timeout=WAIT)
    client.disconnect()
    return received_ids(client), later


def join_plain(b: LiveServer, tenant: Tenant, chat: str, sender: Sender,
               after: str) -> tuple[list[str], str]:
    """The same over /ws/chat."""
    client = PlainClient(b, chat_id=chat, api_key=tenant.key, user_id="bob",
                         last_message_id=after)
    try:
        client.until("connection_established")
        later = sender.stored_from_now()
        while later not in [f["data"]["id"] for f in client.frames
                            if f["event"] == "message_received"]:
            client.next()  # bounded by the socket's timeout
    finally:
        client.close()
    return [f["data"]["id"] for f in client.frames if f["event"] == "message_received"], later


def test_clients_joining_on_another_process_mid_stream_get_every_later_message_once_in_order(
        cluster, store, clients):
    a, b = cluster
    tenant = new_tenant(a.url)
    chat = shared_chat(tenant)
    sender = Sender(clients.open(a.url, tenant.key_auth(chat, "ann")))
    sender.start()
    joins: list[tuple[str, list[str], str]] = []
    try:
        for n in range(24):
            after = sender.stored_from_now()
            if n % 2 == 0:  # half the joins find B unsubscribed; half race its unsubscribe
                wait_until(lambda: subscribers(store, chat) == 1,
                           message="B to unsubscribe after its last client left")
            if n % 4 < 2:
                got = join_socketio(clients, b, tenant, chat, sender, after)
            else:
                got = join_plain(b, tenant, chat, sender, after)
            joins.append((after, *got))
    finally:
        sender.stopped.set()
        sender.join(WAIT)
    assert sender.failure is None, sender.failure

    for after, got, later in joins:
        assert len(got) < 200, len(got)  # one page of the history holds them all
        stored = [m["id"] for m in tenant.history(chat, after_id=after, limit=200)]
        # every message after its last_message_id, up to one stored after it joined: none
        # lost, none doubled, in the history's order
        assert later in got and got == stored[:len(got)], (after, later, got, stored)


# --- 3. a dropped connection ---------------------------------------------------------------------

def test_after_redis_drops_the_listener_connections_every_process_subscribes_again(
        cluster, store, clients):
    a, b = cluster
    tenant = new_tenant(a.url)
    chat = shared_chat(tenant)
    ann = clients.open(a.url, tenant.key_auth(chat, "ann"))
    bob = clients.open(b.url, tenant.key_auth(chat, "bob"))
    assert subscribers(store, chat) == 2
    before = {listener(store, a)["id"], listener(store, b)["id"]}

    for connection_id in before:  # only our servers' (other suites share this Redis)
        store.client_kill_filter(_id=connection_id)

    def renewed() -> bool:
        connections = [listener(store, a), listener(store, b)]
        return (all(c is not None and c["id"] not in before for c in connections)
                and subscribers(store, chat) == 2
                and dict(store.pubsub_numsub(CHANNEL))[CHANNEL] == 2)

    wait_until(renewed, message="both processes to subscribe again")
    exchange_across(ann, bob, "after the drop, from A", "after the drop, from B")

    bob.disconnect()
    wait_until(lambda: subscribers(store, chat) == 1 and chats_heard(store, b) == 0,
               message="B to unsubscribe")


# --- 4. an unconfirmed subscription ----------------------------------------------------------------

def test_a_join_whose_subscription_is_not_confirmed_fails_and_leaves_the_chat_unwanted(store):
    # The listener is live (its flag says so) but never reads Redis's reply here.
    relay = ChatRelay(REDIS_URL, CHANNEL + ":unconfirmed", "test-host")
    relay.listening = True
    woken = relay._client().pubsub()
    woken.subscribe(relay.wake_channel)
    assert woken.get_message(timeout=WAIT)["type"] == "subscribe"
    with pytest.raises(SubscribeTimeout):
        relay.subscribe("chat:c1", timeout=0.2)
    assert woken.get_message(timeout=WAIT)["channel"] == relay.wake_channel.encode()
    assert not relay.confirmed("chat:c1")
    assert relay._wanted == set()  # nobody else needed it: no subscription is left asked for
    woken.close()


class _Stop(BaseException):
    """Ends a test's listener thread (raised from its retry sleep)."""


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "plain"])
def test_a_join_returns_only_once_redis_delivers_the_chat_to_the_process(store, sharded):
    """Sharded pub/sub (Redis 7), and the plain channels used with an older Redis."""
    relay = ChatRelay(REDIS_URL, CHANNEL + ":in-process", "test-host")
    if not sharded:
        relay.sharded = False  # what it decides on a Redis before 7.0
    numsub = store.pubsub_shardnumsub if sharded else store.pubsub_numsub
    publish = store.spublish if sharded else store.publish
    received: list[bytes] = []
    ended = threading.Event()

    def stop(seconds: float) -> None:
        raise _Stop

    relay.sleep = stop

    def listen() -> None:
        try:
            for data in relay.listen():
                received.append(data)
        except _Stop:
            ended.set()

    # the join comes first: it waits for the listener that is only starting
    thread = threading.Thread(target=listen, daemon=True)
    joined = threading.Thread(target=relay.subscribe, args=("chat:c2",), daemon=True)
    joined.start()
    thread.start()
    joined.join(WAIT)
    assert not joined.is_alive()
    channel = relay.channel_of("chat:c2")
    assert relay.confirmed("chat:c2")
    assert dict(numsub(channel))[channel] == 1  # already, not soon

    relay.subscribe("chat:c3")  # the listener is live: one more join
    assert dict(numsub(relay.channel_of("chat:c3"))).popitem()[1] == 1
    assert publish(channel, "hello") == 1
    assert relay.publish("chat:c3", "again") == 1  # the relay publishes the same way
    wait_until(lambda: received == [b"hello", b"again"],
               message="the listener to yield the messages")

    relay.release("chat:c2")  # nobody in it (in_use says no): unsubscribed
    wait_until(lambda: dict(numsub(channel))[channel] == 0, message="the listener to unsubscribe")
    assert relay.confirmed("chat:c3")

    store.client_kill_filter(_id=[c for c in store.client_list(_type="pubsub")
                                  if c.get("name") == relay.client_name][0]["id"])
    assert ended.wait(WAIT)  # the listener noticed, and would reconnect after its sleep
    assert not relay.listening and not relay.confirmed("chat:c3")
