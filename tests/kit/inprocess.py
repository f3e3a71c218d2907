"""A /chat client inside the test process: Flask-SocketIO's ``socketio.test_client`` on the
``app`` fixture, no server process, no network (fast tests of the Socket.IO rules)."""
from __future__ import annotations

from typing import Any

NAMESPACE = "/chat"


class InProcessClient:
    """One connection to /chat of ``app``; keeps every event it received, in order."""

    def __init__(self, app, auth: dict[str, Any]):
        from app.extensions import socketio

        self.client = socketio.test_client(app, namespace=NAMESPACE, auth=auth)
        assert self.client.is_connected(NAMESPACE), f"refused: {auth}"
        self.events: list[tuple[str, Any]] = []

    def received(self, name: str | None = None) -> list[Any]:
        """The payloads of the events received so far (those called ``name``)."""
        self.events += [(packet["name"], packet["args"][0] if packet["args"] else None)
                        for packet in self.client.get_received(NAMESPACE)]
        return [data for event, data in self.events if name is None or event == name]

    @property
    def message_string(self) -> str:
        """The message string connection_established carried."""
        return self.received("connection_established")[0]["message_string"]

    def call(self, event: str, data: Any = None) -> Any:
        """Emit ``event`` and return its ack."""
        return self.client.emit(event, {} if data is None else data, namespace=NAMESPACE,
                                callback=True)

    def new_message_string(self) -> str:
        return self.call("get_message_string")["message_string"]

    def send(self, content: str, message_string: str, **extra: Any) -> dict:
        return self.call("message", {"content": content, "message_string": message_string,
                                     **extra})

    def disconnect(self) -> None:
        if self.client.is_connected(NAMESPACE):
            self.client.disconnect(NAMESPACE)
