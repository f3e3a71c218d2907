"""Limits on what one Engine.IO session may hold or ask of a process (CONTRACT.md section 9).

python-engineio keeps a session that never joins a namespace for as long as it answers pings,
queues everything sent to a client that stops reading, reads a long-polling body of any
announced length with no deadline, and reads as fast as a client writes. Each of these let one
client exhaust a worker. Here:

- ``SessionLimits.sweep``: one task per process closes sessions that have not joined ``/chat``
  within ``CONNECT_TIMEOUT`` seconds.
- ``OutgoingQueue``: each session's outgoing queue counts its unsent bytes (queued, or taken
  by the websocket writer and not yet sent); past ``MAX_CLIENT_QUEUE`` the session is
  dropped as a slow client (its /chat user is told why on reconnecting, and is replayed what
  it missed). On an eventlet websocket with nothing queued, a packet skips the queue and its
  writer task: it is sent at once if the socket takes it (app/overrides/eventlet_websocket.py,
  ``DirectSender``), and only what the socket did not take is queued and counted.
- ``TokenBucket``: incoming packets per session are throttled (back-pressure: the reader
  stops reading, the flooder's TCP buffers fill, nobody else waits).
- ``read_body``: a long-polling body must arrive within ``CONNECT_TIMEOUT`` seconds.

How each is put in place on python-engineio (its queues, its session table) is in
app/overrides/engineio.py.
"""
from __future__ import annotations

import logging
import socket as _socket
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from app.chat import session as chat_session  # `session` names engine.io sessions here
from app.chat.rooms import NAMESPACE
from app.overrides.engineio import end_session, use_queue_class, use_session_table
from app.overrides.eventlet_websocket import PendingRest

#: Incoming packets one session may send: sustained rate per second, and burst.
PACKETS_PER_SECOND = 100
PACKET_BURST = 200
#: How often the sweeper looks for sessions that have not joined (at most).
SWEEP_SECONDS = 1.0


class TokenBucket:
    """``take(n)`` spends n tokens and says how long to wait before going on (0: at once)."""

    def __init__(self, rate: float = PACKETS_PER_SECOND, burst: float = PACKET_BURST):
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self, count: int = 1) -> float:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate) - count
        self.stamp = now
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


def packet_size(pkt: Any) -> int:
    """About the bytes an Engine.IO packet takes on the wire (its data; 1 for the rest)."""
    data = getattr(pkt, "data", None)
    if isinstance(data, (str, bytes)):
        return len(data) + 1
    return 1


def shut(sock: Any) -> None:
    """Shut a TCP connection down, waking whatever waits on it."""
    if sock is None:
        return
    try:
        sock.shutdown(_socket.SHUT_RDWR)
    except (OSError, AttributeError):
        pass


def make_outgoing_queue(queue_class: type, limit: int, on_overflow: Callable) -> type:
    """A subclass of the async driver's queue that counts its session's unsent bytes."""

    class OutgoingQueue(queue_class):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.unsent = 0         # bytes queued, or taken by a websocket writer, unsent
            self.overflowed = False
            self.session: Any = None  # the engineio Socket, set when it is registered
            self.limit = limit
            # bytes of a joining client's catch-up (bounded by MAX_REPLAY) still unsent: the
            # limit applies to what comes on top of them
            self.allowance = 0
            self.catching_up = False
            # the session's DirectSender once its websocket writer runs (None: always queue)
            self.direct: Any = None

        def put(self, item: Any, *args: Any, **kwargs: Any) -> None:
            if item is not None:
                if self.overflowed:
                    return  # the session is being dropped: nothing more piles up for it
                direct = self.direct
                # in order: only when nothing is queued (a queued packet or rest goes first;
                # one the writer is sending holds the socket's lock, see DirectSender)
                if direct is not None and self.session.upgraded and not self.qsize():
                    rest = direct.send_now(item)
                    if rest is not None:
                        if not rest:
                            return
                        item = PendingRest(rest)
                size = packet_size(item)
                if self.catching_up:
                    self.allowance += size
                elif self.unsent - self.allowance + size > self.limit \
                        and self.session is not None:
                    self.overflowed = True
                    on_overflow(self.session)
                    return
                self.unsent += size
            super().put(item, *args, **kwargs)

        def get(self, *args: Any, **kwargs: Any) -> Any:
            item = super().get(*args, **kwargs)
            session = self.session
            if item is not None and not (session is not None and session.upgraded):
                # long-polling: the packets are now in an HTTP response. (A websocket
                # writer's packets count until sent: see ``sent``.)
                self.sent(packet_size(item))
            return item

        def sent(self, nbytes: int) -> None:
            self.unsent = max(0, self.unsent - nbytes)
            self.allowance = max(0, self.allowance - nbytes)  # the catch-up is sent first

    return OutgoingQueue


