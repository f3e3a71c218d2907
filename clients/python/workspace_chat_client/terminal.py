"""``workspace-chat``: an interactive chat in the terminal, on ``ChatClient``.

    workspace-chat --url http://localhost:8000 --api-key KEY --user ann [--chat CHAT_ID]

Without ``--chat`` a new chat is created (in the user's default workspace, or in
``--workspace``) and its id printed. Each line typed is sent; the messages of others and the
agent's streamed replies are printed as they arrive. Ctrl-D leaves (exit status 0); a refused
connection prints why and exits with status 1.
"""
from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import uuid
from typing import Any, Optional, TextIO

from workspace_chat_client.client import (
    ChatClient,
    ChatClientError,
    ChatError,
    ConnectionFailed,
    ConnectionRefused,
    NotConnectedError,
    ReplyPendingError,
)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def _sentence(error: ChatError) -> str:
    """``message (code)``, without the message's final full stop."""
    return f"{error.message.rstrip('.')} ({error.code})"


class Screen:
    """Prints lines and streamed replies; a reply streams on one line, ended by a newline."""

    def __init__(self, out: TextIO, err: TextIO):
        self.out = out
        self.err = err
        self.lock = threading.Condition()
        self.open_stream: Optional[str] = None   # the reply whose line is being written
        self.printed: dict[str, str] = {}         # reply id -> the text printed of it

    def _write(self, stream: TextIO, text: str) -> None:
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):  # the terminal went away
            pass

    def _close_line(self) -> None:
        if self.open_stream is not None:
            self._write(self.out, "\n")
            self.open_stream = None

    def line(self, text: str, error: bool = False) -> None:
        with self.lock:
            self._close_line()
            self._write(self.err if error else self.out, text + "\n")

    def stream_text(self, message_id: str, text: str) -> None:
        """Print more of a reply, on its line (opening one if needed)."""
        with self.lock:
            if self.open_stream != message_id:
                self._close_line()
                self._write(self.out, "agent: ")
                self.open_stream = message_id
            self.printed[message_id] = self.printed.get(message_id, "") + text
            if text:
                self._write(self.out, text)

    def stream_catch_up(self, message_id: str, full_text: str) -> None:
        """Print what ``full_text`` has beyond what was printed of the reply."""
        have = self.printed.get(message_id, "")
        if full_text.startswith(have):
            self.stream_text(message_id, full_text[len(have):])
        else:
            self.stream_text(message_id, "")

    def stream_end(self, message_id: str, content: str, finish_reason: Optional[str]) -> None:
        self.stream_catch_up(message_id, content)
        with self.lock:
            if finish_reason not in (None, "stop"):
                self._write(self.out, f" [{finish_reason}]")
            self._write(self.out, "\n")
            self.open_stream = None
            self.printed.pop(message_id, None)
            self.lock.notify_all()

    def wait_streams_ended(self, timeout: float) -> bool:
        """Wait until every reply this screen printed a part of has been ended on it."""
        with self.lock:
            return self.lock.wait_for(lambda: not self.printed, timeout)


