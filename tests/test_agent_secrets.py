"""Agents with AGENT_ALLOW_PRIVATE_NETWORKS=1, and agent secrets at rest (issue 11).

The server runs with ``SECRET_KEY=B`` and ``SECRET_KEY_FALLBACKS=A`` and may reach loopback, so
listeners of the test's own on 127.0.0.1 play the webhook and the model server:

* with the opt-in, loopback destinations are served; a 3xx is an agent error and its target
  is never contacted; connection failures all read the same; an error answer's body is not
  shown;
* ``api_key`` and ``secret`` are stored encrypted (the database row holds no plaintext, the
  API never returns them), a secret stored under the old key A still reaches the listener as
  the Bearer token / HMAC key, a legacy plaintext one still works and is encrypted when the
  workspace is next saved, and one no key opens ends the reply with an agent error, not a 500.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading

import pytest
import requests

from app.agents import secrets
from tests.kit.agents import Listener, ask, ask_once, join, set_stored_agent, stored_agent_text
from tests.kit.rest import new_tenant
from tests.kit.servers import free_port

KEY_A, KEY_B = "old-secret-key-A", "new-secret-key-B"
SERVER_ENV = {"SECRET_KEY": KEY_B, "SECRET_KEY_FALLBACKS": KEY_A,
              "AGENT_ALLOW_PRIVATE_NETWORKS": "1", "AGENT_TIMEOUT": "10",
              "RATE_LIMIT_MESSAGES": "1000/second", "RATE_LIMIT_REST": "100000/minute"}
WEBHOOK_SECRET = "whsec-plaintext-never-stored"
OPENAI_KEY = "sk-plaintext-never-stored-0123"
INTERNAL = "INTERNAL-BODY-DETAIL-do-not-show"
SSE = (b'data: {"choices":[{"delta":{"content":"hi "}}]}\n\n'
       b'data: {"choices":[{"delta":{"content":"there"}}]}\n\ndata: [DONE]\n\n')


@pytest.fixture(scope="module")
def listener():
    server = Listener({
        "/v1/chat/completions": (200, {"Content-Type": "text/event-stream"}, SSE),
        "/500": (500, {"Content-Type": "text/plain"}, INTERNAL.encode()),
    })
    yield server
    server.close()


@pytest.fixture(scope="module")
def redirect_target():
    server = Listener()
    yield server
    server.close()


def webhook(listener, secret: str | None = WEBHOOK_SECRET, path: str = "/hook") -> dict:
    agent = {"kind": "webhook", "url": listener.url + path}
    return {**agent, "secret": secret} if secret else agent


def openai(listener, api_key: str | None = OPENAI_KEY) -> dict:
    agent = {"kind": "openai", "base_url": listener.url + "/v1", "model": "m"}
    return {**agent, "api_key": api_key} if api_key else agent


def last_request(listener, before: int) -> dict:
    seen = listener.recorded()[before:]
    assert len(seen) == 1, seen
    return seen[0]


def signed_with(request: dict, secret: str) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), request["body"], hashlib.sha256).hexdigest()
    return hmac.compare_digest(request["headers"].get("X-Signature-256", ""), expected)


# --- the opt-in: loopback is served; redirects and failures ---------------------------------

def test_with_the_opt_in_a_loopback_webhook_and_model_server_are_served(live_server, listener):
    tenant = new_tenant(live_server.url)
    before = len(listener.recorded())
    ended, error = ask_once(tenant, webhook(listener))
    assert (ended["finish_reason"], ended["content"], error) == ("stop", "ok", None)
    assert signed_with(last_request(listener, before), WEBHOOK_SECRET)

    before = len(listener.recorded())
    ended, error = ask_once(tenant, openai(listener))
    assert (ended["finish_reason"], ended["content"], error) == ("stop", "hi there", None)
    assert last_request(listener, before)["headers"]["Authorization"] == f"Bearer {OPENAI_KEY}"


def test_a_redirect_is_an_agent_error_and_its_target_is_never_contacted(
        live_server, listener, redirect_target):
    listener.routes["/moved"] = (307, {"Location": redirect_target.url + "/hook"}, b"")
    listener.routes["/v1-moved/chat/completions"] = (
        302, {"Location": redirect_target.url + "/v1/chat/completions"}, b"")
    tenant = new_tenant(live_server.url)
    before = len(listener.recorded())
    for agent in (webhook(listener, path="/moved"),
                  {**openai(listener), "base_url": listener.url + "/v1-moved"}):
        ended, error = ask_once(tenant, agent)
        assert ended["finish_reason"] == "error", ended
        assert error is not None and "redirect" in error["message"], error
    assert len(listener.recorded()[before:]) == 2
    assert redirect_target.recorded() == [], "the redirect was followed"


def test_connection_failures_read_the_same_and_an_error_answer_body_is_not_shown(
        live_server, listener):
    # a port nothing listens on, and one that accepts and hangs up at once
    closed_port = free_port()
    hangup = socket.socket()
    hangup.bind(("127.0.0.1", 0))
    hangup.listen(8)
    hangup.settimeout(0.2)  # so that the thread sees ``stop`` (close does not wake accept)
    stop = threading.Event()

    def hang_up() -> None:
        while not stop.is_set():
            try:
                conn, _ = hangup.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.close()

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    tenant = new_tenant(live_server.url)
    try:
        messages = []
        for port in (closed_port, hangup.getsockname()[1]):
            ended, error = ask_once(tenant, {"kind": "webhook",
                                             "url": f"http://127.0.0.1:{port}/hook"})
            assert ended["finish_reason"] == "error" and error is not None, (ended, error)
            messages.append(error["message"])
        assert messages[0] == messages[1], messages
        assert "could not reach the agent" in messages[0]
    finally:
        stop.set()
        thread.join(10)
        hangup.close()

    ended, error = ask_once(tenant, webhook(listener, path="/500"))
    assert ended["finish_reason"] == "error" and error is not None
    assert "500" in error["message"] and INTERNAL not in json.dumps(error), error


# --- secrets at rest -----------------------------------------------------------------------

def test_secrets_are_stored_encrypted_and_never_returned(live_server, listener):
    tenant = new_tenant(live_server.url)
    for agent, name, plaintext in ((webhook(listener), "secret", WEBHOOK_SECRET),
                                   (openai(listener), "api_key", OPENAI_KEY)):
        r = tenant.post("/api/v1/workspaces", {"owner_id": "ann", "name": "T", "agent": agent})
        assert r.status_code == 201, r.text
        ws = r.json()["id"]
        assert r.json()["agent"][f"{name}_set"] is True and plaintext not in r.text
        got = requests.get(f"{live_server.url}/api/v1/workspaces/{ws}", headers=tenant.headers,
                           timeout=10)
        assert got.status_code == 200 and plaintext not in got.text
        row = stored_agent_text(live_server, ws)
        assert plaintext not in row, row
        stored = json.loads(row)[name]
        assert stored.startswith("enc:v1:")
        assert secrets.reveal(stored, {"SECRET_KEY": KEY_B}) == plaintext
        # a PATCH without the secret keeps it, still encrypted
        r = requests.patch(f"{live_server.url}/api/v1/workspaces/{ws}", headers=tenant.headers,
                           json={"agent": {k: v for k, v in agent.items() if k != name}},
                           timeout=10)
        assert r.status_code == 200 and r.json()["agent"][f"{name}_set"] is True
        row = stored_agent_text(live_server, ws)
        assert plaintext not in row
        assert secrets.reveal(json.loads(row)[name], {"SECRET_KEY": KEY_B}) == plaintext


def test_a_secret_stored_under_the_old_key_still_reaches_the_agent(live_server, listener):
    tenant = new_tenant(live_server.url)
    under_a = {"SECRET_KEY": KEY_A}
    for agent, name, plaintext in ((webhook(listener), "secret", WEBHOOK_SECRET),
                                   (openai(listener), "api_key", OPENAI_KEY)):
        ws = tenant.workspace("ann", agent=agent)
        chat = tenant.chat("ann", ws)
        # as a server running with SECRET_KEY=A stored it
        set_stored_agent(live_server, ws, {**agent, name: secrets.seal(plaintext, under_a)})
        before = len(listener.recorded())
        ended, error = _ask_in(tenant, chat)
        assert ended["finish_reason"] == "stop" and error is None, (ended, error)
        seen = last_request(listener, before)
        if name == "secret":
            assert signed_with(seen, WEBHOOK_SECRET)
        else:
            assert seen["headers"]["Authorization"] == f"Bearer {OPENAI_KEY}"


def test_a_legacy_plaintext_secret_works_and_is_encrypted_when_the_workspace_is_saved(
        live_server, listener):
    tenant = new_tenant(live_server.url)
    ws = tenant.workspace("ann", agent=webhook(listener))
    chat = tenant.chat("ann", ws)
    set_stored_agent(live_server, ws, webhook(listener))  # as stored before encryption
    assert WEBHOOK_SECRET in stored_agent_text(live_server, ws)
    before = len(listener.recorded())
    ended, error = _ask_in(tenant, chat)
    assert ended["finish_reason"] == "stop" and error is None, (ended, error)
    assert signed_with(last_request(listener, before), WEBHOOK_SECRET)

    r = requests.patch(f"{live_server.url}/api/v1/workspaces/{ws}", headers=tenant.headers,
                       json={"name": "Renamed"}, timeout=10)
    assert r.status_code == 200, r.text
    row = stored_agent_text(live_server, ws)
    assert WEBHOOK_SECRET not in row and json.loads(row)["secret"].startswith("enc:v1:")
    before = len(listener.recorded())
    ended, error = _ask_in(tenant, chat)
    assert ended["finish_reason"] == "stop" and error is None
    assert signed_with(last_request(listener, before), WEBHOOK_SECRET)


def test_a_secret_no_key_opens_ends_the_reply_with_an_agent_error(live_server, listener):
    tenant = new_tenant(live_server.url)
    unknown = {"SECRET_KEY": "a-key-this-server-never-had"}
    for agent, name in ((webhook(listener), "secret"), (openai(listener), "api_key")):
        ws = tenant.workspace("ann", agent=agent)
        chat = tenant.chat("ann", ws)
        set_stored_agent(live_server, ws, {**agent, name: secrets.seal("lost", unknown)})
        before = len(listener.recorded())
        ended, error = _ask_in(tenant, chat)
        assert ended["finish_reason"] == "error", ended
        assert error is not None and "can't be read" in error["message"], error
        assert listener.recorded()[before:] == []
        got = requests.get(f"{live_server.url}/api/v1/workspaces/{ws}", headers=tenant.headers,
                           timeout=10)
        assert got.status_code == 200 and got.json()["agent"][f"{name}_set"] is True


def _ask_in(tenant, chat: str):
    client = join(tenant, chat)
    try:
        return ask(client, "hello")
    finally:
        client.disconnect()
