"""The production entry point: the one place that knows about eventlet and gevent.

Monkey-patching must happen before anything else is imported (psycopg2 included, so that
database calls yield to the event loop instead of blocking it). When the Flask CLI loads this
module (`flask --app wsgi db upgrade`), Flask is already imported and nothing needs a green
event loop, so the CLI runs unpatched.
"""
import os
import sys
import warnings

# eventlet is our users' choice and stays the default (see docs/operations.md); its
# deprecation notice would otherwise be printed by every process and every CLI command.
warnings.filterwarnings("ignore", message="\nEventlet is deprecated")


def _green_psycopg2() -> None:
    """Make psycopg2 wait on gevent instead of blocking the process (eventlet's
    monkey_patch does the same for itself); the wait callback from psycopg2's documentation."""
    import psycopg2
    from gevent.socket import wait_read, wait_write
    from psycopg2 import extensions

    def wait(conn, timeout=None):
        while True:
            state = conn.poll()
            if state == extensions.POLL_OK:
                break
            if state == extensions.POLL_READ:
                wait_read(conn.fileno(), timeout=timeout)
            elif state == extensions.POLL_WRITE:
                wait_write(conn.fileno(), timeout=timeout)
            else:
                raise psycopg2.OperationalError(f"bad state from poll: {state}")

    extensions.set_wait_callback(wait)


_loaded_by_flask_cli = "flask.cli" in sys.modules
_mode = os.environ.get("ASYNC_MODE", "eventlet").strip().lower()
if not _loaded_by_flask_cli:
    if _mode == "eventlet":
        import eventlet

        eventlet.monkey_patch()
        from app.overrides import eventlet_websocket, redis_eventlet

        eventlet_websocket.install()  # unmask incoming frames in one XOR, not byte by byte
        redis_eventlet.install()  # a pooled Redis connection's check does not yield
    elif _mode == "gevent":
        from gevent import monkey

        monkey.patch_all()
        _green_psycopg2()

from app import create_app  # noqa: E402

app = create_app()

if not _loaded_by_flask_cli:
    # Replies a killed process left "streaming" are ended before anyone reconnects.
    from app.agents.runner import end_interrupted_replies  # noqa: E402

    with app.app_context():
        try:
            if ended := end_interrupted_replies():
                app.logger.warning("ended %d replies interrupted by a previous process", ended)
        except Exception:  # the database may be away at start-up: /readyz says so
            app.logger.exception("could not end interrupted replies")

# The demo tenant is made sure of when the server starts, not when the CLI loads this module
# (`flask db upgrade` runs before the tables exist).
if app.config["DEMO"] and not _loaded_by_flask_cli:
    from app.demo import ensure_demo  # noqa: E402

    with app.app_context():
        ensure_demo()
