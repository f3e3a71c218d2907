"""``ChatClient``: a Python client of Workspace Chat, over its REST API and Socket.IO.

It uses only what the server exposes (CONTRACT.md sections 2 and 3): the REST API with the
tenant's API key for chats and connection strings, and the Socket.IO namespace ``/chat``
with a connection string for everything real-time. See docs/clients.md.

Threads: python-socketio runs its transport in background threads. Packets are handled here
in one worker thread per connection, in the order they arrived (python-engineio would give
each packet a thread of its own, and threads need not run in order); your callbacks run in
one more thread of the client's own, in the order of the events, so a callback may call
``send()`` and wait for its answer.
"""
from __future__ import annotations

import itertools
import logging
import queue
import random
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterator, Optional

import requests
import socketio

from ._overrides import OrderedSocketIOClient, allow_batched_packets

log = logging.getLogger(__name__)

NAMESPACE = "/chat"

#: python-engineio's client drops a long-polling response that holds more than this many
#: packets (its default is 16); a replay after a reconnect or a fast stream holds more.
MAX_DECODE_PACKETS = 10_000

#: Refusals that a new attempt cannot cure: reconnecting stops on them.
PERMANENT_REFUSALS = frozenset({"forbidden", "chat_not_found", "not_found", "invalid_api_key",
                                "missing_api_key", "validation_error"})

#: Message-string refusals cured by asking for a fresh string (then the message is re-sent).
STRING_REFUSALS = frozenset({"message_string_expired", "message_string_reused",
                             "invalid_message_string"})

#: The first reconnect attempt after the server itself closed the connection waits at least
#: this long: a stopping server process may still accept connections for a second or two
#: (and would then hold them until it is killed, GRACEFUL_TIMEOUT later).
SERVER_GONE_DELAY = 3.0

# Event names of the contract (section 3), and the client's own "disconnect".
MESSAGE = "message_received"
STREAM_STARTED = "message_stream_started"
STREAM_TOKEN = "message_stream_token"
STREAM_ENDED = "message_stream_ended"
ERROR = "error"
CONNECTED = "connection_established"
DISCONNECTED = "disconnect"


# --- errors ------------------------------------------------------------------------------

class ChatClientError(Exception):
    """Base class of everything this client raises."""


class ChatError(ChatClientError):
    """The server said no: ``code`` is the contract's error code (``validation_error``,
    ``chat_mismatch``, ``rate_limited`` ...), ``message`` its sentence, ``details`` a dict.
    ``status`` is the HTTP status for REST errors, else None."""

    def __init__(self, code: str, message: str = "", details: Optional[dict] = None,
                 status: Optional[int] = None):
        self.code = code
        self.message = message or code
        self.details = details or {}
        self.status = status
        super().__init__(f"{self.message} ({code})")

    @classmethod
    def from_body(cls, body: Any, status: Optional[int] = None) -> "ChatError":
        """From ``{code, message, details}`` or an error envelope ``{"error": {...}}``."""
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            body = body["error"]
        if not isinstance(body, dict):
            return cls("internal_error", str(body), status=status)
        details = body.get("details")
        return cls(str(body.get("code") or "internal_error"), str(body.get("message") or ""),
                   details if isinstance(details, dict) else {}, status)


class ConnectionRefused(ChatError):
    """The server refused to let this user into the chat: ``forbidden`` (not the owner or a
    member of the chat's workspace), ``chat_not_found``, ``invalid_api_key``,
    ``too_many_connections``, ``connection_string_expired`` ... Raised by ``connect()``,
    whether the refusal came from the REST call for the connection string or from the
    Socket.IO handshake."""


class ReplyPendingError(ChatError):
    """``send()`` while the agent's reply to this client's last message is still awaited: the
    client's own rule, with its own code ``reply_pending`` (the server's refusal, when another
    client's message is being answered, stays ``chat_busy``)."""

    def __init__(self, message_id: Optional[str] = None):
        super().__init__("reply_pending", "The reply to your last message is still streaming; "
                         "wait for it (reply.wait() or client.wait_idle()) or stop it "
                         "(client.stop_generation()) before sending.",
                         {"message_id": message_id} if message_id else {})


class NotConnectedError(ChatClientError):
    """The client is not connected to a chat (``connect(chat_id)`` first), or lost its
    connection and could not get it back in time. Its ``code`` is ``not_connected``."""

    code = "not_connected"


class ConnectionFailed(ChatClientError):
    """The server could not be reached (network error, timeout, bad URL)."""


class ChatTimeoutError(ChatClientError, TimeoutError):
    """Nothing arrived within the timeout (an ack, a token, a message)."""


# --- the session -------------------------------------------------------------------------

@dataclass(frozen=True)
class Session:
    """What the client knows about its chat session (a snapshot; ``client.session``)."""

    user_id: str
    chat_id: Optional[str] = None
    connected: bool = False
    reconnecting: bool = False
    sid: Optional[str] = None
    message_string: Optional[str] = field(default=None, repr=False)
    message_string_expires_at: Optional[str] = None
    last_message_id: Optional[str] = None
    workspace_id: Optional[str] = None
    agent_kind: Optional[str] = None
    history_truncated: bool = False
    connects: int = 0


