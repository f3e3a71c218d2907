"""Workspace rules: ownership, membership, the default workspace and agent configuration."""
from __future__ import annotations

from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError

from app.agents.secrets import SECRET_FIELDS, has_plaintext, seal_agent
from app.chat import agent_config, revocation
from app.errors import ApiError
from app.extensions import db
from app.models import Chat, Tenant, User, Workspace, WorkspaceMember, may_be_id
from app.pagination import paginate
from app.users import find_user, get_or_create_user

DEFAULT_WORKSPACE_NAME = "Personal"


def get_workspace(tenant: Tenant, workspace_id: str) -> Workspace:
    """The tenant's workspace, or ``workspace_not_found``."""
    workspace = db.session.get(Workspace, workspace_id) if may_be_id(workspace_id) else None
    if workspace is None or workspace.tenant_id != tenant.id:
        raise ApiError("workspace_not_found", f"Workspace {workspace_id!r} was not found.")
    return workspace


def create_workspace(tenant: Tenant, owner_id: str, name: str,
                     agent: dict[str, Any] | None = None) -> Workspace:
    """Create a workspace owned by ``owner_id`` (the user is created on first use)."""
    owner = get_or_create_user(tenant.id, owner_id)
    workspace = Workspace(tenant_id=tenant.id, owner=owner, name=name,
                          agent=merge_agent(None, agent or {"kind": "none"}))
    db.session.add(workspace)
    db.session.commit()
    return workspace


def default_workspace(tenant: Tenant, user: User) -> Workspace:
    """The user's "Personal" workspace, created the first time it is needed."""
    query = select(Workspace).where(Workspace.owner_id == user.id, Workspace.is_default)
    workspace = db.session.execute(query).scalar_one_or_none()
    if workspace is not None:
        return workspace
    db.session.add(Workspace(tenant_id=tenant.id, owner=user, name=DEFAULT_WORKSPACE_NAME,
                             is_default=True))
    try:
        db.session.commit()
    except IntegrityError:
        db.session.rollback()  # created concurrently: the unique index kept it to one
    return db.session.execute(query).scalar_one()


def list_user_workspaces(tenant: Tenant, user_id: str, offset: int, limit: int) -> dict:
    """One page of the workspaces a user owns or is a member of, oldest first."""
    user = find_user(tenant.id, user_id)
    if user is None:
        return {"workspaces": [], "total": 0, "offset": offset, "limit": limit, "has_more": False}
    member_of = select(WorkspaceMember.workspace_id).where(WorkspaceMember.user_id == user.id)
    query = select(Workspace).where(
        Workspace.tenant_id == tenant.id,
        or_(Workspace.owner_id == user.id, Workspace.id.in_(member_of)),
    )
    return paginate(query, [Workspace.created_at, Workspace.id], offset, limit,
                    "workspaces")


def merge_agent(current: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """The agent config to store: a secret left out of an update of the same kind is kept,
    and every secret is stored encrypted (app.agents.secrets)."""
    merged = dict(new)
    current = current or {}
    if current.get("kind") == new.get("kind"):
        for name in SECRET_FIELDS:
            if name not in new and current.get(name):
                merged[name] = current[name]
    return seal_agent({k: v for k, v in merged.items() if v is not None})


def update_workspace(workspace: Workspace, changes: dict[str, Any]) -> Workspace:
    """Rename a workspace and/or replace its agent configuration."""
    if "name" in changes:
        workspace.name = changes["name"]
    agent_changed = True
    if "agent" in changes and changes["agent"] is not None:
        workspace.agent = merge_agent(workspace.agent, changes["agent"])
    elif has_plaintext(workspace.agent):
        workspace.agent = seal_agent(workspace.agent)  # a secret stored before encryption
    else:
        agent_changed = False
    db.session.commit()
    if agent_changed:  # every process's copy, now that the change is committed
        agent_config.forget(workspace.id)
    return workspace


def delete_workspace(workspace: Workspace) -> None:
    """Delete a workspace with its chats and their messages; the chats' connected clients get
    ``chat_deleted`` and are disconnected."""
    workspace_id = workspace.id
    chat_ids = db.session.execute(
        select(Chat.id).where(Chat.workspace_id == workspace_id)).scalars().all()
    db.session.delete(workspace)
    db.session.commit()
    agent_config.forget(workspace_id)
    revocation.close_chats(chat_ids)


def add_member(tenant: Tenant, workspace: Workspace, user_id: str) -> None:
    """Make a user a member (idempotent; the owner needs no membership)."""
    user = get_or_create_user(tenant.id, user_id)
    if user.id == workspace.owner_id or db.session.get(WorkspaceMember, (workspace.id, user.id)):
        return
    db.session.add(WorkspaceMember(workspace_id=workspace.id, user_id=user.id))
    try:
        db.session.commit()
    except IntegrityError:
        db.session.rollback()  # added concurrently: already a member


def remove_member(tenant: Tenant, workspace: Workspace, user_id: str) -> None:
    """Remove a member (idempotent)."""
    user = find_user(tenant.id, user_id)
    if user is None:
        return
    membership = db.session.get(WorkspaceMember, (workspace.id, user.id))
    if membership is not None:
        db.session.delete(membership)
        db.session.commit()
        # their open connections to the workspace's chats end now, not at their next connect
        revocation.end_member_sessions(tenant.id, workspace.id, user.id)


def can_access(workspace: Workspace, user: User) -> bool:
    """Whether a user may join the workspace's chats: its owner or a member."""
    if workspace.owner_id == user.id:
        return True
    return db.session.get(WorkspaceMember, (workspace.id, user.id)) is not None
