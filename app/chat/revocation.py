"""Revocation ends sessions: removing a member, revoking an API key and deleting a workspace
end the live connections they affect, in every process.

A connection is authorised once, when it connects; what a revocation takes away afterwards
must reach the connections already open. Each adapter registers its live connections with the
client manager (``track``); a revocation, once its database change is committed, asks the
manager to end the matching ones, and the manager carries that request to every process
through Redis when REDIS_URL is set (app/chat/delivery.py). The client gets
``error {code, message, details}`` and is disconnected.
"""
from __future__ import annotations

from typing import Any, Iterable, Protocol

from app.chat.rooms import NAMESPACE, chat_room
from app.errors import ApiError
from app.extensions import socketio


class Connection(Protocol):
    """What a revocation matches a live connection by (app.chat.connections.Connection)."""

    sid: str
    tenant_id: str
    api_key_id: str | None
    workspace_id: str
    user_pk: int


def track(connection: Connection) -> None:
    """Register a live connection of this process, so that a revocation can end it."""
    socketio.server.manager.track_session(connection.sid, NAMESPACE, _tags(connection))


def _tags(connection: Connection) -> dict[str, Any]:
    """What an end request matches a connection by."""
    return {"tenant_id": connection.tenant_id, "api_key_id": connection.api_key_id,
            "workspace_id": connection.workspace_id, "user_pk": connection.user_pk}


def ended_since(connection: Connection, since: float) -> ApiError | None:
    """The refusal for a connection whose authorisation began at ``since`` (time.monotonic())
    when a revocation that covers it has ended sessions since; None otherwise."""
    if socketio.server is None:
        return None
    error = socketio.server.manager.ended_since(_tags(connection), since)
    return ApiError(error["code"], error["message"], error["details"]) if error else None


def end_sessions(tenant_id: str, code: str, message: str, *, api_key_id: str | None = None,
                 workspace_id: str | None = None, user_pk: int | None = None,
                 details: dict[str, Any] | None = None) -> None:
    """End the tenant's live connections that match every given criterion, on every process:
    each gets ``error {code, message, details}`` and is disconnected. Call after the commit."""
    if socketio.server is None:  # no Socket.IO server in this app (nothing is connected)
        return
    match: dict[str, Any] = {"tenant_id": tenant_id}
    for name, value in (("api_key_id", api_key_id), ("workspace_id", workspace_id),
                        ("user_pk", user_pk)):
        if value is not None:
            match[name] = value
    socketio.server.manager.end_sessions(match, ApiError(code, message, details).to_dict())


def end_key_sessions(tenant_id: str, api_key_id: str) -> None:
    """A revoked API key: end the connections it authenticated or whose string it issued."""
    end_sessions(tenant_id, "invalid_api_key", "The API key this connection was opened with "
                 "has been revoked.", api_key_id=api_key_id)


def end_member_sessions(tenant_id: str, workspace_id: str, user_pk: int) -> None:
    """A member removed from a workspace: end their connections to its chats."""
    end_sessions(tenant_id, "forbidden", "You are no longer a member of this chat's "
                 "workspace.", workspace_id=workspace_id, user_pk=user_pk,
                 details={"workspace_id": workspace_id})


def close_chats(chat_ids: Iterable[str]) -> None:
    """Chats that were deleted: their clients get ``chat_deleted`` and are disconnected, as
    when one chat is deleted (app.chat.chats.delete_chat)."""

    if socketio.server is None:
        return
    for chat_id in chat_ids:
        socketio.emit("chat_deleted", {"chat_id": chat_id}, to=chat_room(chat_id),
                      namespace=NAMESPACE)
        socketio.server.manager.disconnect_room(NAMESPACE, chat_room(chat_id))
