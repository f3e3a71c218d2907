"""The browser demo (DEMO=1) in a real Chromium, used as people use it: join (alone or in a
room with others), talk, watch the echo stream and stop it, see who types, Markdown rendered and
sanitised, lose the network, send while offline and catch up; on a phone-sized screen and by
keyboard alone. Screenshots go to /tmp/demo-shots/ (desktop 1280x800, phone 390x844).

Driven with Playwright's sync API and Debian's Chromium (/usr/bin/chromium; `.ci/run` installs
it). Locators use the accessible names of CONTRACT.md section 8.
"""
from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from tests.conftest import assert_error
from tests.kit.servers import REQUIRE_SERVICES, ROOT, start_server, stop_server
from tests.kit.sio import connect

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
DEMO_KEY_FILE = ROOT / "instance" / "demo_api_key"
TIMEOUT_MS = 15_000
SHOTS = Path("/tmp/demo-shots")
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


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
    ctx = browser.new_context(viewport=DESKTOP)
    ctx.set_default_timeout(TIMEOUT_MS)
    yield ctx
    ctx.close()


@pytest.fixture
def other_context(browser):
    """A second person, in a browser of their own."""
    ctx = browser.new_context(viewport=DESKTOP)
    ctx.set_default_timeout(TIMEOUT_MS)
    yield ctx
    ctx.close()


def expect(*args, **kwargs):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(*args, **kwargs)


def open_demo(context, server):
    """The demo page in a new tab, recording every URL it asks for and every page error."""
    page = context.new_page()
    page.requested = []
    page.errors = []
    page.on("request", lambda request: page.requested.append(request.url))
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.goto(server.url + "/")
    return page


def join(page, name: str, room: str | None = None) -> None:
    page.get_by_label("Your name").fill(name)
    if room is not None:
        page.get_by_label("Room").fill(room)
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


def shot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    assert path.stat().st_size > 0
    return path


def demo_key() -> str:
    return DEMO_KEY_FILE.read_text().strip()


