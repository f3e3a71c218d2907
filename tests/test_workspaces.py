"""REST: workspaces, their agent configuration and members (CONTRACT.md section 2)."""
from __future__ import annotations

import re

import pytest

from tests.conftest import assert_error

ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
WORKSPACE_KEYS = {"id", "name", "owner_id", "members", "agent", "created_at"}
PAGE_KEYS = {"workspaces", "total", "offset", "limit", "has_more"}

OPENAI_SECRET = "sk-openai-very-secret-0123456789"
WEBHOOK_SECRET = "whsec-very-secret-9876543210"


#: The python agents these tests configure (and the broken paths they expect refused for
#: their own reason): PYTHON_AGENTS allows nothing by default.
PYTHON_AGENTS = ["tests.agents:reply", "json:dumps", "no_such_pkg.mod:reply",
                 "tests.agents:no_such_function", "tests.agents:not_callable"]


@pytest.fixture(autouse=True)
def agent_settings(app, monkeypatch):
    """Python agents listed, and loopback webhook/openai URLs allowed (as an operator with a
    local model server would configure it); tests/test_agent_security.py covers the defaults."""
    monkeypatch.setitem(app.config, "PYTHON_AGENTS", PYTHON_AGENTS)
    monkeypatch.setitem(app.config, "AGENT_ALLOW_PRIVATE_NETWORKS", True)


def stored_secret(value: str) -> str:
    """The plaintext of a secret as stored (encrypted: the row never holds the plaintext)."""
    from app.agents.secrets import PREFIX, reveal

    assert value.startswith(PREFIX), "the secret is stored in plaintext"
    return reveal(value)


def create(tenant, **body):
    """POST a workspace body as given (no defaults) and return the response."""
    return tenant.api.post("/api/v1/workspaces", json=body)


def ids_of(page: dict) -> list[str]:
    return [w["id"] for w in page["workspaces"]]


# --- create: shape and validation -----------------------------------------------------------

def test_create_workspace_returns_201_with_the_contract_shape(tenant):
    r = create(tenant, owner_id="alice", name="Team")
    assert r.status_code == 201
    body = r.get_json()
    assert set(body) == WORKSPACE_KEYS
    assert isinstance(body["id"], str) and body["id"]
    assert body["name"] == "Team"
    assert body["owner_id"] == "alice"
    assert body["members"] == []
    assert body["agent"] == {"kind": "none"}
    assert ISO_Z.match(body["created_at"]), body["created_at"]


def test_created_workspace_can_be_fetched_by_id(tenant):
    ws = tenant.workspace("alice", "Team")
    r = tenant.api.get(f"/api/v1/workspaces/{ws['id']}")
    assert r.status_code == 200
    assert r.get_json() == ws


@pytest.mark.parametrize("owner_id", ["a", "A-z_0.9@x:y", "user@example.com", "x" * 128])
def test_owner_id_of_allowed_characters_and_length_is_accepted(tenant, owner_id):
    r = create(tenant, owner_id=owner_id, name="Team")
    assert r.status_code == 201, r.get_json()
    assert r.get_json()["owner_id"] == owner_id


@pytest.mark.parametrize("owner_id", ["", "x" * 129, "bad user", "bad/user", "bad!user",
                                      "ümlaut", 123, None, ["alice"]])
def test_malformed_owner_id_is_a_validation_error(tenant, owner_id):
    error = assert_error(create(tenant, owner_id=owner_id, name="Team"), 400, "validation_error")
    assert "owner_id" in error["details"]


@pytest.mark.parametrize("name", ["T", "x" * 100, "Équipe 🚀"])
def test_name_of_1_to_100_characters_is_accepted(tenant, name):
    r = create(tenant, owner_id="alice", name=name)
    assert r.status_code == 201, r.get_json()
    assert r.get_json()["name"] == name


@pytest.mark.parametrize("name", ["", "x" * 101, 42, None])
def test_name_empty_too_long_or_not_a_string_is_a_validation_error(tenant, name):
    error = assert_error(create(tenant, owner_id="alice", name=name), 400, "validation_error")
    assert "name" in error["details"]


