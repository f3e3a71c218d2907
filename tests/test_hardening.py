"""Hardening (issue 11, contract §9): event floods, logs, brute force, the first key's id,
/docs without a CDN, the demo's join limit and Procfile checks, deep JSON.

Fast unit tests use the ``app`` fixture (SQLite and PostgreSQL); the rest run against the real
server (Procfile web: line) under eventlet and gevent, with real clients.
"""
from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import uuid
from urllib.parse import urlencode

import pytest
import requests
import websocket

from tests.conftest import assert_error
from tests.kit.plain import PlainClient
from tests.kit.rest import new_tenant
from tests.kit.servers import ADMIN_TOKEN, ROOT, log_has, procfile_command, server_env
from tests.kit.sio import connect
from tests.kit.wait import wait_until

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# get_message_string's window is RATE_LIMIT_MESSAGES per connection; per minute here, so that
# the 11th request is refused however slowly a loaded machine sends the first ten.
SERVER_ENV = {"ACCESS_LOG": "1", "DEMO": "1", "RATE_LIMIT_MESSAGES": "10/minute"}


@pytest.fixture(scope="module", autouse=True)
def keep_the_developers_demo_key():
    """The DEMO=1 servers here write instance/demo_api_key: the developer's is put back."""
    key_file = ROOT / "instance" / "demo_api_key"
    saved = key_file.read_bytes() if key_file.exists() else None
    yield
    if saved is None:
        key_file.unlink(missing_ok=True)
    else:
        key_file.write_bytes(saved)


def nested(depth: int) -> str:
    """A JSON array nested ``depth`` levels deep."""
    return "[" * depth + "]" * depth


def loopback_address() -> str:
    """A loopback address of its own for one test (the brute-force count is per address)."""
    return f"127.{uuid.uuid4().int % 250 + 1}.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}"


# --- 4. POST /admin/tenants names the first key's id ----------------------------------------

def test_a_new_tenants_first_key_can_be_revoked_with_the_returned_id(client):
    r = client.post("/admin/tenants", json={"name": "Hooli"}, headers=ADMIN)
    assert r.status_code == 201, r.get_data(as_text=True)
    body = r.get_json()
    assert set(body) == {"id", "name", "api_key", "api_key_id"}
    key = {"X-API-Key": body["api_key"]}
    assert client.get("/api/v1/workspaces/user/alice", headers=key).status_code == 200
    r = client.delete(f"/admin/tenants/{body['id']}/api-keys/{body['api_key_id']}",
                      headers=ADMIN)
    assert r.status_code == 204, r.get_data(as_text=True)
    assert_error(client.get("/api/v1/workspaces/user/alice", headers=key), 401,
                 "invalid_api_key")


def test_the_openapi_document_describes_api_key_id(client):
    spec = client.get("/openapi.json").get_json()
    properties = spec["components"]["schemas"]["TenantCreated"]["properties"]
    assert {"id", "name", "api_key", "api_key_id"} <= set(properties)


# --- 3. brute force: wrong credentials per address ------------------------------------------

@pytest.fixture
def auth_limit_20(app, monkeypatch):
    """The contract's default (tests/conftest.py raises it for the rest of the suite)."""
    monkeypatch.setitem(app.config, "RATE_LIMIT_AUTH_FAILURES", "20/minute")


def test_wrong_api_keys_are_limited_per_address_and_other_addresses_are_not(
        client, tenant, auth_limit_20):
    attacker = {"REMOTE_ADDR": loopback_address()}
    for attempt in range(20):
        r = client.get("/api/v1/workspaces/user/alice", environ_base=attacker,
                       headers={"X-API-Key": f"wc_wrong{attempt}"})
        assert_error(r, 401, "invalid_api_key")
    r = client.get("/api/v1/workspaces/user/alice", environ_base=attacker,
                   headers={"X-API-Key": "wc_wrong21"})
    error = assert_error(r, 429, "rate_limited")
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert 1 <= error["details"]["retry_after"] <= 60
    # past the limit even the right key is refused from that address ...
    r = client.get("/api/v1/workspaces/user/alice", environ_base=attacker,
                   headers={"X-API-Key": tenant.key})
    assert_error(r, 429, "rate_limited")
    # ... and works from any other
    r = client.get("/api/v1/workspaces/user/alice",
                   environ_base={"REMOTE_ADDR": loopback_address()},
                   headers={"X-API-Key": tenant.key})
    assert r.status_code == 200, r.get_data(as_text=True)


