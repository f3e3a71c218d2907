"""The one error envelope ``{"error": {"code", "message", "details"}}`` for every failure."""
import json

import pytest
from sqlalchemy import text

from tests.conftest import assert_error, base_config
from tests.kit.servers import ADMIN_TOKEN

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# Requests without a valid key are rate-limited by client address; these tests use their own
# address so that they neither spend nor depend on the budget of 127.0.0.1 shared by the suite.
ANONYMOUS = {"environ_overrides": {"REMOTE_ADDR": "198.51.100.23"}}
LEAKS = ("select", "traceback", "secret", "sqlalchemy", "no_such_table", "runtimeerror",
         'file "', "psycopg2", "sqlite3")


@pytest.fixture
def objects(tenant):
    workspace = tenant.workspace("alice", "Team")
    chat = tenant.chat("alice", workspace_id=workspace["id"])
    return {"workspace_id": workspace["id"], "chat_id": chat["id"]}


# Every route that reads a JSON body: (method, path template).
JSON_ROUTES = [
    pytest.param("post", "/api/v1/workspaces", id="POST workspaces"),
    pytest.param("patch", "/api/v1/workspaces/{workspace_id}", id="PATCH workspace"),
    pytest.param("post", "/api/v1/chats/", id="POST chats"),
    pytest.param("post", "/chat", id="POST /chat"),
    pytest.param("post", "/api/v1/chats/{chat_id}/connection-string", id="POST connection-string"),
    pytest.param("post", "/admin/tenants", id="POST admin tenants"),
]


def _call(tenant, method, path, objects, **kwargs):
    path = path.format(**objects)
    if path.startswith("/admin"):
        headers = {**ADMIN, **kwargs.pop("headers", {})}
        return getattr(tenant.api.client, method)(path, headers=headers, **kwargs)
    return getattr(tenant.api, method)(path, **kwargs)


@pytest.mark.parametrize("content_type", [
    pytest.param("application/json", id="application/json"),
    pytest.param(None, id="no Content-Type"),
    pytest.param("text/plain", id="text/plain"),
])
@pytest.mark.parametrize("method,path", JSON_ROUTES)
@pytest.mark.parametrize("raw", [b"{bad", b'{"name": "x",}', b"\xff\xfe{"],
                         ids=["truncated", "trailing comma", "not utf-8"])
def test_a_body_that_is_not_json_is_400_invalid_json(tenant, objects, method, path,
                                                     content_type, raw):
    headers = {"Content-Type": content_type} if content_type else {}
    r = _call(tenant, method, path, objects, data=raw, headers=headers)
    if content_type is None:
        assert "Content-Type" not in r.request.headers
    assert_error(r, 400, "invalid_json")


@pytest.mark.parametrize("method,path", JSON_ROUTES)
@pytest.mark.parametrize("body", ["[]", '[{"name": "x"}]', '"a string"', "null", "42", "true"])
def test_json_that_is_not_an_object_is_400_validation_error(tenant, objects, method, path, body):
    r = _call(tenant, method, path, objects, data=body,
              headers={"Content-Type": "application/json"})
    assert_error(r, 400, "validation_error")


@pytest.mark.parametrize("path", ["/nope", "/api/v1/nope", "/api/v1/workspaces/a/b/c",
                                  "/api/v2/workspaces", "/admin/nope"])
def test_an_unknown_route_is_404_not_found(tenant, path):
    assert_error(tenant.api.get(path), 404, "not_found")
    assert_error(tenant.api.client.get(path), 404, "not_found")


