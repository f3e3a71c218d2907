"""With Redis, every open connection keeps counting against its tenant's limit, whatever its
transport: its process renews its lease (app/chat/session.py), for /ws/chat as for Socket.IO.

A real server process on Redis database 9 with a 3 s lease and one connection per tenant: a
connection stays open past two lease periods, and a second one of the same tenant is still
refused; once the first closes, a new one is accepted.
"""
from __future__ import annotations

import pytest
import redis

from tests.kit.plain import PlainClient
from tests.kit.rest import new_tenant
from tests.kit.servers import service_missing, start_server, stop_server
from tests.kit.sio import connect, refusal_code
from tests.kit.wait import wait_until

REDIS_URL = "redis://127.0.0.1:6379/9"
LEASE_SECONDS = 3


@pytest.fixture(scope="module")
def store():
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, decode_responses=True)
    try:
        client.flushdb()
    except redis.RedisError as exc:
        service_missing("Redis", exc)
    yield client
    client.close()


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("leases"), REDIS_URL=REDIS_URL,
                          CONNECTION_LEASE_SECONDS=str(LEASE_SECONDS),
                          MAX_CONNECTIONS_PER_TENANT="1")
    yield server
    stop_server(server.process)


class SocketIOConnection:
    """A python-socketio connection to /chat: its sid, or its refusal code."""

    def __init__(self, server, auth: dict) -> None:
        self.client = connect(server.url, auth)
        self.refusal = refusal_code(self.client)
        self.sid = None if self.refusal else \
            self.client.wait_for("connection_established")[0]["sid"]

    def close(self) -> None:
        self.client.disconnect()


class PlainConnection:
    """A websocket-client connection to /ws/chat: its sid, or its refusal code."""

    def __init__(self, server, auth: dict) -> None:
        self.client = PlainClient(server, **auth)
        while True:
            frame = self.client.next()
            if frame["event"] in ("error", "connection_established"):
                break
        self.refusal = frame["data"]["code"] if frame["event"] == "error" else None
        self.sid = None if self.refusal else frame["data"]["sid"]

    def close(self) -> None:
        self.client.close()


@pytest.mark.parametrize("transport", [SocketIOConnection, PlainConnection],
                         ids=["socketio", "websocket"])
def test_an_open_connection_counts_against_the_tenant_limit_past_its_lease(server, store,
                                                                           transport):
    tenant = new_tenant(server.url)
    chat_id = tenant.chat("ann")
    auth = {"chat_id": chat_id, "api_key": tenant.key, "user_id": "ann"}
    first = transport(server, auth)
    try:
        assert first.refusal is None, first.refusal
        key = f"wc:conn:{tenant.id}"
        opened_until = store.zscore(key, first.sid)
        assert opened_until is not None, store.zrange(key, 0, -1, withscores=True)

        # Its lease (expiry opened_until) is renewed every third of it: wait until a renewal
        # carried it past two lease periods after it opened (without renewals the
        # connection would have stopped counting after one).
        renewed_past = opened_until + 2 * LEASE_SECONDS - LEASE_SECONDS / 3

        def renewed() -> bool:
            return (store.zscore(key, first.sid) or 0) >= renewed_past

        wait_until(renewed, timeout=3 * LEASE_SECONDS + 5,
                   message=f"the lease of {first.sid} to be renewed past two lease periods")

        second = transport(server, auth)
        second.close()
        assert second.refusal == "too_many_connections", second.sid
    finally:
        first.close()

    accepted: list = []

    def a_new_connection_is_accepted() -> bool:
        attempt = transport(server, auth)
        if attempt.refusal is not None:
            attempt.close()
            return False
        accepted.append(attempt)
        return True

    wait_until(a_new_connection_is_accepted, timeout=10,
               message="a new connection once the first closed")
    accepted[0].close()