def _max_id(current: Optional[str], candidate: Any) -> Optional[str]:
    """The newer of two message ids (ids are decimal strings that grow)."""
    if candidate is None:
        return current
    candidate = str(candidate)
    if not candidate.isdigit():
        return current
    if current is None or int(candidate) > int(current):
        return candidate
    return current


def _parse_time(text: Any) -> Optional[float]:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# --- streams -----------------------------------------------------------------------------

class _Stream:
    """One agent reply as this client saw it: its text in order, in chunks (the server's
    tokens, plus catch-up text after a reconnect), and how it ended."""

    def __init__(self, message_id: str, reply_to: Optional[str], seq: int):
        self.message_id = message_id
        self.reply_to = reply_to
        self.seq = seq
        self.chunks: list[str] = []
        self.next_index: Optional[int] = 0
        self.ended = False
        self.content: Optional[str] = None
        self.finish_reason: Optional[str] = None
        self.touched = time.monotonic()

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    def catch_up(self, full_text: str) -> None:
        """Add what ``full_text`` (content_so_far or the final content) has beyond ours."""
        have = self.text
        if len(full_text) > len(have) and full_text.startswith(have):
            self.chunks.append(full_text[len(have):])
        self.touched = time.monotonic()

    def token(self, index: Any, token: str) -> bool:
        """Append a token unless it is one we already have; True when it was new."""
        if isinstance(index, int) and self.next_index is not None and index < self.next_index:
            return False
        self.chunks.append(token)
        self.next_index = index + 1 if isinstance(index, int) else None
        self.touched = time.monotonic()
        return True

    def end(self, content: Optional[str], finish_reason: Optional[str]) -> None:
        if content is not None:
            self.catch_up(content)
            self.content = content
        else:
            self.content = self.text
        self.finish_reason = finish_reason
        self.ended = True
        self.touched = time.monotonic()


class SentMessage:
    """What ``send()`` returns: the stored message, and a handle on the agent's reply to it.

    ``message`` is the message object the server stored (``id``, ``content``,
    ``created_at`` ...). When the chat's workspace has an agent (``expects_reply``),
    iterate over it (or over ``tokens()``) to get the reply's tokens as they stream, or call
    ``wait()`` for the whole reply; both stop at ``message_stream_ended``.
    """

    def __init__(self, client: "ChatClient", message: dict, expects_reply: bool):
        self._client = client
        self.message = message
        self.id = str(message["id"])
        self.expects_reply = expects_reply
        self.acked = time.monotonic()

    def __repr__(self) -> str:
        return f"<SentMessage id={self.id} expects_reply={self.expects_reply}>"

    def _stream(self) -> Optional[_Stream]:
        return self._client._stream_replying_to(self.id)

    @property
    def reply_done(self) -> bool:
        """True once the reply has ended (or when none is expected)."""
        with self._client._cond:
            stream = self._stream()
            return not self.expects_reply if stream is None else stream.ended

    @property
    def reply_id(self) -> Optional[str]:
        """The id of the agent's reply message, once its stream has started."""
        with self._client._cond:
            stream = self._stream()
            return stream.message_id if stream else None

    @property
    def finish_reason(self) -> Optional[str]:
        """``stop``, ``cancelled``, ``error`` or ``timeout`` once the reply has ended."""
        with self._client._cond:
            stream = self._stream()
            return stream.finish_reason if stream else None

    def tokens(self, timeout: Optional[float] = None) -> Iterator[str]:
        """The reply's text, token by token, until its stream ends. ``timeout``: seconds to
        wait for each next token (default: the client's ``reply_timeout``)."""
        if not self.expects_reply:
            return iter(())
        return self._client._iter_stream(self._stream, timeout)

    __iter__ = tokens

    def wait(self, timeout: Optional[float] = None) -> Optional[str]:
        """Block until the reply has ended; return its text (None when no reply is expected).
        ``timeout``: seconds without progress before ChatTimeoutError."""
        if not self.expects_reply:
            return None
        for _ in self.tokens(timeout):
            pass
        with self._client._cond:
            stream = self._stream()
            return stream.content if stream is not None else None


# --- the Socket.IO layer -----------------------------------------------------------------

class _Connection:
    """One Socket.IO connection (a reconnect makes a new one)."""

    def __init__(self, chat_id: str, request_timeout: float):
        self.chat_id = chat_id
        self.sio = OrderedSocketIOClient(reconnection=False, handle_sigint=False,
                                   request_timeout=request_timeout)
        self.established = False
        self.closing = False        # we are closing it
        self.closed = False         # it is gone
        self.chat_deleted = False
        self.refusal: Any = None    # connect_error data
        self.sid: Optional[str] = None
        self.message_string: Optional[str] = None
        self.message_string_expires_at: Optional[str] = None
        self.string_deadline: Optional[float] = None  # monotonic time after which it is stale
        self.clock_offset = 0.0     # server clock - local clock, seconds
        self.history_truncated = False

    def take_string(self) -> Optional[str]:
        string, self.message_string = self.message_string, None
        if string is None:
            return None
        if self.string_deadline is not None and time.monotonic() > self.string_deadline:
            return None
        return string

    def set_string(self, string: Optional[str], expires_at: Any) -> None:
        self.message_string = string if isinstance(string, str) else None
        self.message_string_expires_at = expires_at if isinstance(expires_at, str) else None
        expires = _parse_time(expires_at)
        # Treat a string as stale a second before the server would, to leave time to send it.
        self.string_deadline = (time.monotonic() + (expires - self.clock_offset - time.time())
                                - 1.0) if expires is not None else None


