"""The contract's message object, built in one place for live events, replay, acks and REST."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from app.models import Message
from app.timefmt import iso_z


def message_object(message_id: int, chat_id: str, role: str, user_id: str | None,
                   content: str, client_message_id: str | None, reply_to: int | None,
                   created_at: datetime) -> dict[str, Any]:
    """The contract's message object from a message's columns (ids as exact strings)."""
    return {"id": str(message_id), "chat_id": chat_id, "role": role, "user_id": user_id,
            "content": content, "client_message_id": client_message_id,
            "reply_to": str(reply_to) if reply_to is not None else None,
            "created_at": iso_z(created_at)}


def message_payload(message: Message) -> dict[str, Any]:
    """A stored message as the contract's message object (its user is loaded with it)."""
    user_id = message.user.external_id if message.user is not None else None
    return message_object(message.id, message.chat_id, message.role, user_id, message.content,
                          message.client_message_id, message.reply_to, message.created_at)