class SessionTable(dict):
    """``eio.sockets``, noting when each session opened and binding its outgoing queue."""

    def __init__(self, on_new: Callable[[Any], None]):
        super().__init__()
        self._on_new = on_new

    def __setitem__(self, sid: str, session: Any) -> None:
        if sid not in self:
            session.opened_at = time.monotonic()
            session.joined = False
            session.tcp = None  # its TCP socket, once on websocket
            session.inbound = TokenBucket()
            if hasattr(session.queue, "session"):
                session.queue.session = session
            self._on_new(session)
        super().__setitem__(sid, session)


class SessionLimits:
    """Installs the limits above on a socketio.Server (see ``install``)."""

    def __init__(self, server: Any, app: Any, connect_timeout: float, max_queue: int):
        self.server = server
        self.eio = server.eio
        self.app = app
        self.logger: logging.Logger = app.logger
        self.connect_timeout = connect_timeout
        self.max_queue = max_queue
        self._sweeper_started = False

    def install(self) -> None:
        use_queue_class(self.eio, lambda driver_queue: make_outgoing_queue(
            driver_queue, self.max_queue, self._on_overflow))
        use_session_table(self.eio, SessionTable(self._on_new_session))

    # -- sessions that never join -------------------------------------------------------

    def _on_new_session(self, session: Any) -> None:
        if not self._sweeper_started:
            self._sweeper_started = True
            self.eio.start_background_task(self.sweep)

    def has_joined(self, session: Any) -> bool:
        """Whether the session is on /chat (then it is not swept). One that has left /chat
        has CONNECT_TIMEOUT seconds from then to join again."""
        sid = self.server.manager.sid_from_eio_sid(session.sid, NAMESPACE)
        if sid is not None and (sid in chat_session.connections or session.joined):
            # (a client joining right now is in the manager before it is in connections)
            session.joined = True
            return True
        if session.joined:
            session.joined = False
            session.opened_at = time.monotonic()
            return True
        return False

    def sweep(self) -> None:
        """Close, once a second or so, the sessions older than CONNECT_TIMEOUT that have not
        joined /chat (websocket and long-polling alike)."""
        interval = min(SWEEP_SECONDS, max(0.1, self.connect_timeout / 4))
        while True:
            self.eio.sleep(interval)
            try:
                self.sweep_once()
            except Exception:  # never let the sweeper die
                self.logger.exception("sweeping Socket.IO sessions failed")

    def sweep_once(self) -> int:
        cutoff = time.monotonic() - self.connect_timeout
        closed = 0
        for sid, session in list(self.eio.sockets.items()):
            opened = getattr(session, "opened_at", None)
            if opened is None or opened > cutoff or self.has_joined(session):
                continue
            self.end(sid, session)
            closed += 1
        if closed:
            self.logger.info("closed %d Socket.IO sessions that did not join a chat within "
                             "%s s", closed, self.connect_timeout)
        return closed

    def end(self, sid: str, session: Any) -> None:
        """Close a session at once, and its TCP connection if it is a websocket."""
        end_session(self.eio, sid)
        shut(getattr(session, "tcp", None))

    # -- slow clients -------------------------------------------------------------------

    def _on_overflow(self, session: Any) -> None:
        # called from inside Socket.send, in whatever task emitted: drop it from a task of
        # its own so that the emitter goes on
        self.eio.start_background_task(self._drop_slow_client, session)

    def _drop_slow_client(self, session: Any) -> None:
        self.logger.warning("slow client: dropping Socket.IO session %s, more than %d bytes "
                            "unsent", session.sid, self.max_queue)
        sid = self.server.manager.sid_from_eio_sid(session.sid, NAMESPACE)
        connection = chat_session.connections.get(sid) if sid is not None else None
        if connection is not None:
            with self.app.app_context():
                try:
                    chat_session.note_slow_client(connection)
                except Exception:
                    self.logger.warning("could not note slow client %s", session.sid,
                                        exc_info=True)
        self.end(session.sid, session)


@contextmanager
def catching_up(server: Any, sid: str, namespace: str) -> Iterator[None]:
    """While a client joining ``namespace`` is sent its catch-up (the missed messages, at
    most MAX_REPLAY), that burst does not count against MAX_CLIENT_QUEUE."""
    eio_sid = server.manager.eio_sid_from_sid(sid, namespace)
    queue = getattr(server.eio.sockets.get(eio_sid), "queue", None)
    if not hasattr(queue, "catching_up"):
        yield
        return
    queue.catching_up = True
    try:
        yield
    finally:
        queue.catching_up = False


def install_session_limits(server: Any, app: Any) -> SessionLimits:
    """Apply CONNECT_TIMEOUT and MAX_CLIENT_QUEUE to ``server``'s Engine.IO sessions."""
    limits = SessionLimits(server, app, app.config["CONNECT_TIMEOUT"],
                           app.config["MAX_CLIENT_QUEUE"])
    limits.install()
    return limits
