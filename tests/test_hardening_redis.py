"""Wrong credentials count in Flask-Limiter's storage: with REDIS_URL set, every process counts
together (two server processes sharing one Redis and one database)."""
from __future__ import annotations

import pytest
import redis
import requests

from tests.kit.servers import REDIS_TEST_URL, service_missing, start_server, stop_server
from tests.kit.rest import new_tenant

SERVER_ENV = {"RATE_LIMIT_AUTH_FAILURES": "4/minute", "REDIS_URL": REDIS_TEST_URL}


@pytest.fixture(scope="module")
def two_servers(tmp_path_factory):
    try:
        store = redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=2)
        for key in store.scan_iter("*auth_failures*"):  # a run a minute ago counted here too
            store.delete(key)
    except redis.RedisError as exc:
        service_missing("Redis", exc)
    tmp = tmp_path_factory.mktemp("auth-redis")
    a = start_server(tmp, **SERVER_ENV)
    try:
        b = start_server(tmp, **SERVER_ENV)  # the same SQLite file and the same Redis
    except BaseException:
        stop_server(a.process)
        raise
    yield a, b
    stop_server(b.process)
    stop_server(a.process)


def test_wrong_keys_sent_to_two_processes_add_up(two_servers):
    a, b = two_servers
    tenant = new_tenant(a.url)
    for server in (a, b, a, b):  # four wrong keys, two to each process
        r = requests.get(server.url + "/api/v1/workspaces/user/ann",
                         headers={"X-API-Key": "wc_wrong"}, timeout=10)
        assert r.status_code == 401, r.text
    for server in (a, b):  # the fifth attempt is refused by either, even with the right key
        r = requests.get(server.url + "/api/v1/workspaces/user/ann", headers=tenant.headers,
                         timeout=10)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "rate_limited"
        assert int(r.headers["Retry-After"]) >= 1
