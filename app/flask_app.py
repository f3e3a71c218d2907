"""The app's Flask class: Flask, without URL matching for the contexts of Socket.IO events."""
from __future__ import annotations

from typing import Any

from flask import Flask

#: Where python-engineio's middleware takes requests (Flask-SocketIO's default ``path``).
SOCKETIO_PATH = "/socket.io/"


class ChatFlask(Flask):
    """Flask-SocketIO handles every Socket.IO event inside a request context made from the
    environ of the connection's first HTTP request, a ``/socket.io/`` URL. No route of ours can
    match it (the Engine.IO middleware takes those URLs before Flask sees them), yet Flask
    routes it against every rule of the app and builds a ``NotFound`` on each event: about 7 %
    of the worker's CPU across many chats (bench/RESULTS.md, "Stack costs"). Those contexts
    get no URL adapter; ``request.url_rule`` stays None as before, and every other request is
    routed as usual. (``create_url_adapter`` is Flask's documented hook.)"""

    def create_url_adapter(self, request: Any) -> Any:
        if request is not None and request.environ.get("PATH_INFO", "").startswith(
                SOCKETIO_PATH):
            return None
        return super().create_url_adapter(request)
