"""Agents end to end (CONTRACT.md sections 3 and 5): the real server process (eventlet and
gevent) answering through each agent kind, with real clients and, for the HTTP kinds, real
HTTP servers on loopback in this process (an OpenAI-compatible model server and a webhook).

Every wait is on an event; a test never sleeps to let something happen. Orders are asserted
by order of arrival, never by timing.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from tests import agents
from tests.kit.agents import agent_chat, join  # noqa: F401 (agent_chat: a fixture)
from tests.kit.rest import Tenant, new_tenant
from tests.kit.sio import ChatClient, join as join_chat

pytestmark = pytest.mark.e2e

AGENT_TIMEOUT = 5.0
SERVER_ENV = {"RATE_LIMIT_MESSAGES": "1000/second", "AGENT_TIMEOUT": f"{AGENT_TIMEOUT:g}",
              # the model server and webhook here listen on loopback
              "PYTHON_AGENTS": agents.ALLOWED, "AGENT_ALLOW_PRIVATE_NETWORKS": "1",
              # per-token checks (exact token lists, mid-stream joins token by token): one
              # event per token; the joined events are tests/test_stream_flush.py's subject
              "STREAM_FLUSH_MS": "0"}
#: Long streams below last at most 2.5 s, well within AGENT_TIMEOUT.
WAIT = 15.0

SCRIPTED = {"kind": "python", "callable": "tests.agents:scripted"}
MESSAGE_KEYS = {"id", "chat_id", "role", "user_id", "content", "client_message_id", "reply_to",
                "created_at"}
OPENAI_KEY = "sk-test"
WEBHOOK_SECRET = "whsec-e2e-secret"


# --- HTTP servers on loopback ---------------------------------------------------------------

class FakeServer:
    """A ThreadingHTTPServer on a free loopback port, serving in a thread of this process.

    It records what it was sent. A test may ``gate(key)`` a reply: the handler then sends the
    first token, flushes it, and holds the rest of the body until the test releases the gate,
    which proves that tokens reach the clients while the body is still being written.
    """

    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.gates: dict[str, threading.Event] = {}
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (handler,),
                                                                {"fake": self}))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def record(self, item: dict[str, Any]) -> None:
        with self.lock:
            self.requests.append(item)

    def recorded(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.requests)

    def gate(self, key: str) -> threading.Event:
        event = self.gates[key] = threading.Event()
        return event

    def hold(self, key: str) -> None:
        event = self.gates.get(key)
        if event is not None:
            event.wait(60)

    def close(self) -> None:
        for event in list(self.gates.values()):
            event.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


class Handler(BaseHTTPRequestHandler):
    """Replies whole (Content-Length) or streamed: chunked (HTTP/1.1) or close-delimited."""

    fake: FakeServer
    protocol_version = "HTTP/1.1"
    chunked = True

    def log_message(self, *args: Any) -> None:
        pass

    def body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def start_stream(self, content_type: str, chunked: bool = True) -> None:
        self.chunked = chunked
        if not chunked:
            self.protocol_version = "HTTP/1.0"  # the body ends when the connection closes
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-cache")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def piece(self, data: bytes) -> None:
        """Send and flush one piece of a streamed body."""
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)
        self.wfile.flush()

    def end_stream(self) -> None:
        if self.chunked:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (BrokenPipeError, ConnectionResetError):  # the agent stopped reading
            self.close_connection = True


def openai_tokens(last: str) -> list[str]:
    return ["You", " said", ": ", last, " \u2713"]


class OpenAIHandler(Handler):
    """``POST /v1/chat/completions`` with ``stream: true``: OpenAI's streamed chunks."""

    def do_POST(self) -> None:
        raw = self.body()
        body = json.loads(raw)
        self.fake.record({"path": self.path, "authorization": self.headers.get("Authorization"),
                          "content_type": self.headers.get("Content-Type"), "body": body})
        if self.path != "/v1/chat/completions" or body.get("stream") is not True:
            self.reply(404, "application/json", b'{"error": {"message": "not found"}}')
            return
        last = body["messages"][-1]["content"]
        self.start_stream("text/event-stream")

        def chunk(delta: dict, finish: str | None = None) -> bytes:
            data = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": body["model"],
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        self.piece(chunk({"role": "assistant", "content": ""}))
        for index, token in enumerate(openai_tokens(last)):
            self.piece(chunk({"content": token}))
            if index == 0:
                self.fake.hold(last)
        self.piece(chunk({}, "stop"))
        self.piece(b"data: [DONE]\n\n")
        self.end_stream()


