"""The chat service: the rules for chats, their history, connections and messages.

Every door (Socket.IO, plain WebSocket, REST) calls these functions; the order of the checks
of the public contract is written here once. Failures are raised as ApiError with the
contract's code, and each adapter renders them its own way.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping

from collections import deque

from flask import current_app, has_request_context
from limits import parse as parse_limit
from sqlalchemy import Connection as SAConnection
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError

from app.agents import agent_for
from app.agents.runner import ReplyJob, start_reply
from app.auth import current_api_key_id, find_api_key
from app.chat import revocation
from app.errors import ApiError
from app.extensions import db, socketio
from app.models import ApiKey, Chat, Message, Tenant, User, Workspace, may_be_id, utcnow
from app.pagination import paginate
from app.schemas import MAX_ID, USER_ID_ERROR, MessageSchema, is_valid_user_id
from app.state import SharedState, StreamProgress
from app.timefmt import iso_z
from app.tokens import (TokenExpired, TokenInvalid, issue_connection_string,
                        issue_message_string, to_iso, verify_connection_string,
                        verify_message_string)
from app.users import find_user, get_or_create_user
from app.workspaces.service import can_access, default_workspace, get_workspace

NAMESPACE = "/chat"
MAX_CONTENT = 4000
MAX_REPLAY = 500
_dump_message = MessageSchema().dump



def get_chat(tenant: Tenant, chat_id: str) -> Chat:
    """The tenant's chat, or ``chat_not_found``."""
    chat = db.session.get(Chat, chat_id) if may_be_id(chat_id) else None
    if chat is None or chat.tenant_id != tenant.id:
        raise ApiError("chat_not_found", f"Chat {chat_id!r} was not found.")
    return chat


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
    return paginate(query, [order_by], offset, limit, "messages")


def delete_chat(chat: Chat) -> None:
    """Delete a chat and its messages; its connected clients get ``chat_deleted`` and leave."""
    chat_id = chat.id
    db.session.delete(chat)
    db.session.commit()
    revocation.close_chats([chat_id])


def connection_string_for(tenant: Tenant, chat: Chat, user_id: str) -> dict[str, str]:
    """A connection string for the chat's workspace owner or a member, else ``forbidden``."""
    user = find_user(tenant.id, user_id)
    if user is None or not can_access(chat.workspace, user):
        raise ApiError("forbidden", "This user is neither the owner nor a member of the "
                       "chat's workspace.", {"user_id": user_id})
    # Bound to the request's API key (the demo issues without one): revoking it voids it.
    api_key_id = current_api_key_id() if has_request_context() else None
    if api_key_id is not None and db.session.get(ApiKey, api_key_id).tenant_id != tenant.id:
        api_key_id = None  # a stray header on a request that is not the tenant's (the demo)
    token, expires = issue_connection_string(tenant.id, user_id, chat.id, api_key_id)
    return {"connection_string": token, "chat_id": chat.id, "expires_at": to_iso(expires)}


# --- real-time: connections and messages ---------------------------------------------------

def chat_room(chat_id: str) -> str:
    """The Socket.IO room of a chat's connected clients."""
    return f"chat:{chat_id}"


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


def _state() -> SharedState:
    return current_app.extensions["chat_state"]


