"""Overload (CONTRACT.md section 9): while the event loop lags, new messages and REST requests
are refused at once with ``server_busy`` and ``retry_after``; afterwards the same message goes
through, and nothing already accepted is lost.

The end-to-end tests overload a real server two ways. A python agent holds its event loop
for two seconds (``tests.agents:hog``); a message and a REST request sent meanwhile are
answered when the loop is free again, and by then the process knows it fell behind. On
PostgreSQL, a message waits (yielding to the loop, which stays prompt) for a row the test
holds: once it is acknowledged, seconds late, the process refuses new work for a while.
"""
from __future__ import annotations

import threading
import time

import pytest
import requests

from app.overload import INTERVAL, LoopMonitor
from tests.kit.pg import ChatRowLock
from tests.kit.rest import new_tenant
from tests.kit.servers import start_server, stop_server
from tests.kit.sio import connect
from tests.kit.clock import FakeClock
from tests.kit.wait import wait_until


def test_a_lag_past_the_limit_refuses_new_work_for_the_hold_time_then_accepts_again():
    clock = FakeClock()
    monitor = LoopMonitor(sleep=None, limit=1.0, hold=1.5, clock=clock)
    monitor.note(0.2)
    assert monitor.retry_after() is None  # a little lag: accepted
    monitor.note(1.01)
    assert monitor.retry_after() == 1.5
    clock.now += 1.0
    assert monitor.retry_after() == 0.5
    clock.now += 0.5
    assert monitor.retry_after() is None  # the hold is over and no lag since


def test_the_monitor_measures_how_late_the_loop_woke_it():
    clock = FakeClock()
    lags = iter([0.0, 2.5])

    class Done(Exception):
        pass

    def sleep(seconds):
        assert seconds == INTERVAL
        try:
            clock.now += seconds + next(lags)  # woken that much late
        except StopIteration:
            raise Done from None

    monitor = LoopMonitor(sleep, limit=1.0, hold=1.0, clock=clock)
    with pytest.raises(Done):
        monitor.run()
    assert monitor.last_lag == pytest.approx(2.5)
    assert monitor.retry_after() == pytest.approx(1.0)


def test_slow_messages_in_a_row_refuse_and_one_slow_message_among_quick_ones_does_not():
    clock = FakeClock()
    monitor = LoopMonitor(sleep=None, limit=1.0, hold=1.0, clock=clock, sojourn_limit=0.5)
    for seconds in (0.9, 0.3, 2.0, 0.01, 0.7):  # a quick one in between: no standing queue
        monitor.note_sojourn(seconds)
        assert monitor.retry_after() is None
    monitor.note_sojourn(0.6)  # the second slow one in a row
    assert monitor.retry_after() == pytest.approx(1.0)
    clock.now += 1.0
    assert monitor.retry_after() is None


def test_without_a_sojourn_limit_only_the_lag_counts():
    monitor = LoopMonitor(sleep=None, limit=1.0, hold=1.0, clock=FakeClock())
    for _ in range(5):
        monitor.note_sojourn(30.0)
    assert monitor.retry_after() is None


def answers_within(url: str, seconds: float) -> bool:
    try:
        return requests.get(url, timeout=seconds).status_code == 200
    except requests.RequestException:
        return False


def test_a_monitor_overdue_by_more_than_the_limit_counts_before_it_wakes():
    clock = FakeClock()
    monitor = LoopMonitor(sleep=None, limit=1.0, hold=1.0, clock=clock)
    monitor.due = clock.now + INTERVAL
    clock.now += INTERVAL + 0.5
    assert monitor.retry_after() is None  # late, but not by the limit
    clock.now += 0.6
    assert monitor.retry_after() == pytest.approx(1.0)  # stuck: refused before it wakes


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = start_server(tmp_path_factory.mktemp("overload"), ASYNC_MODE="eventlet",
                        PYTHON_AGENTS="tests.agents:hog")
    yield live
    stop_server(live.process)


