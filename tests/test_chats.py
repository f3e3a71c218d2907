"""REST: chats, the /chat blueprint's create and connection strings (CONTRACT.md section 2)."""
from __future__ import annotations

import json
import re
import time
from datetime import datetime, timezone

import pytest

from tests.conftest import assert_error

ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
CHAT_KEYS = {"id", "workspace_id", "user_id", "title", "metadata", "created_at", "updated_at"}
PAGE_KEYS = {"chats", "total", "offset", "limit", "has_more"}
METADATA_MAX_BYTES = 16 * 1024

#: Both create endpoints take the same body and behave the same.
CREATE_PATHS = pytest.mark.parametrize("path", ["/api/v1/chats/", "/chat"],
                                       ids=["api-v1-chats", "chat-blueprint"])


def parse_iso(value: str) -> datetime:
    assert ISO_Z.match(value), value
    return datetime.fromisoformat(value[:-1]).replace(tzinfo=timezone.utc)


def metadata_of_size(size: int) -> dict:
    """A metadata object whose compact JSON serialization is exactly ``size`` bytes."""
    overhead = len(json.dumps({"k": ""}, separators=(",", ":")))
    value = {"k": "x" * (size - overhead)}
    assert len(json.dumps(value, separators=(",", ":")).encode()) == size
    return value


# --- create ---------------------------------------------------------------------------------

@CREATE_PATHS
def test_create_chat_returns_201_with_the_contract_shape(tenant, path):
    ws = tenant.workspace("alice")
    r = tenant.api.post(path, json={"user_id": "alice", "workspace_id": ws["id"],
                                    "title": "Hello", "metadata": {"source": "web"}})
    assert r.status_code == 201, r.get_json()
    chat = r.get_json()
    assert set(chat) == CHAT_KEYS
    assert isinstance(chat["id"], str) and chat["id"]
    assert chat["workspace_id"] == ws["id"]
    assert chat["user_id"] == "alice"
    assert chat["title"] == "Hello"
    assert chat["metadata"] == {"source": "web"}
    assert parse_iso(chat["created_at"]) <= parse_iso(chat["updated_at"])


@CREATE_PATHS
def test_create_chat_with_only_user_id_has_no_title_and_empty_metadata(tenant, path):
    r = tenant.api.post(path, json={"user_id": "alice"})
    assert r.status_code == 201, r.get_json()
    chat = r.get_json()
    assert chat["title"] is None and chat["metadata"] == {}


@CREATE_PATHS
def test_created_chat_can_be_fetched_by_id(tenant, path):
    created = tenant.api.post(path, json={"user_id": "alice", "title": "T"}).get_json()
    r = tenant.api.get(f"/api/v1/chats/{created['id']}")
    assert r.status_code == 200
    assert r.get_json() == created


@CREATE_PATHS
def test_chat_without_workspace_goes_to_the_users_personal_workspace_created_once(tenant, path):
    first = tenant.api.post(path, json={"user_id": "alice"}).get_json()
    second = tenant.api.post(path, json={"user_id": "alice", "workspace_id": None}).get_json()
    assert first["workspace_id"] == second["workspace_id"]

    ws = tenant.api.get(f"/api/v1/workspaces/{first['workspace_id']}").get_json()
    assert ws["name"] == "Personal" and ws["owner_id"] == "alice"
    page = tenant.api.get("/api/v1/workspaces/user/alice").get_json()
    assert [w["id"] for w in page["workspaces"]] == [first["workspace_id"]]
    assert page["total"] == 1


def test_both_create_endpoints_share_the_same_personal_workspace(tenant):
    via_api = tenant.api.post("/api/v1/chats/", json={"user_id": "alice"}).get_json()
    via_chat = tenant.api.post("/chat", json={"user_id": "alice"}).get_json()
    assert via_api["workspace_id"] == via_chat["workspace_id"]
    assert tenant.api.get("/api/v1/workspaces/user/alice").get_json()["total"] == 1


