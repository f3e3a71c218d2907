"""Tenant isolation: another tenant's objects are invisible (404, never 403) on every route.

Each attempt is made by ``other_tenant`` against objects owned by ``tenant``; afterwards the
owning tenant must find everything exactly as it was.
"""
import pytest

from tests.conftest import assert_error

MESSAGE_COUNT = 3


@pytest.fixture
def owned(tenant):
    """A workspace of `alice` with member `bob`, and a chat in it holding a few messages."""
    workspace = tenant.workspace("alice", "Team")
    r = tenant.api.put(f"/api/v1/workspaces/{workspace['id']}/members/bob")
    assert r.status_code == 204, r.get_json()
    chat = tenant.chat("alice", workspace_id=workspace["id"], title="Plans",
                       metadata={"topic": "roadmap"})
    message_ids = tenant.messages(chat["id"], MESSAGE_COUNT)
    return {"workspace": workspace, "chat": chat, "message_ids": message_ids}


def assert_owner_sees_everything_unchanged(tenant, owned) -> None:
    workspace, chat = owned["workspace"], owned["chat"]

    r = tenant.api.get(f"/api/v1/workspaces/{workspace['id']}")
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["name"] == "Team"
    assert body["owner_id"] == "alice"
    assert body["members"] == ["bob"]
    assert body["agent"] == {"kind": "none"}

    r = tenant.api.get(f"/api/v1/chats/{chat['id']}")
    assert r.status_code == 200, r.get_json()
    assert {k: r.get_json()[k] for k in ("workspace_id", "user_id", "title", "metadata")} == {
        "workspace_id": workspace["id"], "user_id": "alice", "title": "Plans",
        "metadata": {"topic": "roadmap"}}

    r = tenant.api.get(f"/api/v1/chats/{chat['id']}/messages")
    assert r.status_code == 200, r.get_json()
    page = r.get_json()
    assert page["total"] == MESSAGE_COUNT
    assert [m["id"] for m in page["messages"]] == owned["message_ids"]
    assert [m["content"] for m in page["messages"]] == [f"message {i}"
                                                        for i in range(MESSAGE_COUNT)]

    r = tenant.api.get("/api/v1/chats/user/alice")
    assert r.status_code == 200
    assert [c["id"] for c in r.get_json()["chats"]] == [chat["id"]]

    r = tenant.api.get("/api/v1/workspaces/user/alice")
    assert r.status_code == 200
    assert [w["id"] for w in r.get_json()["workspaces"]] == [workspace["id"]]

    r = tenant.api.get("/api/v1/workspaces/user/bob")
    assert [w["id"] for w in r.get_json()["workspaces"]] == [workspace["id"]]


# (method, path template, JSON body, expected error code)
FOREIGN_OBJECT_ROUTES = [
    pytest.param("get", "/api/v1/workspaces/{workspace_id}", None, "workspace_not_found",
                 id="GET workspace"),
    pytest.param("patch", "/api/v1/workspaces/{workspace_id}",
                 {"name": "Hijacked", "agent": {"kind": "echo"}}, "workspace_not_found",
                 id="PATCH workspace"),
    pytest.param("delete", "/api/v1/workspaces/{workspace_id}", None, "workspace_not_found",
                 id="DELETE workspace"),
    pytest.param("put", "/api/v1/workspaces/{workspace_id}/members/mallory", None,
                 "workspace_not_found", id="PUT member"),
    pytest.param("put", "/api/v1/workspaces/{workspace_id}/members/alice", None,
                 "workspace_not_found", id="PUT member with a user id both tenants have"),
    pytest.param("delete", "/api/v1/workspaces/{workspace_id}/members/bob", None,
                 "workspace_not_found", id="DELETE member"),
    pytest.param("get", "/api/v1/chats/{chat_id}", None, "chat_not_found", id="GET chat"),
    pytest.param("delete", "/api/v1/chats/{chat_id}", None, "chat_not_found", id="DELETE chat"),
    pytest.param("get", "/api/v1/chats/{chat_id}/messages", None, "chat_not_found",
                 id="GET messages"),
    pytest.param("get", "/api/v1/chats/{chat_id}/messages?order=desc&limit=1", None,
                 "chat_not_found", id="GET messages desc"),
    pytest.param("post", "/api/v1/chats/{chat_id}/connection-string", {"user_id": "alice"},
                 "chat_not_found", id="POST connection-string for the owner's user id"),
    pytest.param("post", "/api/v1/chats/{chat_id}/connection-string", {"user_id": "bob"},
                 "chat_not_found", id="POST connection-string for the member's user id"),
    pytest.param("post", "/api/v1/chats/", {"user_id": "alice", "workspace_id": "{workspace_id}"},
                 "workspace_not_found", id="POST /api/v1/chats/ into the foreign workspace"),
    pytest.param("post", "/chat", {"user_id": "alice", "workspace_id": "{workspace_id}"},
                 "workspace_not_found", id="POST /chat into the foreign workspace"),
]


