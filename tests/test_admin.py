"""The admin API behind ADMIN_TOKEN: tenants and their API keys."""
import pytest
from sqlalchemy import inspect, select

from tests.conftest import assert_error, base_config
from tests.kit.servers import ADMIN_TOKEN

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def create_tenant(client, name="Initech") -> dict:
    r = client.post("/admin/tenants", json={"name": name}, headers=ADMIN)
    assert r.status_code == 201, r.get_data(as_text=True)
    return r.get_json()


def add_key(client, tenant_id: str) -> dict:
    r = client.post(f"/admin/tenants/{tenant_id}/api-keys", headers=ADMIN)
    assert r.status_code == 201, r.get_data(as_text=True)
    return r.get_json()


def key_works(client, key: str) -> bool:
    r = client.get("/api/v1/workspaces/user/alice", headers={"X-API-Key": key})
    assert r.status_code in (200, 401), r.get_data(as_text=True)
    if r.status_code == 401:
        assert_error(r, 401, "invalid_api_key")
    return r.status_code == 200


ADMIN_ROUTES = [
    pytest.param("post", "/admin/tenants", {"name": "X"}, id="POST tenants"),
    pytest.param("post", "/admin/tenants/{tenant_id}/api-keys", None, id="POST api-keys"),
    pytest.param("delete", "/admin/tenants/{tenant_id}/api-keys/{key_id}", None,
                 id="DELETE api-key"),
]


# --- disabled without ADMIN_TOKEN -----------------------------------------------------------

@pytest.fixture(params=[None, ""], ids=["ADMIN_TOKEN unset", "ADMIN_TOKEN empty"])
def app_without_admin(request, database_url):
    from flask_migrate import upgrade

    from app import create_app
    from app.extensions import db

    application = create_app(base_config(database_url, ADMIN_TOKEN=request.param))
    with application.app_context():
        upgrade()
    yield application
    with application.app_context():
        db.session.remove()
        db.engine.dispose()


@pytest.mark.parametrize("method,path,body", ADMIN_ROUTES)
@pytest.mark.parametrize("headers", [{}, ADMIN, {"Authorization": "Bearer "},
                                     {"Authorization": "Bearer None"}],
                         ids=["no bearer", "the usual token", "empty bearer", "'None'"])
def test_without_admin_token_configured_the_admin_api_answers_404(app_without_admin, method,
                                                                  path, body, headers):
    client = app_without_admin.test_client()
    url = path.format(tenant_id="t" * 32, key_id="k" * 32)
    kwargs = {"json": body} if body is not None else {}
    assert_error(getattr(client, method)(url, headers=headers, **kwargs), 404, "not_found")


def test_without_admin_token_configured_no_tenant_is_created(app_without_admin):
    from app.extensions import db
    from app.models import Tenant

    with app_without_admin.app_context():
        before = db.session.execute(select(Tenant.id)).scalars().all()
    client = app_without_admin.test_client()
    client.post("/admin/tenants", json={"name": "Sneaky"}, headers=ADMIN)
    with app_without_admin.app_context():
        assert db.session.execute(select(Tenant.id)).scalars().all() == before
        db.session.remove()


# --- authentication -------------------------------------------------------------------------

@pytest.fixture
def existing(client):
    tenant = create_tenant(client, "Existing")
    key = add_key(client, tenant["id"])
    return {"tenant_id": tenant["id"], "key_id": key["id"]}


@pytest.mark.parametrize("method,path,body", ADMIN_ROUTES)
@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": ""},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer    "},
    {"Authorization": f"Basic {ADMIN_TOKEN}"},
    {"Authorization": ADMIN_TOKEN},
    {"X-API-Key": ADMIN_TOKEN},
], ids=["none", "empty", "scheme only", "blank token", "Basic scheme", "no scheme",
        "token as X-API-Key"])
def test_admin_api_without_a_bearer_token_is_401_missing_api_key(client, existing, method, path,
                                                                 body, headers):
    kwargs = {"json": body} if body is not None else {}
    r = getattr(client, method)(path.format(**existing), headers=headers, **kwargs)
    assert_error(r, 401, "missing_api_key")
    assert key_count(client, existing["tenant_id"]) == 2  # nothing was added or revoked