@pytest.mark.parametrize("missing", ["owner_id", "name"])
def test_missing_required_field_is_a_validation_error_keyed_by_field(tenant, missing):
    body = {"owner_id": "alice", "name": "Team"}
    del body[missing]
    error = assert_error(create(tenant, **body), 400, "validation_error")
    assert missing in error["details"]


def test_empty_body_reports_every_required_field(tenant):
    error = assert_error(tenant.api.post("/api/v1/workspaces", json={}), 400,
                         "validation_error")
    assert {"owner_id", "name"} <= set(error["details"])


def test_unknown_field_is_a_validation_error_keyed_by_that_field(tenant):
    error = assert_error(create(tenant, owner_id="alice", name="Team", color="blue"), 400,
                         "validation_error")
    assert "color" in error["details"]


def test_body_that_is_not_json_is_invalid_json(tenant):
    r = tenant.api.post("/api/v1/workspaces", data="{not json",
                        headers={"Content-Type": "application/json"})
    assert_error(r, 400, "invalid_json")


def test_workspace_of_another_tenant_is_not_found(tenant, other_tenant):
    ws = tenant.workspace("alice")
    assert_error(other_tenant.api.get(f"/api/v1/workspaces/{ws['id']}"), 404,
                 "workspace_not_found")
    assert_error(other_tenant.api.patch(f"/api/v1/workspaces/{ws['id']}", json={"name": "X"}),
                 404, "workspace_not_found")
    assert_error(other_tenant.api.delete(f"/api/v1/workspaces/{ws['id']}"), 404,
                 "workspace_not_found")
    assert_error(other_tenant.api.put(f"/api/v1/workspaces/{ws['id']}/members/bob"), 404,
                 "workspace_not_found")
    # and nothing changed for the owning tenant
    assert tenant.api.get(f"/api/v1/workspaces/{ws['id']}").get_json() == ws


# --- agent configurations -------------------------------------------------------------------

VALID_AGENTS = {
    "none": ({"kind": "none"}, {"kind": "none"}),
    "echo": ({"kind": "echo"}, {"kind": "echo"}),
    "openai-minimal": (
        {"kind": "openai", "base_url": "http://localhost:11434", "model": "llama3"},
        {"kind": "openai", "base_url": "http://localhost:11434", "model": "llama3"},
    ),
    "openai-full": (
        {"kind": "openai", "base_url": "https://api.openai.com", "model": "gpt-4o-mini",
         "api_key": OPENAI_SECRET, "system_prompt": "Be brief.", "history": 10},
        {"kind": "openai", "base_url": "https://api.openai.com", "model": "gpt-4o-mini",
         "api_key_set": True, "system_prompt": "Be brief.", "history": 10},
    ),
    "webhook-minimal": (
        {"kind": "webhook", "url": "https://hooks.example.com/reply"},
        {"kind": "webhook", "url": "https://hooks.example.com/reply"},
    ),
    "webhook-secret": (
        {"kind": "webhook", "url": "http://127.0.0.1:9000/hook", "secret": WEBHOOK_SECRET},
        {"kind": "webhook", "url": "http://127.0.0.1:9000/hook", "secret_set": True},
    ),
    "python": (
        {"kind": "python", "callable": "tests.agents:reply"},
        {"kind": "python", "callable": "tests.agents:reply"},
    ),
    "python-top-level-module": (
        {"kind": "python", "callable": "json:dumps"},
        {"kind": "python", "callable": "json:dumps"},
    ),
}


def _public(agent: dict) -> dict:
    """Drop a falsy secret flag: its absence and ``false`` say the same thing."""
    return {k: v for k, v in agent.items() if not (k.endswith("_set") and v is False)}


@pytest.mark.parametrize("agent, public", VALID_AGENTS.values(), ids=VALID_AGENTS.keys())
def test_valid_agent_config_of_each_kind_is_accepted_and_returned_without_secrets(
        tenant, agent, public):
    r = create(tenant, owner_id="alice", name="Team", agent=agent)
    assert r.status_code == 201, r.get_json()
    assert _public(r.get_json()["agent"]) == public
    fetched = tenant.api.get(f"/api/v1/workspaces/{r.get_json()['id']}").get_json()
    assert _public(fetched["agent"]) == public


