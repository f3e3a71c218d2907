"""Tenant-scoped users, created on first use."""
from __future__ import annotations

from sqlalchemy.exc import IntegrityError

from app.errors import ApiError
from app.extensions import db
from app.models import User
from app.schemas import USER_ID_ERROR, is_valid_user_id


def find_user(tenant_id: str, external_id: str) -> User | None:
    """The tenant's user with this ``user_id``, or None."""
    return db.session.execute(
        db.select(User).where(User.tenant_id == tenant_id, User.external_id == external_id)
    ).scalar_one_or_none()


def get_or_create_user(tenant_id: str, external_id: str) -> User:
    """The tenant's user with this ``user_id``, created (and committed) if new."""
    user = find_user(tenant_id, external_id)
    if user is not None:
        return user
    db.session.add(User(tenant_id=tenant_id, external_id=external_id))
    try:
        db.session.commit()
    except IntegrityError:
        # Another request created the same user between our read and our insert.
        db.session.rollback()
    return find_user(tenant_id, external_id)


def require_valid_user_id(user_id: str) -> None:
    """Raise ``validation_error`` unless ``user_id`` (from a URL) is well-formed."""
    if not is_valid_user_id(user_id):
        raise ApiError("validation_error", "The user id is not valid.",
                       {"user_id": [USER_ID_ERROR]})
