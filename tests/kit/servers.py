"""The real server process: start it as a Heroku-style host would (the Procfile's release: then
web: lines) on a free loopback port, two of them sharing one database and one Redis, and look at
a running one from outside (its worker, descriptors, memory, /healthz).

The pytest fixtures that use these (``live_server``, ``rt_server``: one server per module) are
in tests/conftest.py.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import requests

from tests.kit.wait import wait_until

ROOT = Path(__file__).resolve().parent.parent.parent
BIN = Path(sys.executable).parent
ADMIN_TOKEN = "test-admin-token"
REDIS_TEST_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
REQUIRE_SERVICES = os.environ.get("REQUIRE_SERVICES") == "1"


def unavailable(message: str) -> None:
    """A service or tool the test needs is missing: fail under REQUIRE_SERVICES=1 (CI), skip
    otherwise."""
    if REQUIRE_SERVICES:
        pytest.fail(message)
    pytest.skip(message)


def service_missing(what: str, exc: Exception) -> None:
    """Fail under REQUIRE_SERVICES=1 (CI), skip otherwise."""
    unavailable(f"{what} is not reachable: {exc}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def procfile_command(kind: str) -> str:
    """The command of a Procfile line (``web`` or ``release``)."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        match = re.match(rf"^{kind}:\s*(.+)$", line)
        if match:
            return match.group(1)
    raise AssertionError(f"Procfile has no {kind}: line")


@dataclass
class LiveServer:
    url: str
    port: int
    process: subprocess.Popen
    env: dict[str, str]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def server_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLASK_", "PYTEST_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update({"SECRET_KEY": "live-secret", "ADMIN_TOKEN": ADMIN_TOKEN, "ACCESS_LOG": "0"})
    env.update(overrides)
    return env


def start_server(tmp_path: Path, **env_overrides: str) -> LiveServer:
    """Run the Procfile's release: then web: lines, as a Heroku-style host would, on a free port."""
    port = free_port()
    env = server_env(PORT=str(port), **env_overrides)
    env.setdefault("DATABASE_URL", "sqlite:///" + str(tmp_path / "live.db"))
    subprocess.run(shlex.split(procfile_command("release")), cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=120)
    log_path = tmp_path / f"server-{port}.log"
    log = open(log_path, "wb")
    process = subprocess.Popen(["bash", "-c", "exec " + procfile_command("web")], cwd=ROOT,
                               env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, 60, log_path)
    except AssertionError:
        stop_server(process)
        raise
    return LiveServer(url, port, process, env, log_path)


def wait_healthy(url: str, process: subprocess.Popen | None, timeout: float,
                 log_path: Path | None = None, interval: float = 0.1) -> None:
    """Wait until ``url``/healthz answers 200; fail at once if ``process`` exits (with its
    log). Polling: a starting process announces nothing else to wait on."""
    def log() -> str:
        return log_path.read_text(errors="replace") if log_path else ""

    def healthy() -> bool:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"server exited: {log()}")
        try:
            return requests.get(url + "/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    wait_until(healthy, timeout, lambda: f"the server at {url} to start: {log()}",
               interval=interval)


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_again(server: LiveServer) -> LiveServer:
    """Start a stopped server's web: line again on its port, database and SECRET_KEY (as a
    deploy does), appending to its log; it is not waited for."""
    log = open(server.log_path, "ab")
    process = subprocess.Popen(["bash", "-c", "exec " + procfile_command("web")], cwd=ROOT,
                               env=server.env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    return LiveServer(server.url, server.port, process, server.env, server.log_path)


def restart_server(server: LiveServer) -> LiveServer:
    """Stop the server (SIGTERM: it closes its sockets), start it again (``run_again``) and
    wait until it answers."""
    stop_server(server.process)
    restarted = run_again(server)
    try:
        wait_healthy(server.url, restarted.process, 60, server.log_path)
    except AssertionError:
        stop_server(restarted.process)
        raise
    return restarted


@contextmanager
def started_server(tmp_path: Path, **env: str) -> Iterator[LiveServer]:
    """One server process for the block, stopped at its end."""
    server = start_server(tmp_path, **env)
    try:
        yield server
    finally:
        stop_server(server.process)


def clear_redis(url: str, keys: str = "*") -> None:
    """Delete the keys matching ``keys`` in the Redis database at ``url`` (all: FLUSHDB);
    skips (fails under CI) when Redis is not reachable."""
    import redis

    try:
        store = redis.Redis.from_url(url, socket_connect_timeout=2)
        if keys == "*":
            store.flushdb()
        else:
            for key in store.scan_iter(keys):
                store.delete(key)
    except redis.RedisError as exc:
        service_missing("Redis", exc)


@contextmanager
def two_servers(tmp_path: Path, redis_keys: str = "*",
                **env: str) -> Iterator[tuple[LiveServer, LiveServer]]:
    """Two server processes sharing one database and the Redis of ``env["REDIS_URL"]`` (its
    keys matching ``redis_keys`` deleted first), both stopped at the end of the block."""
    clear_redis(env["REDIS_URL"], redis_keys)
    with started_server(tmp_path, **env) as a:
        # the same database (the second release line re-runs the migrations: a no-op)
        with started_server(tmp_path, **env) as b:
            yield a, b


# --- a running server, from outside --------------------------------------------------------

def worker_pid(server: LiveServer) -> int:
    """The gunicorn worker (the one child of the master, the Procfile's process)."""
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
    # the worker is forked after start-up: there is no event to wait on
    pids = wait_until(lambda: children.read_text().split(), 30, "a gunicorn worker",
                      interval=0.1)
    return int(pids[0])


def fd_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def healthz_latency(url: str) -> float:
    start = time.monotonic()
    assert requests.get(url + "/healthz", timeout=10).status_code == 200
    return time.monotonic() - start


def log_has(server: LiveServer, text: str, timeout: float = 10) -> str:
    """Wait until the server's log holds ``text``; return the log."""
    # the log is a file: there is no event to wait on
    return wait_until(lambda: text in server.log() and server.log(), timeout,
                      lambda: f"{text!r} in the server's log:\n{server.log()[-3000:]}")
