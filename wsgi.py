"""The production entry point: the one place that knows about eventlet and gevent.

Monkey-patching must happen before anything else is imported (psycopg2 included, so that
database calls yield to the event loop instead of blocking it).
"""
import os

_mode = os.environ.get("ASYNC_MODE", "eventlet").strip().lower()
if _mode == "eventlet":
    import eventlet

    eventlet.monkey_patch()
elif _mode == "gevent":
    from gevent import monkey

    monkey.patch_all()

import click  # noqa: E402

from app import create_app  # noqa: E402

app = create_app()

# The demo tenant is made sure of when the server starts, but not when the Flask CLI loads
# this module (`flask db upgrade` runs before the tables exist).
if app.config["DEMO"] and click.get_current_context(silent=True) is None:
    from app.demo import ensure_demo  # noqa: E402

    with app.app_context():
        ensure_demo()
