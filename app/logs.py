"""Logging: text for people, or one JSON object per line (LOG_FORMAT=json) for machines.

Every record carries what is known of its context: the HTTP request id, the tenant, the chat
and the Socket.IO connection.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from datetime import datetime, timezone

from flask import Flask, Response, g, has_request_context, request

CONTEXT_FIELDS = ("request_id", "tenant_id", "chat_id", "sid", "event", "method", "path",
                  "status", "duration_ms", "remote_addr")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class ContextFilter(logging.Filter):
    """Adds the request's or the Socket.IO connection's context to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not has_request_context():
            return True
        if getattr(record, "request_id", None) is None:
            record.request_id = g.get("request_id")
        tenant = g.get("tenant")
        if tenant is not None and getattr(record, "tenant_id", None) is None:
            record.tenant_id = tenant.id
        sid = getattr(request, "sid", None)
        if sid is not None:
            record.sid = sid
            from app.chat.events import chat_namespace

            connection = chat_namespace.connections.get(sid)
            if connection is not None:
                record.tenant_id = connection.tenant_id
                record.chat_id = connection.chat_id
            event = getattr(request, "event", None)
            if isinstance(event, dict):
                record.event = event.get("message")
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, context, exception."""

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "time": datetime.fromtimestamp(record.created, timezone.utc)
            .strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                payload[name] = value
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


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
                                   "status": response.status_code,
                                   "remote_addr": request.remote_addr,
                                   "duration_ms": round((time.perf_counter() - started) * 1000,
                                                        2) if started else None})
        return response

    return finish
