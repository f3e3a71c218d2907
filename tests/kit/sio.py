"""A Socket.IO client on /chat (python-socketio) that records every event it receives, in
order, with bounded waits on them."""
from __future__ import annotations

from typing import Any

import socketio
from engineio.payload import Payload

from tests.kit.record import Recorder
from tests.kit.wait import wait_until
from workspace_chat_client.client import OrderedSocketIOClient

# python-engineio's client drops a long-polling response holding more than 16 packets (a
# replay or a fast stream does hold more), so clients over polling must raise the limit.
Payload.max_decode_packets = 10_000

NAMESPACE = "/chat"


class ChatClient(Recorder):
    """A python-socketio client on /chat that records every event it receives, in order."""

    def __init__(self, sio: socketio.Client):
        super().__init__()
        self.sio = sio
        self.connect_error: Any = None

    def _record(self, event: str, *args: Any) -> None:
        self.record(event, args[0] if len(args) == 1 else list(args))

    def wait_disconnected(self, timeout: float = 10) -> None:
        # python-socketio's client announces a disconnection by no event of this namespace
        # that arrives in every case: its state is polled
        wait_until(lambda: not self.sio.connected, timeout,
                   "the server to disconnect the client", interval=0.02)

    @property
    def message_string(self) -> str:
        return self.wait_for("connection_established")[0]["message_string"]

    def call(self, event: str, data: Any = None, timeout: float = 10) -> Any:
        return self.sio.call(event, data if data is not None else {}, namespace=NAMESPACE,
                             timeout=timeout)

    def send(self, content: str, message_string: str, **extra: Any) -> dict:
        return self.call("message", {"content": content, "message_string": message_string,
                                     **extra})

    def disconnect(self) -> None:
        if self.sio.connected:
            self.sio.disconnect()


def connect(url: str, auth: dict | None = None, transport: str = "websocket",
            query: str = "") -> ChatClient:
    """Connect to /chat; on refusal the client is returned with ``connect_error`` set."""
    # python-socketio's own Client handles each packet in a new thread, so a loaded machine
    # could record events out of the order they arrived in.
    sio = OrderedSocketIOClient(reconnection=False)
    client = ChatClient(sio)
    sio.on("*", client._record, namespace=NAMESPACE)

    def on_connect_error(data: Any) -> None:
        client.connect_error = data

    sio.on("connect_error", on_connect_error, namespace=NAMESPACE)
    try:
        sio.connect(url + (f"?{query}" if query else ""), namespaces=[NAMESPACE], auth=auth,
                    transports=[transport], wait_timeout=10)
    except socketio.exceptions.ConnectionError:
        if client.connect_error is None:
            raise
    return client


def join(url: str, auth: dict, transport: str = "websocket",
         timeout: float = 10) -> ChatClient:
    """Connect and wait for connection_established; fails if refused."""
    client = connect(url, auth, transport)
    assert client.connect_error is None, client.connect_error
    client.wait_for("connection_established", timeout=timeout)
    return client


def refusal_code(client: ChatClient) -> str | None:
    """The contract code of a refused connection (python-socketio shape)."""
    error = client.connect_error
    if error is None:
        return None
    return (error.get("data") or {}).get("code")
