"""The /ws/chat socket: a simple-websocket server read on our own terms
(app/overrides/simple_websocket.py), and the rate at which one connection's messages are read.

Nothing is read until the route asks for the next message; the route waits for a token of
this connection's ``TokenBucket`` between messages, so a flood waits in the client's TCP
buffers (back-pressure) instead of in the process.
"""
from __future__ import annotations

import time

from app.overrides.simple_websocket import PlainSocket

__all__ = ["PlainSocket", "TokenBucket"]


class TokenBucket:
    """``rate`` tokens a second, up to ``burst`` saved."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> float:
        """Take a token: 0 when one was there, else the seconds until one is."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate
