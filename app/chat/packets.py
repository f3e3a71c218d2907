"""Socket.IO input that is not a well-formed packet: refused with a warning, never a traceback.

python-socketio and python-engineio raise from deep inside their receive loops on frames a
client library never sends (invalid JSON, JSON nested too deeply, an event that is not a
``[name, ...args]`` list, a binary frame without its header, a text frame that is not an
Engine.IO packet). They log a traceback per frame, answer nothing, and for a bad Engine.IO
frame end the request without closing the session, which then keeps counting against its
tenant's connection limit until the ping timeout. Socket.IO's reference server closes a
connection whose packet it cannot decode, and so do we, cleanly and with one warning line.
A client may also not emit the reserved event names (``connect``, ``disconnect``, ...):
python-socketio would dispatch them to the connect and disconnect handlers.
"""
from __future__ import annotations

import io
import logging
import socket
from typing import Any
from urllib.parse import parse_qs

from engineio import packet as eio_packet
from engineio import payload as eio_payload

from app.overrides import engineio as eio_overrides
from app.overrides.eventlet import bound_message_size
from app.overrides.eventlet_websocket import DirectSender, RestOfFrame
from app.overrides.simple_websocket import limit_reader
from app.overrides.socketio import (MalformedPacket, StrictPacket, awaits_attachment,
                                    forget_binary_packet, forget_session)

__all__ = ["MalformedPacket", "StrictPacket", "refuse_malformed_input", "end_session"]

#: What python-engineio accepts from a client; any other type ends the session.
_CLIENT_EIO_PACKET_TYPES = (eio_packet.CLOSE, eio_packet.PONG, eio_packet.MESSAGE,
                            eio_packet.UPGRADE)
end_session = eio_overrides.end_session


def _is_engineio_packet(frame: Any) -> bool:
    if not isinstance(frame, str):
        return True  # a binary frame is a binary message
    try:
        eio_packet.Packet(encoded_packet=frame)
    except Exception:
        return False
    return True


class _FrameGuard:
    """A server websocket whose ``wait`` ends the connection on a frame that is not an
    Engine.IO packet (as if the client had closed it), instead of raising out of the
    Engine.IO receive loop; throttles the frames one session may send (back-pressure: past
    its token bucket the reader waits, and the client's TCP buffers fill); and counts what
    the Engine.IO writer sends against the session's unsent bytes (app/chat/transport.py)."""

    def __init__(self, ws: Any, logger: logging.Logger, session: Any = None,
                 sleep: Any = None, max_message: int | None = None):
        self._ws = ws
        self._logger = logger
        self._session = session
        self._sleep = sleep
        queue = getattr(session, "queue", None)
        self._direct = DirectSender.for_websocket(ws) if hasattr(queue, "direct") else None
        if self._direct is not None:
            queue.direct = self._direct  # used once the session is upgraded (transport.py)
        if max_message:
            bound_message_size(ws, max_message)

    def wait(self) -> Any:
        if self._session is not None and self._session.closed:
            return None  # the session is over: what the client still sends is not read
        frame = self._ws.wait()
        if frame is not None and not _is_engineio_packet(frame):
            self._logger.warning("closing a Socket.IO connection that sent a frame that is "
                                 "not an Engine.IO packet")
            return None
        bucket = getattr(self._session, "inbound", None)
        if frame is not None and bucket is not None and self._sleep is not None:
            delay = bucket.take(1)
            if delay > 0:
                self._sleep(delay)
        return frame

    def send(self, data: Any) -> Any:
        try:
            if type(data) is RestOfFrame:  # the end of a frame the direct path began
                return self._direct.send_rest(data)
            return self._ws.send(data)
        finally:
            sent = getattr(getattr(self._session, "queue", None), "sent", None)
            if sent is not None:
                sent(len(data) + (1 if isinstance(data, bytes) else 0))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ws, name)


def refuse_malformed_input(server: Any, logger: logging.Logger,
                           body_timeout: float = 10) -> None:
    """Close, with one warning, connections that send malformed packets to ``server``
    (a socketio.Server created with ``serializer=StrictPacket``)."""
    eio = server.eio
    eio_overrides.wrap_message_handler(
        eio, lambda handle_message: _refusing_messages(server, logger, handle_message))
    eio_overrides.wrap_handle_request(
        eio, lambda handle_request: _refusing_requests(eio, logger, handle_request,
                                                       body_timeout))
    max_message = int(eio.max_http_buffer_size)
    eio_overrides.guard_websockets(
        eio,
        wrap=lambda ws, session: _FrameGuard(ws, logger, session, eio.sleep, max_message),
        on_request=_note_tcp_socket,
        # simple-websocket (gevent) reads a message of any size unless told, and reads
        # frames as fast as they come into a list of its own
        configure_reader=lambda server_args, session: limit_reader(
            server_args, max_message, eio.sleep, session, MAX_BUFFERED_FRAMES))


def _note_tcp_socket(session: Any, environ: dict) -> None:
    if session is not None:
        session.tcp = environ.get("gunicorn.socket")  # see app/chat/transport.py


