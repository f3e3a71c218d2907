"""The Python client of Workspace Chat (``ChatClient``) and its terminal client
(``workspace-chat``, in ``app.client.terminal``). See docs/clients.md."""
from app.client.client import (
    ChatClient,
    ChatClientError,
    ChatError,
    ChatTimeoutError,
    ConnectionFailed,
    ConnectionRefused,
    NotConnectedError,
    ReplyPendingError,
    SentMessage,
    Session,
)

__all__ = [
    "ChatClient",
    "ChatClientError",
    "ChatError",
    "ChatTimeoutError",
    "ConnectionFailed",
    "ConnectionRefused",
    "NotConnectedError",
    "ReplyPendingError",
    "SentMessage",
    "Session",
]
