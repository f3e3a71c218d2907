"""python-socketio: a stricter packet decoder, the server's table of half-received binary
packets, and the Redis client manager's private publish, listen and dispatch methods."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from engineio import packet as eio_packet
from socketio import RedisManager, packet

from app.overrides import Needed

REQUIRES = (
    # broadcast: Manager.emit's branch without an ack callback, copied
    Needed("python-socketio", "socketio.server:Server._send_eio_packet",
           params=("eio_sid", "eio_pkt")),
    Needed("python-socketio", "socketio.manager:Manager.emit",
           params=("event", "data", "namespace", "room", "skip_sid", "callback", "to",
                   "kwargs"), source_sha="566510ea2de3"),
    Needed("python-socketio", "socketio.packet:Packet.decode", params=("encoded_packet",)),
    Needed("python-socketio", "socketio.packet:Packet.add_attachment",
           params=("attachment",)),
    Needed("python-socketio", "socketio.packet:Packet.__init__", params=(
        "packet_type", "data", "namespace", "id", "binary", "encoded_packet")),
    Needed("python-socketio", "socketio.base_server:BaseServer._binary_packet",
           assigned=True),
    Needed("python-socketio", "socketio.pubsub_manager:PubSubManager._publish",
           params=("data",)),
    Needed("python-socketio", "socketio.pubsub_manager:PubSubManager._handle_emit",
           params=("message",)),
    Needed("python-socketio", "socketio.pubsub_manager:PubSubManager._handle_close_room",
           params=("message",)),
    Needed("python-socketio", "socketio.redis_manager:RedisManager._publish",
           params=("data",)),
    Needed("python-socketio", "socketio.redis_manager:RedisManager._listen", params=()),
    Needed("python-socketio", "socketio.base_manager:BaseManager._get_logger", params=()),
    Needed("python-socketio", "socketio.manager:Manager.sid_from_eio_sid",
           params=("eio_sid", "namespace")),
)

#: Event names a client may not emit (socket.io-parser refuses them too): python-socketio
#: would dispatch them to the connect and disconnect handlers.
RESERVED_EVENTS = frozenset({"connect", "connect_error", "disconnect", "disconnecting",
                             "newListener", "removeListener"})
_CLIENT_PACKET_TYPES = (packet.CONNECT, packet.DISCONNECT, packet.EVENT, packet.ACK,
                        packet.BINARY_EVENT, packet.BINARY_ACK)


class MalformedPacket(ValueError):
    """A Socket.IO packet that cannot be decoded or has an invalid shape."""


class StrictPacket(packet.Packet):
    """python-socketio's packet, refusing malformed input with MalformedPacket (pass it as
    the server's ``serializer``)."""

    def decode(self, encoded_packet: Any) -> int:
        if not isinstance(encoded_packet, str):
            raise MalformedPacket("binary frame without a binary packet header")
        try:
            attachments = super().decode(encoded_packet)
        except (ValueError, TypeError, RecursionError) as exc:
            raise MalformedPacket(f"undecodable packet ({type(exc).__name__}: "
                                  f"{str(exc)[:80]})") from None
        if self.packet_type not in _CLIENT_PACKET_TYPES:
            raise MalformedPacket(f"packet type {self.packet_type!r} is not sent by clients")
        if self.packet_type in (packet.EVENT, packet.BINARY_EVENT):
            if not isinstance(self.data, list) or not self.data \
                    or not isinstance(self.data[0], str) or self.data[0] in RESERVED_EVENTS:
                raise MalformedPacket("an event must be [name, ...args] with a non-reserved "
                                      "name")
        elif self.packet_type in (packet.ACK, packet.BINARY_ACK) \
                and not isinstance(self.data, list):
            raise MalformedPacket("an ack must be a list of arguments")
        return attachments

    def add_attachment(self, attachment: Any) -> bool:
        try:
            return super().add_attachment(attachment)
        except (ValueError, TypeError, IndexError, KeyError) as exc:
            raise MalformedPacket(f"bad binary attachment ({type(exc).__name__})") from None


def awaits_attachment(server: Any, eio_sid: str) -> bool:
    """Whether ``server`` is in the middle of a session's binary packet (waiting for its
    attachments)."""
    return eio_sid in server._binary_packet


def forget_binary_packet(server: Any, eio_sid: str) -> None:
    """Drop the binary packet ``server`` was assembling for a session."""
    server._binary_packet.pop(eio_sid, None)


