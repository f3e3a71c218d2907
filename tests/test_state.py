"""The shared runtime state: one behaviour, in memory and on a real Redis."""
import time
import uuid

import pytest

from app.state.memory import MemoryState
from tests.conftest import REDIS_TEST_URL, service_missing


def _redis_state(prefix: str):
    """A RedisState on the test Redis under ``prefix`` (the test fails or skips without it)."""
    import redis

    from app.state.redis import RedisState

    state = RedisState(REDIS_TEST_URL, prefix=prefix)
    try:
        state.redis.ping()
    except redis.RedisError as exc:
        service_missing("Redis", exc)
    return state


@pytest.fixture(params=["memory", "redis"])
def state(request):
    if request.param == "memory":
        yield MemoryState()
        return
    prefix = f"wc-test-{uuid.uuid4().hex[:8]}:"
    state = _redis_state(prefix)
    yield state
    keys = list(state.redis.scan_iter(prefix + "*"))
    if keys:
        state.redis.delete(*keys)


def test_a_key_can_be_spent_only_once(state):
    assert state.spend("k1", 60) is True
    assert state.spend("k1", 60) is False
    assert state.is_spent("k1") and not state.is_spent("k2")


def test_connections_are_counted_per_tenant_up_to_the_limit(state):
    assert all(state.acquire_connection("t1", f"s{i}", 3) for i in range(3))
    assert state.acquire_connection("t1", "s3", 3) is False
    assert state.acquire_connection("t2", "s0", 3) is True  # another tenant is unaffected
    assert state.acquire_connection("t1", "s1", 3) is True  # the same sid again is no new one
    assert state.connection_count("t1") == 3
    state.release_connection("t1", "s0")
    state.release_connection("t1", "s0")  # idempotent
    assert state.connection_count("t1") == 2
    assert state.acquire_connection("t1", "s3", 3) is True


def test_busy_chat_has_one_owner_and_only_the_owner_frees_it(state):
    assert state.busy_owner("c1") is None
    assert state.mark_busy("c1", "reply-1", 60) is True
    assert state.mark_busy("c1", "reply-2", 60) is False
    state.clear_busy("c1", "reply-2")
    assert state.busy_owner("c1") == "reply-1"
    state.clear_busy("c1", "reply-1")
    assert state.busy_owner("c1") is None


def test_stop_signal_reaches_only_the_reply_it_names(state):
    state.mark_busy("c1", "reply-1", 60)
    assert state.stop_requested("c1", "reply-1") is False
    state.request_stop("c1", "reply-1", 60)
    assert state.stop_requested("c1", "reply-1") is True
    assert state.stop_requested("c1", "reply-2") is False
    state.clear_busy("c1", "reply-1")
    assert state.stop_requested("c1", "reply-1") is False


def test_redis_connection_lease_renewal_keeps_live_connections_counted():
    import redis

    from app.state.redis import RedisState

    state = RedisState(REDIS_TEST_URL, prefix=f"wc-test-{uuid.uuid4().hex[:8]}:")
    try:
        state.redis.ping()
    except redis.RedisError as exc:
        service_missing("Redis", exc)
    try:
        assert state.acquire_connection("t", "live", 5)
        assert state.acquire_connection("t", "dead", 5)
        # Age both leases into the past, then renew only the live one, as a process does.
        key = state._k("conn", "t")
        state.redis.zadd(key, {"live": 1, "dead": 1})
        state.refresh_connections({"t": ["live"]})
        assert state.connection_count("t") == 1
    finally:
        keys = list(state.redis.scan_iter(state.prefix + "*"))
        if keys:
            state.redis.delete(*keys)


def test_stream_progress_holds_the_tokens_so_far_of_the_named_reply(state):
    assert state.stream_progress("c1") is None
    state.stream_begin("c1", "41", "40", ttl=60)
    state.stream_append("c1", "41", "Hel")
    state.stream_append("c1", "41", "lo")
    state.stream_append("c1", "99", "ignored: another reply")
    progress = state.stream_progress("c1")
    assert (progress.message_id, progress.reply_to, progress.content, progress.tokens) == (
        "41", "40", "Hello", 2)
    state.stream_end("c1", "99")  # not the streaming reply: nothing happens
    assert state.stream_progress("c1") is not None
    state.stream_end("c1", "41")
    assert state.stream_progress("c1") is None


