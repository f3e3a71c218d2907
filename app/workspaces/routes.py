"""REST routes for workspaces and their members."""
from flask import g
from flask.views import MethodView

from app.api import tenant_blueprint, user_pages
from app.schemas import (USER_ID_PATH_PARAMETER, WorkspaceCreateSchema, WorkspacePageSchema,
                         WorkspaceSchema, WorkspaceUpdateSchema, require_valid_user_id)
from app.workspaces import service

bp = tenant_blueprint("workspaces", __name__, "/api/v1/workspaces",
                      "Workspaces: owner, members and agent configuration.")


@bp.route("", methods=["POST"])
@bp.arguments(WorkspaceCreateSchema)
@bp.response(201, WorkspaceSchema)
def create_workspace(body):
    """Create a workspace owned by `owner_id`."""
    return service.create_workspace(g.tenant, body["owner_id"], body["name"], body.get("agent"))


list_user_workspaces = user_pages(bp, WorkspacePageSchema, service.list_user_workspaces,
                                  "The workspaces a user owns or is a member of.")


@bp.route("/<workspace_id>", methods=["GET"])
@bp.response(200, WorkspaceSchema)
def get_workspace(workspace_id):
    """One workspace."""
    return service.get_workspace(g.tenant, workspace_id)


@bp.route("/<workspace_id>", methods=["PATCH"])
@bp.arguments(WorkspaceUpdateSchema)
@bp.response(200, WorkspaceSchema)
def update_workspace(body, workspace_id):
    """Rename a workspace or replace its agent (a secret left out of the same kind is kept)."""
    workspace = service.get_workspace(g.tenant, workspace_id)
    return service.update_workspace(workspace, body)


@bp.route("/<workspace_id>", methods=["DELETE"])
@bp.response(204)
def delete_workspace(workspace_id):
    """Delete a workspace with its chats and messages."""
    service.delete_workspace(service.get_workspace(g.tenant, workspace_id))


@bp.route("/<workspace_id>/members/<user_id>", parameters=[USER_ID_PATH_PARAMETER])
class Member(MethodView):
    """A workspace's member: both methods are idempotent."""

    @bp.response(204)
    def put(self, workspace_id, user_id):
        """Make a user a member of the workspace (idempotent)."""
        service.add_member(g.tenant, *_workspace_and_user(workspace_id, user_id))

    @bp.response(204)
    def delete(self, workspace_id, user_id):
        """Remove a member from the workspace (idempotent)."""
        service.remove_member(g.tenant, *_workspace_and_user(workspace_id, user_id))


def _workspace_and_user(workspace_id: str, user_id: str):
    """The tenant's workspace, then the user id once it is checked (in that order)."""
    workspace = service.get_workspace(g.tenant, workspace_id)
    require_valid_user_id(user_id)
    return workspace, user_id
