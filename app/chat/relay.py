"""Scale-out through Redis: a pub/sub channel per chat, and the one loop that listens.

A process hears a chat's events only while it has a client in that chat: it subscribes to
the chat's channel (sharded pub/sub, ``SSUBSCRIBE``) when it gets its first local client of
the chat and unsubscribes when its last one leaves, so a process spends nothing on the chats
of the others. Everything else python-socketio and revocation send between processes stays
on the one global channel (plain ``SUBSCRIBE``).

One green thread, the listener, owns the pub/sub connection (redis-py's ``PubSub`` is not
made to be used by two at once): it sends every (un)subscribe and reads every reply. A join
that needs a channel asks for it, wakes the listener with a ``PUBLISH`` on the process's own
wake channel, and waits until the listener has read the subscribe reply: from then on Redis
delivers every event published to the chat, so what the joining client's catch-up read does
not hold reaches it through the channel.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Iterator

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

#: How long a join waits for its chat's subscription (seconds) before it fails.
SUBSCRIBE_TIMEOUT = 5.0
#: Channels per (un)subscribe command when many change at once (after a reconnection).
BATCH = 500
#: The listener's wait before reconnecting grows from 1 s to this (seconds).
MAX_RETRY_SLEEP = 5


class SubscribeTimeout(Exception):
    """Redis did not confirm a chat's subscription within SUBSCRIBE_TIMEOUT."""


