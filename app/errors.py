"""The one API error type, its codes, and the one JSON error renderer for HTTP."""
from __future__ import annotations

import math
import time
from typing import Any

from flask import Flask, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from app.extensions import db, limiter

#: Every error code of the public contract and the HTTP status it is answered with.
STATUS_BY_CODE: dict[str, int] = {
    "validation_error": 400,
    "invalid_json": 400,
    "missing_api_key": 401,
    "invalid_api_key": 401,
    "forbidden": 403,
    "not_found": 404,
    "chat_not_found": 404,
    "workspace_not_found": 404,
    "method_not_allowed": 405,
    "payload_too_large": 413,
    "rate_limited": 429,
    "internal_error": 500,
    "service_unavailable": 503,
    "server_busy": 503,
    # Socket.IO and plain WebSocket codes (no HTTP status is ever sent for them).
    "invalid_connection_string": 401,
    "connection_string_expired": 401,
    "too_many_connections": 429,
    "chat_mismatch": 400,
    "invalid_message_string": 400,
    "message_string_expired": 400,
    "message_string_reused": 400,
    "chat_busy": 409,
    "agent_error": 502,
}

#: The code used for a bare HTTP status raised by Flask or an extension.
CODE_BY_STATUS: dict[int, str] = {
    400: "validation_error",
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    422: "validation_error",
    429: "rate_limited",
    503: "service_unavailable",
}

DEFAULT_MESSAGES: dict[str, str] = {
    "not_found": "The requested resource was not found.",
    "method_not_allowed": "This method is not allowed on this resource.",
    "payload_too_large": "The request body is larger than 1 MB.",
    "rate_limited": "Too many requests; slow down and retry later.",
    "internal_error": "An internal error occurred.",
    "validation_error": "The request is not valid.",
    "invalid_json": "The request body is not valid JSON.",
    "server_busy": "The server is busy; retry shortly.",
}


class ApiError(Exception):
    """An error with a contract error code, raised by the service and rendered by each adapter."""

    def __init__(self, code: str, message: str | None = None,
                 details: dict[str, Any] | None = None, status: int | None = None):
        super().__init__(message or DEFAULT_MESSAGES.get(code, code))
        self.code = code
        self.message = message or DEFAULT_MESSAGES.get(code, code)
        self.details = details or {}
        self.status = status or STATUS_BY_CODE.get(code, 400)

    def to_dict(self) -> dict[str, Any]:
        """The contract's error body: ``{code, message, details}``."""
        return {"code": self.code, "message": self.message, "details": self.details}


def error_response(error: ApiError, headers: dict[str, str] | None = None):
    """Render an ApiError as the JSON error envelope (with Retry-After when it says when)."""
    response = jsonify({"error": error.to_dict()})
    response.status_code = error.status
    retry_after = error.details.get("retry_after")
    if error.status in (429, 503) and isinstance(retry_after, (int, float)):
        response.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _validation_details(messages: Any) -> dict[str, Any]:
    """Flatten webargs' ``{location: {field: [msg]}}`` into ``{field: [msg]}``."""
    if not isinstance(messages, dict):
        return {"_schema": messages}
    details: dict[str, Any] = {}
    for location, fields in messages.items():
        if isinstance(fields, dict):
            details.update(fields)
        else:
            details[location] = fields
    return details


def from_http_exception(exc: HTTPException) -> tuple[ApiError, dict[str, str]]:
    """Translate a werkzeug/webargs/Flask-Limiter HTTP exception into an ApiError."""
    status = exc.code or 500
    data = getattr(exc, "data", None) or {}
    headers: dict[str, str] = {}
    if status == 429:
        details: dict[str, Any] = {}
        current = limiter.current_limit
        if current is not None:
            details["retry_after"] = max(0, int(current.reset_at - time.time()))
            details["limit"] = str(current.limit)
        limit = getattr(exc, "limit", None)
        if "limit" not in details and limit is not None:
            details["limit"] = str(getattr(limit, "limit", limit))
        return ApiError("rate_limited", details=details), headers
    if status in (400, 422) and "messages" in data:
        return ApiError("validation_error", details=_validation_details(data["messages"])), headers
    if status == 405:
        allowed = exc.valid_methods if hasattr(exc, "valid_methods") else None
        if allowed:
            headers["Allow"] = ", ".join(sorted(allowed))
        return ApiError("method_not_allowed"), headers
    code = CODE_BY_STATUS.get(status, "internal_error" if status >= 500 else "validation_error")
    message = DEFAULT_MESSAGES.get(code) if status != 400 else (exc.description or None)
    if status >= 500:
        message = DEFAULT_MESSAGES["internal_error"]
    return ApiError(code, message, status=status if code not in STATUS_BY_CODE else None), headers


def handle_api_error(error: ApiError):
    """Flask error handler for ApiError."""
    return error_response(error)


def handle_http_exception(exc: HTTPException):
    """Flask error handler for every HTTPException: the same envelope as ApiError."""
    error, headers = from_http_exception(exc)
    return error_response(error, headers)


def handle_unexpected(exc: Exception):
    """Log an unexpected exception with its traceback; answer ``internal_error`` without it."""
    db.session.rollback()  # a failed statement must not poison the rest of the session
    current_app.logger.exception("unhandled error on %s %s", request.method, request.path)
    return error_response(ApiError("internal_error"))


def register_error_handlers(app: Flask) -> None:
    """Bind the one renderer to ApiError, every HTTP exception and anything unexpected.

    Called after ``api.init_app``: flask-smorest registers its own HTTPException renderer
    there, and this one replaces it."""
    app.register_error_handler(ApiError, handle_api_error)
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(Exception, handle_unexpected)
