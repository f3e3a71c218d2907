"""Wrong credentials count in Flask-Limiter's storage: with REDIS_URL set, every process counts
together (two server processes sharing one Redis and one database)."""
from __future__ import annotations

import pytest
import requests

from tests.kit.rest import new_tenant
from tests.kit.servers import REDIS_TEST_URL, two_servers

SERVER_ENV = {"RATE_LIMIT_AUTH_FAILURES": "4/minute", "REDIS_URL": REDIS_TEST_URL}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    # only the counters of wrong credentials: a run a minute ago counted here too
    with two_servers(tmp_path_factory.mktemp("auth-redis"), redis_keys="*auth_failures*",
                     **SERVER_ENV) as servers:
        yield servers


def test_wrong_keys_sent_to_two_processes_add_up(pair):
    a, b = pair
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