def stored(server, chat_id: str) -> list[dict]:
    """The chat's history over REST, with the demo tenant's key (the server wrote it)."""
    r = requests.get(f"{server.url}/api/v1/chats/{chat_id}/messages", params={"limit": 100},
                     headers={"X-API-Key": demo_key()}, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    return next(value for value in body.values() if isinstance(value, list))


def chat_id_of(page) -> str:
    return page.evaluate("() => window.workspaceChatDemo.session.chatId")


def watch_stream(page) -> None:
    """Record, for every agent bubble, its token count at each change while it streams."""
    page.evaluate("""() => {
        const log = document.querySelector('[role=log]');
        window.seenTokens = [];
        new MutationObserver(() => {
            for (const reply of log.querySelectorAll('.msg.agent[aria-busy=true]')) {
                window.seenTokens.push([reply.dataset.messageId, Number(reply.dataset.tokens)]);
            }
        }).observe(log, {subtree: true, childList: true, characterData: true,
                         attributes: true});
    }""")


# --- two people, one room --------------------------------------------------------------------

def test_two_people_in_one_room_see_each_other_typing_talking_and_the_stream_growing(
        demo_server, context, other_context):
    room = f"Team {uuid.uuid4().hex[:6]}"
    ann = open_demo(context, demo_server)
    join(ann, "Ann", room)
    bob = open_demo(other_context, demo_server)
    join(bob, "Bob", room.upper())  # a room is the same whatever its case
    assert chat_id_of(ann) == chat_id_of(bob)
    expect(bob.locator("#where")).to_contain_text(room)

    # Ann types: Bob sees it; it clears when her message arrives.
    ann.get_by_label("Message").press_sequentially("Hello Bob", delay=20)
    expect(bob.locator("#typing")).to_have_text("Ann is typing…")
    shot(bob, "typing-desktop")
    watch_stream(bob)
    words = " ".join(f"w{i}" for i in range(30))
    ann.get_by_label("Message").fill(f"Hello **Bob** {words}")
    ann.get_by_role("button", name="Send").click()

    mine = ann.get_by_role("log").locator(".msg.mine", has_text="Hello Bob")
    expect(mine).to_have_count(1)
    expect(mine.locator(".who")).to_have_text("You")
    theirs = bob.get_by_role("log").locator(".msg.other", has_text="Hello Bob")
    expect(theirs).to_have_count(1)
    expect(theirs.locator(".who")).to_have_text("Ann")
    expect(theirs.locator("strong")).to_have_text("Bob")
    for bubble in (mine, theirs):
        expect(bubble.locator("time")).to_have_text(re.compile(r"\d{1,2}[:.]\d{2}"))
        assert bubble.locator("time").get_attribute("datetime")
    expect(bob.locator("#typing")).to_have_text("")

    # The reply streams where both can see it; Bob watches it grow, and what he sends
    # meanwhile waits (pending) until the chat is free.
    reply = bob.get_by_role("log").locator(".msg.agent", has_text="w29")
    expect(bob.get_by_role("button", name="Stop")).to_be_visible()
    bob.get_by_label("Message").fill("Hi Ann")
    bob.get_by_label("Message").press("Enter")
    expect(bob.locator(".msg.pending", has_text="Hi Ann")).to_have_count(1)
    expect(reply).to_have_attribute("data-finish", "stop")
    expect(reply.locator(".who")).to_have_text("Echo bot")
    expect(bob.get_by_role("button", name="Stop")).to_be_hidden()
    reply_id = reply.get_attribute("data-message-id")
    counts = [n for message_id, n in bob.evaluate("() => window.seenTokens")
              if message_id == reply_id]
    assert len(set(counts)) >= 3, counts  # seen at three sizes at least before its end
    assert counts == sorted(counts), counts
    echo_reply(ann, "w29")
    expect(bob.locator(".msg.mine", has_text="Hi Ann")).to_have_count(1)
    expect(bob.locator(".msg.pending")).to_have_count(0)
    expect(bob.locator("#alert")).to_have_text("")
    shot(bob, "room-desktop-bob")

    # Bob's answer went out after the reply: Ann sees his name (learned after she joined).
    answer = ann.get_by_role("log").locator(".msg.other", has_text="Hi Ann")
    expect(answer.locator(".who")).to_have_text("Bob")
    echo_reply(ann, "Hi Ann")
    expect(ann.locator(".msg.agent")).to_have_count(2)
    shot(ann, "room-desktop-ann")
    # people and the agent look different; my messages differ from other people's
    colours = ann.evaluate("""() => ['.msg.mine', '.msg.other', '.msg.agent'].map(
        (s) => getComputedStyle(document.querySelector(s)).backgroundColor)""")
    assert len(set(colours)) == 3, colours
    for page in (ann, bob):
        only_this_server(page, demo_server)
        assert page.errors == []


def test_stop_shows_while_the_reply_streams_and_stops_it(demo_server, context):
    page = open_demo(context, demo_server)
    join(page, "Sam Stop")
    stop = page.get_by_role("button", name="Stop")
    expect(stop).to_be_hidden()
    send(page, "stop me " + "please " * 150)  # 150 words at 40 ms: six seconds
    busy = page.locator(".msg.agent[aria-busy=true]")
    expect(busy).to_have_count(1)
    expect(stop).to_be_visible()
    page.wait_for_function("() => Number(document.querySelector("
                           "'.msg.agent[aria-busy=true]')?.dataset.tokens) >= 3")
    shot(page, "streaming-desktop")
    stop.click()
    reply = page.locator(".msg.agent").last
    expect(reply).to_have_attribute("data-finish", "cancelled")
    expect(reply.locator(".note")).to_have_text("Stopped")
    expect(stop).to_be_hidden()
    assert reply.text_content().count("please") < 150
    expect(page.get_by_label("Message")).to_be_focused()
    # the chat is free again at once
    send(page, "after the stop")
    echo_reply(page, "after the stop")


def test_markdown_renders_and_nothing_in_a_message_runs(demo_server, context):
    page = open_demo(context, demo_server)
    join(page, "Mia Markdown")
    text = ("**bold** and `inline`\n\n```\nprint('code block')\n```\n\n"
            "<img src=x onerror=\"window.pwned='img'\"> <script>window.pwned='script'</script>"
            " [a link](javascript:window.pwned='link') <b onclick=\"window.pwned='b'\">b</b>")
    page.get_by_label("Message").fill(text)
    page.get_by_role("button", name="Send").click()
    log = page.get_by_role("log")
    for bubble in (log.locator(".msg.mine"), echo_reply(page, "code block")):
        expect(bubble.locator("strong")).to_have_text("bold")
        expect(bubble.locator("p code")).to_have_text("inline")
        expect(bubble.locator("pre code")).to_have_text("print('code block')\n")
        expect(bubble).to_contain_text("<img src=x")  # shown as the text it is
        expect(bubble).to_contain_text("<script>")
    assert log.locator("img, script, b, [onerror], [onclick]").count() == 0
    for href in log.locator("a").evaluate_all("(links) => links.map((a) => a.href)"):
        assert not href.lower().startswith("javascript:"), href
    assert page.evaluate("() => window.pwned") is None
    assert page.errors == []
    shot(page, "markdown-desktop")


# --- offline, the outbox, catching up -------------------------------------------------------

def test_sending_is_disabled_until_first_connected(demo_server, context):
    # Hold the server's side of the socket.io handshake back: the page has joined but is not
    # connected yet. (The client connects over WebSocket, which page.route does not see.)
    held, released, sockets = [], [], []

    def on_websocket(ws):
        server = ws.connect_to_server()
        sockets.append(ws)
        server.on_message(lambda message: ws.send(message) if released else held.append(message))

    context.route_web_socket(re.compile(r".*/socket\.io/.*"), on_websocket)
    page = open_demo(context, demo_server)
    page.get_by_label("Your name").fill("Nia Not-yet")
    page.get_by_role("button", name="Join").click()
    message, send_button = page.get_by_label("Message"), page.get_by_role("button", name="Send")
    expect(message).to_be_visible()
    expect(message).to_be_editable()
    expect(send_button).to_be_disabled()
    message.fill("too early")
    message.press("Enter")  # does nothing yet: no pending message, nothing queued
    assert page.locator(".msg").count() == 0
    assert page.evaluate("() => window.workspaceChatDemo.client.outbox.length") == 0
    expect(page.get_by_role("status")).to_have_attribute("data-state", "connecting")
    for _ in range(200):  # the handshake's answer reaches this process, not the page
        if held:
            break
        page.wait_for_timeout(25)
    assert sockets and held
    expect(send_button).to_be_disabled()
    released.append(True)
    for frame in held:
        sockets[0].send(frame)
    expect(page.get_by_role("status")).to_have_attribute("data-state", "connected")
    expect(send_button).to_be_enabled()
    expect(message).to_have_value("too early")
    message.press("Enter")
    echo_reply(page, "too early")


def test_offline_is_said_clearly_what_is_sent_waits_and_goes_out_once(demo_server, context):
    page = open_demo(context, demo_server)
    join(page, "Olu Offline")
    send(page, "before the drop")
    echo_reply(page, "before the drop")
    banner = page.locator("#offline")
    expect(banner).to_be_hidden()

    context.set_offline(True)
    expect(page.get_by_role("status")).to_have_attribute("data-state", "reconnecting")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("offline")
    send(page, "written while offline")
    pending = page.locator(".msg.pending", has_text="written while offline")
    expect(pending).to_have_count(1)
    expect(pending.locator(".note")).to_have_text("sending…")
    expect(page.get_by_label("Message")).to_have_value("")
    expect(page.locator("#alert")).to_have_text("")  # no red alert, only the banner
    assert page.evaluate("() => window.workspaceChatDemo.client.outbox.length") == 1
    shot(page, "offline-desktop")

    context.set_offline(False)
    expect(page.get_by_role("status")).to_have_attribute("data-state", "connected")
    expect(banner).to_be_hidden()
    expect(page.locator(".msg.pending")).to_have_count(0)
    expect(page.locator(".msg.mine", has_text="written while offline")).to_have_count(1)
    echo_reply(page, "written while offline")
    assert page.evaluate("() => window.workspaceChatDemo.client.outbox.length") == 0

    # A message whose connection drops right after it went out is sent again on reconnection
    # under the same client_message_id: stored once whichever side the drop cut.
    page.evaluate("""() => {
        const socket = window.workspaceChatDemo.socket;
        window.sentIds = [];
        socket.onAnyOutgoing((event, payload) => {
            if (event === 'message') window.sentIds.push(payload.client_message_id);
        });
        socket.onAnyOutgoing(function cut(event) {
            if (event !== 'message') return;
            socket.offAnyOutgoing(cut);
            queueMicrotask(() => socket.io.engine.close());
        });
    }""")
    send(page, "cut off in flight")
    expect(page.get_by_role("status")).to_have_attribute("data-state", "connected")
    echo_reply(page, "cut off in flight")
    expect(page.locator(".msg.mine", has_text="cut off in flight")).to_have_count(1)
    sent = page.evaluate("() => window.sentIds")
    assert len(sent) == 2 and sent[0] == sent[1], sent  # sent twice, under one id

    history = stored(demo_server, chat_id_of(page))
    contents = [m["content"] for m in history if m["role"] == "user"]
    assert contents == ["before the drop", "written while offline", "cut off in flight"], history
    only_this_server(page, demo_server)


def test_a_message_the_server_finds_busy_waits_and_goes_out_once_the_chat_is_free(
        demo_server, context):
    page = open_demo(context, demo_server)
    join(page, "Cy Busy")
    # Another message of this page's socket starts a reply, and in the same task Send is
    # pressed: the page's client has not seen the stream start, so the server may answer
    # chat_busy; either way the message waits as pending and goes out after the reply.
    page.get_by_label("Message").fill("queued behind a stream")
    page.evaluate("""async () => {
        const socket = window.workspaceChatDemo.socket;
        const {message_string} = await socket.emitWithAck('get_message_string', {});
        socket.emit('message', {content: 'w '.repeat(30) + 'finale', message_string});
        document.getElementById('send-button').click();
    }""")
    expect(page.locator(".msg.pending", has_text="queued behind a stream")).to_have_count(1)
    echo_reply(page, "finale")
    echo_reply(page, "queued behind a stream")
    expect(page.locator(".msg.pending")).to_have_count(0)
    expect(page.locator("#alert")).to_have_text("")
    contents = [m["content"] for m in stored(demo_server, chat_id_of(page)) if m["role"] == "user"]
    assert contents == ["w " * 30 + "finale", "queued behind a stream"], contents


def test_a_message_sent_while_a_reply_streams_waits_and_goes_out_after_it(demo_server, context):
    page = open_demo(context, demo_server)
    join(page, "Bo Busy")
    send(page, "first " + "word " * 40)  # about 1.6 s of streaming
    expect(page.locator(".msg.agent[aria-busy=true]")).to_have_count(1)
    send(page, "second, while it streams")
    pending = page.locator(".msg.pending", has_text="second, while it streams")
    expect(pending).to_have_count(1)
    expect(page.locator("#alert")).to_have_text("")
    echo_reply(page, "second, while it streams")
    expect(pending).to_have_count(0)
    mine = page.locator(".msg.mine")
    expect(mine).to_have_count(2)
    expect(mine.last).to_contain_text("second, while it streams")
    contents = [m["content"] for m in stored(demo_server, chat_id_of(page)) if m["role"] == "user"]
    assert contents[-1] == "second, while it streams" and len(contents) == 2, contents


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

    shot(page, "catch-up-desktop")
    only_this_server(page, demo_server)

    # The same name later, in a new tab: the same chat, its history shown.
    again = open_demo(context, demo_server)
    join(again, "Ann Browser")
    expect(again.get_by_role("log").locator(".msg")).to_have_count(8)
    expect(again.get_by_role("log")).to_contain_text("sent while you were away")


def test_on_a_phone_sized_screen_the_message_box_and_send_button_are_visible(
        demo_server, browser, tmp_path):
    ctx = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True,
                              device_scale_factor=2)
    ctx.set_default_timeout(TIMEOUT_MS)
    try:
        page = open_demo(ctx, demo_server)
        shot(page, "join-phone")
        join(page, "Pat Phone", f"phone {uuid.uuid4().hex[:6]}")
        message, send_button = page.get_by_label("Message"), page.get_by_role("button", name="Send")
        for element in (message, send_button, page.get_by_role("log")):
            expect(element).to_be_visible()
            expect(element).to_be_in_viewport()
            box = element.bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], box
            assert box["y"] + box["height"] <= PHONE["height"], box
        assert page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]
        for i in range(4):  # more than the screen holds: the log follows the newest reply
            send(page, f"tiny screen {i} " + "and `quite` a **few** words after it " * 4)
            echo_reply(page, f"tiny screen {i}")
        expect(echo_reply(page, "tiny screen 3")).to_be_in_viewport()
        expect(send_button).to_be_in_viewport()
        expect(message).to_be_in_viewport()
        assert page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]
        shot(page, "chat-phone")
        # offline on a phone: the banner fits, the composer stays
        ctx.set_offline(True)
        expect(page.locator("#offline")).to_be_visible()
        send(page, "sent from the train")
        expect(page.locator(".msg.pending")).to_have_count(1)
        expect(send_button).to_be_in_viewport()
        shot(page, "offline-phone")
        ctx.set_offline(False)
        echo_reply(page, "sent from the train")
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


