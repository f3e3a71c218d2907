"""The browser demo (DEMO=1) in a real Chromium: join, talk, watch the echo stream, lose the
network, catch up; on a phone-sized screen and by keyboard alone.

Driven with Playwright's sync API and Debian's Chromium (/usr/bin/chromium; `.ci/run` installs
it). Locators use the accessible names of CONTRACT.md section 8.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from tests.conftest import REQUIRE_SERVICES, ROOT, assert_error, start_server, stop_server
from tests.realtime import connect

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
DEMO_KEY_FILE = ROOT / "instance" / "demo_api_key"
TIMEOUT_MS = 15_000


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """The Procfile's server with the demo on; the developer's instance/demo_api_key is kept."""
    saved = DEMO_KEY_FILE.read_bytes() if DEMO_KEY_FILE.exists() else None
    server = start_server(tmp_path_factory.mktemp("demo"), DEMO="1",
                          RATE_LIMIT_DEMO="1000/minute")  # many joins from one address here
    yield server
    stop_server(server.process)
    if saved is None:
        DEMO_KEY_FILE.unlink(missing_ok=True)
    else:
        DEMO_KEY_FILE.write_bytes(saved)


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        message = f"{CHROMIUM} is missing (apt-get install chromium)"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:  # requirements-dev.txt pins it
        if REQUIRE_SERVICES:
            pytest.fail(f"playwright is not installed: {exc}")
        pytest.skip(f"playwright is not installed: {exc}")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield chromium
        chromium.close()


@pytest.fixture
def context(browser):
    ctx = browser.new_context()
    ctx.set_default_timeout(TIMEOUT_MS)
    yield ctx
    ctx.close()


def expect(*args, **kwargs):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(*args, **kwargs)


def open_demo(context, server):
    """The demo page in a new tab, recording every URL it asks for."""
    page = context.new_page()
    page.requested = []
    page.on("request", lambda request: page.requested.append(request.url))
    page.goto(server.url + "/")
    return page


def join(page, name: str) -> None:
    page.get_by_label("Your name").fill(name)
    page.get_by_role("button", name="Join").click()
    expect(page.get_by_role("status")).to_have_attribute("data-state", "connected")


def send(page, text: str) -> None:
    page.get_by_label("Message").fill(text)
    page.get_by_role("button", name="Send").click()


def echo_reply(page, text: str):
    """The echo bot's finished reply to ``text`` in the log."""
    reply = page.get_by_role("log").locator(".msg.agent", has_text=text)
    expect(reply).to_have_count(1)
    expect(reply).not_to_have_attribute("aria-busy", "true")
    return reply


def only_this_server(page, server) -> None:
    """No CDN, no third party: every request went to the demo's own origin."""
    origin = urlsplit(server.url).netloc
    outside = [url for url in page.requested
               if not url.startswith(("data:", "blob:")) and urlsplit(url).netloc != origin]
    assert outside == []


# --- the page in a browser -----------------------------------------------------------------

