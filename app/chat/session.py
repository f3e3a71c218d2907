"""The chat session: what a live connection is, whatever its transport (Socket.IO or /ws/chat).

It owns the registry of this process's open connections, joining (gate, room, catch-up, open
gate) and leaving, the renewal of their leases, what a connection may send (the client events,
typing among them), the connection's kept message string, and the metrics. Each adapter only
parses its wire format and renders what this layer returns or raises.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

from flask import Flask, current_app

from app.chat import limits, revocation
from app.chat.catchup import catch_up, note_slow_client
from app.chat.connections import Connection, release_connection, shared_state
from app.chat.messages import new_message_string, post_message, stop_generation
from app.chat.rooms import NAMESPACE, chat_room
from app.errors import ApiError
from app.extensions import socketio
from app.state import SharedState

log = logging.getLogger(__name__)

#: The transports, as the ``transport`` label of the error metric names them.
SOCKETIO = "socketio"
WEBSOCKET = "websocket"

#: What clients may send; anything else is answered ``validation_error``.
CLIENT_EVENTS = ("message", "get_message_string", "stop_generation", "typing")

#: Message string errors after which the kept string may be spent or refused: a session that
#: fills the string in replaces it, so that the client's next message goes through.
STRING_ERRORS = ("message_string_reused", "message_string_expired", "invalid_message_string",
                 "rate_limited", "chat_busy")


@dataclass
class Session:
    """One open connection of this process."""

    connection: Connection
    transport: str
    #: Sends a message with the kept string when it comes without one (/ws/chat does).
    fills_in_string: bool = False
    #: Undoes the adapter's ``subscribe`` when the connection ends (None: nothing to undo).
    unsubscribe: Callable[[], None] | None = None
    #: The connection's current message string: from connection_established, then each
    #: ack's next string and each get_message_string.
    message_string: str | None = None
    counted: bool = False  # in the connections gauge
    app: Flask | None = field(default=None, repr=False)
    state: SharedState | None = field(default=None, repr=False)


#: Every open connection of this process, both transports, by sid (a Socket.IO sid, or the
#: "ws:..." id of a /ws/chat connection).
_sessions: dict[str, Session] = {}
_renewer_started = False


class _Connections(Mapping):
    """The registry read as sid -> Connection (log context, shutdown, the transport layer)."""

    def __getitem__(self, sid: str) -> Connection:
        return _sessions[sid].connection

    def __iter__(self) -> Iterator[str]:
        return iter(list(_sessions))

    def __len__(self) -> int:
        return len(_sessions)


#: This process's open connections, sid -> Connection, both transports.
connections: Mapping[str, Connection] = _Connections()


def get(sid: str) -> Session | None:
    """The open session ``sid``, if any."""
    return _sessions.get(sid)


def sids(transport: str) -> list[str]:
    """The sids of this process's open connections over ``transport``."""
    return [sid for sid, session in list(_sessions.items()) if session.transport == transport]


def _metrics():
    return current_app.extensions["metrics"]


# -- joining and leaving --------------------------------------------------------------------

def join(connection: Connection, first: bool, transport: str, *,
         subscribe: Callable[[str], Callable[[], None] | None],
         send: Callable[[str, Any], None], sending: ContextManager | None = None,
         fills_in_string: bool = False) -> Session:
    """Register an authorised connection, join it to its chat's room and send its catch-up.

    ``subscribe(room)`` joins the room the adapter's way and returns what undoes it when the
    connection ends (or None); ``send(event, data)`` sends one catch-up event, inside
    ``sending`` if given.

    The order the client sees: user_created, connection_established, every missed message,
    the reply streaming right now (content_so_far), then live room traffic. The room is
    joined behind the manager's gate, which holds live traffic while the database and the
    shared state are read (see app/chat/delivery.py), so nothing is lost, doubled or
    reordered. If joining fails, the connection is left (and released) before the error
    propagates.
    """
    sid = connection.sid
    manager = socketio.server.manager
    session = _sessions[sid] = Session(connection, transport, fills_in_string,
                                       app=current_app._get_current_object(),
                                       state=shared_state())
    try:
        manager.gate(sid, chat_room(connection.chat_id))
        revocation.track(connection)
        session.unsubscribe = subscribe(chat_room(connection.chat_id))
        events, keep = catch_up(connection, first)
        with sending or nullcontext():
            for event, data in events:
                if event == "connection_established":
                    session.message_string = data["message_string"]
                send(event, data)
            manager.open_gate(sid, NAMESPACE, keep)
        _metrics().connects.inc()
        _metrics().connections.inc()
        session.counted = True
        _start_lease_renewal()
    except BaseException:
        leave(sid)
        raise
    return session


def leave(sid: str, slow: bool = False) -> None:
    """The connection ``sid`` has ended: stop delivering to it, stop counting it, and if it
    was dropped for not reading (``slow``), say so to its next connection. Idempotent."""
    socketio.server.manager.drop_gate(sid)
    session = _sessions.pop(sid, None)
    if session is None:
        return
    try:
        if session.unsubscribe is not None:
            session.unsubscribe()
        if slow:
            try:
                note_slow_client(session.connection)
            except Exception:
                current_app.logger.exception("could not record a slow client")
        if session.counted:
            session.app.extensions["metrics"].connections.dec()
    finally:
        release_connection(session.connection)


