"""REST routes for chats and their history, and the /chat blueprint's create."""
from flask import g

from app.api import tenant_blueprint, user_pages
from app.chat import chats
from app.schemas import (ChatCreateSchema, ChatPageSchema, ChatSchema,
                         ConnectionStringRequestSchema, ConnectionStringSchema,
                         MessageListArgs, MessagePageSchema)

bp = tenant_blueprint("chats", __name__, "/api/v1/chats", "Chats and their message history.")
chat_bp = tenant_blueprint("chat", __name__, "/chat",
                           "The /chat blueprint: create a chat in a workspace the user owns.")


def _create(body):
    return chats.create_chat(g.tenant, body["user_id"], body.get("workspace_id"),
                               body.get("title"), body.get("metadata"))


# strict_slashes=False: POST /api/v1/chats (no slash) creates a chat too, instead of a 308
# redirect with an HTML body that clients do not follow with the body.
@bp.route("/", methods=["POST"], strict_slashes=False)
@bp.arguments(ChatCreateSchema)
@bp.response(201, ChatSchema)
def create_chat(body):
    """Create a chat in a workspace the user owns (default: their "Personal" workspace)."""
    return _create(body)


@chat_bp.route("", methods=["POST"])
@chat_bp.arguments(ChatCreateSchema)
@chat_bp.response(201, ChatSchema)
def create_chat_via_chat_blueprint(body):
    """Create a chat (same as `POST /api/v1/chats/`)."""
    return _create(body)


list_user_chats = user_pages(bp, ChatPageSchema, chats.list_user_chats,
                             "The chats a user created, oldest first.")


@bp.route("/<chat_id>", methods=["GET"])
@bp.response(200, ChatSchema)
def get_chat(chat_id):
    """One chat."""
    return chats.get_chat(g.tenant.id, chat_id)


@bp.route("/<chat_id>/messages", methods=["GET"])
@bp.arguments(MessageListArgs, location="query")
@bp.response(200, MessagePageSchema)
def list_messages(args, chat_id):
    """A page of the chat's history; `after_id`/`before_id` bound it, `order` sorts it."""
    chat = chats.get_chat(g.tenant.id, chat_id)
    return chats.list_messages(chat, args["offset"], args["limit"], args["order"],
                                 args.get("after_id"), args.get("before_id"))


@bp.route("/<chat_id>", methods=["DELETE"])
@bp.response(204)
def delete_chat(chat_id):
    """Delete a chat and its messages."""
    chats.delete_chat(chats.get_chat(g.tenant.id, chat_id))


@bp.route("/<chat_id>/connection-string", methods=["POST"])
@bp.arguments(ConnectionStringRequestSchema)
@bp.response(200, ConnectionStringSchema)
def connection_string(body, chat_id):
    """A signed, time-limited connection string for the chat's owner or a member."""
    chat = chats.get_chat(g.tenant.id, chat_id)
    return chats.connection_string_for(g.tenant, chat, body["user_id"])
