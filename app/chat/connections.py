"""Connections: who may join a chat, counted per tenant, and what each connection may do.

A connection is authorised once, when it connects (Socket.IO or /ws/chat); what it may do
afterwards is fixed in its ``Connection``. Revocations end it (app/chat/revocation.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping

from flask import current_app
from sqlalchemy import Row, Select, and_, bindparam, select, update

from app.auth import find_api_key
from app.chat import limits, revocation
from app.errors import ApiError
from app.extensions import db
from app.models import (ApiKey, Chat, Tenant, User, Workspace, WorkspaceMember, may_be_id,
                        utcnow)
from app.schemas import MAX_ID, require_valid_user_id
from app.state import SharedState
from app.text import TEXT_ERROR, is_text
from app.tokens import claims_or_refuse


@dataclass(frozen=True)
class Connection:
    """What a live connection is allowed to do, fixed when it connected."""

    sid: str
    tenant_id: str
    user_pk: int
    user_id: str
    chat_id: str
    workspace_id: str
    last_message_id: int | None = None
    #: The API key it authenticated with, or that issued its connection string (revoking
    #: that key ends the connection); None for a string issued without a key (the demo).
    api_key_id: str | None = None


def shared_state() -> SharedState:
    """This app's shared runtime state (memory, or Redis when REDIS_URL is set)."""
    return current_app.extensions["chat_state"]


def _text_param(params: Mapping[str, Any], name: str, max_length: int = 4096) -> str | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > max_length:
        raise ApiError("validation_error", f"'{name}' must be a string.", {name: ["Not a string."]})
    if not is_text(value):  # no database can look such a value up
        raise ApiError("validation_error", f"'{name}' must be valid text.", {name: [TEXT_ERROR]})
    return value


def _message_id_param(value: Any) -> int | None:
    if value is None or value == "":
        return None
    # ASCII digits only ("²".isdigit() is true, int("²") fails) and within a 64-bit id
    if isinstance(value, bool) or not isinstance(value, (str, int)) \
            or not (str(value).isascii() and str(value).isdigit()) or len(str(value)) > 19 \
            or int(value) > MAX_ID:
        raise ApiError("validation_error", "'last_message_id' must be a message id.",
                       {"last_message_id": ["Must be a message id."]})
    return int(value)


def authorize_connection(sid: str, auth: Any, query: Mapping[str, Any]) -> tuple[Connection, bool]:
    """Check a connection's credentials and count it; returns it and whether it is the user's first.

    ``auth`` is the Socket.IO auth payload; the same fields are accepted as query parameters.
    Refusals: validation_error, invalid_connection_string, connection_string_expired,
    invalid_api_key, chat_not_found, forbidden, too_many_connections.
    """
    started = time.monotonic()
    if auth is not None and not isinstance(auth, dict):
        raise ApiError("validation_error", "The auth payload must be an object.")
    params = {**{k: v for k, v in query.items()}, **(auth or {})}
    chat_id = _text_param(params, "chat_id", 64)
    connection_string = _text_param(params, "connection_string")
    api_key = _text_param(params, "api_key", 256)
    user_id = _text_param(params, "user_id", 128)
    last_message_id = _message_id_param(params.get("last_message_id"))
    if chat_id is None or not (connection_string or (api_key and user_id)):
        raise ApiError("validation_error", "Send chat_id with either connection_string, or "
                       "api_key and user_id.", {"chat_id": ["Required."]} if chat_id is None
                       else {"connection_string": ["Required (or api_key and user_id)."]})
    if connection_string:
        claims = claims_or_refuse("connection_string", connection_string)
        if claims["c"] != chat_id:
            raise ApiError("invalid_connection_string",
                           "The connection string was issued for another chat.")
        tenant_id, api_key_id, user_id = claims["t"], claims.get("k"), claims["u"]
        found = _lookup(tenant_id, chat_id, user_id, api_key_id)
        if found is None:  # no such tenant
            raise ApiError("invalid_connection_string", "The connection string is not valid.")
        if api_key_id is not None and (found.key_tenant_id != tenant_id
                                       or found.key_revoked_at is not None):
            # no such key (the tenant column is then NULL), another tenant's, or revoked
            raise ApiError("invalid_connection_string", "The API key that issued this "
                           "connection string has been revoked; ask for a new one.")
    else:
        require_valid_user_id(user_id)
        key = find_api_key(api_key)
        if key is None:
            raise ApiError("invalid_api_key", "The API key is not valid.")
        tenant_id, api_key_id = key.tenant_id, key.id
        found = _lookup(tenant_id, chat_id, user_id, None, in_session=True)
        if found is None:  # the key's tenant is gone (deleted since the key was read)
            raise ApiError("chat_not_found", f"Chat {chat_id!r} was not found.")
    # as app.chat.chats.get_chat and require_participant refuse (another tenant's chat is
    # not found either; a user who neither owns the workspace nor is a member is forbidden)
    if found.chat_id is None or not may_be_id(chat_id):
        raise ApiError("chat_not_found", f"Chat {chat_id!r} was not found.")
    if found.user_pk is None or (found.owner_id != found.user_pk and found.member is None):
        raise ApiError("forbidden", "This user is neither the owner nor a member of the "
                       "chat's workspace.")
    user = Participant(found.user_pk, found.user_external_id, found.first_connected_at)
    limit = current_app.config["MAX_CONNECTIONS_PER_TENANT"]
    if not shared_state().acquire_connection(tenant_id, sid, limit):
        raise ApiError("too_many_connections",
                       f"This tenant already has {limit} connections open.")
    connection = Connection(sid, tenant_id, user.id, user.external_id, found.chat_id,
                            found.workspace_id, last_message_id, api_key_id)
    try:
        first = _mark_first_connection(user)
        # A revocation that committed after the checks above read the database, and ended
        # sessions before this one is registered (the adapter does that next, without
        # yielding), would miss it: refuse it as that revocation would have.
        revoked = revocation.ended_since(connection, started)
        if revoked is not None:
            raise revoked
    except Exception:
        shared_state().release_connection(tenant_id, sid)
        raise
    return connection, first


