"""SharedState for a single process, and the per-name locks every implementation uses."""
from __future__ import annotations

import heapq
import threading
import time
import weakref
from contextlib import contextmanager
from typing import ContextManager, Iterator

from app.state.protocol import StreamProgress


class _Lock:
    __slots__ = ("lock", "queued", "__weakref__")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queued = 0  # tasks holding it or waiting for it


class LocalLocks:
    """One lock per name, forgotten when nobody holds or waits for it; and how long the
    tasks queued for a name can expect to wait (queue length x the recent hold time)."""

    #: weight of the newest hold time in the moving average
    SMOOTHING = 0.1

    def __init__(self) -> None:
        self._locks: "weakref.WeakValueDictionary[str, _Lock]" = weakref.WeakValueDictionary()
        self._guard = threading.Lock()
        self.hold_seconds = 0.0  # moving average of how long a holder keeps a lock

    @contextmanager
    def hold(self, name: str) -> Iterator[None]:
        with self._guard:
            lock = self._locks.get(name)
            if lock is None:
                lock = self._locks[name] = _Lock()
            lock.queued += 1
        try:
            with lock.lock:
                started = time.monotonic()
                try:
                    yield
                finally:
                    held = time.monotonic() - started
                    self.hold_seconds += self.SMOOTHING * (held - self.hold_seconds)
        finally:
            lock.queued -= 1

    def expected_wait(self, name: str) -> float:
        """About how long a task that queues for ``name`` now would wait for it."""
        lock = self._locks.get(name)
        return lock.queued * self.hold_seconds if lock is not None else 0.0


class MemoryState:
    """SharedState for a single process (green threads or OS threads alike)."""

    connections_expire = False  # a connection counts until it is released

    def __init__(self, connection_lease: float = 60.0) -> None:
        self.connection_lease = connection_lease
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

    def spend_here(self, key: str, ttl: float) -> bool:
        return self.spend(key, ttl)

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

    def refresh_connections(self, by_tenant: dict[str, list[str]]) -> None:
        """Nothing to renew: in one process a connection counts until it is released, and a
        renewal never counts a connection again once it has been released."""

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

    def join_reads(self, chat_id: str, spent_key: str) -> tuple[StreamProgress | None, bool]:
        return self.stream_progress(chat_id), self.is_spent(spent_key)

    def stream_end(self, chat_id: str, message_id: str) -> None:
        with self._lock:
            stream = self._streams.get(chat_id)
            if stream is not None and stream[0] == message_id:
                del self._streams[chat_id]

    def chat_lock(self, chat_id: str) -> ContextManager[None]:
        return self._chat_locks.hold(chat_id)

    def chat_lock_wait(self, chat_id: str) -> float:
        return self._chat_locks.expected_wait(chat_id)
