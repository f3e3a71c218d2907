"""Graceful shutdown: on SIGTERM, end streaming replies cleanly, then close every socket.

Heroku-style platforms send SIGTERM and allow 30 s before SIGKILL. gunicorn's own handling
waits for open requests, and a WebSocket is an open request until it closes, so it would
wait out the whole grace period and then cut replies off unstored. Instead each worker:
ends its replies (stored, ``finish_reason: cancelled``), disconnects its clients (they
reconnect elsewhere with ``last_message_id`` and miss nothing), then lets gunicorn exit.
"""
from __future__ import annotations

import signal
import socket
import time
from typing import Any

import greenlet

from flask import Flask

REPLY_DRAIN_SECONDS = 10.0
ENDED_DELIVERY_SECONDS = 0.5
#: After this long closing clients, the TCP connections of WebSocket requests still open are cut.
CUT_SOCKETS_AFTER_SECONDS = 1.0


class OpenWebSockets:
    """WSGI middleware that remembers the WebSocket requests in progress, to end them at exit.

    Under eventlet a WebSocket request can outlive its socket: when the socket is closed
    while the request's reader waits on it (eventlet's websocket closes the bare socket), the
    reader is never woken, and gunicorn waits for that request through its whole grace
    period. Measured: after 20 clients disconnected at once, about half the shutdowns took
    25 s instead of under 1 s. At shutdown, ``cut`` shuts the connections still open and
    ends the requests whose socket is already gone.
    """

    def __init__(self, wsgi_app, async_mode: str):
        self.wsgi_app = wsgi_app
        self.async_mode = async_mode
        self.requests: dict[Any, Any] = {}  # the request's greenlet -> its client socket

    def __call__(self, environ, start_response):
        sock = environ.get("gunicorn.socket")
        if sock is None or environ.get("HTTP_UPGRADE", "").lower() != "websocket":
            return self.wsgi_app(environ, start_response)
        current = greenlet.getcurrent()
        self.requests[current] = sock
        try:
            return self.wsgi_app(environ, start_response)
        finally:
            self.requests.pop(current, None)

    def cut(self) -> None:
        """Shut the WebSocket connections still open; end the requests whose socket is gone."""
        for request, sock in list(self.requests.items()):
            try:
                sock.shutdown(socket.SHUT_RDWR)  # its reader wakes up to the end of the stream
            except OSError:  # closed under a reader that will never wake up
                self.requests.pop(request, None)
                if self.async_mode == "eventlet":
                    from app.overrides.eventlet import end_request

                    end_request(request)


def end_replies(app: Flask) -> bool:
    """End this process's streaming replies (stored, ``cancelled``); False if already done."""
    from app.agents.runner import active_replies, end_all_replies
    from app.extensions import socketio

    if app.extensions.get("draining"):
        return False  # SIGTERM may arrive twice: from the platform and from gunicorn's master
    app.extensions["draining"] = True
    with app.app_context():
        app.logger.info("shutting down: ending %d streaming replies", active_replies())
        ending = active_replies()
        end_all_replies()
        deadline = time.monotonic() + REPLY_DRAIN_SECONDS
        while active_replies() and time.monotonic() < deadline:
            socketio.sleep(0.05)
        if ending:
            # message_stream_ended may come back through the Redis channel; let it arrive.
            socketio.sleep(ENDED_DELIVERY_SECONDS)
    return True


def close_connections(app: Flask) -> None:
    """Disconnect this process's clients, and any that still get in, until it exits."""
    from app.chat import session
    from app.chat.rooms import NAMESPACE
    from app.overrides.engineio import end_session
    from app.extensions import socketio

    with app.app_context():
        app.logger.info("shutting down: closing %d connections",
                        len(session.connections))
    # gunicorn stops accepting about a second after it is told to: keep closing whatever
    # arrives until the process exits.
    open_websockets = app.extensions.get("open_websockets")
    cut_at = time.monotonic() + CUT_SOCKETS_AFTER_SECONDS
    while True:
        socketio.server.manager.close_all_listeners()  # /ws/chat clients
        for sid in session.sids(session.SOCKETIO):
            try:
                socketio.server.disconnect(sid, namespace=NAMESPACE)
            except Exception:  # a client that is already gone
                pass
        # Engine.IO connections in no namespace (a client that left /chat, or never joined)
        # would hold gunicorn's exit for the whole grace period. (eio.disconnect() would wait
        # for each session's queue to drain: for ever if its writer has gone, and this loop
        # with it; it also replaces the session table that app/chat/transport.py keeps.)
        eio = socketio.server.eio
        for eio_sid in list(eio.sockets):
            end_session(eio, eio_sid)
        if open_websockets is not None and time.monotonic() >= cut_at:
            open_websockets.cut()
        socketio.sleep(0.25)


def install_graceful_shutdown(worker: Any) -> None:
    """gunicorn ``post_worker_init`` hook: drain before the worker's own SIGTERM handling."""
    from app.extensions import socketio

    app = worker.wsgi
    gunicorn_handle_exit = worker.handle_exit

    def shut_down(sig, frame) -> None:
        if not end_replies(app):
            return
        gunicorn_handle_exit(sig, frame)  # stop accepting; exit once connections are closed
        close_connections(app)

    def on_sigterm(sig, frame) -> None:
        socketio.start_background_task(shut_down, sig, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
