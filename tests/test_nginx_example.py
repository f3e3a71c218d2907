"""The README's scale-out example, run: deploy/nginx.conf in front of two processes sharing
one PostgreSQL database and one Redis."""
import os
import re
import shutil
import signal
import subprocess

import pytest
import redis

from tests.kit.rest import new_tenant
from tests.kit.servers import (REQUIRE_SERVICES, ROOT, free_port, start_server, stop_server,
                               wait_healthy)
from tests.kit.sio import connect

pytestmark = pytest.mark.e2e

REDIS_URL = "redis://127.0.0.1:6379/10"


def _nginx() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                     else None)
    if path is None:
        if REQUIRE_SERVICES:
            pytest.fail("nginx is not installed (.ci/run installs nginx-light)")
        pytest.skip("nginx is not installed")
    return path


@pytest.fixture(scope="module")
def behind_nginx(tmp_path_factory, pg_database_factory):
    nginx = _nginx()
    redis.Redis.from_url(REDIS_URL).flushdb()
    env = {"DATABASE_URL": pg_database_factory(), "REDIS_URL": REDIS_URL,
           "GRACEFUL_TIMEOUT": "5"}
    first = start_server(tmp_path_factory.mktemp("p1"), **env)
    second = start_server(tmp_path_factory.mktemp("p2"), **env)
    prefix = tmp_path_factory.mktemp("nginx")
    prefix.chmod(0o777)
    port = free_port()
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    conf = conf.replace("server 127.0.0.1:8001;", f"server 127.0.0.1:{first.port};")
    conf = conf.replace("server 127.0.0.1:8002;", f"server 127.0.0.1:{second.port};")
    assert "listen 127.0.0.1:8080;" in conf  # never every interface, never make run's 8000
    conf = re.sub(r"listen 127\.0\.0\.1:8080;", f"listen 127.0.0.1:{port};", conf)
    (prefix / "nginx.conf").write_text(conf)
    proxy = subprocess.Popen([nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                              "-g", "daemon off;"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(url, proxy, 20)
        except AssertionError as exc:
            output = proxy.stdout.read() if proxy.poll() is not None else b""
            raise AssertionError(f"nginx did not come up: {exc} {output!r}") from None
        yield url, first, second
    finally:
        os.killpg(proxy.pid, signal.SIGTERM)
        proxy.wait(timeout=10)
        stop_server(first.process)
        stop_server(second.process)


@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_clients_through_nginx_and_on_another_process_talk_in_one_chat(behind_nginx, transport):
    url, first, second = behind_nginx
    tenant = new_tenant(url)  # the REST API through nginx
    chat = tenant.chat("ann", tenant.workspace("ann", members=("bob",)))
    via_nginx = connect(url, {"chat_id": chat,
                              "connection_string": tenant.connection_string(chat, "ann")},
                        transport)
    direct = [connect(server.url, {"chat_id": chat, "connection_string":
                                   tenant.connection_string(chat, "bob")})
              for server in (first, second)]
    try:
        ack = via_nginx.send("through nginx", via_nginx.message_string)
        assert ack["ok"], ack
        for client in direct:  # one of them is on the other process
            assert client.wait_for("message_received")[0] == ack["message"]
        for client in direct:
            reply = client.send(f"reply from {client.sio.get_sid('/chat')}",
                                client.message_string)
            assert reply["ok"], reply
        received = via_nginx.wait_for("message_received", 3)
        assert [m["id"] for m in received] == [m["id"] for m in tenant.history(chat)]
    finally:
        for client in (via_nginx, *direct):
            client.disconnect()