def test_wrong_admin_tokens_are_limited_per_address(client, auth_limit_20):
    attacker = {"REMOTE_ADDR": loopback_address()}
    for attempt in range(20):
        r = client.post("/admin/tenants", json={"name": "X"}, environ_base=attacker,
                        headers={"Authorization": f"Bearer wrong-{attempt}"})
        assert_error(r, 401, "invalid_api_key")
    r = client.post("/admin/tenants", json={"name": "X"}, environ_base=attacker, headers=ADMIN)
    assert_error(r, 429, "rate_limited")
    assert int(r.headers["Retry-After"]) >= 1
    r = client.post("/admin/tenants", json={"name": "X"}, headers=ADMIN,
                    environ_base={"REMOTE_ADDR": loopback_address()})
    assert r.status_code == 201, r.get_data(as_text=True)


def test_right_credentials_and_missing_ones_do_not_count(client, tenant, auth_limit_20):
    address = {"REMOTE_ADDR": loopback_address()}
    for _ in range(25):
        r = client.get("/api/v1/workspaces/user/alice", environ_base=address,
                       headers={"X-API-Key": tenant.key})
        assert r.status_code == 200
        assert_error(client.get("/api/v1/workspaces/user/alice", environ_base=address),
                     401, "missing_api_key")


# --- 8. JSON nested too deeply ----------------------------------------------------------------

@pytest.mark.parametrize("depth", [65, 990, 100_000])
def test_json_nested_deeper_than_64_levels_is_invalid_json(client, tenant, depth):
    body = '{"owner_id": "alice", "name": "Deep", "agent": ' + nested(depth) + "}"
    for path in ("/api/v1/workspaces", "/api/v1/chats/", "/chat"):
        r = tenant.api.post(path, data=body, content_type="application/json")
        error = assert_error(r, 400, "invalid_json")
        assert "64" in error["message"]
    r = client.post("/admin/tenants", data=nested(depth), content_type="application/json",
                    headers=ADMIN)
    assert_error(r, 400, "invalid_json")


def test_json_64_levels_deep_is_still_parsed(tenant):
    # 64 levels is allowed: the body is read, then refused by the schema, not as bad JSON
    body = '{"owner_id": "alice", "name": "Deep", "agent": ' + nested(63) + "}"
    r = tenant.api.post("/api/v1/workspaces", data=body, content_type="application/json")
    assert_error(r, 400, "validation_error")


# --- 5. /docs without a CDN ----------------------------------------------------------------

def _docs_assets(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


def test_docs_names_no_external_host_and_its_assets_come_from_the_app(client):
    r = client.get("/docs")
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html, re.I), html
    assets = _docs_assets(html)
    assert {a.rsplit("/", 1)[-1] for a in assets} >= {
        "swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js"}
    for asset in assets:
        assert asset.startswith("/"), asset
        r = client.get(asset)
        assert r.status_code == 200, asset
        assert len(r.get_data()) > 1000
    # Swagger UI itself must not fetch from a third party either (its validator badge)
    assert json.loads(re.search(r"override_config = (\{.*?\});", html).group(1)) == {
        "validatorUrl": None}


def test_a_missing_swagger_ui_is_a_clear_404(client, monkeypatch, tmp_path):
    import app.api

    monkeypatch.setattr(app.api, "SWAGGER_UI_DIST", str(tmp_path))
    error = assert_error(client.get("/docs/static/swagger-ui-bundle.js"), 404, "not_found")
    assert "make install" in error["message"]


# --- the real server: floods, logs, deep JSON, demo, Procfile ----------------------------------