def test_join_reads_are_the_stream_progress_and_whether_a_key_is_spent(state):
    assert state.join_reads("c1", "slow") == (None, False)
    state.stream_begin("c1", "41", "40", ttl=60)
    state.stream_append("c1", "41", "Hel")
    state.spend("slow", 60)
    assert state.join_reads("c1", "slow") == (state.stream_progress("c1"), True)
    assert state.join_reads("c1", "slow")[0].content == "Hel"
    assert state.join_reads("c2", "other") == (None, False)


def test_without_redis_the_resilient_state_keeps_serving_from_this_process():
    from app.state.redis import RedisState
    from app.state.resilient import ResilientState

    # Nothing listens on port 1: every Redis call fails at once.
    state = ResilientState(RedisState("redis://127.0.0.1:1/0"))
    assert state.spend("k", 60) is True and state.spend("k", 60) is False
    assert state.acquire_connection("t", "s1", 1) is True
    assert state.acquire_connection("t", "s2", 1) is False
    assert state.mark_busy("c", "r1", 60) and state.busy_owner("c") == "r1"
    state.request_stop("c", "r1", 60)
    assert state.stop_requested("c", "r1")
    state.stream_begin("c", "9", "8", 60)
    state.stream_append("c", "9", "x")
    assert state.stream_progress("c").content == "x"
    state.spend("slow", 60)
    progress, slow = state.join_reads("c", "slow")
    assert progress.content == "x" and slow is True
    with state.chat_lock("c"):
        pass


def test_a_string_spent_while_redis_was_away_stays_spent_when_it_returns():
    from app.state.resilient import ResilientState

    primary = _redis_state(f"wc-test-{uuid.uuid4().hex[:8]}:")
    resilient = ResilientState(primary)
    resilient.fallback.spend("spent-offline", 60)  # as during an outage
    assert resilient.spend("spent-offline", 60) is False
    assert resilient.is_spent("spent-offline")
    assert resilient.join_reads("no-chat", "spent-offline") == (None, True)
    assert resilient.spend("fresh", 60) is True and resilient.spend("fresh", 60) is False


def test_a_chat_lock_left_behind_by_this_process_does_not_hold_up_its_next_message():
    """A task whose release was lost (its reply timed out under load) leaves the chat's
    key set: the process's next task takes the lock at once instead of waiting for it to
    expire, while another process still waits (the lock is the process's)."""
    import threading

    prefix = f"wc-test-{uuid.uuid4().hex[:8]}:"
    one, other = _redis_state(prefix), _redis_state(prefix)
    key = one._k("lock", "c")
    one.redis.set(key, one._lock_token, px=10_000)  # as a lost release leaves it
    started = time.monotonic()
    with one.chat_lock("c"):
        assert time.monotonic() - started < 1  # no wait for the 10 s expiry
        entered = threading.Event()
        held = other.chat_lock("c")  # kept: a context manager collected would release
        waiter = threading.Thread(target=lambda: held.__enter__() or entered.set(),
                                  daemon=True)
        waiter.start()
        assert not entered.wait(0.3)  # another process waits while this one holds it
    assert entered.wait(5)  # and goes on once it is released
    assert one.redis.get(key) == other._lock_token
    held.__exit__(None, None, None)
    assert one.redis.get(key) is None


def test_a_key_spent_here_is_decided_at_once_and_reaches_the_other_processes():
    """ResilientState.spend_here: this process's memory decides (no round trip); Redis is
    told in the background, so another process's is_spent sees it."""
    from app.state.resilient import ResilientState
    from tests.kit.wait import wait_until

    prefix = f"wc-test-{uuid.uuid4().hex[:8]}:"
    here, there = ResilientState(_redis_state(prefix)), ResilientState(_redis_state(prefix))
    keys = [f"string-{n}" for n in range(50)]
    assert all(here.spend_here(key, 60) for key in keys)
    assert not any(here.spend_here(key, 60) for key in keys)  # single use
    wait_until(lambda: all(there.is_spent(key) for key in keys), 10,
               "the other process to see the strings spent")
    assert not there.is_spent("string-never")


