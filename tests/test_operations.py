"""Operations: REST rate limits and their headers, health, readiness, metrics and API docs."""
import re
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import assert_error, base_config
from tests.kit.servers import REDIS_TEST_URL, service_missing

RATE_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")
# Requests without a valid key are limited by client address: use an address of our own.
ANONYMOUS = {"environ_overrides": {"REMOTE_ADDR": "198.51.100.42"}}


@pytest.fixture
def app_config(app):
    """Change the shared app's configuration for one test; restored afterwards."""
    saved = {}

    def set_(name, value):
        saved.setdefault(name, app.config.get(name))
        app.config[name] = value

    try:
        yield set_
    finally:
        app.config.update(saved)


def rate_headers(response) -> tuple[int, int, int]:
    for name in RATE_HEADERS:
        assert name in response.headers, (name, response.status_code, dict(response.headers))
    return tuple(int(response.headers[name]) for name in RATE_HEADERS)


# --- rate limiting --------------------------------------------------------------------------

def test_the_rest_limit_is_shared_by_all_routes_of_a_tenant_and_answers_429(
        tenant, other_tenant, app_config):
    app_config("RATE_LIMIT_REST", "5/minute")
    api = tenant.api

    ws = api.post("/api/v1/workspaces", json={"owner_id": "alice", "name": "Team"})
    responses = [
        ws,
        api.get(f"/api/v1/workspaces/{ws.get_json()['id']}"),
        api.get("/api/v1/workspaces/user/alice"),
        api.post("/chat", json={"user_id": "alice", "workspace_id": ws.get_json()["id"]}),
        api.get("/api/v1/chats/user/alice"),
    ]
    assert [r.status_code for r in responses] == [201, 200, 200, 201, 200]
    assert [rate_headers(r)[:2] for r in responses] == [(5, 4), (5, 3), (5, 2), (5, 1), (5, 0)]

    chat_id = responses[3].get_json()["id"]
    refused = api.get(f"/api/v1/chats/{chat_id}")

    error = assert_error(refused, 429, "rate_limited")
    retry_after = int(refused.headers["Retry-After"])
    assert 0 < retry_after <= 60
    assert error["details"], "a 429 says which limit was exceeded"
    assert abs(error["details"]["retry_after"] - retry_after) <= 1  # read a moment apart
    limit, remaining, reset = rate_headers(refused)
    assert (limit, remaining) == (5, 0)
    assert reset >= int(time.time()) - 1
    # Every route is refused now, not only the one that hit the limit.
    assert_error(api.post("/api/v1/chats/", json={"user_id": "alice"}), 429, "rate_limited")
    assert_error(api.get(f"/api/v1/workspaces/{ws.get_json()['id']}"), 429, "rate_limited")

    # Another tenant has a counter of its own.
    theirs = other_tenant.api.get("/api/v1/workspaces/user/alice")
    assert theirs.status_code == 200
    assert rate_headers(theirs)[:2] == (5, 4)


def test_the_rest_limit_is_read_from_the_configuration_on_every_request(tenant, app_config):
    app_config("RATE_LIMIT_REST", "3/minute")
    assert rate_headers(tenant.api.get("/api/v1/workspaces/user/alice"))[0] == 3
    app_config("RATE_LIMIT_REST", "7/minute")
    assert rate_headers(tenant.api.get("/api/v1/workspaces/user/alice"))[0] == 7


@pytest.fixture
def objects(tenant):
    ws = tenant.workspace("alice", "Team")
    chat = tenant.chat("alice", workspace_id=ws["id"])
    return {"workspace_id": ws["id"], "chat_id": chat["id"]}


def test_every_rest_response_carries_the_rate_limit_headers_including_errors(
        app, client, tenant, objects):
    configured = int(app.config["RATE_LIMIT_REST"].split("/")[0])
    api = tenant.api
    big = "x" * (1024 * 1024 + 1)
    responses = {
        "201 workspace": api.post("/api/v1/workspaces", json={"owner_id": "bob", "name": "B"}),
        "200 workspace": api.get(f"/api/v1/workspaces/{objects['workspace_id']}"),
        "200 patch": api.patch(f"/api/v1/workspaces/{objects['workspace_id']}",
                               json={"name": "Renamed"}),
        "204 member": api.put(f"/api/v1/workspaces/{objects['workspace_id']}/members/bob"),
        "201 /chat": api.post("/chat", json={"user_id": "alice"}),
        "200 messages": api.get(f"/api/v1/chats/{objects['chat_id']}/messages"),
        "200 connection-string": api.post(
            f"/api/v1/chats/{objects['chat_id']}/connection-string", json={"user_id": "alice"}),
        "400 validation_error": api.post("/api/v1/workspaces", json={"name": ""}),
        "400 invalid_json": api.post("/api/v1/chats/", data="{",
                                     headers={"Content-Type": "application/json"}),
        "403 forbidden": api.post(f"/api/v1/chats/{objects['chat_id']}/connection-string",
                                  json={"user_id": "stranger"}),
        "404 chat_not_found": api.get("/api/v1/chats/nope"),
        "404 workspace_not_found": api.get("/api/v1/workspaces/nope"),
        "413 payload_too_large": api.post("/api/v1/workspaces", data=big,
                                          headers={"Content-Type": "application/json"}),
        "204 delete chat": api.delete(f"/api/v1/chats/{objects['chat_id']}"),
    }
    remaining = []
    for what, r in responses.items():
        assert str(r.status_code) == what.split()[0], (what, r.get_data(as_text=True))
        limit, left, reset = rate_headers(r)
        assert limit == configured, what
        assert reset >= int(time.time()) - 1, what
        remaining.append(left)
    # One tenant counter, counting down with every request, errors included.
    assert remaining == sorted(remaining, reverse=True)
    assert len(set(remaining)) == len(remaining)

    for what, r in {
        "401 missing_api_key": client.get("/api/v1/workspaces/user/alice", **ANONYMOUS),
        "401 invalid_api_key": client.get("/api/v1/workspaces/user/alice",
                                          headers={"X-API-Key": "wc_wrong"}, **ANONYMOUS),
    }.items():
        assert_error(r, 401, what.split()[1])
        rate_headers(r)