INVALID_AGENTS = {
    "missing-kind": ({"base_url": "http://x.example", "model": "m"}, "kind"),
    "unknown-kind": ({"kind": "claude"}, "kind"),
    "kind-not-a-string": ({"kind": 1}, "kind"),
    "none-with-model": ({"kind": "none", "model": "gpt"}, "model"),
    "echo-with-url": ({"kind": "echo", "url": "https://example.com"}, "url"),
    "openai-missing-base_url": ({"kind": "openai", "model": "gpt"}, "base_url"),
    "openai-missing-model": ({"kind": "openai", "base_url": "https://api.openai.com"}, "model"),
    "openai-with-webhook-url": ({"kind": "openai", "base_url": "https://api.openai.com",
                                 "model": "gpt", "url": "https://example.com"}, "url"),
    "openai-with-secret": ({"kind": "openai", "base_url": "https://api.openai.com",
                            "model": "gpt", "secret": "s"}, "secret"),
    "openai-bad-base_url": ({"kind": "openai", "base_url": "not a url", "model": "gpt"},
                            "base_url"),
    "openai-base_url-without-scheme": ({"kind": "openai", "base_url": "api.openai.com",
                                        "model": "gpt"}, "base_url"),
    "openai-ftp-base_url": ({"kind": "openai", "base_url": "ftp://api.openai.com",
                             "model": "gpt"}, "base_url"),
    "openai-empty-model": ({"kind": "openai", "base_url": "https://api.openai.com",
                            "model": ""}, "model"),
    "openai-negative-history": ({"kind": "openai", "base_url": "https://api.openai.com",
                                 "model": "gpt", "history": -1}, "history"),
    "openai-history-not-a-number": ({"kind": "openai", "base_url": "https://api.openai.com",
                                     "model": "gpt", "history": "ten"}, "history"),
    "webhook-missing-url": ({"kind": "webhook"}, "url"),
    "webhook-bad-url": ({"kind": "webhook", "url": "not-a-url"}, "url"),
    "webhook-javascript-url": ({"kind": "webhook", "url": "javascript:alert(1)"}, "url"),
    "webhook-with-api_key": ({"kind": "webhook", "url": "https://example.com",
                              "api_key": "k"}, "api_key"),
    "webhook-with-model": ({"kind": "webhook", "url": "https://example.com", "model": "m"},
                           "model"),
    "python-missing-callable": ({"kind": "python"}, "callable"),
    "python-callable-without-function": ({"kind": "python", "callable": "tests.agents"},
                                         "callable"),
    "python-callable-with-call": ({"kind": "python", "callable": "tests.agents:reply()"},
                                  "callable"),
    "python-callable-with-spaces": ({"kind": "python", "callable": "my pkg:reply"},
                                    "callable"),
    "python-with-url": ({"kind": "python", "callable": "tests.agents:reply",
                         "url": "https://example.com"}, "url"),
    "python-module-not-importable": ({"kind": "python", "callable": "no_such_pkg.mod:reply"},
                                     "callable"),
    "python-function-missing": ({"kind": "python", "callable": "tests.agents:no_such_function"},
                                "callable"),
    "python-attribute-not-callable": ({"kind": "python", "callable": "tests.agents:not_callable"},
                                      "callable"),
    "unknown-field": ({"kind": "echo", "temperature": 0.2}, "temperature"),
}


@pytest.mark.parametrize("agent, field", INVALID_AGENTS.values(), ids=INVALID_AGENTS.keys())
def test_invalid_agent_config_is_a_validation_error_naming_the_field(tenant, agent, field):
    error = assert_error(create(tenant, owner_id="alice", name="Team", agent=agent), 400,
                         "validation_error")
    assert "agent" in error["details"], error
    assert field in error["details"]["agent"], error


@pytest.mark.parametrize("agent", ["echo", ["echo"], 1, None])
def test_agent_that_is_not_an_object_is_a_validation_error(tenant, agent):
    error = assert_error(create(tenant, owner_id="alice", name="Team", agent=agent), 400,
                         "validation_error")
    assert "agent" in error["details"]


