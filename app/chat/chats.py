"""Chats: create, look up (always within a tenant), list, delete, and connection strings."""
from __future__ import annotations

from typing import Any

from flask import has_request_context
from sqlalchemy import select

from app.auth import current_api_key_id
from app.chat import revocation
from app.chat.serialize import message_payload
from app.errors import ApiError
from app.extensions import db
from app.models import ApiKey, Chat, Message, Tenant, User, may_be_id
from app.pagination import paginate
from app.tokens import issue_connection_string, to_iso
from app.users import find_user, get_or_create_user
from app.workspaces.service import can_access, default_workspace, get_workspace


def get_chat(tenant_id: str, chat_id: str) -> Chat:
    """The tenant's chat, or ``chat_not_found`` (another tenant's chat is not found either)."""
    chat = db.session.get(Chat, chat_id) if may_be_id(chat_id) else None
    if chat is None or chat.tenant_id != tenant_id:
        raise ApiError("chat_not_found", f"Chat {chat_id!r} was not found.")
    return chat


def require_participant(tenant_id: str, chat: Chat, user_id: str,
                        details: dict[str, Any] | None = None) -> User:
    """The user, if they own the chat's workspace or are a member of it; else ``forbidden``."""
    user = find_user(tenant_id, user_id)
    if user is None or not can_access(chat.workspace, user):
        raise ApiError("forbidden", "This user is neither the owner nor a member of the "
                       "chat's workspace.", details)
    return user


def create_chat(tenant: Tenant, user_id: str, workspace_id: str | None = None,
                title: str | None = None, metadata: dict[str, Any] | None = None) -> Chat:
    """Create a chat in a workspace the user owns (their default workspace if none is given)."""
    if workspace_id:
        workspace = get_workspace(tenant, workspace_id)
        if workspace.owner.external_id != user_id:
            raise ApiError("forbidden", "Only the workspace's owner may create chats in it.",
                           {"workspace_id": workspace_id})
        user = workspace.owner
    else:
        user = get_or_create_user(tenant.id, user_id)
        workspace = default_workspace(tenant, user)
    chat = Chat(tenant_id=tenant.id, workspace=workspace, user=user, title=title,
                meta=metadata or {})
    db.session.add(chat)
    db.session.commit()
    return chat


def list_user_chats(tenant: Tenant, user_id: str, offset: int, limit: int) -> dict:
    """One page of the chats a user created, oldest first."""
    user = find_user(tenant.id, user_id)
    if user is None:
        return {"chats": [], "total": 0, "offset": offset, "limit": limit, "has_more": False}
    query = select(Chat).where(Chat.tenant_id == tenant.id, Chat.user_id == user.id)
    return paginate(query, [Chat.created_at, Chat.id], offset, limit, "chats")
def list_messages(chat: Chat, offset: int, limit: int, order: str = "asc",
                  after_id: int | None = None, before_id: int | None = None) -> dict:
    """One page of a chat's history in storage order; ``after_id``/``before_id`` bound it."""
    query = select(Message).where(Message.chat_id == chat.id)
    if after_id is not None:
        query = query.where(Message.id > after_id)
    if before_id is not None:
        query = query.where(Message.id < before_id)
    order_by = Message.id.desc() if order == "desc" else Message.id.asc()
    page = paginate(query, [order_by], offset, limit, "messages")
    page["messages"] = [message_payload(message) for message in page["messages"]]
    return page


def delete_chat(chat: Chat) -> None:
    """Delete a chat and its messages; its connected clients get ``chat_deleted`` and leave."""
    chat_id = chat.id
    db.session.delete(chat)
    db.session.commit()
    revocation.close_chats([chat_id])


def connection_string_for(tenant: Tenant, chat: Chat, user_id: str) -> dict[str, str]:
    """A connection string for the chat's workspace owner or a member, else ``forbidden``."""
    require_participant(tenant.id, chat, user_id, {"user_id": user_id})
    # Bound to the request's API key (the demo issues without one): revoking it voids it.
    api_key_id = current_api_key_id() if has_request_context() else None
    if api_key_id is not None and db.session.get(ApiKey, api_key_id).tenant_id != tenant.id:
        api_key_id = None  # a stray header on a request that is not the tenant's (the demo)
    token, expires = issue_connection_string(tenant.id, user_id, chat.id, api_key_id)
    return {"connection_string": token, "chat_id": chat.id, "expires_at": to_iso(expires)}

