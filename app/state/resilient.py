"""SharedState on Redis that keeps a process serving its own clients while Redis is away."""
from __future__ import annotations

import logging
import time
from typing import ContextManager

import redis

from app.state.memory import MemoryState
from app.state.protocol import StreamProgress
from app.state.redis import RedisState

log = logging.getLogger(__name__)


class ResilientState:
    """RedisState that keeps a process serving its own clients while Redis is away.

    Each call goes to Redis; when Redis cannot be reached it goes to a MemoryState instead
    (what only this process knows: its own spent strings, connections, busy chats), and back
    to Redis as soon as Redis answers again. Strings spent during the outage stay refused.
    """

    connections_expire = True

    def __init__(self, primary: RedisState) -> None:
        self.primary = primary
        self.fallback = MemoryState()
        self.redis = primary.redis
        self.connection_lease = primary.connection_lease
        self._warned_at = 0.0

    def _call(self, name: str, *args, **kwargs):
        try:
            return getattr(self.primary, name)(*args, **kwargs)
        except redis.RedisError:
            now = time.monotonic()
            if now - self._warned_at > 10:
                self._warned_at = now
                log.warning("Redis unreachable: shared state falls back to this process")
            return getattr(self.fallback, name)(*args, **kwargs)

    def _mirror(self, name: str, *args) -> None:
        """A write this process keeps in memory anyway: Redis too, when it is there."""
        getattr(self.fallback, name)(*args)
        try:
            getattr(self.primary, name)(*args)
        except redis.RedisError:
            pass

    def spend(self, key: str, ttl: float) -> bool:
        if self.fallback.is_spent(key):
            return False
        try:
            first = self.primary.spend(key, ttl)
        except redis.RedisError:
            first = True  # not spent here, and Redis cannot say otherwise now
        self.fallback.spend(key, ttl)  # remembered here too, in case Redis goes away
        return first

    def spend_here(self, key: str, ttl: float) -> bool:
        # Only this process can spend it, so this process's memory decides, with no round
        # trip on the message's path; Redis learns it in the background, for the other
        # processes' is_spent (another connection's string is "reused" before "not yours").
        if not self.fallback.spend(key, ttl):
            return False
        self.primary.record_spent(key, ttl)  # only queues it
        return True

    def is_spent(self, key: str) -> bool:
        return self.fallback.is_spent(key) or self._call("is_spent", key)

    def acquire_connection(self, tenant_id: str, sid: str, limit: int) -> bool:
        return self._call("acquire_connection", tenant_id, sid, limit)

    def refresh_connections(self, by_tenant: dict[str, list[str]]) -> None:
        # Only Redis leases expire; the connections counted here while Redis was away stay.
        self.primary.refresh_connections(by_tenant)

    def release_connection(self, tenant_id: str, sid: str) -> None:
        self._mirror("release_connection", tenant_id, sid)

    def connection_count(self, tenant_id: str) -> int:
        return self._call("connection_count", tenant_id)

    def mark_busy(self, chat_id: str, owner: str, ttl: float) -> bool:
        return self._call("mark_busy", chat_id, owner, ttl)

    def clear_busy(self, chat_id: str, owner: str) -> None:
        self._mirror("clear_busy", chat_id, owner)

    def busy_owner(self, chat_id: str) -> str | None:
        return self._call("busy_owner", chat_id)

    def request_stop(self, chat_id: str, owner: str, ttl: float) -> None:
        self._mirror("request_stop", chat_id, owner, ttl)

    def stop_requested(self, chat_id: str, owner: str) -> bool:
        return self.fallback.stop_requested(chat_id, owner) or self._call(
            "stop_requested", chat_id, owner)

    def stream_begin(self, chat_id: str, message_id: str, reply_to: str, ttl: float) -> None:
        self._mirror("stream_begin", chat_id, message_id, reply_to, ttl)

    def stream_append(self, chat_id: str, message_id: str, token: str) -> None:
        self._mirror("stream_append", chat_id, message_id, token)

    def stream_progress(self, chat_id: str) -> StreamProgress | None:
        return self._call("stream_progress", chat_id)

    def join_reads(self, chat_id: str, spent_key: str) -> tuple[StreamProgress | None, bool]:
        # as stream_progress and is_spent: spent here (while Redis was away) or in Redis
        progress, spent = self._call("join_reads", chat_id, spent_key)
        return progress, spent or self.fallback.is_spent(spent_key)

    def stream_end(self, chat_id: str, message_id: str) -> None:
        self._mirror("stream_end", chat_id, message_id)

    def chat_lock(self, chat_id: str) -> ContextManager[None]:
        return self.primary.chat_lock(chat_id)

    def chat_lock_wait(self, chat_id: str) -> float:
        return self.primary.chat_lock_wait(chat_id)