def _refusing_messages(server: Any, logger: logging.Logger, handle_message: Any) -> Any:
    """python-socketio's Engine.IO message handler, refusing what is not a Socket.IO packet."""
    eio = server.eio

    def on_message(eio_sid: str, data: Any) -> None:
        try:
            if not isinstance(data, (str, bytes)) or (
                    not data and not awaits_attachment(server, eio_sid)):
                # Engine.IO hands over "4", "4null", "4{...}" as '', None, a dict; an empty
                # text or binary frame is not even decoded (python-socketio reads it as an
                # event of None) unless it is an awaited (empty) binary attachment
                raise MalformedPacket("not a Socket.IO packet")
            handle_message(eio_sid, data)
        except Exception as exc:
            if eio_sid not in server.environ:
                # the session ended while this packet waited for its turn (each packet is
                # handled in its own task): python-socketio fails on the missing session
                logger.info("dropped a packet of a Socket.IO session that has ended")
                forget_session(server, eio_sid)
                return
            if not isinstance(exc, ValueError):
                raise
            # MalformedPacket, or python-socketio's own refusals
            logger.warning("closing a Socket.IO connection that sent a malformed packet: %s",
                           exc)
            forget_binary_packet(server, eio_sid)
            end_session(eio, eio_sid)

    return on_message


def _refusing_requests(eio: Any, logger: logging.Logger, handle_request: Any,
                       body_timeout: float) -> Any:
    """python-engineio's request handler, refusing long-polling bodies that are too large,
    too slow or malformed, and throttling the others."""

    # A long-polling POST whose body is not an Engine.IO payload (invalid UTF-8, a packet
    # that is not one, JSON nested too deeply) is logged by python-engineio with a traceback
    # and answered "ok"; it is refused here, and its session closed, like a bad frame. So is
    # a body over max_http_buffer_size (python-engineio then waited for ever for a GET to
    # fetch the close packet, holding the POST, its descriptor and the process's shutdown),
    # and one that does not arrive within ``body_timeout`` seconds.

    def refuse(sid: str | None, status: str, why: str, environ: dict,
               start_response: Any) -> Any:
        logger.warning("closing a Socket.IO connection that sent %s", why)
        if sid in eio.sockets:
            end_session(eio, sid)
        start_response(status, [("Content-Type", "text/plain"), ("Connection", "close")])
        return _ClosingResponse([status.split(" ", 1)[1].title().encode()],
                                environ.get("gunicorn.socket"))

    def guarded_handle_request(environ: dict, start_response: Any) -> Any:
        if environ.get("REQUEST_METHOD") != "POST":
            return handle_request(environ, start_response)
        sid = (parse_qs(environ.get("QUERY_STRING", "")).get("sid") or [None])[0]
        session = eio.sockets.get(sid) if sid is not None else None
        if environ.get("HTTP_TRANSFER_ENCODING"):
            return refuse(sid, "411 LENGTH REQUIRED", "a long-polling body without a length",
                          environ, start_response)
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = -1
        if length > eio.max_http_buffer_size:
            return refuse(sid, "413 PAYLOAD TOO LARGE",
                          f"a long-polling body of {length} bytes (over "
                          f"{eio.max_http_buffer_size})", environ, start_response)
        if session is None or length < 0:
            # python-engineio answers 400 without reading the body: end the connection
            # after it, so that nobody waits for the body's end
            response = handle_request(environ, start_response)
            return _ClosingResponse(response, environ.get("gunicorn.socket"))
        body = _read_with_timeout(eio, environ["wsgi.input"], length, body_timeout)
        if body is None or len(body) < length:
            return refuse(sid, "408 REQUEST TIMEOUT",
                          f"a long-polling body that did not arrive within {body_timeout} s",
                          environ, start_response)
        environ["wsgi.input"] = io.BytesIO(body)
        try:
            decoded = eio_payload.Payload(encoded_payload=body.decode("utf-8"))
            if any(p.packet_type not in _CLIENT_EIO_PACKET_TYPES for p in decoded.packets):
                # python-engineio would disconnect the session and wait for a GET to fetch
                # the close packet, holding this POST open
                raise ValueError("not an Engine.IO packet a client sends")
        except (ValueError, TypeError, RecursionError) as exc:
            return refuse(sid, "400 BAD REQUEST",
                          f"a malformed long-polling payload ({type(exc).__name__})",
                          environ, start_response)
        bucket = getattr(session, "inbound", None)
        if bucket is not None:
            delay = bucket.take(len(decoded.packets))
            if delay > 0:  # a flood: answer this POST (and so take the next) later
                eio.sleep(delay)
        return handle_request(environ, start_response)

    return guarded_handle_request


#: Frames a simple-websocket reader may hold unread before it stops reading its socket.
MAX_BUFFERED_FRAMES = 200


class _ClosingResponse(list):
    """A response body after which the server's side of the TCP connection is shut: the
    client sees the end of the connection and nothing waits for the rest of its request."""

    def __init__(self, body: Any, sock: Any):
        super().__init__(body)
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass


def _read_with_timeout(eio: Any, stream: Any, length: int, seconds: float) -> bytes | None:
    """``stream.read(length)``, or None when it takes longer than ``seconds``."""
    if eio.async_mode == "eventlet":
        from eventlet.timeout import Timeout as EventletTimeout

        timer = EventletTimeout(seconds)
        try:
            return stream.read(length)
        except EventletTimeout as exc:
            if exc is not timer:
                raise
            return None
        finally:
            timer.cancel()
    if eio.async_mode == "gevent":
        import gevent

        timer = gevent.Timeout.start_new(seconds)
        try:
            return stream.read(length)
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            return None
        finally:
            timer.close()
    return stream.read(length)