def webhook_tokens(content: str) -> list[str]:
    return ["Got", ": ", content, " \u2713"]


class WebhookHandler(Handler):
    """Checks the signature (401 if wrong); replies by path: ``/json``, ``/ndjson/FRAMING``,
    ``/sse/FRAMING`` (FRAMING ``chunked`` or ``close``), ``/500``."""

    def do_POST(self) -> None:
        raw = self.body()
        expected = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), raw,
                                        hashlib.sha256).hexdigest()
        verified = hmac.compare_digest(self.headers.get("X-Signature-256", ""), expected)
        body = json.loads(raw) if verified else None
        self.fake.record({"path": self.path, "verified": verified, "body": body,
                          "content_type": self.headers.get("Content-Type")})
        if not verified:
            self.reply(401, "application/json", b'{"error": "bad signature"}')
            return
        if self.path == "/500":
            self.reply(500, "text/plain", b"internal error")
            return
        content = body["message"]["content"]
        tokens = webhook_tokens(content)
        mode, _, framing = self.path.strip("/").partition("/")
        if mode == "json":
            self.reply(200, "application/json; charset=utf-8",
                       json.dumps({"content": "".join(tokens)}).encode())
            return
        if mode == "ndjson":
            self.start_stream("application/x-ndjson", chunked=framing == "chunked")
            for index, token in enumerate(tokens):
                self.piece(json.dumps({"token": token}).encode() + b"\n")
                if index == 0:
                    self.fake.hold(content)
        elif mode == "sse":
            self.start_stream("text/event-stream; charset=utf-8", chunked=framing == "chunked")
            self.piece(b": a comment line, to be ignored\n\n")
            for index, token in enumerate(tokens):
                self.piece(b"data: " + json.dumps({"token": token}).encode() + b"\n\n")
                if index == 0:
                    self.fake.hold(content)
            self.piece(b"data: [DONE]\n\n")
        else:
            self.reply(404, "text/plain", b"no such mode")
            return
        self.end_stream()


@pytest.fixture
def openai_server():
    server = FakeServer(OpenAIHandler)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def webhook_server():
    server = FakeServer(WebhookHandler)
    try:
        yield server
    finally:
        server.close()


# --- helpers -------------------------------------------------------------------------------

def say(client: ChatClient, content: str, **extra: Any) -> dict:
    """Send a message with a fresh message string; return the ack, whatever it says."""
    string = client.call("get_message_string")["message_string"]
    return client.send(content, string, **extra)


def post(client: ChatClient, content: str, **extra: Any) -> dict:
    """Send a message that must be accepted; return the stored message."""
    ack = say(client, content, **extra)
    assert ack["ok"] is True, ack
    return ack["message"]


def started_for(client: ChatClient, user_message: dict, timeout: float = WAIT) -> dict:
    return client.wait_event("message_stream_started",
                             lambda d: d["reply_to"] == user_message["id"], timeout)


def ended_for(client: ChatClient, message_id: str, timeout: float = WAIT) -> dict:
    return client.wait_event("message_stream_ended", lambda d: d["message_id"] == message_id,
                             timeout)


def tokens_of(client: ChatClient, message_id: str) -> list[dict]:
    with client.cond:
        return [data for event, data in client.events
                if event == "message_stream_token" and data["message_id"] == message_id]


def errors_of(client: ChatClient, code: str) -> list[dict]:
    return [data for data in client.named("error") if data.get("code") == code]


