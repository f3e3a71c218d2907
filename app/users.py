"""Tenant-scoped users, created on first use."""
from __future__ import annotations

from sqlalchemy.exc import IntegrityError

from app.extensions import db
from app.models import User


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

