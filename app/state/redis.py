"""SharedState on Redis, so that many processes behave as one service."""
from __future__ import annotations

import logging
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

import redis

from app.state.memory import LocalLocks
from app.state.protocol import StreamProgress

log = logging.getLogger(__name__)


_ACQUIRE = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[2])
  return 1
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.floor(tonumber(ARGV[4]) * 1000))
return 1
"""

_CLEAR_IF_OWNER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
redis.call('DEL', KEYS[2])
return 1
"""


# The chat lock: held by a process (its token), not by one of its tasks; the process's own
# tasks take turns on a local lock first.
_LOCK = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

#: How long a process holds a chat's lock at most, and how long it waits for it at most
#: (seconds); while another process holds it, it asks again after LOCK_FIRST_WAIT seconds,
#: doubling up to LOCK_MAX_WAIT.
LOCK_TTL = 10.0
LOCK_TIMEOUT = 10.0
LOCK_FIRST_WAIT = 0.001
LOCK_MAX_WAIT = 0.05


_STREAM_APPEND = """
if redis.call('HGET', KEYS[1], 'message_id') == ARGV[1] then
  local content = redis.call('HGET', KEYS[1], 'content') or ''
  redis.call('HSET', KEYS[1], 'content', content .. ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'tokens', 1)
end
return 1
"""

_STREAM_END = """
if redis.call('HGET', KEYS[1], 'message_id') == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return 1
"""


