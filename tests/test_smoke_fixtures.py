def test_a_tenant_creates_a_chat_in_its_default_workspace(tenant):
    chat = tenant.chat("alice")
    r = tenant.api.get(f"/api/v1/chats/{chat['id']}")
    assert r.status_code == 200 and r.get_json()["user_id"] == "alice"
