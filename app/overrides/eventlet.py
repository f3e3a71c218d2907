"""eventlet: a bound on a websocket message (not only a frame), marking a request whose
socket a WebSocket took over, and ending a request whose socket is gone."""
from __future__ import annotations

import errno
from functools import lru_cache
from typing import Any

from app.overrides import Needed

REQUIRES = (
    Needed("eventlet", "eventlet.websocket:RFC6455WebSocket.Message"),
    Needed("eventlet", "eventlet.websocket:RFC6455WebSocket.Message.push",
           params=("data", "final")),
    Needed("eventlet", "eventlet.websocket:FailedConnectionError.__init__",
           params=("status", "message")),
    Needed("eventlet", "eventlet.wsgi:WSGI_LOCAL"),
    Needed("eventlet", "eventlet:kill", params=("g", "throw_args")),
)


def bound_message_size(ws: Any, limit: int) -> None:
    """Make eventlet's websocket ``ws`` fail the connection (close code 1009) on a message
    over ``limit`` bytes. (eventlet's ``max_frame_length`` bounds each frame, not a message
    made of many fragments.) Does nothing on another kind of websocket."""
    message_class = getattr(ws, "Message", None)
    if not isinstance(message_class, type):
        return
    ws.Message = _bounded_message_class(message_class, limit)


@lru_cache(maxsize=8)
def _bounded_message_class(message_class: type, limit: int) -> type:
    """The message class that fails over ``limit`` bytes: made once per limit, not per
    connection (making a class costs more than the rest of the call)."""
    from eventlet.websocket import FailedConnectionError

    class BoundedMessage(message_class):
        size = 0

        def push(self, data: bytes, final: bool = False) -> None:
            self.size += len(data)
            if self.size > limit:
                raise FailedConnectionError(1009, f"Incoming message is above {limit} bytes.")
            super().push(data, final)

    return BoundedMessage


def handled_response_body() -> list:
    """The WSGI body that tells eventlet's server the request's socket was taken over (by a
    WebSocket) and that it must write nothing more on it."""
    from eventlet.wsgi import WSGI_LOCAL

    WSGI_LOCAL.already_handled = True
    return []


def end_request(request: Any) -> None:
    """End a request's green thread, blocked reading a socket closed under it (it would
    never wake up), as a reset connection would: eventlet's websocket ends quietly on it."""
    from eventlet import kill

    if not request.dead:
        kill(request, ConnectionResetError(errno.ECONNRESET, "closed at shutdown"))
