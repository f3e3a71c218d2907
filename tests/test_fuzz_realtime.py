"""Fuzzing the real-time doors of one real server process per async mode (hypothesis).

Every Socket.IO client event (``message``, ``get_message_string``, ``stop_generation``,
``typing``, unknown names), the connect auth payload and query, raw frames no client library
produces (invalid JSON, lone-surrogate escapes, truncated packets, binary frames, wrong
namespaces, reserved event names, ack ids where none is expected, extra arguments, frames
beyond the maximum payload) and every kind of /ws/chat frame get hostile payloads: wrong
types, huge strings, deep nesting, lone surrogates, NULs. Proven:

- every answer is a documented success of the right shape or ``{ok: false, error: {code,
  message, details}}`` (and the same ``error`` event) with a contract code, never
  ``internal_error``; refused connections carry a contract connect-error code;
- a well-formed packet never costs the connection; a malformed one may close it (as
  Socket.IO's reference server does), and then the session is released at once, not left
  counting against the tenant until a ping timeout;
- the server process stays up, its log holds no traceback and no ``internal_error``;
- the stored history of a chat, and of another tenant's chat, is exactly what it was plus
  the messages whose acks said ``ok: true``.
"""
from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import quote, urlencode

import pytest
import requests
import websocket
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from app.jsondepth import MAX_JSON_DEPTH, too_deep
from tests.kit import eio
from tests.kit.eio import NAMESPACE, Closed, RawSocketIO
from tests.kit.plain import PlainClient
from tests.kit.rest import new_tenant
from tests.kit.wait import wait_until

pytestmark = pytest.mark.e2e

SERVER_ENV = {"RATE_LIMIT_MESSAGES": "100000/second", "RATE_LIMIT_REST": "100000/minute",
              "MAX_CONNECTIONS_PER_TENANT": "100000", "RATE_LIMIT_AUTH_FAILURES": "100000/minute"}

#: The error codes of CONTRACT.md (sections 2 and 3), less internal_error.
CONTRACT_CODES = {
    "validation_error", "invalid_json", "missing_api_key", "invalid_api_key", "forbidden",
    "not_found", "chat_not_found", "workspace_not_found", "method_not_allowed",
    "payload_too_large", "rate_limited", "invalid_connection_string",
    "connection_string_expired", "too_many_connections", "chat_mismatch",
    "invalid_message_string", "message_string_expired", "message_string_reused", "chat_busy",
    "agent_error"}
CONNECT_CODES = {"invalid_connection_string", "connection_string_expired", "invalid_api_key",
                 "chat_not_found", "forbidden", "too_many_connections", "validation_error"}
MESSAGE_CODES = {"validation_error", "chat_mismatch", "invalid_message_string",
                 "message_string_expired", "message_string_reused", "rate_limited", "chat_busy"}
MESSAGE_KEYS = {"id", "chat_id", "role", "user_id", "content", "client_message_id",
                "reply_to", "created_at"}
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
CLIENT_EVENTS = ("message", "get_message_string", "stop_generation", "typing")
RESERVED = ("connect", "connect_error", "disconnect", "disconnecting", "newListener",
            "removeListener")
MAX_PAYLOAD = 1_000_000  # python-engineio's max_http_buffer_size, announced as maxPayload


# --- hostile values ------------------------------------------------------------------------