def test_each_user_gets_their_own_personal_workspace(tenant):
    alice = tenant.chat("alice")
    bob = tenant.chat("bob")
    assert alice["workspace_id"] != bob["workspace_id"]
    assert tenant.api.get(f"/api/v1/workspaces/{bob['workspace_id']}").get_json()[
        "owner_id"] == "bob"


def test_personal_workspace_is_not_confused_with_a_workspace_named_personal(tenant):
    named = tenant.workspace("alice", "Personal")
    chat = tenant.chat("alice")
    assert chat["workspace_id"] != named["id"]
    assert tenant.chat("alice")["workspace_id"] == chat["workspace_id"]


@CREATE_PATHS
def test_chat_in_a_workspace_the_user_owns_is_created_there(tenant, path):
    ws = tenant.workspace("alice", "Team")
    r = tenant.api.post(path, json={"user_id": "alice", "workspace_id": ws["id"]})
    assert r.status_code == 201
    assert r.get_json()["workspace_id"] == ws["id"]


@CREATE_PATHS
def test_chat_in_another_owners_workspace_is_forbidden(tenant, path):
    ws = tenant.workspace("bob", "Bob's")
    assert_error(tenant.api.post(path, json={"user_id": "alice", "workspace_id": ws["id"]}),
                 403, "forbidden")
    assert tenant.api.get("/api/v1/chats/user/alice").get_json()["total"] == 0


@CREATE_PATHS
def test_member_of_a_workspace_may_not_create_chats_in_it(tenant, path):
    ws = tenant.workspace("bob", "Bob's")
    assert tenant.api.put(f"/api/v1/workspaces/{ws['id']}/members/alice").status_code == 204
    assert_error(tenant.api.post(path, json={"user_id": "alice", "workspace_id": ws["id"]}),
                 403, "forbidden")


@CREATE_PATHS
@pytest.mark.parametrize("workspace_id", ["0" * 32, "no-such-workspace"])
def test_chat_in_unknown_workspace_is_workspace_not_found(tenant, path, workspace_id):
    assert_error(tenant.api.post(path, json={"user_id": "alice", "workspace_id": workspace_id}),
                 404, "workspace_not_found")


@CREATE_PATHS
def test_chat_in_another_tenants_workspace_is_workspace_not_found(tenant, other_tenant, path):
    ws = other_tenant.workspace("alice", "Globex team")
    assert_error(tenant.api.post(path, json={"user_id": "alice", "workspace_id": ws["id"]}),
                 404, "workspace_not_found")


@CREATE_PATHS
def test_title_of_exactly_200_characters_is_accepted(tenant, path):
    title = "t" * 200
    r = tenant.api.post(path, json={"user_id": "alice", "title": title})
    assert r.status_code == 201, r.get_json()
    assert tenant.api.get(f"/api/v1/chats/{r.get_json()['id']}").get_json()["title"] == title


@CREATE_PATHS
@pytest.mark.parametrize("title", ["t" * 201, 42, ["t"]])
def test_title_too_long_or_not_a_string_is_a_validation_error(tenant, path, title):
    error = assert_error(tenant.api.post(path, json={"user_id": "alice", "title": title}),
                         400, "validation_error")
    assert "title" in error["details"]


@CREATE_PATHS
@pytest.mark.parametrize("metadata", [["a", "b"], "text", 42, True])
def test_metadata_that_is_not_a_json_object_is_a_validation_error(tenant, path, metadata):
    error = assert_error(tenant.api.post(path, json={"user_id": "alice", "metadata": metadata}),
                         400, "validation_error")
    assert "metadata" in error["details"]


@CREATE_PATHS
def test_metadata_larger_than_16_kb_is_a_validation_error(tenant, path):
    metadata = metadata_of_size(METADATA_MAX_BYTES + 1)
    error = assert_error(tenant.api.post(path, json={"user_id": "alice", "metadata": metadata}),
                         400, "validation_error")
    assert "metadata" in error["details"]


