"""Logging: text for people, or one JSON object per line (LOG_FORMAT=json) for machines.

Every record carries what is known of its context: the HTTP request id, the tenant, the chat
and the Socket.IO connection.
"""
from __future__ import annotations

import logging
import re
import sys
import time
import uuid

from flask import Flask, Response, g, has_request_context, request

from app.jsonlog import JsonFormatter, redact_query

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _primary_key(row: object) -> object:
    """A loaded row's id without touching the database: reading ``row.id`` after a failed
    flush raises (PendingRollbackError), and a log line must never fail or query."""
    from sqlalchemy import inspect

    identity = inspect(row).identity
    return identity[0] if identity else None


class ContextFilter(logging.Filter):
    """Adds the request's or the Socket.IO connection's context to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not has_request_context():
            return True
        if getattr(record, "request_id", None) is None:
            record.request_id = g.get("request_id")
        tenant = g.get("tenant")
        if tenant is not None and getattr(record, "tenant_id", None) is None:
            record.tenant_id = _primary_key(tenant)
        sid = getattr(request, "sid", None)
        if sid is not None:
            record.sid = sid
            from app.chat.session import connections

            connection = connections.get(sid)
            if connection is not None:
                record.tenant_id = connection.tenant_id
                record.chat_id = connection.chat_id
            event = getattr(request, "event", None)
            if isinstance(event, dict):
                record.event = event.get("message")
        return True


def configure_logging(app: Flask) -> None:
    """Install one handler on the app's logger tree, in the configured format."""
    json_format = app.config.get("LOG_FORMAT", "text").lower() == "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else logging.Formatter(
        "[%(asctime)s] %(levelname)s in %(module)s: %(message)s"))
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("app")
    logger.handlers[:] = [handler]
    logger.setLevel(getattr(logging, app.config.get("LOG_LEVEL", "INFO"), logging.INFO))
    logger.propagate = False
    app.before_request(_start_request)
    app.after_request(_finish_request(app, json_format))


def _start_request() -> None:
    given = request.headers.get("X-Request-ID", "")
    g.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
    g.request_started_at = time.perf_counter()


def _finish_request(app: Flask, log_access: bool):
    def finish(response: Response) -> Response:
        request_id = g.get("request_id")
        if request_id:
            response.headers["X-Request-ID"] = request_id
        if log_access:
            started = g.get("request_started_at")
            app.logger.info("%s %s %s", request.method, request.path, response.status_code,
                            extra={"method": request.method, "path": request.path,
                                   "query": redact_query(
                                       request.query_string.decode("latin-1")) or None,
                                   "status": response.status_code,
                                   "remote_addr": request.remote_addr,
                                   "duration_ms": round((time.perf_counter() - started) * 1000,
                                                        2) if started else None})
        return response

    return finish


class _ErrorStream:
    """``wsgi.errors`` that goes through logging (so LOG_FORMAT=json holds for it too).

    eventlet writes "socket shutdown error: [Errno 9]" there when it closes a WebSocket the
    client already closed; that is routine, so it is logged at debug level.
    """

    def __init__(self, logger: logging.Logger):
        self.logger = logger

    def write(self, text: str) -> None:
        text = text.strip()
        if not text:
            return
        level = logging.DEBUG if "socket shutdown error" in text else logging.WARNING
        self.logger.log(level, text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass


class ErrorsToLogging:
    """WSGI middleware: the server's error stream for this request is the app's logger."""

    def __init__(self, wsgi_app, logger: logging.Logger):
        self.wsgi_app = wsgi_app
        self.stream = _ErrorStream(logger)

    def __call__(self, environ, start_response):
        environ["wsgi.errors"] = self.stream
        return self.wsgi_app(environ, start_response)
