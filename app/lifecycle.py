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


def drain(app: Flask) -> None:
    """End this process's replies and disconnect its Socket.IO clients."""
    from app.agents.runner import active_replies, end_all_replies
    from app.chat.events import chat_namespace
    from app.extensions import socketio

    if app.extensions.get("draining"):
        return  # SIGTERM may arrive twice: from the platform and from gunicorn's master
    app.extensions["draining"] = True
    with app.app_context():
        app.logger.info("shutting down: ending %d streaming replies", active_replies())
        end_all_replies()
        deadline = time.monotonic() + REPLY_DRAIN_SECONDS
        ending = active_replies()
        while active_replies() and time.monotonic() < deadline:
            socketio.sleep(0.05)
        if ending:
            # message_stream_ended may come back through the Redis channel; let it arrive.
            socketio.sleep(ENDED_DELIVERY_SECONDS)
        sids = list(chat_namespace.connections)
        app.logger.info("shutting down: closing %d connections", len(sids))
        for sid in sids:
            try:
                socketio.server.disconnect(sid, namespace="/chat")
            except Exception:  # a client that is already gone
                app.logger.debug("disconnect of %s failed", sid, exc_info=True)


def install_graceful_shutdown(worker: Any) -> None:
    """gunicorn ``post_worker_init`` hook: drain before the worker's own SIGTERM handling."""
    from app.extensions import socketio

    app = worker.wsgi
    gunicorn_handle_exit = worker.handle_exit

    def drain_then_exit(sig, frame) -> None:
        try:
            drain(app)
        finally:
            gunicorn_handle_exit(sig, frame)

    def on_sigterm(sig, frame) -> None:
        socketio.start_background_task(drain_then_exit, sig, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
