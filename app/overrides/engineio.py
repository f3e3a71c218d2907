"""python-engineio: the server's request handler, message handler, websocket class, queues
and session table, replaced by ours on one server object (never on the library's classes).

What each replacement is for (refusing malformed input, limits per session) is written in
app/chat/packets.py and app/chat/transport.py; here is only how it is put in place.
"""
from __future__ import annotations

from typing import Any, Callable

from engineio.payload import Payload

from app.overrides import Needed

REQUIRES = (
    # send_to_session: Socket.send, copied without its per-packet INFO log line
    Needed("python-engineio", "engineio.socket:Socket.send", params=("pkt",),
           source_sha="f8b2738ee5d4"),
    Needed("python-engineio", "engineio.socket:Socket.check_ping_timeout", params=()),
    Needed("python-engineio", "engineio.base_socket:BaseSocket.queue", assigned=True),
    Needed("python-engineio", "engineio.base_server:BaseServer._async", assigned=True),
    Needed("python-engineio", "engineio.base_server:BaseServer.sockets", assigned=True),
    Needed("python-engineio", "engineio.base_server:BaseServer.handlers", assigned=True),
    Needed("python-engineio", "engineio.base_server:BaseServer._cors_allowed_origins",
           params=("environ",)),
    Needed("python-engineio", "engineio.base_server:BaseServer._bad_request",
           params=("message",)),
    Needed("python-engineio", "engineio.server:Server.handle_request",
           params=("environ", "start_response")),
    Needed("python-engineio", "engineio.server:Server.create_queue",
           params=("args", "kwargs")),
    Needed("python-engineio", "engineio.socket:Socket.close",
           params=("wait", "abort", "reason")),
    Needed("python-engineio", "engineio.payload:Payload.max_decode_packets"),
    # the websocket class of an async driver is called with the session's handler
    Needed("python-engineio", "engineio.async_drivers.eventlet:WebSocketWSGI.__init__",
           params=("handler", "server")),
    Needed("python-engineio", "engineio.async_drivers._websocket_wsgi:SimpleWebSocketWSGI"
                              ".__init__", params=("handler", "server", "kwargs")),
    Needed("python-engineio", "engineio.async_drivers._websocket_wsgi:SimpleWebSocketWSGI"
                              ".server_args", assigned=True),
)


def wrap_message_handler(eio: Any, wrap: Callable[[Callable], Callable]) -> None:
    """Replace the ``message`` handler that python-socketio registered on ``eio`` with
    ``wrap(handler)``."""
    eio.on("message", wrap(eio.handlers["message"]))


def wrap_handle_request(eio: Any, wrap: Callable[[Callable], Callable]) -> None:
    """Replace ``eio.handle_request`` (the WSGI entry of every Engine.IO request) with
    ``wrap(handle_request)``."""
    eio.handle_request = wrap(eio.handle_request)


def guard_websockets(eio: Any, wrap: Callable[[Any, Any], Any],
                     on_request: Callable[[Any, dict], None] | None = None,
                     configure_reader: Callable[[dict, Any], None] | None = None) -> None:
    """Make ``eio``'s websockets reach their Engine.IO session through ``wrap(ws,
    session)`` (an object with the websocket's ``wait``, ``send`` and ``close``); call
    ``on_request(session, environ)`` when the upgrade request arrives, and
    ``configure_reader(server_args, session)`` with the keyword arguments of the
    simple-websocket server the gevent and threading drivers make. ``session`` is the
    engineio Socket (None if unknown). Only this server's copy of its driver's table changes:
    other servers are unaffected."""
    websocket_class = eio._async.get("websocket")
    if websocket_class is None:
        return

    class GuardedWebSocket(websocket_class):
        def __init__(self, handler, *args, **kwargs):
            # the driver is given the bound method of the Engine.IO session it serves
            self._session = session = getattr(handler, "__self__", None)
            super().__init__(lambda ws: handler(wrap(ws, session)), *args, **kwargs)
            server_args = getattr(self, "server_args", None)
            if configure_reader is not None and isinstance(server_args, dict):
                configure_reader(server_args, session)

        def __call__(self, environ, start_response):
            if on_request is not None:
                on_request(self._session, environ)
            return super().__call__(environ, start_response)

    eio._async = {**eio._async, "websocket": GuardedWebSocket}


def use_queue_class(eio: Any, make: Callable[[type], type]) -> None:
    """Give each new session of ``eio`` an outgoing queue of class ``make(driver_queue)``."""
    queue_class = make(eio._async["queue"])
    driver_create_queue = eio.create_queue

    def create_queue(*args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return driver_create_queue(*args, **kwargs)
        return queue_class()

    eio.create_queue = create_queue


def use_session_table(eio: Any, table: dict) -> None:
    """Replace ``eio.sockets`` (sid -> session) with ``table``, a dict subclass whose
    ``__setitem__`` sees each new session."""
    table.update(eio.sockets)
    eio.sockets = table


def send_to_session(session: Any, pkt: Any) -> None:
    """``engineio.socket.Socket.send``: queue ``pkt`` for the session unless its ping has
    timed out, without the INFO log line it formats for every packet (about an eighth of the
    worker's CPU in a broadcast to 200, logged or not: bench/RESULTS.md)."""
    if session.check_ping_timeout():
        session.queue.put(pkt)


def end_session(eio: Any, eio_sid: str) -> None:
    """Close an Engine.IO session without waiting for its queue to drain.

    ``eio.disconnect`` waits until the client has fetched the close packet; a long-polling
    client that has no GET pending would keep the request that called it (its own POST)
    open for ever, and with it the process's shutdown.
    """
    session = eio.sockets.pop(eio_sid, None)
    if session is not None:
        session.close(wait=False, reason=eio.reason.SERVER_DISCONNECT)


def allow_batched_packets(count: int) -> None:
    """Let a long-polling request carry up to ``count`` packets (python-engineio refuses
    more than 16 by default, process-wide); never lowers the limit."""
    Payload.max_decode_packets = max(Payload.max_decode_packets, count)


def refused_origin(eio: Any, environ: dict) -> dict | None:
    """python-engineio's answer (``{"status", "headers", "response"}``) to a request whose
    ``Origin`` its CORS rules refuse; None when they accept it (or it has no Origin)."""
    origin = environ.get("HTTP_ORIGIN")
    if eio.cors_allowed_origins == [] or not origin:
        return None
    allowed = eio._cors_allowed_origins(environ)
    if allowed is None or origin in allowed:
        return None
    return eio._bad_request("Not an accepted origin.")
