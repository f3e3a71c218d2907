"""The operators' command line, run as real ``flask --app wsgi ...`` processes."""
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from tests.conftest import base_config

ROOT = Path(__file__).resolve().parent.parent
FLASK = str(Path(sys.executable).parent / "flask")
DEMO_KEY_FILE = ROOT / "instance" / "demo_api_key"


def cli_env(database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLASK_", "PYTEST_"))
           and k not in ("DATABASE_URL", "REDIS_URL", "DEMO", "ADMIN_TOKEN", "APP_ENV")}
    env.update({"DATABASE_URL": database_url, "ASYNC_MODE": "threading",
                "SECRET_KEY": "cli-test-secret"})
    return env


def flask(database_url: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([FLASK, "--app", "wsgi", *args], cwd=ROOT, env=cli_env(database_url),
                            capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result


def output_value(result: subprocess.CompletedProcess, label: str) -> str:
    match = re.search(rf"^{re.escape(label)}:\s*(\S+)", result.stdout, re.MULTILINE)
    assert match, (label, result.stdout)
    return match.group(1)


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    url = "sqlite:///" + str(tmp_path / "cli.db")
    flask(url, "db", "upgrade")
    return url


@pytest.fixture
def app_on():
    """Build an app on a database the CLI has prepared; dispose of it afterwards."""
    from app import create_app
    from app.extensions import db

    built = []

    def build(database_url: str):
        application = create_app(base_config(database_url))
        built.append(application)
        return application

    yield build
    for application in built:
        with application.app_context():
            db.session.remove()
            db.engine.dispose()


def tenant_count(sqlite_url: str) -> int:
    with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as conn:
        return conn.execute("SELECT count(*) FROM tenants").fetchone()[0]


# --- tenants create -------------------------------------------------------------------------

def test_tenants_create_prints_an_api_key_that_works_against_the_same_database(sqlite_url,
                                                                              app_on):
    result = flask(sqlite_url, "tenants", "create", "Initech")
    key = output_value(result, "api key")
    tenant_id = output_value(result, "tenant id")

    client = app_on(sqlite_url).test_client()
    r = client.post("/api/v1/workspaces", json={"owner_id": "alice", "name": "Team"},
                    headers={"X-API-Key": key})
    assert r.status_code == 201, r.get_data(as_text=True)
    r = client.get("/api/v1/workspaces/user/alice", headers={"X-API-Key": key})
    assert r.status_code == 200 and r.get_json()["total"] == 1

    with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as conn:
        assert conn.execute("SELECT name FROM tenants WHERE id = ?",
                            (tenant_id,)).fetchone() == ("Initech",)
        stored = " ".join(str(v) for row in conn.execute("SELECT * FROM api_keys") for v in row)
    assert key not in stored  # shown once, stored only as a hash


def test_tenants_create_twice_makes_two_tenants_with_different_keys(sqlite_url):
    first = flask(sqlite_url, "tenants", "create", "Same")
    second = flask(sqlite_url, "tenants", "create", "Same")
    assert output_value(first, "api key") != output_value(second, "api key")
    assert output_value(first, "tenant id") != output_value(second, "tenant id")
    assert tenant_count(sqlite_url) == 2


@pytest.mark.parametrize("name", ["", "   ", "x" * 101], ids=["empty", "blank", "101 chars"])
def test_tenants_create_with_an_invalid_name_fails_and_creates_nothing(sqlite_url, name):
    result = flask(sqlite_url, "tenants", "create", name, check=False)
    assert result.returncode != 0, result.stdout
    assert "api key" not in result.stdout
    assert tenant_count(sqlite_url) == 0


def test_tenants_create_without_a_name_fails(sqlite_url):
    result = flask(sqlite_url, "tenants", "create", check=False)
    assert result.returncode != 0
    assert tenant_count(sqlite_url) == 0


# --- demo setup -----------------------------------------------------------------------------

@pytest.fixture
def preserved_demo_key_file():
    """`demo setup` keeps the demo key in instance/; leave the developer's copy as it was."""
    saved = DEMO_KEY_FILE.read_bytes() if DEMO_KEY_FILE.exists() else None
    yield
    if saved is None:
        DEMO_KEY_FILE.unlink(missing_ok=True)
    else:
        DEMO_KEY_FILE.write_bytes(saved)


def test_demo_setup_is_idempotent_and_makes_an_echo_workspace(sqlite_url, app_on,
                                                              preserved_demo_key_file):
    first = flask(sqlite_url, "demo", "setup")
    second = flask(sqlite_url, "demo", "setup")

    key = output_value(first, "demo api key")
    assert output_value(second, "demo api key") == key
    workspace_id = output_value(first, "demo workspace")
    assert output_value(second, "demo workspace") == workspace_id
    assert output_value(second, "demo tenant") == output_value(first, "demo tenant")
    assert tenant_count(sqlite_url) == 1

    client = app_on(sqlite_url).test_client()
    r = client.get(f"/api/v1/workspaces/{workspace_id}", headers={"X-API-Key": key})
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json()["agent"]["kind"] == "echo"
    owner = r.get_json()["owner_id"]
    page = client.get(f"/api/v1/workspaces/user/{owner}", headers={"X-API-Key": key}).get_json()
    assert [w["id"] for w in page["workspaces"]] == [workspace_id]  # not one per run


def test_demo_setup_after_tenants_create_leaves_the_other_tenant_alone(sqlite_url, app_on,
                                                                       preserved_demo_key_file):
    other_key = output_value(flask(sqlite_url, "tenants", "create", "Initech"), "api key")
    demo_key = output_value(flask(sqlite_url, "demo", "setup"), "demo api key")
    assert demo_key != other_key

    client = app_on(sqlite_url).test_client()
    ws_id = output_value(flask(sqlite_url, "demo", "setup"), "demo workspace")
    r = client.get(f"/api/v1/workspaces/{ws_id}", headers={"X-API-Key": other_key})
    assert r.status_code == 404
    assert tenant_count(sqlite_url) == 2


# --- migrations -----------------------------------------------------------------------------

@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database_url(request, tmp_path, pg_database_factory) -> str:
    if request.param == "sqlite":
        return "sqlite:///" + str(tmp_path / "migrations.db")
    return pg_database_factory()


def model_tables() -> set[str]:
    import app.models  # noqa: F401  (registers the tables)
    from app.extensions import db

    return set(db.metadata.tables)


def database_tables(database_url: str) -> set[str]:
    engine = create_engine(database_url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_migrations_upgrade_downgrade_to_base_and_upgrade_again(empty_database_url):
    expected = model_tables() | {"alembic_version"}

    flask(empty_database_url, "db", "upgrade")
    assert database_tables(empty_database_url) == expected

    flask(empty_database_url, "db", "downgrade", "base")
    assert database_tables(empty_database_url) <= {"alembic_version"}

    flask(empty_database_url, "db", "upgrade")
    assert database_tables(empty_database_url) == expected
    current = flask(empty_database_url, "db", "current")
    assert "(head)" in current.stdout + current.stderr


def test_migrations_match_the_models(empty_database_url):
    flask(empty_database_url, "db", "upgrade")
    result = flask(empty_database_url, "db", "check", check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "No new upgrade operations detected" in output


def test_a_migrated_database_serves_a_tenant_created_on_the_command_line(empty_database_url,
                                                                         app_on):
    flask(empty_database_url, "db", "upgrade")
    key = output_value(flask(empty_database_url, "tenants", "create", "Both"), "api key")
    client = app_on(empty_database_url).test_client()
    chat = client.post("/api/v1/chats/", json={"user_id": "alice"}, headers={"X-API-Key": key})
    assert chat.status_code == 201, chat.get_data(as_text=True)
