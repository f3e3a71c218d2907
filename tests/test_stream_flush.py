"""STREAM_FLUSH_MS (CONTRACT.md sections 3 and 6): at most one ``message_stream_token`` per
reply per window, tokens that arrive meanwhile joined as one event, ``index`` gap-free, the
joined tokens equal to the content; 0 sends every token as its own event.

The real server process (eventlet and gevent), the scripted python agent of tests/agents.py.
Every wait is on an event; the only timing assertions are coarse bounds on event counts.
"""
from __future__ import annotations

from typing import Any

import pytest

from app.config import from_env
from tests import agents
from tests.kit.rest import Tenant, new_tenant
from tests.kit.servers import start_server, stop_server
from tests.kit.sio import ChatClient, connect

pytestmark = pytest.mark.e2e

BASE_ENV = {"RATE_LIMIT_MESSAGES": "1000/second", "AGENT_TIMEOUT": "30",
            "PYTHON_AGENTS": agents.ALLOWED}
SERVER_ENV = {**BASE_ENV, "STREAM_FLUSH_MS": "20"}
SCRIPTED = {"kind": "python", "callable": "tests.agents:scripted"}
WAIT = 30.0


@pytest.fixture(scope="module", params=["eventlet", "gevent"])
def unflushed_server(request, tmp_path_factory):
    """A second real server with STREAM_FLUSH_MS=0: one event per token."""
    server = start_server(tmp_path_factory.mktemp(f"flush0-{request.param}"),
                          ASYNC_MODE=request.param, **BASE_ENV, STREAM_FLUSH_MS="0")
    yield server
    stop_server(server.process)


# --- helpers -------------------------------------------------------------------------------

def join(tenant: Tenant, chat: str, user: str = "ann", **auth: Any) -> ChatClient:
    client = connect(tenant.url, {"chat_id": chat, "api_key": tenant.key, "user_id": user,
                                  **auth})
    assert client.connect_error is None, client.connect_error
    client.wait_for("connection_established")
    return client


def post(client: ChatClient, content: str) -> dict:
    string = client.call("get_message_string")["message_string"]
    ack = client.send(content, string)
    assert ack["ok"] is True, ack
    return ack["message"]


def scripted_chat(url: str) -> tuple[Tenant, str]:
    tenant = new_tenant(url)
    return tenant, tenant.chat("ann", tenant.workspace("ann", members=("bob",),
                                                       agent=SCRIPTED))


def reply_to(client: ChatClient, user: dict) -> tuple[str, list[dict], dict, list[str]]:
    """Wait for the reply to ``user`` to end: (message id, its token events, its
    message_stream_ended, the names of its events in order of arrival)."""
    def ended_reply() -> list[dict] | None:
        ids = {d["message_id"] for d in client.named("message_stream_started")
               if d["reply_to"] == user["id"]}
        return [d for d in client.named("message_stream_ended") if d["message_id"] in ids]

    ended = client.wait_until(ended_reply, WAIT, f"the reply to {user['id']}")
    message_id = ended[0]["message_id"]
    with client.cond:
        mine = [(e, d) for e, d in client.events
                if isinstance(d, dict) and d.get("message_id") == message_id]
    tokens = [d for e, d in mine if e == "message_stream_token"]
    return message_id, tokens, ended[0], [e for e, _ in mine]


def assert_well_formed(tenant: Tenant, chat: str, message_id: str, tokens: list[dict],
                       ended: dict, names: list[str], content: str) -> None:
    """Indexes 0..n-1 without gaps; joined tokens == ended content == stored content; every
    token event before message_stream_ended."""
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert all(t["token"] for t in tokens)
    assert "".join(t["token"] for t in tokens) == ended["content"] == content
    assert names[-1] == "message_stream_ended", names
    stored = next(m for m in tenant.history(chat) if m["id"] == message_id)
    assert stored["content"] == content


def words(count: int) -> str:
    return "".join(f"t{i} " for i in range(count))


# --- the setting ---------------------------------------------------------------------------

def test_stream_flush_ms_defaults_to_20_and_refuses_negative_values(tmp_path):
    assert from_env({}, str(tmp_path))["STREAM_FLUSH_MS"] == 20
    assert from_env({"STREAM_FLUSH_MS": "0"}, str(tmp_path))["STREAM_FLUSH_MS"] == 0
    assert from_env({"STREAM_FLUSH_MS": "50"}, str(tmp_path))["STREAM_FLUSH_MS"] == 50
    with pytest.raises(RuntimeError, match="STREAM_FLUSH_MS must be 0 or more"):
        from_env({"STREAM_FLUSH_MS": "-1"}, str(tmp_path))
    with pytest.raises(RuntimeError, match="STREAM_FLUSH_MS must be an integer"):
        from_env({"STREAM_FLUSH_MS": "fast"}, str(tmp_path))


