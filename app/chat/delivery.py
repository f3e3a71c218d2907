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

import time
from collections import deque
from typing import Any, Callable
from urllib.parse import urlparse

from socketio import Manager

from app.overrides.engineio import send_to_session
from app.overrides.socketio import RedisRelayManager, broadcast

from app.chat import agent_config
from app.chat.relay import ChatRelay
from app.chat.rooms import is_chat_room

Keep = Callable[[str, Any], bool]
#: What a filter still looks at: a Keep may have ``events`` (a set it empties as it settles);
#: one without is applied to every event for the connection's whole life.
ALL_EVENTS = None

#: How long a process remembers the end requests it ran, for the connections that were being
#: authorised when one arrived (see GateMixin.ended_since).
RECENT_ENDS_SECONDS = 60


def _matches(tags: dict[str, Any], match: dict[str, Any]) -> bool:
    return all(tags.get(name) == value for name, value in match.items())


class GateMixin:
    """Hold a joining client's room events until ``open_gate``, then filter them until the
    filter has settled.

    A message stored before the client's replay read it may still be on its way to the room
    (its sender yields to the event loop between commit and broadcast, or it comes through
    Redis), so the filter that ``open_gate`` installs stays on until it says (by emptying its
    ``events``) that nothing it would drop can come any more (app/chat/catchup.py). Gates
    and filters are indexed by room and event, so a broadcast looks only at the connections
    that are joining or still filtering that event, not at every client of the room.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._gates: dict[str, list[tuple[str, Any]]] = {}
        self._filters: dict[str, Keep] = {}
        # room -> the sids gated in it; room -> event (or ALL_EVENTS) -> the sids filtering
        # it; sid -> its room, for both
        self._gated: dict[str, set[str]] = {}
        self._watching: dict[str, dict[str | None, set[str]]] = {}
        self._room_of: dict[str, str] = {}
        # Clients that are not Socket.IO sessions (the plain WebSocket endpoint): room ->
        # {id: (deliver(event, data), close())}. They get the same events, gated the same way.
        self._listeners: dict[str, dict[str, tuple[Callable[[str, Any], None],
                                                   Callable[[], None]]]] = {}
        # Every live connection of this process (Socket.IO sid or listener id) -> what
        # revocation matches it by (tenant_id, api_key_id, workspace_id, user_pk), and its
        # namespace; so that end_sessions can find the ones a revocation ends.
        self._sessions: dict[str, tuple[str, dict[str, Any]]] = {}
        # (when it arrived, match, error) of the end requests of the last RECENT_ENDS_SECONDS,
        # and the Socket.IO sessions ended while still in their connect handler -> error.
        self._recent_ends: deque[tuple[float, dict[str, Any], dict[str, Any]]] = deque()
        self._ending: dict[str, tuple[str, dict[str, Any]]] = {}

    def add_listener(self, room: str, listener_id: str, deliver: Callable[[str, Any], None],
                     close: Callable[[], None]) -> None:
        """Deliver the room's events to a non-Socket.IO client of this process."""
        self._listeners.setdefault(room, {})[listener_id] = (deliver, close)

    def remove_listener(self, room: str, listener_id: str) -> None:
        listeners = self._listeners.get(room)
        if listeners is not None:
            listeners.pop(listener_id, None)
            if not listeners:
                del self._listeners[room]
        self.drop_gate(listener_id)

    def _deliver_to_listeners(self, event: str, data: Any, room: str, skip: list) -> None:
        for listener_id, (deliver, _) in list(self._listeners.get(room, {}).items()):
            if listener_id in skip:
                continue
            if listener_id in self._gates:
                self._gates[listener_id].append((event, data))
            elif listener_id not in self._filters or self._apply_filter(listener_id, event,
                                                                         data):
                deliver(event, data)

    def gate(self, sid: str, room: str) -> None:
        """Start holding the events of ``room`` for ``sid`` (events sent to the sid itself
        pass)."""
        self._gates[sid] = []
        self._room_of[sid] = room
        self._gated.setdefault(room, set()).add(sid)

    def open_gate(self, sid: str, namespace: str, keep: Keep) -> None:
        """Deliver what was held for ``sid``, in order, where ``keep(event, data)`` is true,
        and apply ``keep`` to the sid's room events from now on, until it has settled."""
        held = self._gates.pop(sid, None) or ()
        room = self._room_of.get(sid)
        self._forget(self._gated, room, sid)
        listener = next((entry for listeners in self._listeners.values()
                         for listener_id, entry in listeners.items() if listener_id == sid),
                        None)
        if room is not None:
            self._filters[sid] = keep
            watching = self._watching.setdefault(room, {})
            for event in getattr(keep, "events", (ALL_EVENTS,)):
                watching.setdefault(event, set()).add(sid)
        for event, data in held:
            if keep(event, data):
                if listener is not None:
                    listener[0](event, data)
                else:
                    Manager.emit(self, event, data, namespace, to=sid)
        if room is not None:
            self._settle(sid, keep)

    def _apply_filter(self, sid: str, event: str, data: Any) -> bool:
        keep = self._filters[sid]
        kept = keep(event, data)
        self._settle(sid, keep)
        return kept

    def _settle(self, sid: str, keep: Keep) -> None:
        """Stop looking at the events ``keep`` no longer filters; drop it when none is left."""
        events = getattr(keep, "events", None)
        if events is None:
            return
        room = self._room_of.get(sid)
        watching = self._watching.get(room, {})
        for event in [event for event, sids in watching.items()
                      if sid in sids and event not in events]:
            self._forget(watching, event, sid)
        if not watching:
            self._watching.pop(room, None)
        if not events:
            self._filters.pop(sid, None)

    @staticmethod
    def _forget(index: dict, key: Any, sid: str) -> None:
        sids = index.get(key)
        if sids is not None:
            sids.discard(sid)
            if not sids:
                del index[key]

    def drop_gate(self, sid: str) -> None:
        """Forget a connection that has ended: its gate, its filter and its session."""
        self._gates.pop(sid, None)
        self._filters.pop(sid, None)
        room = self._room_of.pop(sid, None)
        if room is not None:
            self._forget(self._gated, room, sid)
            watching = self._watching.get(room)
            if watching is not None:
                for event in list(watching):
                    self._forget(watching, event, sid)
                if not watching:
                    del self._watching[room]
        self._sessions.pop(sid, None)
        self._ending.pop(sid, None)

    def track_session(self, sid: str, namespace: str, tags: dict[str, Any]) -> None:
        """Remember a live connection of this process and what revocations match it by."""
        self._sessions[sid] = (namespace, dict(tags))

    def end_sessions(self, match: dict[str, Any], error: dict[str, Any]) -> None:
        """Send ``error`` to every connection whose tags include ``match``, then disconnect it
        (on every process when the manager has a message queue)."""
        self._end_local_sessions(match, error)

    def ended_since(self, tags: dict[str, Any], since: float) -> dict[str, Any] | None:
        """The error of an end request that this process ran after ``since`` (a
        time.monotonic()) and that matches ``tags``; None if there was none.

        A connection whose authorisation read the database before a revocation committed,
        and which registers only after the revocation's end request ran, was missed by it:
        its authorisation asks this last, and refuses it.
        """
        self._forget_old_ends()
        for received, match, error in self._recent_ends:
            if received >= since and _matches(tags, match):
                return error
        return None

    def _forget_old_ends(self) -> None:
        horizon = time.monotonic() - RECENT_ENDS_SECONDS
        while self._recent_ends and self._recent_ends[0][0] < horizon:
            self._recent_ends.popleft()

    def _end_local_sessions(self, match: dict[str, Any], error: dict[str, Any]) -> None:
        self._forget_old_ends()
        self._recent_ends.append((time.monotonic(), match, error))
        for sid, (namespace, tags) in list(self._sessions.items()):
            if not _matches(tags, match):
                continue
            self._sessions.pop(sid, None)
            listener = next((entry for listeners in self._listeners.values()
                             for listener_id, entry in listeners.items() if listener_id == sid),
                            None)
            if listener is not None:
                deliver, close = listener
                deliver("error", error)
                close()
            elif self.is_connected(sid, namespace):
                self._end_session(sid, namespace, error)
            else:  # still in its connect handler, which cannot be disconnected: see connect
                self._ending[sid] = (namespace, error)

    def _end_session(self, sid: str, namespace: str, error: dict[str, Any]) -> None:
        Manager.emit(self, "error", error, namespace, to=sid)
        self.server.disconnect(sid, namespace=namespace, ignore_queue=True)

    def connect(self, sid, namespace):
        result = super().connect(sid, namespace)
        ending = self._ending.pop(sid, None)
        if ending is not None:  # ended while it was connecting: end it now it is connected
            self._end_session(sid, *ending)
        return result

    def emit(self, event, data, namespace, room=None, skip_sid=None, callback=None, to=None,
             **kwargs):
        target = to or room
        if (isinstance(target, str) and target in self._listeners and not callback):
            skip = list(skip_sid) if isinstance(skip_sid, (list, tuple, set)) else [skip_sid]
            self._deliver_to_listeners(event, data, target, skip)
        gated = self._gated.get(target) if isinstance(target, str) else None
        watching = self._watching.get(target) if isinstance(target, str) else None
        if (gated or watching) and not callback:
            skip = list(skip_sid) if isinstance(skip_sid, (list, tuple, set)) else [skip_sid]
            members = self.rooms.get(namespace, {}).get(target) or {}
            extra = []
            for sid in list(gated or ()):
                if sid in members and sid not in skip:
                    self._gates[sid].append((event, data))
                    extra.append(sid)
            filtering = set()
            if watching:
                filtering = watching.get(event, set()) | watching.get(ALL_EVENTS, set())
            for sid in filtering:
                if (sid in members and sid not in skip and sid in self._filters
                        and not self._apply_filter(sid, event, data)):
                    extra.append(sid)
            if extra:
                skip_sid = skip + extra
        if callback is None and namespace is not None:
            return broadcast(self, event, data, namespace, target, skip_sid, send_to_session)
        return super().emit(event, data, namespace, room=target, skip_sid=skip_sid,
                            callback=callback, **kwargs)

    def disconnect_room(self, namespace: str, room: str) -> None:
        """Disconnect every client of this process that is in ``room``."""
        self._close_listeners(room)
        for sid, _ in list(self.get_participants(namespace, room)):
            self.server.disconnect(sid, namespace=namespace)

    def _close_listeners(self, room: str) -> None:
        for _, close in list(self._listeners.get(room, {}).values()):
            close()

    def close_all_listeners(self) -> None:
        """End every non-Socket.IO client of this process (shutdown)."""
        for room in list(self._listeners):
            self._close_listeners(room)


