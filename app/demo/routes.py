"""The browser demo at / (DEMO=1): a page, a seat for the name a person types, the JS client.

The server holds the demo tenant, so it hands the page a chat and a connection string through
the same services the REST API uses; the browser never sees the demo tenant's API key.
"""
from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from typing import Any

from flask import Blueprint, current_app, render_template, request, send_from_directory
from flask_limiter.util import get_remote_address
from sqlalchemy import select

from app.chat.service import connection_string_for, create_chat
from app.demo import DEMO_OWNER_ID, DEMO_TENANT_ID, ensure_demo
from app.errors import ApiError
from app.extensions import db, limiter
from app.models import Chat, Tenant, Workspace
from app.workspaces.service import add_member, get_workspace

bp = Blueprint("demo_page", __name__, template_folder="templates", static_folder="static",
               static_url_path="/demo/static")

MAX_NAME = 64
SOCKET_IO_DIST = os.path.join(bp.root_path, "node_modules", "socket.io-client", "dist")
SOCKET_IO_FILES = ("socket.io.min.js", "socket.io.min.js.map")


@bp.get("/")
def index():
    """The demo page."""
    response = current_app.make_response(render_template("demo/index.html"))
    # Nothing but this origin: no CDN, no third-party requests, no inline script.
    host = request.host
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        f"connect-src 'self' ws://{host} wss://{host}; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'")
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@bp.get("/demo/<any(" + ",".join(f'"{name}"' for name in SOCKET_IO_FILES) + "):filename>")
def socket_io_client(filename: str):
    """socket.io-client's browser build, from app/demo/node_modules (``npm ci --prefix app/demo``)."""
    if not os.path.isfile(os.path.join(SOCKET_IO_DIST, filename)):
        raise ApiError("not_found", "The socket.io JavaScript client is not installed on this "
                       "server: run `make install` (or `npm ci --prefix app/demo`).",
                       {"file": filename})
    return send_from_directory(SOCKET_IO_DIST, filename)


def demo_rate_limit() -> str:
    """Demo joins per client address (RATE_LIMIT_DEMO, 10 a minute)."""
    return current_app.config["RATE_LIMIT_DEMO"]


@bp.post("/demo/join")
@limiter.limit(demo_rate_limit, key_func=get_remote_address, scope="demo_join")
def join():
    """A chat and a connection string for the name the person typed, created on first use."""
    name = _name_from(request.get_json(silent=True))
    user_id = user_id_for(name)
    tenant, workspace = _demo_workspace()
    add_member(tenant, workspace, user_id)
    chat = _chat_for(tenant, workspace, user_id, name)
    seat = connection_string_for(tenant, chat, user_id)
    return {"chat_id": chat.id, "connection_string": seat["connection_string"],
            "expires_at": seat["expires_at"], "user_id": user_id, "name": name}


def _name_from(body: Any) -> str:
    if not isinstance(body, dict):
        raise ApiError("validation_error", "Send a JSON object with your name.",
                       {"name": ["Required."]})
    name = body.get("name")
    if not isinstance(name, str):
        raise ApiError("validation_error", "Please type your name.", {"name": ["Required."]})
    name = " ".join("".join(c for c in name if unicodedata.category(c)[0] != "C").split())
    if not name:
        raise ApiError("validation_error", "Please type your name.", {"name": ["Required."]})
    if len(name) > MAX_NAME:
        raise ApiError("validation_error", f"Your name may be at most {MAX_NAME} characters.",
                       {"name": [f"At most {MAX_NAME} characters."]})
    return name


def user_id_for(name: str) -> str:
    """A stable, valid user id for a typed name: a readable slug and a hash of the name.

    The hash keeps names that slug alike ("Zoë", "Zoe!", "李", "王") apart, and keeps any name
    from ever becoming the demo workspace's owner ("demo").
    """
    key = name.casefold()
    ascii_name = unicodedata.normalize("NFKD", key).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9_.@:-]+", "-", ascii_name).strip("-")[:48] or "guest"
    return f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _demo_workspace() -> tuple[Tenant, Workspace]:
    """The demo tenant and workspace; ``ensure_demo`` (the one definition of them) is asked
    once per process, and again only if they have gone."""
    cached = current_app.extensions.get("demo_workspace_id")
    tenant = db.session.get(Tenant, DEMO_TENANT_ID)
    if tenant is not None and cached is not None:
        try:
            return tenant, get_workspace(tenant, cached)
        except ApiError:
            pass
    demo = ensure_demo()
    current_app.extensions["demo_workspace_id"] = demo.workspace_id
    tenant = db.session.get(Tenant, demo.tenant_id)
    return tenant, get_workspace(tenant, demo.workspace_id)


def _chat_for(tenant: Tenant, workspace: Workspace, user_id: str, name: str) -> Chat:
    """The person's chat in the demo workspace (found by its metadata), created on first use."""
    chat = db.session.execute(
        select(Chat).where(Chat.workspace_id == workspace.id,
                           Chat.meta["demo_user"].as_string() == user_id)
        .order_by(Chat.created_at, Chat.id).limit(1)).scalars().first()
    if chat is not None:
        return chat
    return create_chat(tenant, DEMO_OWNER_ID, workspace.id, title=f"Demo chat with {name}",
                       metadata={"demo_user": user_id, "name": name})