def test_an_overloaded_server_refuses_with_server_busy_then_serves_the_same_message(server):
    tenant = new_tenant(server.url)
    hogged = tenant.workspace("ann", agent={"kind": "python", "callable": "tests.agents:hog"})
    hog_chat, quiet_chat = tenant.chat("ann", workspace_id=hogged), tenant.chat("bob")
    ann = connect(server.url, tenant.key_auth(hog_chat, "ann"))
    bob = connect(server.url, tenant.key_auth(quiet_chat, "bob"))
    try:
        ack = ann.send("hold the loop", ann.message_string)
        assert ack["ok"] and ack["reply_expected"], ack
        ann.wait_for("message_stream_token", timeout=10)
        wait_until(lambda: not answers_within(server.url + "/healthz", 0.25), 10,
                   "the agent to hold the server's event loop", interval=0.01)
        message = {"content": "sent while the server is stuck",
                   "message_string": bob.message_string, "client_message_id": "m1"}
        answers: dict[str, object] = {}
        rest = threading.Thread(target=lambda: answers.setdefault("rest", requests.get(
            f"{server.url}/api/v1/chats/{quiet_chat}", headers=tenant.headers, timeout=20)))
        rest.start()
        refused = bob.call("message", message, timeout=20)
        rest.join(20)

        assert refused["ok"] is False, refused
        assert refused["error"]["code"] == "server_busy", refused
        retry_after = refused["error"]["details"]["retry_after"]
        assert 0 < retry_after <= 1.0
        response = answers["rest"]
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "server_busy"
        assert int(response.headers["Retry-After"]) >= 1

        # Refused before any check: the same message string still works once the hold ends.
        accepted = wait_until(lambda: (lambda a: a if a["ok"] else None)(
            bob.call("message", message)), 10, "the message to be accepted",
            interval=retry_after)
        assert accepted["ok"] is True, accepted
        assert [m["content"] for m in tenant.history(quiet_chat)] == [message["content"]]
        ended = ann.wait_for("message_stream_ended", timeout=20)[0]
        assert ended["finish_reason"] == "stop"
        assert tenant.history(hog_chat)[-1]["content"] == "holding done"
    finally:
        ann.disconnect()
        bob.disconnect()


@pytest.fixture(scope="module")
def pg_server(tmp_path_factory, pg_database_factory):
    database_url = pg_database_factory()
    live = start_server(tmp_path_factory.mktemp("overload-pg"), ASYNC_MODE="eventlet",
                        DATABASE_URL=database_url)
    live.database_url = database_url
    yield live
    stop_server(live.process)


def rest_refused(server, tenant, chat_id: str) -> bool:
    response = requests.get(f"{server.url}/api/v1/chats/{chat_id}", headers=tenant.headers,
                            timeout=10)
    return response.status_code == 503 and response.json()["error"]["code"] == "server_busy"


def test_messages_that_wait_on_the_database_make_the_server_refuse_then_serve_again(
        pg_server):
    tenant = new_tenant(pg_server.url)
    held_chat, held_too, other_chat = tenant.chat("ann"), tenant.chat("carl"), tenant.chat("bob")
    ann = connect(pg_server.url, tenant.key_auth(held_chat, "ann"))
    carl = connect(pg_server.url, tenant.key_auth(held_too, "carl"))
    bob = connect(pg_server.url, tenant.key_auth(other_chat, "bob"))
    answers: dict[str, dict] = {}
    try:
        # two messages (a standing queue, not one slow chat) wait for rows the test holds
        with ChatRowLock(pg_server.database_url, held_chat) as lock, \
                ChatRowLock(pg_server.database_url, held_too):
            senders = [threading.Thread(target=lambda c=client, n=name: answers.setdefault(
                n, c.send("waits for the row", c.message_string)))
                for client, name in ((ann, "ann"), (carl, "carl"))]
            started = time.monotonic()
            for sender in senders:
                sender.start()
            wait_until(lambda: lock.waiters() >= 2, 20, "the server's inserts to wait",
                       interval=0.02)  # PostgreSQL's view of locks: no event to wait on
            # the loop stays prompt meanwhile: the lag signal alone would not see this
            assert answers_within(pg_server.url + "/healthz", 2)
            # the rows are held long enough that the messages' sojourn passes the limit
            time.sleep(max(0.0, started + 1.0 - time.monotonic()))
        for sender in senders:
            sender.join(20)
        # accepted, so acknowledged and stored
        assert answers["ann"]["ok"] is True and answers["carl"]["ok"] is True, answers

        wait_until(lambda: rest_refused(pg_server, tenant, other_chat), 5,
                   "the server to refuse new work", interval=0.02)
        message = {"content": "sent while refusing", "message_string": bob.message_string}
        refused = bob.call("message", message)
        assert refused["ok"] is False and refused["error"]["code"] == "server_busy", refused
        retry_after = refused["error"]["details"]["retry_after"]
        assert 0 < retry_after <= 1.0

        accepted = wait_until(lambda: (lambda a: a if a["ok"] else None)(
            bob.call("message", message)), 10, "the message to be accepted",
            interval=retry_after)
        assert accepted["ok"] is True, accepted
        assert [m["content"] for m in tenant.history(held_chat)] == ["waits for the row"]
        assert [m["content"] for m in tenant.history(held_too)] == ["waits for the row"]
        assert [m["content"] for m in tenant.history(other_chat)] == ["sent while refusing"]
    finally:
        ann.disconnect()
        carl.disconnect()
        bob.disconnect()