def test_invalid_agent_is_not_stored(tenant):
    create(tenant, owner_id="alice", name="Team", agent={"kind": "claude"})
    page = tenant.api.get("/api/v1/workspaces/user/alice").get_json()
    assert page["total"] == 0 and page["workspaces"] == []


# --- secrets are never returned -------------------------------------------------------------

def _assert_no_secret(response, *secrets):
    text = response.get_data(as_text=True)
    for secret in secrets:
        assert secret not in text, text


def test_secret_of_openai_agent_is_never_returned(tenant):
    agent = {"kind": "openai", "base_url": "https://api.openai.com", "model": "gpt",
             "api_key": OPENAI_SECRET}
    r = create(tenant, owner_id="alice", name="Team", agent=agent)
    assert r.status_code == 201
    _assert_no_secret(r, OPENAI_SECRET)
    body = r.get_json()
    assert "api_key" not in body["agent"] and body["agent"]["api_key_set"] is True

    for response in (
        tenant.api.get(f"/api/v1/workspaces/{body['id']}"),
        tenant.api.get("/api/v1/workspaces/user/alice"),
        tenant.api.patch(f"/api/v1/workspaces/{body['id']}", json={"name": "Renamed"}),
        tenant.api.patch(f"/api/v1/workspaces/{body['id']}",
                         json={"agent": {**agent, "model": "gpt-4o"}}),
    ):
        assert response.status_code == 200, response.get_json()
        _assert_no_secret(response, OPENAI_SECRET)
    page = tenant.api.get("/api/v1/workspaces/user/alice").get_json()
    assert page["workspaces"][0]["agent"]["api_key_set"] is True
    assert "api_key" not in page["workspaces"][0]["agent"]


def test_secret_of_webhook_agent_is_never_returned(tenant):
    agent = {"kind": "webhook", "url": "https://example.com/hook", "secret": WEBHOOK_SECRET}
    r = create(tenant, owner_id="alice", name="Team", agent=agent)
    assert r.status_code == 201
    _assert_no_secret(r, WEBHOOK_SECRET)
    body = r.get_json()
    assert "secret" not in body["agent"] and body["agent"]["secret_set"] is True

    for response in (
        tenant.api.get(f"/api/v1/workspaces/{body['id']}"),
        tenant.api.get("/api/v1/workspaces/user/alice"),
        tenant.api.patch(f"/api/v1/workspaces/{body['id']}", json={"name": "Renamed"}),
        tenant.api.patch(f"/api/v1/workspaces/{body['id']}", json={"agent": agent}),
    ):
        assert response.status_code == 200, response.get_json()
        _assert_no_secret(response, WEBHOOK_SECRET)


def test_secret_in_a_rejected_agent_config_is_not_echoed_in_the_error(tenant):
    agent = {"kind": "webhook", "url": "not-a-url", "secret": WEBHOOK_SECRET,
             "api_key": OPENAI_SECRET}
    r = create(tenant, owner_id="alice", name="Team", agent=agent)
    assert_error(r, 400, "validation_error")
    _assert_no_secret(r, WEBHOOK_SECRET, OPENAI_SECRET)


def test_secret_is_stored_for_the_agent_even_though_it_is_not_returned(tenant):
    from app.extensions import db
    from app.models import Workspace

    ws = tenant.workspace(agent={"kind": "openai", "base_url": "https://api.openai.com",
                                 "model": "gpt", "api_key": OPENAI_SECRET})
    db.session.expire_all()
    assert stored_secret(db.session.get(Workspace, ws["id"]).agent["api_key"]) == OPENAI_SECRET


# --- PATCH ----------------------------------------------------------------------------------

def test_patch_renames_the_workspace_and_keeps_the_agent(tenant):
    ws = tenant.workspace(agent={"kind": "echo"})
    r = tenant.api.patch(f"/api/v1/workspaces/{ws['id']}", json={"name": "Renamed"})
    assert r.status_code == 200
    body = r.get_json()
    assert set(body) == WORKSPACE_KEYS
    assert body["name"] == "Renamed" and body["agent"] == {"kind": "echo"}
    assert body["id"] == ws["id"] and body["created_at"] == ws["created_at"]
    assert tenant.api.get(f"/api/v1/workspaces/{ws['id']}").get_json()["name"] == "Renamed"