def test_people_who_name_the_same_room_share_one_chat(demo_server):
    def seat(name, room=None):
        body = {"name": name} if room is None else {"name": name, "room": room}
        r = requests.post(demo_server.url + "/demo/join", json=body, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    room = f"Room {uuid.uuid4().hex[:8]}"
    ann, bob = seat("Ann Rest", room), seat("Bob Rest", f"  {room.lower()}\u0007 ")
    assert ann["chat_id"] == bob["chat_id"]
    assert ann["room"] == bob["room"] == room  # as the first one spelled it
    assert ann["user_id"] != bob["user_id"]
    assert ann["user_id"] == seat("Ann Rest")["user_id"]  # user ids as without a room
    assert bob["people"] == {ann["user_id"]: "Ann Rest", bob["user_id"]: "Bob Rest"}
    other = seat("Ann Rest", room + " 2")
    assert other["chat_id"] != ann["chat_id"]
    own = seat("Ann Rest")
    assert own["chat_id"] not in (ann["chat_id"], other["chat_id"]) and own["room"] is None
    assert seat("Ann Rest", "")["chat_id"] == own["chat_id"]  # an empty room: her own chat
    # the room's chat is in the demo workspace: both may connect to it
    for person in (ann, bob):
        sock = connect(demo_server.url, {"chat_id": person["chat_id"],
                                         "connection_string": person["connection_string"]})
        try:
            assert sock.connect_error is None, sock.connect_error
        finally:
            sock.disconnect()


@pytest.mark.parametrize("body", [{"name": "Ann", "room": "r" * 65}, {"name": "Ann", "room": 7}])
def test_join_with_an_unusable_room_is_a_validation_error(demo_server, body):
    r = requests.post(demo_server.url + "/demo/join", json=body, timeout=10)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "validation_error"
    assert "room" in r.json()["error"]["details"]


def test_the_demo_workspace_streams_slowly_enough_to_see(demo_server):
    r = requests.get(demo_server.url + "/api/v1/workspaces/user/demo",
                     headers={"X-API-Key": demo_key()}, timeout=10)
    assert r.status_code == 200, r.text
    workspaces = next(value for value in r.json().values() if isinstance(value, list))
    assert [w["agent"] for w in workspaces if w["name"] == "Demo"] == [
        {"kind": "echo", "delay_ms": 40}]


@pytest.mark.parametrize("body", [{"name": ""}, {"name": "  \t "}, {}, {"name": 7},
                                  {"name": "x" * 65}, None])
def test_join_without_a_usable_name_is_a_validation_error(demo_server, body):
    r = requests.post(demo_server.url + "/demo/join", json=body, timeout=10)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "validation_error"
    assert set(r.json()["error"]) == {"code", "message", "details"}
    assert "name" in r.json()["error"]["details"]


def test_the_page_and_its_scripts_come_from_the_app_itself(demo_server):
    import base64
    import hashlib
    import json

    page = requests.get(demo_server.url + "/", timeout=10)
    assert page.status_code == 200
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    # the one inline script is the import map, allowed by its hash
    inline = re.findall(r'<script type="importmap">(.*?)</script>', page.text, re.S)
    assert len(inline) == 1
    digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
    assert f"'sha256-{digest}'" in csp
    imports = json.loads(inline[0])["imports"]
    assert set(imports) == {"socket.io-client", "marked", "dompurify", "workspace-chat-client"}
    scripts = re.findall(r'<script[^>]* src="([^"]+)"', page.text)
    assert len(re.findall(r"<script", page.text)) == len(scripts) + 1
    for src in [*scripts, *imports.values()]:
        assert src.startswith("/"), src
        r = requests.get(demo_server.url + src, timeout=10)
        assert r.status_code == 200 and "javascript" in r.headers["Content-Type"], src
    client = requests.get(demo_server.url + imports["workspace-chat-client"], timeout=10).text
    assert client == (ROOT / "clients/js/src/index.js").read_text()
    for package, version in (("socket.io-client", "4.8.4"), ("marked", "18.2.1"),
                             ("dompurify", "3.5.0")):
        manifest = json.loads((ROOT / f"app/demo/node_modules/{package}/package.json").read_text())
        assert manifest["version"] == version, package
        assert json.loads((ROOT / "app/demo/package.json").read_text())["dependencies"][
            package] == version


def test_missing_javascript_libraries_are_a_clear_404(tmp_path, monkeypatch):
    from flask import Flask

    from app.demo import routes
    from app.errors import register_error_handlers

    monkeypatch.setattr(routes, "NODE_MODULES", str(tmp_path))
    app = Flask("demo_without_node_modules")
    app.register_blueprint(routes.bp)
    register_error_handlers(app)
    for name in ("socket.io.esm.min.js", "marked.esm.js", "purify.es.mjs"):
        error = assert_error(app.test_client().get(f"/demo/{name}"), 404, "not_found")
        assert "npm ci --prefix app/demo" in error["message"]