def complete_stream(client: ChatClient, chat: str, user_message: dict,
                    timeout: float = WAIT) -> tuple[str, list[str], dict]:
    """Wait for the whole reply to ``user_message`` at a client that saw it from the start;
    check the contract's shape and order; return (message id, tokens, ended)."""
    started = started_for(client, user_message, timeout)
    message_id = started["message_id"]
    ended = ended_for(client, message_id, timeout)
    assert {k: started[k] for k in ("message_id", "chat_id", "reply_to")} == {
        "message_id": message_id, "chat_id": chat, "reply_to": user_message["id"]}
    assert message_id.isdigit() and int(message_id) > int(user_message["id"])
    with client.cond:
        events = list(client.events)
    position = {}
    for at, (event, data) in enumerate(events):
        if event == "message_received" and data["id"] == user_message["id"]:
            position.setdefault("received", at)
        if isinstance(data, dict) and data.get("message_id") == message_id:
            position.setdefault(event, at)
            position[event + "_last"] = at
    tokens = [data for event, data in events
              if event == "message_stream_token" and data["message_id"] == message_id]
    # The user's message, then the stream's start, its tokens and its end.
    assert position["received"] < position["message_stream_started"] \
        < position["message_stream_ended"], position
    assert position["message_stream_ended_last"] == position["message_stream_ended"], \
        "message_stream_ended came twice"
    if tokens:
        assert position["message_stream_started"] < position["message_stream_token"] \
            and position["message_stream_token_last"] < position["message_stream_ended"], position
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert all(t["chat_id"] == chat for t in tokens)
    assert ended["chat_id"] == chat
    assert "".join(t["token"] for t in tokens) == ended["content"]
    return message_id, [t["token"] for t in tokens], ended


def stored(tenant: Tenant, chat: str, message_id: str) -> dict:
    matches = [m for m in tenant.history(chat) if m["id"] == message_id]
    assert len(matches) == 1, (message_id, tenant.history(chat))
    return matches[0]


def assert_stored_reply(tenant: Tenant, chat: str, message_id: str, user_message: dict,
                        content: str) -> dict:
    reply = stored(tenant, chat, message_id)
    assert set(reply) == MESSAGE_KEYS, reply
    assert reply["role"] == "agent" and reply["user_id"] is None, reply
    assert reply["reply_to"] == user_message["id"] and reply["chat_id"] == chat, reply
    assert reply["content"] == content, reply
    return reply


def assert_agent_error(client: ChatClient, message_id: str, secret_words: tuple[str, ...] = ()):
    error = client.wait_event("error", lambda d: d.get("code") == "agent_error", WAIT)
    assert set(error) == {"code", "message", "details"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["details"], dict), error
    everything = json.dumps(list(client.events))
    for word in secret_words:
        assert word not in everything, f"{word!r} leaked to a client"
    return error


def disconnect(*clients: ChatClient | None) -> None:
    for client in clients:
        if client is not None:
            client.disconnect()


# --- echo ----------------------------------------------------------------------------------

def test_echo_agent_streams_the_words_back(rt_server, agent_chat):
    tenant, chat, (ann,) = agent_chat(rt_server, {"kind": "echo"}, "ann")
    user = post(ann, "hello there friend")
    message_id, tokens, ended = complete_stream(ann, chat, user)
    assert tokens == ["hello", " there", " friend"]
    assert ended == {"message_id": message_id, "chat_id": chat,
                     "content": "hello there friend", "finish_reason": "stop"}
    assert_stored_reply(tenant, chat, message_id, user, "hello there friend")
    assert [m["id"] for m in tenant.history(chat)] == [user["id"], message_id]


# --- openai --------------------------------------------------------------------------------