class TerminalChat:
    """Wires a ChatClient to the screen and to the lines typed."""

    def __init__(self, client: ChatClient, screen: Screen):
        self.client = client
        self.screen = screen
        self.sent_ids: set[str] = set()   # client_message_ids of the lines sent from here
        self.inbox: "queue.Queue[tuple[str, Any]]" = queue.Queue()
        self.connections = 0
        self.stream_errors: dict[str, ChatError] = {}
        client.on_message(self.on_message)
        client.on_stream_start(self.on_stream_start)
        client.on_token(self.on_token)
        client.on_stream_end(self.on_stream_end)
        client.on_error(self.on_error)
        client.on_connect(self.on_connect)
        client.on_disconnect(self.on_disconnect)

    # -- what arrives ---------------------------------------------------------------------

    def on_message(self, message: dict) -> None:
        if message.get("client_message_id") in self.sent_ids:
            return  # typed here: the terminal shows it already
        content = str(message.get("content") or "")
        role = message.get("role")
        if role == "agent":
            # a reply that ended while the connection was away, replayed in full
            self.screen.stream_end(str(message.get("id")), content, None)
        elif role == "system":
            self.screen.line(f"* {content}")
        else:
            self.screen.line(f"{message.get('user_id') or '?'}: {content}")

    def on_stream_start(self, data: dict) -> None:
        self.screen.stream_catch_up(str(data.get("message_id")),
                                    str(data.get("content_so_far") or ""))

    def on_token(self, data: dict) -> None:
        self.screen.stream_text(str(data.get("message_id")), str(data.get("token") or ""))

    def on_stream_end(self, data: dict) -> None:
        message_id = str(data.get("message_id"))
        self.screen.stream_end(message_id, str(data.get("content") or ""),
                               data.get("finish_reason"))
        error = self.stream_errors.pop(message_id, None)
        if error is not None:
            self.on_error(error)

    def on_error(self, error: ChatError) -> None:
        message_id = str(error.details.get("message_id"))
        if error.code == "agent_error" and message_id == self.screen.open_stream:
            self.stream_errors[message_id] = error  # said after the reply's line ends
            return
        if isinstance(error, ConnectionRefused):
            self.screen.line(f"Connection refused: {_sentence(error)}", error=True)
        else:
            self.screen.line(f"Error: {_sentence(error)}", error=True)

    def on_connect(self, data: dict) -> None:
        self.connections += 1
        if self.connections > 1:
            self.screen.line("Reconnected.")

    def on_disconnect(self, info: dict) -> None:
        if info.get("reconnecting"):
            self.screen.line("Connection lost; reconnecting...", error=True)
        elif info.get("reason") != "client disconnect":
            if info.get("reason") == "chat deleted":
                self.screen.line("The chat was deleted.", error=True)
            else:
                self.screen.line(f"Disconnected: {info.get('reason')}", error=True)
            self.inbox.put(("closed", None))

    # -- what is typed --------------------------------------------------------------------

    def read_input(self, stdin: TextIO) -> None:
        """The stdin thread: every line typed, then EOF."""
        try:
            while True:
                line = stdin.readline()
                if not line:
                    break
                self.inbox.put(("line", line))
        except (OSError, ValueError):
            pass
        self.inbox.put(("eof", None))

    def send(self, text: str) -> None:
        if not self.client.wait_idle():
            self.screen.line("Error: the agent is still replying; try again later.",
                             error=True)
            return
        client_message_id = uuid.uuid4().hex
        self.sent_ids.add(client_message_id)
        try:
            self.client.send(text, client_message_id=client_message_id)
        except ReplyPendingError as error:
            self.screen.line(f"Error: {_sentence(error)}", error=True)
        except ChatError as error:
            self.screen.line(f"Error: {_sentence(error)}", error=True)
        except NotConnectedError as error:
            self.screen.line(f"Not sent: {error}", error=True)
        except ChatClientError as error:
            self.screen.line(f"Not sent: {error}", error=True)

    def run(self, stdin: TextIO) -> int:
        threading.Thread(target=self.read_input, args=(stdin,), name="stdin",
                         daemon=True).start()
        while True:
            kind, value = self.inbox.get()
            if kind == "eof":
                if not _interactive(stdin):
                    # piped input (`echo hello | workspace-chat ...`): the reply to the last
                    # line is what the caller is waiting for, so it is shown before leaving
                    # (and its line ended on the screen: callbacks run in their own thread)
                    if self.client.wait_idle():
                        self.screen.wait_streams_ended(self.client.timeout)
                return EXIT_OK
            if kind == "closed":
                return EXIT_ERROR
            text = value.rstrip("\r\n")
            if text.strip():
                self.send(text)


def _interactive(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="workspace-chat",
        description="Chat in a Workspace Chat chat from the terminal. Each line typed is "
                    "sent; messages and streamed replies are printed as they arrive. "
                    "Ctrl-D leaves.")
    parser.add_argument("--url", default=os.environ.get("WORKSPACE_CHAT_URL",
                                                        "http://localhost:8000"),
                        help="the server's URL (default: $WORKSPACE_CHAT_URL or "
                             "http://localhost:8000)")
    parser.add_argument("--api-key", default=os.environ.get("WORKSPACE_CHAT_API_KEY"),
                        help="the tenant's API key (default: $WORKSPACE_CHAT_API_KEY)")
    parser.add_argument("--user", required=True, help="your user id in the tenant")
    parser.add_argument("--chat", help="the chat to join (default: create a new one)")
    parser.add_argument("--title", help="the title of the new chat (without --chat)")
    parser.add_argument("--workspace", help="the workspace of the new chat (without --chat; "
                                            "default: your personal workspace)")
    parser.add_argument("--transport", choices=("websocket", "polling"), default="websocket",
                        help="the Socket.IO transport (default: websocket)")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for the server (default: 10)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.api_key:
        print("workspace-chat: an API key is needed: --api-key KEY or $WORKSPACE_CHAT_API_KEY",
              file=sys.stderr)
        return 2
    out, err = sys.stdout, sys.stderr
    screen = Screen(out, err)
    client = ChatClient(args.url, args.api_key, args.user, transports=(args.transport,),
                        timeout=args.timeout)
    chat = TerminalChat(client, screen)
    try:
        chat_id = args.chat
        if chat_id is None:
            try:
                created = client.create_chat(title=args.title, workspace_id=args.workspace)
            except ChatError as error:
                screen.line(f"Could not create a chat: {_sentence(error)}", error=True)
                return EXIT_ERROR
            chat_id = created["id"]
            screen.line(f"Created chat {chat_id} (rejoin it with --chat {chat_id})")
        try:
            client.connect(chat_id)
        except ConnectionRefused as error:
            screen.line(f"Connection refused: {_sentence(error)}", error=True)
            return EXIT_ERROR
        screen.line(f"Connected to chat {chat_id} as {args.user}. Type a message and press "
                    "Enter; Ctrl-D leaves.")
        status = chat.run(sys.stdin)
        if status == EXIT_OK:
            screen.line("Bye.")
        return status
    except ConnectionFailed as error:
        screen.line(f"Cannot reach the server: {error}", error=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        screen.line("")
        return EXIT_INTERRUPTED
    finally:
        client.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
