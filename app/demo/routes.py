"""The browser demo at / (DEMO=1): a page, a seat for the name a person types, its scripts.

The server holds the demo tenant, so it hands the page a chat and a connection string through
the same services the REST API uses; the browser never sees the demo tenant's API key. The
page's scripts are ES modules served by the app itself: the workspace-chat-client package
(clients/js/src) and, from app/demo/node_modules (``npm ci --prefix app/demo``),
socket.io-client, marked and DOMPurify. An import map resolves their bare names; it is the one
inline script the page's CSP allows, by its hash.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import unicodedata
from typing import Any

from flask import (Blueprint, current_app, render_template, request, send_from_directory,
                   url_for)
from flask_limiter.util import get_remote_address
from sqlalchemy import select

from app.chat.chats import connection_string_for, create_chat
from app.demo import DEMO_OWNER_ID, DEMO_TENANT_ID, ensure_demo
from app.errors import ApiError
from app.extensions import db, limiter
from app.models import Chat, Tenant, Workspace
from app.workspaces.service import add_member, get_workspace

bp = Blueprint("demo_page", __name__, template_folder="templates", static_folder="static",
               static_url_path="/demo/static")

MAX_NAME = 64
MAX_PEOPLE = 200
NODE_MODULES = os.path.join(bp.root_path, "node_modules")
CLIENT_SRC = os.path.join(bp.root_path, os.pardir, os.pardir, "clients", "js", "src")
# The page's scripts, served under /demo/<file name>: (folder, file name inside it). A source
# map keeps its own name, so the sourceMappingURL comment at the end of each file finds it.
VENDOR_FILES = {
    "socket.io.esm.min.js": ("socket.io-client/dist", "socket.io.esm.min.js"),
    "socket.io.esm.min.js.map": ("socket.io-client/dist", "socket.io.esm.min.js.map"),
    "marked.esm.js": ("marked/lib", "marked.esm.js"),
    "marked.esm.js.map": ("marked/lib", "marked.esm.js.map"),
    "purify.es.mjs": ("dompurify/dist", "purify.es.mjs"),
    "purify.es.mjs.map": ("dompurify/dist", "purify.es.mjs.map"),
}
CLIENT_FILE = "workspace-chat-client.js"
SCRIPT_FILES = (*VENDOR_FILES, CLIENT_FILE)
# Bare module names -> the file that answers them (see the import map in index()).
MODULES = {"socket.io-client": "socket.io.esm.min.js", "marked": "marked.esm.js",
           "dompurify": "purify.es.mjs", "workspace-chat-client": CLIENT_FILE}


def import_map() -> str:
    """The page's import map, as the exact text placed in its inline script."""
    imports = {name: url_for("demo_page.script_file", filename=filename)
               for name, filename in MODULES.items()}
    return json.dumps({"imports": imports}, sort_keys=True).replace("</", "<\\/")


@bp.get("/")
def index():
    """The demo page."""
    imports = import_map()
    digest = base64.b64encode(hashlib.sha256(imports.encode()).digest()).decode()
    response = current_app.make_response(render_template("demo/index.html", import_map=imports))
    # Nothing but this origin: no CDN, no third-party requests, no inline script but the
    # import map (allowed by its hash).
    host = request.host
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; "
        f"script-src 'self' 'sha256-{digest}'; "
        f"connect-src 'self' ws://{host} wss://{host}; base-uri 'none'; form-action 'self'; "
        "object-src 'none'; frame-ancestors 'none'")
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@bp.get("/demo/<any(" + ",".join(f'"{name}"' for name in SCRIPT_FILES) + "):filename>")
def script_file(filename: str):
    """One of the page's scripts: the JS client package, or a library from node_modules."""
    if filename == CLIENT_FILE:
        folder, name = CLIENT_SRC, "index.js"
        missing = "The workspace-chat-client package (clients/js/src) is not on this server."
    else:
        folder, name = os.path.join(NODE_MODULES, VENDOR_FILES[filename][0]), \
            VENDOR_FILES[filename][1]
        missing = ("The demo's JavaScript libraries are not installed on this server: run "
                   "`make install` (or `npm ci --prefix app/demo`).")
    if not os.path.isfile(os.path.join(folder, name)):
        raise ApiError("not_found", missing, {"file": filename})
    mimetype = "application/json" if name.endswith(".map") else "text/javascript"
    return send_from_directory(os.path.abspath(folder), name, mimetype=mimetype)


def demo_rate_limit() -> str:
    """Demo joins per client address (RATE_LIMIT_DEMO, 10 a minute)."""
    return current_app.config["RATE_LIMIT_DEMO"]


@bp.post("/demo/join")
@limiter.limit(demo_rate_limit, key_func=get_remote_address, scope="demo_join")
def join():
    """A seat for the name the person typed: their own chat, or the room's chat when they name
    a room (several people naming one room share it); created on first use."""
    body = request.get_json(silent=True)
    name = _name_from(body)
    room = _room_from(body)
    user_id = user_id_for(name)
    tenant, workspace = _demo_workspace()
    add_member(tenant, workspace, user_id)
    if room is None:
        chat = _chat_for(tenant, workspace, user_id, name)
    else:
        chat = _room_chat(tenant, workspace, room)
    people = _remember_name(chat, user_id, name)
    seat = connection_string_for(tenant, chat, user_id)
    return {"chat_id": chat.id, "connection_string": seat["connection_string"],
            "expires_at": seat["expires_at"], "user_id": user_id, "name": name,
            # the room as whoever named it first spelled it
            "room": (chat.meta or {}).get("room", room) if room is not None else None,
            "people": people}


def _clean_text(body: Any, field: str, required: str) -> str | None:
    """A typed name: control characters removed, runs of white space made one space, 1-64
    characters; None when it is absent (the caller decides whether that is allowed)."""
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError("validation_error", required, {field: ["Must be text."]})
    value = " ".join("".join(c for c in value if unicodedata.category(c)[0] != "C").split())
    if not value:
        return None
    if len(value) > MAX_NAME:
        raise ApiError("validation_error",
                       f"Your {field} may be at most {MAX_NAME} characters.",
                       {field: [f"At most {MAX_NAME} characters."]})
    return value


def _name_from(body: Any) -> str:
    if not isinstance(body, dict):
        raise ApiError("validation_error", "Send a JSON object with your name.",
                       {"name": ["Required."]})
    name = _clean_text(body, "name", "Please type your name.")
    if name is None:
        raise ApiError("validation_error", "Please type your name.", {"name": ["Required."]})
    return name


def _room_from(body: dict[str, Any]) -> str | None:
    """The optional room name, cleaned like a name; empty means the person's own chat."""
    return _clean_text(body, "room", "A room name must be text.")


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
    return _chat_by_metadata(tenant, workspace, "demo_user", user_id,
                             title=f"Demo chat with {name}", extra={"name": name})


def _room_chat(tenant: Tenant, workspace: Workspace, room: str) -> Chat:
    """The room's chat in the demo workspace (found by its metadata: the room name without
    case), created by whoever names the room first."""
    return _chat_by_metadata(tenant, workspace, "demo_room", room.casefold(),
                             title=f"Demo room {room}", extra={"room": room})


def _chat_by_metadata(tenant: Tenant, workspace: Workspace, field: str, value: str,
                      title: str, extra: dict[str, str]) -> Chat:
    """The oldest demo chat whose metadata has ``field == value``, created if there is none."""
    chat = db.session.execute(
        select(Chat).where(Chat.workspace_id == workspace.id,
                           Chat.meta[field].as_string() == value)
        .order_by(Chat.created_at, Chat.id).limit(1)).scalars().first()
    if chat is not None:
        return chat
    return create_chat(tenant, DEMO_OWNER_ID, workspace.id, title=title,
                       metadata={field: value, **extra})


def _remember_name(chat: Chat, user_id: str, name: str) -> dict[str, str]:
    """Keep the name each person typed in the chat's metadata, so that pages show names, not
    user ids; returns everyone's names."""
    meta = dict(chat.meta or {})
    people = dict(meta.get("people") or {})
    if people.get(user_id) != name:
        people.pop(user_id, None)
        people[user_id] = name
        while len(people) > MAX_PEOPLE:  # a busy room keeps its most recent names
            people.pop(next(iter(people)))
        meta["people"] = people
        chat.meta = meta  # a new dict, so that SQLAlchemy sees the JSON column change
        db.session.commit()
    return people