class ChatRelay:
    """The per-chat subscriptions of one process and its listener loop (see the module).

    ``in_use(room)`` says whether the process still has a client in a chat room; the client
    manager sets it, and calls ``subscribe`` when a client joins a chat room and ``release``
    when one leaves.
    """

    def __init__(self, url: str, channel: str, host_id: str,
                 logger: logging.Logger | None = None) -> None:
        self.url = url
        self.channel = channel
        self.wake_channel = f"{channel}:wake:{host_id}"
        self.logger = logger or logging.getLogger("socketio")
        self.in_use: Callable[[str], bool] = lambda room: False
        self.make_event: Callable[[], Any] = threading.Event
        self.sleep: Callable[[float], None] = time.sleep
        #: True while the global channel's subscription is live.
        self.listening = False
        #: True from a failed connection until the listener is live again; not before the
        #: first attempt (python-socketio starts the listener at the first connection, which
        #: waits for it like any join).
        self.away = False
        #: Sharded pub/sub for the chats' channels (None: not asked Redis yet).
        self.sharded: bool | None = None
        self._publisher: redis.Redis | None = None
        self._wanted: set[str] = set()  # the chat channels this process needs
        self._joining: dict[str, int] = {}  # channel -> joins waiting for it
        self._asked: set[str] = set()  # channels whose last command sent was (S)SUBSCRIBE
        self._unanswered: dict[str, int] = {}  # channel -> commands sent, reply not read yet
        self._waiters: dict[str, list[Any]] = {}
        self._dirty = False  # _wanted changed since the listener last sent commands
        self._awake = False  # the listener will look at _dirty before it reads again

    # -- the join path (any green thread) -----------------------------------------------------

    def channel_of(self, room: str) -> str:
        """The Redis channel of a chat room."""
        return f"{self.channel}:{room}"

    def confirmed(self, room: str) -> bool:
        """Whether Redis delivers the room's channel to this process (reply read)."""
        channel = self.channel_of(room)
        return (self.listening and channel in self._asked
                and not self._unanswered.get(channel))

    def subscribe(self, room: str, timeout: float = SUBSCRIBE_TIMEOUT) -> None:
        """Return once this process receives the room's channel; raise SubscribeTimeout if
        Redis does not confirm it in time. Returns at once while Redis is away (the listener
        subscribes when it is back; meanwhile each process delivers its own events)."""
        channel = self.channel_of(room)
        self._want(channel)
        if self.confirmed(room) or self.away:
            return
        event = self.make_event()
        # while it waits, the joining client is in no room yet: keep the channel wanted
        self._joining[channel] = self._joining.get(channel, 0) + 1
        self._waiters.setdefault(channel, []).append(event)
        joined = False
        try:
            # a listener that is starting sends every wanted channel once it is live
            if not self.listening or self._wake():  # else Redis is away
                deadline = time.monotonic() + timeout
                while not self.confirmed(room) and not self.away:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise SubscribeTimeout(f"Redis did not confirm {channel} in "
                                               f"{timeout} s")
                    event.wait(remaining)
                    event.clear()
            joined = True
        finally:
            self._stop_waiting(channel, event)
            if not joined:
                self.release(room)  # unless another client still needs it

    def _stop_waiting(self, channel: str, event: Any) -> None:
        self._joining[channel] -= 1
        if not self._joining[channel]:
            del self._joining[channel]
        waiters = self._waiters.get(channel, [])
        if event in waiters:
            waiters.remove(event)
        if not waiters:
            self._waiters.pop(channel, None)

    def release(self, room: str) -> None:
        """The room may have lost its last local client: unsubscribe if it has."""
        channel = self.channel_of(room)
        if channel in self._wanted and not self._joining.get(channel) \
                and not self.in_use(room):
            self._wanted.discard(channel)
            self._dirty = True
            if self.listening:  # else it is renewed without it when Redis is back
                self._wake()

    def publish(self, room: str, payload: str) -> int | None:
        """Publish to the room's channel: how many processes received it, None on failure."""
        try:
            client = self._client()
            send = client.spublish if self._sharded(client) else client.publish
            return send(self.channel_of(room), payload)
        except redis.RedisError as exc:
            self.logger.error("Cannot publish to redis (%s)", exc)
            return None

    def _want(self, channel: str) -> None:
        if channel not in self._wanted:
            self._wanted.add(channel)
            self._dirty = True

    def _wake(self) -> bool:
        """Have the listener send what changed; False if Redis cannot be reached."""
        if self._awake:
            return True
        self._awake = True
        try:
            self._client().publish(self.wake_channel, b"")
        except redis.RedisError as exc:
            self._awake = False
            self.logger.error("Cannot reach redis to subscribe (%s)", exc)
            return False
        return True

    def _sharded(self, client: redis.Redis) -> bool:
        """Whether Redis has sharded pub/sub (7.0 and later); before, the chat channels are
        plain channels (SUBSCRIBE, PUBLISH): the same for every process of one Redis."""
        if self.sharded is None:
            try:
                version = client.info("server")["redis_version"]
            except redis.ResponseError:  # INFO disabled: assume a current Redis
                version = "7"
            self.sharded = int(version.split(".")[0]) >= 7
        return self.sharded

    def _client(self) -> redis.Redis:
        if self._publisher is None:
            # one immediate retry (a pooled connection may be stale after a Redis restart);
            # redis-py's default backs off for seconds, while events wait
            self._publisher = redis.Redis.from_url(self.url, retry=Retry(NoBackoff(), 1))
        return self._publisher

    # -- the listener (one green thread) --------------------------------------------------------

    @property
    def client_name(self) -> str:
        """The listener connection's name in Redis's CLIENT LIST, whose ``ssub`` field counts
        the chats this process listens to."""
        return f"{self.channel}:relay:{os.getpid()}"

    def listen(self) -> Iterator[bytes]:
        """Yield what is published on the global channel and on the subscribed chats'
        channels, reconnecting (and subscribing again) whenever the connection drops."""
        retry_sleep = 1
        while True:
            pubsub = None
            try:
                self._awake = True
                # no retries inside redis-py: a dropped connection must reach this loop,
                # which knows which subscriptions were confirmed and renews them all
                pubsub = redis.Redis.from_url(self.url, retry=Retry(NoBackoff(), 0),
                                              client_name=self.client_name).pubsub()
                pubsub.subscribe(self.channel, self.wake_channel)
                self._asked.clear()
                self._unanswered.clear()
                self._dirty = True
                while True:
                    while self._dirty and self.listening:
                        self._dirty = False
                        self._send_changes(pubsub)
                    self._awake = False
                    message = pubsub.get_message(timeout=None)
                    self._awake = True
                    data = self._take(message) if message else None
                    if data is not None:
                        retry_sleep = 1
                        yield data
            except Exception as exc:
                self.listening, self.away = False, True
                self._awake = False
                self._notify_all()
                self.logger.error("Cannot receive from redis; retrying in %s s (%s)",
                                  retry_sleep, exc)
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:  # the connection is gone already
                        pass
                self.sleep(retry_sleep)
                retry_sleep = min(retry_sleep * 2, MAX_RETRY_SLEEP)

    def _take(self, message: dict) -> bytes | None:
        """Note a reply; return the payload of a published message to deliver."""
        kind = message["type"]
        channel = (message["channel"] or b"").decode()
        if kind == "smessage" or (kind == "message" and channel != self.wake_channel):
            return message["data"]
        if kind == "subscribe" and channel == self.channel:
            self.listening, self.away = True, False
        elif channel in self._unanswered:  # (s)(un)subscribe of a chat
            left = self._unanswered.get(channel, 0) - 1
            if left > 0:
                self._unanswered[channel] = left
            else:
                self._unanswered.pop(channel, None)
                if channel in self._asked:
                    for event in self._waiters.get(channel, ()):
                        event.set()
        return None  # the wake channel's messages only woke the loop

    def _send_changes(self, pubsub) -> None:
        # Noted before sending: a reply can only follow its command, and confirmed() must
        # say no from the moment a command is on its way.
        add = sorted(self._wanted - self._asked)
        drop = sorted(self._asked - self._wanted)
        self._asked.update(add)
        self._asked.difference_update(drop)
        for channel in add + drop:
            self._unanswered[channel] = self._unanswered.get(channel, 0) + 1
        sharded = self._sharded(self._client())
        subscribe = pubsub.ssubscribe if sharded else pubsub.subscribe
        unsubscribe = pubsub.sunsubscribe if sharded else pubsub.unsubscribe
        for start in range(0, len(add), BATCH):
            subscribe(*add[start:start + BATCH])
        for start in range(0, len(drop), BATCH):
            unsubscribe(*drop[start:start + BATCH])

    def _notify_all(self) -> None:
        for waiters in self._waiters.values():
            for event in waiters:
                event.set()
