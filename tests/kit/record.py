"""What a client received, in order, and bounded waits on it (woken by each new event)."""
from __future__ import annotations

import threading
from typing import Any, Callable

from tests.kit.wait import wait_until


class Recorder:
    """``events``: (name, data) in the order received; ``cond`` is notified on each one."""

    #: The bound of a wait unless the caller gives one.
    timeout: float = 10

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.cond = threading.Condition()

    def record(self, name: str, data: Any) -> None:
        with self.cond:
            self.events.append((name, data))
            self.cond.notify_all()

    def named(self, name: str) -> list[Any]:
        with self.cond:
            return [data for event, data in self.events if event == name]

    def names(self) -> list[str]:
        with self.cond:
            return [event for event, _ in self.events]

    def find(self, name: str, match: Callable[[Any], bool] = lambda data: True) -> Any:
        """The first ``name`` event whose data ``match`` accepts, or None."""
        return next((data for data in self.named(name) if match(data)), None)

    def wait_until(self, predicate: Callable[[], Any], timeout: float | None = None,
                   message: str = "a condition") -> Any:
        """Wait (woken by each event received) until ``predicate()`` is truthy; return it."""
        timeout = self.timeout if timeout is None else timeout
        return wait_until(predicate, timeout, lambda: f"{message}; got {self.names()}",
                          condition=self.cond)

    def wait_for(self, name: str, count: int = 1, timeout: float | None = None) -> list[Any]:
        """Wait until ``count`` events called ``name`` arrived; return them all."""
        return self.wait_until(lambda: (self.named(name),) if len(self.named(name)) >= count
                               else None, timeout, f"{count} x {name!r}")[0]

    def wait_event(self, name: str, match: Callable[[Any], bool] = lambda data: True,
                   timeout: float | None = None) -> Any:
        """The first ``name`` event whose data ``match`` accepts (waiting for it)."""
        return self.wait_until(
            lambda: next(((data,) for data in self.named(name) if match(data)), None),
            timeout, f"a matching {name!r}")[0]
