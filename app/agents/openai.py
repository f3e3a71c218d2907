"""``openai``: any OpenAI-compatible ``/v1/chat/completions`` server, streamed (SSE)."""
from __future__ import annotations

from typing import Any, Iterator

from app.agents import http, secrets
from app.agents.base import AgentContext, AgentError

DEFAULT_HISTORY = 10


class OpenAIAgent:
    def __init__(self, config: dict[str, Any]):
        self.config = config

    def conversation(self, context: AgentContext) -> list[dict[str, str]]:
        """The system prompt, the last ``history`` messages and the new one."""
        messages = []
        if self.config.get("system_prompt"):
            messages.append({"role": "system", "content": self.config["system_prompt"]})
        count = int(self.config.get("history", DEFAULT_HISTORY))
        recent = context.history[-count:] if count else []
        for item in [*recent, context.message]:
            if item["role"] in ("user", "agent") and item["content"]:
                role = "assistant" if item["role"] == "agent" else "user"
                messages.append({"role": role, "content": item["content"]})
        return messages

    def stream(self, context: AgentContext) -> Iterator[str]:
        url = self.config["base_url"].rstrip("/") + "/chat/completions"
        headers = {"Accept": "text/event-stream"}
        api_key = secrets.reveal(self.config.get("api_key"))  # decrypted only here
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        body = {"model": self.config["model"], "messages": self.conversation(context),
                "stream": True}
        response = http.post(url, context.timeout, json=body, headers=headers)
        for data in http.sse_data(response):
            chunk = http.json_object(data)
            if "error" in chunk:
                raise AgentError("the model server reported an error")
            for choice in chunk.get("choices") or []:
                delta = (choice or {}).get("delta") or {}
                token = delta.get("content")
                if isinstance(token, str) and token:
                    yield token
