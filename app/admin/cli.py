"""Command line for operators: ``flask --app wsgi tenants create NAME`` and the demo set-up."""
import click
from flask import Blueprint

from app.auth import create_tenant
from app.extensions import db
from app.models import Tenant

tenants_cli = Blueprint("tenants", __name__, cli_group="tenants")
demo_cli = Blueprint("demo", __name__, cli_group="demo")


@tenants_cli.cli.command("create")
@click.argument("name")
def create(name: str) -> None:
    """Create a tenant and print its API key (shown only once)."""
    name = name.strip()
    if not 1 <= len(name) <= 100:
        raise click.BadParameter("must be 1-100 characters", param_hint="NAME")
    tenant, key = create_tenant(name)
    click.echo(f"tenant id: {tenant.id}")
    click.echo(f"api key:   {key}")


@tenants_cli.cli.command("list")
def list_tenants() -> None:
    """List tenants (id, name, number of active keys)."""
    for tenant in db.session.execute(db.select(Tenant).order_by(Tenant.created_at)).scalars():
        active = sum(1 for k in tenant.api_keys if k.revoked_at is None)
        click.echo(f"{tenant.id}  {tenant.name}  ({active} active key{'s' if active != 1 else ''})")


@demo_cli.cli.command("setup")
def setup() -> None:
    """Make sure the demo tenant and its echo workspace exist; print the demo API key."""
    from app.demo import ensure_demo

    demo = ensure_demo()
    click.echo(f"demo tenant:    {demo.tenant_id}")
    click.echo(f"demo workspace: {demo.workspace_id} (agent: echo, owner: {demo.owner_id})")
    click.echo(f"demo api key:   {demo.api_key}")