def test_a_person_joins_talks_loses_the_network_and_catches_up_without_reloading(
        demo_server, context, tmp_path):
    page = open_demo(context, demo_server)
    join(page, "Ann Browser")
    log = page.get_by_role("log")
    expect(page.get_by_label("Message")).to_be_focused()

    send(page, "hello from the browser")
    expect(log.locator(".msg.mine", has_text="hello from the browser")).to_have_count(1)
    expect(echo_reply(page, "hello from the browser")).to_contain_text("Echo bot")
    expect(page.get_by_label("Message")).to_have_value("")

    # The echo streams word by word: the page shows the reply while it grows.
    words = "one two three four five six seven eight"
    shown = page.evaluate("""(words) => new Promise((resolve) => {
        const log = document.querySelector('[role=log]');
        const shown = [];
        const watch = new MutationObserver(() => {
            for (const reply of log.querySelectorAll('.msg.agent')) {
                const text = reply.querySelector('.text').textContent;
                shown.push([reply.getAttribute('aria-busy') === 'true', text]);
                if (reply.getAttribute('aria-busy') !== 'true' && text.trim() === words) {
                    watch.disconnect();
                    resolve(shown);
                }
            }
        });
        watch.observe(log, {subtree: true, childList: true, characterData: true,
                            attributes: true});
        document.getElementById('message').value = words;
        document.getElementById('send-button').click();
    })""", words)
    partial = {text.strip() for busy, text in shown if busy and text.strip()}
    assert all(words.startswith(text) for text in partial), shown
    assert len([text for text in partial if text != words]) >= 2, shown  # seen growing
    echo_reply(page, words)

    # Drop the network: the page's socket.io connection goes down.
    context.set_offline(True)
    expect(page.get_by_role("status")).to_have_attribute("data-state", "reconnecting")
    assert page.evaluate("() => window.workspaceChatDemo.socket.connected") is False

    # Meanwhile another client of the same person writes in the chat (and the echo answers).
    seat = requests.post(demo_server.url + "/demo/join", json={"name": "Ann Browser"},
                         timeout=10).json()
    other = connect(demo_server.url, {"chat_id": seat["chat_id"],
                                      "connection_string": seat["connection_string"]})
    try:
        assert other.connect_error is None, other.connect_error
        ack = other.send("sent while you were away", other.message_string)
        assert ack["ok"], ack
        assert other.wait_for("message_stream_ended")[-1]["content"].strip() == \
            "sent while you were away"
    finally:
        other.disconnect()
    assert log.get_by_text("sent while you were away").count() == 0

    context.set_offline(False)
    expect(page.get_by_role("status")).to_have_attribute("data-state", "connected")
    expect(log.locator(".msg", has_text="sent while you were away")).to_have_count(2)
    echo_reply(page, "sent while you were away")
    # Nothing shown twice, and in the order of the history.
    ids = page.evaluate("() => [...document.querySelectorAll('[role=log] .msg')]"
                        ".map(m => Number(m.dataset.messageId))")
    assert ids == sorted(set(ids)) and len(ids) == 6, ids

    # Still usable after the reconnect (it sends with a fresh message string).
    send(page, "back again")
    echo_reply(page, "back again")

    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.exists() and shot.stat().st_size > 0
    only_this_server(page, demo_server)

    # The same name later, in a new tab: the same chat, its history shown.
    again = open_demo(context, demo_server)
    join(again, "Ann Browser")
    expect(again.get_by_role("log").locator(".msg")).to_have_count(8)
    expect(again.get_by_role("log")).to_contain_text("sent while you were away")


def test_on_a_phone_sized_screen_the_message_box_and_send_button_are_visible(
        demo_server, browser, tmp_path):
    ctx = browser.new_context(viewport={"width": 375, "height": 667}, is_mobile=True,
                              has_touch=True, device_scale_factor=2)
    ctx.set_default_timeout(TIMEOUT_MS)
    try:
        page = open_demo(ctx, demo_server)
        join(page, "Pat Phone")
        message, send_button = page.get_by_label("Message"), page.get_by_role("button", name="Send")
        for element in (message, send_button, page.get_by_role("log")):
            expect(element).to_be_visible()
            expect(element).to_be_in_viewport()
            box = element.bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= 375, box
            assert box["y"] + box["height"] <= 667, box
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 375
        for i in range(4):  # more than the screen holds: the log follows the newest reply
            send(page, f"tiny screen {i} " + "and quite a few words after it " * 4)
            echo_reply(page, f"tiny screen {i}")
        expect(echo_reply(page, "tiny screen 3")).to_be_in_viewport()
        expect(send_button).to_be_in_viewport()
        expect(message).to_be_in_viewport()
        page.screenshot(path=str(tmp_path / "phone.png"))
        assert (tmp_path / "phone.png").exists()
    finally:
        ctx.close()


def test_keyboard_only_join_and_send_with_enter(demo_server, context):
    page = open_demo(context, demo_server)
    expect(page.get_by_label("Your name")).to_be_focused()  # the page starts where you type
    page.keyboard.type("Kim Keys")
    page.keyboard.press("Enter")
    message = page.get_by_label("Message")
    expect(message).to_be_focused()
    expect(page.get_by_role("status")).to_have_attribute("data-state", "connected")
    page.keyboard.type("typed, never clicked")
    page.keyboard.press("Enter")
    echo_reply(page, "typed, never clicked")
    expect(message).to_have_value("")
    expect(message).to_be_focused()
    # Tab reaches the Send button from the message box.
    page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Send")).to_be_focused()


def test_an_empty_name_is_explained_on_the_page(demo_server, context):
    page = open_demo(context, demo_server)
    page.get_by_label("Your name").fill("   ")
    page.get_by_role("button", name="Join").click()
    expect(page.get_by_role("alert").first).to_have_text(re.compile("type your name", re.I))
    expect(page.get_by_label("Your name")).to_be_focused()
    expect(page.get_by_label("Message")).to_be_hidden()


