"""The plain WebSocket adapter: ``/ws/chat``. It parses frames, calls the chat service and
renders its results and errors as ``{"event": NAME, "data": {...}}`` frames.

Client frames: ``{"content": "...", "message_string"?: ..., "client_message_id"?: ...}`` or
``{"event": "typing" | "stop_generation" | "get_message_string", "data": {...}}``. A message
without a ``message_string`` is sent with the connection's current one, which the adapter
keeps up to date from each success, so the simplest client only ever sends ``{"content"}``.
"""
from __future__ import annotations

import json
import threading
import uuid
from typing import Any

from flask import Blueprint, current_app, request
from flask_sock import Sock

from app.chat import revocation, service
from app.chat.service import NAMESPACE, Connection
from app.errors import ApiError
from app.extensions import db, socketio

bp = Blueprint("plain_websocket", __name__)
sock = Sock()

#: How long the adapter waits for the next frame before checking the connection is alive.
RECEIVE_TIMEOUT = 30


class PlainWebSocketClient:
    """One /ws/chat connection: a writer task draining a queue, and the read loop."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.id = "ws:" + uuid.uuid4().hex
        self.queue = socketio.server.eio.create_queue()
        self.connection: Connection | None = None
        self.message_string: str | None = None
        self.closed = False
        self.ending = False
        self.logger = current_app.logger

    # -- output -----------------------------------------------------------------------------

    def send(self, event: str, data: Any) -> None:
        """Queue a frame; the writer sends frames in this order."""
        if not self.closed:
            self.queue.put({"event": event, "data": data})

    def close(self) -> None:
        """End the connection (after the frames already queued); no frame is handled after."""
        self.ending = True
        self.queue.put(None)

    def _write(self) -> None:
        while True:
            frame = self.queue.get()
            if frame is None:
                break
            try:
                self.ws.send(json.dumps(frame))
            except Exception:  # the client went away; the read loop notices too
                self.logger.warning("/ws/chat send failed", exc_info=True)
                break
        self.closed = True
        try:
            self.ws.close()
        except Exception:
            pass

    # -- connection -------------------------------------------------------------------------

    def open(self) -> bool:
        """Authorise and join the chat, sending what a Socket.IO client would get."""
        try:
            connection, first = service.authorize_connection(self.id, None, request.args)
        except ApiError as error:
            # Refused: say why; the connection is then closed.
            self.ws.send(json.dumps({"event": "error", "data": error.to_dict()}))
            return False
        self.connection = connection
        manager = socketio.server.manager
        room = service.chat_room(connection.chat_id)
        manager.gate(self.id)
        manager.add_listener(room, self.id, self.send, self.close)
        revocation.track(connection)
        events, keep = service.catch_up(connection, first)
        for event, data in events:
            if event == "connection_established":
                self.message_string = data["message_string"]
            self.send(event, data)
        manager.open_gate(self.id, NAMESPACE, keep)
        return True

    def leave(self) -> None:
        if self.connection is not None:
            socketio.server.manager.remove_listener(
                service.chat_room(self.connection.chat_id), self.id)
            service.release_connection(self.connection)
            self.connection = None

    # -- input ------------------------------------------------------------------------------

    def handle(self, raw: Any) -> None:
        try:
            frame = json.loads(raw) if isinstance(raw, str) else None
        except (ValueError, RecursionError):  # RecursionError: JSON nested too deeply
            frame = None
        if not isinstance(frame, dict):
            self.send("error", ApiError("validation_error", "Frames must be JSON objects, "
                                        "like {\"content\": \"hello\"}.").to_dict())
            return
        event = frame.get("event", "message")
        data = frame.get("data", {}) if "event" in frame else frame
        try:
            if event == "message":
                self._message(data)
            elif event == "get_message_string":
                string = service.new_message_string(self.connection, requested=True)
                self.message_string = string["message_string"]
                self.send("get_message_string", string)
            elif event == "stop_generation":
                self.send("stop_generation",
                          {"ok": True, "stopped": service.stop_generation(self.connection)})
            elif event == "typing":
                payload = service.typing_payload(self.connection, data)
                if payload is None:  # over the typing rate: dropped silently
                    return
                socketio.emit("typing", payload, to=service.chat_room(self.connection.chat_id),
                              namespace=NAMESPACE, skip_sid=self.id)
            else:
                raise ApiError("validation_error", f"Unknown event {str(event)[:40]!r}.",
                               {"event": ["Must be message, typing, stop_generation or "
                                          "get_message_string."]})
        except ApiError as error:
            self.send("error", error.to_dict())
            if event == "message":
                self.send("message", {"ok": False, "error": error.to_dict()})
        except Exception:
            current_app.logger.exception("error in /ws/chat %s", event)
            db.session.rollback()
            self.send("error", ApiError("internal_error").to_dict())

    def _message(self, data: Any) -> None:
        if isinstance(data, dict) and data.get("message_string") is None:
            data = {**data, "message_string": self.message_string}
        try:
            ack = service.post_message(self.connection, data)
        except ApiError as error:
            if error.code in ("message_string_reused", "message_string_expired",
                              "invalid_message_string", "rate_limited", "chat_busy"):
                # the kept string may be gone: have a fresh one ready for the next frame
                self.message_string = service.new_message_string(
                    self.connection)["message_string"]
            raise
        self.message_string = ack["next_message_string"]
        self.send("message", ack)

    def run(self) -> None:
        try:
            opened = self.open()
        finally:
            db.session.remove()  # no transaction held open while the socket is idle
        if not opened:
            return
        writer = socketio.start_background_task(self._write)
        try:
            while not self.closed:
                raw = self.ws.receive(timeout=RECEIVE_TIMEOUT)
                if raw is None or self.ending:  # ending: e.g. revoked, its frames are void
                    continue
                self.handle(raw)
                db.session.remove()
        finally:
            self.leave()
            self.close()
            writer.join()


def _quiet_closed_socket_reader(previous=threading.excepthook):
    """simple-websocket's reader thread raises EOFError when its socket is closed under it
    (every server-side close under eventlet): routine, so not printed as a traceback."""

    def hook(args):
        if (args.exc_type is EOFError and args.thread is not None
                and "simple_websocket" in args.thread.name):
            return
        previous(args)

    return hook


threading.excepthook = _quiet_closed_socket_reader()


@sock.route("/ws/chat", bp=bp)
def chat_socket(ws) -> None:
    """``/ws/chat?chat_id=...&connection_string=...`` (or ``api_key`` and ``user_id``)."""
    PlainWebSocketClient(ws).run()