@dataclass(frozen=True)
class Participant:
    """The connecting user, as the authorisation query read them."""

    id: int
    external_id: str
    first_connected_at: datetime | None


@lru_cache(maxsize=1)
def _lookup_statement() -> Select:
    """Everything a connection's authorisation reads, in one SELECT built once: the tenant
    (the row itself: none when there is no such tenant), the API key that issued a connection
    string, the chat (within the tenant), its workspace's owner, the user (within the tenant)
    and their membership of the workspace. Each part is NULL when not found."""
    tenants, keys, chats = Tenant.__table__, ApiKey.__table__, Chat.__table__
    workspaces, users, members = (Workspace.__table__, User.__table__,
                                  WorkspaceMember.__table__)
    joined = (
        tenants
        .outerjoin(keys, keys.c.id == bindparam("key_id"))
        .outerjoin(chats, and_(chats.c.id == bindparam("chat_id"),
                               chats.c.tenant_id == tenants.c.id))
        .outerjoin(workspaces, workspaces.c.id == chats.c.workspace_id)
        .outerjoin(users, and_(users.c.tenant_id == tenants.c.id,
                               users.c.external_id == bindparam("user_id")))
        .outerjoin(members, and_(members.c.workspace_id == workspaces.c.id,
                                 members.c.user_id == users.c.id)))
    return (select(tenants.c.id.label("tenant_id"),
                   keys.c.tenant_id.label("key_tenant_id"),
                   keys.c.revoked_at.label("key_revoked_at"),
                   chats.c.id.label("chat_id"),
                   chats.c.workspace_id.label("workspace_id"),
                   workspaces.c.owner_id.label("owner_id"),
                   users.c.id.label("user_pk"),
                   users.c.external_id.label("user_external_id"),
                   users.c.first_connected_at.label("first_connected_at"),
                   members.c.user_id.label("member"))
            .select_from(joined).where(tenants.c.id == bindparam("tenant_id")))


def _lookup(tenant_id: str, chat_id: str, user_id: str, key_id: str | None, *,
            in_session: bool = False) -> Row | None:
    """The row of _lookup_statement, or None when there is no such tenant.

    Read on a connection of its own, not through the ORM session: a connect that is not the
    user's first writes nothing and needs no session at all. ``in_session``: the ORM session
    has read already (the API key), so read in its transaction (with SQLite in memory both
    would share one connection, and closing ours would roll the session's back)."""
    params = {"tenant_id": tenant_id, "chat_id": chat_id, "user_id": user_id,
              "key_id": key_id}
    if in_session:
        return db.session.connection().execute(_lookup_statement(), params).first()
    with db.engine.connect() as connection:
        return connection.execute(_lookup_statement(), params).first()


def _mark_first_connection(user: Participant) -> bool:
    """Record the user's first socket connection; True only for that very first one."""
    if user.first_connected_at is not None:  # no write (and no commit) on every connect
        return False
    result = db.session.execute(
        update(User).where(User.id == user.id, User.first_connected_at.is_(None))
        .values(first_connected_at=utcnow()))
    db.session.commit()
    return result.rowcount == 1


def release_connection(connection: Connection) -> None:
    """Stop counting a connection that has ended."""
    shared_state().release_connection(connection.tenant_id, connection.sid)
    limits.forget_connection(connection.sid)

