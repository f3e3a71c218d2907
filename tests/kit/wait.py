"""The one bounded wait of the suite: ``wait_until``."""
from __future__ import annotations

import threading
import time
from contextlib import nullcontext
from typing import Callable, TypeVar

T = TypeVar("T")

#: How often a condition that no event announces (another process, a file, a clock) is asked.
POLL_INTERVAL = 0.05


def wait_until(predicate: Callable[[], T], timeout: float = 10, message: str = "a condition",
               condition: threading.Condition | None = None,
               interval: float = POLL_INTERVAL) -> T:
    """Wait until ``predicate()`` is truthy and return its value; fail after ``timeout`` s.

    With ``condition`` (held while ``predicate`` runs), the wait wakes when the condition is
    notified, as a client recording events does: event-driven. Without one, ``predicate`` is
    asked every ``interval`` seconds: for what no event announces (another process's state, a
    log file, a clock). ``message`` (or a callable giving it) says what was waited for.
    """
    deadline = time.monotonic() + timeout

    def pause(remaining: float) -> None:
        if condition is not None:
            condition.wait(remaining)  # woken by each notify
        else:
            time.sleep(min(interval, remaining))  # polling: no event announces this

    with condition if condition is not None else nullcontext():
        while True:
            value = predicate()
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            pause(remaining)
    text = message() if callable(message) else message
    raise AssertionError(f"waited {timeout}s for {text}")