def _fill(value, ids):
    if isinstance(value, str):
        return value.format(**ids)
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    return value


@pytest.mark.parametrize("method,path,body,code", FOREIGN_OBJECT_ROUTES)
def test_another_tenant_gets_404_and_changes_nothing(tenant, other_tenant, owned,
                                                     method, path, body, code):
    # The other tenant has its own `alice`: the same user_id, a different user.
    other_tenant.workspace("alice", "Globex team")
    ids = {"workspace_id": owned["workspace"]["id"], "chat_id": owned["chat"]["id"]}
    kwargs = {"json": _fill(body, ids)} if body is not None else {}

    r = getattr(other_tenant.api, method)(_fill(path, ids), **kwargs)

    assert_error(r, 404, code)
    assert_owner_sees_everything_unchanged(tenant, owned)
    # Nothing was created for the other tenant's users either.
    r = other_tenant.api.get("/api/v1/chats/user/alice")
    assert r.status_code == 200 and r.get_json()["total"] == 0
    r = other_tenant.api.get("/api/v1/workspaces/user/mallory")
    assert r.status_code == 200 and r.get_json()["total"] == 0


@pytest.mark.parametrize("listing,key,user_id", [
    ("/api/v1/workspaces/user/{user_id}", "workspaces", "alice"),  # the owner
    ("/api/v1/workspaces/user/{user_id}", "workspaces", "bob"),  # a member
    ("/api/v1/chats/user/{user_id}", "chats", "alice"),
])
def test_listing_a_user_known_only_to_another_tenant_gives_an_empty_page(
        tenant, other_tenant, owned, listing, key, user_id):
    path = listing.format(user_id=user_id)
    mine = tenant.api.get(path)
    assert mine.status_code == 200 and mine.get_json()["total"] == 1  # the owning tenant sees it

    r = other_tenant.api.get(path)

    assert r.status_code == 200, r.get_json()
    assert r.get_json() == {key: [], "total": 0, "offset": 0, "limit": 50, "has_more": False}
    assert_owner_sees_everything_unchanged(tenant, owned)


def test_the_same_user_id_in_two_tenants_is_two_different_users(tenant, other_tenant, owned):
    theirs_ws = other_tenant.workspace("alice", "Globex team")
    theirs_chat = other_tenant.chat("alice", workspace_id=theirs_ws["id"], title="Theirs")

    mine = tenant.api.get("/api/v1/workspaces/user/alice").get_json()
    theirs = other_tenant.api.get("/api/v1/workspaces/user/alice").get_json()
    assert [w["id"] for w in mine["workspaces"]] == [owned["workspace"]["id"]]
    assert [w["id"] for w in theirs["workspaces"]] == [theirs_ws["id"]]

    mine = tenant.api.get("/api/v1/chats/user/alice").get_json()
    theirs = other_tenant.api.get("/api/v1/chats/user/alice").get_json()
    assert [c["id"] for c in mine["chats"]] == [owned["chat"]["id"]]
    assert [c["id"] for c in theirs["chats"]] == [theirs_chat["id"]]

    # `alice` of the other tenant owns nothing here: neither side reaches the other's objects.
    assert_error(other_tenant.api.get(f"/api/v1/workspaces/{owned['workspace']['id']}"),
                 404, "workspace_not_found")
    assert_error(tenant.api.get(f"/api/v1/chats/{theirs_chat['id']}"), 404, "chat_not_found")
    assert_error(tenant.api.post("/api/v1/chats/", json={"user_id": "alice",
                                                         "workspace_id": theirs_ws["id"]}),
                 404, "workspace_not_found")
    assert_owner_sees_everything_unchanged(tenant, owned)


def test_a_member_of_a_foreign_workspace_gets_no_connection_string(tenant, other_tenant, owned):
    # `bob` is a member in the first tenant; the other tenant's `bob` is somebody else.
    other_tenant.workspace("bob", "Bob's own")
    r = other_tenant.api.post(f"/api/v1/chats/{owned['chat']['id']}/connection-string",
                              json={"user_id": "bob"})
    assert_error(r, 404, "chat_not_found")
    assert "connection_string" not in r.get_data(as_text=True)
