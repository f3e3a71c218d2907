"""A tenant of a live server over REST (requests): its workspaces, chats, connection strings
and history, and the admin call that creates it."""
from __future__ import annotations

from dataclasses import dataclass

import requests

from tests.kit.servers import ADMIN_TOKEN

ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass
class Tenant:
    url: str
    id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.key}

    def post(self, path: str, body: dict | None = None) -> requests.Response:
        return requests.post(self.url + path, json=body or {}, headers=self.headers, timeout=10)

    def chat(self, owner: str = "ann", workspace_id: str | None = None, **body) -> str:
        payload = {"user_id": owner, **body}
        if workspace_id:
            payload["workspace_id"] = workspace_id
        r = self.post("/api/v1/chats/", payload)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def workspace(self, owner: str = "ann", members: tuple[str, ...] = (), **body) -> str:
        r = self.post("/api/v1/workspaces", {"owner_id": owner, "name": "Team", **body})
        assert r.status_code == 201, r.text
        ws = r.json()["id"]
        for member in members:
            assert requests.put(f"{self.url}/api/v1/workspaces/{ws}/members/{member}",
                                headers=self.headers, timeout=10).status_code == 204
        return ws

    def connection_string(self, chat_id: str, user_id: str = "ann") -> str:
        r = self.post(f"/api/v1/chats/{chat_id}/connection-string", {"user_id": user_id})
        assert r.status_code == 200, r.text
        return r.json()["connection_string"]

    def history(self, chat_id: str, **params) -> list[dict]:
        r = requests.get(f"{self.url}/api/v1/chats/{chat_id}/messages",
                         params={"limit": 200, **params}, headers=self.headers, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()["messages"]

    def key_auth(self, chat_id: str, user_id: str = "ann", **extra) -> dict:
        """A trusted client's /chat auth payload: this tenant's API key and a user id."""
        return {"chat_id": chat_id, "api_key": self.key, "user_id": user_id, **extra}


def new_tenant(url: str, name: str = "Acme") -> Tenant:
    r = requests.post(url + "/admin/tenants", json={"name": name}, headers=ADMIN_HEADERS,
                      timeout=10)
    assert r.status_code == 201, r.text
    return Tenant(url, r.json()["id"], r.json()["api_key"])
