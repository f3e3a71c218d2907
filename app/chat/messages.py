"""Messages: message strings, the checks of a user's message in the contract's order, storing
it, broadcasting it and starting the agent's reply; stopping a reply."""
from __future__ import annotations

import time
import uuid
from typing import Any

from flask import current_app
from sqlalchemy import Connection as SAConnection
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from app.agents import agent_for
from app.agents.runner import ReplyJob, start_reply
from app.chat import limits
from app.chat.agent_config import workspace_agent
from app.chat.connections import Connection, shared_state
from app.chat.rooms import NAMESPACE, chat_room
from app.chat.serialize import message_object, message_payload
from app.errors import ApiError
from app.extensions import db, socketio
from app.models import Chat, Message, utcnow
from app.overload import accepted_work
from app.text import TEXT_ERROR, is_text
from app.tokens import claims_or_refuse, issue_message_string, to_iso

MAX_CONTENT = 4000


def new_message_string(connection: Connection, requested: bool = False) -> dict[str, str]:
    """A fresh single-use message string for this connection.

    ``requested``: the client asked for it (``get_message_string``); such requests have their
    own window of RATE_LIMIT_MESSAGES per connection, then ``rate_limited`` with
    ``details.retry_after``. The strings the server hands out by itself (in
    ``connection_established`` and each ack) are not counted.
    """
    if requested:
        retry_after = limits.connection_rate("message_string", "RATE_LIMIT_MESSAGES").hit(
            connection.sid)
        if retry_after is not None:
            raise ApiError("rate_limited", "Too many message string requests; slow down.",
                           {"retry_after": retry_after})
    token, expires = issue_message_string(connection.tenant_id, connection.user_id,
                                          connection.chat_id, connection.sid)
    return {"message_string": token, "expires_at": to_iso(expires)}



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
        elif not is_text(content):
            errors["content"] = [TEXT_ERROR]
    client_message_id = payload.get("client_message_id")
    if client_message_id is not None and (
            not isinstance(client_message_id, str) or not 1 <= len(client_message_id) <= 128
            or not is_text(client_message_id)):
        errors["client_message_id"] = ["Must be a string of 1-128 characters."]
    chat_id = payload.get("chat_id")
    if chat_id is not None and not isinstance(chat_id, str):
        errors["chat_id"] = ["Must be a string."]
    if errors:
        raise ApiError("validation_error", "The message is not valid.", errors)
    return content, client_message_id



def _spend_message_string(connection: Connection, token: Any) -> None:
    if not isinstance(token, str) or not token:
        raise ApiError("invalid_message_string", "A message string is required; ask for one "
                       "with get_message_string.")
    claims = claims_or_refuse("message_string", token)
    state = shared_state()
    if (claims["t"], claims["u"], claims["c"], claims["s"]) != (
            connection.tenant_id, connection.user_id, connection.chat_id, connection.sid):
        # another connection's: not spent here (that would burn it for its owner), and
        # "used" comes before "not yours" in the contract's order
        if state.is_spent(claims["j"]):
            raise _reused()
        raise ApiError("invalid_message_string",
                       "This message string was issued to another connection.")
    # Bound to this connection, which lives in this process: spent here, with no round trip
    # (app/state: spend_here), remembered a little longer than it lives, so that it can never
    # be used twice.
    if not state.spend_here(claims["j"], max(1.0, claims["exp"] - time.time()) + 5):
        raise _reused()


