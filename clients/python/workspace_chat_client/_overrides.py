"""The client's only reach into python-socketio's and python-engineio's internals.

python-engineio's client hands each received packet to a new thread (its private
``_trigger_event`` with ``run_async=True``), so two packets may be handled out of order: a
stream's tokens could be shown shuffled. ``OrderedSocketIOClient`` hands them, and the
disconnection, to one worker thread in the order they arrived; python-socketio picks its
Engine.IO client class through its private ``_engineio_client_class``.

``VERSIONS`` is what this was written for and tested with; ``check_versions`` and
``check_requirements`` say what differs (tests/test_overrides.py fails on either).
docs/overrides.md (in the server's repository) says why, and what could go upstream.
"""
from __future__ import annotations

import inspect
import logging
import queue
import threading
from importlib import metadata
from typing import Any, List, Optional, Tuple

import engineio
import socketio
from engineio.payload import Payload

log = logging.getLogger("workspace_chat_client.client")

#: The versions this module was written for and tested with.
VERSIONS = {"python-engineio": "4.15.1", "python-socketio": "5.18.1"}

#: (library, class, name, its parameters without self) of each private name used here.
REQUIRES: Tuple[Tuple[str, type, str, Tuple[str, ...]], ...] = (
    ("python-engineio", engineio.Client, "_trigger_event", ("event", "args", "kwargs")),
    ("python-socketio", socketio.Client, "_engineio_client_class", ()),
)


class _OrderedEngineIOClient(engineio.Client):
    """python-engineio's client, handling received packets and the disconnection in one
    worker thread, in the order they arrived."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._ordered: "queue.Queue[tuple[str, tuple]]" = queue.Queue()
        self._ordered_worker: Optional[threading.Thread] = None
        self._ordered_lock = threading.Lock()

    def _trigger_event(self, event, *args, **kwargs):  # noqa: D401 - engineio's hook
        if event in ("message", "disconnect") and event in self.handlers:
            self._ordered.put((event, args))
            with self._ordered_lock:
                if self._ordered_worker is None or not self._ordered_worker.is_alive():
                    self._ordered_worker = threading.Thread(
                        target=self._run_ordered, name="chat-client-packets", daemon=True)
                    self._ordered_worker.start()
            return None
        return super()._trigger_event(event, *args, **kwargs)

    def _run_ordered(self) -> None:
        while True:
            try:
                event, args = self._ordered.get(timeout=1.0)
            except queue.Empty:
                if self.state == "disconnected":
                    return
                continue
            try:
                self.handlers[event](*args)
            except Exception:  # a handler's failure must not stop the connection's packets
                log.exception("error handling %s", event)
            if event == "disconnect" and self._ordered.empty():
                return


class OrderedSocketIOClient(socketio.Client):
    """python-socketio's Client, handling received packets in the order they arrived."""

    def _engineio_client_class(self):
        return _OrderedEngineIOClient


def allow_batched_packets(count: int) -> None:
    """Let a long-polling response carry up to ``count`` packets (python-engineio drops the
    connection past 16 by default, process-wide); never lowers the limit."""
    if Payload.max_decode_packets < count:
        Payload.max_decode_packets = count


def check_versions() -> List[str]:
    """A sentence per library whose installed version is not the one this was written for."""
    problems = []
    for library, version in VERSIONS.items():
        found = metadata.version(library)
        if found != version:
            names = ", ".join(name for lib, _, name, _ in REQUIRES if lib == library)
            problems.append(
                f"{library} is {found}, workspace_chat_client/_overrides.py was written for "
                f"{version}: re-read {names} "
                f"in {library} {found} (does it still run each received packet in a new "
                f"thread?), run tests/test_overrides.py, then update VERSIONS there")
    return problems


def check_requirements() -> List[str]:
    """What no longer holds of the private names used here (empty: all does)."""
    problems = []
    for library, cls, name, params in REQUIRES:
        method = getattr(cls, name, None)
        if method is None:
            problems.append(f"{library}: {cls.__name__}.{name} is gone")
            continue
        found = tuple(p for p in inspect.signature(method).parameters if p != "self")
        if found != params:
            problems.append(f"{library}: {cls.__name__}.{name} now takes {found}, not {params}")
    return problems