class ChatManager(GateMixin, Manager):
    """The client manager for one process."""


class ChatRedisManager(RedisRelayManager, ChatManager):
    """The client manager when REDIS_URL is set: broadcasts reach every process.

    MRO: RedisRelayManager -> RedisManager -> PubSubManager -> ChatManager -> GateMixin ->
    Manager, so an event published by any process is delivered here by python-socketio
    (RedisRelayManager.deliver_emit) through GateMixin.emit. A chat's events travel on the
    chat's own channel, which a process listens to only while it has a client in the chat
    (app/chat/relay.py); the rest on the global one.
    """

    #: Chat-room events are published with this host id, which is no process's own, so every
    #: process (the sender's too) delivers them from the channel, in the channel's one order.
    RELAY_HOST = "workspace-chat-relay"

    def __init__(self, url: str, **kwargs):
        db = urlparse(url).path.strip("/") or "0"
        # Redis pub/sub channels ignore database numbers; name the channel after it, so that
        # deployments (and test suites) on different databases of one Redis stay apart.
        kwargs.setdefault("channel", f"workspace-chat-{db}")
        super().__init__(url, **kwargs)
        self.channels = ChatRelay(url, self.channel, self.host_id)
        self.channels.in_use = self._has_local_clients

    def initialize(self):
        self.channels.make_event = self.server.eio.create_event
        self.channels.sleep = self.server.sleep
        self.channels.logger = self._get_logger()
        super().initialize()

    def enter_room(self, sid, namespace, room, eio_sid=None):
        local = is_chat_room(room) and (self.is_connected(sid, namespace)
                                        or self.is_pre_connected(sid, namespace))
        if local:
            # confirmed before the joining client's catch-up reads the database, so what it
            # does not read reaches it through the channel (raises SubscribeTimeout)
            self.channels.subscribe(room)
        super().enter_room(sid, namespace, room, eio_sid=eio_sid)
        if local:
            self.channels.release(room)  # if the client went away while it waited

    def basic_leave_room(self, sid, namespace, room):
        super().basic_leave_room(sid, namespace, room)
        if is_chat_room(room):
            self.channels.release(room)

    def add_listener(self, room, listener_id, deliver, close):
        if is_chat_room(room):
            self.channels.subscribe(room)
        super().add_listener(room, listener_id, deliver, close)

    def remove_listener(self, room, listener_id):
        super().remove_listener(room, listener_id)
        if is_chat_room(room):
            self.channels.release(room)

    def _has_local_clients(self, room: str) -> bool:
        return room in self._listeners or any(room in rooms for rooms in self.rooms.values())

    def emit(self, event, data, namespace=None, room=None, skip_sid=None, callback=None,
             to=None, **kwargs):
        target = to or room
        if (callback is None and not kwargs.get("ignore_queue") and isinstance(target, str)
                and not is_chat_room(target) and (self.is_connected(target, namespace)
                                                  or self.is_pre_connected(target, namespace))):
            # An event for one client of this process (catch-up, an error): python-socketio
            # would also publish it for every process to decode and drop, a Redis round trip
            # per refusal under load (bench/RESULTS.md, PostgreSQL + Redis).
            kwargs["ignore_queue"] = True
            return super().emit(event, data, namespace=namespace, room=target,
                                skip_sid=skip_sid, **kwargs)
        if (kwargs.get("ignore_queue") or callback is not None or not isinstance(target, str)
                or not is_chat_room(target)):
            return super().emit(event, data, namespace=namespace, room=target,
                                skip_sid=skip_sid, callback=callback, **kwargs)
        # PubSubManager delivers to its own clients first and publishes after, so two
        # processes could show a chat's messages in different orders. A chat's events go
        # through the channel only; if Redis is away, this process's clients still get them.
        message = self.emit_message(event, data, namespace, target, skip_sid, self.RELAY_HOST)
        if not self.relay(message):
            self.deliver_emit(message)

    def disconnect_room(self, namespace: str, room: str) -> None:
        """Disconnect the room's clients on every process (after events already sent)."""
        message = self.close_room_message(room, namespace, self.RELAY_HOST, disconnect=True)
        if not self.relay(message):
            self.on_close_room(message)

    def end_sessions(self, match: dict[str, Any], error: dict[str, Any]) -> None:
        """End the matching connections of every process (each process ends its own)."""
        # Published as an "emit" (python-socketio's listener ignores methods it does not
        # know), recognised by its "end_sessions" key in on_emit.
        message = {"method": "emit", "end_sessions": True, "match": match, "error": error,
                   "host_id": self.RELAY_HOST}
        if not self.relay(message):
            self._end_local_sessions(match, error)

    def forget_agent(self, workspace_id: str) -> None:
        """Drop the workspace's agent configuration that every process keeps (each process
        drops its own; app/chat/agent_config.py)."""
        # an "emit" recognised by its "forget_agent" key in on_emit, as end_sessions; if Redis
        # is away the others keep theirs until it expires (agent_config.MAX_AGE_SECONDS)
        self.relay({"method": "emit", "forget_agent": workspace_id,
                    "host_id": self.RELAY_HOST})

    def relay(self, message: dict) -> bool:
        """Publish for every process, a chat's events on the chat's channel; False when this
        process will not hear it back (Redis away, or its subscription not confirmed yet), so
        it must deliver it."""
        room = message.get("room")
        if is_chat_room(room):
            if not self.channels.confirmed(room):  # marked so that this process skips it
                self.channels.publish(room, self.json.dumps({**message,
                                                             "host_id": self.host_id}))
                return False
            return bool(self.channels.publish(room, self.json.dumps(message)))
        return super().relay(message)

    @property
    def listening(self) -> bool:
        """Whether this process hears the global channel."""
        return self.channels.listening

    def listen_messages(self):
        """What arrives on this process's channels: the global one and its chats'."""
        yield from self.channels.listen()

    def on_emit(self, message: dict) -> None:
        if message.get("end_sessions"):
            self._end_local_sessions(message["match"], message["error"])
            return
        if "forget_agent" in message:
            agent_config.configs.forget(message["forget_agent"])
            return
        self.deliver_emit(message)

    def on_close_room(self, message: dict) -> None:
        if message.get("disconnect"):
            self._close_listeners(message["room"])
            for sid, _ in list(self.get_participants(message["namespace"], message["room"])):
                self.server.disconnect(sid, namespace=message["namespace"], ignore_queue=True)
        self.deliver_close_room(message)


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
