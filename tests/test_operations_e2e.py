"""Operations end to end (CONTRACT.md sections 2 and 6): the real server process (the Procfile's
release: and web: lines) as an operator sees it: JSON logs with request and chat context,
Prometheus metrics after real traffic, readiness while a private Redis goes away and comes
back, and readiness on PostgreSQL.

Waits are on events (acks, received events, process exits); where no event exists (a metric
settling, a server reconnecting to Redis) a bounded retry loop polls.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests import agents
from tests.kit.agents import join
from tests.kit.rest import new_tenant
from tests.kit.servers import free_port, service_missing, start_server, stop_server
from tests.kit.sio import ChatClient, connect, refusal_code
from tests.kit.wait import wait_until

pytestmark = pytest.mark.e2e

SCRIPTED = {"kind": "python", "callable": "tests.agents:scripted"}
ECHO = {"kind": "echo"}
WAIT = 15.0


# --- helpers --------------------------------------------------------------------------------

def poll(fetch: Callable[[], Any], done: Callable[[Any], bool], timeout: float = 10.0,
         interval: float = 0.1) -> Any:
    """The first value of ``fetch()`` that is ``done``, asked every ``interval`` s.

    Only for state that has no event to wait on (a gauge, a reconnecting dependency).
    """
    return wait_until(lambda: (value,) if done(value := fetch()) else None, timeout,
                      lambda: f"{fetch} to be done; last: {fetch()!r}", interval=interval)[0]


def disconnect_all(clients: list[ChatClient]) -> None:
    for client in clients:
        try:
            client.disconnect()
        except Exception:  # a client of a stopped server; nothing left to close
            pass


def metric_samples(url: str) -> list[tuple[str, dict[str, str], float]]:
    r = requests.get(url + "/metrics", timeout=10)
    assert r.status_code == 200, r.text
    return [(s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(r.text) for s in family.samples]


def metric(samples: list[tuple[str, dict[str, str], float]], name: str,
           **labels: str) -> float | None:
    """The value of the sample ``name`` whose labels include ``labels`` (None if absent)."""
    values = [value for sample_name, sample_labels, value in samples
              if sample_name == name and all(sample_labels.get(k) == v
                                              for k, v in labels.items())]
    if not values:
        return None
    return sum(values)


def readyz(url: str) -> requests.Response:
    return requests.get(url + "/readyz", timeout=10)


def exchange(sender: ChatClient, receivers: list[ChatClient], message_string: str,
             content: str) -> str:
    """``sender`` posts ``content``; every receiver gets it as ``message_received``.

    Returns the sender's next message string.
    """
    before = {id(r): len(r.named("message_received")) for r in receivers}
    ack = sender.send(content, message_string)
    assert ack.get("ok") is True, ack
    assert ack["message"]["content"] == content
    for receiver in receivers:
        received = receiver.wait_for("message_received", count=before[id(receiver)] + 1,
                                     timeout=WAIT)
        assert content in [m["content"] for m in received], received
    return ack["next_message_string"]


class PrivateRedis:
    """A redis-server of this test alone, on a port of its own, that the test kills at will."""

    def __init__(self, binary: str, port: int, workdir: Path):
        self.binary = binary
        self.port = port
        self.workdir = workdir
        self.process: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{port}/0"

    def start(self) -> None:
        log = open(self.workdir / f"redis-{self.port}.log", "ab")
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        import redis

        def ping() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"redis-server exited: {self.log()}")
            try:
                return bool(redis.Redis(port=self.port, socket_connect_timeout=1).ping())
            except redis.RedisError:
                return False

        assert poll(ping, bool, timeout=10), f"redis-server did not start: {self.log()}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        path = self.workdir / f"redis-{self.port}.log"
        return path.read_text(errors="replace") if path.exists() else ""


# --- 1. JSON logs ---------------------------------------------------------------------------

def test_json_log_format_makes_every_line_json_with_request_and_chat_context(tmp_path):
    server = start_server(tmp_path, LOG_FORMAT="json", RATE_LIMIT_MESSAGES="1000/second",
                          PYTHON_AGENTS=agents.ALLOWED)
    clients: list[ChatClient] = []
    generated_id = None
    try:
        tenant = new_tenant(server.url)
        # a REST call with a request id of the caller's
        r = requests.get(f"{server.url}/api/v1/chats/user/ann",
                         headers={**tenant.headers, "X-Request-ID": "test-req-42"}, timeout=10)
        assert r.status_code == 200, r.text
        assert r.headers.get("X-Request-ID") == "test-req-42"
        # a REST call without one gets a generated id
        r = requests.get(f"{server.url}/api/v1/workspaces/user/ann", headers=tenant.headers,
                         timeout=10)
        assert r.status_code == 200, r.text
        generated_id = r.headers.get("X-Request-ID")
        assert generated_id and generated_id != "test-req-42"
        # a REST error
        r = requests.get(f"{server.url}/api/v1/chats/{uuid.uuid4()}", headers=tenant.headers,
                         timeout=10)
        assert r.status_code == 404, r.text

        workspace = tenant.workspace("ann", agent=SCRIPTED)
        chat_id = tenant.chat("ann", workspace_id=workspace)

        # a refused connection
        refused = connect(server.url, auth={"chat_id": chat_id,
                                            "connection_string": "not-a-connection-string"})
        clients.append(refused)
        assert refusal_code(refused) == "invalid_connection_string", refused.connect_error

        # a connection that sends a message (answered by the agent), then one whose reply fails
        client = join(tenant, chat_id)
        clients.append(client)
        ack = client.send("hello there", client.message_string)
        assert ack.get("ok") is True, ack
        ended = client.wait_for("message_stream_ended", timeout=WAIT)
        assert ended[-1]["finish_reason"] == "stop", ended
        ack = client.send("fail 1", ack["next_message_string"])
        assert ack.get("ok") is True, ack
        ended = client.wait_for("message_stream_ended", count=2, timeout=WAIT)
        assert ended[-1]["finish_reason"] == "error", ended
        errors = client.wait_for("error", timeout=WAIT)
        assert errors[-1]["code"] == "agent_error", errors
    finally:
        disconnect_all(clients)
        stop_server(server.process)

    log = server.log()
    records: list[dict[str, Any]] = []
    plain = []
    for line in log.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            plain.append(line)
            continue
        if not isinstance(record, dict):
            plain.append(line)
            continue
        records.append(record)
    assert not plain, "lines that are not JSON objects:\n" + "\n".join(plain[:20])
    assert records, "the server logged nothing"
    for record in records:
        assert {"time", "level", "message"} <= set(record), record

    tagged = [r for r in records if r.get("request_id") == "test-req-42"]
    assert tagged, "no log line carries request_id test-req-42:\n" + log
    assert any(r.get("path") == "/api/v1/chats/user/ann" and r.get("status") == 200
               for r in tagged), tagged
    generated = [r for r in records if r.get("request_id") == generated_id]
    assert any(r.get("path") == "/api/v1/workspaces/user/ann" for r in generated), generated
    assert any(r.get("status") == 404 for r in records if "path" in r), "no 404 access line"

    # what the app logs during a chat's socket events and replies names the tenant and chat
    failure = [r for r in records if "exception" in r and "scripted failure" in r["exception"]]
    assert failure, "the agent's failure was not logged with its exception:\n" + log
    for record in failure:
        assert record.get("chat_id") == chat_id, record
        assert record.get("tenant_id") == tenant.id, record
        assert record["level"] == "error", record
    socket_lines = [r for r in records if r.get("sid") and r.get("event") not in (None, "connect")]
    for record in socket_lines:
        assert record.get("chat_id") and record.get("tenant_id"), record


# --- 2. metrics -----------------------------------------------------------------------------

def test_metrics_count_connections_messages_errors_and_agent_replies_after_traffic(tmp_path):
    server = start_server(tmp_path, RATE_LIMIT_MESSAGES="1000/second")
    clients: list[ChatClient] = []
    try:
        tenant = new_tenant(server.url)
        workspace = tenant.workspace("ann", members=("bob",), agent=ECHO)
        chat_id = tenant.chat("ann", workspace_id=workspace)
        ann = join(tenant, chat_id, "ann")
        clients.append(ann)
        bob = join(tenant, chat_id, "bob")
        clients.append(bob)

        samples = poll(lambda: metric_samples(server.url),
                       lambda s: metric(s, "workspace_chat_socket_connections") == 2)
        assert metric(samples, "workspace_chat_socket_connections") == 2, samples

        string = ann.message_string
        for index in range(3):
            string = exchange(ann, [bob], string, f"message {index}")
            ended = ann.wait_for("message_stream_ended", count=index + 1, timeout=WAIT)
            assert ended[-1]["finish_reason"] == "stop", ended
        # a message error: empty content
        ack = ann.send("   ", string)
        assert ack.get("ok") is False and ack["error"]["code"] == "validation_error", ack

        samples = metric_samples(server.url)
        assert metric(samples, "workspace_chat_socket_connections") == 2, samples
        assert (metric(samples, "workspace_chat_messages_total") or 0) >= 3, samples
        assert (metric(samples, "workspace_chat_errors_total", code="validation_error",
                       transport="socketio") or 0) >= 1, samples
        assert (metric(samples, "workspace_chat_agent_replies_total", kind="echo",
                       finish_reason="stop") or 0) >= 1, samples
        assert (metric(samples, "workspace_chat_message_seconds_count") or 0) >= 3, samples
        assert metric(samples, "workspace_chat_http_requests_total") is not None, samples

        disconnect_all(clients)
        samples = poll(lambda: metric_samples(server.url),
                       lambda s: metric(s, "workspace_chat_socket_connections") == 0)
        assert metric(samples, "workspace_chat_socket_connections") == 0, samples
    finally:
        disconnect_all(clients)
        stop_server(server.process)


# --- 3. a Redis outage ----------------------------------------------------------------------

def test_redis_outage_makes_readyz_503_while_the_process_keeps_serving_its_clients(tmp_path):
    binary = shutil.which("redis-server")
    if binary is None:
        service_missing("redis-server", FileNotFoundError("redis-server is not on PATH"))
    redis_server = PrivateRedis(binary, free_port(), tmp_path)
    server = None
    clients: list[ChatClient] = []
    try:
        redis_server.start()
        server = start_server(tmp_path, REDIS_URL=redis_server.url,
                              RATE_LIMIT_MESSAGES="1000/second")
        tenant = new_tenant(server.url)
        workspace = tenant.workspace("ann", members=("bob", "cid"))
        chat_id = tenant.chat("ann", workspace_id=workspace)
        # fetched while everything is up; a connection string is not single-use
        cid_string = tenant.connection_string(chat_id, "cid")
        ann = join(tenant, chat_id, "ann")
        clients.append(ann)
        bob = join(tenant, chat_id, "bob")
        clients.append(bob)

        ann_string = exchange(ann, [ann, bob], ann.message_string, "before the outage")
        r = readyz(server.url)
        assert r.status_code == 200, r.text
        assert r.json()["checks"]["redis"] == "ok", r.json()

        redis_server.stop()

        r = readyz(server.url)
        assert r.status_code == 503, r.text
        assert r.json()["checks"]["redis"] == "unavailable", r.json()
        assert r.json()["checks"]["database"] == "ok", r.json()

        # the process keeps serving its own clients, both ways
        ann_string = exchange(ann, [bob], ann_string, "during the outage from ann")
        bob_string = exchange(bob, [ann], bob.message_string, "during the outage from bob")

        # a new connection is still accepted (counted on this process)
        cid = connect(server.url, auth={"chat_id": chat_id, "connection_string": cid_string})
        clients.append(cid)
        assert cid.connect_error is None, cid.connect_error
        cid.wait_for("connection_established", timeout=WAIT)
        ann_string = exchange(ann, [bob, cid], ann_string, "to the newcomer during the outage")

        redis_server.start()

        r = poll(lambda: readyz(server.url), lambda resp: resp.status_code == 200, timeout=20)
        assert r.status_code == 200, r.text
        assert r.json()["checks"] == {"database": "ok", "redis": "ok"}, r.json()

        ann_string = exchange(ann, [bob, cid], ann_string, "after the outage from ann")
        exchange(bob, [ann, cid], bob_string, "after the outage from bob")
    finally:
        disconnect_all(clients)
        if server is not None:
            stop_server(server.process)
        redis_server.stop()


# --- 4. readiness on PostgreSQL -------------------------------------------------------------

@pytest.mark.postgres
def test_readyz_reports_the_postgresql_database_ok(tmp_path, pg_database_factory):
    database_url = pg_database_factory()
    server = start_server(tmp_path, DATABASE_URL=database_url)
    try:
        r = readyz(server.url)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "ok", body
        assert body["checks"]["database"] == "ok", body
    finally:
        stop_server(server.process)


@pytest.mark.parametrize("async_mode", ["eventlet", "gevent"])
def test_sigterm_after_many_clients_left_at_once_lets_the_worker_exit_on_its_own(
        tmp_path, async_mode):
    # Under eventlet a WebSocket request could outlive its socket (closed under its reader,
    # which then never woke): gunicorn waited for it through the whole grace period and then
    # killed the worker, in about half such shutdowns. A worker that exits on its own logs
    # "Worker exiting"; one killed at the end of the grace period cannot.
    import os
    import signal
    import threading

    server = start_server(tmp_path, ASYNC_MODE=async_mode, MAX_CONNECTIONS_PER_TENANT="1000",
                          GRACEFUL_TIMEOUT="25")
    try:
        tenant = new_tenant(server.url)
        chat = tenant.chat("ann")
        for _ in range(2):
            clients = [connect(server.url, {"chat_id": chat, "api_key": tenant.key,
                                            "user_id": "ann"}) for _ in range(20)]
            for client in clients:
                client.wait_for("connection_established")
            leaving = [threading.Thread(target=client.disconnect) for client in clients]
            for thread in leaving:
                thread.start()
            for thread in leaving:
                thread.join()
        os.killpg(server.process.pid, signal.SIGTERM)
        server.process.wait(timeout=60)
    finally:
        stop_server(server.process)
    log = server.log()
    assert "Worker exiting" in log and "SIGKILL" not in log, \
        f"the worker was killed at the end of the grace period:\n{log}"
    assert "Traceback" not in log