def test_a_send_refused_while_the_echo_still_streams_is_explained(demo_server, context):
    page = open_demo(context, demo_server)
    join(page, "Bo Busy")
    message, alert = page.get_by_label("Message"), page.locator("#alert")
    # The echo streams faster than a person (or another client across the network) can press
    # Send, so a long message goes out on the page's socket and, in the same task, the Send
    # button is pressed. The server handles the two events concurrently: when the button's
    # message is handled first, or after the whole echo, it simply goes through; try again.
    for attempt in range(10):
        text = f"too soon {attempt}"
        message.fill(text)
        page.evaluate("""async () => {
            const socket = window.workspaceChatDemo.socket;
            const {message_string} = await socket.emitWithAck('get_message_string', {});
            socket.emit('message', {content: 'w '.repeat(1500) + 'finale', message_string});
            document.getElementById('send-button').click();
        }""")
        page.wait_for_function("""() => document.getElementById('alert').textContent
            .includes('still answering') || document.getElementById('message').value === ''""")
        if message.input_value() == text:
            break
        echo_reply(page, text)  # it went through; its echo comes last, then the chat is free
    else:
        pytest.fail("the button's message was never refused as chat_busy in ten tries")
    expect(alert).to_contain_text("still answering")
    expect(message).to_have_value(text)  # kept, to send again
    expect(message).to_be_focused()
    expect(page.locator(".msg.agent[aria-busy=true]")).to_have_count(0)
    # The page fetched a fresh message string after the refusal: sending works again.
    page.get_by_role("button", name="Send").click()
    echo_reply(page, text)
    expect(alert).to_have_text("")


# --- the demo's HTTP side ------------------------------------------------------------------

def test_join_gives_each_name_its_own_chat_and_the_same_one_again(demo_server):
    def seat(name):
        r = requests.post(demo_server.url + "/demo/join", json={"name": name}, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    first, again, other = seat("Lee"), seat("  lee "), seat("Li")
    assert first["chat_id"] == again["chat_id"] != other["chat_id"]
    assert first["user_id"] == again["user_id"] != other["user_id"]
    assert re.fullmatch(r"[A-Za-z0-9_.@:-]{1,128}", first["user_id"])
    assert seat("demo")["user_id"] != "demo"  # nobody becomes the demo workspace's owner
    assert re.fullmatch(r"[A-Za-z0-9_.@:-]{1,128}", seat("李 🙂")["user_id"])
    assert seat("李")["chat_id"] != seat("王")["chat_id"]


@pytest.mark.parametrize("body", [{"name": ""}, {"name": "  \t "}, {}, {"name": 7},
                                  {"name": "x" * 65}, None])
def test_join_without_a_usable_name_is_a_validation_error(demo_server, body):
    r = requests.post(demo_server.url + "/demo/join", json=body, timeout=10)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "validation_error"
    assert set(r.json()["error"]) == {"code", "message", "details"}
    assert "name" in r.json()["error"]["details"]


def test_the_page_and_its_socket_io_client_come_from_the_app_itself(demo_server):
    page = requests.get(demo_server.url + "/", timeout=10)
    assert page.status_code == 200
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    scripts = re.findall(r'<script src="([^"]+)"', page.text)
    assert "/demo/socket.io.min.js" in scripts
    for src in scripts:
        assert src.startswith("/"), src
        r = requests.get(demo_server.url + src, timeout=10)
        assert r.status_code == 200 and "javascript" in r.headers["Content-Type"], src
    package = Path(ROOT / "app/demo/node_modules/socket.io-client/package.json")
    assert '"version": "4.8.4"' in package.read_text()


def test_a_missing_socket_io_client_is_a_clear_404(tmp_path, monkeypatch):
    from flask import Flask

    from app.demo import routes
    from app.errors import register_error_handlers

    monkeypatch.setattr(routes, "SOCKET_IO_DIST", str(tmp_path))
    app = Flask("demo_without_node_modules")
    app.register_blueprint(routes.bp)
    register_error_handlers(app)
    error = assert_error(app.test_client().get("/demo/socket.io.min.js"), 404, "not_found")
    assert "npm ci --prefix app/demo" in error["message"]
