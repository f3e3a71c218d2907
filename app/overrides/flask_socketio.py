"""Flask-SocketIO: running a handler of our choice for a received event."""
from __future__ import annotations

from typing import Any, Callable

from app.overrides import Needed

REQUIRES = (
    Needed("Flask-SocketIO", "flask_socketio:SocketIO._handle_event",
           params=("handler", "message", "namespace", "sid", "args")),
)


def handle_event(socketio: Any, handler: Callable, event: str, namespace: str,
                 *args: Any) -> Any:
    """Run ``handler(*args[1:])`` for ``event`` as Flask-SocketIO runs an event's handler
    (``args[0]`` is the sid): in the client's request context, with ``request.event`` set,
    and with Flask-SocketIO's own error handling; returns the handler's ack value.

    Flask-SocketIO has no public way to answer an event that has no handler of its own
    (``Namespace.trigger_event`` dispatches by method name only).
    """
    return socketio._handle_event(handler, event, namespace, *args)
