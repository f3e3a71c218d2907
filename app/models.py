"""SQLAlchemy models: tenants, API keys, users, workspaces, chats and messages."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone

from sqlalchemy import BigInteger, Index, Integer, JSON, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.extensions import db
from app.text import is_text

# SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    """The current time in UTC, naive (stored as UTC on every database)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def new_id() -> str:
    """A random, unguessable public id."""
    return uuid.uuid4().hex


def may_be_id(value: str) -> bool:
    """Whether a client's string can be looked up as an id at all (else it names nothing).

    Ids are at most 64 characters, and a string that is not text (a NUL, which PostgreSQL
    refuses in any parameter, or a lone surrogate) would fail the lookup itself instead of
    finding nothing.
    """
    return len(value) <= 64 and is_text(value)


class Tenant(db.Model):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(db.String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(db.String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    api_keys = relationship("ApiKey", back_populates="tenant", cascade="all, delete-orphan")


class ApiKey(db.Model):
    """A tenant's API key; only its SHA-256 hash is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(db.String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(
        db.ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(db.String(64), unique=True)
    prefix: Mapped[str] = mapped_column(db.String(12))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)

    tenant = relationship("Tenant", back_populates="api_keys")


class User(db.Model):
    """A tenant-scoped user, known by the tenant's own ``user_id`` (``external_id`` here)."""

    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("tenant_id", "external_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(db.ForeignKey("tenants.id", ondelete="CASCADE"))
    external_id: Mapped[str] = mapped_column(db.String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Set on the first Socket.IO connection, which is when `user_created` is sent.
    first_connected_at: Mapped[datetime | None] = mapped_column(default=None)


class WorkspaceMember(db.Model):
    __tablename__ = "workspace_members"

    workspace_id: Mapped[str] = mapped_column(
        db.ForeignKey("workspaces.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[int] = mapped_column(
        db.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    user = relationship("User", lazy="joined")


class Workspace(db.Model):
    __tablename__ = "workspaces"
    __table_args__ = (
        Index("ix_workspaces_tenant_owner", "tenant_id", "owner_id", "created_at"),
        # At most one default ("Personal") workspace per user.
        Index("uq_workspaces_default_owner", "owner_id", unique=True,
              sqlite_where=db.text("is_default"), postgresql_where=db.text("is_default")),
    )

    id: Mapped[str] = mapped_column(db.String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(db.ForeignKey("tenants.id", ondelete="CASCADE"))
    owner_id: Mapped[int] = mapped_column(db.ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(db.String(100))
    is_default: Mapped[bool] = mapped_column(default=False)
    # The whole agent configuration, secrets included; the API never returns the secrets.
    agent: Mapped[dict] = mapped_column(JSON, default=lambda: {"kind": "none"})
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    owner = relationship("User", lazy="joined")
    members = relationship("WorkspaceMember", cascade="all, delete-orphan",
                           passive_deletes=True, order_by="WorkspaceMember.created_at")
    chats = relationship("Chat", back_populates="workspace", cascade="all, delete-orphan",
                         passive_deletes=True)


class Chat(db.Model):
    __tablename__ = "chats"
    __table_args__ = (
        Index("ix_chats_tenant_user_created", "tenant_id", "user_id", "created_at"),
        Index("ix_chats_workspace", "workspace_id"),
    )

    id: Mapped[str] = mapped_column(db.String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(db.ForeignKey("tenants.id", ondelete="CASCADE"))
    workspace_id: Mapped[str] = mapped_column(db.ForeignKey("workspaces.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(db.ForeignKey("users.id", ondelete="CASCADE"))
    title: Mapped[str | None] = mapped_column(db.String(200), default=None)
    # `metadata` is reserved by SQLAlchemy's declarative base, hence the attribute name.
    meta: Mapped[dict] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    workspace = relationship("Workspace", back_populates="chats")
    user = relationship("User", lazy="joined")
    messages = relationship("Message", back_populates="chat", cascade="all, delete-orphan",
                            passive_deletes=True)


class Message(db.Model):
    """A chat message; its integer id orders a chat's history."""

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("chat_id", "client_message_id"),
        Index("ix_messages_chat_id_id", "chat_id", "id"),
    )

    ROLES = ("user", "agent", "system")

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    chat_id: Mapped[str] = mapped_column(db.ForeignKey("chats.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(db.String(16))
    user_id: Mapped[int | None] = mapped_column(
        db.ForeignKey("users.id", ondelete="SET NULL"), default=None, index=True)
    content: Mapped[str] = mapped_column(db.Text, default="")
    client_message_id: Mapped[str | None] = mapped_column(db.String(128), default=None)
    reply_to: Mapped[int | None] = mapped_column(
        db.ForeignKey("messages.id", ondelete="SET NULL"), default=None, index=True)
    # An agent reply is stored when its stream starts; this is set when it ends (stop,
    # cancelled, error, timeout). NULL on an agent message means it is still streaming.
    finish_reason: Mapped[str | None] = mapped_column(db.String(16), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    chat = relationship("Chat", back_populates="messages")
    user = relationship("User", lazy="joined")