def test_openai_agent_streams_to_every_client_with_a_bounded_signed_in_conversation(
        rt_server, agent_chat, openai_server):
    agent = {"kind": "openai", "base_url": openai_server.url + "/v1", "model": "m",
             "api_key": OPENAI_KEY, "system_prompt": "Be brief.", "history": 2}
    setup = agent_chat(rt_server, agent, "ann", "bob", transports={"bob": "polling"})
    tenant, chat, (ann, bob) = setup
    shown = requests.get(f"{tenant.url}/api/v1/workspaces/{setup.workspace}",
                         headers=tenant.headers, timeout=10)
    assert shown.status_code == 200 and OPENAI_KEY not in shown.text, shown.text
    assert shown.json()["agent"]["api_key_set"] is True

    replies = []
    for text in ("first question", "second question"):
        user = post(ann, text)
        replies.append(complete_stream(ann, chat, user))
        complete_stream(bob, chat, user)

    third = f"third question {uuid.uuid4().hex[:6]}"
    gate = openai_server.gate(third)
    try:
        user = post(bob, third)
        # The first token reaches both clients while the model is still writing.
        for client in (ann, bob):
            started = started_for(client, user)
            first = client.wait_event("message_stream_token",
                                      lambda d: d["message_id"] == started["message_id"], WAIT)
            assert first["index"] == 0 and first["token"] == "You"
            assert client.find("message_stream_ended",
                        lambda d: d["message_id"] == started["message_id"]) is None
    finally:
        gate.set()
    message_id, ann_tokens, ann_ended = complete_stream(ann, chat, user)
    bob_id, bob_tokens, bob_ended = complete_stream(bob, chat, user)
    assert bob_id == message_id and bob_tokens == ann_tokens and bob_ended == ann_ended
    assert ann_tokens == openai_tokens(third)
    assert ann_ended["content"] == "".join(openai_tokens(third))
    assert ann_ended["finish_reason"] == "stop"
    assert_stored_reply(tenant, chat, message_id, user, ann_ended["content"])

    requests_seen = openai_server.recorded()
    assert len(requests_seen) == 3
    for seen in requests_seen:
        assert seen["path"] == "/v1/chat/completions"
        assert seen["authorization"] == f"Bearer {OPENAI_KEY}"
        assert seen["body"]["model"] == "m" and seen["body"]["stream"] is True
        assert seen["body"]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert requests_seen[0]["body"]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first question"}]
    # history: 2 -> the last two messages before the new one, then the new one.
    assert requests_seen[2]["body"]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": replies[1][2]["content"]},
        {"role": "user", "content": third}]


# --- webhook -------------------------------------------------------------------------------

def test_webhook_json_reply_with_a_signed_body_of_message_objects(rt_server, agent_chat,
                                                                   webhook_server):
    setup = agent_chat(rt_server, {"kind": "webhook", "url": webhook_server.url + "/json",
                                   "secret": WEBHOOK_SECRET}, "ann")
    tenant, chat, (ann,) = setup
    ws = setup.workspace
    shown = requests.get(f"{tenant.url}/api/v1/workspaces/{ws}", headers=tenant.headers,
                         timeout=10)
    assert shown.status_code == 200 and WEBHOOK_SECRET not in shown.text, shown.text

    first = post(ann, "first", client_message_id="cm-1")
    first_id, _, first_ended = complete_stream(ann, chat, first)
    second = post(ann, "second")
    second_id, tokens, ended = complete_stream(ann, chat, second)
    expected = "".join(webhook_tokens("second"))
    assert tokens == [expected]
    assert ended == {"message_id": second_id, "chat_id": chat, "content": expected,
                     "finish_reason": "stop"}
    assert first_ended["content"] == "".join(webhook_tokens("first"))
    assert_stored_reply(tenant, chat, second_id, second, expected)

    seen = webhook_server.recorded()
    assert [s["verified"] for s in seen] == [True, True], seen
    assert all(s["content_type"].startswith("application/json") for s in seen)
    history = tenant.history(chat)
    for request, message, before in ((seen[0], first, []), (seen[1], second, history[:2])):
        body = request["body"]
        assert set(body) == {"workspace_id", "chat_id", "message", "history"}, body
        assert body["workspace_id"] == ws and body["chat_id"] == chat
        assert set(body["message"]) == MESSAGE_KEYS and body["message"] == message
        assert all(set(m) == MESSAGE_KEYS for m in body["history"])
        assert body["history"] == before  # message objects, oldest first
    assert [m["id"] for m in history[:2]] == [first["id"], first_id]
    assert seen[1]["body"]["history"][1]["role"] == "agent"


