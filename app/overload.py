"""Overload: refuse new work at once while the process falls behind, instead of answering late.

CONTRACT.md section 9: when the process cannot keep up, new messages (and REST requests) are
refused with ``server_busy`` and ``retry_after``, so that what it does accept is acknowledged
within 2 s. Two signals, either of which starts refusing for ``hold`` seconds (then the
process accepts again unless it still lags); refusing costs next to nothing, which is what
lets the backlog drain:

- the event loop's own lag: a task that sleeps ``INTERVAL`` and notes how much later than
  that it woke. Everything ready to run in the process ran in between, so a lag of a second
  means a second of queued work ahead of any new message (one handler that holds the loop).
- how long accepted messages take, from the check to the ack (their *sojourn*). Work that
  waits on the network (PostgreSQL, Redis) yields at every round trip, so the loop turns fast
  while every message waits a whole round of all the others at each of its round trips: the
  lag stays low and acks still come seconds late (bench/RESULTS.md, PostgreSQL + Redis). When
  ``SLOW_STREAK`` messages in a row took longer than ``sojourn_limit``, there is a standing
  queue; one slow message among quick ones (a chat held up, a test holding a row lock) is not
  one, and a message of a quick chat in between starts the count again.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from flask import current_app

from app.errors import ApiError

#: How often the monitor wakes to measure the loop's lag (seconds).
INTERVAL = 0.1
#: How many accepted messages in a row must have been slower than the sojourn limit.
SLOW_STREAK = 2


class LoopMonitor:
    """Measures the event loop's lag and says whether new work must be refused."""

    def __init__(self, sleep: Callable[[float], Any], limit: float, hold: float,
                 clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger | None = None,
                 sojourn_limit: float | None = None) -> None:
        self.sleep = sleep
        self.limit = limit
        self.hold = hold
        self.clock = clock
        self.sojourn_limit = sojourn_limit
        #: how many accepted messages in a row were slower than ``sojourn_limit``
        self.slow_streak = 0
        self.refusing_until = 0.0
        self.last_lag = 0.0
        #: When the monitor is next due to wake (None until it runs).
        self.due: float | None = None
        self.logger = logger or logging.getLogger(__name__)

    def note(self, lag: float) -> None:
        """One measurement: past ``limit``, refuse for ``hold`` seconds from now."""
        self.last_lag = lag
        if lag > self.limit:
            self._refuse("the event loop lagged %.2f s", lag)

    def note_sojourn(self, seconds: float) -> None:
        """An accepted message took ``seconds`` from its check to its ack: past the limit
        for SLOW_STREAK messages in a row, refuse for ``hold`` seconds from now."""
        if self.sojourn_limit is None or seconds <= self.sojourn_limit:
            self.slow_streak = 0
            return
        self.slow_streak += 1
        if self.slow_streak >= SLOW_STREAK:
            self._refuse("messages in a row took %.2f s and more", self.sojourn_limit)

    def _refuse(self, why: str, seconds: float) -> None:
        if self.refusing_until <= self.clock():  # not refusing yet: say why from now
            self.logger.warning("overloaded: " + why + "; refusing new messages and requests "
                                "with server_busy", seconds)
        self.refusing_until = self.clock() + self.hold

    def run(self) -> None:
        """The monitor's loop (a background task of its own)."""
        while True:
            self.due = self.clock() + INTERVAL
            self.sleep(INTERVAL)
            self.note(self.clock() - self.due)

    def retry_after(self) -> float | None:
        """Seconds until new work is accepted again; None when it is accepted now.

        The loop may be running late right now, before the monitor itself could wake to say
        so (the work that held the loop ended, and whatever was waiting for input runs before
        the timers are looked at again): a monitor overdue by more than ``limit`` counts."""
        if self.due is not None and self.clock() - self.due > self.limit:
            self.note(self.clock() - self.due)
        remaining = self.refusing_until - self.clock()
        return round(remaining, 3) if remaining > 0 else None


def init_app(app: Any, socketio: Any) -> None:
    """Give the app its monitor, started with the first request or event that asks (only
    an event loop can lag: under ASYNC_MODE=threading there is none)."""
    app.extensions["overload"] = {"socketio": socketio, "monitor": None}


def _monitor() -> LoopMonitor | None:
    entry = current_app.extensions.get("overload")
    if entry is None:
        return None
    if entry["monitor"] is None:
        socketio = entry["socketio"]
        if socketio.async_mode not in ("eventlet", "gevent"):
            return None
        config = current_app.config
        entry["monitor"] = LoopMonitor(socketio.sleep, config["OVERLOAD_LAG_SECONDS"],
                                       config["OVERLOAD_HOLD_SECONDS"],
                                       logger=current_app.logger,
                                       sojourn_limit=config["OVERLOAD_SOJOURN_SECONDS"])
        socketio.start_background_task(entry["monitor"].run)
    return entry["monitor"]


def refuse_when_overloaded() -> None:
    """Raise ``server_busy`` (with ``details.retry_after``) while the process is overloaded."""
    monitor = _monitor()
    retry_after = monitor.retry_after() if monitor is not None else None
    if retry_after is not None:
        raise _server_busy(retry_after)


def _server_busy(retry_after: float) -> ApiError:
    return ApiError("server_busy", "The server is overloaded; retry shortly.",
                    {"retry_after": retry_after})


@contextmanager
def accepted_work(queued_seconds: float = 0.0) -> Iterator[None]:
    """Refuse with ``server_busy`` while overloaded, or when the work would wait more than
    the sojourn limit behind work queued before it (``queued_seconds``: a chat's lock with
    a queue of its senders, app/state: chat_lock_wait); otherwise time the work inside (an
    accepted message, from its checks to its ack) for the monitor's sojourn signal.

    The second refusal is per chat: one chat whose senders queue for its lock (each holding
    it for a few round trips to PostgreSQL and Redis) got acks seconds late while the
    process's other messages, in other chats, stayed quick (bench/RESULTS.md)."""
    refuse_when_overloaded()
    monitor = _monitor()
    if monitor is None:
        yield
        return
    if monitor.sojourn_limit is not None and queued_seconds > monitor.sojourn_limit:
        raise _server_busy(round(queued_seconds, 3))
    started = monitor.clock()
    try:
        yield
    finally:
        monitor.note_sojourn(monitor.clock() - started)