# --- STREAM_FLUSH_MS=20 --------------------------------------------------------------------

def test_a_burst_of_tokens_goes_out_in_far_fewer_events(rt_server):
    tenant, chat = scripted_chat(rt_server.url)
    ann = join(tenant, chat)
    bob = join(tenant, chat, "bob")
    try:
        user = post(ann, "tokens 200")  # 200 tokens, no delay between them
        for client in (ann, bob):
            message_id, tokens, ended, names = reply_to(client, user)
            assert ended["finish_reason"] == "stop"
            assert_well_formed(tenant, chat, message_id, tokens, ended, names, words(200))
            assert len(tokens) < 100, len(tokens)  # coarse: joined, not one per token
    finally:
        ann.disconnect()
        bob.disconnect()


def test_tokens_slower_than_the_window_go_out_one_event_each(rt_server):
    tenant, chat = scripted_chat(rt_server.url)
    ann = join(tenant, chat)
    try:
        user = post(ann, "tokens 8 0.1")  # 100 ms apart, the window is 20 ms
        message_id, tokens, ended, names = reply_to(ann, user)
        assert_well_formed(tenant, chat, message_id, tokens, ended, names, words(8))
        assert [t["token"] for t in tokens] == [f"t{i} " for i in range(8)]
    finally:
        ann.disconnect()


def test_held_text_goes_out_before_an_error_ends_the_reply(rt_server):
    tenant, chat = scripted_chat(rt_server.url)
    ann = join(tenant, chat)
    try:
        user = post(ann, "fail 50")  # 50 tokens at once, then the agent raises
        message_id, tokens, ended, names = reply_to(ann, user)
        assert ended["finish_reason"] == "error"
        assert_well_formed(tenant, chat, message_id, tokens, ended, names, words(50))
        assert len(tokens) < 50
    finally:
        ann.disconnect()


def test_held_text_goes_out_before_a_stop_ends_the_reply(rt_server):
    tenant, chat = scripted_chat(rt_server.url)
    ann = join(tenant, chat)
    try:
        user = post(ann, "tokens 2000 0.002")
        ann.wait_for("message_stream_token", 3, timeout=WAIT)
        assert ann.call("stop_generation") == {"ok": True, "stopped": True}
        message_id, tokens, ended, names = reply_to(ann, user)
        assert ended["finish_reason"] == "cancelled"
        content = ended["content"]
        assert content and words(2000).startswith(content) and content != words(2000)
        assert_well_formed(tenant, chat, message_id, tokens, ended, names, content)
    finally:
        ann.disconnect()


def test_a_client_joining_mid_stream_gets_content_so_far_and_exactly_the_rest(rt_server):
    tenant, chat = scripted_chat(rt_server.url)
    ann = join(tenant, chat)
    late = None
    try:
        user = post(ann, "tokens 300 0.005")  # ~1.5 s or more, several tokens per event
        ann.wait_for("message_stream_token", 3, timeout=WAIT)
        late = join(tenant, chat, "ann", last_message_id=user["id"])  # a reconnect
        message_id, tokens, ended, names = reply_to(ann, user)
        assert_well_formed(tenant, chat, message_id, tokens, ended, names, words(300))
        assert len(tokens) < 300

        late.wait_for("message_stream_ended", timeout=WAIT)
        with late.cond:
            events = list(late.events)
        assert [e for e, _ in events[:2]] == ["connection_established",
                                              "message_stream_started"], events[:3]
        started = events[1][1]
        assert started["message_id"] == message_id and started["reply_to"] == user["id"]
        rest = [d for e, d in events[2:] if e == "message_stream_token"]
        assert [e for e, _ in events[2:]] == ["message_stream_token"] * len(rest) + [
            "message_stream_ended"]
        assert rest, "the reply ended before the late client joined: nothing to test"
        first = rest[0]["index"]
        # Exactly the events it had not got in content_so_far: the same as ann's from there.
        assert rest == tokens[first:]
        assert started["content_so_far"] == "".join(t["token"] for t in tokens[:first])
        assert started["content_so_far"] + "".join(t["token"] for t in rest) == words(300)
        assert events[-1][1] == ended
    finally:
        ann.disconnect()
        if late is not None:
            late.disconnect()


# --- STREAM_FLUSH_MS=0 ---------------------------------------------------------------------

def test_zero_sends_every_token_as_its_own_event(unflushed_server):
    tenant, chat = scripted_chat(unflushed_server.url)
    ann = join(tenant, chat)
    try:
        user = post(ann, "tokens 100")  # a burst, no delay
        message_id, tokens, ended, names = reply_to(ann, user)
        assert_well_formed(tenant, chat, message_id, tokens, ended, names, words(100))
        assert [t["token"] for t in tokens] == [f"t{i} " for i in range(100)]
    finally:
        ann.disconnect()
