"""Graceful shutdown: on SIGTERM, end streaming replies cleanly, then close every socket.

Heroku-style platforms send SIGTERM and allow 30 s before SIGKILL. gunicorn's own handling
waits for open requests, and a WebSocket is an open request until it closes, so it would
wait out the whole grace period and then cut replies off unstored. Instead each worker:
ends its replies (stored, ``finish_reason: cancelled``), disconnects its clients (they
reconnect elsewhere with ``last_message_id`` and miss nothing), then lets gunicorn exit.
"""
from __future__ import annotations

import signal
import time
from typing import Any

from flask import Flask

REPLY_DRAIN_SECONDS = 10.0
ENDED_DELIVERY_SECONDS = 0.5


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
    from app.chat.events import chat_namespace
    from app.extensions import socketio

    with app.app_context():
        app.logger.info("shutting down: closing %d connections",
                        len(chat_namespace.connections))
    # gunicorn stops accepting about a second after it is told to: keep closing whatever
    # arrives until the process exits.
    while True:
        socketio.server.manager.close_all_listeners()  # /ws/chat clients
        for sid in list(chat_namespace.connections):
            try:
                socketio.server.disconnect(sid, namespace="/chat")
            except Exception:  # a client that is already gone
                pass
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
