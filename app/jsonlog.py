"""JSON log lines, with only the standard library (gunicorn's master imports this before
eventlet patches anything, so nothing here may import Flask)."""
from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timezone
from urllib.parse import unquote_plus

from app.timefmt import iso_z

#: Query parameters whose values never reach a log line (contract §9, "Logs").
SECRET_PARAMETERS = frozenset({"api_key", "connection_string", "message_string"})
REDACTED = "[redacted]"
_PARAMETER = re.compile(r"(^|[?&;])([^=&;#?\s]*)=([^&;#\s]*)")


def redact_query(text: str | None) -> str | None:
    """A query string, URL or request line with the values of the secret parameters replaced
    by ``[redacted]`` (names compared after percent-decoding: ``api%5Fkey`` is ``api_key``)."""
    if not text or "=" not in text:
        return text

    def replace(match: re.Match) -> str:
        lead, name, _ = match.groups()
        if unquote_plus(name).strip().lower() in SECRET_PARAMETERS:
            return f"{lead}{name}={REDACTED}"
        return match.group(0)

    return _PARAMETER.sub(replace, text)


CONTEXT_FIELDS = ("request_id", "tenant_id", "chat_id", "sid", "event", "method", "path",
                  "query", "status", "duration_ms", "remote_addr")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, context, exception."""

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "time": iso_z(datetime.fromtimestamp(record.created, timezone.utc)),
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


def gunicorn_logconfig(json_format: bool) -> dict:
    """gunicorn's own log lines in the same format as the app's (access lines, when gunicorn
    writes them, are redacted by gunicorn.conf.py's logger class)."""
    formatter = ({"()": "app.jsonlog.JsonFormatter"} if json_format else
                 {"format": "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"})
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "default",
                                "stream": "ext://sys.stderr"}},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
            # the app logs each request itself, with its request id
            "gunicorn.access": {"level": "WARNING", "handlers": ["stderr"], "propagate": False},
        },
        "root": {"level": "WARNING", "handlers": ["stderr"]},
    }
