"""API key -> tenant, and the admin token."""
from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time

from flask import current_app, g, has_request_context, request
from flask_limiter.util import get_remote_address
from limits import parse as parse_limit

from app.errors import ApiError
from app.extensions import db
from app.models import ApiKey, Tenant, utcnow

API_KEY_HEADER = "X-API-Key"


def generate_api_key() -> str:
    """A new random API key, as shown once to its owner."""
    return "wc_" + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    """The stored form of an API key (keys are random, so a plain SHA-256 suffices)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def create_api_key(tenant: Tenant) -> tuple[ApiKey, str]:
    """Add a new key to a tenant; returns the row and the plain key (never stored)."""
    key = generate_api_key()
    row = ApiKey(tenant=tenant, key_hash=hash_api_key(key), prefix=key[:10])
    db.session.add(row)
    return row, key


def create_tenant_with_key(name: str) -> tuple[Tenant, ApiKey, str]:
    """Create a tenant with its first API key; returns the tenant, the key's row and the
    plain key (the row's id lets an operator revoke that first key)."""
    tenant = Tenant(name=name)
    db.session.add(tenant)
    row, key = create_api_key(tenant)
    db.session.commit()
    return tenant, row, key


def create_tenant(name: str) -> tuple[Tenant, str]:
    """Create a tenant with its first API key; returns the tenant and the plain key."""
    tenant, _, key = create_tenant_with_key(name)
    return tenant, key


# --- wrong credentials, counted per address (RATE_LIMIT_AUTH_FAILURES) ---------------------

def _auth_failure_limit():
    return parse_limit(current_app.config["RATE_LIMIT_AUTH_FAILURES"])


def refuse_if_blocked() -> None:
    """Refuse any authentication from an address past RATE_LIMIT_AUTH_FAILURES wrong
    credentials: ``rate_limited`` (429) with ``details.retry_after`` in seconds.

    The count lives in Flask-Limiter's storage (Redis when REDIS_URL is set), so every process
    counts together. If that storage fails, authentication goes on uncounted (logged).
    """
    from app.extensions import limiter

    if not limiter.enabled:  # RATELIMIT_ENABLED=False: no limit counts
        return
    item, address = _auth_failure_limit(), get_remote_address()
    try:
        strategy = limiter.limiter
        if strategy.test(item, "auth_failures", address):
            return
        reset_at = strategy.get_window_stats(item, "auth_failures", address).reset_time
    except Exception:
        current_app.logger.warning("could not read the auth failure count", exc_info=True)
        return
    retry_after = max(1, math.ceil(reset_at - time.time()))
    raise ApiError("rate_limited", "Too many wrong credentials from this address; retry later.",
                   {"retry_after": retry_after, "limit": str(item)})


def count_auth_failure() -> None:
    """Count one wrong API key or admin token against the client's address."""
    from app.extensions import limiter

    if not limiter.enabled:
        return
    try:
        limiter.limiter.hit(_auth_failure_limit(), "auth_failures", get_remote_address())
    except Exception:
        current_app.logger.warning("could not count an auth failure", exc_info=True)


def find_api_key(key: str | None) -> ApiKey | None:
    """The unrevoked API key row for a plain key, or None.

    In a request (REST, the Socket.IO connect handler, the /ws/chat request) a wrong key counts
    against the client's address, and an address past RATE_LIMIT_AUTH_FAILURES is refused
    (``rate_limited``) whatever key it sends.
    """
    if not key:
        return None
    guarded = has_request_context()
    if guarded:
        refuse_if_blocked()
    row = db.session.execute(
        db.select(ApiKey).where(ApiKey.key_hash == hash_api_key(key),
                                ApiKey.revoked_at.is_(None))
    ).scalar_one_or_none()
    if row is None and guarded:
        count_auth_failure()
    return row


def tenant_for_api_key(key: str | None) -> Tenant | None:
    """The tenant owning an unrevoked API key, or None."""
    row = find_api_key(key)
    return row.tenant if row is not None else None


def _lookup_request_key() -> ApiKey | None:
    # Looked up once per request, for the rate limiter and then the auth hook. Kept in the
    # request's environ, not in `g`: an app context (and so `g`) may outlive one request.
    # A refusal (too many wrong keys from this address) is kept too, and raised each time.
    environ = request.environ
    if "workspace_chat.api_key" not in environ:
        try:
            environ["workspace_chat.api_key"] = find_api_key(request.headers.get(API_KEY_HEADER))
        except ApiError as error:
            environ["workspace_chat.api_key"] = error
    found = environ["workspace_chat.api_key"]
    if isinstance(found, ApiError):
        raise found
    return found


def _lookup_request_tenant() -> Tenant | None:
    row = _lookup_request_key()
    return row.tenant if row is not None else None


def current_api_key_id() -> str | None:
    """The id of the API key this request authenticated with (None without one)."""
    row = _lookup_request_key() if request.headers.get(API_KEY_HEADER) else None
    return row.id if row is not None else None


def current_tenant() -> Tenant:
    """The tenant of this request's X-API-Key, or an ApiError 401."""
    if not request.headers.get(API_KEY_HEADER):
        raise ApiError("missing_api_key", f"Send your API key in the {API_KEY_HEADER} header.")
    tenant = _lookup_request_tenant()
    if tenant is None:
        raise ApiError("invalid_api_key", "The API key is not valid.")
    return tenant


def require_api_key() -> None:
    """before_request hook of the tenant-scoped blueprints."""
    g.tenant = current_tenant()


def rate_limit_key() -> str:
    """Flask-Limiter key: the tenant when the key is valid, else the client address."""
    try:
        tenant = _lookup_request_tenant() if request.headers.get(API_KEY_HEADER) else None
    except ApiError:  # refused (rate_limited): the auth hook answers it; never raise in here,
        tenant = None  # Flask-Limiter would take it for a storage failure
    if tenant is not None:
        return f"tenant:{tenant.id}"
    return f"addr:{get_remote_address()}"


def rest_rate_limit() -> str:
    """The REST limit in force (configurable with RATE_LIMIT_REST)."""
    return current_app.config["RATE_LIMIT_REST"]


def require_admin() -> None:
    """before_request hook of the admin API: 404 unless ADMIN_TOKEN is set, then a Bearer check."""
    token = current_app.config.get("ADMIN_TOKEN")
    if not token:
        raise ApiError("not_found")
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ApiError("missing_api_key", "Send 'Authorization: Bearer <ADMIN_TOKEN>'.")
    refuse_if_blocked()
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        count_auth_failure()
        raise ApiError("invalid_api_key", "The admin token is not valid.")


def revoke_api_key(key: ApiKey) -> None:
    """Revoke a key; it stops working at once, and so do the connections it opened (and
    the connection strings it issued), in every process."""
    from app.chat.revocation import end_key_sessions  # the chat layer imports this module

    if key.revoked_at is None:
        key.revoked_at = utcnow()
    db.session.commit()
    end_key_sessions(key.tenant_id, key.id)
