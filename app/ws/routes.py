"""The plain WebSocket adapter: ``/ws/chat``. It parses frames, calls the chat service and
renders its results and errors as ``{"event": NAME, "data": {...}}`` frames.

Client frames: ``{"content": "...", "message_string"?: ..., "client_message_id"?: ...}`` or
``{"event": "typing" | "stop_generation" | "get_message_string", "data": {...}}``. A message
without a ``message_string`` is sent with the connection's current one, which the adapter
keeps up to date from each success, so the simplest client only ever sends ``{"content"}``.
"""
from __future__ import annotations

import json
import uuid
from typing import Any

from flask import Blueprint, Response, current_app, request

from app.chat import session
from app.chat.connections import Connection, authorize_connection, release_connection
from app.errors import ApiError
from app.extensions import db, socketio
from app.jsondepth import too_deep
from app.overrides.engineio import refused_origin
from app.overrides.simple_websocket import HandledResponse
from app.ws.socket import PlainSocket, TokenBucket

bp = Blueprint("plain_websocket", __name__)

#: Client frames one connection may have handled: FRAME_RATE a second, bursts of FRAME_BURST.
#: Past that the adapter stops reading the connection for a while (its frames wait in the
#: client's TCP buffers): nobody else waits.
FRAME_RATE = 100
FRAME_BURST = 200
#: Seconds our close may wait for the client's close frame.
CLOSE_WAIT = 2.0


class PlainWebSocketClient:
    """One /ws/chat connection: a writer task draining a queue, and the read loop.

    The queue is bounded in bytes: past MAX_CLIENT_QUEUE of unsent frames (those queued plus
    the one being sent) the client is a slow client and is disconnected at once.
    """

    def __init__(self, ws: PlainSocket, connection: Connection, first: bool) -> None:
        self.ws = ws
        self.id = connection.sid
        self.queue = socketio.server.eio.create_queue()
        self.connection: Connection | None = connection
        self.first = first
        self.closed = False
        self.ending = False
        self.slow = False
        self.reader_done = socketio.server.eio.create_event()
        self.unsent = 0  # bytes of counted frames queued or being sent
        self.max_unsent = current_app.config["MAX_CLIENT_QUEUE"]
        self.logger = current_app.logger

    # -- output -----------------------------------------------------------------------------

    def send(self, event: str, data: Any, counted: bool = True) -> None:
        """Queue a frame; the writer sends frames in this order.

        ``counted``: against MAX_CLIENT_QUEUE. The catch-up queued on joining is not: it is
        bounded on its own (MAX_REPLAY messages), and counting it would drop a client whose
        replay alone passes the limit before it could read any of it, at every reconnection.
        """
        if self.closed:
            return
        text = json.dumps({"event": event, "data": data})  # ASCII: one byte a character
        if counted:
            self.unsent += len(text)
            if self.unsent > self.max_unsent:
                self._slow_client()
                return
        self.queue.put((text, counted))

    def _slow_client(self) -> None:
        """Too much unsent: drop the connection now (the reader then records why)."""
        if self.slow:
            return
        self.slow = self.closed = True
        connection = self.connection
        self.logger.warning("/ws/chat slow client: %d bytes unsent (MAX_CLIENT_QUEUE %d); "
                            "disconnecting user %s from chat %s", self.unsent, self.max_unsent,
                            connection.user_id if connection else "?",
                            connection.chat_id if connection else "?")
        self.ws.abort()  # wakes the writer stuck in send and the reader
        self.queue.put(None)

    def close(self) -> None:
        """End the connection (after the frames already queued); no frame is handled after."""
        self.ending = True
        self.queue.put(None)

    def _write(self) -> None:
        while True:
            item = self.queue.get()
            if item is None or self.slow:
                break
            text, counted = item
            try:
                self.ws.send(text)
            except Exception:  # the client went away; the read loop notices too
                if not self.slow:
                    self.logger.info("/ws/chat send failed", exc_info=True)
                break
            finally:
                if counted:
                    self.unsent -= len(text)
        self.closed = True
        if self.slow:
            return
        self.ws.close()
        if not self.reader_done.wait(CLOSE_WAIT):  # the client did not answer our close
            self.ws.abort()

    # -- connection -------------------------------------------------------------------------

    def open(self) -> None:
        """Join the chat (credentials already checked), sending what a Socket.IO client
        would get."""
        manager = socketio.server.manager

        def subscribe(room: str):
            manager.add_listener(room, self.id, self.send, self.close)
            return lambda: manager.remove_listener(room, self.id)

        session.join(self.connection, self.first, session.WEBSOCKET, subscribe=subscribe,
                     send=lambda event, data: self.send(event, data, counted=False),
                     fills_in_string=True)

    # -- input ------------------------------------------------------------------------------

    def handle(self, raw: Any) -> None:
        try:
            frame = json.loads(raw) if isinstance(raw, str) else None
        except (ValueError, RecursionError):  # RecursionError: JSON nested too deeply
            frame = None
        if not isinstance(frame, dict):
            self._fail(ApiError("validation_error", "Frames must be JSON objects, "
                                "like {\"content\": \"hello\"}."))
            return
        event = frame.get("event", "message")
        data = frame.get("data", {}) if "event" in frame else frame
        try:
            if too_deep(frame):
                raise ApiError("validation_error", "JSON is nested too deeply.")
            ack = session.handle(self.id, event, data)
            if ack is not None:  # typing has none
                self.send(event, ack)
        except ApiError as error:
            self._fail(error, ack=event == "message")
        except Exception:
            current_app.logger.exception("error in /ws/chat %s", event)
            db.session.rollback()
            self._fail(ApiError("internal_error"))

    def _fail(self, error: ApiError, ack: bool = False) -> None:
        """The one place that renders an error: the ``error`` frame, and a message's ack."""
        body, reply = session.error_reply(session.WEBSOCKET, error)
        self.send("error", body)
        if ack:
            self.send("message", reply)

    def run(self) -> None:
        writer = None
        bucket = TokenBucket(FRAME_RATE, FRAME_BURST)
        try:
            try:
                self.open()
            finally:
                db.session.remove()  # no transaction held open while the socket is idle
            writer = socketio.start_background_task(self._write)
            for raw in self.ws.messages():
                if self.closed or self.ending:  # ending: e.g. revoked, its frames are void
                    break
                self.handle(raw)
                db.session.remove()
                wait = bucket.take()
                if wait:
                    socketio.sleep(wait)  # back-pressure: this connection is not read meanwhile
        finally:
            self.reader_done.set()
            session.leave(self.id, slow=self.slow)
            self.close()
            if writer is not None:
                writer.join()


