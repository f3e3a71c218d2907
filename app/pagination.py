"""The contract's pagination shape, written once."""
from __future__ import annotations

from typing import Any

from marshmallow import Schema, fields, validate
from sqlalchemy import Select, func, select

from app.extensions import db

MAX_LIMIT = 200
DEFAULT_LIMIT = 50


class PaginationArgs(Schema):
    offset = fields.Integer(load_default=0, validate=validate.Range(min=0, max=2**63 - 1))
    limit = fields.Integer(load_default=DEFAULT_LIMIT, validate=validate.Range(min=1, max=MAX_LIMIT))


def paginate(query: Select, order_by: list, offset: int, limit: int, key: str) -> dict[str, Any]:
    """Run ``query`` as one page: ``{key: [rows], total, offset, limit, has_more}``."""
    total = db.session.execute(
        select(func.count()).select_from(query.order_by(None).subquery())
    ).scalar_one()
    items = db.session.execute(
        query.order_by(*order_by).offset(offset).limit(limit)
    ).unique().scalars().all()
    return {
        key: items,
        "total": total,
        "offset": offset,
        "limit": limit,
        "has_more": offset + len(items) < total,
    }