@pytest.mark.parametrize("framing", ["chunked", "close"])
@pytest.mark.parametrize("mode", ["ndjson", "sse"])
def test_webhook_streamed_reply_reaches_clients_token_by_token(rt_server, agent_chat,
                                                               webhook_server, mode, framing):
    """A streamed body (chunked, or HTTP/1.0 ending when the connection closes): each token
    reaches the clients as the webhook flushes it, not when the body is complete."""
    url = f"{webhook_server.url}/{mode}/{framing}"
    tenant, chat, (ann, bob) = agent_chat(
        rt_server, {"kind": "webhook", "url": url, "secret": WEBHOOK_SECRET}, "ann", "bob")
    content = f"stream me {uuid.uuid4().hex[:6]}"
    gate = webhook_server.gate(content)
    try:
        user = post(ann, content)
        for client in (ann, bob):
            message_id = started_for(client, user)["message_id"]

            def first_or_end() -> bool:
                return (client.find("message_stream_token",
                             lambda d: d["message_id"] == message_id) is not None
                        or client.find("message_stream_ended",
                                lambda d: d["message_id"] == message_id) is not None)

            client.wait_until(first_or_end, AGENT_TIMEOUT + WAIT, "the first token")
            ended = client.find("message_stream_ended",
                         lambda d: d["message_id"] == message_id)
            assert ended is None, (
                "the first token was not relayed while the webhook held the rest of its "
                f"body; the stream ended instead: {ended}")
            assert tokens_of(client, message_id)[0]["token"] == "Got"
    finally:
        gate.set()
    expected = webhook_tokens(content)
    for client in (ann, bob):
        message_id, tokens, ended = complete_stream(client, chat, user)
        assert tokens == expected
        assert ended["content"] == "".join(expected) and ended["finish_reason"] == "stop"
    assert_stored_reply(tenant, chat, message_id, user, "".join(expected))
    assert [s["verified"] for s in webhook_server.recorded()] == [True]


@pytest.mark.parametrize("failure", ["wrong-secret", "no-secret", "http-500"])
def test_webhook_refusal_ends_with_error_and_agent_error_to_every_client(
        rt_server, agent_chat, webhook_server, failure):
    agent = {"wrong-secret": {"kind": "webhook", "url": webhook_server.url + "/json",
                              "secret": "not-the-webhooks-secret"},
             "no-secret": {"kind": "webhook", "url": webhook_server.url + "/json"},
             "http-500": {"kind": "webhook", "url": webhook_server.url + "/500",
                          "secret": WEBHOOK_SECRET}}[failure]
    tenant, chat, (ann, bob) = agent_chat(rt_server, agent, "ann", "bob",
                                          transports={"bob": "polling"})
    user = post(ann, "are you there?")
    for client in (ann, bob):
        message_id, tokens, ended = complete_stream(client, chat, user)
        assert tokens == []
        assert ended == {"message_id": message_id, "chat_id": chat, "content": "",
                         "finish_reason": "error"}
        assert_agent_error(client, message_id, ("not-the-webhooks-secret", WEBHOOK_SECRET))
    assert_stored_reply(tenant, chat, message_id, user, "")
    seen = webhook_server.recorded()
    assert len(seen) == 1 and seen[0]["verified"] is (failure == "http-500"), seen

    # The chat is free again: the next message is accepted (and fails the same way).
    again = post(bob, "still there?")
    complete_stream(bob, chat, again)


# --- python agent: failure, busy, stop, timeout ------------------------------------------

