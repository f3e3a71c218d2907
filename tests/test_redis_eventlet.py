"""redis-py's check of a pooled connection under eventlet (app/overrides/redis_eventlet.py).

Run in a fresh interpreter, monkey-patched as the entry point does: a zero-timeout check
answers from the kernel without handing control to the event loop (another green thread
never runs meanwhile) and still tells a socket with data from one without; a check that may
wait (pub/sub's timeout) still waits the green way, letting the others run.
"""
from __future__ import annotations

import subprocess
import sys

from tests.kit.servers import ROOT

SCRIPT = r"""
import eventlet
eventlet.monkey_patch()
import socket
from redis._parsers import hiredis as parser
from app.overrides import redis_eventlet

ran = []
def other():
    while True:
        ran.append(1)
        eventlet.sleep(0)
eventlet.spawn(other)
eventlet.sleep(0)

ours, theirs = socket.socketpair()
def checks(label):
    ran.clear()
    empty = [parser._socket_can_read(ours, 0) for _ in range(200)]
    yielded = len(ran)
    theirs.send(b"+OK\r\n")
    full = parser._socket_can_read(ours, 0)
    ours.recv(100)
    print(label, "empty:", any(empty), "full:", full, "yielded:", yielded)

checks("before")
redis_eventlet.install()
checks("after")
ran.clear()
waited = parser._socket_can_read(ours, 0.05)
print("wait: readable:", waited, "others ran:", len(ran) > 0)
redis_eventlet.uninstall()
print("uninstalled:", parser._socket_can_read.__module__)
"""


def test_a_zero_timeout_check_answers_without_yielding_and_a_wait_still_yields():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    before, after, wait, uninstalled = lines
    # redis-py's own check, under eventlet, went through the event loop every time
    assert before.startswith("before empty: False full: True yielded:")
    assert int(before.rsplit(" ", 1)[1]) > 0
    assert after == "after empty: False full: True yielded: 0"
    assert wait == "wait: readable: False others ran: True"
    assert uninstalled == "uninstalled: redis._parsers.hiredis"
