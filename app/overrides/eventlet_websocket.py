"""eventlet: unmask websocket frames with one big-integer XOR instead of a byte at a time.

eventlet's ``RFC6455WebSocket._apply_mask`` builds a one-byte ``bytes`` object per payload
byte in a Python generator and joins them; every frame a client sends is masked (RFC 6455
section 5.3), so every incoming Socket.IO packet pays it. A py-spy profile of our worker at
1,000 messages/s across 100 chats put it at 10.8 % of the worker's CPU (bench/RESULTS.md,
"Stack costs"). ``apply_mask`` gives the same bytes for every payload, length and offset
(tests/test_stack_speedups.py compares the two with hypothesis) at a small fraction of the
cost: the payload and the mask, repeated to its length, are read as two integers and XORed.

Installed by the entry point (wsgi.py) under eventlet only; gevent serves websockets with
simple-websocket/wsproto, which already unmask this way.
"""
from __future__ import annotations

from typing import Any, Sequence

from app.overrides import Needed

#: What this override was written for: the library, its version (requirements.txt), and the
#: private names it touches, as ``module:Qualified.name`` with the parameters it relies on.
#: ``source_sha`` is the first 12 hex digits of the SHA-256 of the replaced function's source:
#: a new eventlet that changes it must be compared with ``apply_mask`` again.
EXPECTS: dict[str, Any] = {
    "library": "eventlet",
    "version": "0.41.3",
    "names": (
        {"target": "eventlet.websocket:RFC6455WebSocket._apply_mask",
         "params": ("data", "mask", "length", "offset"), "source_sha": "f6ac2b9da0f0"},
    ),
}

#: The same, as the version check of app/overrides reads it (the source's hash is checked
#: against eventlet's original by tests/test_stack_speedups.py, installed or not).
REQUIRES = (
    Needed("eventlet", "eventlet.websocket:RFC6455WebSocket._apply_mask",
           params=("data", "mask", "length", "offset")),
)

_ORIGINAL: Any = None


def apply_mask(data: bytes, mask: Sequence[int], length: int | None = None,
               offset: int = 0) -> bytes:
    """``data[:length]`` XORed with the 4-byte ``mask``, starting at mask byte ``offset % 4``
    (eventlet's ``_apply_mask``, whose arguments and results it keeps)."""
    if length is None:
        length = len(data)
    elif length > len(data):
        # eventlet's generator indexes past the end of data
        raise IndexError("mask length is beyond the data")
    if length <= 0:
        return b""
    key = bytes(mask[:4])
    turn = offset % 4
    stream = (key[turn:] + key[:turn]) * (length // 4 + 1)
    value = int.from_bytes(data[:length], "big") ^ int.from_bytes(stream[:length], "big")
    return value.to_bytes(length, "big")


def install() -> None:
    """Make eventlet's websocket (client and server side) mask and unmask with
    ``apply_mask``. Idempotent."""
    global _ORIGINAL
    from eventlet.websocket import RFC6455WebSocket

    if _ORIGINAL is None:
        _ORIGINAL = RFC6455WebSocket.__dict__["_apply_mask"]
    RFC6455WebSocket._apply_mask = staticmethod(apply_mask)


def uninstall() -> None:
    """Put eventlet's own ``_apply_mask`` back (for tests)."""
    global _ORIGINAL
    if _ORIGINAL is None:
        return
    from eventlet.websocket import RFC6455WebSocket

    RFC6455WebSocket._apply_mask = _ORIGINAL
    _ORIGINAL = None


def original_apply_mask() -> Any:
    """eventlet's own ``_apply_mask``, whether or not ``install`` has run."""
    from eventlet.websocket import RFC6455WebSocket

    found = _ORIGINAL if _ORIGINAL is not None else RFC6455WebSocket.__dict__["_apply_mask"]
    return found.__func__
