"""Liveness, readiness and metrics endpoints (no API key, no rate limit)."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify
from sqlalchemy import text

from app.extensions import db

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    """The process is alive."""
    return jsonify({"status": "ok"})


def _check_database() -> str:
    try:
        db.session.execute(text("SELECT 1"))
        return "ok"
    except Exception:  # any failure means not ready; details go to the log, not the client
        current_app.logger.warning("readiness: database check failed", exc_info=True)
        db.session.rollback()
        return "unavailable"


def _check_redis(url: str) -> str:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        try:
            client.ping()
        finally:
            client.close()
        return "ok"
    except Exception:
        current_app.logger.warning("readiness: redis check failed", exc_info=True)
        return "unavailable"


@bp.get("/readyz")
def readyz():
    """The database and, when configured, Redis are reachable; 503 otherwise."""
    checks = {"database": _check_database()}
    if current_app.config.get("REDIS_URL"):
        checks["redis"] = _check_redis(current_app.config["REDIS_URL"])
    ready = all(v == "ok" for v in checks.values())
    return jsonify({"status": "ok" if ready else "unavailable", "checks": checks}), (200 if ready else 503)


@bp.get("/metrics")
def metrics():
    """Prometheus metrics in text format."""
    return current_app.extensions["metrics"].render()