def test_python_agent_failure_stores_the_partial_reply_and_reports_agent_error(
        rt_server, agent_chat):
    tenant, chat, (ann, bob) = agent_chat(rt_server, SCRIPTED, "ann", "bob")
    user = post(ann, "fail 2")
    for client in (ann, bob):
        message_id, tokens, ended = complete_stream(client, chat, user)
        assert tokens == ["t0 ", "t1 "]
        assert ended == {"message_id": message_id, "chat_id": chat, "content": "t0 t1 ",
                         "finish_reason": "error"}
        error = assert_agent_error(client, message_id, ("hunter2", "RuntimeError",
                                                        "Traceback"))
        assert errors_of(client, "agent_error") == [error]
    assert_stored_reply(tenant, chat, message_id, user, "t0 t1 ")


def test_message_while_a_reply_streams_is_chat_busy_and_the_chat_is_free_when_it_ends(
        rt_server, agent_chat):
    tenant, chat, (ann, bob) = agent_chat(rt_server, SCRIPTED, "ann", "bob")
    user = post(ann, "tokens 20 0.05")
    # Busy from the moment the message is accepted, before the stream has even started.
    busy = say(bob, "me first")
    assert busy["ok"] is False and busy["error"]["code"] == "chat_busy", busy
    message_id = started_for(ann, user)["message_id"]
    ann.wait_event("message_stream_token", lambda d: d["message_id"] == message_id, WAIT)
    for client in (ann, bob):
        ack = say(client, "me too")
        assert ack["ok"] is False and ack["error"]["code"] == "chat_busy", ack
        assert set(ack["error"]) == {"code", "message", "details"}
    assert len(errors_of(bob, "chat_busy")) == 2 and len(errors_of(ann, "chat_busy")) == 1
    assert ann.find("message_stream_ended") is None, "the stream ended too soon to test"

    ended = ended_for(bob, message_id)
    after = post(bob, "now it is my turn")  # at once: the chat is free when ended is sent
    assert ended["finish_reason"] == "stop"
    assert ended["content"] == "".join(f"t{i} " for i in range(20))
    complete_stream(bob, chat, after)
    complete_stream(ann, chat, user)
    contents = [m["content"] for m in tenant.history(chat) if m["role"] == "user"]
    assert contents == ["tokens 20 0.05", "now it is my turn"]


def test_a_retried_message_gets_its_original_while_its_reply_streams_and_claims_nothing(
        rt_server, agent_chat):
    # The server finds a repeated client_message_id by the unique constraint or, when a
    # message is refused as chat_busy, looks it up then: either way the retry succeeds.
    tenant, chat, (ann, bob) = agent_chat(rt_server, SCRIPTED, "ann", "bob")
    user = post(ann, "tokens 20 0.05", client_message_id="retry-me")
    message_id = started_for(ann, user)["message_id"]
    again = post(ann, "tokens 20 0.05", client_message_id="retry-me")
    assert again == user
    busy = say(bob, "me first", client_message_id="bobs")
    assert busy["ok"] is False and busy["error"]["code"] == "chat_busy", busy
    ended = ended_for(ann, message_id)
    assert ended["finish_reason"] == "stop"
    # After the reply: a retry starts no second reply and leaves the chat free.
    assert post(ann, "tokens 20 0.05", client_message_id="retry-me") == user
    after = post(bob, "my turn", client_message_id="bobs")
    assert after["id"] != user["id"]
    complete_stream(bob, chat, after)
    complete_stream(ann, chat, after)
    started = [d["reply_to"] for e, d in ann.events if e == "message_stream_started"]
    assert started == [user["id"], after["id"]]
    contents = [m["content"] for m in tenant.history(chat) if m["role"] == "user"]
    assert contents == ["tokens 20 0.05", "my turn"]


