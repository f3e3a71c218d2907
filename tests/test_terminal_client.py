"""The terminal client ``workspace-chat`` (CONTRACT.md section 8), run as a console script in
a pseudo-terminal against the real server process: type a line, read the screen.

Reads are bounded (select with a deadline, until the expected text shows), never fixed sleeps.
"""
from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from workspace_chat_client import ChatClient
from tests.kit.rest import Tenant, new_tenant
from tests.kit.servers import run_again, start_server, stop_server

pytestmark = pytest.mark.e2e

SCRIPT = Path(sys.executable).parent / "workspace-chat"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    """A process on a pseudo-terminal: what it printed so far, and the keys to type."""

    def __init__(self, args: list[str]):
        assert SCRIPT.exists(), f"{SCRIPT} is missing: pip install -e . (setup.cfg entry point)"
        self.master, slave = pty.openpty()
        env = {k: v for k, v in os.environ.items() if not k.startswith("WORKSPACE_CHAT_")}
        self.process = subprocess.Popen([str(SCRIPT), *args], stdin=slave, stdout=slave,
                                        stderr=slave, close_fds=True, start_new_session=True,
                                        env=env)
        os.close(slave)
        self.screen = ""

    def _read(self, timeout: float) -> bool:
        """Read what is there (waiting up to ``timeout``); False at end of output."""
        ready, _, _ = select.select([self.master], [], [], max(0.0, timeout))
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the process closed the terminal
            return False
        if not data:
            return False
        self.screen += ANSI.sub("", data.decode("utf-8", "replace").replace("\r\n", "\n"))
        return True

    def expect(self, pattern: str, timeout: float = 20, start: int = 0) -> re.Match:
        """Wait until ``pattern`` (a regex) shows on the screen after ``start``."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.compile(pattern).search(self.screen, start)
            if match:
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._read(remaining):
                match = re.compile(pattern).search(self.screen, start)
                if match:
                    return match
                raise AssertionError(f"{pattern!r} did not show within {timeout}s; "
                                     f"screen:\n{self.screen}")

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self, timeout: float = 20) -> int:
        """Wait for the process to exit, reading its last output; returns its status."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            if not self._read(min(0.2, deadline - time.monotonic())):
                break
        return self.process.wait(max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        os.close(self.master)


@pytest.fixture
def terminals():
    started: list[Terminal] = []

    def start(*args: str) -> Terminal:
        terminal = Terminal(list(args))
        started.append(terminal)
        return terminal

    yield start
    for terminal in started:
        terminal.close()


def args(server, tenant: Tenant, user: str, *extra: str) -> list[str]:
    return ["--url", server.url, "--api-key", tenant.key, "--user", user, *extra]


def test_a_typed_line_gets_the_echo_agents_streamed_reply_and_ctrl_d_leaves(live_server,
                                                                              terminals):
    tenant = new_tenant(live_server.url)
    chat_id = tenant.chat("ann", tenant.workspace("ann", agent={"kind": "echo"}))
    term = terminals(*args(live_server, tenant, "ann", "--chat", chat_id))
    term.expect(rf"Connected to chat {chat_id} as ann\.")

    term.type(b"hello there, terminal\n")
    term.expect(r"agent: hello there, terminal\n")
    # the line typed is not printed a second time as a received message
    assert "ann: hello there" not in term.screen
    stored = tenant.history(chat_id)
    assert [(m["role"], m["content"]) for m in stored] == [
        ("user", "hello there, terminal"), ("agent", "hello there, terminal")]

    # a second line, typed while nothing streams, gets its own reply line
    mark = len(term.screen)
    term.type(b"second words\n")
    term.expect(r"agent: second words\n", start=mark)

    term.type(b"\x04")  # Ctrl-D
    assert term.wait() == 0
    assert "Bye." in term.screen


def test_piped_lines_are_answered_before_it_leaves(live_server):
    # `echo hello | workspace-chat ...` (the README's quick start): each reply is shown whole,
    # on its own line, before "Bye." and nothing after it
    tenant = new_tenant(live_server.url)
    chat_id = tenant.chat("ann", tenant.workspace("ann", agent={"kind": "echo",
                                                                   "delay_ms": 5}))
    run = subprocess.run([str(SCRIPT), *args(live_server, tenant, "ann", "--chat", chat_id)],
                         input="hello there world\nsecond line\n", capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[1:] == ["agent: hello there world", "agent: second line",
                                           "Bye."], run.stdout


def test_a_new_chat_is_created_and_messages_of_others_show(live_server, terminals):
    tenant = new_tenant(live_server.url)
    ws = tenant.workspace("ann", members=("bob",))
    term = terminals(*args(live_server, tenant, "ann", "--workspace", ws, "--title", "Ops"))
    chat_id = term.expect(r"Created chat (\S+) ").group(1)
    term.expect(rf"Connected to chat {re.escape(chat_id)} as ann\.")

    with ChatClient(live_server.url, tenant.key, "bob") as bob:
        bob.connect(chat_id)
        bob.send("hi ann, it is bob")
        term.expect(r"bob: hi ann, it is bob\n")

        term.type(b"hello bob\n")
        got = bob.receive(timeout=10)
        while got["user_id"] == "bob":
            got = bob.receive(timeout=10)
        assert got["content"] == "hello bob" and got["user_id"] == "ann"

        mark = len(term.screen)
        bob.send("bye ann")
        term.expect(r"bob: bye ann\n", start=mark)
    assert "ann: hello bob" not in term.screen

    chat = [c for c in tenant.history(chat_id)]
    assert [m["content"] for m in chat] == ["hi ann, it is bob", "hello bob", "bye ann"]
    term.type(b"\x04")
    assert term.wait() == 0


@pytest.mark.parametrize("case", ["not_a_member", "unknown_chat", "bad_key"])
def test_a_refused_connection_says_why_and_exits_non_zero(live_server, terminals, case):
    tenant = new_tenant(live_server.url)
    chat_id = tenant.chat("ann", tenant.workspace("ann"))
    user, chat, key = "mallory", chat_id, tenant.key
    expected = (r"Connection refused: This user is neither the owner nor a member of the "
                r"chat's workspace \(forbidden\)")
    if case == "unknown_chat":
        user, chat = "ann", "no-such-chat"
        expected = r"Connection refused: .*\(chat_not_found\)"
    elif case == "bad_key":
        user, key = "ann", "wc_wrong"
        expected = r"Connection refused: .*\(invalid_api_key\)"
    term = terminals("--url", live_server.url, "--api-key", key, "--user", user,
                     "--chat", chat)
    term.expect(expected)
    assert term.wait() == 1
    assert "Traceback" not in term.screen and "Connected to chat" not in term.screen


def test_an_unreachable_server_is_one_clear_line(terminals):
    from tests.kit.servers import free_port

    term = terminals("--url", f"http://127.0.0.1:{free_port()}", "--api-key", "k",
                     "--user", "ann", "--chat", "c", "--timeout", "3")
    term.expect(r"Cannot reach the server: ")
    assert term.wait() == 1
    assert "Traceback" not in term.screen


def test_a_deleted_chat_is_said_and_ends_the_session(live_server, terminals):
    tenant = new_tenant(live_server.url)
    chat_id = tenant.chat("ann", tenant.workspace("ann"))
    term = terminals(*args(live_server, tenant, "ann", "--chat", chat_id))
    term.expect("Connected to chat")
    r = requests.delete(f"{live_server.url}/api/v1/chats/{chat_id}", headers=tenant.headers,
                        timeout=10)
    assert r.status_code == 204
    term.expect(r"The chat was deleted\.")
    assert term.wait() == 1


def test_the_terminal_reconnects_after_a_server_restart(tmp_path, terminals):
    server = start_server(tmp_path)
    process = server.process
    try:
        tenant = new_tenant(server.url)
        chat_id = tenant.chat("ann", tenant.workspace("ann", members=("bob",)))
        term = terminals(*args(server, tenant, "bob", "--chat", chat_id))
        term.expect("Connected to chat")

        # stop it (SIGTERM: it closes its sockets) and start it again on the same port
        stop_server(process)
        term.expect(r"Connection lost; reconnecting\.\.\.")
        process = run_again(server).process
        term.expect(r"Reconnected\.", timeout=60)

        with ChatClient(server.url, tenant.key, "ann") as ann:
            ann.connect(chat_id)
            ann.send("glad you are back")
        term.expect(r"ann: glad you are back\n", timeout=60)
        term.type(b"\x04")
        assert term.wait() == 0
    finally:
        stop_server(process)