@pytest.mark.parametrize("method,path,body", ADMIN_ROUTES)
@pytest.mark.parametrize("token", [ADMIN_TOKEN + "x", ADMIN_TOKEN[:-1], ADMIN_TOKEN.upper(),
                                   "wc_some-tenant-key"])
def test_admin_api_with_a_wrong_token_is_401_invalid_api_key(client, existing, method, path,
                                                             body, token):
    kwargs = {"json": body} if body is not None else {}
    r = getattr(client, method)(path.format(**existing),
                                headers={"Authorization": f"Bearer {token}"}, **kwargs)
    assert_error(r, 401, "invalid_api_key")
    assert key_count(client, existing["tenant_id"]) == 2


def test_a_tenant_api_key_is_not_an_admin_token(client, tenant):
    r = client.post("/admin/tenants", json={"name": "X"},
                    headers={"Authorization": f"Bearer {tenant.key}"})
    assert_error(r, 401, "invalid_api_key")


def test_the_bearer_scheme_is_case_insensitive(client):
    r = client.post("/admin/tenants", json={"name": "Lower"},
                    headers={"Authorization": f"bearer {ADMIN_TOKEN}"})
    assert r.status_code == 201


def key_count(client, tenant_id: str) -> int:
    from app.extensions import db
    from app.models import ApiKey

    db.session.expire_all()
    return len(db.session.execute(
        select(ApiKey).where(ApiKey.tenant_id == tenant_id, ApiKey.revoked_at.is_(None))
    ).scalars().all())


# --- tenants --------------------------------------------------------------------------------

def test_creating_a_tenant_returns_its_id_name_and_a_working_api_key(client):
    body = create_tenant(client, "Initech")
    assert set(body) == {"id", "name", "api_key", "api_key_id"}
    assert body["name"] == "Initech"
    assert isinstance(body["id"], str) and body["id"]
    assert isinstance(body["api_key"], str) and len(body["api_key"]) >= 32
    assert key_works(client, body["api_key"])

    r = client.post("/api/v1/workspaces", json={"owner_id": "alice", "name": "Team"},
                    headers={"X-API-Key": body["api_key"]})
    assert r.status_code == 201


def test_each_tenant_gets_a_different_id_and_key(client):
    first, second = create_tenant(client, "Same"), create_tenant(client, "Same")
    assert first["id"] != second["id"]
    assert first["api_key"] != second["api_key"]


@pytest.mark.parametrize("name", ["A", "x" * 100, "Ünïcødé Ltd.", "Acme, Inc. (EU)"])
def test_a_tenant_name_of_1_to_100_characters_is_accepted(client, name):
    assert create_tenant(client, name)["name"] == name


@pytest.mark.parametrize("body", [
    {}, {"name": ""}, {"name": "x" * 101}, {"name": None}, {"name": 42}, {"name": ["A"]},
    {"name": "nul\x00byte"},
], ids=["missing", "empty", "101 chars", "null", "number", "list", "NUL"])
def test_a_tenant_name_that_is_not_1_to_100_characters_is_400_validation_error(client, body):
    r = client.post("/admin/tenants", json=body, headers=ADMIN)
    error = assert_error(r, 400, "validation_error")
    assert "name" in error["details"], error


# --- API keys -------------------------------------------------------------------------------

def test_adding_an_api_key_returns_its_id_and_both_keys_work(client):
    tenant = create_tenant(client)
    added = add_key(client, tenant["id"])
    assert set(added) == {"id", "api_key"}
    assert added["api_key"] != tenant["api_key"]
    assert key_works(client, tenant["api_key"])
    assert key_works(client, added["api_key"])

    # Both keys act as the same tenant: what one creates, the other sees.
    ws = client.post("/api/v1/workspaces", json={"owner_id": "alice", "name": "Shared"},
                     headers={"X-API-Key": tenant["api_key"]}).get_json()
    r = client.get(f"/api/v1/workspaces/{ws['id']}", headers={"X-API-Key": added["api_key"]})
    assert r.status_code == 200 and r.get_json()["name"] == "Shared"


