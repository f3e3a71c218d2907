"""Layered fixtures: backend -> app -> client -> tenant -> factories, and live_server.

Every test that uses ``app`` runs twice: on a SQLite file and on a PostgreSQL database that
the suite creates and drops. With REQUIRE_SERVICES=1 (CI) a missing service fails the run.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

# REDIS_TEST_URL for tests/test_state.py, which imports it from here
from tests.kit.clients import Clients
from tests.kit.servers import (ADMIN_TOKEN, REDIS_TEST_URL, service_missing,  # noqa: F401
                               start_server, stop_server)

PG_ADMIN_DSN = os.environ.get("TEST_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")

# Fuzzing (hypothesis): no per-example deadline (a real server on a shared machine is noisy),
# no example database in the repo, and under CI a fixed seed so a red run can be replayed.
from hypothesis import HealthCheck, settings as hypothesis_settings  # noqa: E402

hypothesis_settings.register_profile(
    "suite", deadline=None, database=None, derandomize=os.environ.get("CI") == "true",
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
hypothesis_settings.load_profile("suite")


# --- databases -----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def pg_database_factory():
    """Creates PostgreSQL databases for the session and drops them at its end."""
    import psycopg2

    created: list[str] = []

    def admin():
        conn = psycopg2.connect(PG_ADMIN_DSN, connect_timeout=5)
        conn.autocommit = True
        return conn

    def create() -> str:
        name = f"wc_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        try:
            conn = admin()
        except psycopg2.OperationalError as exc:
            service_missing("PostgreSQL", exc)
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        created.append(name)
        base = PG_ADMIN_DSN.rsplit("/", 1)[0]
        return f"{base}/{name}"

    yield create

    if created:
        conn = admin()
        with conn.cursor() as cur:
            for name in created:
                cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
                cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.close()


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database_url(request, tmp_path_factory, pg_database_factory) -> str:
    """A fresh, empty database of each backend."""
    if request.param == "sqlite":
        return "sqlite:///" + str(tmp_path_factory.mktemp("sqlite") / "test.db")
    return pg_database_factory()


def base_config(database_url: str, **overrides: Any) -> dict[str, Any]:
    """The configuration every test app shares; tests override by passing a mapping."""
    config = {
        "DATABASE_URL": database_url,
        "ASYNC_MODE": "threading",
        "SECRET_KEY": "test-secret-key",
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "TESTING": True,
        "REDIS_URL": None,
        "RATELIMIT_STORAGE_URI": "memory://",
        # every test client is 127.0.0.1 and the session's apps share the limiter: the wrong
        # credentials that tests send must not add up (tests/test_hardening.py sets 20/minute)
        "RATE_LIMIT_AUTH_FAILURES": "1000000/minute",
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="session")
def app(database_url):
    """The app on each backend, its schema built by the migrations (not create_all)."""
    from flask_migrate import upgrade

    from app import create_app

    application = create_app(base_config(database_url))
    with application.app_context():
        upgrade()
    yield application
    with application.app_context():
        from app.extensions import db

        db.session.remove()
        db.engine.dispose()


@pytest.fixture
def client(app):
    with app.app_context():
        yield app.test_client()


# --- tenants and domain factories ----------------------------------------------------------

class ApiClient:
    """The Flask test client with a tenant's API key on every request."""

    def __init__(self, client, key: str):
        self.client = client
        self.key = key

    def _headers(self, kwargs: dict) -> dict:
        headers = dict(kwargs.pop("headers", None) or {})
        headers.setdefault("X-API-Key", self.key)
        return headers

    def __getattr__(self, method: str):
        if method not in ("get", "post", "put", "patch", "delete", "head", "options"):
            raise AttributeError(method)

        def call(path: str, **kwargs):
            return getattr(self.client, method)(path, headers=self._headers(kwargs), **kwargs)

        return call


@dataclass
class TenantFixture:
    id: str
    name: str
    key: str
    api: ApiClient

    def workspace(self, owner_id: str = "alice", name: str = "Team", **body) -> dict:
        r = self.api.post("/api/v1/workspaces", json={"owner_id": owner_id, "name": name, **body})
        assert r.status_code == 201, r.get_json()
        return r.get_json()

    def chat(self, user_id: str = "alice", workspace_id: str | None = None, **body) -> dict:
        payload = {"user_id": user_id, **body}
        if workspace_id:
            payload["workspace_id"] = workspace_id
        r = self.api.post("/api/v1/chats/", json=payload)
        assert r.status_code == 201, r.get_json()
        return r.get_json()

    def messages(self, chat_id: str, count: int, user_id: str = "alice") -> list[str]:
        """Store ``count`` messages directly (the socket path is not under test here)."""
        from app.extensions import db
        from app.models import Message
        from app.users import get_or_create_user

        user = get_or_create_user(self.id, user_id)
        rows = [Message(chat_id=chat_id, role="user", user_id=user.id, content=f"message {i}",
                        client_message_id=f"c{i}") for i in range(count)]
        db.session.add_all(rows)
        db.session.commit()
        return [str(row.id) for row in rows]


def _make_tenant(client, name: str) -> TenantFixture:
    from app.auth import create_tenant

    tenant, key = create_tenant(name)
    return TenantFixture(tenant.id, tenant.name, key, ApiClient(client, key))


@pytest.fixture
def tenant(client) -> TenantFixture:
    return _make_tenant(client, "Acme")


@pytest.fixture
def other_tenant(client) -> TenantFixture:
    return _make_tenant(client, "Globex")


def assert_error(response, status: int, code: str) -> dict:
    """Assert the contract's error envelope; return its body."""
    assert response.status_code == status, (response.status_code, response.get_data(as_text=True))
    body = response.get_json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["details"], dict)
    return body["error"]


# --- the real server process and its clients -----------------------------------------------

@pytest.fixture(scope="module")
def live_server(request, tmp_path_factory):
    """The real server process (Procfile web: line, SQLite), started once per module.

    A module may set ``SERVER_ENV = {...}`` to add environment variables.
    """
    server = start_server(tmp_path_factory.mktemp("live"), **getattr(request.module,
                                                                     "SERVER_ENV", {}))
    yield server
    stop_server(server.process)


@pytest.fixture(scope="module", params=["eventlet", "gevent"])
def rt_server(request, tmp_path_factory):
    """The real server under each async mode (``ASYNC_MODE``), once per module and mode.

    A module may set ``SERVER_ENV = {...}`` to add environment variables.
    """
    env = {"ASYNC_MODE": request.param, **getattr(request.module, "SERVER_ENV", {})}
    server = start_server(tmp_path_factory.mktemp(f"rt-{request.param}"), **env)
    yield server
    stop_server(server.process)


@pytest.fixture
def clients(request) -> Clients:
    """The socket clients a test opens (``clients.open``, ``.try_connect``, ``.plain``),
    all closed at its end. A module may set ``CLIENT_TIMEOUT`` (seconds; 10 by default) to
    bound their waits."""
    opened = Clients(getattr(request.module, "CLIENT_TIMEOUT", 10))
    yield opened
    opened.close_all()