def forget_session(server: Any, eio_sid: str) -> None:
    """Drop what a packet handled after its session ended left behind (a CONNECT registers
    the namespace session before it fails)."""
    forget_binary_packet(server, eio_sid)
    manager = server.manager
    for namespace in list(manager.get_namespaces()):
        sid = manager.sid_from_eio_sid(eio_sid, namespace)
        if sid is not None:
            manager.disconnect(sid, namespace, ignore_queue=True)


class RedisRelayManager(RedisManager):
    """python-socketio's RedisManager with public hooks for what its private methods do.

    - ``relay(message)`` publishes a message in python-socketio's channel format (see
      ``emit_message`` and ``close_room_message``) and says whether this process will hear
      it back, so that a caller can deliver it itself when it will not;
    - ``on_emit(message)`` and ``on_close_room(message)`` are called for each such message
      heard on the channel; by default they deliver it as python-socketio does
      (``deliver_emit``, ``deliver_close_room``);
    - ``listen_messages()`` replaces python-socketio's listener loop (``_listen``): what the
      process hears, and ``listening`` says whether it is subscribed.
    """

    listening = False

    @staticmethod
    def emit_message(event: str, data: Any, namespace: str | None, room: str,
                     skip_sid: Any, host_id: str) -> dict[str, Any]:
        """python-socketio's channel message for an emit (without binary data or ack)."""
        return {"method": "emit", "event": event,
                "data": list(data) if isinstance(data, tuple) else [data],
                "binary": False, "namespace": namespace or "/", "room": room,
                "skip_sid": skip_sid, "callback": None, "host_id": host_id}

    @staticmethod
    def close_room_message(room: str, namespace: str, host_id: str,
                           **extra: Any) -> dict[str, Any]:
        """python-socketio's channel message that closes a room (``extra`` rides along)."""
        return {"method": "close_room", "room": room, "namespace": namespace,
                "host_id": host_id, **extra}

    def relay(self, message: dict) -> bool:
        """Publish ``message`` for every process; False when this process will not hear it
        back (Redis away, or this process's subscription not restored yet)."""
        if not self.listening:
            self._publish(message)  # other processes may be subscribed
            return False
        return bool(self._publish(message))

    def on_emit(self, message: dict) -> None:
        """An emit message heard on the channel (or not relayed): deliver it."""
        self.deliver_emit(message)

    def on_close_room(self, message: dict) -> None:
        """A close_room message heard on the channel (or not relayed): deliver it."""
        self.deliver_close_room(message)

    def deliver_emit(self, message: dict) -> None:
        """Deliver an emit message to this process's clients, as python-socketio does."""
        super()._handle_emit(message)

    def deliver_close_room(self, message: dict) -> None:
        """Close the message's room on this process, as python-socketio does."""
        super()._handle_close_room(message)

    def _handle_emit(self, message):
        self.on_emit(message)

    def _handle_close_room(self, message):
        self.on_close_room(message)

    def listen_messages(self) -> Iterator[Any]:
        """What this process hears on its channels, one published payload at a time, for
        python-socketio's listener thread to decode and dispatch; subclasses provide it (and
        keep ``listening`` true while they are subscribed)."""
        raise NotImplementedError

    def _listen(self):
        yield from self.listen_messages()


def broadcast(manager: Any, event: str, data: Any, namespace: str, room: Any,
              skip_sid: Any, send: Any) -> None:
    """python-socketio's ``Manager.emit`` without an ack callback (its packet encoded once
    for every recipient), with each Engine.IO packet handed to ``send(session, packet)``
    (the engineio Socket) instead of through ``Server._send_eio_packet`` and
    ``engineio.Server.send_packet``: two calls and a session lookup less per recipient."""
    if namespace not in manager.rooms:
        return
    if isinstance(data, tuple):
        data = list(data)
    elif data is not None:
        data = [data]
    else:
        data = []
    if not isinstance(skip_sid, list):
        skip_sid = [skip_sid]
    pkt = manager.server.packet_class(packet.EVENT, namespace=namespace, data=[event] + data)
    encoded_packet = pkt.encode()
    if not isinstance(encoded_packet, list):
        encoded_packet = [encoded_packet]
    eio_pkt = [eio_packet.Packet(eio_packet.MESSAGE, p) for p in encoded_packet]
    sessions = manager.server.eio.sockets
    for sid, eio_sid in manager.get_participants(namespace, room):
        if sid not in skip_sid:
            session = sessions.get(eio_sid)
            for p in eio_pkt:
                if session is not None:
                    send(session, p)
                else:  # gone meanwhile, or a test client's (Flask-SocketIO's catches this)
                    manager.server._send_eio_packet(eio_sid, p)
