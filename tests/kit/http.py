"""Raw HTTP on a socket, for requests no HTTP library would send (slow, partial, oversized)."""
from __future__ import annotations

import socket
import time
from urllib.parse import urlparse


def raw_connection(url: str, timeout: float = 10) -> socket.socket:
    parsed = urlparse(url)
    return socket.create_connection((parsed.hostname, parsed.port), timeout=timeout)


def read_response(sock: socket.socket, timeout: float) -> tuple[int, bytes, bool]:
    """(status, everything read, whether the server then closed the connection)."""
    sock.settimeout(timeout)
    data = b""
    closed = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # each recv is bounded by the socket's timeout
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        data += chunk
    assert data.startswith(b"HTTP/1."), data[:200]
    return int(data.split(b" ", 2)[1]), data, closed
