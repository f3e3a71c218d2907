"""Every client a test opens (Socket.IO and /ws/chat), closed at its end: the ``clients``
fixture of tests/conftest.py."""
from __future__ import annotations

from typing import Any

from tests.kit.plain import PlainClient
from tests.kit.sio import ChatClient, connect


class Clients:
    """The test's socket clients, all closed at its end."""

    def __init__(self, timeout: float = 10) -> None:
        self.all: list[Any] = []
        self.timeout = timeout  # the bound of each wait, unless a call gives its own

    def add(self, client: Any) -> Any:
        self.all.append(client)
        return client

    def try_connect(self, url: str, auth: dict | None, **kwargs: Any) -> ChatClient:
        """A Socket.IO client on /chat, refused or not (see ``connect``)."""
        return self.add(connect(url, auth, **kwargs))

    def open(self, url: str, auth: dict, timeout: float | None = None) -> ChatClient:
        """A Socket.IO client on /chat past connection_established."""
        client = self.try_connect(url, auth)
        assert client.connect_error is None, (url, client.connect_error)
        client.wait_for("connection_established", timeout=timeout or self.timeout)
        return client

    def plain(self, url: str, **params: str) -> PlainClient:
        """A /ws/chat client past connection_established (each read bounded by the timeout)."""
        client = self.add(PlainClient(url, timeout=self.timeout, **params))
        client.until("connection_established")
        return client

    def close_all(self) -> None:
        for client in self.all:
            try:
                client.disconnect() if isinstance(client, ChatClient) else client.close()
            except Exception:  # a client whose server is gone, or already closed
                pass