@CREATE_PATHS
def test_metadata_of_exactly_16_kb_is_accepted_and_stored(tenant, path):
    metadata = metadata_of_size(METADATA_MAX_BYTES)
    r = tenant.api.post(path, json={"user_id": "alice", "metadata": metadata})
    assert r.status_code == 201, r.get_json()
    assert tenant.api.get(f"/api/v1/chats/{r.get_json()['id']}").get_json()["metadata"] \
        == metadata


@CREATE_PATHS
def test_nested_metadata_round_trips(tenant, path):
    metadata = {"customer": {"id": 7, "tags": ["vip", "beta"], "address": {"city": "Zürich"}},
                "score": 0.5, "flag": False, "nothing": None, "empty": {}}
    r = tenant.api.post(path, json={"user_id": "alice", "metadata": metadata})
    assert r.status_code == 201, r.get_json()
    assert r.get_json()["metadata"] == metadata
    assert tenant.api.get(f"/api/v1/chats/{r.get_json()['id']}").get_json()["metadata"] \
        == metadata


@CREATE_PATHS
@pytest.mark.parametrize("body, field", [
    ({}, "user_id"),
    ({"title": "T"}, "user_id"),
    ({"user_id": ""}, "user_id"),
    ({"user_id": "bad user"}, "user_id"),
    ({"user_id": "x" * 129}, "user_id"),
    ({"user_id": 7}, "user_id"),
    ({"user_id": "alice", "workspace_id": 123}, "workspace_id"),
    ({"user_id": "alice", "colour": "red"}, "colour"),
])
def test_invalid_create_body_is_a_validation_error_keyed_by_field(tenant, path, body, field):
    error = assert_error(tenant.api.post(path, json=body), 400, "validation_error")
    assert field in error["details"]


@CREATE_PATHS
def test_create_with_malformed_json_is_invalid_json(tenant, path):
    r = tenant.api.post(path, data='{"user_id": "alice"',
                        headers={"Content-Type": "application/json"})
    assert_error(r, 400, "invalid_json")


# --- get and delete -------------------------------------------------------------------------

@pytest.mark.parametrize("chat_id", ["0" * 32, "no-such-chat", "x" * 200])
def test_unknown_chat_is_chat_not_found(tenant, chat_id):
    assert_error(tenant.api.get(f"/api/v1/chats/{chat_id}"), 404, "chat_not_found")
    assert_error(tenant.api.delete(f"/api/v1/chats/{chat_id}"), 404, "chat_not_found")


def test_chat_of_another_tenant_is_chat_not_found(tenant, other_tenant):
    chat = other_tenant.chat("alice")
    assert_error(tenant.api.get(f"/api/v1/chats/{chat['id']}"), 404, "chat_not_found")
    assert_error(tenant.api.delete(f"/api/v1/chats/{chat['id']}"), 404, "chat_not_found")
    assert_error(tenant.api.post(f"/api/v1/chats/{chat['id']}/connection-string",
                                 json={"user_id": "alice"}), 404, "chat_not_found")


def test_delete_chat_returns_204_and_then_it_is_not_found(tenant):
    chat = tenant.chat("alice")
    other = tenant.chat("alice")
    r = tenant.api.delete(f"/api/v1/chats/{chat['id']}")
    assert r.status_code == 204 and r.get_data() == b""
    assert_error(tenant.api.get(f"/api/v1/chats/{chat['id']}"), 404, "chat_not_found")
    assert_error(tenant.api.delete(f"/api/v1/chats/{chat['id']}"), 404, "chat_not_found")
    # the rest stays: the other chat and the workspace
    assert tenant.api.get(f"/api/v1/chats/{other['id']}").status_code == 200
    assert tenant.api.get(f"/api/v1/workspaces/{chat['workspace_id']}").status_code == 200
    page = tenant.api.get("/api/v1/chats/user/alice").get_json()
    assert [c["id"] for c in page["chats"]] == [other["id"]] and page["total"] == 1