class RedisState:
    """SharedState for several processes sharing one Redis."""

    connections_expire = True  # unless their process renews them: see refresh_connections

    def __init__(self, url: str, prefix: str = "wc:", connection_lease: float = 60.0) -> None:
        self.redis = redis.Redis.from_url(url, decode_responses=True,
                                          socket_connect_timeout=2, socket_timeout=2)
        self.prefix = prefix
        # A connection counts for this long unless its process renews the lease (every
        # third of it), so the connections of a process that dies stop counting.
        self.connection_lease = connection_lease
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._clear = self.redis.register_script(_CLEAR_IF_OWNER)
        self._append = self.redis.register_script(_STREAM_APPEND)
        self._end = self.redis.register_script(_STREAM_END)
        self._lock = self.redis.register_script(_LOCK)
        self._unlock = self.redis.register_script(_UNLOCK)
        self._local_locks = LocalLocks()
        self._lock_token = uuid.uuid4().hex  # this process's, for every chat lock it holds
        self._pending_spent: list[tuple[str, int]] = []
        self._spent_waiting = threading.Event()
        self._recorder: threading.Thread | None = None

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def spend(self, key: str, ttl: float) -> bool:
        return bool(self.redis.set(self._k("spent", key), 1, nx=True,
                                   px=max(1, int(ttl * 1000))))

    def is_spent(self, key: str) -> bool:
        return bool(self.redis.exists(self._k("spent", key)))

    def spend_here(self, key: str, ttl: float) -> bool:
        return self.spend(key, ttl)  # alone, Redis decides (ResilientState decides locally)

    def record_spent(self, key: str, ttl: float) -> None:
        """Write that ``key`` is spent, in the background: the keys spent meanwhile go in one
        pipelined round trip, off the message's path (see ResilientState.spend_here)."""
        self._pending_spent.append((self._k("spent", key), max(1, int(ttl * 1000))))
        if self._recorder is None:
            self._recorder = threading.Thread(target=self._record_spent_forever, daemon=True,
                                              name="record-spent")
            self._recorder.start()
        self._spent_waiting.set()

    def _record_spent_forever(self) -> None:
        while True:
            self._spent_waiting.wait()
            self._spent_waiting.clear()
            batch, self._pending_spent = self._pending_spent, []
            if not batch:
                continue
            try:
                with self.redis.pipeline(transaction=False) as pipe:
                    for name, ttl_ms in batch:
                        pipe.set(name, 1, nx=True, px=ttl_ms)
                    pipe.execute()
            except Exception:  # never let the recorder die (what is pending would pile up)
                # only other processes read these, to say "reused" rather than "not yours"
                # for another connection's string; this process decided already
                log.warning("%d spent message strings not recorded in Redis", len(batch),
                            exc_info=True)

    def acquire_connection(self, tenant_id: str, sid: str, limit: int) -> bool:
        return bool(self._acquire(keys=[self._k("conn", tenant_id)],
                                  args=[time.time(), sid, limit, self.connection_lease]))

    def refresh_connections(self, by_tenant: dict[str, list[str]]) -> None:
        """Renew the lease of this process's live connections."""
        expires = time.time() + self.connection_lease
        with self.redis.pipeline(transaction=False) as pipe:
            for tenant_id, sids in by_tenant.items():
                if sids:
                    # Re-added if a late renewal let them lapse: they are alive here.
                    pipe.zadd(self._k("conn", tenant_id), {sid: expires for sid in sids})
                    pipe.pexpire(self._k("conn", tenant_id), int(self.connection_lease * 1000))
            pipe.execute()

    def release_connection(self, tenant_id: str, sid: str) -> None:
        self.redis.zrem(self._k("conn", tenant_id), sid)

    def connection_count(self, tenant_id: str) -> int:
        key = self._k("conn", tenant_id)
        self.redis.zremrangebyscore(key, "-inf", time.time())
        return int(self.redis.zcard(key))

    def mark_busy(self, chat_id: str, owner: str, ttl: float) -> bool:
        return bool(self.redis.set(self._k("busy", chat_id), owner, nx=True,
                                   px=max(1, int(ttl * 1000))))

    def clear_busy(self, chat_id: str, owner: str) -> None:
        self._clear(keys=[self._k("busy", chat_id), self._k("stop", chat_id, owner)],
                    args=[owner])

    def busy_owner(self, chat_id: str) -> str | None:
        return self.redis.get(self._k("busy", chat_id))

    def request_stop(self, chat_id: str, owner: str, ttl: float) -> None:
        self.redis.set(self._k("stop", chat_id, owner), 1, px=max(1, int(ttl * 1000)))

    def stop_requested(self, chat_id: str, owner: str) -> bool:
        return bool(self.redis.exists(self._k("stop", chat_id, owner)))

    def stream_begin(self, chat_id: str, message_id: str, reply_to: str, ttl: float) -> None:
        key = self._k("stream", chat_id)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping={"message_id": message_id, "reply_to": reply_to,
                                    "content": "", "tokens": 0})
            pipe.pexpire(key, max(1, int(ttl * 1000)))
            pipe.execute()

    def stream_append(self, chat_id: str, message_id: str, token: str) -> None:
        self._append(keys=[self._k("stream", chat_id)], args=[message_id, token])

    def stream_progress(self, chat_id: str) -> StreamProgress | None:
        return self._progress(self.redis.hgetall(self._k("stream", chat_id)))

    @staticmethod
    def _progress(data: dict) -> StreamProgress | None:
        if not data:
            return None
        return StreamProgress(data["message_id"], data["reply_to"], data.get("content", ""),
                              int(data.get("tokens", 0)))

    def join_reads(self, chat_id: str, spent_key: str) -> tuple[StreamProgress | None, bool]:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._k("stream", chat_id))
            pipe.exists(self._k("spent", spent_key))
            stream, spent = pipe.execute()
        return self._progress(stream), bool(spent)

    def stream_end(self, chat_id: str, message_id: str) -> None:
        self._end(keys=[self._k("stream", chat_id)], args=[message_id])

    def chat_lock_wait(self, chat_id: str) -> float:
        return self._local_locks.expected_wait(chat_id)

    @contextmanager
    def chat_lock(self, chat_id: str) -> Iterator[None]:
        # The local lock queues this process's senders; the Redis lock orders processes.
        # The Redis lock is the process's (one token per process), so a task of this process
        # whose release was lost (a reply that timed out under load) never makes the next
        # one wait for the lock's expiry: with redis-py's per-task Lock, every later message
        # of the chat waited up to 10 s, polling every 2 ms (bench/RESULTS.md). Without Redis
        # the process keeps serving (ordered among its own clients).
        key = self._k("lock", chat_id)
        with self._local_locks.hold(chat_id):
            try:
                acquired = self._acquire_chat_lock(key)
                if not acquired:
                    log.warning("chat %s: another process held its lock for %s s; going on "
                                "without it", chat_id, LOCK_TIMEOUT)
            except redis.RedisError:
                log.warning("Redis unreachable: chat %s ordered on this process only", chat_id)
                acquired = False
            try:
                yield
            finally:
                if acquired:
                    try:
                        self._unlock(keys=[key], args=[self._lock_token])
                    except redis.RedisError:
                        pass  # it expires by itself

    def _acquire_chat_lock(self, key: str) -> bool:
        args = [self._lock_token, int(LOCK_TTL * 1000)]
        give_up = time.monotonic() + LOCK_TIMEOUT
        wait = LOCK_FIRST_WAIT
        while not self._lock(keys=[key], args=args):
            if time.monotonic() + wait > give_up:
                return False
            time.sleep(wait)
            wait = min(wait * 2, LOCK_MAX_WAIT)
        return True