def test_stop_generation_cancels_the_stream_and_stores_what_was_sent(rt_server, agent_chat):
    tenant, chat, (ann, bob) = agent_chat(rt_server, SCRIPTED, "ann", "bob")
    assert ann.call("stop_generation") == {"ok": True, "stopped": False}
    user = post(ann, "tokens 50 0.05")
    message_id = started_for(bob, user)["message_id"]
    bob.wait_until(lambda: len(tokens_of(bob, message_id)) >= 3, WAIT, "three tokens")
    assert bob.call("stop_generation") == {"ok": True, "stopped": True}
    for client in (ann, bob):
        message_id, tokens, ended = complete_stream(client, chat, user)
        assert ended["finish_reason"] == "cancelled"
        assert 3 <= len(tokens) < 50
        assert tokens == [f"t{i} " for i in range(len(tokens))]
    assert_stored_reply(tenant, chat, message_id, user, ended["content"])
    assert ann.call("stop_generation") == {"ok": True, "stopped": False}
    complete_stream(ann, chat, post(ann, "after the stop"))


def test_agent_exceeding_agent_timeout_ends_with_timeout_and_keeps_its_text(
        rt_server, agent_chat):
    tenant, chat, (ann, bob) = agent_chat(rt_server, SCRIPTED, "ann", "bob")
    user = post(ann, "hang")
    for client in (ann, bob):
        message_id, tokens, ended = complete_stream(client, chat, user,
                                                    AGENT_TIMEOUT + WAIT)
        assert tokens == ["t0 "]
        assert ended == {"message_id": message_id, "chat_id": chat, "content": "t0 ",
                         "finish_reason": "timeout"}
        assert_agent_error(client, message_id)
    assert_stored_reply(tenant, chat, message_id, user, "t0 ")
    complete_stream(bob, chat, post(bob, "are you back?"))


# --- joining mid-stream --------------------------------------------------------------------

def check_joined_mid_stream(client: ChatClient, chat: str, user: dict, message_id: str,
                            final: str | None = None, skip: int = 0) -> tuple[int, int]:
    """A client that joined while the reply streamed got connection_established, then
    message_stream_started with content_so_far, then the remaining tokens in order (and, if
    it stayed, message_stream_ended). Returns (tokens in content_so_far, tokens after)."""
    with client.cond:
        events = list(client.events)[skip:]
    names = [event for event, _ in events]
    assert names[:2] == ["connection_established", "message_stream_started"], names
    started = events[1][1]
    assert started["message_id"] == message_id and started["chat_id"] == chat
    assert started["reply_to"] == user["id"]
    so_far = started["content_so_far"]
    count = len(so_far.split())
    assert so_far == "".join(f"t{i} " for i in range(count)), so_far
    rest = names[2:]
    ended = rest[-1:] == ["message_stream_ended"]
    assert rest[:len(rest) - ended] == ["message_stream_token"] * (len(rest) - ended), names
    tokens = [data for event, data in events[2:] if event == "message_stream_token"]
    assert all(t["message_id"] == message_id for t in tokens)
    assert [t["index"] for t in tokens] == list(range(count, count + len(tokens))), (
        count, [t["index"] for t in tokens])
    assert [t["token"] for t in tokens] == [f"t{i} " for i in range(count, count + len(tokens))]
    joined = so_far + "".join(t["token"] for t in tokens)
    if final is not None:
        assert final.startswith(joined)
    if ended:
        assert events[-1][1]["message_id"] == message_id
        assert joined == events[-1][1]["content"]
    return count, len(tokens)


