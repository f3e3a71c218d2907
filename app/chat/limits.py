"""Per-connection rate windows: messages, requested message strings and typing.

A connection lives in one process, so its windows do too (no shared storage needed).
"""
from __future__ import annotations

import time
from collections import deque

from flask import current_app
from limits import parse as parse_limit

#: The windows each connection may have; all are forgotten when it ends.
WINDOWS = ("message", "message_string", "typing")

class MessageRate:
    """The per-connection message rate (RATE_LIMIT_MESSAGES, a moving window).

    A connection lives in one process, so its window does too: a deque of the times of its
    last messages. (limits' MemoryStorage, used here before, runs a timer thread every 10 ms
    that walks every connection's window; under eventlet that was a green thread per tick
    and a walk over 5,000 keys, measured in bench/RESULTS.md.)
    """

    def __init__(self, limit: str) -> None:
        item = parse_limit(limit)
        self.amount, self.seconds = item.amount, item.get_expiry()
        self.windows: dict[str, deque] = {}

    def hit(self, key: str) -> float | None:
        """Count a message; None when allowed, else seconds until one more is."""
        now = time.monotonic()
        window = self.windows.get(key)
        if window is None:
            window = self.windows[key] = deque(maxlen=self.amount)
        if len(window) == self.amount and now - window[0] < self.seconds:
            return round(self.seconds - (now - window[0]), 3)
        window.append(now)
        return None

    def undo(self, key: str) -> None:
        """Take back the connection's last counted message (it was a retry)."""
        window = self.windows.get(key)
        if window:
            window.pop()

    def forget(self, key: str) -> None:
        self.windows.pop(key, None)


#: How often one connection's ``typing`` events are relayed; the rest are dropped silently.
TYPING_RATE = "2/second"


def connection_rate(name: str, limit_setting: str | None = None,
                     limit: str | None = None) -> MessageRate:
    """The process's per-connection window ``name`` (like the message window, a connection
    lives in one process): its limit is the setting ``limit_setting``, or ``limit``."""
    key = f"chat_{name}_rate"
    rate = current_app.extensions.get(key)
    if rate is None:
        rate = current_app.extensions[key] = MessageRate(
            current_app.config[limit_setting] if limit_setting else limit)
    return rate


def message_rate() -> MessageRate:
    return connection_rate("message", "RATE_LIMIT_MESSAGES")


def forget_connection(sid: str) -> None:
    """Drop an ended connection's windows."""
    for name in WINDOWS:
        rate = current_app.extensions.get(f"chat_{name}_rate")
        if rate is not None:
            rate.forget(sid)
