"""Catch-up: what a client joining a chat is sent, in order, and which of the room events
held meanwhile it still needs (app/chat/delivery.py holds them behind its gate)."""
from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select

from app.chat.connections import Connection, shared_state
from app.chat.messages import new_message_string
from app.chat.serialize import message_payload
from app.extensions import db
from app.models import Message
from app.state import StreamProgress
from app.tokens import to_iso

MAX_REPLAY = 500
#: How long a reconnecting client is told it was disconnected for not reading (seconds).
SLOW_CLIENT_NOTICE = 120


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
    return [message_payload(m) for m in reversed(rows[:MAX_REPLAY])], truncated


def connection_established(connection: Connection, message_string: dict[str, str],
                           history_truncated: bool,
                           slow_client: bool | None = None) -> dict[str, Any]:
    """The payload of ``connection_established``; ``slow_client``: whether the user's last
    connection to the chat was dropped for not reading (None: read it here)."""
    payload = {"chat_id": connection.chat_id, "user_id": connection.user_id,
               "sid": connection.sid, "message_string": message_string["message_string"],
               "message_string_expires_at": message_string["expires_at"],
               "server_time": to_iso(time.time())}
    if connection.last_message_id is not None:
        payload["history_truncated"] = history_truncated
    if slow_client is None:
        slow_client = shared_state().is_spent(_slow_client_key(connection))
    if slow_client:
        payload["disconnect_reason"] = "slow_client"
    return payload


def _slow_client_key(connection: Connection) -> str:
    return f"slow-client:{connection.tenant_id}:{connection.user_id}:{connection.chat_id}"


def note_slow_client(connection: Connection) -> None:
    """Remember that this user's connection to the chat was dropped for not reading, so that
    the ``connection_established`` of their next connection says so."""
    shared_state().spend(_slow_client_key(connection), SLOW_CLIENT_NOTICE)


def stream_progress(connection: Connection) -> StreamProgress | None:
    """The reply streaming in the connection's chat right now, if any."""
    return shared_state().stream_progress(connection.chat_id)


def stream_started_so_far(connection: Connection, progress: StreamProgress) -> dict[str, Any]:
    """``message_stream_started`` for a client that joins while a reply streams."""
    return {"message_id": progress.message_id, "chat_id": connection.chat_id,
            "reply_to": progress.reply_to, "content_so_far": progress.content}


STREAM_EVENTS = frozenset({"message_stream_started", "message_stream_token",
                           "message_stream_ended"})


class CatchUpFilter:
    """Which of the room events held while a client joined it, or still on their way to it,
    the client needs, in order.

    It already has: messages up to its ``last_message_id`` and those just replayed; the
    streaming reply's first ``progress.tokens`` tokens (sent as ``content_so_far``); replies
    that ended before the replay read them. It cannot use tokens of a stream it never saw
    start.

    ``events`` is what the filter still has to look at; it shrinks as each part settles, and
    an empty filter is dropped by the manager (app/chat/delivery.py), so that a connection
    pays for it only around its join:

    - ``message_received``: a chat's messages reach its room in id order (each is stored and
      broadcast under the chat's lock, on one channel), so once one newer than what the
      client has arrives, no older one can follow. A client without ``last_message_id``
      is replayed nothing and needs no message filter at all.
    - the stream events: a chat streams one reply at a time, so once the client has seen a
      stream start, or seen the end of the one it joined in the middle of, every later
      stream event belongs to a stream it saw start.
    """

    __slots__ = ("seen", "replayed_ids", "progress", "started", "events")

    def __init__(self, connection: Connection, replayed: list[dict],
                 progress: StreamProgress | None):
        self.seen = max([connection.last_message_id or 0] + [int(m["id"]) for m in replayed]) \
            if connection.last_message_id is not None else -1
        self.replayed_ids = {m["id"] for m in replayed}
        self.progress = progress
        self.started = {progress.message_id} if progress is not None else set()
        self.events = set(STREAM_EVENTS)
        if self.seen >= 0:
            self.events.add("message_received")

    def __call__(self, event: str, data: Any) -> bool:
        if event not in self.events or not isinstance(data, dict):
            return True
        if event == "message_received":
            if int(data["id"]) > self.seen:
                self.events.discard("message_received")
                return True
            return False
        message_id = data.get("message_id")
        progress = self.progress
        if event == "message_stream_started":
            if message_id in self.replayed_ids or message_id in self.started:
                return False
            self.events -= STREAM_EVENTS
            return True
        if message_id not in self.started:
            return False
        if event == "message_stream_token":
            return (progress is None or message_id != progress.message_id
                    or data["index"] >= progress.tokens)
        if progress is not None and message_id == progress.message_id:
            self.events -= STREAM_EVENTS  # the end of the stream it joined in the middle of
        return True


def catch_up_filter(connection: Connection, replayed: list[dict],
                    progress: StreamProgress | None) -> CatchUpFilter:
    """The filter for a joining client's held and in-flight room events (CatchUpFilter)."""
    return CatchUpFilter(connection, replayed, progress)


def catch_up(connection: Connection, first: bool):
    """What a client joining a chat is sent, in order, and the filter for its held events.

    Called after the client's room traffic is gated: ``user_created`` (first connection
    only), ``connection_established``, every missed message, the reply streaming now
    (``content_so_far``). The progress is read before the history, see catch_up_filter.
    """
    # the streaming reply and the slow-client note in one round trip (with Redis)
    progress, slow_client = shared_state().join_reads(connection.chat_id,
                                                      _slow_client_key(connection))
    missed, truncated = missed_messages(connection)
    established = connection_established(connection, new_message_string(connection),
                                         truncated, slow_client)
    events: list[tuple[str, dict]] = []
    if first:
        events.append(("user_created", {"user_id": connection.user_id}))
    events.append(("connection_established", established))
    events.extend(("message_received", message) for message in missed)
    if progress is not None:
        events.append(("message_stream_started", stream_started_so_far(connection, progress)))
    return events, catch_up_filter(connection, missed, progress)