@pytest.mark.parametrize("method,path", [
    pytest.param("put", "/api/v1/chats/{chat_id}", id="405 on a REST route"),
    pytest.param("get", "/api/v1/no-such-resource", id="404 under /api/v1"),
])
def test_routing_errors_are_not_counted_against_the_rate_limit(tenant, objects, method, path):
    # A request that matches no route never reaches a rate-limited endpoint (documented in
    # docs/api.md): it is answered in the error envelope and does not use up the budget.
    before = tenant.api.get(f"/api/v1/chats/{objects['chat_id']}")
    r = getattr(tenant.api, method)(path.format(**objects))
    assert r.status_code in (404, 405)
    after = tenant.api.get(f"/api/v1/chats/{objects['chat_id']}")
    used = int(before.headers["X-RateLimit-Remaining"]) - int(after.headers["X-RateLimit-Remaining"])
    assert used == 1


# --- health and readiness -------------------------------------------------------------------

def test_healthz_answers_200_without_an_api_key(client):
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.get_json() == {"status": "ok"}


def test_readyz_answers_200_when_the_database_is_reachable(client):
    r = client.get("/readyz")
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json()["checks"]["database"] == "ok"
    assert r.get_json()["status"] == "ok"


@pytest.fixture
def app_with_unreachable_database():
    from app import create_app
    from app.extensions import db

    application = create_app(base_config("postgresql://postgres:hunter2@127.0.0.1:1/x"))
    yield application
    with application.app_context():
        db.session.remove()
        db.engine.dispose()


def test_readyz_answers_503_when_the_database_is_unreachable(app_with_unreachable_database):
    client = app_with_unreachable_database.test_client()
    r = client.get("/readyz")
    assert r.status_code == 503
    assert r.get_json()["checks"]["database"] != "ok"
    body = r.get_data(as_text=True)
    for leak in ("hunter2", "postgresql://", "127.0.0.1", "Traceback", "psycopg2"):
        assert leak not in body
    # Alive all the same.
    assert client.get("/healthz").status_code == 200


def test_readyz_answers_503_when_the_configured_redis_is_unreachable(client, app_config):
    app_config("REDIS_URL", "redis://:hunter2@127.0.0.1:1/0")
    r = client.get("/readyz")
    assert r.status_code == 503
    checks = r.get_json()["checks"]
    assert checks["database"] == "ok" and checks["redis"] != "ok"
    assert "hunter2" not in r.get_data(as_text=True)
    assert "127.0.0.1" not in r.get_data(as_text=True)


def test_readyz_checks_redis_when_it_is_configured_and_reachable(client, app_config):
    import redis

    try:
        redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        service_missing("Redis", exc)
    app_config("REDIS_URL", REDIS_TEST_URL)
    r = client.get("/readyz")
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json()["checks"] == {"database": "ok", "redis": "ok"}


# --- metrics --------------------------------------------------------------------------------

def test_metrics_is_prometheus_text_counting_http_requests(client, tenant):
    client.get("/healthz")
    tenant.api.get("/api/v1/chats/nope")

    r = client.get("/metrics")

    assert r.status_code == 200
    assert r.mimetype == "text/plain"
    families = {f.name: f for f in text_string_to_metric_families(r.get_data(as_text=True))}
    assert "workspace_chat_http_requests" in families
    samples = [s for s in families["workspace_chat_http_requests"].samples
               if s.name == "workspace_chat_http_requests_total"]
    by_labels = {(s.labels["method"], s.labels["route"], s.labels["status"]): s.value
                 for s in samples}
    assert by_labels[("GET", "/healthz", "200")] >= 1
    assert by_labels[("GET", "/api/v1/chats/<chat_id>", "404")] >= 1


def test_metrics_content_type_is_a_well_formed_prometheus_text_type(client):
    content_type = client.get("/metrics").headers["Content-Type"]
    parameters = [p.strip().split("=", 1)[0].lower() for p in content_type.split(";")[1:]]
    assert content_type.split(";")[0].strip() == "text/plain"
    assert "version" in parameters
    assert len(parameters) == len(set(parameters)), f"duplicate parameter in {content_type!r}"


