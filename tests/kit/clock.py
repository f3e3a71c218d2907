"""A clock a test moves by hand, for code that takes one (``clock=``)."""
from __future__ import annotations


class FakeClock:
    """``clock()`` is ``clock.now``; a test moves it with ``clock.now += seconds``."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
