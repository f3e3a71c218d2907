"""Brute force on the real server (every transport), HOST=127.0.0.1 (`make run`), and the
app's own JSON access log (LOG_FORMAT=json).

One server for the module, bound to 127.0.0.1 with RATE_LIMIT_AUTH_FAILURES=5/minute; the
brute-force test blocks this test client's address, so it runs last.
"""
from __future__ import annotations

import json
import socket
import uuid
from urllib.parse import urlencode

import pytest
import requests
import websocket

from tests.kit.rest import new_tenant
from tests.kit.servers import ADMIN_TOKEN, log_has
from tests.kit.sio import connect, refusal_code

SERVER_ENV = {"RATE_LIMIT_AUTH_FAILURES": "5/minute", "HOST": "127.0.0.1",
              "LOG_FORMAT": "json"}


def test_a_server_started_with_host_127_0_0_1_listens_on_loopback_only(live_server):
    assert f"Listening at: http://127.0.0.1:{live_server.port}" in live_server.log()
    # another local address (127.0.0.2, loopback too) is refused: nothing listens there
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", live_server.port), timeout=5).close()


def test_the_makefile_binds_127_0_0_1_unless_told_otherwise():
    from tests.kit.servers import ROOT

    makefile = (ROOT / "Makefile").read_text()
    assert "HOST   ?= 127.0.0.1" in makefile
    assert "HOST=$(HOST)" in makefile


def test_the_json_access_log_redacts_credentials_in_query_strings(live_server):
    tenant = new_tenant(live_server.url)
    secrets = {"api_key": "wc_" + uuid.uuid4().hex, "connection_string": uuid.uuid4().hex,
               "message_string": uuid.uuid4().hex}
    marker = uuid.uuid4().hex
    r = requests.get(live_server.url + "/api/v1/workspaces/user/ann",
                     params={"marker": marker, **secrets}, headers=tenant.headers, timeout=10)
    assert r.status_code == 200, r.text
    r = requests.get(live_server.url + "/socket.io/", timeout=10, params={
        "EIO": "4", "transport": "polling", "marker": marker, **secrets})
    assert r.status_code == 200
    log = log_has(live_server, marker)
    for value in secrets.values():
        assert value not in log
    lines = [json.loads(line) for line in log.splitlines() if marker in line]
    assert lines, log[-2000:]
    assert all(line["query"].count("[redacted]") == 3 for line in lines), lines


def test_wrong_credentials_on_any_transport_are_limited_per_address(live_server):
    url = live_server.url
    tenant = new_tenant(url)
    chat = tenant.chat("ann")
    api = url + "/api/v1/workspaces/user/ann"
    # five wrong credentials, one per transport and door, are answered as wrong ...
    r = requests.get(api, headers={"X-API-Key": "wc_wrong1"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = requests.post(url + "/admin/tenants", json={"name": "X"},
                      headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    client = connect(url, {"chat_id": chat, "api_key": "wc_wrong2", "user_id": "ann"})
    assert refusal_code(client) == "invalid_api_key"
    client.disconnect()
    ws_url = url.replace("http://", "ws://") + "/ws/chat?"
    ws = websocket.create_connection(ws_url + urlencode(
        {"chat_id": chat, "api_key": "wc_wrong3", "user_id": "ann"}), timeout=10)
    assert json.loads(ws.recv())["data"]["code"] == "invalid_api_key"
    ws.close()
    r = requests.get(api, headers={"X-API-Key": "wc_wrong4"}, timeout=10)
    assert r.status_code == 401
    # ... the sixth attempt, and every one after it from this address, is refused
    r = requests.get(api, headers={"X-API-Key": "wc_wrong5"}, timeout=10)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    r = requests.get(api, headers=tenant.headers, timeout=10)  # even the right key
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    r = requests.post(url + "/admin/tenants", json={"name": "X"},
                      headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    for transport in ("websocket", "polling"):
        client = connect(url, {"chat_id": chat, "api_key": tenant.key, "user_id": "ann"},
                         transport=transport)
        assert refusal_code(client) == "rate_limited", client.connect_error
        client.disconnect()
    ws = websocket.create_connection(ws_url + urlencode(
        {"chat_id": chat, "api_key": tenant.key, "user_id": "ann"}), timeout=10)
    try:
        frame = json.loads(ws.recv())
        assert frame["event"] == "error" and frame["data"]["code"] == "rate_limited", frame
        assert ws.recv() == ""  # then closed
    finally:
        ws.close()
    assert requests.get(url + "/healthz", timeout=10).status_code == 200
    assert "Traceback" not in live_server.log()
