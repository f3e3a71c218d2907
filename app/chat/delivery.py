"""Socket.IO delivery: the client manager that keeps a reconnecting client's events in order.

A client that reconnects with ``last_message_id`` must get ``connection_established``, then
every message it missed, oldest first, then live traffic, each message exactly once. Reading
the missed messages from the database yields to the event loop, and a message broadcast to
the chat meanwhile would otherwise overtake the replay (or be lost, had we not joined the room
yet). So the connect handler joins the room behind a *gate*: room events for that client are
held, in order, until its replay is sent, then released minus what the replay already held.
Every broadcast, local or arriving from another process through Redis, passes through
``Manager.emit`` on the receiving process, which is where the gate sits.
"""
from __future__ import annotations

from typing import Any, Callable

from socketio import Manager, RedisManager

Keep = Callable[[str, Any], bool]


class GateMixin:
    """Hold room events for gated clients until ``open_gate``; disconnect a whole room."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._gates: dict[str, list[tuple[str, Any]]] = {}

    def gate(self, sid: str) -> None:
        """Start holding room events for ``sid`` (events sent to the sid itself pass)."""
        self._gates[sid] = []

    def open_gate(self, sid: str, namespace: str, keep: Keep) -> None:
        """Deliver what was held for ``sid``, in order, where ``keep(event, data)`` is true."""
        for event, data in self._gates.pop(sid, None) or ():
            if keep(event, data):
                Manager.emit(self, event, data, namespace, to=sid)

    def drop_gate(self, sid: str) -> None:
        self._gates.pop(sid, None)

    def emit(self, event, data, namespace, room=None, skip_sid=None, callback=None, to=None,
             **kwargs):
        target = to or room
        if self._gates and isinstance(target, str) and target not in self._gates and not callback:
            held = [sid for sid, _ in self.get_participants(namespace, target)
                    if sid in self._gates]
            if held:
                skip = list(skip_sid) if isinstance(skip_sid, (list, tuple, set)) else [skip_sid]
                for sid in held:
                    if sid not in skip:
                        self._gates[sid].append((event, data))
                skip_sid = skip + held
        return super().emit(event, data, namespace, room=target, skip_sid=skip_sid,
                            callback=callback, **kwargs)

    def disconnect_room(self, namespace: str, room: str) -> None:
        """Disconnect every client of this process that is in ``room``."""
        for sid, _ in list(self.get_participants(namespace, room)):
            self.server.disconnect(sid, namespace=namespace)


class ChatManager(GateMixin, Manager):
    """The client manager for one process."""


class ChatRedisManager(RedisManager, ChatManager):
    """The client manager when REDIS_URL is set: broadcasts reach every process."""

    # MRO: RedisManager -> PubSubManager -> ChatManager -> GateMixin -> Manager, so an event
    # published by any process is delivered here by PubSubManager._handle_emit through
    # GateMixin.emit.


class WithoutWebSocketCompression:
    """WSGI middleware that hides the client's WebSocket extension offer.

    eventlet accepts permessage-deflate whenever a client offers it (browsers always do),
    which measured about twice the CPU per delivered message and 2.5x the memory per idle
    connection; WS_COMPRESSION=1 turns this middleware off.
    """

    def __init__(self, wsgi_app):
        self.wsgi_app = wsgi_app

    def __call__(self, environ, start_response):
        environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)
        return self.wsgi_app(environ, start_response)
