"""``webhook``: POST the context as signed JSON; the reply is JSON, NDJSON or SSE."""
from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any, Iterator

from app.agents import http, secrets
from app.agents.base import AgentContext, AgentError

DEFAULT_HISTORY = 20


def signature(secret: str, body: bytes) -> str:
    """The ``X-Signature-256`` header value for a body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookAgent:
    def __init__(self, config: dict[str, Any]):
        self.config = config

    def stream(self, context: AgentContext) -> Iterator[str]:
        body = json.dumps({
            "workspace_id": context.workspace_id,
            "chat_id": context.chat_id,
            "message": context.message,
            "history": context.history[-DEFAULT_HISTORY:],
        }, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json",
                   "Accept": "application/x-ndjson, text/event-stream, application/json"}
        secret = secrets.reveal(self.config.get("secret"))  # decrypted only here
        if secret:
            headers["X-Signature-256"] = signature(secret, body)
        response = http.post(self.config["url"], context.timeout, data=body, headers=headers)
        kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind == "text/event-stream":
            for data in http.sse_data(response):
                yield http.token_of(http.json_object(data))
        elif kind in ("application/x-ndjson", "application/jsonl", "application/jsonlines"):
            for line in http.lines(response):
                if line.strip():
                    yield http.token_of(http.json_object(line))
        elif kind == "application/json":
            reply = http.json_object("\n".join(http.lines(response)))
            content = reply.get("content")
            if not isinstance(content, str):
                raise AgentError("the agent's JSON reply has no string 'content'")
            yield content
        else:
            response.close()
            raise AgentError(f"the agent replied with an unsupported content type {kind!r}")
