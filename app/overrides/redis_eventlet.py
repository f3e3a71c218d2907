"""redis-py under eventlet: check a pooled connection for unread data without a trip
through the event loop.

redis-py checks every connection it takes from its pool for unread data
(``ConnectionPool.get_connection`` -> ``can_read(timeout=0)`` -> the hiredis parser's
``_socket_can_read``). It uses ``select.poll`` when the module has it; eventlet's
``monkey_patch`` removes ``select.poll`` (it cannot make it green), so redis-py falls back to
``selectors.DefaultSelector``, which eventlet makes green: a check that must not wait at all
hands control to the event loop and waits for its next turn. Every Redis command paid it,
about 15 % of the worker's CPU in ``bench/run.py --scenario many --database postgresql``
(bench/RESULTS.md), and a turn of the loop of latency.

``install`` gives the hiredis parser a ``_socket_can_read`` that answers a zero-timeout check
with the original (blocking-capable, here never blocking) ``poll`` and leaves a real wait (a
timeout above zero, as pub/sub's ``get_message(timeout=...)`` asks) to redis-py's own green
path. Installed by the entry point (wsgi.py) under eventlet only.
"""
from __future__ import annotations

from typing import Any

from app.overrides import Needed

REQUIRES = (
    Needed("redis", "redis._parsers.hiredis:_socket_can_read", params=("sock", "timeout")),
)

_ORIGINAL: Any = None


def install() -> None:
    """Make redis-py's hiredis parser check readiness without yielding when asked for no
    wait. Idempotent; does nothing without hiredis."""
    global _ORIGINAL
    try:
        from redis._parsers import hiredis as parser
    except ImportError:  # pragma: no cover - redis is a requirement
        return
    if _ORIGINAL is not None:
        return
    from eventlet.patcher import original

    real_select = original("select")
    green_can_read = parser._socket_can_read

    def socket_can_read(sock: Any, timeout: float | None) -> bool:
        if timeout == 0:  # a check, not a wait: the kernel answers at once
            poller = real_select.poll()
            poller.register(sock.fileno(), real_select.POLLIN)
            return bool(poller.poll(0))
        return green_can_read(sock, timeout)

    _ORIGINAL = green_can_read
    parser._socket_can_read = socket_can_read


def uninstall() -> None:
    """Put redis-py's own check back (for tests)."""
    global _ORIGINAL
    if _ORIGINAL is None:
        return
    from redis._parsers import hiredis as parser

    parser._socket_can_read = _ORIGINAL
    _ORIGINAL = None