@pytest.mark.parametrize("sender_kind", ["socketio", "plain"])
def test_a_typing_flood_is_relayed_at_most_twice_a_second(rt_server, sender_kind):
    tenant = new_tenant(rt_server.url)
    chat = tenant.chat("ann", tenant.workspace("ann", members=("bob",)))
    bob = connect(rt_server.url, {"chat_id": chat, "api_key": tenant.key, "user_id": "bob"})
    if sender_kind == "socketio":
        ann = connect(rt_server.url, {"chat_id": chat, "api_key": tenant.key, "user_id": "ann"})
        ann.wait_for("connection_established")

        def typing(value: bool) -> None:
            ann.sio.emit("typing", {"is_typing": value}, namespace="/chat")

        def marker() -> None:
            assert ann.send("marker", ann.message_string)["ok"]
    else:
        ann = PlainClient(rt_server, api_key=tenant.key, user_id="ann", chat_id=chat)
        ann.until("connection_established")

        def typing(value: bool) -> None:
            ann.send({"event": "typing", "data": {"is_typing": value}})

        def marker() -> None:
            ann.send({"content": "marker"})
    try:
        bob.wait_for("connection_established")
        started = time.monotonic()
        for i in range(50):
            typing(i % 2 == 0)
        burst_seconds = time.monotonic() - started
        marker()  # sent after the burst: once bob has it, the burst has been handled
        bob.wait_for("message_received")
        allowed = 2 * (int(burst_seconds) + 2)  # two per second, plus a window's edge
        with pytest.raises(AssertionError):  # nothing more comes (bounded wait)
            bob.wait_for("typing", count=allowed + 1, timeout=1)
        relayed = bob.named("typing")
        assert 1 <= len(relayed) <= allowed, (len(relayed), burst_seconds)
        assert all(event == {"user_id": "ann", "is_typing": event["is_typing"]}
                   for event in relayed)
        # the dropped events were dropped silently: no error to the sender
        errors = (ann.named("error") if sender_kind == "socketio"
                  else [f for f in ann.frames if f["event"] == "error"])
        assert errors == []
        # and typing is relayed again once the window has passed (bounded retries)
        def relayed_again() -> bool:
            typing(True)
            try:
                bob.wait_for("typing", count=len(relayed) + 1, timeout=0.3)
            except AssertionError:
                return False
            return True

        wait_until(relayed_again, 10, "typing relayed again", interval=0)
        assert len(bob.named("typing")) > len(relayed)
    finally:
        ann.disconnect() if sender_kind == "socketio" else ann.close()
        bob.disconnect()


def test_get_message_string_has_its_own_window_on_socketio(rt_server):
    tenant = new_tenant(rt_server.url)
    chat = tenant.chat("ann")
    ann = connect(rt_server.url, {"chat_id": chat, "api_key": tenant.key, "user_id": "ann"})
    try:
        ann.wait_for("connection_established")
        strings = [ann.call("get_message_string") for _ in range(10)]
        assert all(set(s) == {"message_string", "expires_at"} for s in strings), strings
        refused = ann.call("get_message_string")
        assert refused["ok"] is False, refused
        assert refused["error"]["code"] == "rate_limited"
        assert refused["error"]["details"]["retry_after"] > 0
        assert ann.wait_for("error")[0]["code"] == "rate_limited"
        # the message window is another one: messages still go through
        ack = ann.send("still fine", strings[-1]["message_string"])
        assert ack["ok"], ack
    finally:
        ann.disconnect()


def test_get_message_string_has_its_own_window_on_ws_chat(rt_server):
    tenant = new_tenant(rt_server.url)
    chat = tenant.chat("ann")
    plain = PlainClient(rt_server, api_key=tenant.key, user_id="ann", chat_id=chat)
    try:
        plain.until("connection_established")
        for _ in range(11):
            plain.send({"event": "get_message_string", "data": {}})
        error = plain.until("error")[0]
        assert error["code"] == "rate_limited" and error["details"]["retry_after"] > 0
        assert len(plain.until("get_message_string")) == 10
        plain.send({"content": "still fine"})
        assert plain.until("message")[0]["ok"] is True
    finally:
        plain.close()


def test_access_logs_redact_credentials_in_query_strings(rt_server):
    secrets = {"api_key": "wc_" + uuid.uuid4().hex, "connection_string": uuid.uuid4().hex,
               "message_string": uuid.uuid4().hex}
    marker = uuid.uuid4().hex
    query = urlencode({"EIO": "4", "transport": "polling", "chat_id": "c" + marker,
                       "user_id": "ann", **secrets})
    r = requests.get(f"{rt_server.url}/socket.io/?{query}", timeout=10)
    assert r.status_code == 200
    ws = websocket.create_connection(
        rt_server.url.replace("http://", "ws://") + "/ws/chat?" + urlencode(
            {"chat_id": "w" + marker, "user_id": "ann", **secrets}), timeout=10)
    try:
        assert json.loads(ws.recv())["event"] == "error"
        assert ws.recv() == ""  # refused, then closed by the server
    finally:
        ws.close()
    # a last request: once it is logged, the ones before it are (a WebSocket is logged, if at
    # all, when it ends: eventlet's worker does not log upgrades, gevent's does)
    requests.get(f"{rt_server.url}/healthz?after={marker}", timeout=10)
    log = log_has(rt_server, f"after={marker}")
    assert "c" + marker in log  # the polling handshake was logged ...
    for value in secrets.values():  # ... and no line shows a credential
        assert value not in log
    lines = [line for line in log.splitlines() if marker in line and "after=" not in line]
    assert lines and all(line.count("[redacted]") == 3 for line in lines), lines