@pytest.mark.parametrize("method,path", [
    ("put", "/api/v1/chats/{chat_id}"),
    ("patch", "/api/v1/chats/{chat_id}"),
    ("post", "/api/v1/workspaces/{workspace_id}"),
    ("get", "/api/v1/workspaces/{workspace_id}/members/bob"),
    ("delete", "/api/v1/chats/{chat_id}/messages"),
    ("get", "/api/v1/chats/{chat_id}/connection-string"),
    ("get", "/chat"),
    ("delete", "/healthz"),
    ("post", "/readyz"),
    ("get", "/admin/tenants"),
])
def test_a_wrong_method_on_a_known_route_is_405_method_not_allowed(tenant, objects, method, path):
    r = _call(tenant, method, path, objects)
    assert_error(r, 405, "method_not_allowed")
    assert method.upper() not in r.headers.get("Allow", "").split(", ")


@pytest.mark.parametrize("path", ["/api/v1/workspaces", "/api/v1/chats/", "/chat",
                                  "/admin/tenants"])
@pytest.mark.parametrize("valid_json", [True, False], ids=["valid JSON", "not JSON"])
def test_a_body_over_one_megabyte_is_413_payload_too_large(tenant, objects, path, valid_json):
    if valid_json:
        raw = json.dumps({"owner_id": "alice", "user_id": "alice", "name": "x" * (1024 * 1024)})
    else:
        raw = "x" * (1024 * 1024 + 1)
    r = _call(tenant, "post", path, objects, data=raw,
              headers={"Content-Type": "application/json"})
    assert_error(r, 413, "payload_too_large")


def test_a_body_of_exactly_one_megabyte_is_not_refused_as_too_large(tenant, objects):
    raw = json.dumps({"owner_id": "alice", "name": "ok"})
    raw = raw[:-1] + " " * (1024 * 1024 - len(raw)) + "}"
    assert len(raw) == 1024 * 1024
    r = tenant.api.post("/api/v1/workspaces", data=raw,
                        headers={"Content-Type": "application/json"})
    assert r.status_code == 201, r.get_data(as_text=True)


TENANT_ROUTES = [
    ("get", "/api/v1/workspaces/user/alice"),
    ("post", "/api/v1/workspaces"),
    ("get", "/api/v1/workspaces/{workspace_id}"),
    ("get", "/api/v1/chats/{chat_id}/messages"),
    ("post", "/chat"),
]


@pytest.mark.parametrize("method,path", TENANT_ROUTES)
@pytest.mark.parametrize("headers", [{}, {"X-API-Key": ""}], ids=["no header", "empty header"])
def test_a_request_without_an_api_key_is_401_missing_api_key(client, tenant, objects, method,
                                                            path, headers):
    r = getattr(client, method)(path.format(**objects), headers=headers,
                                json={"owner_id": "alice", "name": "x", "user_id": "alice"},
                                **ANONYMOUS)
    assert_error(r, 401, "missing_api_key")


@pytest.mark.parametrize("method,path", TENANT_ROUTES)
def test_a_request_with_a_wrong_api_key_is_401_invalid_api_key(client, tenant, objects,
                                                              method, path):
    for key in ("wc_not-a-real-key", tenant.key + "x", tenant.key[:-1], ADMIN_TOKEN):
        r = getattr(client, method)(path.format(**objects), headers={"X-API-Key": key},
                                    json={"owner_id": "alice", "name": "x", "user_id": "alice"},
                                    **ANONYMOUS)
        assert_error(r, 401, "invalid_api_key")


def test_a_revoked_api_key_is_refused_while_the_other_key_keeps_working(client):
    created = client.post("/admin/tenants", json={"name": "Revokers"}, headers=ADMIN)
    assert created.status_code == 201
    tenant_id, first_key = created.get_json()["id"], created.get_json()["api_key"]
    added = client.post(f"/admin/tenants/{tenant_id}/api-keys", headers=ADMIN)
    assert added.status_code == 201
    key_id, second_key = added.get_json()["id"], added.get_json()["api_key"]

    r = client.get("/api/v1/workspaces/user/alice", headers={"X-API-Key": second_key})
    assert r.status_code == 200

    revoked = client.delete(f"/admin/tenants/{tenant_id}/api-keys/{key_id}", headers=ADMIN)
    assert revoked.status_code == 204

    for method, path in (("get", "/api/v1/workspaces/user/alice"),
                         ("post", "/api/v1/workspaces"), ("post", "/chat")):
        r = getattr(client, method)(path, headers={"X-API-Key": second_key},
                                    json={"owner_id": "alice", "name": "x", "user_id": "alice"},
                                    **ANONYMOUS)
        assert_error(r, 401, "invalid_api_key")
    r = client.get("/api/v1/workspaces/user/alice", headers={"X-API-Key": first_key})
    assert r.status_code == 200