# --- OpenAPI and docs -----------------------------------------------------------------------

# The contract's operations; path parameter names do not matter, hence the {} placeholders.
CONTRACT_OPERATIONS = {
    ("post", "/api/v1/workspaces"),
    ("get", "/api/v1/workspaces/user/{}"),
    ("get", "/api/v1/workspaces/{}"),
    ("patch", "/api/v1/workspaces/{}"),
    ("delete", "/api/v1/workspaces/{}"),
    ("put", "/api/v1/workspaces/{}/members/{}"),
    ("delete", "/api/v1/workspaces/{}/members/{}"),
    ("post", "/api/v1/chats/"),
    ("post", "/chat"),
    ("get", "/api/v1/chats/user/{}"),
    ("get", "/api/v1/chats/{}"),
    ("get", "/api/v1/chats/{}/messages"),
    ("delete", "/api/v1/chats/{}"),
    ("post", "/api/v1/chats/{}/connection-string"),
    ("post", "/admin/tenants"),
    ("post", "/admin/tenants/{}/api-keys"),
    ("delete", "/admin/tenants/{}/api-keys/{}"),
}
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def _resolve(spec: dict, ref: str) -> dict:
    assert ref.startswith("#/"), ref
    node = spec
    for part in ref[2:].split("/"):
        assert part in node, f"unresolvable $ref {ref}"
        node = node[part]
    return node


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


@pytest.fixture
def spec(client) -> dict:
    r = client.get("/openapi.json")
    assert r.status_code == 200
    assert r.is_json
    return r.get_json()


def test_openapi_json_is_a_well_formed_openapi_3_document(spec):
    assert re.fullmatch(r"3\.\d+\.\d+", spec["openapi"])
    assert spec["info"]["title"] and spec["info"]["version"]
    assert spec["paths"]
    for path, item in spec["paths"].items():
        assert path.startswith("/"), path
        operations = {m: op for m, op in item.items() if m in HTTP_METHODS}
        assert operations, path
        for method, op in operations.items():
            assert op.get("responses"), (method, path)
            declared = {p["name"] for p in item.get("parameters", []) + op.get("parameters", [])
                        if "$ref" not in p and p.get("in") == "path" and p.get("required")}
            assert set(re.findall(r"{(\w+)}", path)) <= declared, (method, path, declared)
    for ref in set(_refs(spec)):
        _resolve(spec, ref)


def test_openapi_json_lists_every_operation_of_the_contract(spec):
    listed = {(method, re.sub(r"{\w+}", "{}", path))
              for path, item in spec["paths"].items() for method in item if method in HTTP_METHODS}
    assert CONTRACT_OPERATIONS <= listed, CONTRACT_OPERATIONS - listed
    for path in ("/api/v1/workspaces", "/api/v1/workspaces/user/{user_id}",
                 "/api/v1/workspaces/{workspace_id}",
                 "/api/v1/workspaces/{workspace_id}/members/{user_id}", "/api/v1/chats/",
                 "/chat", "/api/v1/chats/user/{user_id}", "/api/v1/chats/{chat_id}",
                 "/api/v1/chats/{chat_id}/messages", "/api/v1/chats/{chat_id}/connection-string",
                 "/admin/tenants"):
        assert path in spec["paths"], path


def test_openapi_json_declares_the_x_api_key_scheme_on_the_tenant_routes(spec):
    schemes = spec["components"]["securitySchemes"]
    api_key_schemes = {name for name, s in schemes.items()
                       if s.get("type") == "apiKey" and s.get("in") == "header"
                       and s.get("name") == "X-API-Key"}
    assert api_key_schemes, schemes
    for path, item in spec["paths"].items():
        if not path.startswith(("/api/v1/", "/chat")):
            continue
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            security = op.get("security", spec.get("security", []))
            assert any(set(requirement) & api_key_schemes for requirement in security), \
                (method, path, security)


def test_docs_serves_an_html_page_for_the_openapi_document(client):
    r = client.get("/docs")
    assert r.status_code == 200
    assert r.mimetype == "text/html"
    page = r.get_data(as_text=True)
    assert "<html" in page.lower()
    assert "openapi.json" in page


def test_the_database_pool_keeps_its_connections_open_and_follows_the_configuration(
        app, tmp_path):
    # Past pool_size SQLAlchemy opens a connection for each checkout and closes it on return;
    # under eventlet many messages are in flight at once (bench/RESULTS.md).
    from app import create_app
    from app.extensions import db
    from tests.conftest import base_config

    with app.app_context():
        assert (db.engine.pool.size(), db.engine.pool._max_overflow) == (20, 0)
    other = create_app(base_config("sqlite:///" + str(tmp_path / "pool.db"),
                                   DATABASE_POOL_SIZE=7, DATABASE_MAX_OVERFLOW=3))
    with other.app_context():
        assert (db.engine.pool.size(), db.engine.pool._max_overflow) == (7, 3)
        db.engine.dispose()