def _text_param(params: Mapping[str, Any], name: str, max_length: int = 4096) -> str | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > max_length:
        raise ApiError("validation_error", f"'{name}' must be a string.", {name: ["Not a string."]})
    if "\x00" in value or not _encodable(value):  # no database can look such a value up
        raise ApiError("validation_error", f"'{name}' must be valid text.",
                       {name: ["Must be valid text (no NUL characters or lone surrogates)."]})
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
        try:
            claims = verify_connection_string(connection_string)
        except TokenExpired:
            raise ApiError("connection_string_expired", "The connection string has expired; "
                           "ask for a new one.") from None
        except TokenInvalid:
            raise ApiError("invalid_connection_string",
                           "The connection string is not valid.") from None
        if claims["c"] != chat_id:
            raise ApiError("invalid_connection_string",
                           "The connection string was issued for another chat.")
        tenant = db.session.get(Tenant, claims["t"])
        if tenant is None:
            raise ApiError("invalid_connection_string", "The connection string is not valid.")
        api_key_id = claims.get("k")
        if api_key_id is not None:
            key = db.session.get(ApiKey, api_key_id)
            if key is None or key.tenant_id != tenant.id or key.revoked_at is not None:
                raise ApiError("invalid_connection_string", "The API key that issued this "
                               "connection string has been revoked; ask for a new one.")
        user_id = claims["u"]
    else:
        if not is_valid_user_id(user_id):
            raise ApiError("validation_error", "The user id is not valid.",
                           {"user_id": [USER_ID_ERROR]})
        key = find_api_key(api_key)
        if key is None:
            raise ApiError("invalid_api_key", "The API key is not valid.")
        tenant, api_key_id = key.tenant, key.id
    chat = db.session.get(Chat, chat_id)
    if chat is None or chat.tenant_id != tenant.id:
        raise ApiError("chat_not_found", f"Chat {chat_id!r} was not found.")
    user = find_user(tenant.id, user_id)
    if user is None or not can_access(chat.workspace, user):
        raise ApiError("forbidden", "This user is neither the owner nor a member of the "
                       "chat's workspace.")
    limit = current_app.config["MAX_CONNECTIONS_PER_TENANT"]
    if not _state().acquire_connection(tenant.id, sid, limit):
        raise ApiError("too_many_connections",
                       f"This tenant already has {limit} connections open.")
    connection = Connection(sid, tenant.id, user.id, user.external_id, chat.id,
                            chat.workspace_id, last_message_id, api_key_id)
    try:
        first = _mark_first_connection(user)
        # A revocation that committed after the checks above read the database, and ended
        # sessions before this one is registered (the adapter does that next, without
        # yielding), would miss it: refuse it as that revocation would have.
        revoked = revocation.ended_since(connection, started)
        if revoked is not None:
            raise revoked
    except Exception:
        _state().release_connection(tenant.id, sid)
        raise
    return connection, first


def _mark_first_connection(user: User) -> bool:
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
    _state().release_connection(connection.tenant_id, connection.sid)
    for name in ("message", "message_string", "typing"):  # its per-connection windows
        rate = current_app.extensions.get(f"chat_{name}_rate")
        if rate is not None:
            rate.forget(connection.sid)


def missed_messages(connection: Connection) -> tuple[list[dict], bool]:
    """The messages stored after the client's ``last_message_id``, oldest first, and whether
    there were more than MAX_REPLAY (then only the newest MAX_REPLAY are returned)."""
    if connection.last_message_id is None:
        return [], False
    rows = db.session.execute(
        select(Message).where(Message.chat_id == connection.chat_id,
                              Message.id > connection.last_message_id,
                              # a reply still streaming is sent as content_so_far instead
                              ~((Message.role == "agent") & Message.finish_reason.is_(None)))
        .order_by(Message.id.desc()).limit(MAX_REPLAY + 1)
    ).scalars().all()
    truncated = len(rows) > MAX_REPLAY
    return [_dump_message(m) for m in reversed(rows[:MAX_REPLAY])], truncated


def new_message_string(connection: Connection, requested: bool = False) -> dict[str, str]:
    """A fresh single-use message string for this connection.

    ``requested``: the client asked for it (``get_message_string``); such requests have their
    own window of RATE_LIMIT_MESSAGES per connection, then ``rate_limited`` with
    ``details.retry_after``. The strings the server hands out by itself (in
    ``connection_established`` and each ack) are not counted.
    """
    if requested:
        retry_after = _connection_rate("message_string", "RATE_LIMIT_MESSAGES").hit(
            connection.sid)
        if retry_after is not None:
            raise ApiError("rate_limited", "Too many message string requests; slow down.",
                           {"retry_after": retry_after})
    token, expires = issue_message_string(connection.tenant_id, connection.user_id,
                                          connection.chat_id, connection.sid)
    return {"message_string": token, "expires_at": to_iso(expires)}


