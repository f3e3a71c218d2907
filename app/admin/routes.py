"""The admin API behind ADMIN_TOKEN: tenants and their API keys."""
from app.api import Blueprint
from app.auth import create_api_key, create_tenant_with_key, require_admin, revoke_api_key
from app.errors import ApiError
from app.extensions import db
from app.models import ApiKey, Tenant, may_be_id
from app.schemas import ApiKeyCreatedSchema, TenantCreateSchema, TenantCreatedSchema

bp = Blueprint("admin", __name__, url_prefix="/admin",
               description="Operators: tenants and API keys (Authorization: Bearer ADMIN_TOKEN).")
bp.before_request(require_admin)
#: The document's default security is the tenant's X-API-Key; these operations take the token.
admin_token = bp.doc(security=[{"AdminToken": []}])


def _tenant(tenant_id: str) -> Tenant:
    tenant = db.session.get(Tenant, tenant_id) if may_be_id(tenant_id) else None
    if tenant is None:
        raise ApiError("not_found", f"Tenant {tenant_id!r} was not found.")
    return tenant


@bp.route("/tenants", methods=["POST"])
@admin_token
@bp.arguments(TenantCreateSchema)
@bp.response(201, TenantCreatedSchema)
def create(body):
    """Create a tenant; its API key is shown only in this response, with the key's id
    (``api_key_id``, for ``DELETE /admin/tenants/{id}/api-keys/{api_key_id}``)."""
    tenant, row, key = create_tenant_with_key(body["name"])
    return {"id": tenant.id, "name": tenant.name, "api_key": key, "api_key_id": row.id}


@bp.route("/tenants/<tenant_id>/api-keys", methods=["POST"])
@admin_token
@bp.response(201, ApiKeyCreatedSchema)
def add_key(tenant_id):
    """Issue another API key for a tenant; older keys keep working until revoked."""
    row, key = create_api_key(_tenant(tenant_id))
    db.session.commit()
    return {"id": row.id, "api_key": key}


@bp.route("/tenants/<tenant_id>/api-keys/<key_id>", methods=["DELETE"])
@admin_token
@bp.response(204)
def revoke_key(tenant_id, key_id):
    """Revoke one of a tenant's API keys."""
    tenant = _tenant(tenant_id)
    key = db.session.get(ApiKey, key_id) if may_be_id(key_id) else None
    if key is None or key.tenant_id != tenant.id:
        raise ApiError("not_found", f"API key {key_id!r} was not found.")
    revoke_api_key(key)