# --- listing a user's chats -----------------------------------------------------------------

def test_user_chats_lists_only_chats_the_user_created_oldest_first(tenant):
    ws = tenant.workspace("alice", "Team")
    tenant.api.put(f"/api/v1/workspaces/{ws['id']}/members/bob")
    created = [tenant.chat("alice")["id"], tenant.chat("alice", ws["id"])["id"],
               tenant.api.post("/chat", json={"user_id": "alice"}).get_json()["id"]]
    bobs = tenant.chat("bob")

    r = tenant.api.get("/api/v1/chats/user/alice")
    assert r.status_code == 200
    page = r.get_json()
    assert set(page) == PAGE_KEYS
    assert [c["id"] for c in page["chats"]] == created
    assert (page["total"], page["offset"], page["limit"], page["has_more"]) == (3, 0, 50, False)
    for chat in page["chats"]:
        assert set(chat) == CHAT_KEYS and chat["user_id"] == "alice"

    # bob is a member of alice's workspace, but only his own chat is his
    bob_page = tenant.api.get("/api/v1/chats/user/bob").get_json()
    assert [c["id"] for c in bob_page["chats"]] == [bobs["id"]] and bob_page["total"] == 1


def test_user_chats_pages_with_offset_and_limit(tenant):
    created = [tenant.chat("alice", title=f"c{i}")["id"] for i in range(5)]

    def page(query):
        r = tenant.api.get(f"/api/v1/chats/user/alice?{query}")
        assert r.status_code == 200
        return r.get_json()

    first, second, last = page("limit=2"), page("offset=2&limit=2"), page("offset=4&limit=2")
    assert [c["id"] for c in first["chats"]] == created[0:2]
    assert [c["id"] for c in second["chats"]] == created[2:4]
    assert [c["id"] for c in last["chats"]] == created[4:]
    assert (first["total"], first["offset"], first["limit"], first["has_more"]) == (5, 0, 2, True)
    assert (second["total"], second["offset"], second["has_more"]) == (5, 2, True)
    assert (last["total"], last["offset"], last["has_more"]) == (5, 4, False)
    beyond = page("offset=5")
    assert beyond["chats"] == [] and beyond["total"] == 5 and beyond["has_more"] is False
    assert len(page("limit=200")["chats"]) == 5


@pytest.mark.parametrize("query, field", [
    ("limit=0", "limit"), ("limit=201", "limit"), ("limit=abc", "limit"),
    ("offset=-1", "offset"), ("offset=1.5", "offset"),
    ("offset=9223372036854775808", "offset"),
])
def test_user_chats_with_bad_paging_is_a_validation_error(tenant, query, field):
    tenant.chat("alice")
    error = assert_error(tenant.api.get(f"/api/v1/chats/user/alice?{query}"), 400,
                         "validation_error")
    assert field in error["details"]


def test_user_chats_of_unknown_user_is_an_empty_page(tenant):
    r = tenant.api.get("/api/v1/chats/user/nobody?offset=2&limit=5")
    assert r.status_code == 200
    assert r.get_json() == {"chats": [], "total": 0, "offset": 2, "limit": 5,
                            "has_more": False}


def test_user_chats_of_a_user_without_chats_is_an_empty_page(tenant):
    tenant.workspace("carol")  # carol exists, but has no chats
    page = tenant.api.get("/api/v1/chats/user/carol").get_json()
    assert page["chats"] == [] and page["total"] == 0 and page["has_more"] is False


@pytest.mark.parametrize("user_id", ["bad!user", "bad%20user", "x" * 129])
def test_user_chats_with_malformed_user_id_is_a_validation_error(tenant, user_id):
    error = assert_error(tenant.api.get(f"/api/v1/chats/user/{user_id}"), 400,
                         "validation_error")
    assert "user_id" in error["details"]