def _refused_origin() -> Response | None:
    """Socket.IO's answer to an ``Origin`` outside CORS_ORIGINS, from Socket.IO's own rules
    (python-engineio: same origin as the request's host by default, ``*`` for any; a request
    without ``Origin``, from a non-browser client, is accepted)."""
    refusal = refused_origin(socketio.server.eio, request.environ)
    if refusal is None:
        return None
    current_app.logger.warning("/ws/chat: %s is not an accepted origin",
                               request.environ["HTTP_ORIGIN"][:200])
    return Response(refusal["response"], status=refusal["status"],
                    headers=refusal["headers"])


@bp.route("/ws/chat", websocket=True)
def chat_socket():
    """``/ws/chat?chat_id=...&connection_string=...`` (or ``api_key`` and ``user_id``).

    The origin and the credentials are checked before the upgrade: a refused connection gets
    its ``error`` frame and is closed without a byte of its input being read.
    """
    refused = _refused_origin()
    if refused is not None:
        return refused
    sid = "ws:" + uuid.uuid4().hex
    try:
        connection, first = authorize_connection(sid, None, request.args)
        error = None
    except ApiError as exc:
        connection, first, error = None, False, exc
        session.count_error(session.WEBSOCKET, exc)
    finally:
        db.session.remove()
    options = current_app.config.get("SOCK_SERVER_OPTIONS", {})
    try:
        ws = PlainSocket(request.environ, **options)
    except BaseException:
        if connection is not None:
            release_connection(connection)
        raise
    if error is not None:
        try:
            ws.send(json.dumps({"event": "error", "data": error.to_dict()}))
        except OSError:
            pass
        ws.close()  # and nothing read: the connection ends with this request
        return HandledResponse(ws)
    try:
        PlainWebSocketClient(ws, connection, first).run()
    except Exception:
        current_app.logger.exception("error in /ws/chat")
    finally:
        ws.abort()
    return HandledResponse(ws)
