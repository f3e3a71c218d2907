"""Shared runtime state behind one small interface: in memory for one process, Redis for many.

What lives here is what every process serving a tenant must agree on: spent message strings,
connection counts per tenant, busy chats (an agent reply streaming) and stop signals.
"""
from __future__ import annotations

import heapq
import threading
import time
from dataclasses import dataclass
import weakref
from contextlib import contextmanager
from typing import ContextManager, Iterator, Protocol


class SharedState(Protocol):
    def spend(self, key: str, ttl: float) -> bool:
        """Mark ``key`` used for ``ttl`` seconds; False if it already was."""

    def is_spent(self, key: str) -> bool:
        """Whether ``key`` has been spent (and not yet forgotten)."""

    def acquire_connection(self, tenant_id: str, sid: str, limit: int) -> bool:
        """Count a connection for a tenant unless it already has ``limit``."""

    def release_connection(self, tenant_id: str, sid: str) -> None:
        """Stop counting a connection (idempotent)."""

    def connection_count(self, tenant_id: str) -> int:
        """How many connections the tenant has open."""

    def mark_busy(self, chat_id: str, owner: str, ttl: float) -> bool:
        """Mark a chat busy (a reply is streaming) unless it already is."""

    def clear_busy(self, chat_id: str, owner: str) -> None:
        """Free a chat, if ``owner`` is the one who marked it busy."""

    def busy_owner(self, chat_id: str) -> str | None:
        """Who marked the chat busy, or None when it is free."""

    def request_stop(self, chat_id: str, owner: str, ttl: float) -> None:
        """Ask the reply ``owner`` streaming in a chat to stop."""

    def stop_requested(self, chat_id: str, owner: str) -> bool:
        """Whether someone asked the reply ``owner`` to stop."""

    def stream_begin(self, chat_id: str, message_id: str, reply_to: str, ttl: float) -> None:
        """A reply started streaming in a chat."""

    def stream_append(self, chat_id: str, message_id: str, token: str) -> None:
        """One more token of the chat's streaming reply."""

    def stream_progress(self, chat_id: str) -> StreamProgress | None:
        """The reply streaming in a chat so far, or None."""

    def stream_end(self, chat_id: str, message_id: str) -> None:
        """The chat's reply has ended."""

    def chat_lock(self, chat_id: str) -> ContextManager[None]:
        """Held while a chat's message is stored and broadcast, so that every client gets a
        chat's messages in the order of their ids."""


@dataclass(frozen=True)
class StreamProgress:
    """A streaming reply as far as it got: what a client joining mid-stream needs."""

    message_id: str
    reply_to: str
    content: str
    tokens: int


class _Lock:
    __slots__ = ("lock", "__weakref__")

    def __init__(self) -> None:
        self.lock = threading.Lock()


class LocalLocks:
    """One lock per name, forgotten when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: "weakref.WeakValueDictionary[str, _Lock]" = weakref.WeakValueDictionary()
        self._guard = threading.Lock()

    @contextmanager
    def hold(self, name: str) -> Iterator[None]:
        with self._guard:
            lock = self._locks.get(name)
            if lock is None:
                lock = self._locks[name] = _Lock()
        with lock.lock:
            yield


class MemoryState:
    """SharedState for a single process (green threads or OS threads alike)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spent: dict[str, float] = {}
        self._expiry: list[tuple[float, str]] = []
        self._connections: dict[str, set[str]] = {}
        self._busy: dict[str, tuple[str, float]] = {}
        self._stops: dict[tuple[str, str], float] = {}
        self._streams: dict[str, tuple[str, str, list[str]]] = {}
        self._chat_locks = LocalLocks()

    def _forget_expired(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            _, key = heapq.heappop(self._expiry)
            if self._spent.get(key, now + 1) <= now:
                del self._spent[key]

    def spend(self, key: str, ttl: float) -> bool:
        now = time.monotonic()
        with self._lock:
            self._forget_expired(now)
            if key in self._spent:
                return False
            self._spent[key] = now + ttl
            heapq.heappush(self._expiry, (now + ttl, key))
            return True

    def is_spent(self, key: str) -> bool:
        with self._lock:
            expires = self._spent.get(key)
            return expires is not None and expires > time.monotonic()

    def acquire_connection(self, tenant_id: str, sid: str, limit: int) -> bool:
        with self._lock:
            sids = self._connections.setdefault(tenant_id, set())
            if sid in sids:
                return True
            if len(sids) >= limit:
                return False
            sids.add(sid)
            return True

    def release_connection(self, tenant_id: str, sid: str) -> None:
        with self._lock:
            sids = self._connections.get(tenant_id)
            if sids is not None:
                sids.discard(sid)
                if not sids:
                    del self._connections[tenant_id]

    def connection_count(self, tenant_id: str) -> int:
        with self._lock:
            return len(self._connections.get(tenant_id, ()))

    def mark_busy(self, chat_id: str, owner: str, ttl: float) -> bool:
        now = time.monotonic()
        with self._lock:
            current = self._busy.get(chat_id)
            if current is not None and current[1] > now:
                return False
            self._busy[chat_id] = (owner, now + ttl)
            return True

    def clear_busy(self, chat_id: str, owner: str) -> None:
        with self._lock:
            current = self._busy.get(chat_id)
            if current is not None and current[0] == owner:
                del self._busy[chat_id]
            self._stops.pop((chat_id, owner), None)

    def busy_owner(self, chat_id: str) -> str | None:
        with self._lock:
            current = self._busy.get(chat_id)
            if current is None or current[1] <= time.monotonic():
                return None
            return current[0]

    def request_stop(self, chat_id: str, owner: str, ttl: float) -> None:
        with self._lock:
            self._stops[(chat_id, owner)] = time.monotonic() + ttl

    def stop_requested(self, chat_id: str, owner: str) -> bool:
        with self._lock:
            expires = self._stops.get((chat_id, owner))
            return expires is not None and expires > time.monotonic()


    def stream_begin(self, chat_id: str, message_id: str, reply_to: str, ttl: float) -> None:
        with self._lock:
            self._streams[chat_id] = (message_id, reply_to, [])

    def stream_append(self, chat_id: str, message_id: str, token: str) -> None:
        with self._lock:
            stream = self._streams.get(chat_id)
            if stream is not None and stream[0] == message_id:
                stream[2].append(token)

    def stream_progress(self, chat_id: str) -> StreamProgress | None:
        with self._lock:
            stream = self._streams.get(chat_id)
            if stream is None:
                return None
            return StreamProgress(stream[0], stream[1], "".join(stream[2]), len(stream[2]))

    def stream_end(self, chat_id: str, message_id: str) -> None:
        with self._lock:
            stream = self._streams.get(chat_id)
            if stream is not None and stream[0] == message_id:
                del self._streams[chat_id]

    def chat_lock(self, chat_id: str) -> ContextManager[None]:
        return self._chat_locks.hold(chat_id)


def create_state(redis_url: str | None, connection_lease: float = 60.0) -> SharedState:
    """The state implementation for this configuration."""
    if redis_url:
        from app.state_redis import RedisState, ResilientState

        return ResilientState(RedisState(redis_url, connection_lease=connection_lease))
    return MemoryState()