def connection_established(connection: Connection, message_string: dict[str, str],
                           history_truncated: bool) -> dict[str, Any]:
    """The payload of ``connection_established``."""
    payload = {"chat_id": connection.chat_id, "user_id": connection.user_id,
               "sid": connection.sid, "message_string": message_string["message_string"],
               "message_string_expires_at": message_string["expires_at"],
               "server_time": to_iso(time.time())}
    if connection.last_message_id is not None:
        payload["history_truncated"] = history_truncated
    if _state().is_spent(_slow_client_key(connection)):
        payload["disconnect_reason"] = "slow_client"
    return payload


#: How long a reconnecting client is told it was disconnected for not reading (seconds).
SLOW_CLIENT_NOTICE = 120


def _slow_client_key(connection: Connection) -> str:
    return f"slow-client:{connection.tenant_id}:{connection.user_id}:{connection.chat_id}"


def note_slow_client(connection: Connection) -> None:
    """Remember that this user's connection to the chat was dropped for not reading, so that
    the ``connection_established`` of their next connection says so."""
    _state().spend(_slow_client_key(connection), SLOW_CLIENT_NOTICE)


class MessageRate:
    """The per-connection message rate (RATE_LIMIT_MESSAGES, a moving window).

    A connection lives in one process, so its window does too: a deque of the times of its
    last messages. (limits' MemoryStorage, used here before, runs a timer thread every 10 ms
    that walks every connection's window; under eventlet that was a green thread per tick
    and a walk over 5,000 keys, measured in bench/RESULTS.md.)
    """

    def __init__(self, limit: str) -> None:
        item = parse_limit(limit)
        self.amount, self.seconds = item.amount, item.get_expiry()
        self.windows: dict[str, deque] = {}

    def hit(self, key: str) -> float | None:
        """Count a message; None when allowed, else seconds until one more is."""
        now = time.monotonic()
        window = self.windows.get(key)
        if window is None:
            window = self.windows[key] = deque(maxlen=self.amount)
        if len(window) == self.amount and now - window[0] < self.seconds:
            return round(self.seconds - (now - window[0]), 3)
        window.append(now)
        return None

    def undo(self, key: str) -> None:
        """Take back the connection's last counted message (it was a retry)."""
        window = self.windows.get(key)
        if window:
            window.pop()

    def forget(self, key: str) -> None:
        self.windows.pop(key, None)


#: How often one connection's ``typing`` events are relayed; the rest are dropped silently.
TYPING_RATE = "2/second"


def _connection_rate(name: str, limit_setting: str | None = None,
                     limit: str | None = None) -> MessageRate:
    """The process's per-connection window ``name`` (like the message window, a connection
    lives in one process): its limit is the setting ``limit_setting``, or ``limit``."""
    key = f"chat_{name}_rate"
    rate = current_app.extensions.get(key)
    if rate is None:
        rate = current_app.extensions[key] = MessageRate(
            current_app.config[limit_setting] if limit_setting else limit)
    return rate


def _message_rate() -> MessageRate:
    return _connection_rate("message", "RATE_LIMIT_MESSAGES")