# --- connection strings ---------------------------------------------------------------------

def test_owner_gets_a_connection_string_expiring_after_the_ttl(app, tenant):
    chat = tenant.chat("alice")
    before = time.time()
    r = tenant.api.post(f"/api/v1/chats/{chat['id']}/connection-string",
                        json={"user_id": "alice"})
    after = time.time()
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert set(body) == {"connection_string", "chat_id", "expires_at"}
    assert body["chat_id"] == chat["id"]
    assert isinstance(body["connection_string"], str) and body["connection_string"]
    ttl = app.config["CONNECTION_STRING_TTL"]
    assert ttl == 300
    expires = parse_iso(body["expires_at"]).timestamp()
    assert before + ttl - 1 <= expires <= after + ttl + 1


def test_connection_string_is_signed_and_bound_to_tenant_user_and_chat(app, tenant):
    from app.tokens import verify_connection_string

    ws = tenant.workspace("alice")
    chat = tenant.chat("alice", ws["id"])
    tenant.api.put(f"/api/v1/workspaces/{ws['id']}/members/bob")
    url = f"/api/v1/chats/{chat['id']}/connection-string"
    for user_id in ("alice", "bob"):
        body = tenant.api.post(url, json={"user_id": user_id}).get_json()
        with app.app_context():
            payload = verify_connection_string(body["connection_string"])
        assert payload["t"] == tenant.id
        assert payload["u"] == user_id
        assert payload["c"] == chat["id"]
        assert abs(payload["exp"] - parse_iso(body["expires_at"]).timestamp()) < 1


def test_tampered_connection_string_does_not_verify(app, tenant):
    from app.tokens import TokenInvalid, verify_connection_string

    chat = tenant.chat("alice")
    token = tenant.api.post(f"/api/v1/chats/{chat['id']}/connection-string",
                            json={"user_id": "alice"}).get_json()["connection_string"]
    tampered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    with app.app_context(), pytest.raises(TokenInvalid):
        verify_connection_string(tampered)


def test_connection_string_for_a_non_member_is_forbidden(tenant):
    chat = tenant.chat("alice")
    tenant.workspace("bob")  # bob exists in the tenant, but is not a member
    url = f"/api/v1/chats/{chat['id']}/connection-string"
    assert_error(tenant.api.post(url, json={"user_id": "bob"}), 403, "forbidden")
    assert_error(tenant.api.post(url, json={"user_id": "never-seen"}), 403, "forbidden")


@pytest.mark.parametrize("body", [{}, {"user_id": ""}, {"user_id": "bad user"},
                                  {"user_id": "x" * 129}, {"user_id": 5},
                                  {"user_id": "alice", "chat_id": "x"}])
def test_connection_string_with_invalid_body_is_a_validation_error(tenant, body):
    chat = tenant.chat("alice")
    error = assert_error(tenant.api.post(f"/api/v1/chats/{chat['id']}/connection-string",
                                         json=body), 400, "validation_error")
    assert error["details"]


def test_connection_string_for_unknown_chat_is_chat_not_found(tenant):
    assert_error(tenant.api.post("/api/v1/chats/" + "0" * 32 + "/connection-string",
                                 json={"user_id": "alice"}), 404, "chat_not_found")


def test_connection_string_for_a_deleted_chat_is_chat_not_found(tenant):
    chat = tenant.chat("alice")
    assert tenant.api.delete(f"/api/v1/chats/{chat['id']}").status_code == 204
    assert_error(tenant.api.post(f"/api/v1/chats/{chat['id']}/connection-string",
                                 json={"user_id": "alice"}), 404, "chat_not_found")


def test_creating_a_chat_without_the_trailing_slash_works_too(tenant):
    r = tenant.api.post("/api/v1/chats", json={"user_id": "alice", "title": "No slash"})
    assert r.status_code == 201, r.get_data(as_text=True)
    assert r.get_json()["title"] == "No slash"