def test_patch_replaces_the_agent_and_keeps_the_name(tenant):
    ws = tenant.workspace(name="Team")
    agent = {"kind": "python", "callable": "tests.agents:reply"}
    r = tenant.api.patch(f"/api/v1/workspaces/{ws['id']}", json={"agent": agent})
    assert r.status_code == 200
    assert r.get_json()["agent"] == agent and r.get_json()["name"] == "Team"
    assert tenant.api.get(f"/api/v1/workspaces/{ws['id']}").get_json()["agent"] == agent


def test_patch_with_empty_body_changes_nothing(tenant):
    ws = tenant.workspace(agent={"kind": "echo"})
    r = tenant.api.patch(f"/api/v1/workspaces/{ws['id']}", json={})
    assert r.status_code == 200
    assert r.get_json() == ws


def test_patch_of_same_kind_without_the_secret_keeps_the_secret(tenant):
    from app.extensions import db
    from app.models import Workspace

    ws = tenant.workspace(agent={"kind": "openai", "base_url": "https://api.openai.com",
                                 "model": "gpt", "api_key": OPENAI_SECRET})
    r = tenant.api.patch(f"/api/v1/workspaces/{ws['id']}", json={"agent": {
        "kind": "openai", "base_url": "https://api.openai.com", "model": "gpt-4o"}})
    assert r.status_code == 200
    assert r.get_json()["agent"]["model"] == "gpt-4o"
    assert r.get_json()["agent"]["api_key_set"] is True
    assert tenant.api.get(f"/api/v1/workspaces/{ws['id']}").get_json()["agent"][
        "api_key_set"] is True
    db.session.expire_all()
    assert stored_secret(db.session.get(Workspace, ws["id"]).agent["api_key"]) == OPENAI_SECRET


def test_patch_of_webhook_without_the_secret_keeps_the_secret(tenant):
    ws = tenant.workspace(agent={"kind": "webhook", "url": "https://example.com/a",
                                 "secret": WEBHOOK_SECRET})
    r = tenant.api.patch(f"/api/v1/workspaces/{ws['id']}", json={"agent": {
        "kind": "webhook", "url": "https://example.com/b"}})
    assert r.status_code == 200
    assert r.get_json()["agent"] == {"kind": "webhook", "url": "https://example.com/b",
                                     "secret_set": True}


def test_patch_with_a_new_secret_replaces_it(tenant):
    from app.extensions import db
    from app.models import Workspace

    ws = tenant.workspace(agent={"kind": "openai", "base_url": "https://api.openai.com",
                                 "model": "gpt", "api_key": OPENAI_SECRET})
    r = tenant.api.patch(f"/api/v1/workspaces/{ws['id']}", json={"agent": {
        "kind": "openai", "base_url": "https://api.openai.com", "model": "gpt",
        "api_key": "sk-rotated-key"}})
    assert r.status_code == 200 and r.get_json()["agent"]["api_key_set"] is True
    assert "sk-rotated-key" not in r.get_data(as_text=True)
    db.session.expire_all()
    assert stored_secret(db.session.get(Workspace, ws["id"]).agent["api_key"]) == "sk-rotated-key"


def test_patch_with_a_different_kind_drops_the_secret(tenant):
    from app.extensions import db
    from app.models import Workspace

    openai = {"kind": "openai", "base_url": "https://api.openai.com", "model": "gpt"}
    ws = tenant.workspace(agent={**openai, "api_key": OPENAI_SECRET})
    r = tenant.api.patch(f"/api/v1/workspaces/{ws['id']}", json={"agent": {
        "kind": "webhook", "url": "https://example.com/hook"}})
    assert r.status_code == 200
    assert r.get_json()["agent"] == {"kind": "webhook", "url": "https://example.com/hook"}
    # switching back to the first kind does not resurrect the old key
    r = tenant.api.patch(f"/api/v1/workspaces/{ws['id']}", json={"agent": openai})
    assert r.status_code == 200
    assert not r.get_json()["agent"].get("api_key_set")
    db.session.expire_all()
    assert "api_key" not in db.session.get(Workspace, ws["id"]).agent