def _validate_message(payload: Any) -> tuple[str, str | None]:
    if not isinstance(payload, dict):
        raise ApiError("validation_error", "The message must be an object with 'content'.")
    content = payload.get("content")
    errors: dict[str, list[str]] = {}
    if not isinstance(content, str):
        errors["content"] = ["Must be a string."]
    else:
        content = content.strip()
        if not 1 <= len(content) <= MAX_CONTENT:
            errors["content"] = [f"Must be 1-{MAX_CONTENT} characters after trimming."]
        elif "\x00" in content or not _encodable(content):
            errors["content"] = ["Must be valid text (no NUL characters or lone surrogates)."]
    client_message_id = payload.get("client_message_id")
    if client_message_id is not None and (
            not isinstance(client_message_id, str) or not 1 <= len(client_message_id) <= 128
            or "\x00" in client_message_id or not _encodable(client_message_id)):
        errors["client_message_id"] = ["Must be a string of 1-128 characters."]
    chat_id = payload.get("chat_id")
    if chat_id is not None and not isinstance(chat_id, str):
        errors["chat_id"] = ["Must be a string."]
    if errors:
        raise ApiError("validation_error", "The message is not valid.", errors)
    return content, client_message_id


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _spend_message_string(connection: Connection, token: Any) -> None:
    if not isinstance(token, str) or not token:
        raise ApiError("invalid_message_string", "A message string is required; ask for one "
                       "with get_message_string.")
    try:
        claims = verify_message_string(token)
    except TokenExpired:
        raise ApiError("message_string_expired", "The message string has expired; ask for "
                       "a new one.") from None
    except TokenInvalid:
        raise ApiError("invalid_message_string", "The message string is not valid.") from None
    state = _state()
    if state.is_spent(claims["j"]):
        raise ApiError("message_string_reused", "This message string has already been used.")
    if (claims["t"], claims["u"], claims["c"], claims["s"]) != (
            connection.tenant_id, connection.user_id, connection.chat_id, connection.sid):
        raise ApiError("invalid_message_string",
                       "This message string was issued to another connection.")
    # Remember it a little longer than it lives, so it can never be used twice.
    if not state.spend(claims["j"], max(1.0, claims["exp"] - time.time()) + 5):
        raise ApiError("message_string_reused", "This message string has already been used.")


def _existing_message(chat_id: str, client_message_id: str) -> Message | None:
    return db.session.execute(
        select(Message).where(Message.chat_id == chat_id,
                              Message.client_message_id == client_message_id)
    ).scalar_one_or_none()


def post_message(connection: Connection, payload: Any) -> dict[str, Any]:
    """Check, store and broadcast a user's message; returns the successful ack.

    The checks, in the contract's order: payload shape and content, chat_id, the message
    string (genuine, unexpired, unused, this connection's), client_message_id idempotency,
    the per-connection rate, the chat's busy state.

    A repeated client_message_id is rare, so it is not looked up before every message: the
    unique constraint finds it when the message is stored, and a message refused for its
    rate or a busy chat is looked up then. Either way the retry gets its original, uses no
    rate, and stores nothing (one query per message instead of three; bench/RESULTS.md).
    """
    content, client_message_id = _validate_message(payload)
    if payload.get("chat_id") is not None and payload["chat_id"] != connection.chat_id:
        raise ApiError("chat_mismatch", "This connection is joined to another chat.",
                       {"chat_id": connection.chat_id})
    _spend_message_string(connection, payload.get("message_string"))
    rate = _message_rate()
    reply_owner = None
    try:
        retry_after = rate.hit(connection.sid)
        if retry_after is not None:
            raise ApiError("rate_limited", "Too many messages; slow down.",
                           {"retry_after": retry_after})
        # The chat's lock is taken before the first query, so no database connection is held
        # while waiting for it (under load a pool of 15 connections ran dry that way).
        with _state().chat_lock(connection.chat_id), db.engine.connect() as conn:
            agent = _workspace_agent(conn, connection.workspace_id)
            if client_message_id is not None and agent_for(agent) is not None:
                # a retry must not hold the chat busy, not even for a moment
                original = _existing_message(connection.chat_id, client_message_id)
                if original is not None:
                    rate.undo(connection.sid)
                    return _ack(connection, original)
            reply_owner = _claim_chat(connection.chat_id, agent)
            try:
                data = _store_message(conn, connection, content, client_message_id)
            except IntegrityError:
                conn.rollback()
                original = (_existing_message(connection.chat_id, client_message_id)
                            if client_message_id is not None else None)
                if original is None:
                    chat_gone = db.session.get(Chat, connection.chat_id) is None
                    raise ApiError("chat_not_found" if chat_gone else "internal_error") from None
                rate.undo(connection.sid)
                if reply_owner is not None:
                    _state().clear_busy(connection.chat_id, reply_owner)
                return _ack(connection, original)
            socketio.emit("message_received", data, to=chat_room(connection.chat_id),
                          namespace=NAMESPACE)
    except ApiError as error:
        if reply_owner is not None:
            _state().clear_busy(connection.chat_id, reply_owner)
        original = (_existing_message(connection.chat_id, client_message_id)
                    if client_message_id is not None
                    and error.code in ("rate_limited", "chat_busy") else None)
        if original is None:
            raise
        if error.code != "rate_limited":
            rate.undo(connection.sid)
        return _ack(connection, original)
    except BaseException:
        if reply_owner is not None:
            _state().clear_busy(connection.chat_id, reply_owner)
        raise
    if reply_owner is not None:
        start_reply(ReplyJob(connection.tenant_id, connection.workspace_id, connection.chat_id,
                             chat_room(connection.chat_id), int(data["id"]), reply_owner,
                             agent))
    return _ack(connection, None, data, reply_expected=reply_owner is not None)


