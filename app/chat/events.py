"""The Socket.IO adapter: the /chat namespace. It parses, calls the chat service, renders."""
from __future__ import annotations

from typing import Any

from flask import current_app, request
from flask_socketio import ConnectionRefusedError, Namespace, emit, join_room

from app.chat import revocation, session
from app.chat.connections import Connection, authorize_connection, release_connection
from app.chat.messages import new_message_string, post_message, stop_generation
from app.chat.rooms import NAMESPACE, chat_room
from app.chat.transport import catching_up
from app.errors import ApiError
from app.jsondepth import MAX_JSON_DEPTH, too_deep



def _metrics():
    return current_app.extensions["metrics"]


def _count_error(code: str) -> None:
    _metrics().errors.labels(code, "socketio").inc()


class ChatNamespace(Namespace):
    """``/chat``: connect with a connection string (or API key + user id), then talk."""

    def __init__(self, namespace: str = NAMESPACE):
        super().__init__(namespace)
        self.connections: dict[str, Connection] = {}
        self._lease_renewer_started = False

    # -- connection lifecycle ---------------------------------------------------------------

    def on_connect(self, auth: Any = None) -> None:
        sid = request.sid
        try:
            connection, first = authorize_connection(sid, auth, request.args)
        except ApiError as error:
            _count_error(error.code)
            raise ConnectionRefusedError(error.message, {"code": error.code,
                                                         "message": error.message}) from None
        except Exception:
            current_app.logger.exception("connect failed")
            message = "An internal error occurred."
            raise ConnectionRefusedError(message, {"code": "internal_error",
                                                   "message": message}) from None
        try:
            self._establish(connection, first)
            _metrics().connects.inc()
            _metrics().connections.inc()
            self._renew_leases_in_background()
        except Exception:
            self._forget(sid)
            current_app.logger.exception("connect failed after authorisation")
            message = "An internal error occurred."
            raise ConnectionRefusedError(message, {"code": "internal_error",
                                                   "message": message}) from None

    def _establish(self, connection: Connection, first: bool) -> None:
        # Order the client sees: user_created, connection_established, every missed message,
        # the reply streaming right now (content_so_far), then live room traffic. Joining the
        # room behind the gate holds live traffic while the database and the shared state
        # are read (see app/chat/delivery.py), so nothing is lost, doubled or reordered.
        sid = connection.sid
        manager = self.socketio.server.manager
        self.connections[sid] = connection
        manager.gate(sid)
        revocation.track(connection)
        join_room(chat_room(connection.chat_id))
        events, keep = session.catch_up(connection, first)
        with catching_up(self.socketio.server, sid, NAMESPACE):
            for event, data in events:
                emit(event, data)
            manager.open_gate(sid, NAMESPACE, keep)

    def _renew_leases_in_background(self) -> None:
        # With Redis, a connection counts towards its tenant's limit only while its process
        # renews the lease, so the connections of a process that dies stop counting.
        state = current_app.extensions["chat_state"]
        if self._lease_renewer_started or not hasattr(state, "refresh_connections"):
            return
        self._lease_renewer_started = True

        def renew() -> None:
            while True:
                self.socketio.sleep(state.connection_lease / 3)
                by_tenant: dict[str, list[str]] = {}
                for connection in list(self.connections.values()):
                    by_tenant.setdefault(connection.tenant_id, []).append(connection.sid)
                try:
                    state.refresh_connections(by_tenant)
                except Exception:  # Redis away: keep serving, renew on the next round
                    self.socketio.server.logger.warning("could not renew connection leases",
                                                        exc_info=True)

        self.socketio.start_background_task(renew)

    def on_disconnect(self, reason: Any = None) -> None:
        self._forget(request.sid)

    def _forget(self, sid: str) -> None:
        self.socketio.server.manager.drop_gate(sid)
        connection = self.connections.pop(sid, None)
        if connection is not None:
            _metrics().connections.dec()
            release_connection(connection)

    # -- events -----------------------------------------------------------------------------

    #: What clients may emit; anything else is answered ``validation_error``.
    CLIENT_EVENTS = ("message", "get_message_string", "stop_generation", "typing")

    def trigger_event(self, event: str, *args: Any) -> Any:
        # Flask-SocketIO acks an event it has no handler for with nothing at all; a client
        # that asked for an ack gets a contract error instead, like on /ws/chat.
        if event in self.CLIENT_EVENTS and too_deep(list(args[1:]), MAX_JSON_DEPTH + 1):
            # each argument may nest MAX_JSON_DEPTH levels (the list of them adds one)
            return self.socketio._handle_event(self._too_deep, event, self.namespace, *args)
        if event in self.CLIENT_EVENTS or event in ("connect", "disconnect"):
            return super().trigger_event(event, *args)
        return self.socketio._handle_event(self._unknown_event, event, self.namespace,
                                           *args)

    def _unknown_event(self, *args: Any) -> dict[str, Any]:
        event = request.event["message"]
        return self._fail(ApiError(
            "validation_error", f"Unknown event {str(event)[:40]!r}.",
            {"event": ["Must be message, typing, stop_generation or get_message_string."]}))

    def _too_deep(self, *args: Any) -> dict[str, Any] | None:
        ack = self._fail(ApiError(
            "validation_error", f"JSON nested deeper than {MAX_JSON_DEPTH} levels.",
            {"data": [f"Must not nest deeper than {MAX_JSON_DEPTH} levels."]}))
        return None if request.event["message"] == "typing" else ack  # typing has no ack

    def _connection(self) -> Connection:
        connection = self.connections.get(request.sid)
        if connection is None:
            raise ApiError("forbidden", "This connection is not joined to a chat.")
        return connection

    def _fail(self, error: ApiError) -> dict[str, Any]:
        _count_error(error.code)
        body = error.to_dict()
        emit("error", body)
        return {"ok": False, "error": body}

    def _call(self, handler, *args) -> Any:
        try:
            return handler(*args)
        except ApiError as error:
            return self._fail(error)
        except Exception:
            current_app.logger.exception("error in %s handler", request.event["message"])
            return self._fail(ApiError("internal_error"))

    def on_message(self, *args: Any) -> dict[str, Any]:
        payload = args[0] if len(args) == 1 else None
        with _metrics().message_latency.time():
            ack = self._call(lambda: post_message(self._connection(), payload))
        if ack.get("ok"):
            _metrics().messages.inc()
        return ack

    def on_get_message_string(self, *args: Any) -> dict[str, Any]:
        return self._call(lambda: new_message_string(self._connection(),
                                                             requested=True))

    def on_stop_generation(self, *args: Any) -> dict[str, Any]:
        return self._call(lambda: {"ok": True, "stopped": stop_generation(
            self._connection())})

    def on_typing(self, *args: Any) -> None:
        def relay():
            connection = self._connection()
            payload = session.typing_payload(connection, args[0] if len(args) == 1 else None)
            if payload is None:  # over the typing rate: dropped silently
                return
            emit("typing", payload, to=chat_room(connection.chat_id),
                 include_self=False)

        self._call(relay)


#: One namespace object per process; create_app registers it with each Socket.IO server.
chat_namespace = ChatNamespace()
