"""Agents end to end: a recording HTTP listener on loopback (the agent's destination), "a
workspace with agent X, a chat and a connected client" and asking it a question, and direct
access to a live server's stored agent."""
from __future__ import annotations

import ipaddress
import json
import pathlib
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest
import requests
import sqlalchemy

from app.agents import net
from tests.kit.clients import Clients
from tests.kit.rest import Tenant, new_tenant
from tests.kit.sio import ChatClient, join as join_chat

WAIT = 15.0


class Listener:
    """An HTTP server of the test's own on 127.0.0.1 that records every request it gets.

    ``routes`` maps a path to (status, headers, body); anything else is 200 JSON
    ``{"content": "ok"}``."""

    def __init__(self, routes: dict[str, tuple[int, dict[str, str], bytes]] | None = None):
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.routes = routes or {}
        listener = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with listener.lock:
                    listener.requests.append({"path": self.path, "headers": dict(self.headers),
                                              "body": body})
                status, headers, payload = listener.routes.get(
                    self.path, (200, {"Content-Type": "application/json"},
                                b'{"content": "ok"}'))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(payload)
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def recorded(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.requests)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def join(tenant: Tenant, chat: str, user: str = "ann", transport: str = "websocket",
         **auth: Any) -> ChatClient:
    """A client joined to ``chat`` with a connection string (as a browser would), past
    connection_established; ``auth`` adds to its auth payload."""
    return join_chat(tenant.url, {"chat_id": chat,
                                  "connection_string": tenant.connection_string(chat, user),
                                  **auth}, transport)


@dataclass
class AgentChat:
    """A new tenant's workspace with an agent, a chat in it, and its users' joined clients.
    Unpacks as ``tenant, chat, clients``."""

    tenant: Tenant
    workspace: str
    chat: str
    clients: tuple[ChatClient, ...]

    def __iter__(self) -> Iterator[Any]:
        return iter((self.tenant, self.chat, self.clients))


@pytest.fixture
def agent_chat():
    """agent_chat(server, agent, *users, members=None, transports=None) -> AgentChat.

    On ``server``: a new tenant, a workspace with ``agent`` owned by the first user (the
    others its members, or ``members``), a chat of the owner's in it, and one client per user
    joined with a connection string (over ``transports[user]``, websocket by default). The
    clients are disconnected at the end of the test."""
    opened = Clients()

    def make(server: Any, agent: dict, *users: str, members: tuple[str, ...] | None = None,
             transports: dict[str, str] | None = None) -> AgentChat:
        tenant = new_tenant(server.url)
        owner = users[0] if users else "ann"
        workspace = tenant.workspace(owner, members=tuple(users[1:]) if members is None
                                     else members, agent=agent)
        chat = tenant.chat(owner, workspace)
        clients = tuple(opened.add(join(tenant, chat, user,
                                        (transports or {}).get(user, "websocket")))
                        for user in users)
        return AgentChat(tenant, workspace, chat, clients)

    yield make
    opened.close_all()


def ask(client: ChatClient, content: str) -> tuple[dict, dict | None]:
    """Send a message, wait for its reply to end; (message_stream_ended, agent_error or None)."""
    string = client.call("get_message_string")["message_string"]
    ack = client.send(content, string)
    assert ack["ok"] is True, ack
    started = client.wait_event("message_stream_started",
                                lambda d: d["reply_to"] == ack["message"]["id"], WAIT)
    message_id = started["message_id"]
    ended = client.wait_event("message_stream_ended", lambda d: d["message_id"] == message_id,
                              WAIT)
    with client.cond:
        errors = [d for e, d in client.events if e == "error" and d.get("code") == "agent_error"
                  and (d.get("details") or {}).get("message_id") == message_id]
    return ended, (errors[0] if errors else None)


def ask_once(tenant: Tenant, agent: dict, content: str = "hello") -> tuple[dict, dict | None]:
    """A new workspace with ``agent``, one chat, one message: how its reply ended."""
    chat = tenant.chat("ann", tenant.workspace("ann", agent=agent))
    client = join(tenant, chat)
    try:
        return ask(client, content)
    finally:
        client.disconnect()


def validation_details(response: requests.Response) -> dict:
    assert response.status_code == 400, (response.status_code, response.text)
    error = response.json()["error"]
    assert error["code"] == "validation_error", error
    return error["details"]


def database_engine(server) -> sqlalchemy.Engine:
    return sqlalchemy.create_engine(server.env["DATABASE_URL"])


def set_stored_agent(server, workspace_id: str, agent: dict) -> None:
    """Replace a workspace's stored agent in the database, as an older version or an
    operator's earlier settings would have left it."""
    from app.models import Workspace

    engine = database_engine(server)
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.update(Workspace.__table__)
                         .where(Workspace.__table__.c.id == workspace_id).values(agent=agent))
    finally:
        engine.dispose()


def stored_agent_text(server, workspace_id: str) -> str:
    """The workspace's agent column as the database holds it."""
    engine = database_engine(server)
    try:
        with engine.connect() as conn:
            value = conn.execute(sqlalchemy.text("SELECT agent FROM workspaces WHERE id = :id"),
                                 {"id": workspace_id}).scalar_one()
    finally:
        engine.dispose()
    return value if isinstance(value, str) else json.dumps(value)


def loopback_names() -> list[str]:
    """Names /etc/hosts maps to a loopback address, other than localhost (read at test time)."""
    names = []
    for line in pathlib.Path("/etc/hosts").read_text().splitlines():
        fields = line.split("#")[0].split()
        if len(fields) < 2:
            continue
        try:
            address = ipaddress.ip_address(fields[0])
        except ValueError:
            continue
        if address.is_loopback:
            names += [n for n in fields[1:] if not net.is_local_name(n)]
    return names