# The message path uses a Core connection and statements built once: an ORM session per
# message (made for each Socket.IO event), its unit of work and SQLAlchemy building a new
# statement's cache key each time cost more than the queries themselves (bench/RESULTS.md).
_INSERT_MESSAGE = insert(Message.__table__)
_SELECT_AGENT = select(Workspace.__table__.c.agent).where(
    Workspace.__table__.c.id == bindparam("workspace_id"))


def _store_message(conn: SAConnection, connection: Connection, content: str,
                   client_message_id: str | None) -> dict[str, Any]:
    """Insert and commit a user's message; returns it as the contract's message object."""
    created_at = utcnow()
    result = conn.execute(_INSERT_MESSAGE, {
        "chat_id": connection.chat_id, "role": "user", "user_id": connection.user_pk,
        "content": content, "client_message_id": client_message_id, "reply_to": None,
        "finish_reason": None, "created_at": created_at})
    message_id = result.inserted_primary_key[0]
    conn.commit()
    return message_object(message_id, connection.chat_id, "user", connection.user_id, content,
                          client_message_id, None, created_at)


def _workspace_agent(conn: SAConnection, workspace_id: str) -> dict[str, Any]:
    agent = conn.execute(_SELECT_AGENT, {"workspace_id": workspace_id}).scalar_one_or_none()
    return dict(agent or {"kind": "none"})


def _claim_chat(chat_id: str, agent: dict[str, Any]) -> str | None:
    """Refuse with ``chat_busy`` while a reply streams; when this message will get a reply,
    mark the chat busy at once (atomically), so that no second message slips in."""
    busy = ApiError("chat_busy", "The agent is still replying in this chat; wait for it or "
                    "stop it.")
    if agent_for(agent) is None:
        if _state().busy_owner(chat_id) is not None:
            raise busy
        return None
    owner = uuid.uuid4().hex
    ttl = float(current_app.config["AGENT_TIMEOUT"]) + 30
    if not _state().mark_busy(chat_id, owner, ttl):
        raise busy
    return owner


def message_payload(message: Message, user_id: str | None) -> dict[str, Any]:
    """A stored message as the contract's message object (no lazy load needed)."""
    return message_object(message.id, message.chat_id, message.role, user_id, message.content,
                          message.client_message_id, message.reply_to, message.created_at)


def message_object(message_id: int, chat_id: str, role: str, user_id: str | None,
                   content: str, client_message_id: str | None, reply_to: int | None,
                   created_at: datetime) -> dict[str, Any]:
    """The contract's message object from a message's columns."""
    return {"id": str(message_id), "chat_id": chat_id, "role": role, "user_id": user_id,
            "content": content, "client_message_id": client_message_id,
            "reply_to": str(reply_to) if reply_to is not None else None,
            "created_at": iso_z(created_at)}


