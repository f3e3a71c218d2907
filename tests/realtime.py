"""Helpers for end-to-end tests of the real-time side against a live server process."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import requests
import socketio
import websocket
from engineio.payload import Payload

from workspace_chat_client.client import OrderedSocketIOClient

# python-engineio's client drops a long-polling response holding more than 16 packets (a
# replay or a fast stream does hold more), so clients over polling must raise the limit.
Payload.max_decode_packets = 10_000

from tests.conftest import ADMIN_TOKEN

NAMESPACE = "/chat"


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


def new_tenant(url: str, name: str = "Acme") -> Tenant:
    r = requests.post(url + "/admin/tenants", json={"name": name},
                      headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
    assert r.status_code == 201, r.text
    return Tenant(url, r.json()["id"], r.json()["api_key"])


@dataclass
class ChatClient:
    """A python-socketio client on /chat that records every event it receives, in order."""

    sio: socketio.Client
    events: list[tuple[str, Any]] = field(default_factory=list)
    connect_error: Any = None
    cond: threading.Condition = field(default_factory=threading.Condition)

    def _record(self, event: str, *args: Any) -> None:
        with self.cond:
            self.events.append((event, args[0] if len(args) == 1 else list(args)))
            self.cond.notify_all()

    def named(self, name: str) -> list[Any]:
        with self.cond:
            return [data for event, data in self.events if event == name]

    def names(self) -> list[str]:
        with self.cond:
            return [event for event, _ in self.events]

    def wait_for(self, name: str, count: int = 1, timeout: float = 10) -> list[Any]:
        """Wait until ``count`` events called ``name`` arrived; return them all."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while len([1 for e, _ in self.events if e == name]) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"waited {timeout}s for {count} x {name!r}; got "
                                         f"{[e for e, _ in self.events]}")
                self.cond.wait(remaining)
            return [data for event, data in self.events if event == name]

    @property
    def message_string(self) -> str:
        return self.wait_for("connection_established")[0]["message_string"]

    def call(self, event: str, data: Any = None, timeout: float = 10) -> Any:
        return self.sio.call(event, data if data is not None else {}, namespace=NAMESPACE,
                             timeout=timeout)

    def send(self, content: str, message_string: str, **extra: Any) -> dict:
        return self.call("message", {"content": content, "message_string": message_string,
                                     **extra})

    def disconnect(self) -> None:
        if self.sio.connected:
            self.sio.disconnect()


def connect(url: str, auth: dict | None = None, transport: str = "websocket",
            query: str = "") -> ChatClient:
    """Connect to /chat; on refusal the client is returned with ``connect_error`` set."""
    # python-socketio's own Client handles each packet in a new thread, so a loaded machine
    # could record events out of the order they arrived in.
    sio = OrderedSocketIOClient(reconnection=False)
    client = ChatClient(sio)
    sio.on("*", client._record, namespace=NAMESPACE)

    def on_connect_error(data: Any) -> None:
        client.connect_error = data

    sio.on("connect_error", on_connect_error, namespace=NAMESPACE)
    try:
        sio.connect(url + (f"?{query}" if query else ""), namespaces=[NAMESPACE], auth=auth,
                    transports=[transport], wait_timeout=10)
    except socketio.exceptions.ConnectionError:
        if client.connect_error is None:
            raise
    return client


def refusal_code(client: ChatClient) -> str | None:
    """The contract code of a refused connection (python-socketio shape)."""
    error = client.connect_error
    if error is None:
        return None
    return (error.get("data") or {}).get("code")


class PlainClient:
    """A websocket-client connection that reads JSON frames with bounded waits."""

    def __init__(self, server, **params):
        url = server.url.replace("http://", "ws://") + "/ws/chat?" + urlencode(params)
        self.ws = websocket.create_connection(url, timeout=10)
        self.frames: list[dict] = []

    def next(self) -> dict:
        raw = self.ws.recv()
        if raw == "":  # websocket-client's answer to a close frame
            raise websocket.WebSocketConnectionClosedException("closed by the server")
        frame = json.loads(raw)
        self.frames.append(frame)
        return frame

    def until(self, event: str, count: int = 1) -> list[dict]:
        """Read frames until ``count`` frames named ``event`` arrived; return their data."""
        while sum(1 for f in self.frames if f["event"] == event) < count:
            self.next()
        return [f["data"] for f in self.frames if f["event"] == event]

    def send(self, frame) -> None:
        self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    def close(self) -> None:
        self.ws.close()