class Sentinel:
    """Stands for a value only known at run time (a fresh message string, the chat id...)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


FRESH_STRING, CHAT, OTHER_CHAT = Sentinel("fresh message string"), Sentinel("chat"), \
    Sentinel("other tenant's chat")
KEY, OTHER_KEY, CONN_STRING = Sentinel("api key"), Sentinel("other tenant's key"), \
    Sentinel("connection string")
FIRST_ID = Sentinel("first message id")

any_chars = st.characters(categories=["L", "M", "N", "P", "S", "Z", "Cc", "Cf", "Cs", "Co"])
weird_text = st.one_of(
    st.text(any_chars, max_size=40),
    st.sampled_from(["", " ", "\x00", "a\x00b", "\ud800", "\udfff", "x\udc00y", "\ud83d",
                     "\u202e", "\ufeff", "\uffff", "null", "true", "[]", "{}", "0", "-1",
                     "²", "١٢٣", "9" * 19, "9" * 25, "%00", "../..", "' OR 1=1 --",
                     "<script>", "\n", " \t\r\n "]),
    # huge strings: just over the content limit, and far over it (still under maxPayload)
    st.builds(lambda c, n: c * n, st.sampled_from(["x", "é", "\ud800", "\x00", " ", "😀"]),
              st.sampled_from([4001, 4096, 65_536, 200_000])),
)
weird_numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    # (python-engineio refuses integers of more than 100 digits: see the raw frames)
    st.sampled_from([0, -1, 2**63 - 1, 2**63, -(2**63) - 1, 10**99, -(10**98)]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0.5, -0.0, 1e308]),
)
scalars = st.one_of(st.none(), st.booleans(), weird_numbers, weird_text)


def nested(depth: int, leaf: Any = 1, kind: str = "list") -> Any:
    value = leaf
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


deep = st.builds(nested, st.integers(50, 400), scalars, st.sampled_from(["list", "dict"]))
hostile = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(weird_text, inner, max_size=4)),
    max_leaves=12) | deep


def valid_content() -> st.SearchStrategy[str]:
    return st.text(st.characters(categories=["L", "N", "P", "Zs"]), min_size=1, max_size=60)


message_payloads = st.one_of(
    hostile,
    st.fixed_dictionaries({}, optional={
        "content": st.one_of(valid_content(), hostile),
        "message_string": st.one_of(st.just(FRESH_STRING), st.just(FRESH_STRING), hostile),
        "chat_id": st.one_of(st.just(CHAT), st.just(OTHER_CHAT), hostile),
        "client_message_id": st.one_of(st.sampled_from(["c-1", "c-2", "dup", "x" * 128]),
                                       hostile),
        "extra": hostile,
    }),
    # mostly acceptable: so that the accepted path (and idempotency) is fuzzed too
    st.fixed_dictionaries({"content": valid_content(), "message_string": st.just(FRESH_STRING)},
                          optional={"client_message_id": st.sampled_from(["c-1", "c-2", "dup"]),
                                    "chat_id": st.just(CHAT)}),
)


# --- the world the fuzzer plays in ---------------------------------------------------------

class World:
    """Two tenants, a chat each with stored messages, and what the fuzzer got accepted."""

    def __init__(self, server):
        self.server = server
        self.url = server.url
        self.tenant = new_tenant(self.url, "Fuzzed")
        self.other = new_tenant(self.url, "Bystander")
        self.chat = self.tenant.chat("ann")
        self.other_chat = self.other.chat("zed")
        self.conn_string = self.tenant.connection_string(self.chat)
        self.accepted: dict[str, dict] = {}  # message id -> message, from acks ok: true
        for tenant, chat, user in ((self.tenant, self.chat, "ann"),
                                   (self.other, self.other_chat, "zed")):
            s = self.raw(tenant=tenant, chat=chat, user=user)
            for text in ("before one", "before two"):
                string = s.call("get_message_string", {})[0]["message_string"]
                assert s.call("message", {"content": text, "message_string": string})[0]["ok"]
            s.close()
        self.before = {self.chat: self.tenant.history(self.chat),
                       self.other_chat: self.other.history(self.other_chat)}
        assert [len(v) for v in self.before.values()] == [2, 2]

    def resolve(self, value: Any, fresh=None) -> Any:
        """``value`` with every sentinel replaced by what it stands for."""
        if isinstance(value, Sentinel):
            return {FRESH_STRING.name: fresh, CHAT.name: self.chat,
                    OTHER_CHAT.name: self.other_chat, KEY.name: self.tenant.key,
                    OTHER_KEY.name: self.other.key, CONN_STRING.name: self.conn_string,
                    FIRST_ID.name: self.before[self.chat][0]["id"]}[value.name]
        if isinstance(value, list):
            return [self.resolve(v, fresh) for v in value]
        if isinstance(value, dict):
            return {k: self.resolve(v, fresh) for k, v in value.items()}
        return value

    def raw(self, tenant=None, chat=None, user="ann") -> RawSocketIO:
        """A raw Socket.IO session connected to the chat with an API key."""
        s = RawSocketIO(self.url)
        status, data, _ = s.connect({"chat_id": chat or self.chat,
                                     "api_key": (tenant or self.tenant).key, "user_id": user})
        assert status == "connected", data
        return s

    def record_accepted(self, message: dict, sent_content: Any, client_message_id: Any) -> None:
        """Check a message acked ``ok: true`` and remember it."""
        assert set(message) == MESSAGE_KEYS, message
        assert message["chat_id"] == self.chat and message["role"] == "user"
        assert message["user_id"] == "ann" and message["reply_to"] is None
        assert ISO_Z.match(message["created_at"]), message
        known = self.accepted.get(message["id"]) or next(
            (m for m in self.before[self.chat] if m["id"] == message["id"]), None)
        if known is not None:  # a repeated client_message_id: the original, nothing new
            assert client_message_id is not None and message == known, (message, known)
            return
        assert isinstance(sent_content, str) and message["content"] == sent_content.strip()
        assert message["client_message_id"] == client_message_id
        self.accepted[message["id"]] = message


@pytest.fixture(scope="module")
def world(rt_server) -> World:
    return World(rt_server)


class Session:
    """The raw Socket.IO session that the well-formed fuzzing goes through; a test that lost
    it fails, and the next example starts on a new one (so examples stay independent)."""

    def __init__(self, world: World):
        self.world = world
        self.current: RawSocketIO | None = None

    def __enter__(self) -> RawSocketIO:
        if self.current is None:
            self.current = self.world.raw()
        return self.current

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and issubclass(exc_type, (Closed, websocket.WebSocketException)):
            self.current.close()
            self.current = None


@pytest.fixture(scope="module")
def session(world):
    holder = Session(world)
    yield holder
    if holder.current is not None:
        holder.current.close()


def fits(*args: Any) -> bool:
    """Whether a packet of these arguments stays within maxPayload (beyond it the connection
    is closed, see test_a_frame_at_or_beyond_the_maximum_payload_...)."""
    return len(json.dumps(list(args), default=repr)) < MAX_PAYLOAD - 1_000


def assert_error_body(error: Any, allowed: set[str] = CONTRACT_CODES) -> None:
    assert isinstance(error, dict) and set(error) == {"code", "message", "details"}, error
    assert error["code"] in allowed, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["details"], dict), error


def assert_failure_ack(ack: list, events: list[list], allowed: set[str]) -> None:
    """``[{ok: false, error}]``, the same body also emitted as ``error`` before the ack."""
    assert len(ack) == 1 and isinstance(ack[0], dict), ack
    assert set(ack[0]) == {"ok", "error"} and ack[0]["ok"] is False, ack
    assert_error_body(ack[0]["error"], allowed)
    assert [e[1:] for e in events if e[0] == "error"] == [[ack[0]["error"]]], events


def assert_still_works(s: RawSocketIO) -> None:
    ack = s.call("get_message_string", {})
    assert isinstance(ack[0]["message_string"], str) and ISO_Z.match(ack[0]["expires_at"])


def socket_connections(world: World) -> float:
    metrics = requests.get(world.url + "/metrics", timeout=10).text
    return float(re.search(r"^workspace_chat_socket_connections (\S+)$", metrics, re.M)[1])


def wait_for_connections(world: World, expected: float, timeout: float = 10) -> None:
    # polling a gauge: there is no event to wait on
    wait_until(lambda: socket_connections(world) == expected, timeout,
               lambda: f"{expected} socket connections (not {socket_connections(world)})")


def assert_server_alive(world: World) -> None:
    assert world.server.process.poll() is None, world.server.log()[-3000:]
    assert requests.get(world.url + "/healthz", timeout=10).status_code == 200


# --- Socket.IO events ----------------------------------------------------------------------

@settings(max_examples=150)
@given(payload=message_payloads, extra_args=st.lists(hostile, max_size=2))
def test_fuzzed_messages_get_a_success_or_contract_error_ack_and_keep_the_connection(
        world, session, payload, extra_args):
    assume(fits(payload, *extra_args))
    with session as s:
        fresh = s.call("get_message_string", {})[0]["message_string"]
        payload = world.resolve(payload, fresh)
        mark = len(s.packets)
        ack = s.wait_ack(s.emit("message", payload, *extra_args))
        events = s.events(since=mark)
        if ack and isinstance(ack[0], dict) and ack[0].get("ok") is True:
            assert not extra_args and isinstance(payload, dict)
            assert set(ack[0]) == {"ok", "message", "next_message_string",
                                   "next_message_string_expires_at", "reply_expected"}, ack
            world.record_accepted(ack[0]["message"], payload.get("content"),
                                  payload.get("client_message_id"))
            assert not [e for e in events if e[0] == "error"], events
        else:
            assert_failure_ack(ack, events, MESSAGE_CODES)
        assert_still_works(s)


@settings(max_examples=120)
@given(event=st.sampled_from(("get_message_string", "stop_generation", "typing")),
       args=st.lists(hostile, max_size=3), with_ack=st.booleans())
def test_fuzzed_get_message_string_stop_generation_and_typing_payloads_are_answered_per_contract(
        world, session, event, args, with_ack):
    assume(fits(*args))
    with session as s:
        mark = len(s.packets)
        ack_id = s.emit(event, *args, with_ack=with_ack)
        if not with_ack:  # the next call's ack comes after whatever this event caused
            assert_still_works(s)
            errors = [e for e in s.events(since=mark) if e[0] == "error"]
            for error in errors:
                assert_error_body(error[1], {"validation_error"})
            return
        ack = s.wait_ack(ack_id)
        errors = [e for e in s.events(since=mark) if e[0] == "error"]
        if too_deep(args, MAX_JSON_DEPTH + 1):  # any event: validation_error (section 9)
            assert len(errors) == 1 and errors[0][1]["code"] == "validation_error", errors
            assert ack == ([] if event == "typing" else [{"ok": False, "error": errors[0][1]}])
        elif event == "get_message_string":
            assert set(ack[0]) == {"message_string", "expires_at"} and not errors, ack
        elif event == "stop_generation":
            assert ack == [{"ok": True, "stopped": False}] and not errors, ack
        else:  # typing has no ack of its own: an empty one, and an error event when invalid
            valid = len(args) == 1 and isinstance(args[0], dict) \
                and isinstance(args[0].get("is_typing"), bool)
            assert ack == [], ack
            assert len(errors) == (0 if valid else 1), errors
            for error in errors:
                assert_error_body(error[1], {"validation_error"})
        assert_still_works(s)


@settings(max_examples=60)
@given(event=st.one_of(st.text(any_chars, max_size=30), st.sampled_from(
           ["error", "message_received", "connection_established", "on_message", "_fail",
            "Message", "message ", "__disconnect_final", "*", "x" * 10_000]))
       .filter(lambda e: e not in CLIENT_EVENTS and e not in RESERVED),
       args=st.lists(hostile, max_size=2))
def test_unknown_event_names_are_answered_validation_error(world, session, event, args):
    assume(fits(event, *args))
    with session as s:
        mark = len(s.packets)
        ack = s.wait_ack(s.emit(event, *args))
        assert_failure_ack(ack, s.events(since=mark), {"validation_error"})
        assert_still_works(s)


# --- connect ---------------------------------------------------------------------------------

NASTY_TEXT = ["\ud800", "x\udc00y", "\x00", "a\x00b", "", " ", "²", "١٢", "-1", "1.5", "1e3",
              "9" * 19, "9223372036854775808", "0" * 25, "\u202e", "😀", "x" * 5000]
DELETE = Sentinel("delete the field")


def mutated(base: dict, changes: list[tuple[str, Any]]) -> dict:
    auth = dict(base)
    for field, value in changes:
        if value is DELETE:
            auth.pop(field, None)
        else:
            auth[field] = value
    return auth


auth_values = st.one_of(
    hostile,
    # a valid auth payload with one or two fields broken
    st.builds(mutated, st.sampled_from([
        {"chat_id": CHAT, "api_key": KEY, "user_id": "ann"},
        {"chat_id": CHAT, "api_key": KEY, "user_id": "ann", "last_message_id": FIRST_ID},
        {"chat_id": CHAT, "connection_string": CONN_STRING},
        {"chat_id": CHAT, "connection_string": CONN_STRING, "last_message_id": FIRST_ID}]),
        st.lists(st.tuples(st.sampled_from(["chat_id", "connection_string", "api_key",
                                             "user_id", "last_message_id"]),
                           st.one_of(st.sampled_from(NASTY_TEXT), hostile, st.just(DELETE))),
                 min_size=1, max_size=2)),
    st.fixed_dictionaries({}, optional={
        "chat_id": st.one_of(st.just(CHAT), st.just(OTHER_CHAT), hostile),
        "connection_string": st.one_of(st.just(CONN_STRING), hostile),
        "api_key": st.one_of(st.just(KEY), st.just(OTHER_KEY), hostile),
        "user_id": st.one_of(st.sampled_from(["ann", "zed", "bob"]), hostile),
        "last_message_id": st.one_of(st.just(FIRST_ID), hostile),
    }),
)
query_values = st.dictionaries(
    st.sampled_from(["chat_id", "connection_string", "api_key", "user_id", "last_message_id",
                     "x", "t", "b64"]),
    # short values: a request line over 4 KB is refused by gunicorn before the app sees it
    st.one_of(weird_text.filter(lambda v: len(v) < 200), st.sampled_from([CHAT, KEY, CONN_STRING])),
    max_size=4)


def garbage_query(world: World, query: dict) -> str:
    # percent-encoded UTF-8, lone surrogates included (invalid UTF-8 on the wire)
    return "&".join(f"{quote(k)}={quote(world.resolve(v).encode('utf-8', 'surrogatepass'))}"
                    for k, v in query.items())


def check_connect_outcome(world: World, status: str, data: Any, events: list, auth: Any,
                          query: dict) -> None:
    if status == "refused":
        assert isinstance(data, dict) and set(data) == {"message", "data"}, data
        assert set(data["data"]) == {"code", "message"}, data
        assert data["data"]["code"] in CONNECT_CODES, data
        assert data["message"] == data["data"]["message"]
        assert events == [], events
        return
    assert status == "connected" and isinstance(data.get("sid"), str), data
    names = [e[0] for e in events]
    assert names[:2] in (["user_created", "connection_established"],
                         ["connection_established", "message_received"],
                         ["connection_established"]), names
    established = next(e[1] for e in events if e[0] == "connection_established")
    params = {**{k: world.resolve(v) for k, v in query.items()},
              **(auth if isinstance(auth, dict) else {})}
    assert established["chat_id"] == params["chat_id"] == world.chat, (established, params)
    assert established["user_id"] == "ann" and established["sid"] == data["sid"]


VALID_KEY_AUTH = {"chat_id": CHAT, "api_key": KEY, "user_id": "ann"}


@settings(max_examples=100)
@given(auth=auth_values, query=query_values, raw_null=st.booleans())
# the refusals that were internal_error before (lone surrogate, NUL, "²", beyond 64 bits)
@example(auth={**VALID_KEY_AUTH, "chat_id": "\ud800"}, query={}, raw_null=False)
@example(auth={**VALID_KEY_AUTH, "chat_id": "a\x00b"}, query={}, raw_null=False)
@example(auth={**VALID_KEY_AUTH, "last_message_id": "²"}, query={}, raw_null=False)
@example(auth={**VALID_KEY_AUTH, "last_message_id": "9" * 19}, query={}, raw_null=False)
@example(auth={**VALID_KEY_AUTH, "last_message_id": 2**63}, query={}, raw_null=False)
@example(auth=None, query={"chat_id": CHAT, "api_key": KEY, "user_id": "ann",
                           "last_message_id": "²"}, raw_null=False)
def test_fuzzed_connect_auth_and_query_connect_or_are_refused_with_a_contract_code(
        world, auth, query, raw_null):
    assume(fits(auth, query))
    auth = world.resolve(auth)
    s = RawSocketIO(world.url, query=garbage_query(world, query))
    try:
        try:
            if raw_null and auth is None:  # "40/chat," with no payload at all
                status, data, events = s.connect(raw=f"40{NAMESPACE},")
            else:
                status, data, events = s.connect(auth)
        except Closed:
            # "40/chat,0.5" reads as ack id 0 and the payload ".5", which is not JSON: a
            # number is no auth payload, and no client library sends one
            assert isinstance(auth, (int, float)) and not isinstance(auth, bool), auth
            return
        check_connect_outcome(world, status, data, events, auth, query)
        if status == "connected":
            assert_still_works(s)
    finally:
        s.close()


# --- raw frames ------------------------------------------------------------------------------

raw_frames = st.one_of(
    # not JSON, or JSON a client library would never write
    st.builds(lambda body: f"42{NAMESPACE},1" + body, st.one_of(
        st.text(any_chars, max_size=60), st.sampled_from([
            "[", '["message",', '{"a": 1}', '"message"', "[]", "[null]", "[5, {}]",
            '["message", {"content": "\\ud800", "message_string": "x"}]',
            '["message", {"content": "ok\\u0000", "message_string": "\\udfff"}]',
            '["typing", {"is_typing": "\\ud800"}]', "[NaN]", '["message", Infinity]',
            '["message"]garbage', "1" * 150, '["' + "x" * 5000,
            '["message", ' + "1" * 101 + "]", '["typing", {"is_typing": -' + "9" * 101 + "}]"]),
        st.builds(lambda n: '["message", ' + '{"a":' * n + "1" + "}" * n + "]",
                  st.integers(100, 3000)),
        st.builds(lambda n: "[" * n + "]" * n, st.integers(100, 3000)))),
    # reserved event names and extra arguments, with and without ack ids
    st.builds(lambda name, ack: f"42{NAMESPACE},{ack}" + json.dumps([name, {}]),
              st.sampled_from(RESERVED), st.sampled_from(["", "3"])),
    st.builds(lambda event, n: f"42{NAMESPACE},9" + json.dumps([event] + [{}] * n),
              st.sampled_from(CLIENT_EVENTS), st.integers(2, 5)),
    # ack ids on events without acks, acks the server never asked for, huge ack ids
    st.sampled_from([f'42{NAMESPACE},5["typing",{{"is_typing":true}}]',
                     f'43{NAMESPACE},1[{{"ok":true}}]', f"43{NAMESPACE},99[]",
                     f'42{NAMESPACE},{"9" * 99}["get_message_string",{{}}]',
                     f'42{NAMESPACE},{"9" * 120}["get_message_string",{{}}]',
                     f"40{NAMESPACE},{{}}", "44/chat,{}", "46/chat,{}", "41/other,",
                     "47", "4x", "4", "4null", "4true", "4{}", '4"42/chat,["typing"]"']),
    # wrong or missing namespaces
    st.builds(lambda ns, body: f"42{ns}," + body,
              st.sampled_from(["", "/", "/other", "/chat/", "/CHAT", "/chat?x=1"]),
              st.sampled_from(['["message",{"content":"hi"}]', "[]", "{bad"])),
    st.sampled_from(['42["message",{"content":"hi"}]', "42", "2", "3", "5", "6", "9",
                     "2probe", "", "x", "b!!!", "bAAAA", "\ud800", "4\ud800"]),
    # truncated packets
    st.builds(lambda cut: (f"42{NAMESPACE},3" + json.dumps(
        ["message", {"content": "truncated", "message_string": "x"}]))[:cut],
        st.integers(1, 60)),
    # binary frames, alone
    st.binary(max_size=64),
    st.sampled_from([b"", b"\x00", b"\xff\xfe", b"42/chat,1[]", b"4" + b"\x00" * 10]),
).map(lambda frame: [frame]) | st.tuples(
    # binary events and acks with their attachment (placeholders in and out of range)
    st.sampled_from([f'451-{NAMESPACE},["message",{{"_placeholder":true,"num":0}}]',
                     f'451-{NAMESPACE},4["message",{{"_placeholder":true,"num":0}}]',
                     f'451-{NAMESPACE},4["message",{{"content":{{"_placeholder":true,'
                     f'"num":0}},"message_string":"x"}}]',
                     f'451-{NAMESPACE},4["message",{{"_placeholder":true,"num":5}}]',
                     f'451-{NAMESPACE},4["message",{{"_placeholder":true,"num":"0"}}]',
                     f'451-{NAMESPACE},4["typing",{{"_placeholder":true}}]',
                     f'461-{NAMESPACE},1[{{"_placeholder":true,"num":0}}]']),
    st.one_of(st.binary(max_size=32), st.just("a text frame as the attachment")),
).map(list)


def send_frames(s: RawSocketIO, frames: list) -> None:
    for frame in frames:
        if isinstance(frame, str):
            # a lone surrogate cannot be UTF-8 on the wire: send the bytes a broken client
            # would (invalid UTF-8 in a text frame)
            try:
                frame.encode("utf-8")
            except UnicodeEncodeError:
                s.ws.send(frame.encode("utf-8", "surrogatepass"),
                          websocket.ABNF.OPCODE_TEXT)
                continue
        s.send_raw(frame)


@settings(max_examples=80)
@given(units=st.lists(raw_frames, min_size=1, max_size=3))
# frames that used to raise out of Engine.IO's receive loop (a traceback, an HTTP 500 written
# into the websocket and a session left counting until its ping timeout) or out of
# python-socketio's packet handling (a traceback per frame, no answer)
@example(units=[["x"]])
@example(units=[[""]])
@example(units=[["b!!!"]])
@example(units=[["4"]])
@example(units=[[b""]])
@example(units=[[f"42{NAMESPACE},1{{bad"]])
@example(units=[[f"42{NAMESPACE},1[]"]])
@example(units=[[f'42{NAMESPACE},1["disconnect"]']])
def test_raw_frames_are_answered_or_close_the_connection_cleanly(world, units):
    baseline = socket_connections(world)
    s = world.raw()
    try:
        try:
            send_frames(s, [frame for unit in units for frame in unit])
            s.next_ack_id = 10_000  # not an id the fuzzed frames used
            ack = s.call("get_message_string", {}, timeout=10)
        except Closed:
            # refused as malformed: the session is released at once (not after a ping
            # timeout), and a new connection works
            wait_for_connections(world, baseline)
            fresh = world.raw()
            assert_still_works(fresh)
            fresh.close()
        else:
            assert set(ack[0]) == {"message_string", "expires_at"}, ack
            for packet in s.packets[1:]:
                assert isinstance(packet, str), packet
                if packet.startswith(f"44{NAMESPACE},") or packet.startswith("44"):
                    continue  # a refused CONNECT to a namespace (wrong or already joined)
                if packet.startswith(f"43{NAMESPACE},"):
                    body = json.loads(packet[packet.index("["):])
                    if body and isinstance(body[0], dict) and body[0].get("ok") is False:
                        assert_error_body(body[0]["error"])
            for event in s.events():
                if event[0] == "error":
                    assert_error_body(event[1])
    finally:
        s.close()
    assert_server_alive(world)


@pytest.mark.parametrize("size", [MAX_PAYLOAD - 2_000, MAX_PAYLOAD + 10])
def test_a_frame_at_or_beyond_the_maximum_payload_is_refused_or_closes_cleanly(world, size):
    baseline = socket_connections(world)
    s = world.raw()
    fresh = s.call("get_message_string", {})[0]["message_string"]
    head = f"42{NAMESPACE},1" + json.dumps(["message", {"message_string": fresh, "content": ""}])
    frame = head[:-3] + "x" * (size - len(head)) + '"}]'
    try:
        s.send_raw(frame)
        ack = s.wait_ack(1)
    except Closed:
        assert size > MAX_PAYLOAD, "a frame within maxPayload closed the connection"
        wait_for_connections(world, baseline)
    else:
        assert size <= MAX_PAYLOAD
        assert_failure_ack(ack, s.events(), {"validation_error"})
        assert_still_works(s)
    finally:
        s.close()
    assert_server_alive(world)


def test_a_namespace_disconnect_packet_releases_the_connection_at_once(world):
    baseline = socket_connections(world)
    s = world.raw()
    try:
        wait_for_connections(world, baseline + 1)
        s.send_raw(f"41{NAMESPACE},")
        wait_for_connections(world, baseline)
        status, data, _ = s.connect({"chat_id": world.chat, "api_key": world.tenant.key,
                                     "user_id": "ann"})  # the same Engine.IO session
        assert status == "connected", data
        assert_still_works(s)
    finally:
        s.close()


def test_a_second_connect_on_a_joined_namespace_leaves_the_first_one_working(world):
    s = world.raw()
    try:
        s.send_raw(f"40{NAMESPACE}," + json.dumps({"chat_id": world.other_chat,
                                                    "api_key": world.other.key,
                                                    "user_id": "zed"}))
        assert_still_works(s)
        fresh = s.call("get_message_string", {})[0]["message_string"]
        ack = s.call("message", {"content": "after a second connect", "message_string": fresh})
        assert ack[0]["ok"] is True, ack
        world.record_accepted(ack[0]["message"], "after a second connect", None)
    finally:
        s.close()


# --- long-polling ---------------------------------------------------------------------------

def joined_polling_session(world: World) -> str:
    """A Socket.IO session joined to the chat over long-polling; returns its POST/GET URL."""
    url = (world.url + "/socket.io/?EIO=4&transport=polling&sid="
           + eio.polling_session(world.url))
    auth = json.dumps({"chat_id": world.chat, "api_key": world.tenant.key, "user_id": "ann"})
    assert requests.post(url, data=f"40{NAMESPACE},{auth}", timeout=10).text == "OK"
    assert f"40{NAMESPACE}," in requests.get(url, timeout=10).text
    return url


polling_bodies = st.one_of(
    st.binary(max_size=80),
    st.lists(st.one_of(raw_frames.map(lambda unit: unit[0]).filter(
        lambda f: isinstance(f, str)), st.text(any_chars, max_size=20)),
        min_size=1, max_size=3).map(
        lambda frames: "\x1e".join(frames).encode("utf-8", "surrogatepass")),
)


@settings(max_examples=40)
@given(body=polling_bodies)
# bodies python-engineio used to log with a traceback (and answer "ok"), and packets whose
# refusal used to wait for a GET that never came, holding the POST (and the shutdown) open
@example(body=b"x")
@example(body=b"\xff\xfe")
@example(body=b"2\x1ex")
@example(body=b"4" + b"[" * 5000 + b"]" * 5000)
@example(body=b"4")
@example(body=b"b!!!!")
@example(body=f"42{NAMESPACE},{{bad".encode())
@example(body=b"2probe")  # packet types a client does not send: python-engineio would
@example(body=b"6")       # disconnect the session and wait for a GET, holding the POST
@example(body=b"7")
def test_fuzzed_long_polling_bodies_are_answered_at_once_and_leave_no_session_behind(
        world, body):
    baseline = socket_connections(world)
    url = joined_polling_session(world)
    wait_for_connections(world, baseline + 1)
    answer = requests.post(url, data=body, timeout=10)  # a request left hanging fails here
    assert answer.status_code in (200, 400), (answer.status_code, answer.text)
    requests.post(url, data=b"1", timeout=10)  # the client closes (400 if already closed)
    wait_for_connections(world, baseline)
    assert_server_alive(world)


# --- /ws/chat --------------------------------------------------------------------------------

def plain_query(world: World) -> str:
    return urlencode({"chat_id": world.chat, "api_key": world.tenant.key, "user_id": "ann"})


class PlainSession:
    """The /ws/chat connection the frame fuzzing goes through (a new one after a loss)."""

    def __init__(self, world: World):
        self.world = world
        self.current: PlainClient | None = None

    def __enter__(self) -> PlainClient:
        if self.current is None:
            self.current = PlainClient(self.world.url, plain_query(self.world))
            self.current.until("connection_established")
        return self.current

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.current.close()
            self.current = None


@pytest.fixture(scope="module")
def plain(world):
    holder = PlainSession(world)
    yield holder
    if holder.current is not None:
        holder.current.close()


plain_frames = st.one_of(
    hostile,
    st.fixed_dictionaries({}, optional={
        "content": st.one_of(valid_content(), hostile),
        "message_string": st.one_of(st.just(FRESH_STRING), st.none(), hostile),
        "client_message_id": st.one_of(st.sampled_from(["p-1", "p-2", "dup"]), hostile),
        "chat_id": st.one_of(st.just(CHAT), st.just(OTHER_CHAT), hostile)}),
    st.fixed_dictionaries({"event": st.one_of(st.sampled_from(CLIENT_EVENTS + RESERVED),
                                              hostile)},
                          optional={"data": st.one_of(
                              st.fixed_dictionaries({}, optional={
                                  "is_typing": st.one_of(st.booleans(), hostile),
                                  "content": st.one_of(valid_content(), hostile)}),
                              hostile)}),
)


def contains(value: Any, sentinel: Sentinel) -> bool:
    if value is sentinel:
        return True
    if isinstance(value, dict):
        value = list(value.values())
    return isinstance(value, list) and any(contains(v, sentinel) for v in value)


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def plain_ask_message_string(p: PlainClient) -> str:
    count = sum(1 for f in p.frames if f["event"] == "get_message_string")
    p.ws.send(json.dumps({"event": "get_message_string", "data": {}}))
    p.until("get_message_string", count + 1)
    return [f for f in p.frames if f["event"] == "get_message_string"][-1]["data"][
        "message_string"]


@settings(max_examples=150)
@given(value=plain_frames, encoding=st.sampled_from(["json", "json", "binary", "text"]),
       garbage=st.text(any_chars, max_size=40))
def test_fuzzed_plain_websocket_frames_get_contract_answers_and_keep_the_connection(
        world, plain, value, encoding, garbage):
    assume(fits(value))
    with plain as p:
        check_plain_frame(world, plain, p, value, encoding, garbage)


def check_plain_frame(world: World, plain: PlainSession, p: PlainClient, value: Any, encoding: str,
                      garbage: str) -> None:
    if encoding == "text" and not is_utf8(garbage):
        # invalid UTF-8 in a text frame: RFC 6455 fails the connection (and the server's
        # websocket library resets it); the next example starts on a new one
        p.ws.send(garbage.encode("utf-8", "surrogatepass"), websocket.ABNF.OPCODE_TEXT)
        with pytest.raises(Closed):
            while True:
                p.next()
        p.close()
        plain.current = None
        return
    fresh = plain_ask_message_string(p) if contains(value, FRESH_STRING) else None
    value = world.resolve(value, fresh)
    if encoding == "json":
        p.ws.send(json.dumps(value))  # lone surrogates travel as \\ud800 escapes
    elif encoding == "binary":
        p.ws.send_binary(json.dumps(value).encode())
    else:  # not JSON
        p.ws.send(garbage)
    mark = len(p.frames)
    p.ws.send(json.dumps({"event": "get_message_string", "data": {}}))
    asked = 1 + (encoding == "json" and isinstance(value, dict)
                 and value.get("event") == "get_message_string"
                 and not too_deep(value))  # too deep: validation_error instead (§9)
    while sum(1 for f in p.frames[mark:] if f["event"] == "get_message_string") < asked:
        p.next()
    sent = (value.get("data") if "event" in value else value) \
        if isinstance(value, dict) else None
    for frame in p.frames[mark:]:
        event, data = frame["event"], frame["data"]
        if event == "error":
            assert_error_body(data, MESSAGE_CODES)
        elif event == "message":
            if data.get("ok") is True:
                assert encoding == "json" and isinstance(sent, dict), (value, data)
                world.record_accepted(data["message"], sent.get("content"),
                                      sent.get("client_message_id"))
            else:
                assert set(data) == {"ok", "error"} and data["ok"] is False, data
                assert_error_body(data["error"], MESSAGE_CODES)
        elif event == "get_message_string":
            assert set(data) == {"message_string", "expires_at"}, data
        elif event == "stop_generation":
            assert data == {"ok": True, "stopped": False}, data
        else:
            assert event == "message_received", frame


@settings(max_examples=40)
@given(query=query_values)
def test_fuzzed_plain_websocket_query_joins_or_is_refused_with_a_contract_code(world, query):
    q = garbage_query(world, query)
    try:
        p = PlainClient(world.url, q)
    except websocket.WebSocketBadStatusException as exc:  # refused before the upgrade
        pytest.fail(f"HTTP {exc.status_code} instead of an error frame")
    try:
        first = p.next()
        while first["event"] == "user_created":
            first = p.next()
        if first["event"] == "error":
            assert_error_body(first["data"], CONNECT_CODES)
            with pytest.raises((Closed, websocket.WebSocketConnectionClosedException)):
                p.next()
        else:
            assert first["event"] == "connection_established", first
            params = {k: world.resolve(v) for k, v in query.items()}
            assert first["data"]["chat_id"] == params["chat_id"] == world.chat
    finally:
        p.close()


def test_huge_and_deeply_nested_plain_websocket_frames_are_answered(world):
    p = PlainClient(world.url, plain_query(world))
    try:
        p.until("connection_established")
        for frame in ['{"content": "' + "x" * 1_000_000 + '"}', "[" * 100_000 + "]" * 100_000,
                      '{"content": ' + '{"a":' * 5000 + "1" + "}" * 5000 + "}",
                      json.dumps({"event": "typing", "data": nested(5000 // 10)})]:
            mark = len(p.frames)
            p.ws.send(frame)
            p.until("error", 1 + sum(1 for f in p.frames if f["event"] == "error"))
            for f in p.frames[mark:]:
                if f["event"] == "error":
                    assert_error_body(f["data"], {"validation_error"})
        p.ws.send(json.dumps({"content": "still here after the huge frames"}))
        while not (p.frames[-1]["event"] == "message" and p.frames[-1]["data"]["ok"]):
            p.next()
        world.record_accepted(p.frames[-1]["data"]["message"],
                              "still here after the huge frames", None)
    finally:
        p.close()


# --- afterwards ------------------------------------------------------------------------------

def test_stored_history_is_what_it_was_plus_exactly_the_accepted_messages(world):
    expected = world.before[world.chat] + sorted(world.accepted.values(),
                                                 key=lambda m: int(m["id"]))
    history = []
    while True:
        page = world.tenant.history(world.chat, offset=len(history))
        history += page
        if len(page) < 200:
            break
    assert history == expected
    assert len(world.accepted) >= 5, "the fuzzer should get some messages accepted"
    assert world.other.history(world.other_chat) == world.before[world.other_chat]


def test_server_alive_with_no_traceback_and_no_internal_error_in_its_log(world):
    assert_server_alive(world)
    log = world.server.log()
    assert "Traceback" not in log, log[-5000:]
    assert "internal_error" not in log and "An internal error occurred" not in log, log[-5000:]
