"""Agent hardening with the default settings (issue 11; CONTRACT.md section 5).

* Python agents: only callables listed in PYTHON_AGENTS; nothing else is imported, at save
  time or at reply time; whatever a listed one raises (SystemExit, KeyboardInterrupt,
  GeneratorExit, any BaseException) ends its reply with ``error`` and the server keeps serving.
* Outbound destinations: loopback/private/link-local/... literals in every notation and
  ``localhost`` are refused when saved; a host name resolving to loopback is refused at request
  time, before connecting (a listener of the test's own proves it was never contacted, and
  that an openai api_key never left).

The real server runs under eventlet and gevent (``rt_server``); the address parser has fast
unit tests. tests/test_agent_secrets.py covers the opt-in, redirects and secrets at rest.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import tempfile

import pytest
import requests

from app.agents import net
from tests.kit.agents import (Listener, ask, ask_once, join, loopback_names, set_stored_agent,
                              validation_details)
from tests.kit.rest import new_tenant

#: importing tests.agent_marker(_listed) writes a file here (see those modules)
MARKER_DIR = pathlib.Path(tempfile.mkdtemp(prefix="agent-import-marker-"))
LISTED = ["tests.agents:scripted", "tests.agents:exits", "tests.agents:interrupts",
          "tests.agents:generator_exit", "tests.agents:aborts", "tests.agent_marker_listed:reply"]
SERVER_ENV = {"PYTHON_AGENTS": ",".join(LISTED), "AGENT_IMPORT_MARKER": str(MARKER_DIR),
              "RATE_LIMIT_MESSAGES": "1000/second", "RATE_LIMIT_REST": "100000/minute"}
OPENAI_KEY = "sk-must-never-leave-0123456789"
WEBHOOK_SECRET = "whsec-must-never-leave"


@pytest.fixture(scope="module", autouse=True)
def remove_marker_directory():
    yield
    shutil.rmtree(MARKER_DIR, ignore_errors=True)


@pytest.fixture(scope="module")
def listener():
    server = Listener()
    yield server
    server.close()


# --- unit: the address parser and checks ------------------------------------------------------

LOOPBACK_NOTATIONS = ["127.0.0.1", "127.1", "127.0.1", "2130706433", "0x7f000001", "0x7f.1",
                      "0177.0.0.1", "0177.1", "017700000001", "127.0.0.1.", "127.000.000.001",
                      "[::1]", "::1", "[0:0:0:0:0:0:0:1]", "[::ffff:127.0.0.1]",
                      "[::ffff:7f00:1]", "[64:ff9b::127.0.0.1]", "[2002:7f00:1::]"]


@pytest.mark.parametrize("host", LOOPBACK_NOTATIONS)
def test_every_notation_of_loopback_parses_to_a_refused_address(host):
    address = net.parse_host(host)
    assert address is not None, f"{host!r} was taken for a name (it would go to DNS)"
    assert not net.is_public(address)


@pytest.mark.parametrize("host, expected", [
    ("127.1", "127.0.0.1"), ("2130706433", "127.0.0.1"), ("0x7f000001", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"), ("10.1", "10.0.0.1"), ("192.168.257", "192.168.1.1"),
    ("0", "0.0.0.0"), ("0x", "0.0.0.0"), ("1.2.3.4.", "1.2.3.4"), ("0XA9.0xFE.0251.254",
                                                                    "169.254.169.254"),
])
def test_ipv4_is_read_the_way_inet_aton_reads_it(host, expected):
    assert str(net.parse_host(host)) == expected


@pytest.mark.parametrize("host", ["1.2.3.4.5", "256.0.0.1", "1.2.3.256", "1.2.65536",
                                  "4294967296", "08.0.0.1", "0x1g.1", "1..2", "[::1",
                                  "[zz::1]", "09"])
def test_a_host_that_looks_numeric_but_is_no_address_is_invalid_not_a_name(host):
    with pytest.raises(net.InvalidHost):
        net.parse_host(host)


@pytest.mark.parametrize("host", [
    "0.0.0.0", "10.0.0.1", "172.16.5.4", "192.168.0.1",  # RFC 1918: refused
    "169.254.169.254", "[fe80::1]", "[fe80::1%25eth0]", "[fe80::1%eth0]",  # link-local: refused
    "100.64.0.1", "192.0.2.1", "198.51.100.1", "203.0.113.1", "198.18.0.1",  # refused
    "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255", "[ff02::1]",  # refused
    "[fc00::1]", "[fd12:3456::1]", "[::]", "[2001:db8::1]", "[fec0::1]",  # refused
    "[::ffff:10.0.0.1]", "[::ffff:169.254.169.254]", "[::127.0.0.1]",  # refused
])
def test_non_public_ranges_are_refused(host):
    assert not net.is_public(net.parse_host(host))


@pytest.mark.parametrize("host", ["8.8.8.8", "1.1.1.1", "[2606:4700:4700::1111]",
                                  "[::ffff:8.8.8.8]", "134744072"])
def test_public_addresses_pass(host):
    assert net.is_public(net.parse_host(host))


@pytest.mark.parametrize("host", ["example.com", "api.openai.com", "runsc", "vm",
                                  "localhost", "my-host.local"])
def test_names_are_names(host):
    assert net.parse_host(host) is None


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:11434/v1", "http://127.1/", "http://2130706433/", "http://0x7f000001/",
    "http://0177.0.0.1/", "http://[::1]:8080/", "http://[::ffff:127.0.0.1]/", "http://0.0.0.0/",
    "http://user@127.0.0.1/", "http://user:pw@127.0.0.1:80/", "http://127.0.0.1./",
    "http://[fe80::1%25eth0]/", "http://localhost/", "http://LOCALHOST./",
    "http://api.localhost/", "https://169.254.169.254/latest/meta-data/",  # refused
    "http://10.0.0.1/", "http://192.168.1.1:8080/", "http://100.64.0.1/",  # refused
    "http://1.2.3.4.5/",
])
def test_check_url_refuses_literals_and_localhost_without_the_opt_in(url):
    with pytest.raises(ValueError):
        net.check_url(url, allow_private=False)


def test_check_url_lets_names_through_and_the_opt_in_lets_private_literals_through():
    for url in ("https://api.openai.com/v1", "http://runsc:8080/hook", "https://8.8.8.8/"):
        net.check_url(url, allow_private=False)  # names are checked at request time
    for url in ("http://127.0.0.1:11434/v1", "http://localhost/", "http://[::1]/"):
        net.check_url(url, allow_private=True)
    with pytest.raises(ValueError):
        net.check_url("http://1.2.3.4.5/", allow_private=True)  # not an address at all


def test_resolve_never_hands_a_numeric_host_to_dns(monkeypatch):
    looked_up = []
    monkeypatch.setattr(net.socket, "getaddrinfo",
                        lambda *a, **k: looked_up.append(a) or [])
    for host in ("127.1", "2130706433", "0x7f000001", "::1", "1.2.3.4.5", "localhost"):
        with pytest.raises(net.DestinationRefused):
            net.resolve(host, 80, allow_private=False)
    infos = net.resolve("127.1", 80, allow_private=True)
    assert infos[0][4] == ("127.0.0.1", 80)
    assert looked_up == []


def test_a_name_is_refused_if_any_address_it_resolves_to_is_refused(monkeypatch):
    import socket

    answers = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", 80)),
               (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80))]
    monkeypatch.setattr(net.socket, "getaddrinfo", lambda *a, **k: answers)
    with pytest.raises(net.DestinationRefused):
        net.resolve("rebinding.example", 80, allow_private=False)
    monkeypatch.setattr(net.socket, "getaddrinfo", lambda *a, **k: answers[:1])
    assert net.resolve("public.example", 80, allow_private=False) == answers[:1]


# --- python agents: the allow-list, on the real server ----------------------------------------

def marker(module: str, server) -> pathlib.Path:
    return MARKER_DIR / f"{module}-{server.env['ASYNC_MODE']}"


@pytest.mark.parametrize("path", ["sys:exit", "setup:setup", "builtins:repr", "os:_exit",
                                  "tests.agent_marker:reply", "tests.agents:reply"])
def test_an_unlisted_callable_is_a_validation_error_and_nothing_is_imported(rt_server, path):
    tenant = new_tenant(rt_server.url)
    response = tenant.post("/api/v1/workspaces", {"owner_id": "ann", "name": "T",
                                                  "agent": {"kind": "python", "callable": path}})
    assert set(validation_details(response)) == {"agent"}
    assert set(validation_details(response)["agent"]) == {"callable"}
    ws = tenant.workspace("ann")
    response = requests.patch(f"{rt_server.url}/api/v1/workspaces/{ws}", headers=tenant.headers,
                              json={"agent": {"kind": "python", "callable": path}}, timeout=10)
    assert set(validation_details(response)["agent"]) == {"callable"}
    assert not marker("tests.agent_marker", rt_server).exists(), "an unlisted module ran"
    assert requests.get(f"{rt_server.url}/healthz", timeout=10).status_code == 200


def test_the_marker_works_a_listed_callable_is_imported_when_saved(rt_server):
    tenant = new_tenant(rt_server.url)
    tenant.workspace("ann", agent={"kind": "python",
                                   "callable": "tests.agent_marker_listed:reply"})
    assert marker("tests.agent_marker_listed", rt_server).exists()
    assert not marker("tests.agent_marker", rt_server).exists()


def test_a_stored_callable_no_longer_listed_ends_its_reply_with_error_and_is_not_imported(
        rt_server):
    tenant = new_tenant(rt_server.url)
    ws = tenant.workspace("ann", agent={"kind": "python", "callable": "tests.agents:scripted"})
    chat = tenant.chat("ann", ws)
    # The operator took it off the list since (or it was saved before there was one).
    set_stored_agent(rt_server, ws, {"kind": "python", "callable": "tests.agent_marker:reply"})
    client = join(tenant, chat)
    try:
        ended, error = ask(client, "hello")
        assert ended["finish_reason"] == "error" and ended["content"] == ""
        assert error is not None and "PYTHON_AGENTS" in error["message"], error
        assert not marker("tests.agent_marker", rt_server).exists()
        # the tenant picks a listed one (through the API: the running server keeps a copy of
        # the configuration and forgets it on such a change; app/chat/agent_config.py)
        r = requests.patch(f"{rt_server.url}/api/v1/workspaces/{ws}", headers=tenant.headers,
                           json={"agent": {"kind": "python", "callable": "tests.agents:scripted"}},
                           timeout=10)
        assert r.status_code == 200, r.text
        ended, error = ask(client, "tokens 2")
        assert (ended["finish_reason"], ended["content"], error) == ("stop", "t0 t1 ", None)
    finally:
        client.disconnect()


@pytest.mark.parametrize("callable_", ["tests.agents:exits", "tests.agents:interrupts",
                                       "tests.agents:generator_exit", "tests.agents:aborts"])
def test_whatever_a_python_agent_raises_ends_its_reply_and_the_server_keeps_serving(
        rt_server, callable_):
    tenant = new_tenant(rt_server.url)
    ws = tenant.workspace("ann", agent={"kind": "python", "callable": callable_})
    chat = tenant.chat("ann", ws)
    client = join(tenant, chat)
    try:
        for attempt in ("first", "second"):  # the same worker fails twice and lives
            ended, error = ask(client, attempt)
            assert ended["finish_reason"] == "error" and ended["content"] == "t0 ", ended
            assert error is not None and error["details"]["finish_reason"] == "error", error
        assert requests.get(f"{rt_server.url}/healthz", timeout=10).status_code == 200
        # the next message, in this chat and with another agent, is served as usual
        r = requests.patch(f"{rt_server.url}/api/v1/workspaces/{ws}", headers=tenant.headers,
                           json={"agent": {"kind": "python",
                                           "callable": "tests.agents:scripted"}}, timeout=10)
        assert r.status_code == 200, r.text
        ended, error = ask(client, "tokens 3")
        assert (ended["finish_reason"], ended["content"], error) == ("stop", "t0 t1 t2 ", None)
    finally:
        client.disconnect()
    assert rt_server.process.poll() is None


# --- outbound destinations: refused without the opt-in ----------------------------------------

REFUSED_HOSTS = ["127.0.0.1", "127.1", "2130706433", "0x7f000001", "0177.0.0.1", "[::1]",
                 "[::ffff:127.0.0.1]", "0.0.0.0", "user@127.0.0.1", "127.0.0.1.", "localhost",
                 "app.localhost", "169.254.169.254", "10.0.0.1", "192.168.0.1",  # all refused
                 "[fe80::1%25eth0]", "100.64.0.1", "[fd00::1]"]  # refused before connecting


def test_webhook_and_openai_urls_to_refused_literals_are_validation_errors(rt_server):
    tenant = new_tenant(rt_server.url)
    ws = tenant.workspace("ann")
    accepted = []
    for host in REFUSED_HOSTS:
        for agent, field in (({"kind": "webhook", "url": f"http://{host}:8080/hook",
                               "secret": WEBHOOK_SECRET}, "url"),
                             ({"kind": "openai", "base_url": f"http://{host}:11434/v1",
                               "model": "m", "api_key": OPENAI_KEY}, "base_url")):
            created = tenant.post("/api/v1/workspaces", {"owner_id": "ann", "name": "T",
                                                         "agent": agent})
            patched = requests.patch(f"{rt_server.url}/api/v1/workspaces/{ws}",
                                     headers=tenant.headers, json={"agent": agent}, timeout=10)
            for response in (created, patched):
                if response.status_code != 400 or \
                        set(response.json()["error"]["details"].get("agent") or {}) != {field}:
                    accepted.append((host, field, response.status_code, response.text[:200]))
                assert OPENAI_KEY not in response.text and WEBHOOK_SECRET not in response.text
    assert accepted == []


@pytest.mark.parametrize("kind", ["webhook", "openai"])
def test_a_name_that_resolves_to_loopback_is_refused_at_request_time_before_connecting(
        rt_server, listener, kind):
    names = loopback_names()
    if not names:
        pytest.skip("/etc/hosts maps no name but localhost to loopback")
    tenant = new_tenant(rt_server.url)
    before = len(listener.recorded())
    for name in names:
        agent = ({"kind": "webhook", "url": f"http://{name}:{listener.port}/hook",
                  "secret": WEBHOOK_SECRET} if kind == "webhook" else
                 {"kind": "openai", "base_url": f"http://{name}:{listener.port}/v1",
                  "model": "m", "api_key": OPENAI_KEY})
        ended, error = ask_once(tenant, agent)  # saved: a name is not resolved when saved
        assert ended["finish_reason"] == "error", ended
        assert error is not None and "destination not allowed" in error["message"], error
        assert OPENAI_KEY not in json.dumps(error) and WEBHOOK_SECRET not in json.dumps(error)
    assert listener.recorded()[before:] == [], "the refused destination was contacted"


def test_the_connection_goes_to_the_checked_address_without_a_second_lookup(monkeypatch):
    """In-process: a name "resolved" once (getaddrinfo patched, nothing leaves the machine);
    the request reaches the loopback listener it resolved to, with the name as its Host."""
    import socket

    server = Listener()
    lookups = []

    def getaddrinfo(host, port, *args, **kwargs):
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(net.socket, "getaddrinfo", getaddrinfo)
    try:
        response = net.session(allow_private=True).post(
            f"http://agent.rebind.test:{server.port}/hook", data=b"{}", allow_redirects=False,
            timeout=10)
        assert response.status_code == 200
        assert lookups == ["agent.rebind.test"]
        assert [r["headers"]["Host"] for r in server.recorded()] == [
            f"agent.rebind.test:{server.port}"]
        with pytest.raises(net.DestinationRefused):  # the same name, without the opt-in
            net.session(allow_private=False).post(
                f"http://agent.rebind.test:{server.port}/hook", data=b"{}", timeout=10)
        assert len(server.recorded()) == 1
    finally:
        server.close()
