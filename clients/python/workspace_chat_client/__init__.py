"""The Python client of Workspace Chat (``ChatClient``) and its terminal client
(``workspace-chat``, in ``workspace_chat_client.terminal``). See docs/clients.md."""
from workspace_chat_client.client import (
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
