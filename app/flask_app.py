"""The app's Flask class: Flask, without URL matching or a cookie session for the contexts of
Socket.IO events."""
from __future__ import annotations

from typing import Any

from flask import Flask
from flask.sessions import SecureCookieSessionInterface

#: Where python-engineio's middleware takes requests (Flask-SocketIO's default ``path``).
SOCKETIO_PATH = "/socket.io/"


def _is_socketio(request: Any) -> bool:
    return request.environ.get("PATH_INFO", "").startswith(SOCKETIO_PATH)


class _SessionInterface(SecureCookieSessionInterface):
    """Flask's cookie session, except in the request contexts of Socket.IO events: those get
    an empty session without reading the cookie. Pushing a context opens the session, which
    builds a signing serializer and reads the cookie, on every event (connects included);
    Flask-SocketIO then replaces it with a session of its own per connection (copied from
    this one at connect), and nothing of ours reads ``flask.session`` (no route sets one)."""

    def open_session(self, app: Flask, request: Any) -> Any:
        if _is_socketio(request):
            return self.session_class()
        return super().open_session(app, request)


class ChatFlask(Flask):
    """Flask-SocketIO handles every Socket.IO event inside a request context made from the
    environ of the connection's first HTTP request, a ``/socket.io/`` URL. No route of ours can
    match it (the Engine.IO middleware takes those URLs before Flask sees them), yet Flask
    routes it against every rule of the app and builds a ``NotFound`` on each event: about 7 %
    of the worker's CPU across many chats (bench/RESULTS.md, "Stack costs"). Those contexts
    get no URL adapter; ``request.url_rule`` stays None as before, and every other request is
    routed as usual. (``create_url_adapter`` is Flask's documented hook.) Nor do they read the
    session cookie (``_SessionInterface``)."""

    session_interface = _SessionInterface()

    def create_url_adapter(self, request: Any) -> Any:
        if request is not None and _is_socketio(request):
            return None
        return super().create_url_adapter(request)
