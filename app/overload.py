"""Overload: refuse new work at once while the event loop lags, instead of answering late.

CONTRACT.md section 9: when the process cannot keep up, new messages (and REST requests) are
refused with ``server_busy`` and ``retry_after``, so that what it does accept is acknowledged
within 2 s. The signal is the event loop's own lag: a task that sleeps ``INTERVAL`` and notes
how much later than that it woke. Everything ready to run in the process ran in between, so a
lag of a second means a second of queued work ahead of any new message. Past ``limit`` the
process refuses for ``hold`` seconds, then accepts again unless the loop still lags; refusing
costs next to nothing, which is what lets the backlog drain.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from flask import current_app

from app.errors import ApiError

#: How often the monitor wakes to measure the loop's lag (seconds).
INTERVAL = 0.1


class LoopMonitor:
    """Measures the event loop's lag and says whether new work must be refused."""

    def __init__(self, sleep: Callable[[float], Any], limit: float, hold: float,
                 clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger | None = None) -> None:
        self.sleep = sleep
        self.limit = limit
        self.hold = hold
        self.clock = clock
        self.refusing_until = 0.0
        self.last_lag = 0.0
        #: When the monitor is next due to wake (None until it runs).
        self.due: float | None = None
        self.logger = logger or logging.getLogger(__name__)

    def note(self, lag: float) -> None:
        """One measurement: past ``limit``, refuse for ``hold`` seconds from now."""
        self.last_lag = lag
        if lag > self.limit:
            if self.refusing_until <= self.clock():  # not refusing yet: say why from now
                self.logger.warning("overloaded: the event loop lagged %.2f s; refusing new "
                                    "messages and requests with server_busy", lag)
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
                                       logger=current_app.logger)
        socketio.start_background_task(entry["monitor"].run)
    return entry["monitor"]


def refuse_when_overloaded() -> None:
    """Raise ``server_busy`` (with ``details.retry_after``) while the process is overloaded."""
    monitor = _monitor()
    retry_after = monitor.retry_after() if monitor is not None else None
    if retry_after is not None:
        raise ApiError("server_busy", "The server is overloaded; retry shortly.",
                       {"retry_after": retry_after})