@pytest.mark.parametrize("body, field", [
    ({"name": ""}, "name"),
    ({"name": "x" * 101}, "name"),
    ({"agent": {"kind": "claude"}}, "agent"),
    ({"agent": {"kind": "webhook", "url": "not-a-url"}}, "agent"),
    ({"owner_id": "bob"}, "owner_id"),
    ({"color": "blue"}, "color"),
])
def test_invalid_patch_is_a_validation_error_and_changes_nothing(tenant, body, field):
    ws = tenant.workspace(agent={"kind": "echo"})
    error = assert_error(tenant.api.patch(f"/api/v1/workspaces/{ws['id']}", json=body), 400,
                         "validation_error")
    assert field in error["details"]
    assert tenant.api.get(f"/api/v1/workspaces/{ws['id']}").get_json() == ws


# --- unknown workspace ----------------------------------------------------------------------

@pytest.mark.parametrize("workspace_id", ["0" * 32, "does-not-exist", "x" * 200])
def test_unknown_workspace_is_workspace_not_found_for_every_method(tenant, workspace_id):
    base = f"/api/v1/workspaces/{workspace_id}"
    assert_error(tenant.api.get(base), 404, "workspace_not_found")
    assert_error(tenant.api.patch(base, json={"name": "X"}), 404, "workspace_not_found")
    assert_error(tenant.api.delete(base), 404, "workspace_not_found")
    assert_error(tenant.api.put(f"{base}/members/bob"), 404, "workspace_not_found")
    assert_error(tenant.api.delete(f"{base}/members/bob"), 404, "workspace_not_found")


# --- listing a user's workspaces ------------------------------------------------------------

def test_user_workspaces_lists_owned_and_member_workspaces(tenant):
    own = tenant.workspace("bob", "Bob's")
    shared = tenant.workspace("alice", "Alice's shared")
    private = tenant.workspace("alice", "Alice's private")
    assert tenant.api.put(f"/api/v1/workspaces/{shared['id']}/members/bob").status_code == 204

    r = tenant.api.get("/api/v1/workspaces/user/bob")
    assert r.status_code == 200
    page = r.get_json()
    assert set(page) == PAGE_KEYS
    assert set(ids_of(page)) == {own["id"], shared["id"]}
    assert private["id"] not in ids_of(page)
    assert page["total"] == 2 and page["offset"] == 0 and page["limit"] == 50
    assert page["has_more"] is False
    for ws in page["workspaces"]:
        assert set(ws) == WORKSPACE_KEYS
    listed_shared = next(w for w in page["workspaces"] if w["id"] == shared["id"])
    assert listed_shared["owner_id"] == "alice" and listed_shared["members"] == ["bob"]


def test_user_workspaces_pages_with_offset_and_limit(tenant):
    created = [tenant.workspace("alice", f"W{i}")["id"] for i in range(5)]

    first = tenant.api.get("/api/v1/workspaces/user/alice?limit=2").get_json()
    second = tenant.api.get("/api/v1/workspaces/user/alice?offset=2&limit=2").get_json()
    last = tenant.api.get("/api/v1/workspaces/user/alice?offset=4&limit=2").get_json()
    beyond = tenant.api.get("/api/v1/workspaces/user/alice?offset=10&limit=2").get_json()

    assert (first["total"], first["offset"], first["limit"], first["has_more"]) == (5, 0, 2, True)
    assert (second["total"], second["offset"], second["has_more"]) == (5, 2, True)
    assert (last["total"], last["offset"], last["has_more"]) == (5, 4, False)
    assert len(first["workspaces"]) == 2 and len(second["workspaces"]) == 2
    assert len(last["workspaces"]) == 1
    paged = ids_of(first) + ids_of(second) + ids_of(last)
    assert sorted(paged) == sorted(created)  # every workspace once, no duplicates
    assert beyond["workspaces"] == [] and beyond["total"] == 5 and beyond["has_more"] is False

    everything = tenant.api.get("/api/v1/workspaces/user/alice").get_json()
    assert ids_of(everything) == paged  # pages are slices of one stable order


