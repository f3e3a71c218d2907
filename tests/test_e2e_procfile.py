"""End to end: the server started from the Procfile's web: line, driven over real HTTP."""
import subprocess

import pytest
import requests

from tests.kit.servers import ADMIN_TOKEN, procfile_command

pytestmark = pytest.mark.e2e


def test_procfile_web_line_uses_gunicorn_eventlet_worker_on_port():
    web = procfile_command("web")
    assert web.startswith("gunicorn ") and "wsgi:app" in web
    from pathlib import Path

    conf = (Path(__file__).resolve().parent.parent / "gunicorn.conf.py").read_text()
    assert "PORT" in conf and '"eventlet"' in conf


def test_release_line_migrates_the_database(live_server):
    tables = subprocess.run(
        ["sqlite3", live_server.env["DATABASE_URL"].removeprefix("sqlite:///"), ".tables"],
        capture_output=True, text=True)
    if tables.returncode == 0:  # the sqlite3 shell is optional on a machine
        assert "messages" in tables.stdout and "alembic_version" in tables.stdout


def test_server_answers_health_and_readiness_on_the_given_port(live_server):
    assert requests.get(live_server.url + "/healthz", timeout=5).json() == {"status": "ok"}
    ready = requests.get(live_server.url + "/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"


def test_whole_rest_flow_over_http(live_server):
    url = live_server.url
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    created = requests.post(url + "/admin/tenants", json={"name": "E2E"}, headers=admin, timeout=5)
    assert created.status_code == 201
    key = {"X-API-Key": created.json()["api_key"]}

    ws = requests.post(url + "/api/v1/workspaces", json={"owner_id": "ann", "name": "Team",
                                                         "agent": {"kind": "echo"}},
                       headers=key, timeout=5)
    assert ws.status_code == 201 and ws.json()["agent"] == {"kind": "echo"}
    assert "X-RateLimit-Remaining" in ws.headers

    chat = requests.post(url + "/chat", json={"user_id": "ann", "workspace_id": ws.json()["id"],
                                              "title": "Hello"}, headers=key, timeout=5)
    assert chat.status_code == 201
    chat_id = chat.json()["id"]
    assert requests.put(f"{url}/api/v1/workspaces/{ws.json()['id']}/members/bob",
                        headers=key, timeout=5).status_code == 204
    cs = requests.post(f"{url}/api/v1/chats/{chat_id}/connection-string",
                       json={"user_id": "bob"}, headers=key, timeout=5)
    assert cs.status_code == 200 and cs.json()["chat_id"] == chat_id

    history = requests.get(f"{url}/api/v1/chats/{chat_id}/messages", headers=key, timeout=5)
    assert history.json() == {"messages": [], "total": 0, "offset": 0, "limit": 50,
                              "has_more": False}
    chats = requests.get(url + "/api/v1/chats/user/ann", headers=key, timeout=5).json()
    assert [c["id"] for c in chats["chats"]] == [chat_id]

    bad = requests.post(url + "/api/v1/chats/", data="{not json", headers=key, timeout=5)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    missing = requests.get(url + "/api/v1/chats/nope", headers=key, timeout=5)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "chat_not_found"
    unknown = requests.get(url + "/no/such/route", timeout=5)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"

    assert requests.delete(f"{url}/api/v1/chats/{chat_id}", headers=key,
                           timeout=5).status_code == 204
    assert requests.get(f"{url}/api/v1/chats/{chat_id}", headers=key,
                        timeout=5).status_code == 404
    spec = requests.get(url + "/openapi.json", timeout=5).json()
    assert "/api/v1/chats/{chat_id}/messages" in spec["paths"]
    metrics = requests.get(url + "/metrics", timeout=5).text
    assert "workspace_chat_http_requests_total" in metrics


def test_server_log_shows_no_traceback_after_the_flow(live_server):
    log = live_server.log()
    assert "Traceback" not in log, log


def test_a_start_prints_no_deprecation_banner(live_server):
    # eventlet is the documented choice (docs/operations.md); its notices would greet every
    # operator at every start, eventlet's own and gunicorn's eventlet worker's
    log = live_server.log()
    assert "Booting worker" in log
    assert "DEPRECATED" not in log and "deprecated" not in log.lower(), log