class _Dropped(Exception):
    """The connection went away while waiting for an ack."""


# --- the client --------------------------------------------------------------------------

Handler = Callable[[Any], Any]


class ChatClient:
    """A client of one Workspace Chat server, as one user of one tenant.

    ``url`` is the server's base URL (``http://localhost:8000``), ``api_key`` a key of the
    tenant, ``user_id`` the tenant-scoped user this client acts as.

    Options: ``transports`` (``("websocket",)`` by default; ``("polling",)`` for long-polling,
    which raises python-engineio's packets-per-response limit), ``timeout`` (seconds for REST
    calls, connecting and acks; 10), ``reply_timeout`` (seconds to wait for the next token
    of a reply; 60, the server's AGENT_TIMEOUT), ``reconnect`` (reconnect by itself after a
    drop; True), ``reconnect_delay`` / ``reconnect_delay_max`` (the backoff: 1 s doubling
    up to 5 s, +-20 %; at least 3 s after the server itself closed the connection),
    ``inbox_size`` (how many received messages ``receive()`` keeps; 1000), and callbacks
    ``on_message``, ``on_token``, ``on_stream_start``, ``on_stream_end``, ``on_error``,
    ``on_connect``, ``on_disconnect`` (see the methods of the same names).
    """

    def __init__(self, url: str, api_key: str, user_id: str, *,
                 transports: tuple[str, ...] | list[str] | str = ("websocket",),
                 timeout: float = 10.0, reply_timeout: float = 60.0, reconnect: bool = True,
                 reconnect_delay: float = 1.0, reconnect_delay_max: float = 5.0,
                 inbox_size: int = 1000,
                 on_message: Optional[Handler] = None, on_token: Optional[Handler] = None,
                 on_stream_start: Optional[Handler] = None,
                 on_stream_end: Optional[Handler] = None, on_error: Optional[Handler] = None,
                 on_connect: Optional[Handler] = None,
                 on_disconnect: Optional[Handler] = None):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.user_id = user_id
        self.transports = [transports] if isinstance(transports, str) else list(transports)
        for transport in self.transports:
            if transport not in ("websocket", "polling"):
                raise ValueError(f"unknown transport {transport!r}: use 'websocket' or 'polling'")
        if not self.transports:
            raise ValueError("at least one transport is needed")
        if "polling" in self.transports:
            # python-engineio's client refuses a polling response with more than 16 packets
            # (and drops the connection): a replay or a fast stream holds more.
            allow_batched_packets(MAX_DECODE_PACKETS)
        self.timeout = timeout
        self.reply_timeout = reply_timeout
        self.reconnect = reconnect
        self.reconnect_delay = reconnect_delay
        self.reconnect_delay_max = reconnect_delay_max

        self._http = requests.Session()
        self._http.headers.update({"X-API-Key": api_key})
        self._cond = threading.Condition(threading.RLock())
        self._emit_lock = threading.Lock()
        self._send_lock = threading.Lock()

        self._conn: Optional[_Connection] = None
        self._generation = 0
        self._chat_id: Optional[str] = None
        self._reconnecting = False
        self._connects = 0
        self._last_message_id: Optional[str] = None
        self._workspace_id: Optional[str] = None
        self._agent_kind: Optional[str] = None
        self._streams: "OrderedDict[str, _Stream]" = OrderedDict()
        self._stream_seq = itertools.count(1)
        self._last_sent: Optional[SentMessage] = None
        self._inbox: deque[dict] = deque(maxlen=inbox_size)

        self._handlers: dict[str, list[Handler]] = {}
        self._callbacks: "queue.Queue[tuple[str, Any]]" = queue.Queue()
        self._dispatcher: Optional[threading.Thread] = None
        for event, fn in ((MESSAGE, on_message), (STREAM_TOKEN, on_token),
                          (STREAM_STARTED, on_stream_start), (STREAM_ENDED, on_stream_end),
                          (ERROR, on_error), (CONNECTED, on_connect),
                          (DISCONNECTED, on_disconnect)):
            if fn is not None:
                self.on(event, fn)

    def __repr__(self) -> str:
        return (f"<ChatClient {self.url} user={self.user_id!r} chat={self._chat_id!r} "
                f"connected={self.connected}>")

    # -- context manager ----------------------------------------------------------------

    def __enter__(self) -> "ChatClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Disconnect and release the HTTP session."""
        self.disconnect()
        self._http.close()

    # -- state --------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while joined to a chat (False while reconnecting)."""
        with self._cond:
            return self._conn is not None and self._conn.established

    @property
    def chat_id(self) -> Optional[str]:
        """The chat of the session (the last one ``connect()`` joined)."""
        return self._chat_id

    @property
    def last_message_id(self) -> Optional[str]:
        """The newest message id this client has seen; sent as ``last_message_id`` when it
        reconnects."""
        return self._last_message_id

    @property
    def session(self) -> Session:
        with self._cond:
            conn = self._conn if self._conn is not None and self._conn.established else None
            return Session(user_id=self.user_id, chat_id=self._chat_id,
                           connected=conn is not None, reconnecting=self._reconnecting,
                           sid=conn.sid if conn else None,
                           message_string=conn.message_string if conn else None,
                           message_string_expires_at=(conn.message_string_expires_at
                                                      if conn else None),
                           last_message_id=self._last_message_id,
                           workspace_id=self._workspace_id, agent_kind=self._agent_kind,
                           history_truncated=conn.history_truncated if conn else False,
                           connects=self._connects)

    @property
    def reply_pending(self) -> bool:
        """True while ``send()`` would refuse with ReplyPendingError."""
        with self._cond:
            return self._pending_reply() is not None

    # -- callbacks ----------------------------------------------------------------------

    def on(self, event: str, handler: Optional[Handler] = None):
        """Call ``handler(data)`` for every server event ``event`` of the chat (any name of
        the contract: ``message_received``, ``typing``, ``user_created`` ...), or
        ``"disconnect"``. Usable as a decorator. Handlers run in the client's callback
        thread, one at a time, in the order of the events; an exception is logged."""
        def register(fn: Handler) -> Handler:
            with self._cond:
                self._handlers.setdefault(event, []).append(fn)
            return fn

        return register(handler) if handler is not None else register

    def on_message(self, handler: Handler) -> Handler:
        """``handler(message)`` for every message received (a message object; your own
        messages too, and the missed ones replayed after a reconnect)."""
        return self.on(MESSAGE, handler)

    def on_token(self, handler: Handler) -> Handler:
        """``handler(data)`` for every streamed token: ``{message_id, chat_id, token,
        index}``."""
        return self.on(STREAM_TOKEN, handler)

    def on_stream_start(self, handler: Handler) -> Handler:
        """``handler(data)`` when a reply starts streaming: ``{message_id, chat_id,
        reply_to}``, plus ``content_so_far`` when this client joined it mid-stream."""
        return self.on(STREAM_STARTED, handler)

    def on_stream_end(self, handler: Handler) -> Handler:
        """``handler(data)`` when a reply ends: ``{message_id, chat_id, content,
        finish_reason}``."""
        return self.on(STREAM_ENDED, handler)

    def on_error(self, handler: Handler) -> Handler:
        """``handler(error)`` with a ChatError for every ``error`` event (e.g.
        ``agent_error``), and a ConnectionRefused when reconnecting is refused for good."""
        return self.on(ERROR, handler)

    def on_connect(self, handler: Handler) -> Handler:
        """``handler(data)`` with ``connection_established``'s payload, on every (re)connect."""
        return self.on(CONNECTED, handler)

    def on_disconnect(self, handler: Handler) -> Handler:
        """``handler({"reason": str, "reconnecting": bool})`` when the connection ends:
        ``reconnecting`` tells whether the client is getting it back by itself."""
        return self.on(DISCONNECTED, handler)

    def _dispatch(self, event: str, data: Any) -> None:
        with self._cond:
            if not self._handlers.get(event):
                return
            self._callbacks.put((event, data))
            if self._dispatcher is None:
                self._dispatcher = threading.Thread(target=self._run_callbacks,
                                                    name="chat-client-callbacks", daemon=True)
                self._dispatcher.start()

    def _run_callbacks(self) -> None:
        """The callback thread: runs handlers in event order; ends when idle for a while."""
        while True:
            try:
                event, data = self._callbacks.get(timeout=5.0)
            except queue.Empty:
                with self._cond:
                    if self._callbacks.empty():
                        self._dispatcher = None
                        return
                continue
            with self._cond:
                handlers = list(self._handlers.get(event, ()))
            for handler in handlers:
                try:
                    handler(data)
                except Exception:
                    log.exception("error in the %s callback %r", event, handler)

    # -- REST ---------------------------------------------------------------------------

    def _rest(self, method: str, path: str, json: Any = None,
              params: Optional[dict] = None) -> Any:
        try:
            response = self._http.request(method, self.url + path, json=json, params=params,
                                          timeout=self.timeout)
        except requests.RequestException as exc:
            raise ConnectionFailed(f"Could not reach {self.url}: {exc}") from None
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {"code": "internal_error" if response.status_code >= 500 else "http_error",
                        "message": f"HTTP {response.status_code} from {path}"}
            raise ChatError.from_body(body, response.status_code)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def create_chat(self, title: Optional[str] = None, workspace_id: Optional[str] = None,
                    metadata: Optional[dict] = None) -> dict:
        """Create a chat owned by this user (``POST /api/v1/chats/``); returns the chat
        object. Without ``workspace_id`` it goes into the user's default workspace."""
        body: dict[str, Any] = {"user_id": self.user_id}
        if title is not None:
            body["title"] = title
        if workspace_id is not None:
            body["workspace_id"] = workspace_id
        if metadata is not None:
            body["metadata"] = metadata
        return self._rest("POST", "/api/v1/chats/", json=body)

    def get_chat(self, chat_id: str) -> dict:
        """``GET /api/v1/chats/{chat_id}``."""
        return self._rest("GET", f"/api/v1/chats/{chat_id}")

    def history(self, chat_id: Optional[str] = None, **params: Any) -> list[dict]:
        """One page of a chat's stored messages (``GET /api/v1/chats/{id}/messages``):
        ``offset``, ``limit`` (max 200), ``order``, ``after_id``, ``before_id``."""
        chat_id = chat_id or self._chat_id
        if chat_id is None:
            raise NotConnectedError("No chat: pass chat_id or connect(chat_id) first.")
        return self._rest("GET", f"/api/v1/chats/{chat_id}/messages", params=params)["messages"]

    def connection_string(self, chat_id: str) -> dict:
        """A connection string for this user and chat:
        ``{connection_string, chat_id, expires_at}``."""
        return self._rest("POST", f"/api/v1/chats/{chat_id}/connection-string",
                          json={"user_id": self.user_id})

    def _workspace_info(self, chat_id: str) -> tuple[Optional[str], Optional[str]]:
        """The chat's workspace id and agent kind (best effort: None, None on failure)."""
        try:
            workspace_id = self.get_chat(chat_id)["workspace_id"]
            workspace = self._rest("GET", f"/api/v1/workspaces/{workspace_id}")
            return workspace_id, (workspace.get("agent") or {}).get("kind", "none")
        except (ChatClientError, KeyError, TypeError, ValueError):
            return None, None

    # -- connecting ---------------------------------------------------------------------

    def connect(self, chat_id: str, *, last_message_id: Any = None,
                timeout: Optional[float] = None) -> Session:
        """Join ``chat_id`` (leaving the chat it was connected to first): fetch a connection
        string over REST, connect to ``/chat`` with it and wait for
        ``connection_established``. With ``last_message_id``, the messages stored after it
        are replayed to this client first. Returns the new ``session``.

        Raises ConnectionRefused (``forbidden``, ``chat_not_found`` ...) or ConnectionFailed.
        """
        self.disconnect()
        timeout = self.timeout if timeout is None else timeout
        with self._cond:
            self._generation += 1
            generation = self._generation
            self._chat_id = chat_id
            self._last_message_id = _max_id(None, last_message_id)
            self._streams.clear()
            self._inbox.clear()
            self._last_sent = None
            self._workspace_id = self._agent_kind = None
        self._open(chat_id, generation, timeout)
        return self.session

    def _open(self, chat_id: str, generation: int, timeout: float) -> None:
        """Fetch a fresh connection string and connect with the current last_message_id."""
        try:
            string = self.connection_string(chat_id)["connection_string"]
        except ChatError as exc:
            raise ConnectionRefused(exc.code, exc.message, exc.details, exc.status) from None
        workspace_id, agent_kind = self._workspace_info(chat_id)
        conn = _Connection(chat_id, request_timeout=timeout)
        sio = conn.sio
        sio.on("*", lambda event, *args: self._on_event(conn, event, args[0] if args else None),
               namespace=NAMESPACE)
        sio.on("connect_error", lambda *args: setattr(conn, "refusal", args[0] if args else None),
               namespace=NAMESPACE)
        sio.on("disconnect", lambda *args: self._on_dropped(conn, args[0] if args else None),
               namespace=NAMESPACE)
        with self._cond:
            if generation != self._generation:
                raise NotConnectedError("connect() was superseded by disconnect()/connect().")
            self._conn = conn
            if workspace_id is not None:
                self._workspace_id, self._agent_kind = workspace_id, agent_kind
            auth: dict[str, Any] = {"chat_id": chat_id, "connection_string": string}
            if self._last_message_id is not None:
                auth["last_message_id"] = self._last_message_id
        deadline = time.monotonic() + timeout
        try:
            sio.connect(self.url, auth=auth, namespaces=[NAMESPACE],
                        transports=self.transports, wait_timeout=timeout)
        except (socketio.exceptions.ConnectionError, ValueError) as exc:
            self._abandon(conn)
            refusal = conn.refusal
            if isinstance(refusal, dict) and isinstance(refusal.get("data"), dict):
                data = refusal["data"]
                raise ConnectionRefused(str(data.get("code") or "connection_refused"),
                                        str(data.get("message") or refusal.get("message") or ""),
                                        {}) from None
            raise ConnectionFailed(f"Could not connect to {self.url}: {exc}") from None
        with self._cond:
            while not conn.established:
                remaining = deadline - time.monotonic()
                if conn.closed or remaining <= 0:
                    break
                self._cond.wait(remaining)
            established = conn.established and not conn.closed
            superseded = generation != self._generation
        if not established or superseded:
            self._abandon(conn)
            if superseded:
                raise NotConnectedError("connect() was superseded by disconnect()/connect().")
            raise ConnectionFailed("The server did not confirm the connection in time.")

    def _abandon(self, conn: _Connection) -> None:
        with self._cond:
            conn.closing = True
            if self._conn is conn:
                self._conn = None
            self._cond.notify_all()
        try:
            conn.sio.disconnect()
        except Exception:  # already gone
            pass

    def disconnect(self) -> None:
        """Leave the chat and stop reconnecting. The session keeps its ``chat_id`` and
        ``last_message_id`` (``connect(chat_id, last_message_id=...)`` catches up)."""
        with self._cond:
            self._generation += 1
            conn, self._conn = self._conn, None
            was_active = (conn is not None and conn.established) or self._reconnecting
            self._reconnecting = False
            if conn is not None:
                conn.closing = True
            self._cond.notify_all()
        if conn is not None:
            try:
                conn.sio.disconnect()
            except Exception:
                pass
        if was_active:
            self._dispatch(DISCONNECTED, {"reason": "client disconnect", "reconnecting": False})

    def _on_dropped(self, conn: _Connection, reason: Any) -> None:
        """python-socketio's ``disconnect``: ours, the server's, or the network's."""
        with self._cond:
            if conn.closed:
                return
            conn.closed = True
            self._cond.notify_all()
            if conn is not self._conn or conn.closing or not conn.established:
                if conn is self._conn:
                    self._conn = None
                return
            self._conn = None
            reconnecting = self.reconnect and not conn.chat_deleted
            self._reconnecting = reconnecting
            generation = self._generation
        why = "chat deleted" if conn.chat_deleted else str(reason or "connection lost")
        self._dispatch(DISCONNECTED, {"reason": why, "reconnecting": reconnecting})
        if reconnecting:
            # When the server closed the connection itself, it is stopping (a deploy or a
            # restart) and may still accept connections for a moment: wait until it is gone.
            floor = SERVER_GONE_DELAY if reason == socketio.Client.reason.SERVER_DISCONNECT \
                else 0.0
            threading.Thread(target=self._reconnect_loop,
                             args=(generation, conn.chat_id, floor),
                             name="chat-client-reconnect", daemon=True).start()

    def _reconnect_loop(self, generation: int, chat_id: str, floor: float) -> None:
        delay = self.reconnect_delay
        while True:
            with self._cond:
                # +-20 %: clients dropped together do not all come back at the same instant
                wake = time.monotonic() + max(floor, delay * random.uniform(0.8, 1.2))
                floor = 0.0
                while generation == self._generation and time.monotonic() < wake:
                    self._cond.wait(wake - time.monotonic())
                if generation != self._generation:
                    return
            try:
                self._open(chat_id, generation, self.timeout)
                return
            except ConnectionRefused as exc:
                if exc.code in PERMANENT_REFUSALS:
                    with self._cond:
                        if generation != self._generation:
                            return
                        self._reconnecting = False
                        self._cond.notify_all()
                    self._dispatch(ERROR, exc)
                    self._dispatch(DISCONNECTED, {"reason": f"connection refused ({exc.code})",
                                                  "reconnecting": False})
                    return
                log.info("reconnect refused (%s); trying again", exc.code)
            except ChatClientError as exc:
                log.info("reconnect failed (%s); trying again", exc)
            delay = min(delay * 2, self.reconnect_delay_max)

    # -- receiving ----------------------------------------------------------------------

    def _on_event(self, conn: _Connection, event: str, data: Any) -> None:
        """Every server event of a connection, in order (the packet worker thread)."""
        dispatch: Any = data
        with self._cond:
            if conn is not self._conn:
                return
            payload = data if isinstance(data, dict) else {}
            if event == CONNECTED:
                offset = _parse_time(payload.get("server_time"))
                conn.clock_offset = (offset - time.time()) if offset is not None else 0.0
                conn.sid = payload.get("sid")
                conn.set_string(payload.get("message_string"),
                                payload.get("message_string_expires_at"))
                conn.history_truncated = bool(payload.get("history_truncated"))
                conn.established = True
                self._reconnecting = False
                self._connects += 1
            elif event == MESSAGE:
                self._last_message_id = _max_id(self._last_message_id, payload.get("id"))
                self._inbox.append(payload)
                if payload.get("role") == "agent" and payload.get("id") is not None:
                    # a reply that ended while we were away, replayed
                    stream = self._stream(str(payload["id"]), payload.get("reply_to"))
                    if not stream.ended:
                        stream.end(payload.get("content"), stream.finish_reason)
            elif event == STREAM_STARTED and payload.get("message_id") is not None:
                stream = self._stream(str(payload["message_id"]), payload.get("reply_to"))
                if "content_so_far" in payload and not stream.ended:
                    stream.catch_up(str(payload.get("content_so_far") or ""))
                    stream.next_index = None  # the tokens that follow are all new
            elif event == STREAM_TOKEN and payload.get("message_id") is not None:
                stream = self._stream(str(payload["message_id"]), None)
                if not stream.token(payload.get("index"), str(payload.get("token") or "")):
                    dispatch = None  # already had it
            elif event == STREAM_ENDED and payload.get("message_id") is not None:
                stream = self._stream(str(payload["message_id"]), None)
                stream.end(payload.get("content"), payload.get("finish_reason"))
                self._last_message_id = _max_id(self._last_message_id, payload["message_id"])
            elif event == "chat_deleted":
                conn.chat_deleted = True
            elif event == ERROR:
                dispatch = ChatError.from_body(payload)
            self._cond.notify_all()
        if dispatch is not None:
            self._dispatch(event, dispatch)

    def _stream(self, message_id: str, reply_to: Any) -> _Stream:
        stream = self._streams.get(message_id)
        if stream is None:
            stream = _Stream(message_id, str(reply_to) if reply_to is not None else None,
                             next(self._stream_seq))
            self._streams[message_id] = stream
            while len(self._streams) > 100:  # keep the recent ones
                oldest = next(iter(self._streams.values()))
                if not oldest.ended:
                    break
                self._streams.popitem(last=False)
        elif stream.reply_to is None and reply_to is not None:
            stream.reply_to = str(reply_to)
        return stream

    def _stream_replying_to(self, message_id: str) -> Optional[_Stream]:
        for stream in reversed(self._streams.values()):
            if stream.reply_to == message_id:
                return stream
        return None

    def _pending_reply(self) -> Optional[str]:
        """The id of what is still awaited (a reply's message id, or the id of the message
        whose reply has not started yet), else None. Call with the lock held."""
        now = time.monotonic()
        for stream in self._streams.values():
            if not stream.ended and now - stream.touched < self.reply_timeout:
                return stream.message_id
        sent = self._last_sent
        if sent is not None and sent.expects_reply and self._stream_replying_to(sent.id) is None \
                and now - sent.acked < self.reply_timeout:
            return sent.id
        return None

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Wait until no reply is awaited or streaming in the chat (so ``send()`` would not
        refuse); False if that did not happen within ``timeout`` (default reply_timeout)."""
        deadline = time.monotonic() + (self.reply_timeout if timeout is None else timeout)
        with self._cond:
            while self._pending_reply() is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 1.0))
            return True

    def receive(self, timeout: Optional[float] = None) -> dict:
        """The next received message (oldest first) from the inbox; waits up to ``timeout``
        seconds (default: the client's ``timeout``), then raises ChatTimeoutError."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._inbox:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ChatTimeoutError(f"no message within {timeout}s")
                self._cond.wait(remaining)
            return self._inbox.popleft()

    def messages(self, timeout: Optional[float] = None) -> Iterator[dict]:
        """Iterate over received messages as they arrive; stops when none arrives within
        ``timeout`` seconds (None: never stops while the session lasts)."""
        while True:
            with self._cond:
                deadline = None if timeout is None else time.monotonic() + timeout
                while not self._inbox:
                    if self._conn is None and not self._reconnecting:
                        return
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return
                    self._cond.wait(1.0 if remaining is None else min(remaining, 1.0))
                message = self._inbox.popleft()
            yield message

    def stream_reply(self, timeout: Optional[float] = None) -> Iterator[str]:
        """The tokens of the current reply, as they arrive, until ``message_stream_ended``:
        the reply to the last message sent if it is awaited, else the reply streaming in the
        chat now, else the next one to start. ``timeout``: seconds to wait for each token
        (default reply_timeout); ChatTimeoutError after that."""
        with self._cond:
            sent = self._last_sent
            if sent is not None and sent.expects_reply:
                own = self._stream_replying_to(sent.id)
                if own is None and time.monotonic() - sent.acked < self.reply_timeout:
                    return self._iter_stream(lambda: self._stream_replying_to(sent.id), timeout)
                if own is not None and not own.ended:
                    return self._iter_stream(lambda: own, timeout)
            active = [stream for stream in self._streams.values() if not stream.ended]
            if active:
                current = active[-1]
                return self._iter_stream(lambda: current, timeout)
            after = max((stream.seq for stream in self._streams.values()), default=0)

        def find_next() -> Optional[_Stream]:
            for stream in self._streams.values():
                if stream.seq > after:
                    return stream
            return None

        return self._iter_stream(find_next, timeout)

    def _iter_stream(self, find: Callable[[], Optional[_Stream]],
                     timeout: Optional[float]) -> Iterator[str]:
        idle = self.reply_timeout if timeout is None else timeout
        position = 0
        while True:
            with self._cond:
                deadline = time.monotonic() + idle
                while True:
                    stream = find()
                    if stream is not None and position < len(stream.chunks):
                        chunk = stream.chunks[position]
                        position += 1
                        break
                    if stream is not None and stream.ended:
                        return
                    if self._conn is None and not self._reconnecting:
                        raise NotConnectedError("The connection ended before the reply did.")
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise ChatTimeoutError(f"no token of the reply within {idle}s")
                    self._cond.wait(remaining)
            yield chunk

    # -- sending ------------------------------------------------------------------------

    def _current(self, deadline: float) -> _Connection:
        """The live connection, waiting for a reconnect in progress until ``deadline``."""
        with self._cond:
            while True:
                conn = self._conn
                if conn is not None and conn.established and not conn.closed:
                    return conn
                if not self._reconnecting and (conn is None or conn.closed):
                    raise NotConnectedError("Not connected to a chat: call connect(chat_id) "
                                            "first.")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise NotConnectedError("The connection was lost and is not back yet.")
                self._cond.wait(remaining)

    def _call(self, conn: _Connection, event: str, data: Any, deadline: float) -> Any:
        """Emit ``event`` and wait for its ack; _Dropped if the connection goes meanwhile."""
        box: list[Any] = []

        def ack(*args: Any) -> None:
            with self._cond:
                box.append(args[0] if len(args) == 1 else list(args))
                self._cond.notify_all()

        try:
            with self._emit_lock:
                conn.sio.emit(event, data, namespace=NAMESPACE, callback=ack)
        except socketio.exceptions.SocketIOError:
            raise _Dropped() from None
        with self._cond:
            while not box:
                if conn.closed:
                    raise _Dropped()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ChatTimeoutError(f"no answer to {event!r} within the timeout")
                self._cond.wait(remaining)
            return box[0]

    def get_message_string(self, timeout: Optional[float] = None) -> str:
        """Ask the server for a fresh message string (``send()`` does it when needed)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            conn = self._current(deadline)
            try:
                answer = self._call(conn, "get_message_string", {}, deadline)
            except _Dropped:
                continue
            if not isinstance(answer, dict) or "message_string" not in answer:
                raise ChatError.from_body(answer)
            with self._cond:
                conn.set_string(answer["message_string"], answer.get("expires_at"))
                return answer["message_string"]

    def send(self, content: str, chat_id: Optional[str] = None, *,
             client_message_id: Optional[str] = None,
             timeout: Optional[float] = None) -> SentMessage:
        """Send a message to the session's chat and wait for the server's ack; returns a
        SentMessage (the stored message, and a handle on the agent's reply).

        Refuses with NotConnectedError when not connected, with ReplyPendingError while the
        reply to the previous message (or any reply in the chat) is still streaming, and
        with ChatError ``chat_mismatch`` when ``chat_id`` is not the connected chat. The
        server's refusals raise ChatError with the contract's code (``validation_error``,
        ``rate_limited`` ...). The message carries a ``client_message_id`` (a new UUID
        unless given), so that after a dropped connection it is re-sent once reconnected
        without being stored twice.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        payload: dict[str, Any] = {"content": content,
                                   "client_message_id": client_message_id or uuid.uuid4().hex}
        if chat_id is not None:
            payload["chat_id"] = chat_id
        with self._send_lock:
            with self._cond:
                if self._chat_id is None or (self._conn is None and not self._reconnecting):
                    raise NotConnectedError("Not connected to a chat: call connect(chat_id) "
                                            "first.")
                if chat_id is not None and chat_id != self._chat_id:
                    raise ChatError("chat_mismatch", f"This client is connected to chat "
                                    f"{self._chat_id}, not {chat_id}: connect({chat_id!r}) "
                                    "first.", {"chat_id": self._chat_id})
                pending = self._pending_reply()
                if pending is not None:
                    raise ReplyPendingError(pending)
            fresh_string_asked = False
            while True:
                conn = self._current(deadline)
                with self._cond:
                    string = conn.take_string()
                if string is None:
                    try:
                        string = self._fresh_string(conn, deadline)
                    except _Dropped:
                        continue
                try:
                    ack = self._call(conn, "message", {**payload, "message_string": string},
                                     deadline)
                except _Dropped:
                    continue  # same client_message_id after the reconnect: stored once
                if isinstance(ack, dict) and ack.get("ok") is True:
                    return self._sent(conn, ack)
                error = ChatError.from_body(ack.get("error") if isinstance(ack, dict) else ack)
                if error.code in STRING_REFUSALS and not fresh_string_asked:
                    fresh_string_asked = True
                    continue  # the next round asks for a fresh string
                raise error

    def _fresh_string(self, conn: _Connection, deadline: float) -> str:
        answer = self._call(conn, "get_message_string", {}, deadline)
        if not isinstance(answer, dict) or "message_string" not in answer:
            raise ChatError.from_body(answer)
        return answer["message_string"]

    def _sent(self, conn: _Connection, ack: dict) -> SentMessage:
        message = ack["message"]
        with self._cond:
            conn.set_string(ack.get("next_message_string"),
                            ack.get("next_message_string_expires_at"))
            self._last_message_id = _max_id(self._last_message_id, message.get("id"))
            # The ack says whether a reply will stream (reply_expected); a server without the
            # field is judged by the workspace's agent.
            expected = ack.get("reply_expected")
            if not isinstance(expected, bool):
                expected = self._agent_kind not in (None, "none")
            sent = SentMessage(self, message, expects_reply=expected
                               or self._stream_replying_to(str(message["id"])) is not None)
            self._last_sent = sent
            self._cond.notify_all()
        return sent

    def stop_generation(self, timeout: Optional[float] = None) -> bool:
        """Ask the server to stop the reply streaming in the chat; True if one was."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            conn = self._current(deadline)
            try:
                answer = self._call(conn, "stop_generation", {}, deadline)
            except _Dropped:
                continue
            if isinstance(answer, dict) and answer.get("ok") is True:
                return bool(answer.get("stopped"))
            raise ChatError.from_body(answer.get("error") if isinstance(answer, dict) else answer)

    def typing(self, is_typing: bool = True) -> None:
        """Tell the others in the chat whether this user is typing."""
        conn = self._current(time.monotonic())
        with self._emit_lock:
            conn.sio.emit("typing", {"is_typing": bool(is_typing)}, namespace=NAMESPACE)
