"""The Socket.IO adapter: the /chat namespace. It parses, calls the chat service, renders."""
from __future__ import annotations

from typing import Any

from flask import current_app, request
from flask_socketio import ConnectionRefusedError, Namespace, emit, join_room

from app.chat import session
from app.chat.connections import authorize_connection
from app.chat.rooms import NAMESPACE
from app.chat.transport import catching_up
from app.errors import ApiError
from app.jsondepth import MAX_JSON_DEPTH, too_deep
from app.overrides.flask_socketio import handle_event


class ChatNamespace(Namespace):
    """``/chat``: connect with a connection string (or API key + user id), then talk."""

    def __init__(self, namespace: str = NAMESPACE):
        super().__init__(namespace)

    # -- connection lifecycle ---------------------------------------------------------------

    def on_connect(self, auth: Any = None) -> None:
        sid = request.sid
        try:
            connection, first = authorize_connection(sid, auth, request.args)
        except ApiError as error:
            session.count_error(session.SOCKETIO, error)
            raise ConnectionRefusedError(error.message, {"code": error.code,
                                                         "message": error.message}) from None
        except Exception:
            current_app.logger.exception("connect failed")
            message = "An internal error occurred."
            raise ConnectionRefusedError(message, {"code": "internal_error",
                                                   "message": message}) from None
        try:
            # emit sends before the namespace's CONNECT packet: see DESIGN.md, connect-time
            # events in order
            session.join(connection, first, session.SOCKETIO, subscribe=join_room, send=emit,
                         sending=catching_up(self.socketio.server, sid, NAMESPACE))
        except Exception:
            current_app.logger.exception("connect failed after authorisation")
            message = "An internal error occurred."
            raise ConnectionRefusedError(message, {"code": "internal_error",
                                                   "message": message}) from None

    def on_disconnect(self, reason: Any = None) -> None:
        session.leave(request.sid)

    # -- events -----------------------------------------------------------------------------

    def trigger_event(self, event: str, *args: Any) -> Any:
        # Flask-SocketIO acks an event it has no handler for with nothing at all; a client
        # that asked for an ack gets a contract error instead, like on /ws/chat.
        if event in session.CLIENT_EVENTS and too_deep(list(args[1:]), MAX_JSON_DEPTH + 1):
            # each argument may nest MAX_JSON_DEPTH levels (the list of them adds one)
            return handle_event(self.socketio, self._too_deep, event, self.namespace, *args)
        if event in session.CLIENT_EVENTS or event in ("connect", "disconnect"):
            return super().trigger_event(event, *args)
        return handle_event(self.socketio, self._unknown_event, event, self.namespace, *args)

    def _unknown_event(self, *args: Any) -> dict[str, Any]:
        return self._fail(session.unknown_event(request.event["message"]))

    def _too_deep(self, *args: Any) -> dict[str, Any] | None:
        ack = self._fail(ApiError(
            "validation_error", f"JSON nested deeper than {MAX_JSON_DEPTH} levels.",
            {"data": [f"Must not nest deeper than {MAX_JSON_DEPTH} levels."]}))
        return None if request.event["message"] == "typing" else ack  # typing has no ack

    def _fail(self, error: ApiError) -> dict[str, Any]:
        """The one place that renders an error: the ``error`` event, and the ack."""
        body, ack = session.error_reply(session.SOCKETIO, error)
        emit("error", body)
        return ack

    def _call(self, event: str, args: tuple) -> dict[str, Any] | None:
        try:
            return session.handle(request.sid, event, args[0] if len(args) == 1 else None)
        except ApiError as error:
            return self._fail(error)
        except Exception:
            current_app.logger.exception("error in %s handler", event)
            return self._fail(ApiError("internal_error"))

    def on_message(self, *args: Any) -> dict[str, Any]:
        return self._call("message", args)

    def on_get_message_string(self, *args: Any) -> dict[str, Any]:
        return self._call("get_message_string", args)

    def on_stop_generation(self, *args: Any) -> dict[str, Any]:
        return self._call("stop_generation", args)

    def on_typing(self, *args: Any) -> None:
        self._call("typing", args)  # typing has no ack, not even an error's


#: One namespace object per process; create_app registers it with each Socket.IO server.
chat_namespace = ChatNamespace()
