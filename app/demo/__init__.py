"""The demo tenant: made sure of at start-up when DEMO=1, and by ``flask demo setup``."""
from __future__ import annotations

import os
from dataclasses import dataclass

from flask import current_app

from app.auth import create_api_key, tenant_for_api_key
from app.chat import agent_config
from app.extensions import db
from app.models import Tenant, Workspace
from app.users import get_or_create_user

DEMO_TENANT_ID = "demo"
DEMO_OWNER_ID = "demo"
DEMO_WORKSPACE_NAME = "Demo"
# 40 ms between words: slow enough that people see the reply stream (and can press Stop).
DEMO_AGENT = {"kind": "echo", "delay_ms": 40}


@dataclass
class Demo:
    tenant_id: str
    workspace_id: str
    owner_id: str
    api_key: str


def _key_path() -> str:
    return os.path.join(current_app.instance_path, "demo_api_key")


def ensure_demo() -> Demo:
    """Create what is missing of the demo tenant, its key (kept in instance/) and workspace."""
    tenant = db.session.get(Tenant, DEMO_TENANT_ID)
    if tenant is None:
        tenant = Tenant(id=DEMO_TENANT_ID, name="Demo")
        db.session.add(tenant)
        db.session.commit()
    key = None
    if os.path.exists(_key_path()):
        with open(_key_path(), encoding="utf-8") as fh:
            key = fh.read().strip() or None
    if key is None or getattr(tenant_for_api_key(key), "id", None) != tenant.id:
        _, key = create_api_key(tenant)
        db.session.commit()
        fd = os.open(_key_path(), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(key + "\n")
    owner = get_or_create_user(tenant.id, DEMO_OWNER_ID)
    workspace = db.session.execute(db.select(Workspace).where(
        Workspace.owner_id == owner.id, Workspace.name == DEMO_WORKSPACE_NAME)).scalars().first()
    changed = workspace is not None and workspace.agent != DEMO_AGENT
    if workspace is None:
        workspace = Workspace(tenant_id=tenant.id, owner=owner, name=DEMO_WORKSPACE_NAME,
                              agent=dict(DEMO_AGENT))
        db.session.add(workspace)
    else:
        workspace.agent = dict(DEMO_AGENT)
    db.session.commit()
    if changed:  # someone had changed its agent: the running servers keep a copy
        agent_config.forget(workspace.id)
    return Demo(tenant.id, workspace.id, DEMO_OWNER_ID, key)
