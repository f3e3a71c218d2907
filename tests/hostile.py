"""Helpers for the hostile-client tests: the worker process, its descriptors and memory, raw
HTTP on a socket, and bounded waits."""
from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import requests

from tests.conftest import LiveServer


def worker_pid(server: LiveServer) -> int:
    """The gunicorn worker (the one child of the master, the Procfile's process)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
        pids = children.read_text().split()
        if pids:
            return int(pids[0])
        time.sleep(0.1)  # the worker is forked after start-up: there is no event to wait on
    raise AssertionError("no gunicorn worker")


def fd_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def wait_until(condition: Callable[[], bool], timeout: float, what: str,
               step: float = 0.1) -> None:
    """Poll ``condition`` (bounded in time) until true; fail with ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(step)  # polling a condition of another process
    raise AssertionError(f"waited {timeout}s for {what}")


def healthz_latency(url: str) -> float:
    start = time.monotonic()
    assert requests.get(url + "/healthz", timeout=10).status_code == 200
    return time.monotonic() - start


def polling_session(url: str) -> str:
    """An Engine.IO long-polling session's id (the handshake only)."""
    r = requests.get(url + "/socket.io/", params={"EIO": "4", "transport": "polling"},
                     timeout=10)
    assert r.status_code == 200 and r.text.startswith("0{"), r.text
    import json
    return json.loads(r.text[1:])["sid"]


def raw_connection(url: str, timeout: float = 10) -> socket.socket:
    parsed = urlparse(url)
    return socket.create_connection((parsed.hostname, parsed.port), timeout=timeout)


def read_response(sock: socket.socket, timeout: float) -> tuple[int, bytes, bool]:
    """(status, everything read, whether the server then closed the connection)."""
    sock.settimeout(timeout)
    data = b""
    closed = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
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