def test_deeply_nested_json_on_the_real_server_is_invalid_json_without_a_traceback(rt_server):
    tenant = new_tenant(rt_server.url)
    for depth in (65, 990, 50_000):
        r = requests.post(rt_server.url + "/api/v1/workspaces", data=nested(depth),
                          headers={**tenant.headers, "Content-Type": "application/json"},
                          timeout=10)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_json"
    assert requests.get(rt_server.url + "/healthz", timeout=10).status_code == 200
    assert "Traceback" not in rt_server.log()
    assert "RecursionError" not in rt_server.log()


def test_demo_join_is_limited_per_address(rt_server):
    for attempt in range(10):
        r = requests.post(rt_server.url + "/demo/join", json={"name": f"Visitor {attempt}"},
                          timeout=10)
        assert r.status_code == 200, r.text
    r = requests.post(rt_server.url + "/demo/join", json={"name": "One too many"}, timeout=10)
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(r.headers["Retry-After"]) <= 60


def test_docs_assets_answer_from_the_real_server(rt_server):
    html = requests.get(rt_server.url + "/docs", timeout=10).text
    assets = _docs_assets(html)
    assert len(assets) >= 3
    for asset in assets:
        assert requests.get(rt_server.url + asset, timeout=10).status_code == 200, asset


def test_the_procfile_server_listens_on_every_address_by_default(rt_server):
    assert f"Listening at: http://0.0.0.0:{rt_server.port}" in rt_server.log()
    # so another local address (127.0.0.2, loopback) reaches it too
    with socket.create_connection(("127.0.0.2", rt_server.port), timeout=5):
        pass


def test_demo_with_app_env_production_refuses_to_start(tmp_path):
    env = server_env(PORT=str(0), APP_ENV="production", DEMO="1",
                     DATABASE_URL="sqlite:///" + str(tmp_path / "refused.db"))
    result = subprocess.run(["bash", "-c", "exec " + procfile_command("web")], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DEMO=1 is refused when APP_ENV=production" in result.stdout + result.stderr


# --- 1. the service's per-connection windows (unit) ------------------------------------------

def test_the_service_drops_typing_past_two_a_second_and_forgets_windows_on_release(app):
    from app.chat import connections, messages, session
    from app.errors import ApiError

    connection = connections.Connection(sid="unit-" + uuid.uuid4().hex, tenant_id="t", user_pk=1,
                                        user_id="ann", chat_id="c", workspace_id="w")
    with app.test_request_context():
        relayed = [session.typing_payload(connection, {"is_typing": True}) for _ in range(5)]
        assert relayed[:2] == [{"user_id": "ann", "is_typing": True}] * 2
        assert relayed[2:] == [None, None, None]  # dropped, no error
        with pytest.raises(ApiError) as refused:  # validation still comes first
            session.typing_payload(connection, {"is_typing": "yes"})
        assert refused.value.code == "validation_error"
        for _ in range(10):  # RATE_LIMIT_MESSAGES, 10 a second
            messages.new_message_string(connection, requested=True)
        for _ in range(3):  # the strings the server hands out by itself are not counted
            messages.new_message_string(connection)
        with pytest.raises(ApiError) as refused:
            messages.new_message_string(connection, requested=True)
        assert refused.value.code == "rate_limited"
        assert 0 < refused.value.details["retry_after"] <= 1
        connections.release_connection(connection)
        for name in ("typing", "message_string", "message"):
            rate = app.extensions.get(f"chat_{name}_rate")  # made on first use
            assert rate is None or connection.sid not in rate.windows


# --- 5. /docs in a real browser (Debian's Chromium, as tests/test_demo_browser.py) -------------

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    import os

    from tests.kit.servers import REQUIRE_SERVICES

    if not os.path.exists(CHROMIUM):
        if REQUIRE_SERVICES:
            pytest.fail(f"{CHROMIUM} is missing (apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield chromium
        chromium.close()


def test_docs_renders_swagger_ui_in_a_browser_with_nothing_but_the_app(rt_server, browser):
    context = browser.new_context()
    context.set_default_timeout(20_000)
    elsewhere: list[str] = []

    def only_the_app(route):
        # anything not from the app is recorded and never sent
        if route.request.url.startswith((rt_server.url + "/", "data:")):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    context.route("**/*", only_the_app)
    try:
        page = context.new_page()
        page.goto(rt_server.url + "/docs")
        page.locator(".swagger-ui .info .title").filter(has_text="Workspace Chat").wait_for()
        page.locator(".opblock-summary-path", has_text="/admin/tenants").first.wait_for()
        assert elsewhere == []
    finally:
        context.close()
