"""The /chat namespace driven by the JavaScript client the contract names: socket.io-client 4.x
on Node (tests/node/chat_client.mjs), against the real server under eventlet and gevent."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from tests.kit.node import NODE_DIR, npm_installed, run_node
from tests.kit.rest import Tenant, new_tenant
from tests.kit.sio import connect

pytestmark = pytest.mark.e2e

SCRIPT = "chat_client.mjs"


@dataclass
class NodeRun:
    lines: list[dict]

    @property
    def events(self) -> list[tuple[str, Any]]:
        return [(line["event"], line["data"]) for line in self.lines if "event" in line]

    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    def named(self, name: str) -> list[Any]:
        return [data for event, data in self.events if event == name]

    @property
    def acks(self) -> list[dict]:
        return [line["ack"] for line in self.lines if "ack" in line]

    @property
    def final(self) -> dict:
        return self.lines[-1]


@pytest.fixture(scope="session")
def node_client():
    """Runs the socket.io-client script; installs tests/node from its lockfile if needed."""
    node = npm_installed(NODE_DIR, fallback_to_install=True)

    def run(config: dict[str, Any], timeout: float = 60) -> NodeRun:
        process, output = run_node(node, NODE_DIR, SCRIPT, config, timeout)
        lines = [json.loads(line) for line in output]
        assert process.returncode == 0, (process.returncode, lines, process.stderr)
        assert lines and ("done" in lines[-1] or "connect_error" in lines[-1]), (
            lines, process.stderr)
        return NodeRun(lines)

    return run


def string_auth(tenant: Tenant, chat: str, user: str) -> dict:
    return {"chat_id": chat, "connection_string": tenant.connection_string(chat, user)}


@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_node_client_connects_sends_and_receives_its_messages(rt_server, node_client,
                                                              transport):
    tenant = new_tenant(rt_server.url)
    ws = tenant.workspace("ann", members=("bob",))
    chat = tenant.chat("ann", ws)
    observer = connect(rt_server.url, {"chat_id": chat, "api_key": tenant.key,
                                       "user_id": "ann"})
    try:
        observer.wait_for("connection_established")
        contents = ["hello from node", "second — ünïcödé ✓", "third"]
        run = node_client({"url": rt_server.url, "auth": string_auth(tenant, chat, "bob"),
                           "transports": [transport], "messages": contents})

        connected = [line["connect"] for line in run.lines if "connect" in line]
        assert connected and connected[0]["transport"] == transport
        assert run.names()[:2] == ["user_created", "connection_established"]
        assert run.named("user_created") == [{"user_id": "bob"}]
        established = run.named("connection_established")[0]
        assert established["chat_id"] == chat and established["user_id"] == "bob"
        assert established["sid"] and established["message_string"]
        assert established["message_string_expires_at"].endswith("Z")

        acks = run.acks
        assert len(acks) == 3, run.lines
        strings = [established["message_string"]]
        for ack, content in zip(acks, contents):
            assert ack["ok"] is True, ack
            assert ack["message"]["content"] == content
            assert ack["message"]["user_id"] == "bob" and ack["message"]["role"] == "user"
            assert ack["next_message_string"]
            strings.append(ack["next_message_string"])
        assert len(set(strings)) == len(strings)  # every message string is new

        history = tenant.history(chat)
        assert [ack["message"] for ack in acks] == history
        assert run.named("message_received") == history
        assert set(run.names()[2:]) == {"message_received"}
        assert run.final["done"] == {"events": 5, "acked": 3, "own_received": True,
                                     "expected": True}

        # A python-socketio client in the same chat got the node client's messages.
        assert observer.wait_for("message_received", 3) == history
    finally:
        observer.disconnect()

    # user_created only comes with the user's very first connection.
    again = node_client({"url": rt_server.url, "auth": string_auth(tenant, chat, "bob"),
                         "transports": [transport]})
    assert again.names() == ["connection_established"]


@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_node_client_reconnecting_with_last_message_id_gets_the_missed_messages(
        rt_server, node_client, transport):
    tenant = new_tenant(rt_server.url)
    chat = tenant.chat("ann")
    first = node_client({"url": rt_server.url, "auth": string_auth(tenant, chat, "ann"),
                         "transports": [transport], "messages": ["one", "two", "three"]})
    sent = [ack["message"] for ack in first.acks]
    assert len(sent) == 3

    again = node_client({"url": rt_server.url,
                         "auth": {**string_auth(tenant, chat, "ann"),
                                  "last_message_id": sent[0]["id"]},
                         "transports": [transport], "expect": {"message_received": 2}})
    assert again.final["done"]["expected"] is True
    assert again.names() == ["connection_established", "message_received", "message_received"]
    assert again.named("connection_established")[0]["history_truncated"] is False
    assert again.named("message_received") == sent[1:]


@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_node_client_sees_refusals_as_connect_error_with_message_and_code(
        rt_server, node_client, transport):
    tenant = new_tenant(rt_server.url)
    chat = tenant.chat("ann")
    other = tenant.chat("ann")

    forged = node_client({"url": rt_server.url, "transports": [transport],
                          "auth": {"chat_id": chat, "connection_string": "forged"}})
    error = forged.final["connect_error"]
    assert error["code"] == "invalid_connection_string"
    assert error["message"] and error["message"] != error["code"] and " " in error["message"]
    assert not forged.events

    # A genuine connection string presented for another chat.
    elsewhere = node_client({"url": rt_server.url, "transports": [transport],
                             "auth": {"chat_id": other,
                                      "connection_string": tenant.connection_string(chat)}})
    assert elsewhere.final["connect_error"]["code"] == "invalid_connection_string"

    unknown = node_client({"url": rt_server.url, "transports": [transport],
                           "auth": {"chat_id": "no-such-chat", "api_key": tenant.key,
                                    "user_id": "ann"}})
    error = unknown.final["connect_error"]
    assert error["code"] == "chat_not_found"
    assert error["message"] and error["message"] != error["code"]
    assert not unknown.events
