"""gunicorn settings for the Procfile's web: line (read from the environment like the app)."""
import os
import warnings

from gunicorn import glogging

from app.jsonlog import redact_query

# eventlet is our users' choice (see docs/operations.md); its deprecation notice would be
# printed by every worker, as text even when LOG_FORMAT=json.
warnings.filterwarnings("ignore", message="\nEventlet is deprecated")

_mode = os.environ.get("ASYNC_MODE", "eventlet").strip().lower()

# HOST: all addresses by default (a platform routes to the process); `make run` sets 127.0.0.1.
_host = os.environ.get("HOST", "0.0.0.0").strip() or "0.0.0.0"
bind = f"[{_host}]:{os.environ.get('PORT', '8000')}" if ":" in _host else \
    f"{_host}:{os.environ.get('PORT', '8000')}"
# Socket.IO keeps per-connection state in the process, so one worker per process: scale out
# by running more processes behind a load balancer with REDIS_URL set (see the README).
workers = 1
worker_class = "gevent" if _mode == "gevent" else "eventlet"
# eventlet/gevent workers serve this many connections at once (gunicorn's default is 1,000).
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "10000"))
# Heroku-style platforms allow 30 s between SIGTERM and SIGKILL.
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "25"))
timeout = 60
keepalive = 5
# With LOG_FORMAT=json the app logs each request itself, as JSON with its request id.
_json_logs = os.environ.get("LOG_FORMAT", "text").lower() == "json"
accesslog = "-" if os.environ.get("ACCESS_LOG", "1") != "0" and not _json_logs else None
errorlog = "-"


#: gunicorn 25's eventlet worker warns at every start; the choice is made and documented
#: (docs/operations.md, "Processes"), so the line goes to the debug level.
EVENTLET_WORKER_NOTICE = "The eventlet worker is DEPRECATED"


class RedactingLogger(glogging.Logger):
    """Access lines never show the values of api_key, connection_string or message_string
    query parameters (polling and /ws/chat clients send them in the URL): [redacted]. The
    eventlet worker's start-up deprecation line is logged at debug level."""

    def warning(self, msg, *args, **kwargs):
        if isinstance(msg, str) and msg.startswith(EVENTLET_WORKER_NOTICE):
            return self.debug(msg, *args, **kwargs)
        return super().warning(msg, *args, **kwargs)

    def atoms(self, resp, req, environ, request_time):
        atoms = super().atoms(resp, req, environ, request_time)
        for name in ("r", "q", "f"):  # request line, query string, referer
            if isinstance(atoms.get(name), str):
                atoms[name] = redact_query(atoms[name])
        return atoms


logger_class = RedactingLogger
if _json_logs:
    from app.jsonlog import gunicorn_logconfig

    logconfig_dict = gunicorn_logconfig(json_format=True)
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
# gunicorn 25 opens a control socket in the working directory by default; we do not use it.
control_socket_disable = True


def post_worker_init(worker):
    """On SIGTERM, end streaming replies cleanly and close sockets before gunicorn exits."""
    from app.lifecycle import install_graceful_shutdown

    install_graceful_shutdown(worker)