def test_user_workspaces_accepts_limit_bounds_1_and_200(tenant):
    tenant.workspace("alice")
    tenant.workspace("alice")
    one = tenant.api.get("/api/v1/workspaces/user/alice?limit=1").get_json()
    assert len(one["workspaces"]) == 1 and one["limit"] == 1 and one["has_more"] is True
    most = tenant.api.get("/api/v1/workspaces/user/alice?limit=200").get_json()
    assert len(most["workspaces"]) == 2 and most["limit"] == 200 and most["has_more"] is False


@pytest.mark.parametrize("query, field", [
    ("limit=0", "limit"), ("limit=201", "limit"), ("limit=-1", "limit"),
    ("limit=abc", "limit"), ("offset=-1", "offset"), ("offset=abc", "offset"),
    ("offset=9223372036854775808", "offset"),
])
def test_user_workspaces_with_bad_paging_is_a_validation_error(tenant, query, field):
    tenant.workspace("alice")
    error = assert_error(tenant.api.get(f"/api/v1/workspaces/user/alice?{query}"), 400,
                         "validation_error")
    assert field in error["details"]


def test_user_workspaces_of_unknown_user_is_an_empty_page(tenant):
    r = tenant.api.get("/api/v1/workspaces/user/nobody?offset=3&limit=7")
    assert r.status_code == 200
    assert r.get_json() == {"workspaces": [], "total": 0, "offset": 3, "limit": 7,
                            "has_more": False}


def test_user_workspaces_do_not_include_another_tenants_workspaces(tenant, other_tenant):
    other_tenant.workspace("alice", "Globex team")
    assert tenant.api.get("/api/v1/workspaces/user/alice").get_json()["total"] == 0


@pytest.mark.parametrize("user_id", ["bad!user", "bad%20user", "x" * 129])
def test_user_workspaces_with_malformed_user_id_is_a_validation_error(tenant, user_id):
    error = assert_error(tenant.api.get(f"/api/v1/workspaces/user/{user_id}"), 400,
                         "validation_error")
    assert "user_id" in error["details"]


# --- DELETE ---------------------------------------------------------------------------------

def test_delete_workspace_returns_204_and_then_it_is_not_found(tenant):
    ws = tenant.workspace()
    r = tenant.api.delete(f"/api/v1/workspaces/{ws['id']}")
    assert r.status_code == 204 and r.get_data() == b""
    assert_error(tenant.api.get(f"/api/v1/workspaces/{ws['id']}"), 404, "workspace_not_found")
    assert_error(tenant.api.delete(f"/api/v1/workspaces/{ws['id']}"), 404,
                 "workspace_not_found")
    assert tenant.api.get("/api/v1/workspaces/user/alice").get_json()["total"] == 0


def test_delete_workspace_deletes_its_chats_and_their_messages(tenant):
    from sqlalchemy import select

    from app.extensions import db
    from app.models import Chat, Message

    ws = tenant.workspace("alice")
    chats = [tenant.chat("alice", ws["id"])["id"] for _ in range(2)]
    for chat_id in chats:
        tenant.messages(chat_id, 3)
    kept = tenant.chat("alice")  # in the default workspace: not affected
    tenant.messages(kept["id"], 2)

    assert tenant.api.delete(f"/api/v1/workspaces/{ws['id']}").status_code == 204

    for chat_id in chats:
        assert_error(tenant.api.get(f"/api/v1/chats/{chat_id}"), 404, "chat_not_found")
        assert_error(tenant.api.get(f"/api/v1/chats/{chat_id}/messages"), 404,
                     "chat_not_found")
    db.session.expire_all()
    assert db.session.execute(select(Chat).where(Chat.workspace_id == ws["id"])).all() == []
    assert db.session.execute(select(Message).where(Message.chat_id.in_(chats))).all() == []
    assert tenant.api.get(f"/api/v1/chats/{kept['id']}").status_code == 200
    assert tenant.api.get(f"/api/v1/chats/{kept['id']}/messages").get_json()["total"] == 2
    assert [c["id"] for c in tenant.api.get("/api/v1/chats/user/alice").get_json()["chats"]] \
        == [kept["id"]]


# --- members --------------------------------------------------------------------------------