def test_reconnecting_mid_stream_gets_content_so_far_then_the_rest_without_gaps(
        rt_server, agent_chat):
    tenant, chat, (ann, b) = agent_chat(rt_server, SCRIPTED, "ann", "bob")
    views: list[ChatClient] = []
    try:
        user = post(ann, "tokens 60 0.04")
        message_id = started_for(ann, user)["message_id"]
        b.wait_until(lambda: len(tokens_of(b, message_id)) >= 3, WAIT, "three tokens")
        b.disconnect()
        for attempt in range(6):
            # Same user (ann) or a member (bob); websocket or long-polling.
            b = join_chat(tenant.url, tenant.key_auth(chat, ("bob", "ann")[attempt % 2],
                                                      last_message_id=user["id"]),
                          ("websocket", "polling")[attempt // 2 % 2])
            views.append(b)
            if attempt < 5:
                b.wait_until(lambda view=b: len(view.named("message_stream_token")) >= 2,
                             WAIT, "two tokens after reconnecting")
                b.disconnect()
        ended = ended_for(b, message_id)
        final = "".join(f"t{i} " for i in range(60))
        assert ended["content"] == final and ended["finish_reason"] == "stop"
        previous = 3
        for view in views:
            count, after = check_joined_mid_stream(view, chat, user, message_id, final)
            assert count >= previous, (count, previous)
            previous = count + after
        assert views[-1].names()[-1] == "message_stream_ended"
        _, tokens, ann_ended = complete_stream(ann, chat, user)
        assert ann_ended == ended and "".join(tokens) == final
        assert_stored_reply(tenant, chat, message_id, user, final)
    finally:
        disconnect(*views)


def test_fresh_connection_mid_stream_gets_content_so_far(rt_server, agent_chat):
    tenant, chat, (ann,) = agent_chat(rt_server, SCRIPTED, "ann", members=("carl",))
    carl = None
    try:
        user = post(ann, "tokens 30 0.04")
        message_id = started_for(ann, user)["message_id"]
        ann.wait_until(lambda: len(tokens_of(ann, message_id)) >= 3, WAIT, "three tokens")
        carl = join(tenant, chat, "carl")
        ended = ended_for(carl, message_id)
        assert ended["finish_reason"] == "stop"
        assert carl.names()[0] == "user_created"
        count, after = check_joined_mid_stream(carl, chat, user, message_id, ended["content"],
                                               skip=1)
        assert count >= 3 and count + after == 30
    finally:
        disconnect(carl)


# --- one chat's stream does not hold back another chat ------------------------------------

class Arrivals:
    """One arrival order across several clients (each records in its own thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.order: list[tuple[str, str, Any]] = []

    def tee(self, client: ChatClient, label: str) -> None:
        arrivals = self

        class Tee(list):
            def append(self, item: tuple[str, Any]) -> None:
                with arrivals.lock:
                    arrivals.order.append((label, *item))
                super().append(item)

        with client.cond:
            client.events = Tee(client.events)

    def snapshot(self) -> list[tuple[str, str, Any]]:
        with self.lock:
            return list(self.order)


def test_messages_in_another_chat_arrive_while_a_reply_streams(rt_server):
    tenant = new_tenant(rt_server.url)
    chat1 = tenant.chat("ann", tenant.workspace("ann", agent=SCRIPTED))
    chat2 = tenant.chat("ann")  # the default workspace: no agent
    one = join(tenant, chat1)
    two = join(tenant, chat2)
    arrivals = Arrivals()
    arrivals.tee(one, "chat1")
    arrivals.tee(two, "chat2")
    try:
        user = post(one, "tokens 30 0.05")
        message_id = started_for(one, user)["message_id"]
        one.wait_event("message_stream_token", lambda d: d["message_id"] == message_id, WAIT)
        sent = [post(two, f"meanwhile {i}")["id"] for i in range(5)]
        two.wait_for("message_received", 5)
        ended_for(one, message_id)
        order = arrivals.snapshot()
        end_at = next(at for at, (label, event, data) in enumerate(order)
                      if label == "chat1" and event == "message_stream_ended")
        received = [(at, data["id"]) for at, (label, event, data) in enumerate(order)
                    if label == "chat2" and event == "message_received"]
        assert [message for _, message in received] == sent
        assert all(at < end_at for at, _ in received), (
            "chat 2's messages were held back behind chat 1's stream",
            [(label, event) for label, event, _ in order])
        assert not [1 for label, event, _ in order
                    if label == "chat2" and event.startswith("message_stream")]
    finally:
        disconnect(one, two)
