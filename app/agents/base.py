"""The one agent protocol."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol


class AgentError(Exception):
    """An agent failed in a way worth telling the chat about (the text is shown to people)."""


@dataclass
class AgentContext:
    """What an agent gets: the new message, recent history (oldest first) and its config."""

    tenant_id: str
    workspace_id: str
    chat_id: str
    message: dict[str, Any]
    history: list[dict[str, Any]]
    config: dict[str, Any]
    timeout: float
    extra: dict[str, Any] = field(default_factory=dict)


class Agent(Protocol):
    def stream(self, context: AgentContext) -> Iterator[str]:
        """Yield the reply's tokens, in order."""
