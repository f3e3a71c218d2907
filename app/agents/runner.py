"""The agent runner: one background task per reply, owning everything but the tokens.

It stores the reply as a ``role: agent`` message when the stream starts (so its id is real),
emits ``message_stream_started`` / ``message_stream_token`` (index from 0, no gaps; at most
one per ``STREAM_FLUSH_MS``, tokens that come meanwhile joined) / ``message_stream_ended``,
keeps the progress in the shared state for clients that join mid-stream, honours
``stop_generation`` (``cancelled``) and ``AGENT_TIMEOUT`` (``timeout``), reports failures
(``error`` plus an ``agent_error`` event) and always stores what arrived.
The agent itself runs in a task of its own and hands tokens over through a queue, so that a
stalled agent can neither hold the chat busy past the timeout nor delay a stop.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from flask import Flask, current_app
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError

from app.agents import AgentContext, AgentError, agent_for
from app.chat.rooms import NAMESPACE
from app.chat.serialize import message_payload
from app.extensions import db, socketio
from app.models import Message

HISTORY_LIMIT = 50
#: How often a waiting runner looks for a stop signal, in seconds.
STOP_POLL = 0.2


@dataclass(frozen=True)
class ReplyJob:
    """What the runner needs to answer one user message."""

    tenant_id: str
    workspace_id: str
    chat_id: str
    room: str
    user_message_id: int
    owner: str
    config: dict[str, Any]


#: The replies this process is streaming, so that a shutdown can end them cleanly.
_active: dict[str, "Reply"] = {}


def end_all_replies() -> None:
    """Ask every reply of this process to end now (``cancelled``), as on SIGTERM."""
    for reply in list(_active.values()):
        reply.shutting_down = True


def active_replies() -> int:
    """How many replies this process is streaming."""
    return len(_active)


def end_interrupted_replies() -> int:
    """End (``error``) the replies a dead process left "streaming"; returns how many.

    A process killed mid-stream (SIGKILL, OOM, power loss) never stores its reply's end, and
    a reply without ``finish_reason`` is treated as streaming for ever: never replayed to
    reconnecting clients, never in an agent's history. Called when a server starts. A reply
    in a chat that is busy may belong to another live process, so it is left alone; the
    runner ends it when the chat's next reply begins (if among the messages it reads).
    """
    state = current_app.extensions["chat_state"]
    stuck = db.session.execute(
        select(Message.id, Message.chat_id)
        .where(Message.role == "agent", Message.finish_reason.is_(None))).all()
    ended = 0
    for message_id, chat_id in stuck:
        if state.busy_owner(chat_id) is None:
            ended += db.session.execute(
                update(Message).where(Message.id == message_id,
                                      Message.finish_reason.is_(None))
                .values(finish_reason="error")).rowcount
    db.session.commit()
    return ended


def start_reply(job: ReplyJob) -> None:
    """Answer a user message in the background (the chat is already marked busy by ``owner``)."""
    app = current_app._get_current_object()
    socketio.start_background_task(_run, app, job)


def _run(app: Flask, job: ReplyJob) -> None:
    with app.app_context():
        try:
            Reply(app, job).run()
        except Exception:
            app.logger.exception("agent reply failed", extra={"chat_id": job.chat_id,
                                                                "tenant_id": job.tenant_id})
            app.extensions["chat_state"].clear_busy(job.chat_id, job.owner)
        finally:
            db.session.remove()


class Reply:
    """One agent reply, from stored-empty to ended."""

    def __init__(self, app: Flask, job: ReplyJob):
        self.app = app
        self.job = job
        self.state = app.extensions["chat_state"]
        self.timeout = float(app.config["AGENT_TIMEOUT"])
        self.tokens: list[str] = []
        self.events = 0  # message_stream_token events sent (their next index)
        self.interrupted: list[int] = []  # replies before this one left unended by a crash
        self.shutting_down = False

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        socketio.emit(event, data, to=self.job.room, namespace=NAMESPACE)

    def _context(self, user_message: Message) -> AgentContext:
        rows = db.session.execute(
            select(Message).where(Message.chat_id == self.job.chat_id,
                                  Message.id < user_message.id)
            .order_by(Message.id.desc()).limit(HISTORY_LIMIT)).scalars().all()
        history = [message_payload(m) for m in reversed(rows)
                   if not (m.role == "agent" and m.finish_reason is None)]
        self.interrupted = [m.id for m in rows if m.role == "agent" and m.finish_reason is None]
        return AgentContext(self.job.tenant_id, self.job.workspace_id, self.job.chat_id,
                            message_payload(user_message), history, self.job.config,
                            self.timeout)

    def run(self) -> None:
        _active[self.job.owner] = self
        try:
            self._run()
        finally:
            _active.pop(self.job.owner, None)

    def _run(self) -> None:
        job = self.job
        user_message = db.session.get(Message, job.user_message_id)
        agent = agent_for(job.config)
        if user_message is None or agent is None:
            self.state.clear_busy(job.chat_id, job.owner)
            return
        context = self._context(user_message)
        if self.interrupted:
            # This task holds the chat's busy claim, so a reply before it that is still
            # "streaming" belongs to a process that died (with Redis, another one): end it.
            db.session.execute(update(Message).where(Message.id.in_(self.interrupted),
                                                     Message.finish_reason.is_(None))
                               .values(finish_reason="error"))
        reply = Message(chat_id=job.chat_id, role="agent", content="", reply_to=user_message.id)
        db.session.add(reply)
        try:
            db.session.commit()
        except SQLAlchemyError:  # the chat was deleted meanwhile
            db.session.rollback()
            self.state.clear_busy(job.chat_id, job.owner)
            return
        message_id = str(reply.id)
        self.state.stream_begin(job.chat_id, message_id, str(user_message.id),
                                ttl=self.timeout + 60)
        self._emit("message_stream_started", {"message_id": message_id, "chat_id": job.chat_id,
                                              "reply_to": str(user_message.id)})
        started = time.monotonic()
        finish_reason, failure = self._stream(agent, context, message_id)
        metrics = self.app.extensions["metrics"]
        kind = str(job.config.get("kind"))
        metrics.agent_replies.labels(kind, finish_reason).inc()
        metrics.agent_reply_seconds.labels(kind).observe(time.monotonic() - started)
        content = "".join(self.tokens)
        reply.content = content
        reply.finish_reason = finish_reason
        try:
            db.session.commit()
        except SQLAlchemyError:
            db.session.rollback()
            self.app.logger.warning("could not store the reply in chat %s", job.chat_id)
        self.state.stream_end(job.chat_id, message_id)
        self.state.clear_busy(job.chat_id, job.owner)  # free before the stream is said to end
        if failure is not None:
            self._emit("error", {"code": "agent_error", "message": failure,
                                 "details": {"message_id": message_id,
                                             "finish_reason": finish_reason}})
        self._emit("message_stream_ended", {"message_id": message_id, "chat_id": job.chat_id,
                                            "content": content, "finish_reason": finish_reason})

    def _stream(self, agent, context: AgentContext, message_id: str) -> tuple[str, str | None]:
        job = self.job
        eio = socketio.server.eio
        queue = eio.create_queue()
        stop = eio.create_event()

        def produce() -> None:
            tokens = None
            try:
                with self.app.app_context():
                    tokens = agent.stream(context)
                    for token in tokens:
                        if stop.is_set():
                            break
                        queue.put(("token", token))
                queue.put(("done", None))
            except AgentError as exc:
                queue.put(("error", f"The agent failed: {exc}."))
            except BaseException:
                # BaseException: an agent's SystemExit or KeyboardInterrupt must end its reply,
                # not the process (under eventlet one escaping a green thread ended the worker).
                self.app.logger.exception("agent raised", extra={
                    "chat_id": job.chat_id, "tenant_id": job.tenant_id})
                queue.put(("error", "The agent failed."))
            finally:
                close = getattr(tokens, "close", None)
                if close is not None:
                    try:
                        close()
                    except BaseException:  # a generator that raises even when closed
                        pass

        socketio.start_background_task(produce)
        try:
            return self._relay(queue, eio.get_queue_empty_exception(), message_id)
        finally:
            stop.set()

    def _relay(self, queue, empty: type[BaseException],
               message_id: str) -> tuple[str, str | None]:
        """Pass the agent's tokens on as events until it ends, fails, is stopped or times out.

        With ``STREAM_FLUSH_MS`` (the window) above 0, at most one event goes out per window:
        a token that comes after a quiet window goes out at once, tokens that come within the
        window after the last event are held and go out joined as one event when it closes,
        and held text goes out before the reply ends, whatever ends it.
        """
        job = self.job
        window = self.app.config.get("STREAM_FLUSH_MS", 20) / 1000.0
        held: list[str] = []
        last_event = float("-inf")  # when the last token event went out
        deadline = time.monotonic() + self.timeout

        def flush() -> None:
            nonlocal last_event
            if not held:
                return
            text = "".join(held)
            held.clear()
            # Progress first, then the event: a client joining in between reads a progress
            # that already holds this event and drops the event by its index.
            self.state.stream_append(job.chat_id, message_id, text)
            self._emit("message_stream_token", {"message_id": message_id,
                                                "chat_id": job.chat_id,
                                                "token": text, "index": self.events})
            self.events += 1
            last_event = time.monotonic()

        try:
            while True:
                if self.shutting_down or self.state.stop_requested(job.chat_id, job.owner):
                    return "cancelled", None
                now = time.monotonic()
                remaining = deadline - now
                if remaining <= 0:
                    return "timeout", f"The agent did not finish within {self.timeout:g} s."
                wait = min(remaining, STOP_POLL)
                if held:
                    closes = last_event + window - now
                    if closes <= 0:
                        flush()
                        continue
                    wait = min(wait, closes)
                try:
                    kind, value = queue.get(timeout=wait)
                except empty:
                    continue
                if kind == "done":
                    return "stop", None
                if kind == "error":
                    return "error", value
                if isinstance(value, str) and value:
                    self.tokens.append(value)
                    held.append(value)
                    if time.monotonic() - last_event >= window:
                        flush()  # a quiet window (or none at all): out at once
        finally:
            flush()