def test_put_member_returns_204_and_lists_the_member(tenant):
    ws = tenant.workspace("alice")
    r = tenant.api.put(f"/api/v1/workspaces/{ws['id']}/members/bob")
    assert r.status_code == 204 and r.get_data() == b""
    assert tenant.api.get(f"/api/v1/workspaces/{ws['id']}").get_json()["members"] == ["bob"]


def test_put_member_is_idempotent(tenant):
    ws = tenant.workspace("alice")
    for _ in range(2):
        assert tenant.api.put(f"/api/v1/workspaces/{ws['id']}/members/bob").status_code == 204
    assert tenant.api.put(f"/api/v1/workspaces/{ws['id']}/members/carol").status_code == 204
    members = tenant.api.get(f"/api/v1/workspaces/{ws['id']}").get_json()["members"]
    assert sorted(members) == ["bob", "carol"]


def test_delete_member_returns_204_and_is_idempotent(tenant):
    ws = tenant.workspace("alice")
    tenant.api.put(f"/api/v1/workspaces/{ws['id']}/members/bob")
    tenant.api.put(f"/api/v1/workspaces/{ws['id']}/members/carol")
    for _ in range(2):
        r = tenant.api.delete(f"/api/v1/workspaces/{ws['id']}/members/bob")
        assert r.status_code == 204 and r.get_data() == b""
    # removing someone who never was a member, or an unknown user, is fine too
    assert tenant.api.delete(f"/api/v1/workspaces/{ws['id']}/members/nobody").status_code == 204
    assert tenant.api.get(f"/api/v1/workspaces/{ws['id']}").get_json()["members"] == ["carol"]


def test_removed_member_no_longer_lists_the_workspace(tenant):
    ws = tenant.workspace("alice")
    tenant.api.put(f"/api/v1/workspaces/{ws['id']}/members/bob")
    assert ids_of(tenant.api.get("/api/v1/workspaces/user/bob").get_json()) == [ws["id"]]
    tenant.api.delete(f"/api/v1/workspaces/{ws['id']}/members/bob")
    assert tenant.api.get("/api/v1/workspaces/user/bob").get_json()["total"] == 0


def test_member_gets_a_connection_string_and_a_removed_member_is_forbidden(tenant):
    ws = tenant.workspace("alice")
    chat = tenant.chat("alice", ws["id"])
    url = f"/api/v1/chats/{chat['id']}/connection-string"

    assert_error(tenant.api.post(url, json={"user_id": "bob"}), 403, "forbidden")
    assert tenant.api.put(f"/api/v1/workspaces/{ws['id']}/members/bob").status_code == 204
    r = tenant.api.post(url, json={"user_id": "bob"})
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["chat_id"] == chat["id"] and r.get_json()["connection_string"]

    assert tenant.api.delete(f"/api/v1/workspaces/{ws['id']}/members/bob").status_code == 204
    assert_error(tenant.api.post(url, json={"user_id": "bob"}), 403, "forbidden")
    # the owner is unaffected
    assert tenant.api.post(url, json={"user_id": "alice"}).status_code == 200


def test_membership_of_one_workspace_grants_nothing_in_another(tenant):
    shared = tenant.workspace("alice", "Shared")
    other = tenant.workspace("alice", "Other")
    chat = tenant.chat("alice", other["id"])
    tenant.api.put(f"/api/v1/workspaces/{shared['id']}/members/bob")
    assert_error(tenant.api.post(f"/api/v1/chats/{chat['id']}/connection-string",
                                 json={"user_id": "bob"}), 403, "forbidden")


@pytest.mark.parametrize("method", ["put", "delete"])
@pytest.mark.parametrize("user_id", ["bad!user", "bad%20user", "x" * 129])
def test_member_with_malformed_user_id_is_a_validation_error(tenant, method, user_id):
    ws = tenant.workspace("alice")
    r = getattr(tenant.api, method)(f"/api/v1/workspaces/{ws['id']}/members/{user_id}")
    error = assert_error(r, 400, "validation_error")
    assert "user_id" in error["details"]
    assert tenant.api.get(f"/api/v1/workspaces/{ws['id']}").get_json()["members"] == []