def test_revoking_a_key_stops_it_at_once_and_leaves_the_others_working(client):
    tenant = create_tenant(client)
    second, third = add_key(client, tenant["id"]), add_key(client, tenant["id"])
    assert key_works(client, second["api_key"])

    r = client.delete(f"/admin/tenants/{tenant['id']}/api-keys/{second['id']}", headers=ADMIN)

    assert r.status_code == 204
    assert r.get_data() == b""
    r = client.get("/api/v1/workspaces/user/alice", headers={"X-API-Key": second["api_key"]})
    assert_error(r, 401, "invalid_api_key")
    assert key_works(client, tenant["api_key"])
    assert key_works(client, third["api_key"])


def test_every_key_of_a_tenant_can_be_revoked(client):
    tenant = create_tenant(client)
    added = add_key(client, tenant["id"])
    r = client.delete(f"/admin/tenants/{tenant['id']}/api-keys/{added['id']}", headers=ADMIN)
    assert r.status_code == 204
    assert not key_works(client, added["api_key"])
    assert key_works(client, tenant["api_key"])


@pytest.mark.parametrize("tenant_id", ["0" * 32, "no-such-tenant", "x" * 300])
def test_adding_a_key_to_an_unknown_tenant_is_404_not_found(client, tenant_id):
    assert_error(client.post(f"/admin/tenants/{tenant_id}/api-keys", headers=ADMIN),
                 404, "not_found")


@pytest.mark.parametrize("tenant_id", ["0" * 32, "no-such-tenant", "x" * 300])
def test_revoking_a_key_of_an_unknown_tenant_is_404_not_found(client, existing, tenant_id):
    r = client.delete(f"/admin/tenants/{tenant_id}/api-keys/{existing['key_id']}",
                      headers=ADMIN)
    assert_error(r, 404, "not_found")
    assert key_count(client, existing["tenant_id"]) == 2


@pytest.mark.parametrize("key_id", ["0" * 32, "no-such-key", "x" * 300])
def test_revoking_an_unknown_key_is_404_not_found(client, existing, key_id):
    r = client.delete(f"/admin/tenants/{existing['tenant_id']}/api-keys/{key_id}", headers=ADMIN)
    assert_error(r, 404, "not_found")
    assert key_count(client, existing["tenant_id"]) == 2


def test_revoking_another_tenants_key_is_404_not_found_and_the_key_keeps_working(client):
    first, second = create_tenant(client, "First"), create_tenant(client, "Second")
    second_key = add_key(client, second["id"])

    r = client.delete(f"/admin/tenants/{first['id']}/api-keys/{second_key['id']}",
                      headers=ADMIN)

    assert_error(r, 404, "not_found")
    assert key_works(client, second_key["api_key"])
    assert key_works(client, first["api_key"])


# --- storage --------------------------------------------------------------------------------

def test_only_a_hash_of_each_key_is_stored(client):
    from app.extensions import db
    from app.models import ApiKey

    tenant = create_tenant(client, "Hashed")
    plain_keys = [tenant["api_key"], add_key(client, tenant["id"])["api_key"],
                  add_key(client, tenant["id"])["api_key"]]

    db.session.expire_all()
    rows = db.session.execute(select(ApiKey).where(ApiKey.tenant_id == tenant["id"])
                              ).scalars().all()
    assert len(rows) == 3
    columns = [c.key for c in inspect(ApiKey).mapper.column_attrs]
    for row in rows:
        for column in columns:
            value = str(getattr(row, column))
            for key in plain_keys:
                assert key not in value, (column, value)

    # Nor anywhere else in the database, in any table.
    with db.engine.connect() as conn:
        for table in db.metadata.sorted_tables:
            for record in conn.execute(table.select()):
                for value in record:
                    for key in plain_keys:
                        assert key not in str(value), table.name