# -- leases ---------------------------------------------------------------------------------

def renew_leases() -> None:
    """Renew the lease of every open connection of this process, whatever its transport.

    With Redis, a connection counts towards its tenant's limit only while its process renews
    its lease, so that the connections of a process that dies stop counting.
    """
    by_state: dict[int, tuple[SharedState, dict[str, list[str]]]] = {}
    for session in list(_sessions.values()):
        _, by_tenant = by_state.setdefault(id(session.state), (session.state, {}))
        by_tenant.setdefault(session.connection.tenant_id, []).append(session.connection.sid)
    for state, by_tenant in by_state.values():
        try:
            state.refresh_connections(by_tenant)  # a no-op in memory
        except Exception:  # Redis away: keep serving, renew on the next round
            log.warning("could not renew connection leases", exc_info=True)


def _start_lease_renewal() -> None:
    """Renew leases every third of CONNECTION_LEASE_SECONDS, from one task per process."""
    global _renewer_started
    if _renewer_started:
        return
    _renewer_started = True
    interval = current_app.config["CONNECTION_LEASE_SECONDS"] / 3

    def renew_forever() -> None:
        while True:
            socketio.sleep(interval)
            renew_leases()

    socketio.start_background_task(renew_forever)


# -- what a connection may send -------------------------------------------------------------

def require(sid: str) -> Session:
    """The open session ``sid``; ``forbidden`` if it is not joined to a chat."""
    session = _sessions.get(sid)
    if session is None:
        raise ApiError("forbidden", "This connection is not joined to a chat.")
    return session


def unknown_event(event: Any) -> ApiError:
    """The error for an event that clients may not send."""
    return ApiError("validation_error", f"Unknown event {str(event)[:40]!r}.",
                    {"event": ["Must be message, typing, stop_generation or get_message_string."]})


def handle(sid: str, event: Any, data: Any) -> dict[str, Any] | None:
    """Carry out a client event of the connection ``sid``; returns its ack (None for typing,
    which has none). Raises ApiError, for the adapter to render (see ``error_reply``)."""
    if event not in CLIENT_EVENTS:
        raise unknown_event(event)
    session = require(sid)
    if event == "message":
        return send_message(session, data)
    if event == "get_message_string":
        string = new_message_string(session.connection, requested=True)
        session.message_string = string["message_string"]
        return string
    if event == "stop_generation":
        return {"ok": True, "stopped": stop_generation(session.connection)}
    relay_typing(session, data)
    return None


def send_message(session: Session, payload: Any) -> dict[str, Any]:
    """Post a message (with the kept string if the session fills it in); returns its ack."""
    with _metrics().message_latency.time():
        if (session.fills_in_string and isinstance(payload, dict)
                and payload.get("message_string") is None):
            payload = {**payload, "message_string": session.message_string}
        try:
            ack = post_message(session.connection, payload)
        except ApiError as error:
            if session.fills_in_string and error.code in STRING_ERRORS:
                # the kept string may be gone: have a fresh one ready for the next message
                session.message_string = new_message_string(
                    session.connection)["message_string"]
            raise
    session.message_string = ack["next_message_string"]
    _metrics().messages.inc()
    return ack


def typing_payload(connection: Connection, payload: Any) -> dict[str, Any] | None:
    """Validate a ``typing`` event; returns what the other clients get, or None when the
    event is dropped: at most TYPING_RATE are relayed per connection, the rest silently (no
    error, no ack), and nothing is sent."""
    is_typing = payload.get("is_typing") if isinstance(payload, dict) else None
    if not isinstance(is_typing, bool):
        raise ApiError("validation_error", "'is_typing' must be true or false.",
                       {"is_typing": ["Must be a boolean."]})
    if limits.connection_rate("typing", limit=limits.TYPING_RATE).hit(connection.sid) is not None:
        return None
    return {"user_id": connection.user_id, "is_typing": is_typing}


def relay_typing(session: Session, payload: Any) -> None:
    """Send a typing event to the others in the chat, on every transport and process."""
    relayed = typing_payload(session.connection, payload)
    if relayed is not None:
        socketio.emit("typing", relayed, to=chat_room(session.connection.chat_id),
                      namespace=NAMESPACE, skip_sid=session.connection.sid)


# -- errors ---------------------------------------------------------------------------------

def count_error(transport: str, error: ApiError) -> None:
    """Count an error answered to a client over ``transport`` (a refusal to connect too)."""
    _metrics().errors.labels(error.code, transport).inc()


def error_reply(transport: str, error: ApiError) -> tuple[dict[str, Any], dict[str, Any]]:
    """Count an error answered over ``transport``; returns the ``error`` event's payload and
    the ack of the event that failed (``{"ok": false, "error": ...}``)."""
    count_error(transport, error)
    body = error.to_dict()
    return body, {"ok": False, "error": body}
