"""Configuration, read from the environment in one place."""
from __future__ import annotations

import os
import secrets
from typing import Any, Mapping


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise RuntimeError(f"{name} must be an integer, got {value!r}") from exc


def _bool(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    value = env.get(name)
    if value in (None, ""):
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def _size(env: Mapping[str, str], name: str, default: int) -> int:
    """A size in bytes: ``1048576``, ``512KB``, ``1 MB`` (KB and MB are powers of 1024)."""
    value = (env.get(name) or "").strip().upper().replace(" ", "")
    if not value:
        return default
    factor = 1
    for suffix, multiple in (("MB", 1024 * 1024), ("KB", 1024), ("B", 1)):
        if value.endswith(suffix):
            value, factor = value[: -len(suffix)], multiple
            break
    try:
        return int(value) * factor
    except ValueError as exc:
        raise RuntimeError(f"{name} must be a size like 1048576 or 1MB, got {env[name]!r}") from exc


def _list(env: Mapping[str, str], name: str) -> list[str]:
    return [item.strip() for item in env.get(name, "").split(",") if item.strip()]


def database_url(value: str | None, instance_path: str) -> str:
    """The SQLAlchemy URL for DATABASE_URL; Heroku's ``postgres://`` becomes ``postgresql://``."""
    if not value:
        return "sqlite:///" + os.path.join(instance_path, "workspace_chat.db")
    if value.startswith("postgres://"):
        value = "postgresql://" + value[len("postgres://"):]
    return value


def from_env(env: Mapping[str, str], instance_path: str) -> dict[str, Any]:
    """Build the app's configuration mapping from environment variables."""
    production = env.get("APP_ENV", "development").strip().lower() == "production"
    secret_key = env.get("SECRET_KEY")
    if not secret_key:
        if production:
            raise RuntimeError("SECRET_KEY must be set when APP_ENV=production")
        secret_key = secrets.token_urlsafe(32)
    fallbacks = _list(env, "SECRET_KEY_FALLBACKS")
    cors = _list(env, "CORS_ORIGINS")
    demo = _bool(env, "DEMO")
    if demo and production:
        raise RuntimeError("DEMO=1 is refused when APP_ENV=production: the demo page hands "
                           "anyone who types a name a seat in the demo tenant. Unset DEMO.")
    stream_flush_ms = _int(env, "STREAM_FLUSH_MS", 20)
    if stream_flush_ms < 0:
        raise RuntimeError(f"STREAM_FLUSH_MS must be 0 or more (milliseconds; 0 sends every "
                           f"token as its own event), got {stream_flush_ms}")
    async_mode = env.get("ASYNC_MODE", "eventlet").strip().lower()
    if async_mode not in ("eventlet", "gevent", "threading"):
        raise RuntimeError("ASYNC_MODE must be 'eventlet' or 'gevent'")
    return {
        "APP_ENV": "production" if production else "development",
        "SECRET_KEY": secret_key,
        "SECRET_KEY_FALLBACKS": fallbacks,
        "SQLALCHEMY_DATABASE_URI": database_url(env.get("DATABASE_URL"), instance_path),
        "DATABASE_POOL_SIZE": _int(env, "DATABASE_POOL_SIZE", 20),
        "DATABASE_MAX_OVERFLOW": _int(env, "DATABASE_MAX_OVERFLOW", 0),
        "REDIS_URL": env.get("REDIS_URL") or None,
        "ADMIN_TOKEN": env.get("ADMIN_TOKEN") or None,
        "CONNECTION_STRING_TTL": _int(env, "CONNECTION_STRING_TTL", 300),
        "MESSAGE_STRING_TTL": _int(env, "MESSAGE_STRING_TTL", 60),
        "AGENT_TIMEOUT": _int(env, "AGENT_TIMEOUT", 60),
        "STREAM_FLUSH_MS": stream_flush_ms,
        "RATE_LIMIT_REST": env.get("RATE_LIMIT_REST") or "100/minute",
        "RATE_LIMIT_MESSAGES": env.get("RATE_LIMIT_MESSAGES") or "10/second",
        "MAX_CONNECTIONS_PER_TENANT": _int(env, "MAX_CONNECTIONS_PER_TENANT", 50),
        "CONNECTION_LEASE_SECONDS": _int(env, "CONNECTION_LEASE_SECONDS", 60),
        "CORS_ORIGINS": cors,
        "ASYNC_MODE": async_mode,
        "WS_COMPRESSION": _bool(env, "WS_COMPRESSION"),
        "DEMO": demo,
        "PYTHON_AGENTS": _list(env, "PYTHON_AGENTS"),
        "AGENT_ALLOW_PRIVATE_NETWORKS": _bool(env, "AGENT_ALLOW_PRIVATE_NETWORKS"),
        "CONNECT_TIMEOUT": _int(env, "CONNECT_TIMEOUT", 10),
        "MAX_CLIENT_QUEUE": _size(env, "MAX_CLIENT_QUEUE", 1024 * 1024),
        "RATE_LIMIT_AUTH_FAILURES": env.get("RATE_LIMIT_AUTH_FAILURES") or "20/minute",
        "RATE_LIMIT_DEMO": env.get("RATE_LIMIT_DEMO") or "10/minute",
        "LOG_FORMAT": env.get("LOG_FORMAT", "text"),
        "LOG_LEVEL": env.get("LOG_LEVEL", "INFO").upper(),
    }


class Defaults:
    """Settings that are not read from the environment."""

    MAX_CONTENT_LENGTH = 1024 * 1024
    # python-socketio runs each event in a new green thread by default (async_handlers=True):
    # a spawn and an Event per packet, ~11 % of the worker's CPU at 1,000 messages/s. Off,
    # a connection's events run one after another in its own reader, in the order sent;
    # other connections have their own readers (tests/test_stack_speedups.py).
    SOCKETIO_ASYNC_HANDLERS = False
    # Overload (app/overload.py): while the event loop lags more than this many seconds, new
    # messages and REST requests are refused with server_busy, for the hold time after the
    # last such lag; an accepted message is then acknowledged within 2 s (CONTRACT.md, 9).
    OVERLOAD_LAG_SECONDS = 1.0
    OVERLOAD_HOLD_SECONDS = 1.0
    # ... and once two accepted messages in a row took longer than this from their checks to
    # their acks (a standing queue of work that waits on the database or Redis)
    OVERLOAD_SOJOURN_SECONDS = 0.5
    # /ws/chat (app/ws/socket.py): a message over 1 MB is refused with close code 1009.
    SOCK_SERVER_OPTIONS = {"max_message_size": 1024 * 1024, "receive_bytes": 4096}
    SQLALCHEMY_TRACK_MODIFICATIONS = False
    JSON_SORT_KEYS = False
    # flask-smorest / OpenAPI
    API_TITLE = "Workspace Chat"
    API_VERSION = "v1"
    OPENAPI_VERSION = "3.0.3"
    OPENAPI_URL_PREFIX = "/"
    OPENAPI_JSON_PATH = "openapi.json"
    OPENAPI_SWAGGER_UI_PATH = "docs"
    # Swagger UI from the app itself (app/api: swagger-ui-dist), no CDN; no validator badge
    # (it would load an image from the validator's host).
    OPENAPI_SWAGGER_UI_URL = "/docs/static/"
    OPENAPI_SWAGGER_UI_CONFIG = {"validatorUrl": None}
    # Flask-Limiter
    RATELIMIT_HEADERS_ENABLED = True
    RATELIMIT_STORAGE_URI = "memory://"
    RATELIMIT_ENABLED = True
    # With Redis storage: if Redis is unreachable, count in memory rather than fail requests.
    RATELIMIT_IN_MEMORY_FALLBACK_ENABLED = True