def test_a_validation_error_names_the_fields_in_details(tenant):
    r = tenant.api.post("/api/v1/workspaces", json={"owner_id": "not valid!", "name": ""})
    error = assert_error(r, 400, "validation_error")
    assert set(error["details"]) >= {"owner_id", "name"}
    assert all(isinstance(v, list) and v for v in error["details"].values())


# --- unexpected failures --------------------------------------------------------------------

@pytest.fixture
def crashing_app(database_url):
    """A separate app with routes that fail in ways no handler anticipates."""
    from flask_migrate import upgrade

    from app import create_app
    from app.extensions import db

    application = create_app(base_config(database_url))
    with application.app_context():
        upgrade()

    @application.get("/test-only/boom")
    def boom():
        raise RuntimeError("SELECT secret FROM x")

    @application.get("/test-only/bad-sql")
    def bad_sql():
        db.session.execute(text("SELECT secret FROM no_such_table WHERE password = 'hunter2'"))
        return {}

    @application.post("/test-only/key-error")
    def key_error():
        return {"value": {}["secret"]}

    yield application
    with application.app_context():
        db.session.remove()
        db.engine.dispose()


@pytest.mark.parametrize("method,path", [("get", "/test-only/boom"),
                                         ("get", "/test-only/bad-sql"),
                                         ("post", "/test-only/key-error")])
def test_an_unexpected_exception_is_500_internal_error_without_internals(crashing_app,
                                                                         method, path):
    client = crashing_app.test_client()
    r = getattr(client, method)(path)
    assert_error(r, 500, "internal_error")
    body = r.get_data(as_text=True).lower()
    for leak in LEAKS + ("hunter2", "keyerror", "password"):
        assert leak not in body, (leak, body)
    assert r.get_json()["error"]["details"] == {}
    # The app keeps serving after the failure (the failed transaction was rolled back).
    assert client.get("/readyz").status_code == 200
    assert_error(client.get("/nope"), 404, "not_found")


def test_an_error_response_is_json_with_the_envelope_only(tenant):
    r = tenant.api.get("/api/v1/chats/does-not-exist")
    assert r.is_json
    assert r.mimetype == "application/json"
    assert_error(r, 404, "chat_not_found")


def test_http_errors_go_to_the_one_renderer_not_flask_smorests(app):
    # create_app registers it after api.init_app, replacing the handler flask-smorest binds.
    from werkzeug.exceptions import HTTPException

    from app.errors import handle_http_exception

    assert app.error_handler_spec[None][None][HTTPException] is handle_http_exception


def test_a_string_that_is_not_text_is_refused_with_the_one_text_message(tenant):
    from app.text import TEXT_ERROR

    error = assert_error(tenant.api.post("/api/v1/workspaces", json={
        "owner_id": "alice", "name": "nul\x00byte"}), 400, "validation_error")
    assert error["details"] == {"name": [TEXT_ERROR]}
    for metadata in ({"note": "a\x00b"}, {"a\x00b": 1}, {"deep": [{"x": ["\x00"]}]}):
        error = assert_error(tenant.api.post("/api/v1/chats/", json={
            "user_id": "alice", "metadata": metadata}), 400, "validation_error")
        assert error["details"] == {"metadata": [TEXT_ERROR]}, metadata
    # A backslash, then "u0000", is text: only a real NUL is refused.
    chat = tenant.chat("alice", metadata={"note": "\\u0000"})
    assert chat["metadata"] == {"note": "\\u0000"}
