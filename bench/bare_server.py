"""The baseline of `make bench`: a bare Flask-SocketIO broadcast server, none of our work.

    python bench/bare_server.py --port 9000 [--async-mode eventlet|gevent] [--tuned]

/chat: a client connects with auth {chat_id} and joins that room; `message` {content, chat_id}
is broadcast to the room as `message_received` (with an id, like ours) and acknowledged. No
authentication, no message strings, no database, no rate limit. With `stream: true` in the
payload it then emits, to the room, what our echo agent's reply emits with STREAM_FLUSH_MS=0:
`message_stream_started`, one `message_stream_token` per word of the content, and
`message_stream_ended` (the same number of events; nothing else: no agent, no storage).

Without --tuned it runs exactly as ``socketio.run(app)`` leaves it. With --tuned it gets what
our Procfile server sets: TCP_NODELAY on the listening socket (accepted sockets inherit it), a
connection limit of 10,000 instead of 1,024, and no WebSocket compression.
"""
import argparse
import sys

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--async-mode", default="eventlet", choices=["eventlet", "gevent"])
parser.add_argument("--tuned", action="store_true")
args = parser.parse_args()

if args.async_mode == "eventlet":
    import warnings

    warnings.filterwarnings("ignore", message="\nEventlet is deprecated")
    import eventlet

    eventlet.monkey_patch()
else:
    from gevent import monkey

    monkey.patch_all()

import itertools  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402

from flask import Flask, request  # noqa: E402
from flask_socketio import SocketIO, emit, join_room  # noqa: E402

app = Flask(__name__)
socketio = SocketIO(app, async_mode=args.async_mode, cors_allowed_origins="*")
ids = itertools.count(1)
rooms: dict[str, str] = {}


@socketio.on("connect", namespace="/chat")
def connect(auth=None):
    chat_id = (auth or {}).get("chat_id") or request.args.get("chat_id") or "default"
    rooms[request.sid] = chat_id
    join_room(chat_id)


@socketio.on("disconnect", namespace="/chat")
def disconnect(reason=None):
    rooms.pop(request.sid, None)


@socketio.on("message", namespace="/chat")
def message(data):
    chat_id = rooms.get(request.sid)
    message = {"id": str(next(ids)), "chat_id": chat_id, "content": data.get("content"),
               "role": "user"}
    emit("message_received", message, to=chat_id)
    if data.get("stream"):
        stream(chat_id, message)
    return {"ok": True, "message": message}


def stream(chat_id: str, message: dict) -> None:
    reply_id = str(next(ids))
    emit("message_stream_started", {"message_id": reply_id, "chat_id": chat_id,
                                    "reply_to": message["id"]}, to=chat_id)
    words = re.findall(r"\s*\S+", message["content"] or "")
    for index, word in enumerate(words):
        emit("message_stream_token", {"message_id": reply_id, "chat_id": chat_id,
                                      "token": word, "index": index}, to=chat_id)
    emit("message_stream_ended", {"message_id": reply_id, "chat_id": chat_id,
                                  "content": "".join(words), "finish_reason": "stop"},
         to=chat_id)


@app.get("/healthz")
def healthz():
    return {"status": "ok"}


class WithoutWebSocketCompression:
    """Hide the client's permessage-deflate offer (what our WS_COMPRESSION=0 default does)."""

    def __init__(self, wsgi_app):
        self.wsgi_app = wsgi_app

    def __call__(self, environ, start_response):
        environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)
        return self.wsgi_app(environ, start_response)


if __name__ == "__main__":
    if not args.tuned:
        socketio.run(app, host="127.0.0.1", port=args.port)
        sys.exit(0)
    app.wsgi_app = WithoutWebSocketCompression(app.wsgi_app)
    if args.async_mode == "eventlet":
        from eventlet import wsgi

        listener = eventlet.listen(("127.0.0.1", args.port))
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        wsgi.server(listener, app, log_output=False, max_size=10_000)
    else:
        from gevent.pool import Pool
        from gevent.pywsgi import WSGIServer

        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        listener.bind(("127.0.0.1", args.port))
        listener.listen(2048)
        WSGIServer(listener, app, log=None, spawn=Pool(10_000)).serve_forever()