def test_spending_here_goes_on_while_redis_is_away():
    from app.state.redis import RedisState
    from app.state.resilient import ResilientState

    away = ResilientState(RedisState("redis://127.0.0.1:1/0"))
    assert away.spend_here("k", 60) is True
    assert away.spend_here("k", 60) is False
    assert away.is_spent("k")


def test_the_expected_wait_for_a_lock_is_its_queue_times_the_recent_hold_time():
    import threading

    from app.state.memory import LocalLocks
    from tests.kit.wait import wait_until

    locks = LocalLocks()
    assert locks.expected_wait("c") == 0.0
    with locks.hold("c"):
        pass
    assert locks.hold_seconds > 0  # measured
    release = threading.Event()

    def holder():
        with locks.hold("c"):
            release.wait(10)

    threads = [threading.Thread(target=holder, daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    wait_until(lambda: locks._locks["c"].queued == 3, 5, "one holder and two waiters")
    locks.hold_seconds = 0.2
    assert locks.expected_wait("c") == pytest.approx(0.6)
    assert locks.expected_wait("other") == 0.0
    release.set()
    for thread in threads:
        thread.join(5)
    assert locks.expected_wait("c") == 0.0


def _protocol_members():
    from app.state import SharedState

    methods = {name: value for name, value in vars(SharedState).items()
               if callable(value) and not name.startswith("_")}
    return methods, SharedState.__annotations__


@pytest.mark.parametrize("implementation", ["MemoryState", "RedisState", "ResilientState"])
def test_every_implementation_has_the_whole_protocol_with_its_signatures(implementation):
    import inspect

    from app.state.redis import RedisState
    from app.state.resilient import ResilientState

    cls = {"MemoryState": MemoryState, "RedisState": RedisState,
           "ResilientState": ResilientState}[implementation]
    methods, attributes = _protocol_members()
    assert {"refresh_connections", "spend", "chat_lock"} <= methods.keys()
    for name, method in methods.items():
        assert callable(getattr(cls, name, None)), f"{implementation}.{name} is missing"
        wanted = [(p.name, p.kind) for p in inspect.signature(method).parameters.values()]
        given = [(p.name, p.kind) for p in inspect.signature(getattr(cls, name)).parameters.values()]
        assert given == wanted, f"{implementation}.{name}{given} is not {wanted}"
    # Attributes are set on the instance (nothing here connects: redis-py connects lazily).
    instance = (MemoryState(connection_lease=7) if cls is MemoryState else
                RedisState("redis://127.0.0.1:1/0", connection_lease=7) if cls is RedisState
                else ResilientState(RedisState("redis://127.0.0.1:1/0", connection_lease=7)))
    assert set(attributes) == {"connection_lease", "connections_expire"}
    assert instance.connection_lease == 7
    assert instance.connections_expire is (cls is not MemoryState)


def test_create_state_picks_memory_without_redis_and_the_resilient_redis_state_with_it():
    from app.state import create_state
    from app.state.resilient import ResilientState

    memory = create_state(None, connection_lease=9)
    assert isinstance(memory, MemoryState) and memory.connection_lease == 9
    on_redis = create_state("redis://127.0.0.1:1/0", connection_lease=9)
    assert isinstance(on_redis, ResilientState) and on_redis.connection_lease == 9


def test_renewing_connections_in_memory_changes_no_count():
    state = MemoryState()
    assert state.acquire_connection("t", "s1", 2) and state.acquire_connection("t", "s2", 2)
    state.release_connection("t", "s2")
    state.refresh_connections({"t": ["s1", "s2"], "other": ["s9"], "empty": []})
    assert state.connection_count("t") == 1  # s2 stays released
    assert state.connection_count("other") == 0  # a renewal counts nothing new
    assert state.acquire_connection("t", "s3", 2) is True
    assert state.acquire_connection("t", "s4", 2) is False
