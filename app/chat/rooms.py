"""The ``/chat`` namespace and the names of its rooms, written once."""
from __future__ import annotations

from typing import Any

#: The Socket.IO namespace of chats; /ws/chat clients are registered under it too.
NAMESPACE = "/chat"
ROOM_PREFIX = "chat:"


def chat_room(chat_id: str) -> str:
    """The room of a chat's connected clients."""
    return f"{ROOM_PREFIX}{chat_id}"


def is_chat_room(name: Any) -> bool:
    """Whether a Socket.IO room name is a chat's room."""
    return isinstance(name, str) and name.startswith(ROOM_PREFIX)