def _ack(connection: Connection, message: Message | None, data: dict | None = None,
         reply_expected: bool = False) -> dict[str, Any]:
    """The successful ack; ``reply_expected`` when the agent's reply to it will stream (a
    retry of a stored message answers false: its reply, if any, was started by the first)."""
    string = new_message_string(connection)
    return {"ok": True, "message": data or _dump_message(message),
            "next_message_string": string["message_string"],
            "next_message_string_expires_at": string["expires_at"],
            "reply_expected": reply_expected}


def typing_payload(connection: Connection, payload: Any) -> dict[str, Any] | None:
    """Validate a ``typing`` event; returns what the other clients get, or None when the
    event is dropped: at most TYPING_RATE are relayed per connection, the rest silently (no
    error, no ack), and the adapters then emit nothing."""
    is_typing = payload.get("is_typing") if isinstance(payload, dict) else None
    if not isinstance(is_typing, bool):
        raise ApiError("validation_error", "'is_typing' must be true or false.",
                       {"is_typing": ["Must be a boolean."]})
    if _connection_rate("typing", limit=TYPING_RATE).hit(connection.sid) is not None:
        return None
    return {"user_id": connection.user_id, "is_typing": is_typing}


def stop_generation(connection: Connection) -> bool:
    """Ask the reply streaming in the connection's chat to stop; False when none is."""
    owner = _state().busy_owner(connection.chat_id)
    if owner is None:
        return False
    _state().request_stop(connection.chat_id, owner, ttl=60)
    return True


def stream_progress(connection: Connection) -> StreamProgress | None:
    """The reply streaming in the connection's chat right now, if any."""
    return _state().stream_progress(connection.chat_id)


def stream_started_so_far(connection: Connection, progress: StreamProgress) -> dict[str, Any]:
    """``message_stream_started`` for a client that joins while a reply streams."""
    return {"message_id": progress.message_id, "chat_id": connection.chat_id,
            "reply_to": progress.reply_to, "content_so_far": progress.content}


def catch_up_filter(connection: Connection, replayed: list[dict],
                    progress: StreamProgress | None):
    """Which of the room events held while a client joined it still needs, in order.

    It already has: messages up to its ``last_message_id`` and those just replayed; the
    streaming reply's first ``progress.tokens`` tokens (sent as ``content_so_far``); replies
    that ended before the replay read them. It cannot use tokens of a stream it never saw
    start.
    """
    seen = max([connection.last_message_id or 0] + [int(m["id"]) for m in replayed]) \
        if connection.last_message_id is not None else -1
    replayed_ids = {m["id"] for m in replayed}
    started = {progress.message_id} if progress is not None else set()

    def keep(event: str, data: Any) -> bool:
        if not isinstance(data, dict):
            return True
        if event == "message_received":
            return int(data["id"]) > seen
        message_id = data.get("message_id")
        if event == "message_stream_started":
            if message_id in replayed_ids or message_id in started:
                return False
            started.add(message_id)
            return True
        if event in ("message_stream_token", "message_stream_ended"):
            if message_id not in started:
                return False
            if (event == "message_stream_token" and progress is not None
                    and message_id == progress.message_id):
                return data["index"] >= progress.tokens
            return True
        return True

    return keep


def catch_up(connection: Connection, first: bool):
    """What a client joining a chat is sent, in order, and the filter for its held events.

    Called after the client's room traffic is gated: ``user_created`` (first connection
    only), ``connection_established``, every missed message, the reply streaming now
    (``content_so_far``). The progress is read before the history, see catch_up_filter.
    """
    progress = stream_progress(connection)
    missed, truncated = missed_messages(connection)
    established = connection_established(connection, new_message_string(connection),
                                         truncated)
    events: list[tuple[str, dict]] = []
    if first:
        events.append(("user_created", {"user_id": connection.user_id}))
    events.append(("connection_established", established))
    events.extend(("message_received", message) for message in missed)
    if progress is not None:
        events.append(("message_stream_started", stream_started_so_far(connection, progress)))
    return events, catch_up_filter(connection, missed, progress)