def _reused() -> ApiError:
    return ApiError("message_string_reused", "This message string has already been used.")


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

    Before all of them, an overloaded process refuses with ``server_busy`` (app/overload.py):
    nothing is checked, spent or stored, so the same message may be sent again as it is. The
    time an accepted message takes is what tells the process it is falling behind.
    """
    with accepted_work(shared_state().chat_lock_wait(connection.chat_id)):
        return _post_message(connection, payload)


def _post_message(connection: Connection, payload: Any) -> dict[str, Any]:
    content, client_message_id = _validate_message(payload)
    if payload.get("chat_id") is not None and payload["chat_id"] != connection.chat_id:
        raise ApiError("chat_mismatch", "This connection is joined to another chat.",
                       {"chat_id": connection.chat_id})
    _spend_message_string(connection, payload.get("message_string"))
    rate = limits.message_rate()
    reply_owner = None
    try:
        retry_after = rate.hit(connection.sid)
        if retry_after is not None:
            raise ApiError("rate_limited", "Too many messages; slow down.",
                           {"retry_after": retry_after})
        # kept in the process, forgotten when it changes (app/chat/agent_config.py)
        agent = workspace_agent(connection.tenant_id, connection.workspace_id)
        if client_message_id is not None and agent_for(agent) is not None:
            # a retry must not hold the chat busy, not even for a moment
            original = _existing_message(connection.chat_id, client_message_id)
            if original is not None:
                rate.undo(connection.sid)
                return _ack(connection, original)
        reply_owner = _claim_chat(connection.chat_id, agent)  # atomic by itself
        # The chat's lock orders its messages: stored, then broadcast, one at a time, so that
        # every client sees them in id order. Each round trip inside it is paid by every
        # message of the chat in turn, so inside are only the lock itself, one INSERT that
        # commits itself (one round trip on PostgreSQL) and the broadcast; a database
        # connection is held for the INSERT only (with 100 chats sending at once a pool of 20
        # ran dry when it was held across Redis round trips: bench/RESULTS.md).
        with shared_state().chat_lock(connection.chat_id):
            try:
                with db.engine.connect() as conn:
                    data = _store_message(conn, connection, content, client_message_id)
            except IntegrityError:
                original = (_existing_message(connection.chat_id, client_message_id)
                            if client_message_id is not None else None)
                if original is None:
                    chat_gone = db.session.get(Chat, connection.chat_id) is None
                    raise ApiError("chat_not_found" if chat_gone else "internal_error") from None
                rate.undo(connection.sid)
                if reply_owner is not None:
                    shared_state().clear_busy(connection.chat_id, reply_owner)
                return _ack(connection, original)
            socketio.emit("message_received", data, to=chat_room(connection.chat_id),
                          namespace=NAMESPACE)
    except ApiError as error:
        if reply_owner is not None:
            shared_state().clear_busy(connection.chat_id, reply_owner)
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
            shared_state().clear_busy(connection.chat_id, reply_owner)
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


def _store_message(conn: SAConnection, connection: Connection, content: str,
                   client_message_id: str | None) -> dict[str, Any]:
    """Insert and commit a user's message; returns it as the contract's message object.

    On a database server the INSERT commits itself: one round trip, paid by every message of
    the chat in turn under its lock. SQLite has no round trip to save, and switching its
    connection to autocommit and back costs a PRAGMA per message."""
    created_at = utcnow()
    autocommit = conn.dialect.name != "sqlite"
    if autocommit:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
    result = conn.execute(_INSERT_MESSAGE, {
        "chat_id": connection.chat_id, "role": "user", "user_id": connection.user_pk,
        "content": content, "client_message_id": client_message_id, "reply_to": None,
        "finish_reason": None, "created_at": created_at})
    message_id = result.inserted_primary_key[0]
    if not autocommit:
        conn.commit()
    return message_object(message_id, connection.chat_id, "user", connection.user_id, content,
                          client_message_id, None, created_at)


def _claim_chat(chat_id: str, agent: dict[str, Any]) -> str | None:
    """Refuse with ``chat_busy`` while a reply streams; when this message will get a reply,
    mark the chat busy at once (atomically), so that no second message slips in."""
    busy = ApiError("chat_busy", "The agent is still replying in this chat; wait for it or "
                    "stop it.")
    if agent_for(agent) is None:
        if shared_state().busy_owner(chat_id) is not None:
            raise busy
        return None
    owner = uuid.uuid4().hex
    ttl = float(current_app.config["AGENT_TIMEOUT"]) + 30
    if not shared_state().mark_busy(chat_id, owner, ttl):
        raise busy
    return owner

def _ack(connection: Connection, message: Message | None, data: dict | None = None,
         reply_expected: bool = False) -> dict[str, Any]:
    """The successful ack; ``reply_expected`` when the agent's reply to it will stream (a
    retry of a stored message answers false: its reply, if any, was started by the first)."""
    string = new_message_string(connection)
    return {"ok": True, "message": data or message_payload(message),
            "next_message_string": string["message_string"],
            "next_message_string_expires_at": string["expires_at"],
            "reply_expected": reply_expected}


def stop_generation(connection: Connection) -> bool:
    """Ask the reply streaming in the connection's chat to stop; False when none is."""
    owner = shared_state().busy_owner(connection.chat_id)
    if owner is None:
        return False
    shared_state().request_stop(connection.chat_id, owner, ttl=60)
    return True

