"""Workspace Chat: a multi-tenant, real-time chat server on Flask and Flask-SocketIO."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # nothing heavy at import: gunicorn's master imports app.jsonlog early
    from flask import Flask

__all__ = ["create_app"]

MIGRATIONS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "migrations")


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL + synchronous=NORMAL: a commit no longer stalls the event loop for a full fsync;
    # foreign_keys=ON: SQLite otherwise ignores ON DELETE CASCADE.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def _init_realtime(app: "Flask") -> None:
    """Socket.IO with our client manager, the shared state and the /chat namespace."""
    from app.chat.delivery import ChatManager, ChatRedisManager, WithoutWebSocketCompression
    from app.chat.events import chat_namespace
    from app.chat.packets import StrictPacket, refuse_malformed_input
    from app.extensions import socketio
    from app.overrides import warn_on_other_versions
    from app.overrides.engineio import allow_batched_packets
    from app.state import create_state

    warn_on_other_versions(app.logger)
    # A long-polling client may batch more than engineio's default of 16 packets in one
    # request (a burst of typing events and messages); refusing it would drop the client.
    allow_batched_packets(100)
    redis_url = app.config.get("REDIS_URL")
    app.extensions["chat_state"] = create_state(redis_url,
                                                app.config["CONNECTION_LEASE_SECONDS"])
    manager = ChatRedisManager(redis_url) if redis_url else ChatManager()
    socketio.init_app(
        app,
        async_mode=app.config["ASYNC_MODE"],
        async_handlers=app.config["SOCKETIO_ASYNC_HANDLERS"],
        client_manager=manager,
        cors_allowed_origins=app.config["CORS_ORIGINS"] or None,
        http_compression=False,
        serializer=StrictPacket,
    )
    refuse_malformed_input(socketio.server, app.logger, app.config["CONNECT_TIMEOUT"])
    from app import overload

    overload.init_app(app, socketio)
    from app.chat.transport import install_session_limits

    install_session_limits(socketio.server, app)
    socketio.on_namespace(chat_namespace)
    if not app.config["WS_COMPRESSION"]:
        app.wsgi_app = WithoutWebSocketCompression(app.wsgi_app)
    from app.lifecycle import OpenWebSockets
    from app.logs import ErrorsToLogging

    open_websockets = OpenWebSockets(app.wsgi_app, app.config["ASYNC_MODE"])
    app.wsgi_app = app.extensions["open_websockets"] = open_websockets
    app.wsgi_app = ErrorsToLogging(app.wsgi_app, app.logger)


def create_app(config: Mapping[str, Any] | None = None) -> "Flask":
    """Build the app: config, extensions, blueprints, CLI and error handlers."""
    from sqlalchemy import event

    from app.config import Defaults, database_url, from_env
    from app.logs import configure_logging

    from app.api import DepthCheckedJSONProvider
    from app.flask_app import ChatFlask

    app = ChatFlask(__name__, instance_relative_config=True)
    app.json = DepthCheckedJSONProvider(app)  # JSON nested > 64 deep is invalid JSON (§9)
    app.config.from_object(Defaults)
    app.config.update(from_env(os.environ, app.instance_path))
    if config:
        app.config.update(config)
        if "DATABASE_URL" in config:
            app.config["SQLALCHEMY_DATABASE_URI"] = database_url(config["DATABASE_URL"],
                                                                 app.instance_path)
    uri = app.config["SQLALCHEMY_DATABASE_URI"]
    if "SQLALCHEMY_ENGINE_OPTIONS" not in app.config and uri not in ("sqlite://", "sqlite:///:memory:"):
        # Connections kept open: past pool_size SQLAlchemy opens a connection per checkout and
        # closes it on return, and under eventlet many messages are in flight at once.
        app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {
            "pool_size": app.config["DATABASE_POOL_SIZE"],
            "max_overflow": app.config["DATABASE_MAX_OVERFLOW"]}
    if app.config.get("REDIS_URL") and "RATELIMIT_STORAGE_URI" not in (config or {}):
        app.config["RATELIMIT_STORAGE_URI"] = app.config["REDIS_URL"]
    os.makedirs(app.instance_path, exist_ok=True)
    configure_logging(app)

    from app.extensions import api, db, limiter, migrate
    from app.errors import register_error_handlers
    from app.metrics import Metrics
    from app.schemas import ErrorSchema

    db.init_app(app)
    if app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite"):
        with app.app_context():
            event.listen(db.engine, "connect", _sqlite_pragmas)
    migrate.init_app(app, db, directory=MIGRATIONS_DIR, render_as_batch=True, compare_type=True)
    limiter.init_app(app)
    Metrics(app)
    _init_realtime(app)
    if app.config["CORS_ORIGINS"]:
        from flask_cors import CORS

        CORS(app, resources={r"/api/*": {"origins": app.config["CORS_ORIGINS"]},
                             r"/chat": {"origins": app.config["CORS_ORIGINS"]}},
             expose_headers=["X-RateLimit-Limit", "X-RateLimit-Remaining",
                             "X-RateLimit-Reset", "Retry-After"])

    api.ERROR_SCHEMA = ErrorSchema
    api.init_app(app, spec_kwargs={"security": [{"ApiKey": []}], "components": {"securitySchemes": {
        "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        "AdminToken": {"type": "http", "scheme": "bearer"},
    }}})
    from app.admin.routes import bp as admin_bp
    from app.chat.routes import bp as chats_bp, chat_bp
    from app.workspaces.routes import bp as workspaces_bp

    for bp in (workspaces_bp, chats_bp, chat_bp):
        api.register_blueprint(bp)
    api.register_blueprint(admin_bp)

    from app.health import bp as health_bp
    from app.admin.cli import demo_cli, tenants_cli

    app.register_blueprint(health_bp)
    from app.api import swagger_ui_bp  # /docs' Swagger UI files, from the app (no CDN)

    app.register_blueprint(swagger_ui_bp)
    limiter.exempt(swagger_ui_bp)
    from app.ws.routes import bp as ws_bp

    app.register_blueprint(ws_bp)
    limiter.exempt(ws_bp)
    if app.config["DEMO"]:
        from app.demo.routes import bp as demo_bp

        app.register_blueprint(demo_bp)
        limiter.exempt(demo_bp)
    app.register_blueprint(tenants_cli)
    app.register_blueprint(demo_cli)
    limiter.exempt(health_bp)
    register_error_handlers(app)
    return app
